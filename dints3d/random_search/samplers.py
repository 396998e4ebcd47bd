"""What random search samples: DPC cells, and discrete DiNTS architectures within a memory budget.

Each sampler draws uniformly from its space and perturbs an architecture by one small change, so that the engine's
"samples near the best" stay near it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.operations import CELL_OPERATIONS
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    network_options,
    random_dints_architecture,
)
from dints3d.spaces.dints.operations import operation_names
from dints3d.spaces.dints.topology import DintsTopology
from dints3d.spaces.dpc.architecture import DpcArchitecture
from dints3d.spaces.dpc.genotype import (
    BACKBONE,
    CONV_1X1,
    OP_KINDS,
    Branch,
    DpcCatalog,
    DpcOp,
)
from dints3d.spaces.factory import architecture_from_dict
from dints3d.utils.errors import DintsError

#: uniform draws (or perturbations) tried before a memory budget is declared unreachable
MAX_ATTEMPTS = 1000


class DpcSampler:
    """Cells of ``num_branches`` branches: each input uniform over the backbone and earlier branches, each operation
    uniform over the catalog's operations (so mostly separable convolutions, as in the paper's 81).

    A perturbation changes one branch: its input (⅓), a neighbouring rate or grid size on one axis (⅓, when the
    operation has one), or a new random operation."""
    name = "dpc"

    def __init__(self, catalog: DpcCatalog, num_branches: int, channels: int):
        self.catalog, self.num_branches, self.channels = catalog, num_branches, channels
        d = catalog.spatial_dims
        self.operations = [DpcOp(CONV_1X1)]
        for kind in OP_KINDS[1:]:
            self.operations += [DpcOp(kind, size) for size in itertools.product(catalog.values(kind), repeat=d)]

    def settings(self) -> dict:
        c = self.catalog
        return {"spatial_dims": c.spatial_dims, "rates": list(c.rates), "grids": list(c.grids),
                "num_branches": self.num_branches, "channels": self.channels}

    def _cell(self, branches: list[Branch]) -> DpcArchitecture:
        return DpcArchitecture(branches, self.catalog.spatial_dims, self.channels)

    def _random_op(self, rng: np.random.Generator) -> DpcOp:
        return self.operations[int(rng.integers(len(self.operations)))]

    def uniform(self, rng: np.random.Generator) -> DpcArchitecture:
        return self._cell([Branch(int(rng.integers(BACKBONE, i)), self._random_op(rng))
                           for i in range(self.num_branches)])

    def _nudge(self, op: DpcOp, rng: np.random.Generator) -> DpcOp:
        values = self.catalog.values(op.kind)
        axis = int(rng.integers(len(op.size)))
        here = values.index(op.size[axis]) if op.size[axis] in values else int(np.searchsorted(values, op.size[axis]))
        options = [i for i in (here - 1, here + 1) if 0 <= i < len(values) and values[i] != op.size[axis]]
        if not options:
            return self._random_op(rng)
        size = list(op.size)
        size[axis] = values[options[int(rng.integers(len(options)))]]
        return DpcOp(op.kind, tuple(size))

    def perturb(self, arch: DpcArchitecture, rng: np.random.Generator) -> DpcArchitecture:
        branches = list(arch.branches)
        for _ in range(MAX_ATTEMPTS):
            i = int(rng.integers(len(branches)))
            b, what = branches[i], rng.random()
            if what < 1 / 3 and i > 0:
                new = replace(b, input=int(rng.integers(BACKBONE, i)))
            elif what < 2 / 3 and b.op.size:
                new = replace(b, op=self._nudge(b.op, rng))
            else:
                new = replace(b, op=self._random_op(rng))
            if new != b:
                branches[i] = new
                return self._cell(branches)
        return self.uniform(rng)

    def key(self, arch: DpcArchitecture) -> str:
        return arch.key()

    def from_dict(self, data: dict) -> DpcArchitecture:
        arch = architecture_from_dict(data, "trials.csv")
        if not isinstance(arch, DpcArchitecture):
            raise DintsError("trials.csv", f"expected a dpc architecture, got {arch.space}")
        return arch


@dataclass
class MemoryLimit:
    """An architecture is admitted when ``measure(arch) ≤ limit``; ``what`` names the quantity for messages."""
    measure: Callable
    limit: float
    what: str


class NetworkSampler:
    """Shared by the whole-network samplers: uniform draws and perturbations are redrawn until the memory limit
    holds. Subclasses provide ``name``, ``what`` (for messages), ``_shape()`` (their settings), ``_draw(rng)``,
    ``_changed(arch, rng)`` (one small change, or None when it is not valid) and ``key(arch)``."""
    name: str
    what: str

    def __init__(self, limit: MemoryLimit | None):
        self.limit = limit
        self._measured: dict[str, float] = {}  #: architecture key → ``limit.measure``

    def settings(self) -> dict:
        limit = None if self.limit is None else {"what": self.limit.what, "limit": self.limit.limit}
        return {**self._shape(), "memory_limit": limit}

    def memory(self, arch) -> float:
        """``limit.measure(arch)``, computed once per architecture (by :meth:`key`): a memory prediction builds the
        network on the meta device, so the value the sampler admitted an architecture with is reused."""
        key = self.key(arch)
        if key not in self._measured:
            self._measured[key] = float(self.limit.measure(arch))
        return self._measured[key]

    def _admitted(self, arch) -> bool:
        return self.limit is None or self.memory(arch) <= self.limit.limit

    def uniform(self, rng: np.random.Generator):
        for _ in range(MAX_ATTEMPTS):
            arch = self._draw(rng)
            if self._admitted(arch):
                return arch
        raise DintsError("random_search", f"no random {self.what} within {self.limit.what} ≤ {self.limit.limit:g} "
                         f"in {MAX_ATTEMPTS} draws; raise the budget")

    def perturb(self, arch, rng: np.random.Generator):
        for _ in range(MAX_ATTEMPTS):
            candidate = self._changed(arch, rng)
            if candidate is not None and self._admitted(candidate):
                return candidate
        return self.uniform(rng)

    def from_dict(self, data: dict):
        return architecture_from_dict(data, "trials.csv")


class DintsSampler(NetworkSampler):
    """Connected discrete DiNTS architectures (``num_blocks`` × ``num_depths``) within a memory limit.

    Uniform: :func:`~dints3d.cost.memory.random_dints_architecture` with each active node keeping each outgoing path
    with a probability drawn per architecture from U(0.25, 1) (one fixed probability would concentrate every sample
    at one size), operations uniform. Perturbation: one of — another operation on an active path; a new path
    between nodes already active on both sides; dropping a path whose nodes stay connected."""
    name, what = "dints", "DiNTS architecture"

    def __init__(self, num_blocks: int, num_depths: int, spatial_dims: int, use_downsample: bool,
                 limit: MemoryLimit | None = None, stem_skip: bool = False,
                 stem_stride: tuple[int, ...] | None = None):
        super().__init__(limit)
        self.num_blocks, self.num_depths, self.spatial_dims = num_blocks, num_depths, spatial_dims
        self.use_downsample = use_downsample
        self.options = network_options(use_downsample, stem_skip, stem_stride)
        topo = DintsTopology(num_depths)
        self.path_in, self.path_out = topo.path_in.numpy(), topo.path_out.numpy()
        self.num_ops = len(operation_names(spatial_dims))

    def _shape(self) -> dict:
        return {"num_blocks": self.num_blocks, "num_depths": self.num_depths, "spatial_dims": self.spatial_dims,
                "use_downsample": self.use_downsample, "stem_skip": self.options["stem_skip"],
                "stem_stride": list(self.options["stem_stride"]) if self.options["stem_stride"] else None}

    def _draw(self, rng: np.random.Generator):
        arch = random_dints_architecture(self.num_blocks, self.num_depths, rng, self.spatial_dims,
                                         keep=rng.uniform(0.25, 1.0))
        arch.use_downsample, arch.provenance = self.use_downsample, {}
        arch.stem_skip, arch.stem_stride = self.options["stem_skip"], self.options["stem_stride"]
        return arch

    def _changed(self, arch, rng: np.random.Generator):
        a, c = arch.arch_code_a.copy(), arch.arch_code_c.copy()
        layer = int(rng.integers(self.num_blocks))
        active = np.flatnonzero(a[layer])
        what = rng.random()
        if what < 1 / 3:
            p = int(rng.choice(active))
            c[layer, p] = (c[layer, p] + 1 + rng.integers(self.num_ops - 1)) % self.num_ops
        elif what < 2 / 3:
            free = [p for p in np.flatnonzero(a[layer] == 0)
                    if arch.node_a[layer, self.path_in[p]] and arch.node_a[layer + 1, self.path_out[p]]]
            if not free:
                return None
            p = int(rng.choice(free))
            a[layer, p], c[layer, p] = 1, int(rng.integers(self.num_ops))
        else:
            p = int(rng.choice(active))
            a[layer, p], c[layer, p] = 0, 0
        candidate = DintsArchitecture(node_a=arch.node_a.copy(), arch_code_a=a, arch_code_c=c,
                                      spatial_dims=self.spatial_dims, use_downsample=self.use_downsample,
                                      **self.options)
        try:
            candidate.check()
        except DintsError:  # a dropped path was a node's only way in or out
            return None
        return candidate

    def key(self, arch) -> str:
        """Per layer, per path: 0 inactive, else 1 + the operation index (layers separated by '-')."""
        active = arch.arch_code_a > 0
        return "-".join("".join(str(int(v) + 1) if on else "0" for on, v in zip(layer_on, layer_ops))
                        for layer_on, layer_ops in zip(active, arch.arch_code_c))


class AutoDeepLabSampler(NetworkSampler):
    """Discrete Auto-DeepLab networks of ``num_layers`` layers and ``num_blocks``-block cells, optionally within a
    memory limit (the Auto-DeepLab search has no memory loss, so only ``search.memory_budget_gb`` applies).

    Uniform: the path starts at level 0 or 1 and each layer moves down, stays or moves up one level with equal
    probability among the moves the trellis allows; each block reads two inputs uniform over ``H^{l-2}``,
    ``H^{l-1}`` and the earlier blocks, through operations uniform over the non-zero ones. Perturbation: one layer's
    level (kept only if the path stays valid), or one block input's source or operation."""
    name, what = "autodeeplab", "Auto-DeepLab network"

    def __init__(self, num_layers: int, num_blocks: int, filter_multiplier: int, spatial_dims: int,
                 limit: MemoryLimit | None = None, num_levels: int = 4):
        super().__init__(limit)
        self.num_layers, self.num_blocks, self.num_levels = num_layers, num_blocks, num_levels
        self.filter_multiplier, self.spatial_dims = filter_multiplier, spatial_dims
        self.operations = list(CELL_OPERATIONS)

    def _shape(self) -> dict:
        return {"num_layers": self.num_layers, "num_blocks": self.num_blocks, "num_levels": self.num_levels,
                "filter_multiplier": self.filter_multiplier, "spatial_dims": self.spatial_dims}

    def _arch(self, path: list[int], cell: list[tuple[int, str]]):
        return AutoDeepLabArchitecture(network_path=path, cell=cell, filter_multiplier=self.filter_multiplier,
                                       num_levels=self.num_levels, spatial_dims=self.spatial_dims)

    def _draw(self, rng: np.random.Generator):
        path = [int(rng.integers(2))]
        for _ in range(self.num_layers - 1):
            moves = [m for m in (-1, 0, 1) if 0 <= path[-1] + m < self.num_levels]
            path.append(path[-1] + moves[int(rng.integers(len(moves)))])
        cell = [(int(rng.integers(k // 2 + 2)), self.operations[int(rng.integers(len(self.operations)))])
                for k in range(2 * self.num_blocks)]
        return self._arch(path, cell)

    def _changed(self, arch, rng: np.random.Generator):
        path, cell = list(arch.network_path), list(arch.cell)
        if rng.random() < 0.5:
            layer = int(rng.integers(len(path)))
            path[layer] += int(rng.choice([-1, 1]))
        else:
            k = int(rng.integers(len(cell)))
            source, op = cell[k]
            if rng.random() < 0.5:
                cell[k] = (int(rng.integers(k // 2 + 2)), op)
            else:
                cell[k] = (source, self.operations[int(rng.integers(len(self.operations)))])
        if (path, cell) == (list(arch.network_path), list(arch.cell)):
            return None
        candidate = self._arch(path, cell)
        try:
            candidate.check()
        except DintsError:  # the moved level jumps or leaves the trellis
            return None
        return candidate

    def key(self, arch) -> str:
        """The path's levels, then each block's two ``input:operation`` pairs."""
        return "".join(map(str, arch.network_path)) + " " + " ".join(f"{i}:{op}" for i, op in arch.cell)
