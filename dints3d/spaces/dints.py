"""The DiNTS space (Yu et al., CVPR 2021) on MONAI's ``TopologySearch`` / ``TopologyInstance`` / ``DiNTS``.

A grid of ``num_blocks`` layers × ``num_depths`` resolutions; each layer has P = 3·D − 2 paths (same / up / down
between neighbouring resolutions), each path a cell mixing 5 operations. β = ``log_alpha_a`` (L×P) weighs paths,
α = ``log_alpha_c`` (L×P×5) weighs operations. MONAI's cells and stems are used as they are; this module adds:

- a supernet forward without a host sync per block and with optional activation checkpointing of cells;
- vectorized regularizers (``dints3d.search.regularizers``) and the dynamic-programming decoder
  (``dints3d.search.decode``) instead of MONAI's loops and dense Dijkstra matrix;
- :class:`DintsArchitecture`, the ``arch.json`` form of a decoded network, which builds MONAI's own
  ``TopologyInstance`` + ``DiNTS`` (so exported bundles need MONAI alone).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiNTS, TopologyInstance, TopologySearch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dints3d.cpu_conv import route_cpu_convolutions
from dints3d.errors import DintsError
from dints3d.search import regularizers as reg
from dints3d.search.decode import decode_topology
from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture, SearchSpace
from dints3d.spaces.dints_cells import accumulate, activation, cell_forward
from dints3d.spaces.dints_topology import DintsTopology

OPERATIONS_3D = ("skip_connect", "conv_3x3x3", "conv_3x3x1", "conv_3x1x3", "conv_1x3x3")
OPERATIONS_2D = ("skip_connect", "conv_3x3")


def operation_names(spatial_dims: int) -> tuple[str, ...]:
    return OPERATIONS_3D if spatial_dims == 3 else OPERATIONS_2D


def patch_divisor(num_depths: int, use_downsample: bool) -> int:
    """Every side of an input patch must be a multiple of this (MONAI only warns; we refuse)."""
    return 2 ** (num_depths + int(use_downsample))


@contextlib.contextmanager
def _quiet():
    """MONAI's topology constructors print a timestamped hint on every build; keep our output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@dataclass
