"""``dints3d run --task TASK --out DIR``: the whole pipeline as one resumable command (what Auto3DSeg's AutoRunner and
nnU-Net's plan / train / find-best-configuration commands do together).

1. prepare the task (``DIR/work``);
2. search an architecture (``DIR/search``);
3. export the searched network and the baselines (``DIR/candidates/<name>``);
4. cross-validate each on the same folds (``--folds all``, out-of-fold probabilities kept);
5. select what ships (``DIR/final``, with ``DIR/final/selection/``): the searched network only if it beats the
   baselines significantly;
6. segment the task's test images with the final bundle (``DIR/predictions``).

Each stage records its result in ``DIR/run.json`` when it completes and is skipped on a rerun; the search and every
fold's training resume from their checkpoints, so a run killed anywhere continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dints3d.bundle.crossval import cross_validate
from dints3d.bundle.export import export_bundle
from dints3d.bundle.infer import infer
from dints3d.bundle.select import select
from dints3d.config import Config, config_path, load_config
from dints3d.data.prepare import prepare
from dints3d.search.loop import SearchRun
from dints3d.spaces.baselines.networks import BASELINES
from dints3d.utils.checkpoint import has_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json
from dints3d.utils.lock import locked_folder
from dints3d.utils.runtime import init_runtime

STATE_FILE = "run.json"
SEARCHED = "searched"
#: bundle overrides of every training and inference of a run
BUNDLE_SETS = ("sw_overlap=0.25",)


@dataclass
class RunSettings:
    """What a run folder is made of: the config (file and overrides), the folds, the budget and the candidates."""

    config: str = "dints_search"
    overrides: list[str] = field(default_factory=list)
    folds: int = 5
    scale: float = 1.0  #: multiplies every iteration count (search and training): the compute budget
    candidates: list[str] = field(default_factory=lambda: [SEARCHED, *sorted(BASELINES)])
    seed: int = 0

    def config_overrides(self, cfg: Config) -> list[str]:
        """The overrides, then the budget's iteration counts."""
        if self.scale == 1.0:
            return list(self.overrides)
        s, t = cfg.search, cfg.train

        def scaled(n: int) -> int:
            return max(1, round(n * self.scale))

        return [*self.overrides, f"search.iterations={scaled(s.iterations)}",
                f"search.val_interval={min(scaled(s.val_interval), scaled(s.iterations))}",
                f"search.checkpoint_interval={min(s.checkpoint_interval, scaled(s.iterations))}",
                f"train.iterations={scaled(t.iterations)}",
                f"train.val_interval={min(scaled(t.val_interval), scaled(t.iterations))}"]


