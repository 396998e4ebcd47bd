"""The Cityscapes loss: cross-entropy with an ignore index (Auto-DeepLab and DeepLab train with cross-entropy
alone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
