"""Sliding-window validation: mean Dice per foreground class, classes absent from a case's ground truth skipped."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


@torch.no_grad()
def validate_dice(
    model: torch.nn.Module,
    cases: Iterable[dict],
    num_classes: int,
    roi_size: Sequence[int],
    device: torch.device,
    autocast,
    sw_batch_size: int = 1,
    overlap: float = 0.625,
) -> list[float]:
    """Per-class mean Dice over ``cases`` (dicts with ``image`` C×spatial and ``label`` 1×spatial).

    Returns ``num_classes - 1`` floats (NaN for a class absent from every case's ground truth).
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    cases = list(cases)
    if not cases:  # e.g. a rank whose shard of a small validation fold is empty
        return [float("nan")] * (num_classes - 1)
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            image = torch.as_tensor(case["image"]).unsqueeze(0).to(device)
            label = torch.as_tensor(case["label"]).unsqueeze(0).to(device)
            with autocast:
                logits = sliding_window_inference(image, roi_size, sw_batch_size, model, overlap=overlap,
                                                  mode="gaussian")
            pred = one_hot(logits.float().argmax(1, keepdim=True), num_classes)
            metric(pred, one_hot(label.long(), num_classes))
        scores = metric.aggregate()  # cases × (num_classes - 1), NaN where the class is absent from the truth
    finally:
        model.train(was_training)
    return torch.nanmean(scores.float(), dim=0).tolist()
