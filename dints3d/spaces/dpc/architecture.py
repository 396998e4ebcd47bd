"""A dense prediction cell in its ``arch.json`` form, optionally with the backbone it sits on (the space itself:
:mod:`~dints3d.spaces.dpc.genotype`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture
from dints3d.spaces.dpc.backbones import (
    backbone_features,
    backbone_from_dict,
    backbone_patch_divisor,
)
from dints3d.spaces.dpc.figure import dpc_figure
from dints3d.spaces.dpc.genotype import BACKBONE, Branch, branch_to_dict, parse_branch
from dints3d.spaces.dpc.network import DpcHead, DpcNetwork
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import matplotlib_available


@dataclass
class DpcArchitecture(Architecture):
    """A dense prediction cell, optionally with the backbone it sits on.

    Attributes:
        branches: the cell, in order.
        spatial_dims: 2 or 3.
        channels: output channels of every branch and of the cell's 1×1 projection (256 in the paper).
        backbone: the backbone's ``arch.json`` dict (any space but dpc), needed by :meth:`build`; ``None`` for a
            bare cell (then only :meth:`build_head` works).
        feature_depth: which backbone resolution feeds the cell (DiNTS: stride 2^(depth + 1) with a downsampling
            stem).
        backbone_channel_mul: the backbone's width multiplier.
    """

    space: ClassVar[str] = "dpc"

    branches: list[Branch]
    spatial_dims: int = 2
    channels: int = 256
    backbone: dict | None = None
    feature_depth: int = 1
    backbone_channel_mul: float = 1.0
    provenance: dict = field(default_factory=dict)

    display_name: ClassVar[str] = "DPC"

    @property
    def patch_divisor(self) -> int:
        """The backbone's (the cell itself takes any feature size)."""
        return 1 if self.backbone is None else backbone_patch_divisor(self.backbone_architecture())

    def __post_init__(self) -> None:
        self.branches = list(self.branches)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def key(self) -> str:
        """A short canonical text of the cell alone (``input:op`` per branch), e.g. ``b:1×1 conv, 0:sep 3×3 r6×3``."""
        return ", ".join(f"{'b' if b.input == BACKBONE else b.input}:{b.op}" for b in self.branches)

    def cell_dict(self) -> list[dict]:
        return [branch_to_dict(b) for b in self.branches]

    def to_dict(self) -> dict:
        return {
            "space": self.space,
            "version": ARCH_FORMAT_VERSION,
            "spatial_dims": self.spatial_dims,
            "channels": self.channels,
            "branches": self.cell_dict(),
            "backbone": self.backbone,
            "feature_depth": self.feature_depth,
            "backbone_channel_mul": self.backbone_channel_mul,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "DpcArchitecture":
        spatial_dims = data.get("spatial_dims")
        if spatial_dims not in (2, 3):
            raise DintsError(source, f"'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
        branches = data.get("branches")
        if not isinstance(branches, list) or not branches:
            raise DintsError(source, "'branches' must be a non-empty list")
        channels = data.get("channels", 256)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise DintsError(source, f"'channels' must be a positive integer, got {channels!r}")
        depth = data.get("feature_depth", 1)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise DintsError(source, f"'feature_depth' must be a non-negative integer, got {depth!r}")
        mul = data.get("backbone_channel_mul", 1.0)
        if not isinstance(mul, (int, float)) or isinstance(mul, bool) or mul <= 0:
            raise DintsError(source, "'backbone_channel_mul' must be a positive number")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise DintsError(source, "'provenance' must be an object")
        backbone = data.get("backbone")
        if backbone is not None:
            if not isinstance(backbone, dict) or backbone.get("space") == cls.space:
                raise DintsError(source, "'backbone' must be the architecture object of another space, or null")
            inner = backbone_from_dict(backbone, f"{source} (backbone)")
            if getattr(inner, "spatial_dims", spatial_dims) != spatial_dims:
                raise DintsError(source, f"the backbone is {inner.spatial_dims}-D but the cell is {spatial_dims}-D")
        return cls(
            branches=[parse_branch(b, i, spatial_dims, source) for i, b in enumerate(branches)],
            spatial_dims=spatial_dims, channels=channels, backbone=backbone, feature_depth=depth,
            backbone_channel_mul=float(mul), provenance=provenance,
        )

    def with_backbone(self, backbone: Architecture, feature_depth: int, channel_mul: float) -> "DpcArchitecture":
        """This cell on ``backbone`` (its provenance dropped: the run's provenance goes in this one's)."""
        data = {**backbone.to_dict(), "provenance": {}}
        return DpcArchitecture(self.branches, self.spatial_dims, self.channels, data, feature_depth, channel_mul,
                               dict(self.provenance))

    def backbone_architecture(self) -> Architecture:
        if self.backbone is None:
            raise DintsError("arch.json", "this DPC architecture has no backbone; only its head can be built")
        return backbone_from_dict(self.backbone, "arch.json (backbone)")

    def build_head(self, in_channels: int, out_channels: int) -> nn.Module:
        """The cell and classifier: ``B in_channels [feature spatial]`` → ``B out_channels [feature spatial]``."""
        return DpcHead(self.branches, in_channels, self.channels, out_channels, self.spatial_dims)

    def build(self, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        """Backbone features → cell → logits resized to the input: ``B C [spatial]`` → ``B out_channels [spatial]``.
        Keyword arguments are ignored (the backbone's width is ``backbone_channel_mul``)."""
        features, channels = backbone_features(self.backbone_architecture(), in_channels, out_channels,
                                               self.feature_depth, self.backbone_channel_mul)
        return DpcNetwork(features, self.build_head(channels, out_channels), self.spatial_dims)

    def figure(self, title: str | None = None):
        return dpc_figure(self, title) if matplotlib_available() else None
