"""The segmentation loss of a task, chosen by its format (:mod:`dints3d.data.formats`): DiceCE for MSD volumes
(the DiNTS recipe); Cityscapes: :class:`dints3d.cityscapes.loss.IgnoreIndexCrossEntropy`."""

from __future__ import annotations

from typing import Mapping

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from dints3d.data.formats import plan_format


def dice_ce_loss() -> DiceCELoss:
    """DiceCE as the DiNTS recipe trains MSD tasks: logits ``B K [spatial]``, labels ``B 1 [spatial]``."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True)


class DeepSupervised(nn.Module):
    """``loss`` for networks with several output heads in training, through MONAI's ``DeepSupervisionLoss``
    (weights 1, ½, ¼, … from the finest head, the label resized to each head), normalised to sum to 1 as nnU-Net
    does, so the loss keeps the scale of one head's: a list of logits (``SegResNetDS``) or heads stacked on dim 1
    (``DynUNet``: ``B heads K [spatial]``). A single ``B K [spatial]`` tensor is scored by ``loss`` alone, so any
    network can be trained with it."""

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


def segmentation_loss(plan: Mapping) -> nn.Module:
    """The loss for the plan's data format."""
    return plan_format(plan).loss(plan)
