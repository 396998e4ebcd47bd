"""The training loss of this bundle for networks with several output heads, with MONAI and torch only."""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss
from torch import nn


class DeepSupervised(nn.Module):
    """``loss`` on every output head of a deep-supervised network through MONAI's ``DeepSupervisionLoss`` (weights
    1, ½, ¼, … from the finest head, the label resized to each head), normalised to sum to 1 as nnU-Net does, so the
    loss keeps the scale of one head's.

    ``output``: a list of logits ``B K [spatial]`` (``SegResNetDS``), heads stacked on dim 1 (``DynUNet``:
    ``B heads K [spatial]``), or one ``B K [spatial]`` tensor (DiNTS), which ``loss`` scores as it is; ``label``:
    ``B 1 [spatial]``. Returns a scalar.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.heads = DeepSupervisionLoss(loss, weight_mode="exp")

    def forward(self, output: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(output) and output.dim() == label.dim() + 1:
            output = list(torch.unbind(output, dim=1))
        if torch.is_tensor(output):
            return self.loss(output, label)  # as is: MONAI's wrapper would copy the logits to float32 first
        total = sum(self.heads.get_weights(levels=len(output)))
        return self.heads(output, label.float()) / total  # MONAI resizes the label per head: nearest needs floats