class Pipeline:
    """The stages of one run folder ``out`` for the task folder ``task``."""

    def __init__(self, task: str | os.PathLike, out: str | os.PathLike, settings: RunSettings):
        self.task, self.out, self.settings = Path(task).absolute(), Path(out).absolute(), settings
        unknown = [c for c in settings.candidates if c != SEARCHED and c not in BASELINES]
        if unknown or not settings.candidates:
            raise DintsError("--candidates", f"unknown {unknown}; choose from {SEARCHED}, {', '.join(BASELINES)}")
        source = config_path(settings.config)
        base = load_config(source, settings.overrides)
        self.cfg = load_config(source, settings.config_overrides(base))
        self.config_source = str(source)
        self.state_path = self.out / STATE_FILE
        wanted = {"task": str(self.task), **dataclasses.asdict(settings)}
        self.state = read_json(self.state_path) if self.state_path.exists() else {"settings": wanted, "stages": {}}
        if self.state.get("settings") != wanted:
            raise DintsError(self.state_path, f"this run folder was made with other settings "
                             f"({self.state.get('settings')}); rerun with those or choose another --out")
        self.work, self.search_dir = self.out / "work", self.out / "search"
        self.final = self.out / "final"

    def stage(self, name: str, action: Callable[[], dict | None]) -> dict:
        """Run ``action`` unless already done; print and record its duration and result."""
        done = self.state["stages"].get(name)
        if done is not None:
            print(f"[{name}] done earlier ({done['seconds']:.1f} s), skipped", flush=True)
            return done
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        result = action() or {}
        record = {"seconds": round(time.perf_counter() - start, 1), **result}
        self.state["stages"][name] = record
        write_json(self.state_path, self.state)
        print(f"[{name}] done in {record['seconds']:.1f} s", flush=True)
        return record

    def candidate_dir(self, name: str) -> Path:
        return self.out / "candidates" / name

    # ------------------------------------------------------------------------------------------------ stages
    def prepare(self) -> dict:
        outputs = prepare(self.task, self.work, folds=self.settings.folds, seed=self.settings.seed, config=self.cfg,
                          config_source=self.config_source, progress=False)
        return {"patch_size": outputs["plan"]["patch_size"], "target_spacing": outputs["plan"]["target_spacing"]}

    def search(self) -> dict:
        resume = has_checkpoint(self.search_dir / "checkpoints" / "last.pt")
        with SearchRun(self.cfg, self.work, self.search_dir, init_runtime(self.cfg.device), resume=resume) as run:
            path = run.run()
        return {"arch": str(path)}

    def export(self, name: str) -> dict:
        source = self.search_dir / "arch.json" if name == SEARCHED else name
        export_bundle(source, self.work, self.candidate_dir(name), self.cfg, force=True)
        return {"bundle": str(self.candidate_dir(name))}

    def cross_validate(self, name: str) -> dict:
        summary = cross_validate(self.candidate_dir(name), "all", self.work, BUNDLE_SETS, resume="auto",
                                 device="cpu" if self.cfg.device == "cpu" else "auto", probabilities=True)
        if summary is None:
            raise DintsError(self.candidate_dir(name), "a fold's training failed (its log under logs/ says why); "
                             "rerun to continue")
        return {"mean_foreground_dice": summary["mean_foreground_dice"], "fold_mean_dice": summary["fold_mean_dice"]}

    def select(self) -> dict:
        report = select([self.candidate_dir(c) for c in self.settings.candidates], self.final, force=True)
        return {"chosen": report["chosen"], "kind": report["kind"], "why": report["why"]}

    def predict(self) -> dict:
        images = self.task / "imagesTs"
        if not images.is_dir() or not any(images.iterdir()):
            return {"masks": 0, "note": f"{images} holds no test images"}
        result = infer(self.final, [images], self.out / "predictions", BUNDLE_SETS)
        if result.failures or result.returncode:
            raise DintsError(images, f"{len(result.failures)} test image(s) not segmented (see above)")
        return {"masks": len(result.masks), "predictions": str(self.out / "predictions")}

    def run(self) -> dict:
        """Run (or finish) every stage, holding the run folder (:mod:`dints3d.utils.lock`); returns the selection."""
        with locked_folder(self.out):
            return self._run()

    def _run(self) -> dict:
        self.stage("prepare", self.prepare)
        if SEARCHED in self.settings.candidates:
            self.stage("search", self.search)
        for name in self.settings.candidates:
            self.stage(f"export_{name}", lambda: self.export(name))
        for name in self.settings.candidates:
            self.stage(f"cross_validate_{name}", lambda: self.cross_validate(name))
        if len(self.settings.candidates) > 1:
            chosen = self.stage("select", self.select)
        else:
            chosen = {"chosen": self.settings.candidates[0], "why": "the only candidate"}
            self.final = self.candidate_dir(self.settings.candidates[0])
        self.stage("predict", self.predict)
        selection = self.final / "selection" / "selection.md"
        if selection.is_file():
            print("\n" + selection.read_text())
        total = sum(record["seconds"] for record in self.state["stages"].values())
        print(f"final bundle: {self.final} ({chosen['chosen']}); stages took {total:.0f} s in all")
        return {"chosen": chosen, "seconds": total}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RunSettings()
    parser.add_argument("--task", required=True, help="MSD task folder (dataset.json, imagesTr/, labelsTr/, imagesTs/)")
    parser.add_argument("--out", required=True, help="run folder (created; rerun to resume)")
    parser.add_argument("--config", default=defaults.config, help=f"config (default: {defaults.config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.iterations=2000 (repeatable)")
    parser.add_argument("--folds", type=int, default=defaults.folds, help="cross-validation folds (default: 5)")
    parser.add_argument("--scale", type=float, default=defaults.scale,
                        help="budget: multiplies every search and training iteration count (default: 1)")
    parser.add_argument("--candidates", nargs="+", default=defaults.candidates, metavar="NAME",
                        help=f"what to cross-validate and choose from (default: {' '.join(defaults.candidates)})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the folds (default: 0)")


def run(args: argparse.Namespace) -> int:
    if not args.scale > 0:
        raise DintsError("--scale", f"must be positive, got {args.scale}")
    settings = RunSettings(config=args.config, overrides=list(args.overrides), folds=args.folds, scale=args.scale,
                           candidates=list(args.candidates), seed=args.seed)
    Pipeline(args.task, args.out, settings).run()
    return 0
