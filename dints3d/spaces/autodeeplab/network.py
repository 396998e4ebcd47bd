"""The discrete Auto-DeepLab network (Liu et al., CVPR 2019, §5.2): a three-conv stem to stride 4, one cell per
layer along the network path, ASPP on the last cell and the DeepLabv3+ decoder with low-level features from the
last stride-4 feature map. ``B C [spatial]`` → ``B out_channels [spatial]`` for spatial_dims 2 or 3.

Cells follow the released network (TensorFlow DeepLab ``hnasnet``) rather than the search supernet: a cell projects
H^{l-1} by a 1^dims conv at H^{l-1}'s own resolution (after a bilinear ×2 when the path goes finer) and, when the path
goes coarser, the operations on the cell's two inputs stride (see :func:`make_operation`). This layout reproduces the
paper's Table 2 parameter counts to the reported digits (docs/autodeeplab.md). The stem and ASPP are shared with
the supernet (:mod:`dints3d.spaces.autodeeplab.architecture`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from dints3d.spaces.autodeeplab.operations import (
    level_sizes,
    make_operation,
    relu_conv_bn,
    resize,
)

STEM_CHANNELS = (64, 64, 128)
NUM_LEVELS = 4  #: strides 4, 8, 16, 32


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, spatial_dims: int, stride: int = 1,
                 dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, stride=stride,
                                      padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        Norm[Norm.BATCH, spatial_dims](out_channels),
        nn.ReLU(),
    )


class Stem(nn.Module):
    """Three 3^dims convs (64, 64, 128 filters; stride 2, 1, 2): ``B C [n]`` → (``B 64 [n/2]``, ``B 128 [n/4]``).

    Both outputs end in BN without ReLU (the cells' input projections start with ReLU); the stride-2 one is the
    H^{l-2} of the first cell, as in the released network.
    """

    def __init__(self, in_channels: int, spatial_dims: int):
        super().__init__()
        c0, c1, c2 = STEM_CHANNELS
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        self.conv0 = conv_bn_relu(in_channels, c0, 3, spatial_dims, stride=2)
        self.conv1 = nn.Sequential(conv(c0, c1, 3, padding=1, bias=False), norm(c1))
        self.conv2 = nn.Sequential(nn.ReLU(), conv(c1, c2, 3, stride=2, padding=1, bias=False), norm(c2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.conv1(self.conv0(x))
        return half, self.conv2(half)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``B C_in [spatial]`` → ``B C_out [spatial]``.

    Branches, each C_out filters: a 1^dims conv, one 3^dims conv per atrous rate, and image pooling; concatenated and
    projected by a 1^dims conv, then dropout (DeepLab: keep 0.9). The image-pooling branch has a bias instead of BN:
    BN over a 1-pixel map normalises across the batch alone and fails at batch 1 in training.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], spatial_dims: int,
                 dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, 1, spatial_dims)]
            + [conv_bn_relu(in_channels, out_channels, 3, spatial_dims, dilation=r) for r in rates]
        )
        self.pooling = nn.Sequential(Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 1), nn.ReLU())
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * out_channels, out_channels, 1, spatial_dims),
                                     nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooling(x.mean(dim=tuple(range(2, x.dim())), keepdim=True))
        outputs = [branch(x) for branch in self.branches] + [pooled.expand(-1, -1, *x.shape[2:])]
        return self.project(torch.cat(outputs, dim=1))


class Decoder(nn.Module):
    """DeepLabv3+ decoder: ASPP output ``B C_aspp [n/s]`` and low-level features ``B C_low [n/4]`` →
    ``B out_channels [n/4]`` logits (low-level 1^dims conv to 48 filters, concat, two 3^dims convs, classifier)."""

    def __init__(self, aspp_channels: int, low_channels: int, out_channels: int, spatial_dims: int,
                 low_level_channels: int = 48, decoder_channels: int = 256):
        super().__init__()
        self.low = conv_bn_relu(low_channels, low_level_channels, 1, spatial_dims)
        self.fuse = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3, spatial_dims),
            conv_bn_relu(decoder_channels, decoder_channels, 3, spatial_dims),
        )
        self.classifier = Conv[Conv.CONV, spatial_dims](decoder_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low(low)
        return self.classifier(self.fuse(torch.cat([resize(x, low.shape[2:]), low], dim=1)))


class Cell(nn.Module):
    """A discrete cell: ``H^{l-2}``, ``H^{l-1}`` → ``B (num_blocks·C) [size]``.

    H^{l-1} (resized ×2 first when the path goes finer) and H^{l-2} (resized to H^{l-1}'s size) are projected to C
    channels by ReLU → 1^dims conv → BN; when the path goes coarser, the operations reading these two inputs have
    stride 2. Block b adds its two operations' outputs; the cell's output concatenates the blocks.

    Args:
        genotype: two (input, operation) pairs per block; input 0 = H^{l-2}, 1 = H^{l-1}, 2 + j = block j.
        step: level change from H^{l-1} to this cell (+1 coarser, 0, −1 finer).
    """

    def __init__(self, genotype: Sequence[tuple[int, str]], prev_prev_channels: int, prev_channels: int, step: int,
                 channels: int, spatial_dims: int):
        super().__init__()
        self.step = step
        # As released: H^{l-2} keeps its channels when they already match (never with 5 blocks).
        self.prev_prev = (nn.Identity() if prev_prev_channels == channels
                          else relu_conv_bn(prev_prev_channels, channels, 1, spatial_dims))
        self.prev = relu_conv_bn(prev_channels, channels, 1, spatial_dims)
        self.inputs = [int(i) for i, _ in genotype]
        stride = 2 if step == 1 else 1
        self.ops = nn.ModuleList(make_operation(op, channels, spatial_dims, stride if i < 2 else 1)
                                 for i, op in genotype)

    def forward(self, prev_prev: torch.Tensor, prev: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``size``: the cell's output size (that of its level)."""
        if self.step == -1:
            prev = resize(prev, size)
        states = [self.prev_prev(resize(prev_prev, prev.shape[2:])), self.prev(prev)]
        for b in range(len(self.ops) // 2):
            left, right = 2 * b, 2 * b + 1
            states.append(self.ops[left](states[self.inputs[left]]) + self.ops[right](states[self.inputs[right]]))
        return torch.cat(states[2:], dim=1)


def aspp_rates(stride: int) -> tuple[int, ...]:
    """DeepLab's rates (6, 12, 18) at output stride 16, scaled to the path's final stride."""
    return tuple(max(1, r * 16 // stride) for r in (6, 12, 18))


class AutoDeepLabNet(nn.Module):
    """``B in_channels [spatial]`` → ``B out_channels [spatial]`` logits at the input's resolution.

    Args:
        network_path: level (0 = stride 4 … 3 = stride 32) of each layer.
        genotype: the cell, two (input, operation) pairs per block (see :class:`Cell`).
        filter_multiplier: F; a cell at stride s has blocks of F·s/4 channels and outputs num_blocks·F·s/4.
        aspp_channels, low_level_channels, decoder_channels: DeepLabv3+ widths (256, 48, 256).
    """

    def __init__(self, in_channels: int, out_channels: int, network_path: Sequence[int],
                 genotype: Sequence[tuple[int, str]], filter_multiplier: int, spatial_dims: int = 2,
                 aspp_channels: int = 256, low_level_channels: int = 48, decoder_channels: int = 256):
        super().__init__()
        self.network_path = [int(level) for level in network_path]
        num_blocks = len(genotype) // 2
        self.stem = Stem(in_channels, spatial_dims)
        channels = [STEM_CHANNELS[1], STEM_CHANNELS[2]]  # of H^{-1} (stride 2) and H^0 (stride 4)
        previous = 0
        cells = []
        for level in self.network_path:
            width = filter_multiplier * 2**level
            cells.append(Cell(genotype, channels[-2], channels[-1], level - previous, width, spatial_dims))
            channels.append(num_blocks * width)
            previous = level
        self.cells = nn.ModuleList(cells)
        # Low-level features: the last stride-4 cell, or the stem's output if the path leaves stride 4 at once.
        stride4 = [i for i, level in enumerate(self.network_path) if level == 0]
        self.low_level_index = stride4[-1] + 2 if stride4 else 1  # index into [H^{-1}, H^0, cell outputs…]
        self.aspp = ASPP(channels[-1], aspp_channels, aspp_rates(4 * 2**self.network_path[-1]), spatial_dims,
                         dropout=0.1)
        self.decoder = Decoder(aspp_channels, channels[self.low_level_index], out_channels, spatial_dims,
                               low_level_channels, decoder_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = list(self.stem(x))
        sizes = level_sizes(states[1].shape[2:], max(self.network_path) + 1)
        for cell, level in zip(self.cells, self.network_path):
            states.append(cell(states[-2], states[-1], sizes[level]))
        logits = self.decoder(self.aspp(F.relu(states[-1])), states[self.low_level_index])
        return resize(logits, x.shape[2:])
