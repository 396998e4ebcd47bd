"""The DiNTS supernet on MONAI's ``TopologySearch`` / ``DiNTS``: every path of the L × D grid, weighted by the
relaxation (:mod:`~dints3d.spaces.dints.relaxation`), with the regularizers of the search loss and the decoder.

A grid of ``num_blocks`` layers × ``num_depths`` resolutions; each layer has P = 3·D − 2 paths (same / up / down
between neighbouring resolutions), each path a cell mixing 5 operations. β = ``log_alpha_a`` (L×P) weighs paths,
α = ``log_alpha_c`` (L×P×5) weighs operations. MONAI's cells and stems are used as they are; this module adds a
forward without a host sync per block (:mod:`~dints3d.spaces.dints.cells`), optional activation checkpointing of
cells and oneDNN routing of CPU convolutions (:mod:`~dints3d.spaces.dints.cpu_conv`); the regularizers
(:mod:`~dints3d.spaces.dints.regularizers`) and the dynamic-programming decoder
(:mod:`~dints3d.spaces.dints.decode`) replace MONAI's loops and dense Dijkstra matrix.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiNTS, TopologySearch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dints3d.spaces.base import Architecture, SearchSpace
from dints3d.spaces.dints import regularizers as reg
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    network_options,
    quiet_monai,
    stem_skip_network,
)
from dints3d.spaces.dints.cells import accumulate, activation, cell_forward
from dints3d.spaces.dints.cpu_conv import route_cpu_convolutions
from dints3d.spaces.dints.decode import decode_topology, decode_within_budget
from dints3d.spaces.dints.relaxation import path_probabilities, pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology, patch_divisor
from dints3d.utils.errors import DintsError


class _SupernetTopology(TopologySearch):
    """MONAI's ``TopologySearch`` with a forward that never leaves the device and can checkpoint cells."""

    def __init__(self, *args: Any, checkpoint_cells: bool = False, checkpoint_fraction: float = 1.0, **kwargs: Any):
        with quiet_monai():
            super().__init__(*args, **kwargs)
        self.checkpoint_cells = checkpoint_cells
        self.checkpoint_fraction = checkpoint_fraction
        #: what runs a checkpointed cell (``torch.utils.checkpoint.checkpoint``); the memory model swaps in a recorder
        self.checkpoint_fn = checkpoint
        # The search space keeps every path; a flat list avoids string keys and the arch_code_a read per block.
        self._cells = [[self.cell_tree[str((b, p))] for p in range(len(self.arch_code2out))] for b in range(self.num_blocks)]

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """x: ``num_depths`` tensors ``B C_d [spatial/2^d]`` → the same list after ``num_blocks`` mixed layers.

        Each cell runs :func:`~dints3d.spaces.dints.cells.cell_forward` with its scales η·softmax(α) (no host sync);
        without checkpointing, ``relu`` of each node is computed once and shared by the cells reading it. With
        ``checkpoint_cells`` the cells of the first ``round(checkpoint_fraction · num_blocks)`` blocks are
        recomputed in backward (each cell saves only its input): memory falls and time grows with the fraction."""
        eta = path_probabilities(self.log_alpha_a)
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
                    y = self.checkpoint_fn(cell_forward, cell, inputs[i], None, scales[b, p], use_reentrant=False)
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
        stem_skip: add the stride-2 stem's full-resolution features to the output
            (:func:`~dints3d.spaces.dints.architecture.stem_skip_network`); decoded networks keep it. Ignored without
            ``use_downsample`` (no stride-2 stem: the cells already run at full resolution).
        stem_stride: with ``stem_skip``, the stems' stride per axis for anisotropic voxels
            (:func:`~dints3d.spaces.dints.architecture.stem_stride_for_spacing`); decoded networks keep it.
        hard_budget: decode the best topology whose memory ratio is at most σ (the soft penalty alone lets the
            decoded network land above it).
        cpu_conv_routing: run batch-1 CPU fp32 convolutions through oneDNN where PyTorch would pick its slower
            ``slow_conv3d`` (:mod:`dints3d.spaces.dints.cpu_conv`; no effect on CUDA or under autocast).
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
        hard_budget: bool = True,
        stem_skip: bool = True,
        stem_stride: Sequence[int] | None = None,
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
        options = network_options(use_downsample, stem_skip, stem_stride)
        stem_skip, stem_stride = options["stem_skip"], options["stem_stride"]
        self.net = (stem_skip_network() if stem_skip else DiNTS)(
            **({"stem_stride": stem_stride} if stem_stride else {}),
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
                            cpu_conv_routing=cpu_conv_routing, **options)
        self.ram_cost_factor = ram_cost_factor
        self.hard_budget = hard_budget
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

    def pattern_memory(self, input_shape: tuple[int, ...]) -> np.ndarray:
        """(L, N) float64: each path pattern's share of :meth:`discrete_memory_ratio` at each layer, with every path's
        operation the argmax of α (as decoded), so an architecture's ratio is the sum of its patterns' entries."""
        sizes = self._path_sizes(input_shape).double().cpu()
        cost = self.ram_cost.double().cpu()
        ops = self.log_alpha_c.detach().argmax(-1).cpu().unsqueeze(-1)
        per_path = (1 + cost.gather(-1, ops).squeeze(-1)) * sizes  # (L, P)
        full = ((1 + cost.mean(-1)) * sizes).sum()
        return (per_path @ self.topology.patterns.cpu().double().T / full).numpy()

    def regularizers(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        probs = pattern_probabilities(self.log_alpha_a, self.patterns)
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
        return {"arch/memory_ratio": self.memory_ratio(input_shape), "arch/eta": path_probabilities(self.log_alpha_a)}

    @torch.no_grad()
    def architecture_facts(self, arch: Architecture, input_shape: tuple[int, ...]) -> dict[str, float]:
        return {"estimated_memory_ratio": self.discrete_memory_ratio(arch, input_shape),
                "soft_memory_ratio": float(self.memory_ratio(input_shape)),
                "ram_cost_factor": self.ram_cost_factor}

    @torch.no_grad()
    def decode(self, input_shape: tuple[int, ...] | None = None) -> tuple[DintsArchitecture, dict]:
        """The cheapest connected topology; with ``hard_budget`` (and an ``input_shape`` for the feature sizes), the
        cheapest whose memory ratio stays ≤ σ (:func:`~dints3d.spaces.dints.decode.decode_within_budget`)."""
        alpha_a, alpha_c = self.log_alpha_a.detach(), self.log_alpha_c.detach()
        if self.hard_budget and input_shape is not None:
            result = decode_within_budget(alpha_a, alpha_c, self.topology, self.pattern_memory(input_shape),
                                          self.ram_cost_factor)
            if result is None:
                smallest = self.pattern_memory(input_shape).min(-1).sum()
                raise DintsError("search.ram_cost_factor", f"no connected topology fits σ = {self.ram_cost_factor:g} "
                                 f"of the supernet's memory (the smallest needs about {smallest:.3f}); raise it, or "
                                 "set search.hard_budget=false to decode without the budget")
        else:
            result = decode_topology(alpha_a, alpha_c, self.topology)
        arch = DintsArchitecture(
            node_a=result.node_a,
            arch_code_a=result.arch_code_a,
            arch_code_c=result.arch_code_c,
            spatial_dims=self.hparams["spatial_dims"],
            use_downsample=self.hparams["use_downsample"],
            stem_skip=self.hparams["stem_skip"],
            stem_stride=self.hparams["stem_stride"],
            channel_mul_search=self.hparams["channel_mul"],
        )
        info = {
            "decode_cost": float(result.cost),
            "active_paths": int(result.arch_code_a.sum()),
            # the per-layer most probable patterns, ignoring feasibility (arch_code_c is already unconstrained),
            # and whether they form a connected chain: the discretization gap the topology loss should close
            "argmax_arch_code_a": result.arch_code_a_max.tolist(),
            "argmax_connected": bool(result.unconstrained_connected),
            "hard_budget": bool(self.hard_budget and input_shape is not None),
        }
        return arch, info
