"""Baselines: plain MONAI networks as :class:`~dints3d.spaces.base.Architecture` objects, sized from a task's plan,
so that they go through the same flow (export, train, infer, describe, memory model) as a searched network.

- :class:`SegResNetArchitecture`: MONAI's ``SegResNetDS`` (the deep-supervised SegResNet of Auto3DSeg's segresnet
  algorithm): residual encoder, one block per decoder level, heads on the finest ``dsdepth`` levels; anisotropic
  spacings get anisotropic strides and kernels (``resolution``).
- :class:`DynUNetArchitecture`: MONAI's ``DynUNet`` planned as nnU-Net plans its U-Net (:mod:`.planning`): kernels and
  strides from the target spacing and the patch, widths 32 → 320, deep supervision on the finest decoder levels.

Both are MONAI-only at inference; ``channel_mul`` scales their widths (for comparisons at equal memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from monai.networks.nets import DynUNet, SegResNetDS
from monai.networks.nets.segresnet_ds import scales_for_resolution
from torch import nn

from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture
from dints3d.spaces.baselines.planning import stage_count, unet_stages
from dints3d.utils.errors import DintsError

#: DynUNet's widest stage (nnU-Net's cap for 3D networks)
MAX_FILTERS = 320


def scaled(width: int, channel_mul: float) -> int:
    """A width times ``channel_mul``, at least 1 (as DiNTS' ``channel_mul`` scales its widths)."""
    return max(1, round(width * channel_mul))


def _positive_ints(data: Mapping, key: str, source: str | None, nested: bool = False) -> list:
    value = data.get(key)
    rows = value if nested else [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(row, list) and row and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in row) for row in rows):
        shape = "a list of lists of" if nested else "a list of"
        raise DintsError(source, f"'{key}' must be {shape} positive integers, got {value!r}")
    return value


def _spatial_dims(data: Mapping, source: str | None) -> int:
    dims = data.get("spatial_dims")
    if dims not in (2, 3) or isinstance(dims, bool):
        raise DintsError(source, f"'spatial_dims' must be 2 or 3, got {dims!r}")
    return dims


def _provenance(data: Mapping, source: str | None) -> dict:
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise DintsError(source, "'provenance' must be an object")
    return provenance


