"""Mean IoU: the in-process confusion matrix agrees with cityscapesscripts' official evaluator; the MONAI metric and
the search-time validation count the same way; ``dints3d evaluate --format cityscapes`` reports both."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from dints3d.cityscapes.evaluate import evaluate_cityscapes
from dints3d.cityscapes.folder import read_label_ids
from dints3d.cityscapes.labels import class_names, to_train_ids
from dints3d.cli import main
from dints3d.evaluation.confusion import (
    ConfusionMatrixMetric,
    confusion_matrix,
    iou_per_class,
    mean_iou,
)
from dints3d.evaluation.validation import validate_iou

EVALUATED = [lab.id for lab in cs_labels if lab.id >= 0 and not lab.ignoreInEval]
VOID = [lab.id for lab in cs_labels if lab.id >= 0 and lab.ignoreInEval]


@pytest.fixture(scope="module")
def folder(cityscapes_task):
    return cityscapes_task(cases=8, test_cases=0, size=48, seed=2)


def _predict(folder: Path, out: Path, seed: int) -> dict[str, np.ndarray]:
    """Imperfect label-id predictions for the val split: ground truth with blocks replaced by other evaluated ids,
    by void ids (a miss for the true class) and by a class absent from the truth (a pure false positive)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    preds = {}
    for gt_path in sorted((folder / "gtFine" / "val").rglob("*_gtFine_labelIds.png")):
        pred = np.asarray(Image.open(gt_path)).copy()
        h, w = pred.shape
        for _ in range(12):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            pred[y:y + rng.integers(2, 9), x:x + rng.integers(2, 12)] = rng.choice(EVALUATED + VOID)
        pred[pred == 26] = 27 if rng.random() < 0.5 else 26  # sometimes every car becomes a truck
        pred[:3, :3] = 33  # bicycle: never in the synthetic truth
        core = "_".join(gt_path.name.split("_")[:3])
        Image.fromarray(pred).save(out / f"{core}_pred_labelIds.png")
        preds[core] = pred
    return preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in_process_miou_agrees_with_the_official_evaluator(folder, tmp_path, seed):
    _predict(folder, tmp_path / "pred", seed)
    summary = evaluate_cityscapes(tmp_path / "pred", folder / "gtFine" / "val", tmp_path / "eval")
    official = json.loads((tmp_path / "eval" / "resultPixelLevelSemanticLabeling.json").read_text())
    assert summary["num_images"] == 2 and summary["labels_without_prediction"] == []
    compared = 0
    for entry in summary["classes"].values():
        theirs = official["classScores"][entry["name"]]
        if math.isnan(theirs):
            assert entry["iou"] is None and entry["gt_pixels"] == entry["pred_pixels"] == 0
        else:
            assert entry["iou"] == pytest.approx(theirs, abs=1e-12)
            compared += 1
    assert compared >= 10
    assert summary["classes"]["18"]["iou"] == 0.0  # predicted, never true: IoU 0, not NaN
    assert summary["mean_iou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert summary["official"]["mean_iou"] == official["averageScoreClasses"]
    assert summary["max_class_iou_difference"] < 1e-12
    assert 0 < summary["mean_iou"] < 1 and 0 <= summary["official"]["mean_iiou"] <= 1  # iIoU ran (instanceIds)
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("train_id,class,iou,iou_official") and len(rows) == 20


def test_confusion_matrix_counts_like_the_definition():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (40,))
    label[:6] = 255  # ignored
    pred = rng.integers(0, 6, (40,))  # 5 = outside the classes: void
    m = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 5).numpy()
    for c in range(5):
        counted = label != 255
        tp = np.sum((label == c) & (pred == c))
        fn = np.sum((label == c) & (pred != c))
        fp = np.sum(counted & (label != c) & (pred == c))
        assert m[c, c] == tp and m[c].sum() - tp == fn and m[:, c].sum() - tp == fp
    assert m.sum() == np.sum(label != 255) and m[:, 5].sum() == np.sum((label != 255) & (pred == 5))
    ious = iou_per_class(np.array([[3, 0, 1], [0, 0, 0]]))  # class 1: never true, never predicted; 1 void miss
    assert ious[0] == 0.75 and math.isnan(ious[1]) and mean_iou(ious) == 0.75


