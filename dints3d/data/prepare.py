"""``dints3d prepare``: validate an MSD task and write ``WORK/fingerprint.json``, ``plan.json``, ``datalist.json``.
The folder's format is recognised once (:func:`~dints3d.data.formats.folder_format`); a Cityscapes folder
(``leftImg8bit/`` + ``gtFine/``) is prepared by :mod:`dints3d.cityscapes.prepare`.

Cases are read one at a time (validation and fingerprint in the same pass), so memory stays at about one case.
The output folder and the config's plan overrides are checked before the first case is read. Nothing is written
until every file has passed validation; the three outputs then land as a group (all temporary files written and
fsynced first, then renamed), so a failure leaves the previous files, never a mix of old and new.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from dints3d.config import Config, config_path, load_config, parse_override
from dints3d.data.datalist import DATALIST_FILE, check_folds, make_datalist
from dints3d.data.fingerprint import (
    FINGERPRINT_FILE,
    PLAN_FILE,
    FingerprintBuilder,
    check_overrides_for_task,
    make_plan,
)
from dints3d.data.formats import folder_format, plan_format
from dints3d.data.msd import load_image, load_label, read_task
from dints3d.spaces.dints.topology import patch_divisor
from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_texts_together
from dints3d.utils.lock import locked_folder, never
from dints3d.utils.outputs import check_output_folder


def write_outputs(work: Path, outputs: dict[str, dict]) -> None:
    """Serialize all three files first (a value JSON cannot hold fails here, before any file is touched), then
    write them as one group: temporary files, then renames (:func:`~dints3d.utils.io.write_texts_together`)."""
    texts = {}
    for name, file in (("fingerprint", FINGERPRINT_FILE), ("plan", PLAN_FILE), ("datalist", DATALIST_FILE)):
        try:
            texts[file] = json.dumps(outputs[name], indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise DintsError(work / file, f"cannot be written as JSON ({e}); nothing was written") from None
    write_texts_together(work, texts)


def one_source(source: str | Mapping[str, str]) -> str:
    """One name for errors of code that takes a single source (the Cityscapes plan): the config file if any."""
    if isinstance(source, str):
        return source
    return next((s for s in source.values() if s != "--set"), "--set")


def prepare(task_dir: str | os.PathLike, work_dir: str | os.PathLike, folds: int = 5, seed: int = 0,
            config: Config | None = None, config_source: str | Mapping[str, str] = "--set",
            progress: bool = True) -> dict[str, dict]:
    """Validate ``task_dir`` and write the three files into ``work_dir``; returns them as
    ``{"fingerprint": …, "plan": …, "datalist": …}``. ``config.plan`` overrides plan fields (errors name
    ``config_source``: one file, or the file or ``--set`` of each plan key); ``config.dints`` sets the patch
    divisor. The output folder and the overrides are checked before any case is read; the folder is locked while
    ``prepare`` runs (:mod:`dints3d.utils.lock`)."""
    cfg = config or Config()
    work = Path(work_dir)
    check_output_folder(work)
    # one process at a time; a WORK folder this run created is removed if it fails (its files land all at once)
    with locked_folder(work, keep=never):
        return folder_format(task_dir).prepare(task_dir, work, folds, seed, cfg, config_source, progress)


def prepare_msd(task_dir: str | os.PathLike, work: Path, folds: int, seed: int, cfg: Config,
                config_source: str | Mapping[str, str], progress: bool) -> dict[str, dict]:
    """:func:`prepare` for an MSD task: patch sides divisible by the configured DiNTS grid's divisor."""
    divisor = patch_divisor(cfg.dints.num_depths, cfg.dints.use_downsample)
    task = read_task(task_dir)
    check_folds(len(task.training), folds)
    check_overrides_for_task(cfg.plan, config_source, task.modalities, task.labels, divisor)

    builder = FingerprintBuilder(task, seed)
    cases = task.training + task.test
    with tqdm(cases, desc="prepare", unit="case", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        for index, case in enumerate(bar):
            image = load_image(task.path(case.image), len(task.modalities))
            if case.label is not None:
                builder.add(index, case, image, load_label(task.path(case.label), task.labels, image))
    outputs = {"fingerprint": builder.result()}
    outputs["plan"] = make_plan(outputs["fingerprint"], divisor, cfg.plan, config_source)
    outputs["datalist"] = make_datalist(task, folds, seed)
    write_outputs(work, outputs)
    return outputs


def plan_sources(plan: Mapping, config_file: str | None, overrides: list[str]) -> str | dict[str, str]:
    """Where each key of the merged ``plan:`` section was set, for error messages: ``--set`` for keys given as
    ``--set plan.KEY=…`` (or ``--set plan={…}``), else the config file."""
    if config_file is None:
        return "--set"
    from_set = set()
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "plan" and len(keys) > 1:
            from_set.add(keys[1])
        elif keys == ["plan"] and isinstance(value, dict):
            from_set.update(value)
    return {key: "--set" if key in from_set else config_file for key in plan}


def summary(outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
    """A few human-readable lines about what ``prepare`` decided."""
    return plan_format(outputs["plan"]).summary(outputs, work_dir)


def msd_summary(outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
    """:func:`summary` for an MSD task."""
    plan, datalist = outputs["plan"], outputs["datalist"]
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
                      config_source=plan_sources(cfg.plan, str(source) if source else None, args.set))
    print(summary(outputs, args.out))
    return 0
