"""DPC modules: the cell's operations, the head and the full network (backbones: :mod:`~dints3d.spaces.dpc.backbones`).

Every operation is conv → GroupNorm → ReLU built with MONAI's dimension-generic factories. DeepLab uses batch norm;
group norm is used here because 3D batches are tiny (1–2 volumes) and a 1×1 pooled grid would leave batch norm a
single value per channel at batch 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from dints3d.spaces.dpc.genotype import BACKBONE, CONV_1X1, SEP_CONV, Branch, DpcOp
from dints3d.spaces.layers import interpolation_mode

#: GroupNorm groups (fewer when the channels do not divide)
GROUPS = 8


def norm_act(channels: int, spatial_dims: int) -> nn.Sequential:
    # at least 2 channels per group, so a 1×1 pooled grid still has more than one value to normalise
    groups = next(g for g in (GROUPS, 4, 2, 1) if channels % g == 0 and (channels // g >= 2 or g == 1))
    return nn.Sequential(get_norm_layer(("group", {"num_groups": groups}), spatial_dims, channels),
                         get_act_layer("relu"))


def conv_norm_act(in_channels: int, out_channels: int, spatial_dims: int) -> nn.Sequential:
    """1×1 convolution, group norm, ReLU: ``B in [spatial]`` → ``B out [spatial]``."""
    return nn.Sequential(Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 1, bias=False),
                         *norm_act(out_channels, spatial_dims))


class SeparableConv(nn.Sequential):
    """3×3 atrous depthwise conv with one rate per axis, then 1×1 pointwise, norm, ReLU (size kept)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], spatial_dims: int):
        conv = Conv[Conv.CONV, spatial_dims]
        super().__init__(
            conv(in_channels, in_channels, 3, padding=tuple(rates), dilation=tuple(rates), groups=in_channels,
                 bias=False),
            conv(in_channels, out_channels, 1, bias=False),
            *norm_act(out_channels, spatial_dims),
        )


class PyramidPool(nn.Module):
    """Average pooling to a fixed grid (one size per axis), 1×1 conv, norm, ReLU, resized back to the input."""

    def __init__(self, in_channels: int, out_channels: int, grid: Sequence[int], spatial_dims: int):
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](tuple(grid))
        self.project = conv_norm_act(in_channels, out_channels, spatial_dims)
        self.mode = interpolation_mode(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.project(self.pool(x)), size=x.shape[2:], mode=self.mode, align_corners=False)


def make_operation(op: DpcOp, in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    if op.kind == CONV_1X1:
        return conv_norm_act(in_channels, out_channels, spatial_dims)
    if op.kind == SEP_CONV:
        return SeparableConv(in_channels, out_channels, op.size, spatial_dims)
    return PyramidPool(in_channels, out_channels, op.size, spatial_dims)


class DpcHead(nn.Module):
    """The cell and a 1×1 classifier: ``B in_channels [spatial]`` → ``B num_classes [spatial]`` (same size).

    Branch i maps its input (backbone features, ``in_channels``; or branch j's output, ``channels``) to
    ``channels``; the B outputs are concatenated (``B·channels``) and projected back to ``channels`` by a 1×1 conv.
    """

    def __init__(self, branches: Sequence[Branch], in_channels: int, channels: int, num_classes: int,
                 spatial_dims: int):
        super().__init__()
        self.inputs = [b.input for b in branches]
        self.ops = nn.ModuleList(
            make_operation(b.op, in_channels if b.input == BACKBONE else channels, channels, spatial_dims)
            for b in branches)
        self.project = conv_norm_act(len(branches) * channels, channels, spatial_dims)
        self.classifier = Conv[Conv.CONV, spatial_dims](channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for source, op in zip(self.inputs, self.ops):
            outputs.append(op(features if source == BACKBONE else outputs[source]))
        return self.classifier(self.project(torch.cat(outputs, dim=1)))


class DpcNetwork(nn.Module):
    """Backbone features → DPC head → logits resized to the input: ``B C [spatial]`` → ``B K [spatial]``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, spatial_dims: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mode = interpolation_mode(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode=self.mode, align_corners=False)


