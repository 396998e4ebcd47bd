"""``dints3d evaluate``: per-case, per-class Dice, HD95 (mm) and NSD of predicted label maps against ground truth.

Prediction and label NIfTI files are matched by case name: the file name without ``.nii``/``.nii.gz`` and, for
predictions, without a trailing ``_seg`` or ``_pred`` (so MONAI's ``SaveImage`` output ``case/case_seg.nii.gz``
matches ``labelsTr/case.nii.gz``). The prediction folder is searched recursively; files whose name starts with ``.``
(macOS ``._*`` files shipped in the MSD archives) are ignored.

A class absent from a case's ground truth is reported with status ``absent_in_gt`` and no metric values (its
``pred_voxels`` says whether it was predicted, i.e. a false positive); it never counts as Dice 0. A class present in
the ground truth but not predicted has status ``missed``: Dice 0, NSD 0, HD95 undefined (left empty). A label with no
prediction file at all is reported (a warning, ``labels_without_prediction`` in the summary) and left out of the
means, or, with ``--missing zero`` (as challenge evaluators count it), scored like a case that predicted nothing:
status ``no_prediction``, Dice 0, NSD 0 for every class its ground truth holds.
Outputs: ``metrics.csv`` (one row per case and foreground class) and ``summary.json`` (see ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import warnings
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

from dints3d.data.formats import format_named
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json, write_text
from dints3d.utils.preflight import check_writable

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PREDICTION_SUFFIXES = ("_seg", "_pred")
CSV_COLUMNS = ("case", "class", "class_name", "dice", "hd95_mm", "nsd", "gt_voxels", "pred_voxels", "status")
METRICS = ("dice", "hd95_mm", "nsd")
AFFINE_TOLERANCE_MM = 1e-3


def case_name(path: Path, strip_suffixes: tuple[str, ...] = ()) -> str:
    """``spleen_2.nii.gz`` → ``spleen_2``; with ``strip_suffixes=("_seg",)`` also ``spleen_2_seg.nii.gz``."""
    name = path.name
    for ext in NIFTI_SUFFIXES:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    for suffix in strip_suffixes:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(folder: Path, recursive: bool, strip_suffixes: tuple[str, ...] = ()) -> dict[str, Path]:
    """Case name → NIfTI file in ``folder``; two files with one case name are an error."""
    if not folder.is_dir():
        raise DintsError(folder, "not a folder")
    pattern = "**/*.nii*" if recursive else "*.nii*"
    cases: dict[str, Path] = {}
    for path in sorted(folder.glob(pattern)):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)  # ._* files, .partial-*/
        if hidden or not path.name.endswith(NIFTI_SUFFIXES) or not path.is_file():
            continue
        name = case_name(path, strip_suffixes)
        if name in cases:
            raise DintsError(path, f"case '{name}' also matches {cases[name]}; keep one file per case")
        cases[name] = path
    return cases


def read_label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label map as an ``int64`` array (spatial dims only) and its 4×4 affine."""
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DintsError(path, f"cannot read NIfTI image: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise DintsError(path, f"a label map must be 2-D or 3-D, got shape {list(data.shape)}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DintsError(path, "not a label map: contains non-integer values")
    if data.size and data.min() < 0:
        raise DintsError(path, "not a label map: contains negative values")
    return data.astype(np.int64), image.affine


def class_names_from_dataset_json(path: Path) -> dict[int, str]:
    """Foreground class index → name from an MSD ``labels`` map ``{"1": "spleen"}`` (or nnU-Net v2's
    ``{"spleen": 1}``); background (0) is left out."""
    data = read_json(path)
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise DintsError(path, "needs a 'labels' object such as {\"0\": \"background\", \"1\": \"spleen\"}")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, str) and str(key).isdigit():
            index, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):
            index, name = value, str(key)
        else:
            raise DintsError(path, f"cannot read label entry {key!r}: {value!r} (region labels are not supported)")
        if index > 0:
            names[index] = name
    return names


