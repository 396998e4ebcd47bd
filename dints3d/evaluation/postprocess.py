"""Post-processing chosen on cross-validation, as nnU-Net chooses it: for each foreground class, keep only its largest
connected component (MONAI's ``KeepLargestConnectedComponent``) when that raises the class's mean out-of-fold Dice;
otherwise leave the class as predicted. The same transform then runs at inference (``largest_component_labels``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from dints3d.evaluation.metrics import read_label_map


def dice(pred: np.ndarray, label: np.ndarray, cls: int) -> float:
    """Dice of class ``cls``; NaN when the ground truth does not hold it (the case does not count for the class)."""
    truth, guess = label == cls, pred == cls
    if not truth.any():
        return math.nan
    return float(2 * (truth & guess).sum() / (truth.sum() + guess.sum()))


def largest_component(pred: np.ndarray, cls: int) -> np.ndarray:
    """``pred`` (a label map, spatial dims) with only the largest connected component of class ``cls`` kept."""
    keep = KeepLargestConnectedComponent(applied_labels=[cls], is_onehot=False, independent=True)
    return np.asarray(keep(torch.as_tensor(pred)[None]))[0]


def choose_largest_component(preds: Mapping[str, Path | np.ndarray], labels: Mapping[str, Path],
                             classes: Sequence[int]) -> dict:
    """For each class: the mean Dice over the cases whose ground truth holds it, as predicted and with only its largest
    component kept; ``largest_component_labels``: the classes where keeping it is strictly better. ``preds``: case →
    out-of-fold label map (a NIfTI file or an array on the label's grid)."""
    before: dict[int, list[float]] = {c: [] for c in classes}
    after: dict[int, list[float]] = {c: [] for c in classes}
    for case, source in preds.items():
        pred = read_label_map(Path(source))[0] if not isinstance(source, np.ndarray) else source
        label = read_label_map(Path(labels[case]))[0]
        for c in classes:
            value = dice(pred, label, c)
            if not math.isnan(value):
                before[c].append(value)
                after[c].append(dice(largest_component(pred, c), label, c))
    table = {}
    for c in classes:
        mean_before = float(np.mean(before[c])) if before[c] else math.nan
        mean_after = float(np.mean(after[c])) if after[c] else math.nan
        table[str(c)] = {"dice": mean_before, "dice_largest_component": mean_after, "cases": len(before[c]),
                         "keep_largest_component": bool(mean_after > mean_before)}
    return {"largest_component_labels": [c for c in classes if table[str(c)]["keep_largest_component"]],
            "classes": table}
