"""Cross-validation of a bundle (``dints3d train BUNDLE --folds all``): one model per fold of the prepared task's
``datalist.json``, then each fold's validation cases predicted by that fold's model (out-of-fold predictions) and
scored per case and class.

Layout inside the bundle:

- ``models/fold<k>/``: fold k's checkpoints and ``model.pt`` (the best validation Dice), each fold resumable on its
  own; ``models/folds.json`` lists the folds trained to completion (what the bundle holds);
- ``logs/fold<k>/``: its TensorBoard logs;
- ``cv/predictions/<case>_seg.nii.gz``: the out-of-fold predictions on each case's own grid;
- ``cv/fit/fold<k>/<case>_seg.nii.gz``: fold k's own training cases segmented by its model, when asked for
  (:func:`predict_training_cases`, a diagnostic of how well the models fit);
- ``cv/cv_metrics.csv``: one row per case and class (fold, Dice, HD95 mm, NSD, …) and ``cv/summary.json``: per class
  the mean over cases, the mean Dice of each fold and their spread over folds, and the post-processing chosen on them
  (:mod:`dints3d.evaluation.postprocess`);
- ``configs/ensemble.yaml``: the fold models' ensemble with test-time mirroring and that post-processing, which
  ``dints3d infer`` then uses (:mod:`dints3d.bundle.ensemble`).

The out-of-fold predictions are made as the ensemble will infer: mirrored on every axis (``mirroring``), optionally
with the class probabilities (``cv/predictions/<case>_prob.nii.gz``, what ``dints3d select`` ensembles candidates
with).

Every stage is skipped when its output is complete, so a run killed in fold k resumes at fold k (with ``--resume``:
fold k continues from its newest checkpoint).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dints3d.bundle.ensemble import Member, write_ensemble
from dints3d.bundle.infer import segment
from dints3d.bundle.input_checks import NIFTI
from dints3d.bundle.runner import applicable_sets, config_file
from dints3d.bundle.train import recorded_work, train, train_settings
from dints3d.data.datalist import read_datalist
from dints3d.evaluation.metrics import (
    METRICS,
    case_name,
    csv_text,
    score_cases,
    summarize,
)
from dints3d.evaluation.postprocess import choose_largest_component
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json, write_text

FOLDS_FILE = "folds.json"
CV_DIR = "cv"
#: test-time mirroring of out-of-fold predictions and ensembles: every spatial axis (both recipes mirror them all)
MIRROR_AXES = [0, 1, 2]


def fold_dir(bundle: Path, fold: int) -> Path:
    """Where fold ``fold``'s checkpoints and ``model.pt`` live."""
    return bundle / "models" / f"fold{fold}"


def work_dir(bundle: Path, work: str | os.PathLike | None) -> Path:
    """The prepared folder the bundle trains on (``--work``, else the one ``dints3d export`` recorded relative to
    the bundle: search.yaml's ``work_dir``)."""
    folder = Path(work).absolute() if work is not None else recorded_work(bundle)
    if folder is None:
        raise DintsError(bundle, "the prepared folder it was exported from is not where the bundle's configs/"
                         "search.yaml says (work_dir, relative to the bundle); give --work WORK")
    if not (folder / "datalist.json").is_file():
        raise DintsError(folder, "no datalist.json here; give the folder written by `dints3d prepare` (--work)")
    return folder


def parse_folds(text: str, num_folds: int, source: str = "--folds") -> list[int]:
    """``all`` or a comma-separated list of fold indices (``0,2``) of a ``num_folds``-fold datalist."""
    if text == "all":
        return list(range(num_folds))
    try:
        folds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise DintsError(source, f"expected 'all' or fold indices like 0,1,2, got '{text}'") from None
    if not folds or folds[0] < 0 or folds[-1] >= num_folds:
        raise DintsError(source, f"fold indices must be in 0..{num_folds - 1} (the datalist has {num_folds} folds), "
                         f"got '{text}'")
    return folds


def held_folds(bundle: Path) -> dict[str, Any]:
    """``models/folds.json``: the folds trained to completion (empty if none)."""
    path = bundle / "models" / FOLDS_FILE
    return read_json(path) if path.is_file() else {"version": 1, "folds": {}}


