"""The Auto-DeepLab supernet (Liu et al., CVPR 2019): a cell searched jointly with its network-level path.

Network level: after a stem to stride 4 (layer 0), an L-layer trellis over levels j = 0..D-1 (strides 4·2^j). Node
(l, j) exists when j ≤ l; it is one cell whose blocks have C_j = F·2^j channels and whose output concatenates its B
blocks (B·C_j channels). β (L × D × 3) holds, for each node (l, j) of layers 0..L-1, the logits of its OUTGOING
transitions down / same / up (to level j+1, j, j-1 of layer l+1); they are normalised by a softmax over the node's
valid transitions only (the invalid ones are masked to −∞ before the softmax), so β reads as transition
probabilities and Viterbi decodes the path (:mod:`dints3d.spaces.autodeeplab.decode`).

A node projects H^{l-1} from each source by its transition — ``down``: ReLU → stride-2 3^dims conv → BN, ``same``:
ReLU → 1^dims conv → BN, ``up``: bilinear ×2 then the same 1^dims conv — and H^{l-2} (layer l-2 at the same level if
that node exists, else the coarsest node of layer l-2, the stem's stride-2 features for l = 1) by resizing and a
1^dims conv. Then, with p = transition probability:

- ``per_transition`` (the paper's Eq. 6): H^l_j = Σ_sources p · Cell(H^{l-2}, proj(H^{l-1}_source)), the node's cell
  (one set of weights) run once per incoming transition;
- ``mixed_input``: H^l_j = Cell(H^{l-2}, Σ_sources p · proj(H^{l-1}_source)), one cell run per node (cheaper; not the
  paper's relaxation — the cell is not linear in its input).

Cell level: one α (E × 8, E = B(B+3)/2 edges) shared by every cell; each edge is a softmax-weighted mix of the eight
operations (``zero`` contributes nothing and is not computed). Search heads: on each node of the last layer a 3-branch
ASPP (1^dims conv, one 3^dims conv at rate 96/s, image pooling; B·C_j filters each) and a 1^dims classifier; the
logits are resized to the input and summed.
"""


from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn
from torch.utils.checkpoint import checkpoint

from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.decode import (
    STEPS,
    TRANSITIONS,
    decode_cell,
    edge_offset,
    num_edges,
    transition_log_probs,
    valid_transitions,
    viterbi,
)
from dints3d.spaces.autodeeplab.network import ASPP, STEM_CHANNELS, Stem
from dints3d.spaces.autodeeplab.operations import (
    CELL_OPERATIONS,
    OPERATIONS,
    ZERO,
    ResizedProjection,
    level_sizes,
    resize,
    search_operation,
    transition,
)
from dints3d.spaces.base import Architecture, SearchSpace

SUPERNETS = ("per_transition", "mixed_input")


