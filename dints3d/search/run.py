"""``dints3d search``: bilevel DiNTS search on a prepared task (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dints3d.config import config_path, load_config
from dints3d.search.loop import SearchRun
from dints3d.spaces.base import Architecture
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.factory import load_architecture
from dints3d.utils.checkpoint import has_checkpoint
from dints3d.utils.runtime import init_runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="dints_search",
                        help="YAML config path or packaged name (dints_search, demo); default: dints_search")
    parser.add_argument("--work", required=True, help="folder written by `dints3d prepare`")
    parser.add_argument("--out", required=True, help="run folder: arch.json, arch.png, checkpoints/, tensorboard/")
    parser.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="FILE",
                        help="YAML holding some config keys (e.g. fit-24gb/search.yaml written by `dints3d fit`), "
                             "merged after --config and before --set (repeatable, applied in order)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set search.iterations=2000 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                        help="continue from RUN/checkpoints/last.pt (or last.prev.pt if it is damaged), under any "
                             "number of processes, with the same config except search.lr, search.arch_lr, "
                             "search.amp, search.max_nonfinite_steps, search.iterations and the validation/"
                             "checkpoint settings (docs/search.md); `--resume auto` continues when a checkpoint "
                             "exists and starts fresh otherwise (for `torchrun --max-restarts` and job requeues)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="ITER",
                        help="stop once ITER iterations are done, leaving a resumable checkpoint (job time limits)")


def wants_resume(mode: str | None, out: str | Path) -> bool:
    """``--resume`` → True; ``--resume auto`` → whether ``out`` holds a checkpoint; no flag → False."""
    if mode == "auto":
        return has_checkpoint(Path(out) / "checkpoints" / "last.pt")
    return mode == "yes"


def finest_depth_warning(arch: Architecture) -> str | None:
    """A warning when a decoded DiNTS network runs no cell at the finest searched depth: every cell then works at a
    quarter of the input's resolution or coarser, which thin structures pay for (docs/accuracy.md: at σ = 0.4 the
    hard budget decoded a chain at the coarsest depth only). None for other networks or when depth 0 is used."""
    unused = arch.unused_depths() if isinstance(arch, DintsArchitecture) else []
    if 0 not in unused:
        return None
    sigma = arch.provenance.get("ram_cost_factor")
    budget = f" (σ = {sigma:g})" if isinstance(sigma, (int, float)) else ""
    return (f"warning: the decoded network uses no cell at depth 0, the finest searched resolution (unused depths: "
            f"{', '.join(map(str, unused))}): the memory budget{budget} left it none. If thin structures matter, "
            "raise search.ram_cost_factor or search.memory_budget_gb, and compare with a baseline (dints3d select)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config), args.overrides, args.overlays)
    runtime = init_runtime(cfg.device)
    try:
        with SearchRun(cfg, args.work, args.out, runtime, resume=wants_resume(args.resume, args.out)) as search:
            arch_path = search.run(stop_after=args.stop_after)
    finally:
        runtime.close()
    if runtime.is_main:
        if arch_path is None:
            print(f"stopped at iteration {search.state.iteration}; resume with --resume")
        else:
            print(f"architecture: {arch_path}")
            print(f"picture:      {arch_path.parent / 'arch.png'}")
            warning = finest_depth_warning(load_architecture(arch_path))
            if warning:
                print(warning, file=sys.stderr)
    return 0
