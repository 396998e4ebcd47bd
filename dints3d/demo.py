"""``dints3d demo``: the whole pipeline on a small synthetic CT task, on CPU, in a few minutes.

synth → prepare → search → export → train → infer (test images; validation fold; validation fold with the untrained
network as a baseline) → evaluate. Each stage prints its duration; the bundle runs log to ``OUT/logs/``. A stage is
recorded in ``OUT/demo.json`` when it completes, and rerunning ``dints3d demo --out OUT`` skips recorded stages
(search and training also resume from their own checkpoints when interrupted).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dints3d.bundle.export import export_bundle
from dints3d.bundle.infer import infer
from dints3d.bundle.train import train
from dints3d.config import Config, config_path, load_config
from dints3d.data.datalist import read_datalist
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.evaluation.metrics import evaluate_folders
from dints3d.search.loop import SearchRun
from dints3d.spaces.factory import load_architecture
from dints3d.utils.checkpoint import has_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json
from dints3d.utils.runtime import init_runtime

STATE_FILE = "demo.json"
#: bundle overrides for a quick CPU run: a lighter sliding window than the reference 0.625 overlap
BUNDLE_SETS = ("sw_overlap=0.25",)


@dataclass
class DemoSettings:
    """The synthetic task and the run's knobs (``config`` + ``overrides`` set prepare, search and training)."""
    cases: int = 10
    test_cases: int = 2
    size: int = 40
    folds: int = 5
    seed: int = 0
    config: str = "demo"
    overrides: list[str] = field(default_factory=list)