class CaseScorer:
    """MONAI metrics for one binary class at a time: ``(1, 1, *spatial)`` masks → Dice, HD95 in mm, NSD."""

    def __init__(self, nsd_tolerance_mm: float):
        self.tolerance = nsd_tolerance_mm
        self.dice = DiceMetric(include_background=True, reduction="none")
        self.hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self.nsd = SurfaceDiceMetric([nsd_tolerance_mm], include_background=True, reduction="none")

    def __call__(self, pred: np.ndarray, gt: np.ndarray, spacing: list[float]) -> dict[str, float]:
        p = torch.from_numpy(pred)[None, None].float()
        g = torch.from_numpy(gt)[None, None].float()
        with warnings.catch_warnings():  # MONAI's own deprecation notices (get_mask_edges' arguments), not the user's
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
            scores = self._scores(p, g, spacing)
        for metric in (self.dice, self.hd95, self.nsd):
            metric.reset()
        return scores

    def _scores(self, p: torch.Tensor, g: torch.Tensor, spacing: list[float]) -> dict[str, float]:
        return {
            "dice": float(self.dice(y_pred=p, y=g)),
            "hd95_mm": float(self.hd95(y_pred=p, y=g, spacing=spacing)),
            "nsd": float(self.nsd(y_pred=p, y=g, spacing=spacing)),
        }


def score_case(case: str, pred: np.ndarray, gt: np.ndarray, spacing: list[float], classes: list[int],
               scorer: CaseScorer) -> list[dict]:
    """One row per class (the :data:`CSV_COLUMNS`, ``nan`` where a metric is undefined)."""
    rows = []
    for c in classes:
        gt_mask, pred_mask = gt == c, pred == c
        gt_voxels, pred_voxels = int(gt_mask.sum()), int(pred_mask.sum())
        row = {"case": case, "class": c, "gt_voxels": gt_voxels, "pred_voxels": pred_voxels}
        if gt_voxels == 0:
            row.update(dice=math.nan, hd95_mm=math.nan, nsd=math.nan, status="absent_in_gt")
        elif pred_voxels == 0:
            row.update(dice=0.0, hd95_mm=math.nan, nsd=0.0, status="missed")
        else:
            row.update(scorer(pred_mask, gt_mask, spacing), status="ok")
        rows.append(row)
    return rows


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "count": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "count": len(finite)}


def summarize(rows: list[dict], class_names: dict[int, str]) -> dict:
    """Per class: mean/std (population)/count of each metric over the cases whose ground truth holds the class,
    and counts of ``missed``, ``absent_in_gt`` and false-positive cases; ``mean_foreground_dice`` is the mean of the
    per-class mean Dice over classes present in at least one case."""
    per_class = {}
    for c, name in class_names.items():
        mine = [r for r in rows if r["class"] == c]
        present = [r for r in mine if r["status"] != "absent_in_gt"]
        entry = {"name": name, "cases_present": len(present)}
        entry.update({m: _stats([r[m] for r in present]) for m in METRICS})
        entry["missed"] = sum(r["status"] == "missed" for r in mine)
        entry["no_prediction"] = sum(r["status"] == NO_PREDICTION for r in mine)
        entry["absent_in_gt"] = len(mine) - len(present)
        entry["false_positive_cases"] = sum(r["status"] == "absent_in_gt" and r["pred_voxels"] > 0 for r in mine)
        per_class[str(c)] = entry
    means = [e["dice"]["mean"] for e in per_class.values() if e["dice"]["mean"] is not None]
    return {"classes": per_class, "mean_foreground_dice": float(np.mean(means)) if means else None}


