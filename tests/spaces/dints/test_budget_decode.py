"""Hard-budget decoding: the cheapest connected topology whose memory stays within a budget, checked against brute
force over every chain of small grids; never above the budget; today's decoder where the budget does not bind."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dints3d.spaces.dints.decode import (
    EDGE_COST,
    _pattern_costs,
    decode_topology,
    decode_within_budget,
)
from dints3d.spaces.dints.relaxation import pattern_probabilities
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.dints.topology import DintsTopology, binary_index
from dints3d.utils.errors import DintsError


def brute_force(costs: np.ndarray, memory: np.ndarray, topology: DintsTopology, admissible) -> tuple[float, tuple]:
    """The cheapest connected chain (cost incl. the sink edge) among those ``admissible(chain)`` accepts."""
    in_set, out_set = topology.pattern_in_set.numpy(), topology.pattern_out_set.numpy()
    best = (np.inf, ())
    for chain in itertools.product(range(topology.num_patterns), repeat=costs.shape[0]):
        if any(out_set[a] != in_set[b] for a, b in zip(chain, chain[1:])) or not admissible(chain):
            continue
        cost = costs[np.arange(len(chain)), chain].sum() + EDGE_COST
        best = min(best, (cost, chain))
    return best


@pytest.mark.parametrize("depths, layers, seed", [(2, 3, 0), (2, 3, 1), (3, 2, 2), (2, 4, 3)])
def test_equals_brute_force_and_never_exceeds_the_budget(depths, layers, seed):
    topology = DintsTopology(depths)
    generator = torch.Generator().manual_seed(seed)
    log_alpha_a = torch.randn(layers, topology.num_paths, generator=generator, dtype=torch.float64) + 1.0
    log_alpha_c = torch.randn(layers, topology.num_paths, 3, generator=generator, dtype=torch.float64)
    costs = _pattern_costs(pattern_probabilities(log_alpha_a, topology.patterns))
    rng = np.random.default_rng(seed)
    memory = topology.patterns.numpy().astype(np.float64) @ rng.uniform(0.5, 2.0, (topology.num_paths, layers))
    memory = memory.T  # (L, N): a sum over each pattern's paths, different per layer
    free_cost, free_chain = brute_force(costs, memory, topology, lambda chain: True)
    free_memory = memory[np.arange(layers), free_chain].sum()
    bins = 200
    for fraction in (0.3, 0.5, 0.8):
        budget = fraction * free_memory
        result = decode_within_budget(log_alpha_a, log_alpha_c, topology, memory, budget, bins=bins)
        step = budget / bins
        steps = np.ceil(memory / step - 1e-9)
        exact_cost, _ = brute_force(costs, memory, topology,
                                    lambda chain: steps[np.arange(layers), chain].sum() <= bins)
        if result is None:
            assert exact_cost == np.inf
            continue
        chosen = binary_index(result.arch_code_a)
        assert memory[np.arange(layers), chosen].sum() <= budget + 1e-12  # never above the budget
        assert result.cost == pytest.approx(exact_cost, abs=1e-12)  # the optimum of the discretised problem
        optimum, _ = brute_force(costs, memory, topology, lambda chain: memory[np.arange(layers), chain].sum() <= budget)
        inner, _ = brute_force(costs, memory, topology,
                               lambda chain: memory[np.arange(layers), chain].sum() <= budget - layers * step)
        assert optimum - 1e-12 <= result.cost <= inner + 1e-12  # within the documented optimality gap
    loose = decode_within_budget(log_alpha_a, log_alpha_c, topology, memory, free_memory * 1.01)
    free = decode_topology(log_alpha_a, log_alpha_c, topology)
    assert np.array_equal(loose.arch_code_a, free.arch_code_a) and loose.cost == free.cost == pytest.approx(free_cost)
    assert decode_within_budget(log_alpha_a, log_alpha_c, topology, memory, memory.min() * 0.5) is None


@pytest.mark.parametrize("sigma", [0.15, 0.3, 0.6])
def test_the_supernet_decodes_within_sigma(sigma):
    torch.manual_seed(0)
    space = DintsSearchSpace(1, 3, num_blocks=4, num_depths=3, channel_mul=0.125, ram_cost_factor=sigma)
    with torch.no_grad():
        space.log_alpha_a.fill_(2.0)  # every path likely: the unconstrained decode is dense
        space.log_alpha_a.add_(0.3 * torch.randn_like(space.log_alpha_a))
    shape = (1, 1, 32, 32, 32)
    free, _ = space.decode()
    arch, info = space.decode(shape)
    assert info["hard_budget"] and space.discrete_memory_ratio(arch, shape) <= sigma + 1e-9
    assert space.discrete_memory_ratio(free, shape) > sigma  # the budget binds here
    memory = space.pattern_memory(shape)
    layers = np.arange(arch.num_blocks)
    assert memory[layers, binary_index(arch.arch_code_a)].sum() == pytest.approx(space.discrete_memory_ratio(arch,
                                                                                                             shape))
    space.hard_budget = False
    unbounded, info = space.decode(shape)
    assert not info["hard_budget"] and np.array_equal(unbounded.arch_code_a, free.arch_code_a)


def test_an_impossible_budget_is_one_line():
    space = DintsSearchSpace(1, 3, num_blocks=3, num_depths=3, channel_mul=0.125, ram_cost_factor=0.001)
    with pytest.raises(DintsError, match=r"search.ram_cost_factor: no connected topology fits σ = 0.001"):
        space.decode((1, 1, 32, 32, 32))
