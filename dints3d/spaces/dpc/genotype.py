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
from dataclasses import dataclass
from typing import Any, Sequence

from dints3d.utils.errors import DintsError

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


def parse_branch(data: Any, index: int, spatial_dims: int, source: str | None) -> Branch:
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