@dataclass
class SegResNetArchitecture(Architecture):
    """MONAI ``SegResNetDS``.

    Attributes:
        blocks_down: residual blocks per encoder stage (one stage per resolution).
        init_filters: channels of the first stage (doubled per stage), before ``channel_mul``.
        dsdepth: decoder levels with an output head (1: no deep supervision).
        resolution: the target spacing (mm), which sets anisotropic strides; ``None``: isotropic.
    """

    space: ClassVar[str] = "segresnet"
    display_name: ClassVar[str] = "SegResNet"

    spatial_dims: int = 3
    blocks_down: list[int] = field(default_factory=lambda: [1, 2, 2, 4, 4])
    init_filters: int = 32
    dsdepth: int = 4
    resolution: list[float] | None = None
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: Mapping, deep_supervision: bool = True) -> "SegResNetArchitecture":
        """As many stages (at most 5, Auto3DSeg's) as the patch allows a 4-voxel coarsest map; heads on every
        decoder level with ``deep_supervision``."""
        stages = min(5, stage_count(plan["patch_size"]))
        return cls(spatial_dims=len(plan["patch_size"]), blocks_down=[1, 2, 2, 4, 4][:stages],
                   dsdepth=max(1, stages - 1) if deep_supervision else 1,
                   resolution=[float(s) for s in plan.get("target_spacing", [])] or None,
                   provenance={"planned_for": plan.get("name"), "patch_size": list(plan["patch_size"])})

    @property
    def strides(self) -> list[tuple[int, ...]]:
        """Downsampling factor per axis of each stage after the first."""
        if self.resolution is None:
            return [(2,) * self.spatial_dims] * (len(self.blocks_down) - 1)
        scales = scales_for_resolution(self.resolution, n_stages=len(self.blocks_down))
        return [tuple(int(s) for s in scale) for scale in scales[: len(self.blocks_down) - 1]]

    @property
    def patch_divisor(self) -> tuple[int, ...]:
        return tuple(math.prod(stride[a] for stride in self.strides) for a in range(self.spatial_dims))

    def headline(self) -> str:
        return (f"SegResNet ({len(self.blocks_down)} resolutions, {self.init_filters} filters at the first, "
                f"{self.dsdepth} output head(s))")

    def summary(self, channel_mul: float = 1.0) -> dict[str, Any]:
        return {"network": "monai.networks.nets.SegResNetDS", "blocks_down": self.blocks_down,
                "init_filters": scaled(self.init_filters, channel_mul), "dsdepth": self.dsdepth,
                "strides": [list(s) for s in self.strides], "spatial_dims": self.spatial_dims}

    def to_dict(self) -> dict:
        return {"space": self.space, "version": ARCH_FORMAT_VERSION, "spatial_dims": self.spatial_dims,
                "blocks_down": self.blocks_down, "init_filters": self.init_filters, "dsdepth": self.dsdepth,
                "resolution": self.resolution, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "SegResNetArchitecture":
        dims = _spatial_dims(data, source)
        blocks = _positive_ints(data, "blocks_down", source)
        init = _positive_ints({"init_filters": [data.get("init_filters")]}, "init_filters", source)[0]
        dsdepth = data.get("dsdepth", 1)
        if not isinstance(dsdepth, int) or isinstance(dsdepth, bool) or not 1 <= dsdepth <= max(1, len(blocks) - 1):
            raise DintsError(source, f"'dsdepth' must be an integer in 1..{max(1, len(blocks) - 1)}, got {dsdepth!r}")
        resolution = data.get("resolution")
        if resolution is not None and (not isinstance(resolution, list) or len(resolution) != dims or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in resolution)):
            raise DintsError(source, f"'resolution' must be null or {dims} positive spacings, got {resolution!r}")
        return cls(spatial_dims=dims, blocks_down=blocks, init_filters=init, dsdepth=dsdepth,
                   resolution=None if resolution is None else [float(r) for r in resolution],
                   provenance=_provenance(data, source))

    def network_arguments(self, channel_mul: float = 1.0) -> dict[str, Any]:
        """``SegResNetDS``'s keyword arguments besides the channels."""
        return {"spatial_dims": self.spatial_dims, "init_filters": scaled(self.init_filters, channel_mul),
                "norm": "instance", "blocks_down": list(self.blocks_down), "dsdepth": self.dsdepth,
                "resolution": self.resolution}

    def build(self, in_channels: int, out_channels: int, channel_mul: float = 1.0, **kwargs: Any) -> nn.Module:
        """``B in_channels [spatial]`` → ``B out_channels [spatial]`` (in training with ``dsdepth`` > 1: a list of
        logits, finest first)."""
        return SegResNetDS(in_channels=in_channels, out_channels=out_channels, **self.network_arguments(channel_mul))

    def bundle_network(self, arch_ref: str = "@arch") -> dict[str, Any]:
        arguments = self.network_arguments()
        arguments["init_filters"] = f"$max(1, round({self.init_filters} * @channel_mul))"
        return {"_target_": "SegResNetDS", "in_channels": "@in_channels", "out_channels": "@out_channels",
                **arguments}


