"""Confusion-matrix IoU for semantic segmentation, counted exactly as Cityscapes' official evaluator counts it.

The matrix has one row per true class and one column per predicted class plus a last "void" column for predictions
outside the classes. Pixels whose truth is outside the classes (the ignore index 255) are not counted. For class c:
tp = M[c, c], fn = row c minus tp (a void prediction is a miss), fp = column c minus tp (only over counted rows);
IoU = tp / (tp + fp + fn), NaN when that is 0/0 (the class neither occurs nor is predicted), and the mean IoU
averages the non-NaN classes: the official evaluator's ``getIouScoreForLabel`` and ``getScoreAverage``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``C × (C + 1)`` int64 of (true class, predicted class) over pixels of integer maps of one shape.

    Truth outside ``0..C-1`` (e.g. 255) is skipped; predictions outside ``0..C-1`` go to column C."""
    label = torch.as_tensor(label).reshape(-1).long()
    pred = torch.as_tensor(pred).reshape(-1).long().to(label.device)
    keep = (label >= 0) & (label < num_classes)
    label, pred = label[keep], pred[keep]
    pred = torch.where((pred >= 0) & (pred < num_classes), pred, torch.full_like(pred, num_classes))
    counts = torch.bincount(label * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(matrix: torch.Tensor | np.ndarray) -> list[float]:
    """IoU per class (NaN where the class is neither in the truth nor predicted) from a ``C × (C + 1)`` matrix."""
    m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix).double().cpu()
    c = m.shape[0]
    tp = m.diagonal()
    fn = m.sum(1) - tp
    fp = m[:, :c].sum(0) - tp
    denom = tp + fp + fn
    return [float(t / d) if d > 0 else math.nan for t, d in zip(tp.tolist(), denom.tolist())]


def mean_iou(ious: list[float]) -> float:
    """Mean over the classes with a defined IoU (NaN if none)."""
    valid = [v for v in ious if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


class ConfusionMatrixMetric(CumulativeIterationMetric):
    """MONAI metric: per-image confusion matrices, aggregated into the mean IoU of the whole set.

    ``y_pred``: ``B 1 [spatial]`` class indices (or ``B C [spatial]`` scores, arg-maxed); ``y``: ``B 1 [spatial]``
    class indices with ignored pixels outside ``0..C-1``. Use with ``monai.handlers.IgniteMetricHandler``.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape[1] > 1:
            y_pred = y_pred.argmax(1, keepdim=True)
        return torch.stack([confusion_matrix(p, t, self.num_classes) for p, t in zip(y_pred, y)])

    def matrix(self) -> torch.Tensor:
        """The summed ``C × (C + 1)`` matrix of everything seen since the last reset."""
        buffer = self.get_buffer()
        if buffer is None or len(buffer) == 0:
            return torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64)
        return torch.as_tensor(buffer).sum(0)

    def aggregate(self) -> torch.Tensor:
        return torch.tensor(mean_iou(iou_per_class(self.matrix())))
