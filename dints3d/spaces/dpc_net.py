"""DPC modules: the cell's operations, the head, backbone feature extractors and the full network.

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
from monai.networks.nets import DiNTS
from torch import nn

from dints3d.errors import DintsError
from dints3d.spaces.base import Architecture
from dints3d.spaces.dpc import BACKBONE, CONV_1X1, SEP_CONV, Branch, DpcOp

#: GroupNorm groups (fewer when the channels do not divide)
GROUPS = 8


def interpolation_mode(spatial_dims: int) -> str:
    return "bilinear" if spatial_dims == 2 else "trilinear"


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


class DintsFeatures(nn.Module):
    """The fused features of a MONAI ``DiNTS`` network at resolution ``depth``, before its upsampling stem:
    ``B C [spatial]`` → ``B filter_nums[depth + ds] [spatial / 2^(depth + ds)]`` (ds = 1 with a downsampling stem).

    DiNTS's decoder walks from the coarsest active output node to the finest, adding each resolution's output to the
    upsampled sum from below; this stops at ``depth``. Modules above it (finer upsampling stems, the classifier) are
    dropped, so the state dict is the network's with those keys removed.
    """

    def __init__(self, net: DiNTS, depth: int, use_downsample: bool):
        super().__init__()
        last = net.node_a[net.num_blocks]
        if not 0 <= depth < net.num_depths:
            raise DintsError("dpc.feature_depth", f"must be in 0..{net.num_depths - 1} for this backbone, got {depth}")
        if not any(bool(last[d]) for d in range(depth, net.num_depths)):
            raise DintsError("dpc.feature_depth", f"the backbone has no active output at depth {depth} or coarser; "
                             "choose a finer depth")
        self.depth, self.num_depths = depth, net.num_depths
        self.stem_down, self.dints_space = net.stem_down, net.dints_space
        self.stem_up = nn.ModuleDict({k: m for k, m in net.stem_up.items() if int(k) > depth})
        # Python bools, not a tensor: the forward branches on them, and a tensor on the GPU would make each test a
        # host sync. Like the network's own ``node_a`` (a plain attribute), they are not in the state dict.
        self.node_a: list[list[bool]] = [[bool(v) for v in row] for row in torch.as_tensor(net.node_a).tolist()]
        self.out_channels = int(net.filter_nums[depth + int(use_downsample)])
        self.stride = 2 ** (depth + int(use_downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = []
        for d in range(self.num_depths):
            y = self.stem_down[str(d)](x)
            inputs.append(y if self.node_a[0][d] else torch.zeros_like(y))
        outputs = self.dints_space(inputs)
        last = self.node_a[-1]
        fused: torch.Tensor | None = None
        for d in range(self.num_depths - 1, self.depth - 1, -1):
            if fused is not None:
                fused = outputs[d] + fused
            elif last[d]:
                fused = outputs[d]
            if fused is not None and d > self.depth:
                fused = self.stem_up[str(d)](fused)
        assert fused is not None  # checked in __init__
        return fused


class AutoDeepLabFeatures(nn.Module):
    """The last cell's output of an Auto-DeepLab network (what its ASPP reads, after ReLU):
    ``B C [spatial]`` → ``B num_blocks·F·2^level [spatial / (4·2^level)]`` for the path's last level. The ASPP and
    the decoder are dropped (the DPC takes their place)."""

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.stem, self.cells, self.network_path = net.stem, net.cells, list(net.network_path)
        self.out_channels, self.stride = channels, 4 * 2 ** self.network_path[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dints3d.nets.autodeeplab_net import NUM_LEVELS
        from dints3d.spaces.autodeeplab_ops import level_sizes

        states = list(self.stem(x))
        sizes = level_sizes(states[1].shape[2:], NUM_LEVELS)
        for cell, level in zip(self.cells, self.network_path):
            states.append(cell(states[-2], states[-1], sizes[level]))
        return F.relu(states[-1])


def backbone_patch_divisor(arch: Architecture) -> int:
    """What every patch side must divide by for the backbone (DiNTS: 2^(depths + downsample); Auto-DeepLab: any)."""
    from dints3d.spaces.dints import DintsArchitecture, patch_divisor

    return patch_divisor(arch.num_depths, arch.use_downsample) if isinstance(arch, DintsArchitecture) else 1


def backbone_features(arch: Architecture, in_channels: int, out_channels: int, depth: int,
                      channel_mul: float = 1.0, state_dict: dict | None = None) -> tuple[nn.Module, int]:
    """A feature extractor for a backbone architecture and its channel count. ``state_dict`` (optional) is the
    backbone *network*'s (``arch.build(...)``), e.g. from pre-training it as a segmentation network. ``depth``
    selects the resolution of a DiNTS backbone; an Auto-DeepLab backbone gives its last cell's features."""
    from dints3d.spaces.dints import DintsArchitecture

    if arch.space not in ("dints", "autodeeplab"):
        raise DintsError("dpc.backbone", f"no feature extractor for a '{arch.space}' backbone (use DiNTS or "
                         "Auto-DeepLab)")
    net = arch.build(in_channels, out_channels, channel_mul=channel_mul)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    if isinstance(arch, DintsArchitecture):
        features: nn.Module = DintsFeatures(net, depth, arch.use_downsample)
    else:
        width = max(1, round(arch.filter_multiplier * channel_mul))  # as AutoDeepLabArchitecture.build
        features = AutoDeepLabFeatures(net, arch.num_blocks * width * 2 ** arch.network_path[-1])
    return features, features.out_channels


class DpcNetwork(nn.Module):
    """Backbone features → DPC head → logits resized to the input: ``B C [spatial]`` → ``B K [spatial]``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, spatial_dims: int):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mode = interpolation_mode(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode=self.mode, align_corners=False)


def dpc_figure(arch, title: str | None = None):
    """The cell as a left-to-right DAG: the backbone, one box per branch (its operation), the concatenation."""
    from dints3d.viz import plt

    n = arch.num_branches
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * n, 2.6), dpi=110)
    ax.set_xlim(-0.7, n + 1.7)
    ax.set_ylim(-1.2, 1.2)
    ax.axis("off")
    boxes = {BACKBONE: ax.text(0.0, 0.0, "backbone", ha="center", va="center", fontsize=8,
                               bbox=dict(boxstyle="round", fc="#dddddd"))}
    for i, b in enumerate(arch.branches):
        boxes[i] = ax.text(1.0 + i, 0.6 if i % 2 else -0.6, f"{i}\n{b.op}", ha="center", va="center", fontsize=8,
                           bbox=dict(boxstyle="round", fc="#f3f3f3", ec="#444444"))
    concat = ax.text(n + 1.0, 0.0, "concat\n1×1 conv", ha="center", va="center", fontsize=8,
                     bbox=dict(boxstyle="round", fc="#dddddd"))

    def arrow(source, target, **style):
        ax.annotate("", xy=target.get_position(), xytext=source.get_position(),
                    arrowprops=dict(patchA=source.get_bbox_patch(), patchB=target.get_bbox_patch(), **style))

    for i, b in enumerate(arch.branches):
        arrow(boxes[b.input], boxes[i], arrowstyle="-|>", color="#1f77b4", lw=1.4, connectionstyle="arc3,rad=0.2")
        arrow(boxes[i], concat, arrowstyle="-", color="#cccccc", lw=0.8)
    ax.set_title(title or f"DPC cell ({n} branches, {arch.channels} channels, {arch.spatial_dims}-D)")
    fig.tight_layout()
    return fig