class Demo:
    """The stages of one demo folder ``out``, each skipped when ``out/demo.json`` records it as done."""
    def __init__(self, out: str | os.PathLike, settings: DemoSettings):
        self.out = Path(out).absolute()
        self.settings = settings
        source = config_path(settings.config)
        self.cfg: Config = load_config(source, settings.overrides)
        self.config_source = str(source)
        self.state_path = self.out / STATE_FILE
        wanted = dataclasses.asdict(settings)
        self.state = read_json(self.state_path) if self.state_path.exists() else {"settings": wanted, "stages": {}}
        if self.state.get("settings") != wanted:
            raise DintsError(self.state_path, "this demo folder was made with other settings "
                             f"({self.state.get('settings')}); rerun with those or choose another --out")
        self.task, self.work, self.run_dir = self.out / "task", self.out / "work", self.out / "search"
        self.bundle, self.logs = self.out / "bundle", self.out / "logs"

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

    # ------------------------------------------------------------------------------------------------ stages
    def synth(self) -> dict:
        if self.task.exists():  # an interrupted earlier attempt (dataset.json is written last)
            shutil.rmtree(self.task)
        s = self.settings
        make_msd_task(self.task, cases=s.cases, test_cases=s.test_cases, size=s.size, seed=s.seed, name="Demo")
        return {"cases": s.cases, "test_cases": s.test_cases, "size": s.size}

    def prepare(self) -> dict:
        outputs = prepare(self.task, self.work, folds=self.settings.folds, seed=self.settings.seed, config=self.cfg,
                          config_source=self.config_source, progress=False)
        plan = outputs["plan"]
        return {"target_spacing": plan["target_spacing"], "patch_size": plan["patch_size"]}

    def search(self) -> dict:
        resume = has_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        search = SearchRun(self.cfg, self.work, self.run_dir, init_runtime(self.cfg.device), resume=resume)
        try:
            arch_path = search.run()
        finally:
            search.close()
        arch = load_architecture(arch_path)
        return {"active_paths": arch.num_active_paths}

    def export(self) -> dict:
        export_bundle(self.run_dir / "arch.json", self.work, self.bundle, self.cfg, force=True)
        return {"bundle": str(self.bundle)}

    def _check(self, status: int, log: Path, what: str) -> None:
        if status != 0:
            raise DintsError(log, f"{what} failed with exit status {status}; the log above says why")

    def train(self) -> dict:
        log = self.logs / "train.log"
        print(f"  log: {log}", flush=True)
        self._check(train(self.bundle, sets=BUNDLE_SETS, log=log, resume="auto"), log, "training")
        return {"model": str(self.bundle / "models" / "model.pt")}

    def infer(self, name: str, inputs: list[Path], sets: tuple[str, ...] = ()) -> dict:
        log = self.logs / f"{name}.log"
        print(f"  log: {log}", flush=True)
        result = infer(self.bundle, inputs, self.out / name, BUNDLE_SETS + sets, log=log)
        if result.failures or result.returncode:
            self._check(result.returncode or 1, log, f"inference ({len(result.failures)} input(s) failed)")
        return {"masks": len(result.masks)}

    def untrained_weights(self) -> Path:
        """Seeded random weights of the bundle's network (same architecture and width), the baseline."""
        torch.manual_seed(self.settings.seed)
        plan = read_json(self.work / "plan.json")
        net = load_architecture(self.bundle / "models" / "arch.json").build(
            int(plan["in_channels"]), int(plan["out_channels"]), channel_mul=self.cfg.train.channel_mul)
        path = self.out / "untrained.pt"
        torch.save(net.state_dict(), path)
        return path

    def evaluate(self, predictions: str) -> dict:
        summary = evaluate_folders(self.out / predictions, self.task / "labelsTr", self.out / f"eval_{predictions}",
                                   self.task / "dataset.json")
        return {"mean_foreground_dice": summary["mean_foreground_dice"],
                "dice": {entry["name"]: entry["dice"]["mean"] for entry in summary["classes"].values()}}

    # --------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Run (or finish) every stage; returns the trained and untrained validation Dice and the total time."""
        start = time.perf_counter()
        fold = self.cfg.data.fold
        self.stage("synth", self.synth)
        self.stage("prepare", self.prepare)
        self.stage("search", self.search)
        self.stage("export", self.export)
        self.stage("train", self.train)
        self.stage("infer_test", lambda: self.infer("pred_test", [self.task / "imagesTs"]))
        validation = [Path(item["image"]) for item in read_datalist(self.work, f"fold{fold}_validation")]
        self.stage("infer_validation", lambda: self.infer("pred_validation", validation))
        self.stage("infer_untrained", lambda: self.infer("pred_untrained", validation,
                                                          (f"ckpt_path={self.untrained_weights()}",)))
        trained = self.stage("evaluate", lambda: self.evaluate("pred_validation"))
        untrained = self.stage("evaluate_untrained", lambda: self.evaluate("pred_untrained"))
        total = sum(record["seconds"] for record in self.state["stages"].values())
        print(f"\nvalidation fold {fold} ({len(validation)} cases), mean foreground Dice:")
        print(f"  trained   {_fmt(trained['mean_foreground_dice'])}  " + _per_class(trained))
        print(f"  untrained {_fmt(untrained['mean_foreground_dice'])}  " + _per_class(untrained))
        print(f"stages took {total:.0f} s in all ({time.perf_counter() - start:.0f} s in this run); "
              f"bundle: {self.bundle}")
        return {"trained": trained, "untrained": untrained, "seconds": total}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _per_class(record: dict) -> str:
    return "(" + ", ".join(f"{name} {_fmt(dice)}" for name, dice in record["dice"].items()) + ")"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--out", default="dints3d-demo", help="demo folder (default: ./dints3d-demo); rerun to resume")
    parser.add_argument("--config", default=defaults.config, help="config for prepare, search and training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. search.iterations=20 (repeatable)")
    parser.add_argument("--cases", type=int, default=defaults.cases, help="synthetic training cases")
    parser.add_argument("--size", type=int, default=defaults.size, help="synthetic image side in voxels")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings(cases=args.cases, size=args.size, config=args.config, overrides=list(args.overrides))
    Demo(args.out, settings).run()
    return 0
