"""Validation during a search by the data's own metric (:func:`validation_metric`): mean Dice per foreground class
for MSD volumes (classes absent from a case's ground truth skipped), IoU per class over the whole validation set for
Cityscapes (one confusion matrix, as the official evaluator). Cityscapes images go through the network whole, as
DeepLab evaluates them, when the space takes any input size (``patch_divisor`` 1, e.g. Auto-DeepLab); otherwise by
sliding windows of the search crop."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from dints3d.data.formats import plan_format
from dints3d.evaluation.confusion import confusion_matrix, iou_per_class


def _predict(model: torch.nn.Module, cases: Iterable[dict], roi_size: Sequence[int], device: torch.device, autocast,
             sw_batch_size: int, overlap: float, whole_image: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits 1 K [spatial] float32, label 1 [spatial])`` per case, the model in eval mode meanwhile: by
    Gaussian-weighted sliding windows of ``roi_size`` or, with ``whole_image``, one pass per image."""
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            image = torch.as_tensor(case["image"]).unsqueeze(0).to(device)
            with autocast:
                if whole_image:
                    logits = model(image)
                else:
                    logits = sliding_window_inference(image, roi_size, sw_batch_size, model, overlap=overlap,
                                                      mode="gaussian")
            yield logits.float(), torch.as_tensor(case["label"]).to(device)
    finally:
        model.train(was_training)


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
    for logits, label in _predict(model, cases, roi_size, device, autocast, sw_batch_size, overlap):
        metric(one_hot(logits.argmax(1, keepdim=True), num_classes), one_hot(label.unsqueeze(0).long(), num_classes))
    scores = metric.aggregate()  # cases × (num_classes - 1), NaN where the class is absent from the truth
    return torch.nanmean(scores.float(), dim=0).tolist()


def validation_metric(plan: Mapping) -> tuple[str, int]:
    """(metric name, class index of the first score) of the plan's format: ``("dice", 1)`` (foreground classes) or
    ``("iou", 0)``."""
    return plan_format(plan).metric


@torch.no_grad()
def validate_iou(
    model: torch.nn.Module,
    cases: Iterable[dict],
    num_classes: int,
    roi_size: Sequence[int],
    device: torch.device,
    autocast,
    sw_batch_size: int = 1,
    overlap: float = 0.625,
    whole_image: bool = False,
) -> list[float]:
    """IoU per class (NaN for a class neither in any truth nor predicted) over ``cases`` (dicts with ``image``
    C×spatial and ``label`` 1×spatial, ignored pixels outside ``0..num_classes-1``), by sliding windows of
    ``roi_size`` or, with ``whole_image``, one pass per image. Under ``torch.distributed`` the confusion matrices of all
    ranks are summed first, so every rank returns the same scores."""
    matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)
    for logits, label in _predict(model, cases, roi_size, device, autocast, sw_batch_size, overlap, whole_image):
        matrix += confusion_matrix(logits.argmax(1), label, num_classes)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(matrix)
    return iou_per_class(matrix)


def validate_scores(plan: Mapping, model: torch.nn.Module, cases: Iterable[dict], roi_size: Sequence[int],
                    device: torch.device, autocast, sw_batch_size: int = 1, overlap: float = 0.625) -> list[float]:
    """Per-class scores of :func:`validation_metric`'s kind for the plan's data format."""
    num_classes = int(plan["out_channels"])
    if validation_metric(plan)[0] == "iou":
        whole = getattr(model, "patch_divisor", None) == 1
        return validate_iou(model, cases, num_classes, roi_size, device, autocast, sw_batch_size, overlap, whole)
    return validate_dice(model, cases, num_classes, roi_size, device, autocast, sw_batch_size, overlap)
