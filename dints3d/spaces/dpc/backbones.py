"""Backbones a DPC cell can sit on: the features of a DiNTS or an Auto-DeepLab network at one resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiNTS
from torch import nn

from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.network import NUM_LEVELS
from dints3d.spaces.autodeeplab.operations import level_sizes
from dints3d.spaces.base import Architecture, check_document
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.utils.errors import DintsError


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
        states = list(self.stem(x))
        sizes = level_sizes(states[1].shape[2:], NUM_LEVELS)
        for cell, level in zip(self.cells, self.network_path):
            states.append(cell(states[-2], states[-1], sizes[level]))
        return F.relu(states[-1])


#: the spaces whose networks a DPC cell can sit on
BACKBONES: dict[str, type[Architecture]] = {"dints": DintsArchitecture, "autodeeplab": AutoDeepLabArchitecture}


def backbone_from_dict(data: dict, source: str | None = None) -> Architecture:
    """The backbone architecture stored inside a DPC ``arch.json``."""
    return BACKBONES[check_document(data, tuple(BACKBONES), source)].from_dict(data, source)


def backbone_patch_divisor(arch: Architecture) -> int:
    """What every patch side must divide by for the backbone (DiNTS: 2^(depths + downsample); Auto-DeepLab: any)."""
    return arch.patch_divisor


def backbone_features(arch: Architecture, in_channels: int, out_channels: int, depth: int,
                      channel_mul: float = 1.0, state_dict: dict | None = None) -> tuple[nn.Module, int]:
    """A feature extractor for a backbone architecture and its channel count. ``state_dict`` (optional) is the
    backbone *network*'s (``arch.build(...)``), e.g. from pre-training it as a segmentation network. ``depth``
    selects the resolution of a DiNTS backbone; an Auto-DeepLab backbone gives its last cell's features."""
    if arch.space not in BACKBONES:
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