def _record_fold(bundle: Path, fold: int, iterations: int) -> None:
    held = held_folds(bundle)
    held["folds"][str(fold)] = {"model": f"models/fold{fold}/model.pt", "iterations": iterations}
    held["folds"] = dict(sorted(held["folds"].items(), key=lambda kv: int(kv[0])))
    write_json(bundle / "models" / FOLDS_FILE, held)


def train_folds(bundle: str | os.PathLike, folds: Sequence[int], work: str | os.PathLike | None = None,
                sets: Sequence[str] = (), resume: bool | str = False, device: str = "auto", nproc: int = 1,
                parallel: int = 1, log_dir: Path | None = None) -> dict[int, int]:
    """Train one model per fold (``parallel`` folds at a time, each in its own process: on a machine with several
    GPUs, fold i runs on GPU i mod count). A fold already trained to this config's ``num_iterations`` is skipped;
    ``resume`` as :func:`~dints3d.bundle.train.train` (per fold). Returns fold → exit status."""
    bundle = Path(bundle).absolute()
    iterations = train_settings(config_file(bundle, "train.yaml"), sets).get("num_iterations")
    done = held_folds(bundle)["folds"]
    todo = [k for k in folds if not (str(k) in done and done[str(k)]["iterations"] == iterations)]
    for k in folds:
        if k not in todo:
            print(f"fold {k}: trained ({iterations} iterations), skipped", flush=True)

    def one(index_fold: tuple[int, int]) -> tuple[int, int]:
        index, k = index_fold
        # the fold's score goes to cv/summary.json, not to the bundle's metadata.json (record_results)
        fold_sets = [*sets, f"fold={k}", f"ckpt_dir={fold_dir(bundle, k)}", f"output_dir={bundle / 'logs' / f'fold{k}'}",
                     "record_results=false"]
        gpus = _visible_gpus()
        env = {"CUDA_VISIBLE_DEVICES": str(gpus[index % len(gpus)])} if parallel > 1 and gpus else None
        log = None if parallel == 1 else (log_dir or bundle / "logs") / f"fold{k}.log"
        print(f"fold {k}: training" + (f" (log {log})" if log else ""), flush=True)
        status = train(bundle, work, fold_sets, log=log, nproc=nproc, resume=resume, device=device, env=env)
        if status == 0:
            _record_fold(bundle, k, int(iterations))
        return k, status

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        return dict(pool.map(one, list(enumerate(todo))))


def _visible_gpus() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _segment_fold_cases(bundle: Path, fold: int, images: list[Path], out: Path, sets: Sequence[str],
                        mirroring: bool, probabilities: bool, what: str) -> None:
    """Segment ``images`` with fold ``fold``'s ``model.pt`` into ``out`` (``<case>_seg.nii.gz``, and
    ``<case>_prob.nii.gz`` with ``probabilities``), skipping the cases already there."""
    model = fold_dir(bundle, fold) / "model.pt"
    if not model.is_file():
        raise DintsError(model, f"fold {fold} has no trained model; train it first (dints3d train --folds {fold})")
    names = {case_name(p): p for p in images}
    wanted = ("seg", "prob") if probabilities else ("seg",)
    missing = [p for name, p in names.items() if not all((out / f"{name}_{w}.nii.gz").is_file() for w in wanted)]
    if not missing:
        print(f"fold {fold}: {len(images)} {what} prediction(s) present, skipped", flush=True)
        return
    print(f"fold {fold}: predicting {len(missing)} {what} case(s) with {model}", flush=True)
    options = [f"ckpt_path={model}", f"mirror_axes={MIRROR_AXES if mirroring else []}",
               f"save_probabilities={str(probabilities).lower()}", "largest_component_labels=[]"]
    # the training's settings that inference has too (sw_overlap, amp, …); the others are training's own
    applicable = applicable_sets(bundle, ["inference.yaml"], sets)
    result = segment(bundle, missing, out, NIFTI, ["inference.yaml"], [*applicable, *options])
    if result.failures:
        path, problem = next(iter(result.failures.items()))
        raise DintsError(path, f"fold {fold}: {problem}")