def search_head_rate(level: int) -> int:
    """The search heads' atrous rate 96/s at stride s = 4·2^level (24, 12, 6, 3)."""
    return max(1, 96 // (4 * 2**level))


# ---------------------------------------------------------------------------------------------------- supernet
class MixedOp(nn.Module):
    """Σ_k w_k · op_k(x) over the seven non-``zero`` operations: ``B C [spatial]`` → ``B C [spatial]``."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        self.ops = nn.ModuleList(search_operation(name, channels, spatial_dims) for name in CELL_OPERATIONS)
        self.weight_index = [k for k in range(len(OPERATIONS)) if k != ZERO]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights: (8,) in OPERATIONS order (``zero``'s output is 0, so its weight only dilutes the others)."""
        return sum(weights[k] * op(x) for k, op in zip(self.weight_index, self.ops))


class SearchCell(nn.Module):
    """The cell DAG with a mixed op on every edge: ``B C [n]`` ×2 (H^{l-2}, H^{l-1}, both projected) →
    ``B (num_blocks·C) [n]``."""

    def __init__(self, channels: int, num_blocks: int, spatial_dims: int):
        super().__init__()
        self.num_blocks = num_blocks
        self.edges = nn.ModuleList(MixedOp(channels, spatial_dims) for _ in range(num_edges(num_blocks)))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights: (num_edges, 8) softmax of α."""
        states = [s0, s1]
        for block in range(self.num_blocks):
            start = edge_offset(block)
            states.append(sum(self.edges[start + i](h, weights[start + i]) for i, h in enumerate(states)))
        return torch.cat(states[2:], dim=1)


class SearchNode(nn.Module):
    """Node (layer, level) of the trellis: its H^{l-2} projection, one projection per incoming transition, its cell.

    Args:
        sources: the level of H^{l-1} for each incoming transition (``transitions`` follows the same order).
        source_channels: channels of H^{l-1} at each source; prev_prev_channels: of the H^{l-2} it reads.
    """

    def __init__(self, level: int, sources: Sequence[int], source_channels: Sequence[int], prev_prev_channels: int,
                 filter_multiplier: int, num_blocks: int, spatial_dims: int):
        super().__init__()
        self.level = level
        channels = filter_multiplier * 2**level
        self.sources = list(sources)
        self.prev_prev = ResizedProjection(prev_prev_channels, channels, spatial_dims, affine=False)
        self.transitions = nn.ModuleList(transition(level - src, c_in, channels, spatial_dims, affine=False)
                                         for src, c_in in zip(sources, source_channels))
        self.cell = SearchCell(channels, num_blocks, spatial_dims)


class AutoDeepLabSearchSpace(SearchSpace):
    """The Auto-DeepLab supernet: ``B in_channels [spatial]`` → ``B num_classes [spatial]`` logits.

    Args:
        in_channels, num_classes: image channels and classes.
        num_layers: L (12 in the paper); num_blocks: B (5); filter_multiplier: F (8 during the search);
        num_levels: D resolutions from stride 4 (4: strides 4–32); spatial_dims: 2 or 3.
        supernet: ``"per_transition"`` (the paper: one cell run per incoming transition) or ``"mixed_input"``.
        checkpoint_cells: recompute cell activations in backward to save memory.
    """

    #: any input size works: every level's size is ceil of half the finer one's
    patch_divisor = 1

    def __init__(self, in_channels: int, num_classes: int, num_layers: int = 12, num_blocks: int = 5,
                 filter_multiplier: int = 8, num_levels: int = 4, spatial_dims: int = 2,
                 supernet: str = "per_transition", checkpoint_cells: bool = False):
        super().__init__()
        if supernet not in SUPERNETS:
            raise ValueError(f"supernet must be one of {SUPERNETS}, got {supernet!r}")
        self.hparams = dict(num_layers=num_layers, num_blocks=num_blocks, filter_multiplier=filter_multiplier,
                            num_levels=num_levels, spatial_dims=spatial_dims, supernet=supernet)
        self.num_layers, self.num_blocks, self.num_levels = num_layers, num_blocks, num_levels
        self.filter_multiplier, self.spatial_dims, self.supernet = filter_multiplier, spatial_dims, supernet
        self.checkpoint_cells = checkpoint_cells
        self.stem = Stem(in_channels, spatial_dims)
        self.register_buffer("valid", valid_transitions(num_layers, num_levels), persistent=False)
        self.nodes = nn.ModuleList(self._layer_nodes(layer) for layer in range(1, num_layers + 1))
        last = self.levels(num_layers)
        self.heads = nn.ModuleList(
            nn.Sequential(ASPP(self.node_channels(j), self.node_channels(j), (search_head_rate(j),), spatial_dims),
                          Conv[Conv.CONV, spatial_dims](self.node_channels(j), num_classes, 1))
            for j in last)
        self.alpha = nn.Parameter(1e-3 * torch.randn(num_edges(num_blocks), len(OPERATIONS)))
        self.beta = nn.Parameter(1e-3 * torch.randn(num_layers, num_levels, len(TRANSITIONS)))

    # ------------------------------------------------------------------------------------------------ shape
    def levels(self, layer: int) -> list[int]:
        """Levels of the nodes of ``layer`` (layer 0: the stem's stride-4 output)."""
        return list(range(min(layer, self.num_levels - 1) + 1))

    def node_channels(self, level: int) -> int:
        return self.num_blocks * self.filter_multiplier * 2**level

    def _state_channels(self, layer: int, level: int) -> int:
        """Channels of H^layer at ``level`` (layer -1: the stem's stride-2 output, layer 0: its stride-4 output)."""
        return STEM_CHANNELS[layer + 2] if layer <= 0 else self.node_channels(level)

    def prev_prev_level(self, layer: int, level: int) -> int:
        """Which node of layer ``layer - 2`` a node of ``layer`` reads as H^{l-2}: the same level if it exists, else
        the coarsest (the stem's single node for layers 1 and 2)."""
        return min(level, max(0, layer - 2))

    def incoming(self, layer: int, level: int) -> list[int]:
        """Source levels (of layer - 1) of the valid transitions into node (layer, level), in TRANSITIONS order."""
        return [level - step for t, step in enumerate(STEPS)
                if 0 <= level - step < self.num_levels and bool(self.valid[layer - 1, level - step, t])]

    def _layer_nodes(self, layer: int) -> nn.ModuleList:
        nodes = []
        for level in self.levels(layer):
            sources = self.incoming(layer, level)
            pp = self._state_channels(layer - 2, self.prev_prev_level(layer, level))
            nodes.append(SearchNode(level, sources, [self._state_channels(layer - 1, s) for s in sources], pp,
                                    self.filter_multiplier, self.num_blocks, self.spatial_dims))
        return nn.ModuleList(nodes)

    # ------------------------------------------------------------------------------------------ relaxation
    def transition_log_probs(self) -> torch.Tensor:
        """(L, D, 3) log-probabilities of each node's outgoing transitions (masked log-softmax of β)."""
        return transition_log_probs(self.beta, self.valid)

    def transition_probs(self) -> torch.Tensor:
        """(L, D, 3) transition probabilities: each reachable node's valid transitions sum to 1, invalid ones are 0."""
        return self.transition_log_probs().exp()

    def op_weights(self) -> torch.Tensor:
        """(E, 8) softmax of α."""
        return F.softmax(self.alpha, dim=-1)

    # ---------------------------------------------------------------------------------------------- forward
    def _cell(self, node: SearchNode, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_cells and torch.is_grad_enabled():
            return checkpoint(node.cell, s0, s1, weights, use_reentrant=False)
        return node.cell(s0, s1, weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B C [spatial]`` → ``B num_classes [spatial]``."""
        half, quarter = self.stem(x)
        sizes = level_sizes(quarter.shape[2:], self.num_levels)
        probs = self.transition_probs()
        weights = self.op_weights()
        before, previous = {0: half}, {0: quarter}  # H^{l-2}, H^{l-1} by level
        for layer, nodes in enumerate(self.nodes, start=1):
            current = {}
            for node in nodes:
                j = node.level
                s0 = node.prev_prev(before[self.prev_prev_level(layer, j)], sizes[j])
                inputs = [(probs[layer - 1, src, STEPS.index(j - src)], proj(previous[src], sizes[j]))
                          for src, proj in zip(node.sources, node.transitions)]
                if self.supernet == "per_transition":
                    current[j] = sum(p * self._cell(node, s0, s1, weights) for p, s1 in inputs)
                else:
                    current[j] = self._cell(node, s0, sum(p * s1 for p, s1 in inputs), weights)
            before, previous = previous, current
        return sum(resize(head(F.relu(previous[j])), x.shape[2:]) for j, head in enumerate(self.heads))

    # ----------------------------------------------------------------------------------------- the protocol
    def arch_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"alpha": [self.alpha], "beta": [self.beta]}

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def regularizers(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """None: the paper's architecture loss is the segmentation loss alone."""
        return {}

    @torch.no_grad()
    def log_scalars(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        probs = self.transition_probs()
        weights = self.op_weights()
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        return {"arch/beta_probabilities": probs[self.valid], "arch/alpha_weights": weights.flatten(),
                "arch/alpha_entropy": entropy, "arch/path_log_probability": torch.tensor(self._path()[1])}

    def _path(self) -> tuple[list[int], float]:
        return viterbi(self.transition_log_probs().detach())

    @torch.no_grad()
    def architecture_facts(self, arch: Architecture, input_shape: tuple[int, ...]) -> dict[str, float]:
        assert isinstance(arch, AutoDeepLabArchitecture)
        log_probs = self.transition_log_probs().double().cpu()
        steps, levels = [], [0, *arch.network_path]
        for layer in range(arch.num_layers):
            steps.append(float(log_probs[layer, levels[layer], STEPS.index(levels[layer + 1] - levels[layer])]))
        return {"path_log_probability": sum(steps), "final_stride": float(arch.strides[-1])}

    @torch.no_grad()
    def decode(self, input_shape: tuple[int, ...] | None = None) -> tuple[AutoDeepLabArchitecture, dict]:
        path, log_prob = self._path()
        cell = decode_cell(self.alpha, self.num_blocks)
        arch = AutoDeepLabArchitecture(network_path=path, cell=cell, filter_multiplier=self.filter_multiplier,
                                       num_levels=self.num_levels, spatial_dims=self.spatial_dims)
        greedy = _greedy_path(self.transition_probs().cpu())
        info = {"path_log_probability": log_prob, "final_stride": 4 * 2 ** path[-1],
                "greedy_path_agrees": greedy == path}
        return arch, info


def _greedy_path(probs: torch.Tensor) -> list[int]:
    """Following each node's most probable outgoing transition from the stem (for comparison with Viterbi)."""
    level, path = 0, []
    for layer in range(probs.shape[0]):
        level += STEPS[int(probs[layer, level].argmax())]
        path.append(level)
    return path