class DintsArchitecture(Architecture):
    """A decoded DiNTS network.

    Attributes:
        node_a: (L+1) × D 0/1, active feature nodes (row 0: the multi-resolution inputs).
        arch_code_a: L × P 0/1, active paths.
        arch_code_c: L × P, operation index per path (see :func:`operation_names`).
    """

    space: ClassVar[str] = "dints"

    node_a: np.ndarray
    arch_code_a: np.ndarray
    arch_code_c: np.ndarray
    spatial_dims: int = 3
    use_downsample: bool = True
    channel_mul_search: float = 0.5
    provenance: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return int(self.arch_code_a.shape[0])

    @property
    def num_depths(self) -> int:
        return int(self.node_a.shape[1])

    @property
    def num_active_paths(self) -> int:
        return int(self.arch_code_a.sum())

    def to_dict(self) -> dict:
        return {
            "space": self.space,
            "version": ARCH_FORMAT_VERSION,
            "num_blocks": self.num_blocks,
            "num_depths": self.num_depths,
            "spatial_dims": self.spatial_dims,
            "use_downsample": self.use_downsample,
            "channel_mul_search": self.channel_mul_search,
            "operations": list(operation_names(self.spatial_dims)),
            "node_a": self.node_a.astype(int).tolist(),
            "arch_code_a": self.arch_code_a.astype(int).tolist(),
            "arch_code_c": self.arch_code_c.astype(int).tolist(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "DintsArchitecture":
        def need(key: str) -> Any:
            if key not in data:
                raise DintsError(source, f"missing key '{key}' in DiNTS architecture")
            return data[key]

        def matrix(key: str) -> np.ndarray:
            value = need(key)
            try:
                arr = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                raise DintsError(source, f"'{key}' must be a matrix of numbers") from None
            if arr.ndim != 2 or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise DintsError(source, f"'{key}' must be a 2-D matrix of integers")
            return arr.astype(np.int64)

        spatial_dims = need("spatial_dims")
        if spatial_dims not in (2, 3):
            raise DintsError(source, f"'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
        use_downsample = data.get("use_downsample", True)
        if not isinstance(use_downsample, bool):
            raise DintsError(source, "'use_downsample' must be true or false")
        channel_mul = data.get("channel_mul_search", 0.5)
        if not isinstance(channel_mul, (int, float)) or isinstance(channel_mul, bool) or channel_mul <= 0:
            raise DintsError(source, "'channel_mul_search' must be a positive number")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise DintsError(source, "'provenance' must be an object")
        arch = cls(
            node_a=matrix("node_a"),
            arch_code_a=matrix("arch_code_a"),
            arch_code_c=matrix("arch_code_c"),
            spatial_dims=int(spatial_dims),
            use_downsample=use_downsample,
            channel_mul_search=float(channel_mul),
            provenance=provenance,
        )
        for key in ("num_blocks", "num_depths"):
            if key in data and data[key] != getattr(arch, key):
                raise DintsError(source, f"'{key}' is {data[key]!r} but the codes say {getattr(arch, key)}")
        arch.check(source)
        return arch

    def check(self, source: str | None = None) -> None:
        """Shapes, value ranges, and a connected topology (each layer reads exactly the previous layer's outputs)."""
        L, D = self.num_blocks, self.num_depths
        if L < 1 or D < 1:
            raise DintsError(source, "an architecture needs at least one block and one depth")
        topo = DintsTopology(D)
        P = topo.num_paths
        if self.node_a.shape != (L + 1, D):
            raise DintsError(source, f"'node_a' must be {L + 1}×{D}, got {'×'.join(map(str, self.node_a.shape))}")
        for key in ("arch_code_a", "arch_code_c"):
            if getattr(self, key).shape != (L, P):
                shape = "×".join(map(str, getattr(self, key).shape))
                raise DintsError(source, f"'{key}' must be {L}×{P} for {D} depths, got {shape}")
        if not np.isin(self.node_a, (0, 1)).all() or not np.isin(self.arch_code_a, (0, 1)).all():
            raise DintsError(source, "'node_a' and 'arch_code_a' must contain only 0 and 1")
        num_ops = len(operation_names(self.spatial_dims))
        if self.arch_code_c.min() < 0 or self.arch_code_c.max() >= num_ops:
            raise DintsError(source, f"'arch_code_c' values must be operation indices 0..{num_ops - 1}")
        path_in, path_out = topo.path_in.numpy(), topo.path_out.numpy()
        for layer in range(L):
            active = self.arch_code_a[layer] > 0
            if not active.any():
                raise DintsError(source, f"layer {layer} has no active path")
            used_in = np.zeros(D, dtype=np.int64)
            used_in[path_in[active]] = 1
            made_out = np.zeros(D, dtype=np.int64)
            made_out[path_out[active]] = 1
            if not np.array_equal(used_in, self.node_a[layer]):
                raise DintsError(source, f"layer {layer} reads nodes {used_in.tolist()} but node_a[{layer}] is "
                                 f"{self.node_a[layer].tolist()} (disconnected topology)")
            if not np.array_equal(made_out, self.node_a[layer + 1]):
                raise DintsError(source, f"layer {layer} writes nodes {made_out.tolist()} but node_a[{layer + 1}] is "
                                 f"{self.node_a[layer + 1].tolist()}")

    def figure(self, title: str | None = None):
        from dints3d.viz import dints_figure

        return dints_figure(self, title)

    def build(self, in_channels: int, out_channels: int, channel_mul: float = 1.0, **kwargs: Any) -> nn.Module:
        """MONAI ``DiNTS(TopologyInstance(...))`` for this architecture: BC[spatial] → B·out_channels·[spatial]."""
        with _quiet():
            space = TopologyInstance(
                arch_code=[self.arch_code_a.astype(np.float64), self.arch_code_c.astype(np.int64)],
                channel_mul=channel_mul,
                num_blocks=self.num_blocks,
                num_depths=self.num_depths,
                spatial_dims=self.spatial_dims,
                use_downsample=self.use_downsample,
            )
        return DiNTS(
            dints_space=space,
            in_channels=in_channels,
            num_classes=out_channels,
            spatial_dims=self.spatial_dims,
            use_downsample=self.use_downsample,
            node_a=torch.as_tensor(self.node_a),
            **kwargs,
        )


class _SupernetTopology(TopologySearch):
    """MONAI's ``TopologySearch`` with a forward that never leaves the device and can checkpoint cells."""

    def __init__(self, *args: Any, checkpoint_cells: bool = False, checkpoint_fraction: float = 1.0, **kwargs: Any):
        with _quiet():
            super().__init__(*args, **kwargs)
        self.checkpoint_cells = checkpoint_cells
        self.checkpoint_fraction = checkpoint_fraction
        # The search space keeps every path; a flat list avoids string keys and the arch_code_a read per block.
        self._cells = [[self.cell_tree[str((b, p))] for p in range(len(self.arch_code2out))] for b in range(self.num_blocks)]

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """x: ``num_depths`` tensors ``B C_d [spatial/2^d]`` → the same list after ``num_blocks`` mixed layers.

        Each cell runs :func:`~dints3d.spaces.dints_cells.cell_forward` with its scales η·softmax(α) (no host sync);
        without checkpointing, ``relu`` of each node is computed once and shared by the cells reading it. With
        ``checkpoint_cells`` the cells of the first ``round(checkpoint_fraction · num_blocks)`` blocks are
        recomputed in backward (each cell saves only its input): memory falls and time grows with the fraction."""
        eta = reg.path_probabilities(self.log_alpha_a)
        scales = F.softmax(self.log_alpha_c, dim=-1) * eta.unsqueeze(-1)  # L × P × K
        checkpointed = round(self.checkpoint_fraction * self.num_blocks) if self.checkpoint_cells else 0
        inputs = x
        for b, cells in enumerate(self._cells):
            checkpointing = b < checkpointed and torch.is_grad_enabled()
            relus = [None if checkpointing else activation(t) for t in inputs]
            outputs: list[torch.Tensor | None] = [None] * self.num_depths
            for p, cell in enumerate(cells):
                i, o = self.arch_code2in[p], self.arch_code2out[p]
                if checkpointing:
                    y = checkpoint(cell_forward, cell, inputs[i], None, scales[b, p], use_reentrant=False)
                else:
                    y = cell_forward(cell, inputs[i], relus[i], scales[b, p])
                outputs[o] = y if outputs[o] is None else accumulate(outputs[o], y)
            inputs = outputs  # type: ignore[assignment]
        return inputs


class DintsSearchSpace(SearchSpace):
    """The DiNTS supernet: ``B C [spatial]`` → ``B num_classes [spatial]`` logits.

    Args:
        in_channels, num_classes: image channels and output classes (incl. background).
        num_blocks, num_depths, channel_mul, use_downsample, spatial_dims: the grid (see MONAI ``TopologySearch``).
        ram_cost_factor: σ, the target of M/M_full in the memory loss.
        entropy_weight, memory_weight, topology_weight: relative weights of the regularizers (docs/search.md).
        checkpoint_cells: recompute cell activations in backward to save memory.
        checkpoint_fraction: with ``checkpoint_cells``, the fraction of blocks (the first ones) checkpointed.
        cpu_conv_routing: run batch-1 CPU fp32 convolutions through oneDNN where PyTorch would pick its slower
            ``slow_conv3d`` (:mod:`dints3d.cpu_conv`; no effect on CUDA or under autocast).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_blocks: int = 12,
        num_depths: int = 4,
        channel_mul: float = 0.5,
        use_downsample: bool = True,
        spatial_dims: int = 3,
        ram_cost_factor: float = 0.8,
        entropy_weight: float = 1.0,
        memory_weight: float = 1.0,
        topology_weight: float = 0.001,
        checkpoint_cells: bool = False,
        checkpoint_fraction: float = 1.0,
        cpu_conv_routing: bool = True,
    ):
        super().__init__()
        self.topology_space = _SupernetTopology(
            channel_mul=channel_mul,
            num_blocks=num_blocks,
            num_depths=num_depths,
            spatial_dims=spatial_dims,
            use_downsample=use_downsample,
            checkpoint_cells=checkpoint_cells,
            checkpoint_fraction=checkpoint_fraction,
        )
        self.net = DiNTS(
            dints_space=self.topology_space,
            in_channels=in_channels,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
            use_downsample=use_downsample,
        )
        if cpu_conv_routing and spatial_dims == 3:
            route_cpu_convolutions(self.net)
        self.hparams = dict(num_blocks=num_blocks, num_depths=num_depths, channel_mul=channel_mul,
                            use_downsample=use_downsample, spatial_dims=spatial_dims,
                            cpu_conv_routing=cpu_conv_routing)
        self.ram_cost_factor = ram_cost_factor
        self.entropy_weight, self.memory_weight, self.topology_weight = entropy_weight, memory_weight, topology_weight
        self.topology = DintsTopology(num_depths)
        self.register_buffer("ram_cost", torch.as_tensor(self.topology_space.ram_cost, dtype=torch.float32), persistent=False)
        self.register_buffer("patterns", self.topology.patterns.float(), persistent=False)
        self._sizes: dict[tuple[int, ...], torch.Tensor] = {}
        self.patch_divisor = patch_divisor(num_depths, use_downsample)

    @property
    def log_alpha_a(self) -> nn.Parameter:
        """β: path logits, L × P."""
        return self.topology_space.log_alpha_a

    @property
    def log_alpha_c(self) -> nn.Parameter:
        """α: operation logits, L × P × K."""
        return self.topology_space.log_alpha_c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"alpha": [self.log_alpha_c], "beta": [self.log_alpha_a]}

    def _path_sizes(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """Output feature size of each path (P,) for a ``BC[spatial]`` input, cached per shape."""
        key = tuple(int(s) for s in input_shape)
        device = self.log_alpha_a.device
        cached = self._sizes.get(key)
        if cached is None or cached.device != device:
            sizes = reg.feature_sizes(key, self.topology_space.filter_nums, self.hparams["num_depths"],
                                      self.hparams["spatial_dims"], self.hparams["use_downsample"])
            cached = sizes.to(device)[self.topology.path_out.to(device)]
            self._sizes[key] = cached
        return cached

    def _topology_on(self, device: torch.device) -> DintsTopology:
        """The pattern tables on ``device`` (moved once, then cached)."""
        if self.topology.device != device:
            self.topology = self.topology.to(device)
        return self.topology

    def memory_ratio(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """M / M_full (scalar tensor), the estimated memory of the current soft architecture relative to all paths."""
        sizes = self._path_sizes(input_shape)
        return reg.memory_ratio(self.log_alpha_a, self.log_alpha_c, self.ram_cost, sizes)

    def discrete_memory_ratio(self, arch: DintsArchitecture, input_shape: tuple[int, ...]) -> float:
        """Estimated memory of a decoded architecture relative to the full supernet with uniform operation weights,
        both in MONAI's activation-size units: Σ a_lp (1 + cost_lp[c_lp]) size_p / Σ (1 + mean_k cost_lpk) size_p."""
        sizes = self._path_sizes(input_shape).double().cpu()
        cost = self.ram_cost.double().cpu()
        active = torch.as_tensor(arch.arch_code_a, dtype=torch.float64)
        chosen = cost.gather(-1, torch.as_tensor(arch.arch_code_c, dtype=torch.int64).unsqueeze(-1)).squeeze(-1)
        used = (active * (1 + chosen) * sizes).sum()
        full = ((1 + cost.mean(-1)) * sizes).sum()
        return float(used / full)

    def regularizers(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        probs = reg.pattern_probabilities(self.log_alpha_a, self.patterns)
        entropy = reg.path_entropy(probs) + reg.op_entropy(self.log_alpha_c)
        memory = (self.memory_ratio(input_shape) - self.ram_cost_factor).abs()
        topology = reg.topology_loss(probs, self._topology_on(probs.device))
        return {
            "entropy": self.entropy_weight * entropy,
            "memory": self.memory_weight * memory,
            "topology": self.topology_weight * topology,
        }

    @torch.no_grad()
    def log_scalars(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {"arch/memory_ratio": self.memory_ratio(input_shape), "arch/eta": reg.path_probabilities(self.log_alpha_a)}

    @torch.no_grad()
    def architecture_facts(self, arch: Architecture, input_shape: tuple[int, ...]) -> dict[str, float]:
        return {"estimated_memory_ratio": self.discrete_memory_ratio(arch, input_shape),
                "soft_memory_ratio": float(self.memory_ratio(input_shape)),
                "ram_cost_factor": self.ram_cost_factor}

    @torch.no_grad()
    def decode(self) -> tuple[DintsArchitecture, dict]:
        result = decode_topology(self.log_alpha_a.detach(), self.log_alpha_c.detach(), self.topology)
        arch = DintsArchitecture(
            node_a=result.node_a,
            arch_code_a=result.arch_code_a,
            arch_code_c=result.arch_code_c,
            spatial_dims=self.hparams["spatial_dims"],
            use_downsample=self.hparams["use_downsample"],
            channel_mul_search=self.hparams["channel_mul"],
        )
        info = {
            "decode_cost": float(result.cost),
            "active_paths": int(result.arch_code_a.sum()),
            # the per-layer most probable patterns, ignoring feasibility (arch_code_c is already unconstrained),
            # and whether they form a connected chain: the discretization gap the topology loss should close
            "argmax_arch_code_a": result.arch_code_a_max.tolist(),
            "argmax_connected": bool(result.unconstrained_connected),
        }
        return arch, info
