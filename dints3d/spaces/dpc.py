"""The dense prediction cell space (DPC; Chen et al., NeurIPS 2018), dimension-generic.

A cell has B branches (B = 5 in the paper). Branch i reads the backbone's features or the output of an earlier
branch j < i and applies one operation:

- ``conv_1x1``: 1×1 convolution;
- ``sep_conv_3x3`` with rates r_h × r_w (× r_d): 3×3 atrous depthwise-separable convolution, one rate per axis;
- ``pyramid_pool`` with grid g_h × g_w (× g_d): average pooling to a g_h × g_w grid, 1×1 convolution, resize back.

The cell's output is the concatenation of all branches followed by a 1×1 convolution (then a 1×1 classifier).
The cell is searched by random search on cached backbone features (:mod:`dints3d.random_search`), not by gradient.

Rates and grids per axis. In 2D the paper's sets: r ∈ {1, 3, 6, 9, …, 21}, g ∈ {1, 2, 4, 8}, so 1 + 8² + 4² = 81
operations and B! · 81^B ≈ 4.2·10¹¹ cells for B = 5. Those sizes suit ~769² crops at output stride 8–16 (feature
maps of 49–97 pixels a side: rate 21 spans 43 pixels). A 3D patch is far smaller in feature voxels (96³ at stride 8
is 12³), so 3D uses r ∈ {1, 2, 3, 4, 6, 8} (the largest kernel spans 17 voxels, about the map) and g ∈ {1, 2, 4}
(a grid of 8 would pool 1.5 voxels), again per axis, which lets a cell pick anisotropic context (e.g. 6 × 6 × 1 for
thick slices): 1 + 6³ + 3³ = 244 operations. Both sets are configurable (``dpc.rates``, ``dpc.grids``); an
``arch.json`` stores each branch's rates or grid explicitly, so it does not depend on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from torch import nn

from dints3d.errors import DintsError
from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture, architecture_from_dict

CONV_1X1, SEP_CONV, PYRAMID_POOL = "conv_1x1", "sep_conv_3x3", "pyramid_pool"
OP_KINDS = (CONV_1X1, SEP_CONV, PYRAMID_POOL)
BACKBONE = -1  #: a branch input index meaning "the backbone's features"

DEFAULT_RATES = {2: (1, 3, 6, 9, 12, 15, 18, 21), 3: (1, 2, 3, 4, 6, 8)}
DEFAULT_GRIDS = {2: (1, 2, 4, 8), 3: (1, 2, 4)}


@dataclass(frozen=True)
class DpcOp:
    """One operation: ``kind`` and, per spatial axis, the atrous rates (``sep_conv_3x3``) or the pooling grid
    (``pyramid_pool``); ``size`` is empty for ``conv_1x1``."""

    kind: str
    size: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == CONV_1X1:
            return "1×1 conv"
        what = "sep 3×3 r" if self.kind == SEP_CONV else "pool "
        return what + "×".join(map(str, self.size))


@dataclass(frozen=True)
class Branch:
    """Branch ``i`` of a cell: ``input`` is :data:`BACKBONE` or an earlier branch's index."""

    input: int
    op: DpcOp


@dataclass(frozen=True)
class DpcCatalog:
    """The operations a search may choose from, for ``spatial_dims`` 2 or 3."""

    spatial_dims: int
    rates: tuple[int, ...]
    grids: tuple[int, ...]

    @classmethod
    def default(cls, spatial_dims: int, rates: Sequence[int] | None = None,
                grids: Sequence[int] | None = None) -> "DpcCatalog":
        if spatial_dims not in (2, 3):
            raise DintsError("spatial_dims", f"must be 2 or 3, got {spatial_dims}")
        rates = tuple(sorted(set(rates or DEFAULT_RATES[spatial_dims])))
        grids = tuple(sorted(set(grids or DEFAULT_GRIDS[spatial_dims])))
        if min(rates) < 1 or min(grids) < 1:
            raise DintsError("dpc.rates", "rates and grids must be positive integers")
        return cls(spatial_dims, rates, grids)

    @property
    def num_operations(self) -> int:
        return 1 + len(self.rates) ** self.spatial_dims + len(self.grids) ** self.spatial_dims

    def num_cells(self, num_branches: int) -> int:
        """Distinct cells: branch i has i + 1 inputs and every operation, so B! · ops^B."""
        return math.factorial(num_branches) * self.num_operations ** num_branches

    def values(self, kind: str) -> tuple[int, ...]:
        return self.rates if kind == SEP_CONV else self.grids


def _parse_branch(data: Any, index: int, spatial_dims: int, source: str | None) -> Branch:
    where = f"branches[{index}]"
    if not isinstance(data, dict):
        raise DintsError(source, f"'{where}' must be an object with 'input' and 'op'")
    inp, kind = data.get("input"), data.get("op")
    if not isinstance(inp, int) or isinstance(inp, bool) or not BACKBONE <= inp < index:
        raise DintsError(source, f"'{where}.input' must be -1 (backbone) or an earlier branch 0..{index - 1}, "
                         f"got {inp!r}")
    if kind not in OP_KINDS:
        raise DintsError(source, f"'{where}.op' must be one of {', '.join(OP_KINDS)}, got {kind!r}")
    if kind == CONV_1X1:
        return Branch(inp, DpcOp(kind))
    key = "rates" if kind == SEP_CONV else "grid"
    size = data.get(key)
    if (not isinstance(size, list) or len(size) != spatial_dims
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise DintsError(source, f"'{where}.{key}' must be {spatial_dims} positive integers, got {size!r}")
    return Branch(inp, DpcOp(kind, tuple(size)))


def branch_to_dict(branch: Branch) -> dict:
    out: dict[str, Any] = {"input": branch.input, "op": branch.op.kind}
    if branch.op.kind == SEP_CONV:
        out["rates"] = list(branch.op.size)
    elif branch.op.kind == PYRAMID_POOL:
        out["grid"] = list(branch.op.size)
    return out


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
            inner = architecture_from_dict(backbone, f"{source} (backbone)")
            if getattr(inner, "spatial_dims", spatial_dims) != spatial_dims:
                raise DintsError(source, f"the backbone is {inner.spatial_dims}-D but the cell is {spatial_dims}-D")
        return cls(
            branches=[_parse_branch(b, i, spatial_dims, source) for i, b in enumerate(branches)],
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
        return architecture_from_dict(self.backbone, "arch.json (backbone)")

    def build_head(self, in_channels: int, out_channels: int) -> nn.Module:
        """The cell and classifier: ``B in_channels [feature spatial]`` → ``B out_channels [feature spatial]``."""
        from dints3d.spaces.dpc_net import DpcHead

        return DpcHead(self.branches, in_channels, self.channels, out_channels, self.spatial_dims)

    def build(self, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        """Backbone features → cell → logits resized to the input: ``B C [spatial]`` → ``B out_channels [spatial]``.
        Keyword arguments are ignored (the backbone's width is ``backbone_channel_mul``)."""
        from dints3d.spaces.dpc_net import DpcNetwork, backbone_features

        features, channels = backbone_features(self.backbone_architecture(), in_channels, out_channels,
                                               self.feature_depth, self.backbone_channel_mul)
        return DpcNetwork(features, self.build_head(channels, out_channels), self.spatial_dims)

    def figure(self, title: str | None = None):
        from dints3d.spaces.dpc_net import dpc_figure

        return dpc_figure(self, title)