@dataclass
class DynUNetArchitecture(Architecture):
    """MONAI ``DynUNet`` as nnU-Net plans it.

    Attributes:
        kernel_size, strides: per stage, per axis (stage 0's stride is 1).
        filters: channels per stage, before ``channel_mul``.
        deep_supr_num: extra output heads below the finest (0: no deep supervision).
    """

    space: ClassVar[str] = "dynunet"
    display_name: ClassVar[str] = "DynUNet"

    kernel_size: list[list[int]] = field(default_factory=list)
    strides: list[list[int]] = field(default_factory=list)
    filters: list[int] = field(default_factory=list)
    deep_supr_num: int = 2
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: Mapping, deep_supervision: bool = True) -> "DynUNetArchitecture":
        """nnU-Net's stages for the plan's target spacing and patch; heads on the two decoder levels below the
        finest with ``deep_supervision`` (as many as the network has)."""
        kernels, strides = unet_stages(plan["target_spacing"], plan["patch_size"])
        if len(strides) < 2:
            raise DintsError("plan.json", f"patch {plan['patch_size']} is too small for a U-Net (no axis can be "
                             "halved)")
        filters = [min(32 * 2**i, MAX_FILTERS) for i in range(len(strides))]
        return cls(kernel_size=kernels, strides=strides, filters=filters,
                   deep_supr_num=min(2, len(strides) - 2) if deep_supervision else 0,
                   provenance={"planned_for": plan.get("name"), "patch_size": list(plan["patch_size"]),
                               "target_spacing": list(plan["target_spacing"])})

    @property
    def spatial_dims(self) -> int:
        return len(self.strides[0])

    @property
    def patch_divisor(self) -> tuple[int, ...]:
        return tuple(math.prod(stride[a] for stride in self.strides) for a in range(self.spatial_dims))

    def headline(self) -> str:
        return f"DynUNet ({len(self.strides)} resolutions, {self.filters[0]}–{self.filters[-1]} filters)"

    def summary(self, channel_mul: float = 1.0) -> dict[str, Any]:
        return {"network": "monai.networks.nets.DynUNet", "kernel_size": self.kernel_size, "strides": self.strides,
                "filters": [scaled(f, channel_mul) for f in self.filters], "deep_supr_num": self.deep_supr_num,
                "spatial_dims": self.spatial_dims}

    def to_dict(self) -> dict:
        return {"space": self.space, "version": ARCH_FORMAT_VERSION, "spatial_dims": self.spatial_dims,
                "kernel_size": self.kernel_size, "strides": self.strides, "filters": self.filters,
                "deep_supr_num": self.deep_supr_num, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "DynUNetArchitecture":
        dims = _spatial_dims(data, source)
        kernels = _positive_ints(data, "kernel_size", source, nested=True)
        strides = _positive_ints(data, "strides", source, nested=True)
        filters = _positive_ints(data, "filters", source)
        if not len(kernels) == len(strides) == len(filters) >= 2 or any(
                len(row) != dims for row in kernels + strides):
            raise DintsError(source, f"'kernel_size', 'strides' and 'filters' must describe the same ≥ 2 stages, "
                             f"each with {dims} axes")
        deep = data.get("deep_supr_num", 0)
        if not isinstance(deep, int) or isinstance(deep, bool) or not 0 <= deep <= len(strides) - 2:
            raise DintsError(source, f"'deep_supr_num' must be an integer in 0..{len(strides) - 2}, got {deep!r}")
        return cls(kernel_size=kernels, strides=strides, filters=filters, deep_supr_num=deep,
                   provenance=_provenance(data, source))

    def network_arguments(self, channel_mul: float = 1.0) -> dict[str, Any]:
        """``DynUNet``'s keyword arguments besides the channels."""
        return {"spatial_dims": self.spatial_dims, "kernel_size": self.kernel_size, "strides": self.strides,
                "upsample_kernel_size": self.strides[1:], "filters": [scaled(f, channel_mul) for f in self.filters],
                "norm_name": "instance", "deep_supervision": self.deep_supr_num > 0,
                "deep_supr_num": max(1, self.deep_supr_num), "res_block": False}

    def build(self, in_channels: int, out_channels: int, channel_mul: float = 1.0, **kwargs: Any) -> nn.Module:
        """``B in_channels [spatial]`` → ``B out_channels [spatial]`` (in training with deep supervision: the heads
        stacked on dim 1, ``B (1 + deep_supr_num) out_channels [spatial]``)."""
        return DynUNet(in_channels=in_channels, out_channels=out_channels, **self.network_arguments(channel_mul))

    def bundle_network(self, arch_ref: str = "@arch") -> dict[str, Any]:
        arguments = self.network_arguments()
        arguments["filters"] = f"$[max(1, round(f * @channel_mul)) for f in {self.filters}]"
        return {"_target_": "DynUNet", "in_channels": "@in_channels", "out_channels": "@out_channels", **arguments}


#: baseline name → its architecture class (``dints3d export --arch segresnet``)
BASELINES: dict[str, type[SegResNetArchitecture] | type[DynUNetArchitecture]] = {
    cls.space: cls for cls in (SegResNetArchitecture, DynUNetArchitecture)}


def plan_baseline(name: str, plan: Mapping, deep_supervision: bool = True) -> Architecture:
    """The baseline ``name`` sized for ``plan``."""
    return BASELINES[name].from_plan(plan, deep_supervision)