def csv_text(rows: list[dict], class_names: dict[int, str], first: tuple[str, ...] = ()) -> str:
    """The rows as CSV: ``first`` columns (keys of every row), then :data:`CSV_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow((*first, *CSV_COLUMNS))
    for r in rows:
        values = {**r, "class_name": class_names[r["class"]]}
        values.update({m: "" if math.isnan(r[m]) else f"{r[m]:.6g}" for m in METRICS})
        writer.writerow([values[col] for col in (*first, *CSV_COLUMNS)])
    return buffer.getvalue()


def _check_same_grid(pred_path: Path, pred_shape: tuple[int, ...], pred_affine: np.ndarray, label_path: Path,
                     label_shape: tuple[int, ...], label_affine: np.ndarray) -> None:
    if tuple(pred_shape) != tuple(label_shape):
        raise DintsError(pred_path, f"shape {list(pred_shape)} differs from the label {label_path} {list(label_shape)}")
    if not np.allclose(pred_affine, label_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise DintsError(pred_path, f"affine differs from the label {label_path} (resample the prediction to the "
                         f"label's grid):\n{np.round(pred_affine, 4).tolist()} vs {np.round(label_affine, 4).tolist()}")


def evaluate_folders(pred_dir: str | os.PathLike, label_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     dataset_json: str | os.PathLike | None = None, nsd_tolerance_mm: float = 1.0,
                     missing: str = "report") -> dict:
    """Score every prediction in ``pred_dir`` against ``label_dir``; write ``metrics.csv`` and ``summary.json`` to
    ``out_dir``; return the summary. Labels without a prediction are listed in the summary and, with ``missing``
    ``"report"``, left out of the means, with ``"zero"`` scored as predicting nothing (:data:`MISSING_MODES`)."""
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    if not nsd_tolerance_mm > 0:
        raise DintsError("--nsd-tolerance", "must be a positive distance in mm")
    if missing not in MISSING_MODES:
        raise DintsError("--missing", f"must be one of {', '.join(MISSING_MODES)}, got '{missing}'")
    check_writable(out_dir)
    preds = find_cases(pred_dir, recursive=True, strip_suffixes=PREDICTION_SUFFIXES)
    labels = find_cases(label_dir, recursive=False)
    if not preds:
        raise DintsError(pred_dir, "no NIfTI predictions (*.nii.gz, *.nii) found")
    for name, path in preds.items():
        if name not in labels:
            raise DintsError(path, f"no label for case '{name}' in {label_dir}")
    known = class_names_from_dataset_json(Path(dataset_json)) if dataset_json is not None else None
    return evaluate_cases(preds, labels, out_dir, known, nsd_tolerance_mm, str(dataset_json),
                          {"pred_dir": os.fspath(pred_dir), "label_dir": os.fspath(label_dir)}, missing)


#: ``--missing``: what a label without a prediction counts as: ``report`` (listed, left out of the means) or ``zero``
#: (every class of its ground truth scored Dice 0 / NSD 0, as challenge evaluators do)
MISSING_MODES = ("report", "zero")
#: the status of a class in a case that has a label but no prediction file (``--missing zero``)
NO_PREDICTION = "no_prediction"


def evaluate_cases(preds: Mapping[str, Path], labels: Mapping[str, Path], out_dir: str | os.PathLike,
                   known: dict[int, str] | None = None, nsd_tolerance_mm: float = 1.0,
                   known_source: str = "the task's classes", about: Mapping | None = None,
                   missing: str = "report") -> dict:
    """Score the prediction of every case in ``preds`` (case → file) against ``labels[case]``; write
    ``metrics.csv`` and ``summary.json`` (with ``about`` in front) to ``out_dir``; return the summary. ``known``:
    class index → name, read from ``known_source`` (no other value may occur); otherwise classes are named by index.
    ``missing``: what a label without a prediction counts as (:data:`MISSING_MODES`)."""
    check_grids(preds, labels)  # every pair's header first: a mismatch stops the run before any scoring
    without = sorted(set(labels) - set(preds))
    rows, class_names = score_cases(preds, labels, known, nsd_tolerance_mm, known_source,
                                    without if missing == "zero" else ())
    summary = {
        "version": 1,
        **(about or {}),
        "num_cases": len(preds) + (len(without) if missing == "zero" else 0),
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "missing": missing,
        **summarize(rows, class_names),
        "labels_without_prediction": without,
    }
    write_text(Path(out_dir) / "metrics.csv", csv_text(rows, class_names))
    write_json(Path(out_dir) / "summary.json", summary)
    return summary


def check_grids(preds: Mapping[str, Path], labels: Mapping[str, Path]) -> None:
    """Each prediction's header against its label's (shape and affine), before any voxel is read or scored."""
    for name in sorted(preds):
        pred, label = _header(preds[name]), _header(labels[name])
        _check_same_grid(preds[name], pred[0], pred[1], labels[name], label[0], label[1])


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial shape (a trailing axis of 1 dropped, as :func:`read_label_map` does) and affine of a NIfTI file."""
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
        affine = image.affine
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DintsError(path, f"cannot read NIfTI image: {e}") from None
    return (shape[:3] if len(shape) == 4 and shape[3] == 1 else shape), affine