def predict_out_of_fold(bundle: str | os.PathLike, folds: Sequence[int], work: str | os.PathLike | None = None,
                        sets: Sequence[str] = (), mirroring: bool = True,
                        probabilities: bool = False) -> dict[str, int]:
    """Segment each fold's validation cases with that fold's ``model.pt`` into ``cv/predictions`` (mirrored on every
    axis with ``mirroring``; also their class probabilities with ``probabilities``); a fold whose predictions are all
    there is skipped. Returns case → fold."""
    bundle = Path(bundle).absolute()
    work = work_dir(bundle, work)
    fold_of: dict[str, int] = {}
    for k in folds:
        images = [Path(item["image"]) for item in read_datalist(work, f"fold{k}_validation")]
        fold_of.update({case_name(p): k for p in images})
        _segment_fold_cases(bundle, k, images, bundle / CV_DIR / "predictions", sets, mirroring, probabilities,
                            "out-of-fold")
    return fold_of


def predict_training_cases(bundle: str | os.PathLike, fold: int, work: str | os.PathLike | None = None,
                           sets: Sequence[str] = (), mirroring: bool = True) -> dict[str, Path]:
    """Segment fold ``fold``'s own training cases with its ``model.pt`` into ``cv/fit/fold<k>/``, as the out-of-fold
    cases are segmented: how well the model fits what it was trained on (under-fitting shows as a low Dice here, over-
    fitting as a large drop from here to the out-of-fold Dice). Returns case → prediction file."""
    bundle = Path(bundle).absolute()
    images = [Path(item["image"]) for item in read_datalist(work_dir(bundle, work), f"fold{fold}_train")]
    out = bundle / CV_DIR / "fit" / f"fold{fold}"
    _segment_fold_cases(bundle, fold, images, out, sets, mirroring, False, "training")
    return {case_name(p): out / f"{case_name(p)}_seg.nii.gz" for p in images}


def score_out_of_fold(bundle: str | os.PathLike, fold_of: dict[str, int], work: str | os.PathLike | None = None,
                      nsd_tolerance_mm: float = 1.0) -> dict:
    """``cv/cv_metrics.csv`` and ``cv/summary.json`` of the bundle's out-of-fold predictions
    (:func:`score_predictions`)."""
    bundle = Path(bundle).absolute()
    preds = {name: bundle / CV_DIR / "predictions" / f"{name}_seg.nii.gz" for name in fold_of}
    return score_predictions(preds, fold_of, work_dir(bundle, work), bundle / CV_DIR, nsd_tolerance_mm)


def score_predictions(preds: dict[str, Path], fold_of: dict[str, int], work: Path, out_dir: Path,
                      nsd_tolerance_mm: float = 1.0) -> dict:
    """Score out-of-fold predictions (case → file) against the prepared task's labels: ``out_dir/cv_metrics.csv``
    (a row per case and class, with its fold) and ``out_dir/summary.json``: per class the mean over cases; the mean
    foreground Dice of each fold, and their mean and standard deviation over folds. Returns the summary."""
    plan = read_json(work / "plan.json")
    labels = case_labels(work)
    known = {int(k): str(v) for k, v in plan["labels"].items() if int(k) != 0}
    rows, class_names = score_cases(preds, labels, known, nsd_tolerance_mm, str(work / "plan.json"))
    for row in rows:
        row["fold"] = fold_of[row["case"]]
    per_fold = {}
    for k in sorted(set(fold_of.values())):
        mine = summarize([r for r in rows if r["fold"] == k], class_names)
        per_fold[str(k)] = {"cases": sum(1 for f in fold_of.values() if f == k),
                            "mean_foreground_dice": mine["mean_foreground_dice"],
                            "dice": {c: e["dice"]["mean"] for c, e in mine["classes"].items()}}
    fold_means = [f["mean_foreground_dice"] for f in per_fold.values() if f["mean_foreground_dice"] is not None]
    summary = {
        "version": 1,
        "num_cases": len(preds),
        "folds": sorted(int(k) for k in per_fold),
        "nsd_tolerance_mm": nsd_tolerance_mm,
        **summarize(rows, class_names),
        "per_fold": per_fold,
        "fold_mean_dice": {"mean": float(np.mean(fold_means)) if fold_means else None,
                           "std": float(np.std(fold_means)) if fold_means else None},
        "metrics": list(METRICS),
    }
    write_text(out_dir / "cv_metrics.csv", csv_text(rows, class_names, first=("fold",)))
    write_json(out_dir / "summary.json", summary)
    return summary


