"""Stability of the DiNTS search: N seeds of the same search on one synthetic task.

For each search seed, the differentiable search (``SearchRun``) runs on the search pool of a synthetic task (split as
in ``bench/random_vs_differentiable.py``: fold 0 = the pool's train / validation cases, fold 1 = the whole pool for
retraining and held-out cases for the final score). Then:

- **agreement** of the decoded architectures over the pairs of seeds (``dints3d.spaces.dints.agreement``): Jaccard
  index of the kept paths, fraction of equal path decisions, fraction of shared paths with the same operation, and
  per layer;
- **retrained Dice**: each decoded network retrained from one fixed seed on the pool and scored on the held-out
  cases — the spread over search seeds is the search's own noise;
- **discretisation gap**: the supernet's validation Dice at the end of its search vs the decoded network's Dice on the
  same validation cases after retraining on the same training cases (fold 0) for ``--retrain-iterations``.

Prints a table and, last, one JSON line; ``--keep DIR`` keeps the run folders (reruns reuse finished searches).

    python bench/stability.py --task brain --seeds 3 --keep runs/stability
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from random_vs_differentiable import held_out_datalist

from dints3d.config import load_config
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.random_search.run import memory_limit
from dints3d.random_search.train import NetworkEvaluator
from dints3d.search.loop import SearchRun
from dints3d.spaces.dints.agreement import agreement
from dints3d.spaces.factory import load_architecture
from dints3d.utils.io import read_json, write_json
from dints3d.utils.runtime import init_runtime

TASKS = {
    "ct": {"modalities": 1, "anisotropic": False, "anatomy": "abdomen"},
    "brain": {"modalities": 2, "anisotropic": True, "anatomy": "brain"},
}


def settings(args: argparse.Namespace, seed: int, fold: int) -> list[str]:
    return [
        "device=cpu", f"seed={seed}", f"data.fold={fold}", f"data.patch_size=[{args.patch}]", "data.num_samples=2",
        "data.batch_size=1", f"dints.num_blocks={args.blocks}", f"dints.num_depths={args.depths}",
        "dints.channel_mul=0.25", f"dints.use_downsample={str(args.downsample).lower()}", "search.amp=false",
        "train.amp=false", f"train.channel_mul={args.channel_mul}", f"search.iterations={args.search_iterations}",
        f"search.val_interval={args.search_iterations}", f"search.checkpoint_interval={args.search_iterations}",
        "search.val_overlap=0.0", f"search.ram_cost_factor={args.sigma}", *args.set,
    ]


def search(args: argparse.Namespace, root: Path, seed: int) -> dict:
    """Seed ``seed``'s search (reused when ``root/search/seed<k>/result.json`` exists): arch path, supernet Dice."""
    out = root / "search" / f"seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return read_json(done)
    run = SearchRun(load_config(None, settings(args, seed, 0)), root / "work", out, init_runtime("cpu"))
    try:
        arch = run.run()
    finally:
        run.close()
    result = {"arch": str(arch), "supernet_dice": run.state.best_dice}
    write_json(done, result)
    return result


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="ct")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds")
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--size", type=int, default=40, help="synthetic volume side (voxels)")
    parser.add_argument("--patch", default="32,32,32")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--depths", type=int, default=3)
    parser.add_argument("--downsample", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="dints.use_downsample (the stem's stride-2; default true)")
    parser.add_argument("--sigma", type=float, default=0.8, help="search.ram_cost_factor")
    parser.add_argument("--channel-mul", type=float, default=0.5, help="retraining width")
    parser.add_argument("--search-iterations", type=int, default=120)
    parser.add_argument("--retrain-iterations", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="keep the run folders here (reruns reuse finished searches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runtime = init_runtime("cpu")

    with tempfile.TemporaryDirectory(prefix="dints3d-stability-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "work" / "plan.json").is_file():
            task = make_msd_task(root / "task", cases=args.cases, test_cases=0, size=args.size, seed=11,
                                 **TASKS[args.task])
            prepare(task, root / "work", folds=2, seed=0, progress=False)
            held_out_datalist(root / "work", args.held_out, validation=3)
        searches = [search(args, root, seed) for seed in range(args.seeds)]
        archs = [load_architecture(s["arch"]) for s in searches]
        plan = read_json(root / "work" / "plan.json")
        patch = [int(p) for p in args.patch.split(",")]
        cfg0 = load_config(None, settings(args, 0, 0))
        limit = memory_limit(cfg0, "dints", int(plan["in_channels"]), int(plan["out_channels"]), patch, "cpu")
        same_cases = NetworkEvaluator(cfg0, root / "work", runtime, plan, patch)
        held_out = NetworkEvaluator(load_config(None, settings(args, 0, 1)), root / "work", runtime, plan, patch)
        rows = []
        for seed, (found, arch) in enumerate(zip(searches, archs)):
            gap_dice = same_cases(arch, args.retrain_iterations, 1000).score
            final = held_out(arch, args.retrain_iterations, 1000).score
            rows.append({"seed": seed, "supernet_dice": found["supernet_dice"], "retrained_validation_dice": gap_dice,
                         "held_out_dice": final, "memory_ratio": limit.measure(arch),
                         "active_paths": arch.num_active_paths})
            print(f"seed {seed}: supernet {found['supernet_dice']:.4f}, decoded+retrained {gap_dice:.4f} on the "
                  f"same cases, held-out {final:.4f}", file=sys.stderr)

    agree = agreement(archs)
    summary = {
        "bench": "stability", "task": args.task, "seeds": args.seeds, "search_iterations": args.search_iterations,
        "retrain_iterations": args.retrain_iterations, "use_downsample": args.downsample, "sigma": args.sigma,
        "agreement": agree, "rows": rows,
        "held_out_dice": spread([r["held_out_dice"] for r in rows]),
        "supernet_dice": spread([r["supernet_dice"] for r in rows]),
        "discretisation_gap": spread([r["supernet_dice"] - r["retrained_validation_dice"] for r in rows]),
    }
    print("| seed | supernet val. Dice | decoded, retrained, same cases | held-out Dice | memory ratio | paths |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['supernet_dice']:.4f} | {r['retrained_validation_dice']:.4f} | "
              f"{r['held_out_dice']:.4f} | {r['memory_ratio']:.3f} | {r['active_paths']} |")
    held, gap = summary["held_out_dice"], summary["discretisation_gap"]
    print(f"\nagreement over {agree['pairs']} pairs: paths Jaccard {agree['paths_jaccard']:.3f}, equal path decisions "
          f"{agree['paths_equal']:.3f}, same operation on shared paths "
          f"{agree['operations'] if agree['operations'] is None else round(agree['operations'], 3)}, identical "
          f"{agree['identical']}; per layer {[round(v, 2) for v in agree['per_layer']]}")
    print(f"held-out Dice {held['mean']:.4f} ± {held['sd']:.4f}; discretisation gap (supernet − retrained) "
          f"{gap['mean']:+.4f} ± {gap['sd']:.4f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