def score_cases(preds: Mapping[str, Path], labels: Mapping[str, Path], known: dict[int, str] | None = None,
                nsd_tolerance_mm: float = 1.0, known_source: str = "the task's classes",
                without_prediction: Sequence[str] = ()) -> tuple[list[dict], dict[int, str]]:
    """One row per case and class (``CSV_COLUMNS``), sorted, and the class names (index → name). The cases
    ``without_prediction`` (labels with no prediction) are scored as predicting nothing: Dice 0 and NSD 0 for every
    class of their ground truth (status ``no_prediction``)."""
    scorer = CaseScorer(nsd_tolerance_mm)
    rows: list[dict] = []
    seen: set[int] = set()
    for name in sorted(without_prediction):
        label, _ = read_label_map(labels[name])
        present = {int(v) for v in np.unique(label)} - {0}
        if known is not None and present - set(known):
            raise DintsError(labels[name], f"contains labels {sorted(present - set(known))} not in {known_source}")
        seen |= present
        rows += [{"case": name, "class": c, "gt_voxels": int((label == c).sum()), "pred_voxels": 0, "dice": 0.0,
                  "hd95_mm": math.nan, "nsd": 0.0, "status": NO_PREDICTION} for c in sorted(present)]
    for name in sorted(preds):
        label, label_affine = read_label_map(labels[name])
        pred, pred_affine = read_label_map(preds[name])
        _check_same_grid(preds[name], pred.shape, pred_affine, labels[name], label.shape, label_affine)
        values = {int(v) for v in np.unique(label)} | {int(v) for v in np.unique(pred)}
        values.discard(0)
        if known is not None:
            for path, data in ((labels[name], label), (preds[name], pred)):
                unknown = sorted({int(v) for v in np.unique(data)} - set(known) - {0})
                if unknown:
                    raise DintsError(path, f"contains labels {unknown} not in {known_source}")
        seen |= values
        spacing = [float(s) for s in nib.affines.voxel_sizes(label_affine)[: label.ndim]]
        rows += score_case(name, pred, label, spacing, sorted(values), scorer)
    class_names = known if known is not None else {c: f"class_{c}" for c in sorted(seen)}
    scored = {(r["case"], r["class"]) for r in rows}
    for name in sorted({*preds, *without_prediction}):  # classes in neither mask of a case: absent in gt, not predicted
        rows += [{"case": name, "class": c, "gt_voxels": 0, "pred_voxels": 0, "dice": math.nan, "hd95_mm": math.nan,
                  "nsd": math.nan, "status": "absent_in_gt"} for c in class_names if (name, c) not in scored]
    rows.sort(key=lambda r: (r["case"], r["class"]))
    return rows, class_names


#: ``--format`` → the task format whose predictions are scored
EVALUATED_FORMATS = {"nifti": "msd", "cityscapes": "cityscapes"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=tuple(EVALUATED_FORMATS), default="nifti",
                        help="nifti: Dice/HD95/NSD of NIfTI masks (default); cityscapes: mean IoU of label-id PNGs "
                             "by cityscapesscripts' official evaluator and in-process (docs/cityscapes.md)")
    parser.add_argument("--pred", required=True, help="folder of predicted label maps (searched recursively)")
    parser.add_argument("--label", required=True,
                        help="folder of ground-truth label maps (e.g. labelsTr; cityscapes: gtFine/val, recursive)")
    parser.add_argument("--dataset-json", help="MSD dataset.json whose 'labels' name the classes")
    parser.add_argument("--out", help="folder for metrics.csv and summary.json (default: the --pred folder, as "
                                      "nnU-Net writes summary.json next to the predictions)")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD boundary tolerance in mm (default 1)")
    parser.add_argument("--missing", choices=MISSING_MODES, default="report",
                        help="a label without a prediction: report (warn, list it in summary.json, leave it out of "
                             "the means; default) or zero (score it Dice 0 / NSD 0 for every class it holds, as "
                             "challenge evaluators do)")


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = args.pred
    return format_named(EVALUATED_FORMATS[args.format]).stage("evaluate")(args)


def run_nifti(args: argparse.Namespace) -> int:
    """``dints3d evaluate`` of NIfTI masks."""
    summary = evaluate_folders(args.pred, args.label, args.out, args.dataset_json, args.nsd_tolerance,
                               getattr(args, "missing", "report"))
    without = summary["labels_without_prediction"]
    if without:
        shown = ", ".join(without[:10]) + (", …" if len(without) > 10 else "")
        counted = ("scored as Dice 0 (--missing zero)" if summary["missing"] == "zero" else
                   "left out of the means (--missing zero scores them as 0)")
        print(f"warning: {len(without)} label(s) in {args.label} have no prediction in {args.pred}: {shown}; "
              f"{counted}", file=sys.stderr)
    print(f"{summary['num_cases']} cases; mean foreground Dice {_fmt(summary['mean_foreground_dice'])}")
    for c, entry in summary["classes"].items():
        print(f"  {c} {entry['name']}: Dice {_fmt(entry['dice']['mean'])}  HD95 {_fmt(entry['hd95_mm']['mean'])} mm  "
              f"NSD {_fmt(entry['nsd']['mean'])}  (present in {entry['cases_present']} cases)")
    print(f"wrote {Path(args.out) / 'metrics.csv'} and {Path(args.out) / 'summary.json'}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