def cross_validate(bundle: str | os.PathLike, folds_text: str = "all", work: str | os.PathLike | None = None,
                   sets: Sequence[str] = (), resume: bool | str = False, device: str = "auto", nproc: int = 1,
                   parallel: int = 1, mirroring: bool = True, probabilities: bool = False) -> dict | None:
    """Train the folds, predict out of fold, score, choose the post-processing and write the fold models' ensemble;
    the summary, or ``None`` if a fold's training failed."""
    bundle = Path(bundle).absolute()
    work = work_dir(bundle, work)
    num_folds = int(read_json(work / "datalist.json").get("num_folds", 1))
    folds = parse_folds(folds_text, num_folds)
    status = train_folds(bundle, folds, work, sets, resume, device, nproc, parallel)
    failed = sorted(k for k, s in status.items() if s != 0)
    if failed:
        print(f"fold(s) {', '.join(map(str, failed))} failed; rerun with --resume to continue them", flush=True)
        return None
    fold_of = predict_out_of_fold(bundle, folds, work, mirroring=mirroring, probabilities=probabilities)
    summary = score_out_of_fold(bundle, fold_of, work)
    labels = case_labels(work)
    preds = {name: bundle / CV_DIR / "predictions" / f"{name}_seg.nii.gz" for name in fold_of}
    summary["postprocessing"] = choose_largest_component(preds, labels, [int(c) for c in summary["classes"]])
    summary["mirror_axes"] = MIRROR_AXES if mirroring else []
    write_json(bundle / CV_DIR / "summary.json", summary)
    held = [int(k) for k in held_folds(bundle)["folds"]]
    write_ensemble(bundle, [Member(load_architecture(bundle / "models" / "arch.json"), "models/arch.json",
                                   tuple(f"models/fold{k}/model.pt" for k in held))],
                   summary["mirror_axes"], summary["postprocessing"]["largest_component_labels"])
    return summary


def case_labels(work: Path) -> dict[str, Path]:
    """Training case → its label file, from the prepared task's datalist."""
    return {case_name(Path(item["image"])): Path(item["label"]) for item in read_datalist(work, "training")}


def format_summary(summary: dict, bundle: Path) -> str:
    """A few lines: the mean Dice per class over the out-of-fold cases, the spread over folds, the files."""
    def fmt(value: float | None) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    spread = summary["fold_mean_dice"]
    lines = [f"cross-validation: {summary['num_cases']} out-of-fold cases, folds {summary['folds']}; mean foreground "
             f"Dice {fmt(summary['mean_foreground_dice'])} (over folds {fmt(spread['mean'])} ± {fmt(spread['std'])})"]
    for entry in summary["classes"].values():
        dice = entry["dice"]
        lines.append(f"  {entry['name']}: Dice {fmt(dice['mean'])} ± {fmt(dice['std'])}  HD95 "
                     f"{fmt(entry['hd95_mm']['mean'])} mm  NSD {fmt(entry['nsd']['mean'])}")
    post = summary.get("postprocessing")
    if post is not None:
        kept = [summary["classes"][str(c)]["name"] for c in post["largest_component_labels"]]
        lines.append("post-processing: largest connected component of " + (", ".join(kept) if kept else "no class") +
                     " (chosen where it raises the out-of-fold Dice)")
    lines.append(f"wrote {bundle / CV_DIR / 'cv_metrics.csv'}, {bundle / CV_DIR / 'summary.json'} and the fold "
                 f"models' ensemble {bundle / 'configs' / 'ensemble.yaml'}")
    return "\n".join(lines)
