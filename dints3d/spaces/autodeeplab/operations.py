"""Auto-DeepLab's eight cell operations and the projections that move features between resolutions, for any
``spatial_dims`` through MONAI's layer factories. Convolutions follow DARTS: ReLU → Conv → BN, no bias.

Sizes: a level's spatial size is ``ceil`` of half the finer level's (what a 3-wide, stride-2, padding-1 conv gives,
TensorFlow's "SAME" padding), so any input size works; :func:`level_sizes` lists them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

from dints3d.spaces.layers import resize

OPERATIONS = (
    "sep_conv_3x3", "sep_conv_5x5", "atrous_conv_3x3", "atrous_conv_5x5",
    "avg_pool_3x3", "max_pool_3x3", "skip_connect", "zero",
)
ZERO = OPERATIONS.index("zero")
#: operations a discrete cell may use
CELL_OPERATIONS = OPERATIONS[:ZERO]


def halved(size: Sequence[int]) -> tuple[int, ...]:
    """The size one level coarser: ``ceil(n / 2)`` per side."""
    return tuple((int(s) + 1) // 2 for s in size)


def level_sizes(size: Sequence[int], num_levels: int) -> list[tuple[int, ...]]:
    """Spatial size of each level 0..num_levels-1, from level 0's."""
    sizes = [tuple(int(s) for s in size)]
    for _ in range(num_levels - 1):
        sizes.append(halved(sizes[-1]))
    return sizes


def relu_conv_bn(in_channels: int, out_channels: int, kernel_size: int, spatial_dims: int, stride: int = 1,
                 dilation: int = 1, affine: bool = True) -> nn.Sequential:
    """ReLU → k^dims conv ('same' padding) → BatchNorm."""
    return nn.Sequential(
        nn.ReLU(),
        Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, stride=stride,
                                      padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        Norm[Norm.BATCH, spatial_dims](out_channels, affine=affine),
    )


def separable_layer(in_channels: int, out_channels: int, kernel_size: int, spatial_dims: int, stride: int = 1,
                    affine: bool = True) -> nn.Sequential:
    """ReLU → depthwise k^dims conv → pointwise 1^dims conv → BatchNorm."""
    conv = Conv[Conv.CONV, spatial_dims]
    return nn.Sequential(
        nn.ReLU(),
        conv(in_channels, in_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=in_channels,
             bias=False),
        conv(in_channels, out_channels, 1, bias=False),
        Norm[Norm.BATCH, spatial_dims](out_channels, affine=affine),
    )


class HalveThenConv(nn.Module):
    """The released network's atrous op at stride 2: ReLU → (bi/tri)linear resize to ``ceil(n/2)`` → k^dims conv
    (rate 1) → BN, ``B C [n]`` → ``B C [ceil(n/2)]``."""

    def __init__(self, channels: int, kernel_size: int, spatial_dims: int, affine: bool = True):
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size, padding=kernel_size // 2,
                                                  bias=False)
        self.norm = Norm[Norm.BATCH, spatial_dims](channels, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(resize(F.relu(x), halved(x.shape[2:]))))


class AvgPool(nn.Module):
    """3-wide average pooling with 'same' padding that excludes the padding from the mean, for any input size
    (PyTorch's 3-D CPU kernel refuses maps under 3 voxels a side even when padded, which deep levels of small
    3-D patches reach): ``B C [n]`` → ``B C [ceil(n / stride)]``."""

    def __init__(self, spatial_dims: int, stride: int = 1):
        super().__init__()
        self.pool = Pool[Pool.AVG, spatial_dims](3, stride=stride)
        self.pad = [1] * (2 * spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(1, 1, *x.shape[2:])
        return self.pool(F.pad(x, self.pad)) / self.pool(F.pad(ones, self.pad))


def make_operation(name: str, channels: int, spatial_dims: int, stride: int = 1, affine: bool = True) -> nn.Module:
    """One candidate operation, ``B C [n]`` → ``B C [ceil(n / stride)]``. ``zero`` has no module: a mixed op skips it
    (its output is 0) and a discrete cell never uses it.

    "sep" convs are two separable layers (DARTS; ``separable_kxk_2`` of the released network); "atrous" convs are one
    regular (not separable) convolution with rate 2. Stride 2 (only in a discrete cell that goes one level coarser,
    on the cell's own inputs) follows the released network: the first separable layer strides; an atrous conv
    resizes to half and runs at rate 1; pools stride; ``skip_connect`` becomes a strided 1^dims conv.
    """
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    kernel = {"3x3": 3, "5x5": 5}.get(name[-3:])
    if name.startswith("sep_conv"):
        return nn.Sequential(*separable_layer(channels, channels, kernel, spatial_dims, stride, affine),
                             *separable_layer(channels, channels, kernel, spatial_dims, 1, affine))
    if name.startswith("atrous_conv"):
        if stride == 2:
            return HalveThenConv(channels, kernel, spatial_dims, affine)
        return relu_conv_bn(channels, channels, kernel, spatial_dims, dilation=2, affine=affine)
    if name == "avg_pool_3x3":
        return AvgPool(spatial_dims, stride)
    if name == "max_pool_3x3":
        return Pool[Pool.MAX, spatial_dims](3, stride=stride, padding=1)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity()
        return relu_conv_bn(channels, channels, 1, spatial_dims, stride, affine=affine)
    raise ValueError(f"no module for operation {name!r} (operations: {', '.join(CELL_OPERATIONS)})")


def search_operation(name: str, channels: int, spatial_dims: int) -> nn.Module:
    """A candidate operation of the supernet's mixed op (stride 1, parameter-free BN as in DARTS' search)."""
    op = make_operation(name, channels, spatial_dims, affine=False)
    if name.endswith("pool_3x3"):
        return nn.Sequential(op, Norm[Norm.BATCH, spatial_dims](channels, affine=False))
    return op


class ResizedProjection(nn.Module):
    """Resize to the target size, then ReLU → 1^dims conv → BN: ``B C_in [spatial]`` → ``B C_out [size]``.

    The supernet's "same" and "up" (bilinear ×2 + 1x1 conv) transitions, and the H^{l-2} input of every cell.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, affine: bool = True):
        super().__init__()
        self.project = relu_conv_bn(in_channels, out_channels, 1, spatial_dims, affine=affine)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.project(resize(x, size))


class StridedProjection(nn.Module):
    """The supernet's "down" transition, a stride-2 conv: ReLU → 3^dims conv, stride 2 → BN,
    ``B C_in [n]`` → ``B C_out [ceil(n/2)]`` (``size`` is reached by construction)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, affine: bool = True):
        super().__init__()
        self.project = relu_conv_bn(in_channels, out_channels, 3, spatial_dims, stride=2, affine=affine)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.project(x)


def transition(step: int, in_channels: int, out_channels: int, spatial_dims: int, affine: bool = True) -> nn.Module:
    """The supernet's projection of H^{l-1} for a transition that changes the level by ``step`` (+1 coarser, 0, −1
    finer); ``module(x, size)`` → ``B out_channels [size]``."""
    cls = StridedProjection if step == 1 else ResizedProjection
    return cls(in_channels, out_channels, spatial_dims, affine=affine)
