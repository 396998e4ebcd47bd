"""``dints3d demo``: ``dints3d run`` (:mod:`dints3d.pipeline`) on a small embedded synthetic CT task, on CPU, in a few
minutes: prepare → search → export the searched network and SegResNet → 2-fold cross-validation of each →
selection → predictions of the test images; then the selection table. A real run cross-validates 5 folds at the
reference settings (``dints3d run --task TASK --out DIR``). Rerunning ``dints3d demo --out OUT`` skips the stages done.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dints3d.data.synthetic import make_msd_task
from dints3d.pipeline import Pipeline, RunSettings


@dataclass
class DemoSettings:
    """The synthetic task and the run's knobs (``config`` + ``overrides`` set prepare, search and training)."""

    cases: int = 10
    test_cases: int = 2
    size: int = 40
    folds: int = 2
    seed: int = 0
    config: str = "demo"
    overrides: list[str] = field(default_factory=list)
    #: the searched network against SegResNet (DynUNet too with ``--candidates searched segresnet dynunet``): two
    #: trainings fewer keeps the demo within minutes on 2 CPU cores
    candidates: list[str] = field(default_factory=lambda: ["searched", "segresnet"])


def demo(out: str | Path, settings: DemoSettings) -> dict:
    """Write the synthetic task (unless ``out/task`` is complete) and run the pipeline on it into ``out``."""
    out = Path(out).absolute()
    task = out / "task"
    if not (task / "dataset.json").is_file():  # dataset.json is written last: anything else is an interrupted write
        if task.exists():
            shutil.rmtree(task)
        make_msd_task(task, cases=settings.cases, test_cases=settings.test_cases, size=settings.size,
                      seed=settings.seed, name="Demo")
    print(f"demo: {settings.folds}-fold cross-validation of every candidate at tiny CPU settings (config "
          f"'{settings.config}'); a real run: dints3d run --task TASK --out DIR (5 folds, the reference settings)",
          flush=True)
    run = RunSettings(config=settings.config, overrides=list(settings.overrides), folds=settings.folds,
                      candidates=list(settings.candidates), seed=settings.seed)
    return Pipeline(task, out, run).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--out", default="dints3d-demo", help="demo folder (default: ./dints3d-demo); rerun to resume")
    parser.add_argument("--config", default=defaults.config, help="config for prepare, search and training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. search.iterations=20 (repeatable)")
    parser.add_argument("--cases", type=int, default=defaults.cases, help="synthetic training cases")
    parser.add_argument("--size", type=int, default=defaults.size, help="synthetic image side in voxels")
    parser.add_argument("--candidates", nargs="+", default=defaults.candidates, metavar="NAME",
                        help=f"what to cross-validate and choose from (default: {' '.join(defaults.candidates)}; "
                             f"any of {' '.join(RunSettings().candidates)})")


def run(args: argparse.Namespace) -> int:
    demo(args.out, DemoSettings(cases=args.cases, size=args.size, config=args.config, overrides=list(args.overrides),
                                candidates=list(args.candidates)))
    return 0
