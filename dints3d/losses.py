"""The segmentation loss of a task: DiceCE for MSD volumes (the DiNTS recipe), cross-entropy with an ignore index
for Cityscapes (Auto-DeepLab and DeepLab train with cross-entropy alone)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


class IgnoreIndexCrossEntropy(nn.Module):
    """Mean cross-entropy over the pixels whose label is not ``ignore_index``.

    ``logits``: ``B C [spatial]``; ``label``: ``B 1 [spatial]`` (or ``B [spatial]``) class indices of any dtype.
    A batch with every pixel ignored gives 0 (with a gradient of zeros), not NaN.
    """

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.dim() == logits.dim():
            label = label[:, 0]
        target = label.long()
        total = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp_min(1)


def segmentation_loss(plan: Mapping) -> nn.Module:
    """The loss for the plan's data format."""
    if plan.get("format") == "cityscapes":
        return IgnoreIndexCrossEntropy(int(plan.get("ignore_index", 255)))
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True)
