"""``dints3d prepare``: validate an MSD task and write ``WORK/fingerprint.json``, ``plan.json``, ``datalist.json``.
A Cityscapes folder (``leftImg8bit/`` + ``gtFine/``) is recognised and handled by :mod:`dints3d.data.cityscapes`.

Cases are read one at a time (validation and fingerprint in the same pass), so memory stays at about one case.
Nothing is written until every file has passed validation; each output is then written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tqdm import tqdm

from dints3d.config import Config, config_path, load_config
from dints3d.data.cityscapes import is_cityscapes, prepare_cityscapes
from dints3d.data.cityscapes import summary as cityscapes_summary
from dints3d.data.datalist import DATALIST_FILE, check_folds, make_datalist
from dints3d.data.fingerprint import FINGERPRINT_FILE, PLAN_FILE, FingerprintBuilder, check_overrides, make_plan
from dints3d.data.msd import load_image, load_label, read_task
from dints3d.errors import DintsError
from dints3d.io import write_json


def patch_divisor(cfg: Config) -> int:
    """2 ** (num_depths + use_downsample): what every patch side must divide by for the DiNTS network."""
    return 2 ** (cfg.dints.num_depths + int(cfg.dints.use_downsample))


def prepare(task_dir: str | os.PathLike, work_dir: str | os.PathLike, folds: int = 5, seed: int = 0,
            config: Config | None = None, config_source: str = "--set", progress: bool = True) -> dict[str, dict]:
    """Validate ``task_dir`` and write the three files into ``work_dir``; returns them as
    ``{"fingerprint": …, "plan": …, "datalist": …}``. ``config.plan`` overrides plan fields (errors name
    ``config_source``); ``config.dints`` sets the patch divisor."""
    cfg = config or Config()
    if is_cityscapes(task_dir):
        divisor = patch_divisor(cfg) if cfg.space == "dints" else 1  # Auto-DeepLab takes any crop size
        return prepare_cityscapes(task_dir, work_dir, seed, divisor, cfg.plan, config_source, progress)
    work = Path(work_dir)
    if work.exists() and not work.is_dir():
        raise DintsError(work, "exists and is not a folder")
    task = read_task(task_dir)
    check_folds(len(task.training), folds)
    check_overrides(cfg.plan, config_source)

    builder = FingerprintBuilder(task, seed)
    cases = task.training + task.test
    with tqdm(cases, desc="prepare", unit="case", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        for index, case in enumerate(bar):
            image = load_image(task.path(case.image), len(task.modalities))
            if case.label is not None:
                builder.add(index, case, image, load_label(task.path(case.label), task.labels, image))
    outputs = {"fingerprint": builder.result()}
    outputs["plan"] = make_plan(outputs["fingerprint"], patch_divisor(cfg), cfg.plan, config_source)
    outputs["datalist"] = make_datalist(task, folds, seed)

    for name, file in (("fingerprint", FINGERPRINT_FILE), ("plan", PLAN_FILE), ("datalist", DATALIST_FILE)):
        write_json(work / file, outputs[name])
    return outputs


def summary(outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
    """A few human-readable lines about what ``prepare`` decided."""
    plan, datalist = outputs["plan"], outputs["datalist"]
    if plan.get("format") == "cityscapes":
        return cityscapes_summary(outputs, work_dir)
    times = " × ".join

    def norm(n: dict) -> str:
        clip = f" clip [{n['clip'][0]:.4g}, {n['clip'][1]:.4g}]" if "clip" in n else ""
        return f"{n['modality']} {n['scheme']}{clip}"

    return "\n".join([
        f"{plan['name']}: {len(datalist['training'])} training + {len(datalist['test'])} test cases, "
        f"{datalist['num_folds']} folds (seed {datalist['seed']})",
        f"target spacing {times(f'{s:.4g}' for s in plan['target_spacing'])} mm ({plan['spacing_rule']})",
        f"patch {times(str(p) for p in plan['patch_size'])} (divisor {plan['patch_divisor']}), "
        f"median shape {times(f'{m:.0f}' for m in plan['median_shape'])}",
        "normalization: " + ", ".join(norm(n) for n in plan["normalization"]),
        f"wrote {', '.join(str(Path(work_dir) / f) for f in (FINGERPRINT_FILE, PLAN_FILE, DATALIST_FILE))}",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True,
                        help="MSD task folder (with dataset.json) or Cityscapes folder (leftImg8bit/, gtFine/)")
    parser.add_argument("--out", required=True, help="work folder for fingerprint.json, plan.json, datalist.json")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold split, halves and sampling")
    parser.add_argument("--config", help="config YAML (or a packaged name); its plan: section overrides the plan")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. plan.patch_size=[64,64,32] or dints.num_depths=3")


def run(args: argparse.Namespace) -> int:
    source = config_path(args.config) if args.config else None
    cfg = load_config(source, args.set)
    outputs = prepare(args.task, args.out, folds=args.folds, seed=args.seed, config=cfg,
                      config_source=str(source) if source else "--set")
    print(summary(outputs, args.out))
    return 0