def test_monai_metric_aggregates_one_matrix_over_batches():
    torch.manual_seed(0)
    metric = ConfusionMatrixMetric(num_classes=4)
    preds, labels = [], []
    for _ in range(3):
        scores = torch.randn(2, 4, 6, 5)
        label = torch.randint(0, 4, (2, 1, 6, 5))
        label[0, 0, 0] = 255
        metric(y_pred=scores, y=label)
        preds.append(scores.argmax(1))
        labels.append(label[:, 0])
    expected = mean_iou(iou_per_class(confusion_matrix(torch.cat(preds), torch.cat(labels), 4)))
    assert metric.aggregate().item() == pytest.approx(expected)
    metric.reset()
    metric(y_pred=torch.zeros(1, 1, 2, 2), y=torch.zeros(1, 1, 2, 2))  # class indices are taken as they are
    assert metric.aggregate().item() == 1.0


class _Oracle(torch.nn.Module):
    """Predicts the class stored in its input's first channel (any size), like a perfect network."""

    patch_divisor = 1

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long().clamp(0, 18), 19).permute(0, 3, 1, 2).float() * 10


def test_search_validation_scores_the_whole_set(folder):
    cases = []
    for gt_path in sorted((folder / "gtFine" / "val").rglob("*_gtFine_labelIds.png")):
        train_ids = torch.from_numpy(to_train_ids(read_label_ids(gt_path)).astype(np.int64))[None]
        image = train_ids.float().clone()
        image[0, :4, :4] = 0  # a wrong corner: road instead of the truth
        cases.append({"image": torch.cat([image, image, image]), "label": train_ids})
    expected = confusion_matrix(torch.cat([c["image"][0].long() for c in cases]),
                                torch.cat([c["label"][0] for c in cases]), 19)
    for whole in (True, False):
        ious = validate_iou(_Oracle(), cases, 19, (16, 16), torch.device("cpu"), torch.autocast("cpu", enabled=False),
                            overlap=0.0, whole_image=whole)
        assert ious == pytest.approx(iou_per_class(expected), nan_ok=True)
    present = {int(v) for c in cases for v in c["label"].unique() if v != 255}
    assert {i for i, v in enumerate(ious) if not math.isnan(v)} == present | {0}


def test_evaluate_cli_reports_both_scores_and_refuses_bad_predictions(folder, tmp_path, capsys):
    preds = _predict(folder, tmp_path / "pred", 0)
    assert main(["evaluate", "--format", "cityscapes", "--pred", str(tmp_path / "pred"),
                 "--label", str(folder / "gtFine" / "val"), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "(cityscapesscripts)" in out and "(in-process)" in out
    assert (tmp_path / "eval" / "summary.json").is_file()
    core = sorted(preds)[0]
    bad = tmp_path / "pred" / f"{core}_pred_labelIds.png"
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad)
    assert main(["evaluate", "--format", "cityscapes", "--pred", str(tmp_path / "pred"),
                 "--label", str(folder / "gtFine" / "val"), "--out", str(tmp_path / "eval2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "differs from the ground truth" in err and len(err.splitlines()) == 1
    bad.unlink()
    Image.fromarray(preds[core]).save(tmp_path / "pred" / "zurich_000000_000019_pred_labelIds.png")
    assert main(["evaluate", "--format", "cityscapes", "--pred", str(tmp_path / "pred"),
                 "--label", str(folder / "gtFine" / "val"), "--out", str(tmp_path / "eval3")]) == 2
    assert "no ground truth for image 'zurich_000000_000019'" in capsys.readouterr().err
    (tmp_path / "pred" / "zurich_000000_000019_pred_labelIds.png").unlink()
    summary = evaluate_cityscapes(tmp_path / "pred", folder / "gtFine" / "val", tmp_path / "eval4")
    assert summary["num_images"] == 1 and summary["labels_without_prediction"] == [core]
    assert class_names()[0] == summary["classes"]["0"]["name"]
