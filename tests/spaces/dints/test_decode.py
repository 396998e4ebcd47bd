"""decode_topology: brute-force optimality, agreement with MONAI's Dijkstra decode, feasibility, D = 5."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.networks.nets.dints import TopologySearch

from dints3d.spaces.dints.decode import chain_is_feasible, decode_topology, path_cost
from dints3d.spaces.dints.relaxation import pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology, binary_index

# Brute force: distinct optimal costs closer than this are treated as a tie, and the seed does not check the chain
# (both sides sum float64 costs, so their rounding is ~1e-14; MONAI, which decides in float32, is bounded below).
TIE = 1e-6


def random_logits(num_blocks: int, num_depths: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """β ~ N(0, 2) (wide enough that ties are rare), α ~ N(1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    paths = 3 * num_depths - 2
    return 2 * torch.randn(num_blocks, paths, generator=gen), 1 + torch.randn(num_blocks, paths, 5, generator=gen)


def probs64(beta: torch.Tensor, topo: DintsTopology) -> torch.Tensor:
    return pattern_probabilities(beta.double(), topo.patterns)


def check_consistent(result, beta, alpha, topo):
    """Feasible chain; node_a, costs and flags recomputed from arch_code_a by independent means."""
    code = result.arch_code_a
    assert chain_is_feasible(code, topo)
    path_in, path_out = topo.path_in.numpy(), topo.path_out.numpy()
    in_nodes = (code @ np.eye(topo.num_depths, dtype=np.int64)[path_in]) > 0
    out_nodes = (code @ np.eye(topo.num_depths, dtype=np.int64)[path_out]) > 0
    np.testing.assert_array_equal(out_nodes[:-1], in_nodes[1:])
    np.testing.assert_array_equal(result.node_a, np.concatenate([in_nodes[:1], out_nodes]).astype(int))
    assert result.cost == pytest.approx(path_cost(code, probs64(beta, topo)), rel=1e-12)
    assert result.num_active_paths == code.sum()
    np.testing.assert_array_equal(result.arch_code_c, alpha.argmax(-1).numpy())
    per_layer_max = topo.patterns.numpy()[probs64(beta, topo).argmax(-1).numpy()]
    np.testing.assert_array_equal(result.arch_code_a_max, per_layer_max)
    assert result.unconstrained_connected == chain_is_feasible(per_layer_max, topo)
    shapes = [x.shape for x in (result.node_a, code, result.arch_code_c, result.arch_code_a_max)]
    layers, paths = beta.shape
    assert shapes == [(layers + 1, topo.num_depths), (layers, paths), (layers, paths), (layers, paths)]


@pytest.mark.parametrize("num_blocks,num_depths", [(2, 2), (3, 2), (2, 3)])
def test_matches_brute_force(num_blocks, num_depths):
    topo = DintsTopology(num_depths)
    in_set, out_set = topo.pattern_in_set.numpy(), topo.pattern_out_set.numpy()
    chains = np.indices((topo.num_patterns,) * num_blocks).reshape(num_blocks, -1)
    feasible = (out_set[chains[:-1]] == in_set[chains[1:]]).all(0)
    chains = chains[:, feasible]
    unique_checked = 0
    for seed in range(6):
        beta, alpha = random_logits(num_blocks, num_depths, seed)
        costs = -np.log(probs64(beta, topo).numpy() + 1e-5) + 0.001
        totals = costs[np.arange(num_blocks)[:, None], chains].sum(0) + 0.001
        order = np.argsort(totals)
        result = decode_topology(beta, alpha, topo)
        assert result.cost == pytest.approx(totals[order[0]], rel=1e-12)
        check_consistent(result, beta, alpha, topo)
        if totals[order[1]] - totals[order[0]] > TIE:
            unique_checked += 1
            np.testing.assert_array_equal(result.arch_code_a, topo.patterns.numpy()[chains[:, order[0]]])
    assert unique_checked >= 4


@pytest.fixture(scope="module")
def monai_l4d3():
    return TopologySearch(channel_mul=0.125, num_blocks=4, num_depths=3), DintsTopology(3)


@pytest.fixture(scope="module")
def monai_l12d4():
    return TopologySearch(channel_mul=0.125, num_blocks=12, num_depths=4), DintsTopology(4)


def monai_rounding(monai_space: TopologySearch, probs: torch.Tensor) -> np.ndarray:
    """(L, N) |MONAI's edge cost − the float64 one|: its decode computes −log(p + 1e-5) + 0.001 in float32 (NumPy
    keeps the float32 of its probabilities), from probabilities rounded in float32 by the CPU's kernels."""
    with torch.no_grad():
        probs32 = monai_space.get_prob_a(child=True)[0].numpy()
    edge32 = -np.log(probs32 + 1e-5) + 0.001
    assert edge32.dtype == np.float32
    return np.abs(edge32.astype(np.float64) - (-np.log(probs.numpy() + 1e-5) + 0.001))


def compare_with_monai(monai_space: TopologySearch, topo: DintsTopology, seeds) -> int:
    """Same optimal cost as MONAI's decode on every seed, up to its float32 costs; returns how many gave identical
    codes."""
    identical = 0
    layers = np.arange(monai_space.num_blocks)
    for seed in seeds:
        beta, alpha = random_logits(monai_space.num_blocks, monai_space.num_depths, seed)
        with torch.no_grad():
            monai_space.log_alpha_a.copy_(beta)
            monai_space.log_alpha_c.copy_(alpha)
        node_a, arch_code_a, arch_code_c, arch_code_a_max = monai_space.decode()
        result = decode_topology(beta, alpha, topo)
        probs = probs64(beta, topo)
        monai_cost = path_cost(arch_code_a, probs)
        # MONAI's chain is the cheapest for its float32 edge costs C32, ours for the float64 costs C, so
        # C(MONAI's) − C(ours) ≤ Σ|C − C32| along the two chains (≤ 5e-6 here); the float64 sums: rel 1e-12.
        rounding = monai_rounding(monai_space, probs)
        slack = (rounding[layers, binary_index(np.asarray(arch_code_a))].sum()
                 + rounding[layers, binary_index(result.arch_code_a)].sum())
        assert result.cost == pytest.approx(monai_cost, rel=1e-12, abs=slack)
        np.testing.assert_array_equal(result.arch_code_c, arch_code_c)
        np.testing.assert_array_equal(result.arch_code_a_max, arch_code_a_max)
        if np.array_equal(result.arch_code_a, arch_code_a):
            identical += 1
            np.testing.assert_array_equal(result.node_a, node_a)
        check_consistent(result, beta, alpha, topo)
    return identical


def test_matches_monai_decode_l4d3(monai_l4d3):
    assert compare_with_monai(*monai_l4d3, seeds=range(50)) >= 48


def test_matches_monai_decode_l12d4(monai_l12d4):
    # MONAI's decode takes ~10 s here, so only a few in the normal suite; the slow test runs 50.
    assert compare_with_monai(*monai_l12d4, seeds=range(3)) == 3


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DINTS3D_SLOW") != "1", reason="set DINTS3D_SLOW=1 (~10 minutes)")
def test_matches_monai_decode_l12d4_many(monai_l12d4):
    assert compare_with_monai(*monai_l12d4, seeds=range(100, 150)) >= 48


def random_feasible_chain(topo: DintsTopology, num_blocks: int, rng: np.random.Generator) -> np.ndarray:
    in_set, out_set = topo.pattern_in_set.numpy(), topo.pattern_out_set.numpy()
    chain = [rng.integers(topo.num_patterns)]
    for _ in range(num_blocks - 1):
        chain.append(rng.choice(np.flatnonzero(in_set == out_set[chain[-1]])))
    return topo.patterns.numpy().astype(np.int64)[chain]


def test_d5_recovers_a_planted_chain():
    topo = DintsTopology(5)
    planted = random_feasible_chain(topo, 12, np.random.default_rng(0))
    beta = torch.tensor(np.where(planted == 1, 8.0, -8.0))
    alpha = torch.randn(12, 13, 5, generator=torch.Generator().manual_seed(0))
    result = decode_topology(beta, alpha, topo)
    np.testing.assert_array_equal(result.arch_code_a, planted)
    assert result.unconstrained_connected
    check_consistent(result, beta, alpha, topo)


@pytest.mark.parametrize("seed", range(3))
def test_d5_random_logits_give_a_feasible_chain(seed):
    topo = DintsTopology(5)
    beta, alpha = random_logits(12, 5, seed)
    check_consistent(decode_topology(beta, alpha, topo), beta, alpha, topo)


def test_reports_the_discretization_gap():
    topo = DintsTopology(3)
    # Layer 0 most likely writes node set {0}; layer 1 most likely reads only node 1: the argmax chain is broken.
    first = np.zeros(7)
    first[0] = 1
    second = np.zeros(7)
    second[1] = 1
    beta = torch.tensor(np.where(np.stack([first, second]) == 1, 6.0, -6.0))
    result = decode_topology(beta, torch.zeros(2, 7, 5), topo)
    assert not result.unconstrained_connected
    assert not np.array_equal(result.arch_code_a, result.arch_code_a_max)
    check_consistent(result, beta, torch.zeros(2, 7, 5), topo)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="num_depths=4"):
        decode_topology(torch.zeros(12, 7), torch.zeros(12, 7, 5), DintsTopology(4))


def test_search_space_decode_reports_the_unconstrained_argmax():
    """``DintsSearchSpace.decode`` keeps the per-layer argmax codes (they go into arch.json provenance and
    arch_history), not just whether they were connected."""
    from dints3d.spaces.dints.supernet import DintsSearchSpace

    space = DintsSearchSpace(in_channels=1, num_classes=2, num_blocks=2, num_depths=3, channel_mul=0.125)
    planted = np.zeros((2, 7), dtype=np.int64)
    planted[0, 0] = planted[1, 1] = 1  # layer 0 writes node 0, layer 1 reads node 1 only: disconnected
    with torch.no_grad():
        space.log_alpha_a.copy_(torch.tensor(np.where(planted == 1, 6.0, -6.0)))
    arch, info = space.decode()
    assert info["argmax_arch_code_a"] == planted.tolist()
    assert info["argmax_connected"] is False
    assert arch.arch_code_a.tolist() != planted.tolist()
    assert info["active_paths"] == int(np.asarray(arch.arch_code_a).sum())
