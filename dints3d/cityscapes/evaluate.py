"""``dints3d evaluate --format cityscapes``: mean IoU of label-id predictions, twice.

1. **Official**: cityscapesscripts' pixel-level evaluator (``evaluation.evalPixelLevelSemanticLabeling``), run in
   this process on the matched (prediction, ground truth) pairs: class IoU and iIoU (instance-weighted, when every
   ground truth has its ``*_gtFine_instanceIds.png``), category IoU and iIoU, and its own JSON result file.
2. **In-process**: one confusion matrix over train ids (:mod:`dints3d.evaluation.confusion`), the same counting rules; the two
   class IoUs agree to float rounding, and the summary records their largest difference.

Ground truth: every ``*_gtFine_labelIds.png`` under ``--label`` (e.g. ``CITYSCAPES/gtFine/val``). Predictions: PNG
files under ``--pred`` (searched recursively) whose names start with the image's ``<city>_<sequence>_<frame>``, as
the official evaluator matches them, in Cityscapes label ids at the ground truth's size. Ground truth without a
prediction is skipped and listed; a prediction without ground truth, or two for one image, is an error.
Outputs in ``--out``: ``summary.json``, ``metrics.csv`` (one row per class) and
``resultPixelLevelSemanticLabeling.json``.

cityscapesscripts 2.3.0 computes iIoU with ``np.in1d``, which NumPy 2.4 removed (upstream fix pending:
mcordts/cityscapesScripts#196). While the evaluator runs, and only if NumPy lacks it, ``np.in1d`` is supplied as
NumPy's documented replacement ``np.isin(a, b, invert=invert).ravel()``; nothing else of the evaluator is touched.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from dints3d.cityscapes.folder import (
    INSTANCE_SUFFIX,
    LABEL_SUFFIX,
    core_name,
    read_label_ids,
)
from dints3d.cityscapes.labels import NUM_CLASSES, class_names, to_train_ids
from dints3d.evaluation.confusion import confusion_matrix, iou_per_class, mean_iou
from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_json, write_text

OFFICIAL_FILE = "resultPixelLevelSemanticLabeling.json"
CSV_COLUMNS = ("train_id", "class", "iou", "iou_official", "iiou_official", "gt_pixels", "pred_pixels")


def find_ground_truth(label_dir: Path) -> dict[str, Path]:
    """Image name (``city_sequence_frame``) → its ``*_gtFine_labelIds.png`` under ``label_dir``."""
    if not label_dir.is_dir():
        raise DintsError(label_dir, "not a folder")
    found = {core_name(p): p for p in sorted(label_dir.rglob(f"*{LABEL_SUFFIX}"))}
    if not found:
        raise DintsError(label_dir, f"no ground truth (*{LABEL_SUFFIX}) found")
    return found


def find_predictions(pred_dir: Path, names: set[str]) -> dict[str, Path]:
    """Image name → the one prediction PNG under ``pred_dir`` whose name starts with it (the official rule)."""
    if not pred_dir.is_dir():
        raise DintsError(pred_dir, "not a folder")
    found: dict[str, Path] = {}
    for path in sorted(pred_dir.rglob("*.png")):
        if path.name.startswith("."):
            continue
        name = core_name(path)
        if name not in names:
            raise DintsError(path, f"no ground truth for image '{name}' in the --label folder")
        if name in found:
            raise DintsError(path, f"a second prediction for '{name}' (also {found[name]})")
        found[name] = path
    if not found:
        raise DintsError(pred_dir, "no PNG predictions found")
    return found


@contextlib.contextmanager
def _numpy_in1d():
    """``np.in1d`` for cityscapesscripts 2.3.0 under NumPy ≥ 2.4, only for the duration of the block."""
    if hasattr(np, "in1d"):
        yield
        return
    np.in1d = lambda a, b, assume_unique=False, invert=False: np.isin(a, b, assume_unique, invert).ravel()
    try:
        yield
    finally:
        del np.in1d


def official_evaluation(pairs: list[tuple[Path, Path]], out_dir: Path, instance_level: bool) -> dict:
    """cityscapesscripts' evaluator on (prediction, ground truth) pairs; its result dict (also written as
    ``out_dir/resultPixelLevelSemanticLabeling.json``). Its errors, which it prints before ``sys.exit``, become a
    DintsError."""
    # cityscapesscripts: optional (the cityscapes extra)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.CArgs()
    vars(args).update(vars(official.args))  # a private copy: the module's global is mutated by every run
    args.exportFile = str(out_dir / OFFICIAL_FILE)
    args.JSONOutput, args.quiet, args.colorized = True, True, False
    args.bold = args.nocol = ""
    args.evalInstLevelScore, args.evalPixelAccuracy = instance_level, False
    out_dir.mkdir(parents=True, exist_ok=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), _numpy_in1d():
            return official.evaluateImgLists([str(p) for p, _ in pairs], [str(g) for _, g in pairs], args)
    except SystemExit:
        lines = [line for line in printed.getvalue().splitlines() if "ERROR" in line] or ["failed"]
        raise DintsError("cityscapesscripts", lines[-1].replace("ERROR:", "").strip()) from None


def in_process_matrix(pairs: list[tuple[Path, Path]]) -> torch.Tensor:
    """The summed train-id confusion matrix (``C × (C + 1)``) of the pairs; predictions of ignored label ids fall in
    the void column (a miss, as the official evaluator counts them)."""
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES + 1, dtype=torch.int64)
    for pred_path, gt_path in pairs:
        gt, pred = read_label_ids(gt_path), read_label_ids(pred_path)
        if pred.shape != gt.shape:
            raise DintsError(pred_path, f"size {list(pred.shape)} differs from the ground truth's {list(gt.shape)} "
                             f"({gt_path})")
        matrix += confusion_matrix(torch.from_numpy(to_train_ids(pred)), torch.from_numpy(to_train_ids(gt)),
                                   NUM_CLASSES)
    return matrix


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def evaluate_cityscapes(pred_dir: str | os.PathLike, label_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Score ``pred_dir`` against ``label_dir`` both ways; write the outputs to ``out_dir``; return the summary."""
    pred_dir, label_dir, out_dir = Path(pred_dir), Path(label_dir), Path(out_dir)
    truth = find_ground_truth(label_dir)
    preds = find_predictions(pred_dir, set(truth))
    pairs = [(preds[name], truth[name]) for name in sorted(preds)]
    instance_level = all(Path(str(g).replace(LABEL_SUFFIX, INSTANCE_SUFFIX)).is_file() for _, g in pairs)
    matrix = in_process_matrix(pairs)  # also checks sizes and ids with one-line errors before the official run
    official = official_evaluation(pairs, out_dir, instance_level)
    names = class_names()
    ours = iou_per_class(matrix)
    theirs = [official["classScores"][n] for n in names]
    both = [abs(a - b) for a, b in zip(ours, theirs) if not (math.isnan(a) or math.isnan(b))]
    agree = all(math.isnan(a) == math.isnan(b) for a, b in zip(ours, theirs))
    gt_pixels, pred_pixels = matrix.sum(1), matrix[:, :NUM_CLASSES].sum(0)
    classes = {str(i): {"name": n, "iou": _number(ours[i]), "iou_official": _number(theirs[i]),
                        "iiou_official": _number(official["classInstScores"][n]), "gt_pixels": int(gt_pixels[i]),
                        "pred_pixels": int(pred_pixels[i])} for i, n in enumerate(names)}
    summary = {
        "version": 1,
        "format": "cityscapes",
        "pred_dir": os.fspath(pred_dir),
        "label_dir": os.fspath(label_dir),
        "num_images": len(pairs),
        "official": {
            "mean_iou": _number(official["averageScoreClasses"]),
            "mean_iiou": _number(official["averageScoreInstClasses"]) if instance_level else None,
            "category_mean_iou": _number(official["averageScoreCategories"]),
            "category_mean_iiou": _number(official["averageScoreInstCategories"]) if instance_level else None,
            "result_file": OFFICIAL_FILE,
        },
        "mean_iou": _number(mean_iou(ours)),
        "max_class_iou_difference": max(both, default=0.0) if agree else None,
        "classes": classes,
        "labels_without_prediction": sorted(set(truth) - set(preds)),
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, entry in classes.items():
        writer.writerow([i, entry["name"], *("" if entry[k] is None else f"{entry[k]:.6g}"
                                              for k in ("iou", "iou_official", "iiou_official")),
                         entry["gt_pixels"], entry["pred_pixels"]])
    write_text(out_dir / "metrics.csv", buffer.getvalue())
    write_json(out_dir / "summary.json", summary)
    return summary


def print_summary(summary: dict, out_dir: str | os.PathLike) -> None:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    official = summary["official"]
    print(f"{summary['num_images']} images; mean IoU {fmt(official['mean_iou'])} (cityscapesscripts), "
          f"{fmt(summary['mean_iou'])} (in-process); iIoU {fmt(official['mean_iiou'])}")
    for entry in summary["classes"].values():
        if entry["iou_official"] is not None:
            print(f"  {entry['name']:<14} IoU {fmt(entry['iou_official'])}  iIoU {fmt(entry['iiou_official'])}")
    if summary["labels_without_prediction"]:
        print(f"{len(summary['labels_without_prediction'])} ground-truth image(s) had no prediction (listed in "
              "summary.json)")
    print(f"wrote {Path(out_dir) / 'summary.json'}, {Path(out_dir) / 'metrics.csv'} and "
          f"{Path(out_dir) / OFFICIAL_FILE}")


def run_evaluate(args) -> int:
    """``dints3d evaluate --format cityscapes``."""
    if args.dataset_json is not None:
        raise DintsError("--dataset-json", "does not apply to --format cityscapes (Cityscapes' own label table)")
    print_summary(evaluate_cityscapes(args.pred, args.label, args.out), args.out)
    return 0
