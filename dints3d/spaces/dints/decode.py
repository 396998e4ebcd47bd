"""Topology-guaranteed DiNTS decoding: the cheapest feasible chain of path patterns, by dynamic programming.

MONAI's ``TopologySearch.decode`` finds the same chain with Dijkstra on a dense (1 + N·L + 1)² matrix (N = 2^P − 1
patterns per layer). Layer l's pattern c may follow layer l−1's pattern c′ iff c′'s output node set equals c's input
node set, so the best chain ending in node set s after layer l only depends on s: the DP state is the node set,
O(L·N) time and memory.

Costs (as in MONAI): picking pattern c at layer l costs −log(P_l(c) + 1e-5) + 0.001, reaching the sink 0.001.
Shapes: L layers, D resolutions, P = 3D − 2 paths, K cell ops, N patterns, S = 2^D − 1 node sets.

Hard memory budget (:func:`decode_within_budget`): the memory of a chain is a sum over its layers of its patterns'
memory (each active path's cell, :meth:`~dints3d.spaces.dints.supernet.DintsSearchSpace.pattern_memory`), so the
cheapest chain under a budget is a resource-constrained DP over (node set, memory used) with memory discretised in
``bins`` steps of budget / bins. Each pattern's memory is rounded *up* to whole steps, so a chain the DP admits never
exceeds the budget; the price is that chains within L steps of the budget may be missed (the optimality gap is that
of the best chain with at most budget − L·step memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dints3d.spaces.dints.relaxation import LOG_EPS, pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology, binary_index

# MONAI adds it to every edge so that no edge weight is zero (a zero would vanish from its sparse graph).
EDGE_COST = 0.001


@dataclass(frozen=True)
class DecodedTopology:
    """A decoded DiNTS architecture (int64 arrays, 0/1 unless stated).

    Attributes:
        node_a: (L+1, D) active nodes: row 0 the first layer's input nodes, row l+1 layer l's output nodes.
        arch_code_a: (L, P) active paths of the cheapest feasible chain.
        arch_code_c: (L, P) op index per path, argmax of softmax(log_alpha_c).
        arch_code_a_max: (L, P) each layer's most probable pattern, ignoring feasibility.
        cost: total cost of ``arch_code_a`` including the sink edge (MONAI's Dijkstra distance to the sink).
        unconstrained_connected: whether ``arch_code_a_max`` is itself a feasible chain; False means the
            per-layer argmax is disconnected (the discretization gap).
        num_active_paths: number of ones in ``arch_code_a``.
    """

    node_a: np.ndarray
    arch_code_a: np.ndarray
    arch_code_c: np.ndarray
    arch_code_a_max: np.ndarray
    cost: float
    unconstrained_connected: bool
    num_active_paths: int


def _pattern_costs(pattern_probs) -> np.ndarray:
    """(L, N) probabilities → (L, N) float64 per-layer pattern costs."""
    probs = pattern_probs.detach().cpu().numpy() if torch.is_tensor(pattern_probs) else np.asarray(pattern_probs)
    return -np.log(probs.astype(np.float64) + LOG_EPS) + EDGE_COST


def path_cost(arch_code_a, pattern_probs) -> float:
    """Cost of a chain of patterns including the sink edge; feasibility is not checked.

    Args:
        arch_code_a: (L, P) 0/1, no all-zero row.
        pattern_probs: (L, N) tensor or array, in MONAI ``child_list`` order.
    Returns:
        Σ_l [−log(P_l(c_l) + 1e-5) + 0.001] + 0.001.
    """
    costs = _pattern_costs(pattern_probs)
    chosen = binary_index(np.asarray(arch_code_a))
    return float(costs[np.arange(len(chosen)), chosen].sum() + EDGE_COST)


def chain_is_feasible(arch_code_a, topology: DintsTopology) -> bool:
    """Whether every layer has a path and each layer's output node set is the next layer's input node set.

    Args:
        arch_code_a: (L, P) 0/1.
        topology: tables for the same D.
    """
    chosen = binary_index(np.asarray(arch_code_a))
    if (chosen < 0).any():
        return False
    in_set = topology.pattern_in_set.cpu().numpy()
    out_set = topology.pattern_out_set.cpu().numpy()
    return bool((out_set[chosen[:-1]] == in_set[chosen[1:]]).all())


class _SetMinimum:
    """Per-node-set minimum over patterns, O(N): patterns are grouped once by output node set."""

    def __init__(self, out_set: np.ndarray):
        self.order = np.argsort(out_set, kind="stable")
        self.sorted_sets = out_set[self.order]
        # Every node set is the output set of at least its same-resolution paths, so no group is empty.
        self.starts = np.flatnonzero(np.r_[True, np.diff(self.sorted_sets) != 0])

    def __call__(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) values → ((S,) minimum per output set, (S,) lowest-indexed pattern attaining it)."""
        ordered = values[self.order]
        minima = np.minimum.reduceat(ordered, self.starts)
        hits = np.flatnonzero(ordered == minima[self.sorted_sets])
        first = hits[np.r_[True, np.diff(self.sorted_sets[hits]) != 0]]
        return minima, self.order[first]


def _decoded(chosen: np.ndarray, total: float, probs: np.ndarray, log_alpha_c: torch.Tensor,
             topology: DintsTopology) -> DecodedTopology:
    """The architecture of a chain of pattern indices (L,)."""
    patterns = topology.patterns.cpu().numpy().astype(np.int64)
    node_sets = topology.node_sets.cpu().numpy()
    in_set = topology.pattern_in_set.cpu().numpy()
    out_set = topology.pattern_out_set.cpu().numpy()
    arch_code_a = patterns[chosen]
    node_a = np.concatenate([node_sets[in_set[chosen[:1]]], node_sets[out_set[chosen]]]).astype(np.int64)
    arch_code_a_max = patterns[np.argmax(probs, axis=-1)]
    # softmax is monotone, so the argmax of the logits is the argmax of the op probabilities.
    arch_code_c = log_alpha_c.detach().cpu().argmax(-1).numpy().astype(np.int64)
    return DecodedTopology(
        node_a=node_a,
        arch_code_a=arch_code_a,
        arch_code_c=arch_code_c,
        arch_code_a_max=arch_code_a_max,
        cost=total,
        unconstrained_connected=chain_is_feasible(arch_code_a_max, topology),
        num_active_paths=int(arch_code_a.sum()),
    )


def _check_shapes(log_alpha_a: torch.Tensor, log_alpha_c: torch.Tensor, topology: DintsTopology) -> None:
    num_layers, num_paths = log_alpha_a.shape
    if num_paths != topology.num_paths or tuple(log_alpha_c.shape[:2]) != (num_layers, num_paths):
        raise ValueError(
            f"log_alpha_a {tuple(log_alpha_a.shape)} and log_alpha_c {tuple(log_alpha_c.shape)} do not match "
            f"num_depths={topology.num_depths} ({topology.num_paths} paths per layer)"
        )


def decode_within_budget(log_alpha_a: torch.Tensor, log_alpha_c: torch.Tensor, topology: DintsTopology,
                         pattern_memory: np.ndarray, budget: float, bins: int = 400) -> DecodedTopology | None:
    """The cheapest feasible chain whose memory Σ_l pattern_memory[l, c_l] stays ≤ ``budget`` (see the module
    docstring), or ``None`` if no connected chain fits. When the unconstrained optimum fits, it is returned as
    :func:`decode_topology` returns it.

    Args:
        pattern_memory: (L, N) ≥ 0, memory of each pattern at each layer (same unit as ``budget``).
        budget: > 0.
        bins: memory steps of budget / bins.
    """
    free = decode_topology(log_alpha_a, log_alpha_c, topology)
    layers = np.arange(free.arch_code_a.shape[0])
    if pattern_memory[layers, binary_index(free.arch_code_a)].sum() <= budget:
        return free
    num_layers = len(layers)
    probs = pattern_probabilities(log_alpha_a.detach().to("cpu", torch.float64), topology.patterns.cpu()).numpy()
    costs = _pattern_costs(probs)
    in_set = topology.pattern_in_set.cpu().numpy()
    out_set = topology.pattern_out_set.cpu().numpy()
    step = budget / bins
    weight = np.ceil(np.asarray(pattern_memory, dtype=np.float64) / step - 1e-9).astype(np.int64)  # rounded up
    width = bins + 1
    start = np.full(width, np.inf)
    start[0] = 0.0
    # reach[s, m]: cheapest chain of layers 0..l ending in node set s after m memory steps; choice[l, s, m]: its
    # layer-l pattern; before[l, s, m]: the memory steps used before that pattern.
    reach = np.full((topology.num_node_sets, width), np.inf)
    choice = np.full((num_layers, topology.num_node_sets, width), -1, dtype=np.int64)
    before = np.zeros((num_layers, topology.num_node_sets, width), dtype=np.int64)
    for layer in range(num_layers):
        new = np.full_like(reach, np.inf)
        for c in np.flatnonzero(weight[layer] <= bins):
            w = weight[layer, c]
            source = start if layer == 0 else reach[in_set[c]]
            candidate = np.full(width, np.inf)
            candidate[w:] = source[: width - w] + costs[layer, c]
            better = candidate < new[out_set[c]]
            if better.any():
                new[out_set[c], better] = candidate[better]
                choice[layer, out_set[c], better] = c
                before[layer, out_set[c], better] = np.flatnonzero(better) - w
        reach = new
    if not np.isfinite(reach).any():
        return None
    node_set, used = np.unravel_index(int(np.argmin(reach)), reach.shape)
    total = float(reach[node_set, used]) + EDGE_COST
    chosen = np.empty(num_layers, dtype=np.int64)
    for layer in range(num_layers - 1, -1, -1):
        chosen[layer] = choice[layer, node_set, used]
        used = before[layer, node_set, used]
        node_set = in_set[chosen[layer]]
    return _decoded(chosen, total, probs, log_alpha_c, topology)


def decode_topology(
    log_alpha_a: torch.Tensor, log_alpha_c: torch.Tensor, topology: DintsTopology
) -> DecodedTopology:
    """Decode the cheapest feasible architecture (same objective and result as MONAI ``decode()``).

    Args:
        log_alpha_a: (L, P) path logits β.
        log_alpha_c: (L, P, K) cell-op logits α.
        topology: tables for the same D (any device; decoding runs on CPU in float64).
    Returns:
        :class:`DecodedTopology`.
    """
    _check_shapes(log_alpha_a, log_alpha_c, topology)
    num_layers = log_alpha_a.shape[0]
    beta = log_alpha_a.detach().to("cpu", torch.float64)
    probs = pattern_probabilities(beta, topology.patterns.cpu()).numpy()
    costs = _pattern_costs(probs)
    in_set = topology.pattern_in_set.cpu().numpy()
    out_set = topology.pattern_out_set.cpu().numpy()
    set_minimum = _SetMinimum(out_set)

    # reach[s]: cheapest chain of layers 0..l ending in output node set s; best[l, s]: its layer-l pattern.
    best = np.empty((num_layers, topology.num_node_sets), dtype=np.int64)
    reach, best[0] = set_minimum(costs[0])
    for layer in range(1, num_layers):
        reach, best[layer] = set_minimum(reach[in_set] + costs[layer])

    chosen = np.empty(num_layers, dtype=np.int64)
    node_set = int(np.argmin(reach))
    total = float(reach[node_set]) + EDGE_COST
    for layer in range(num_layers - 1, -1, -1):
        chosen[layer] = best[layer, node_set]
        node_set = in_set[chosen[layer]]
    return _decoded(chosen, total, probs, log_alpha_c, topology)
