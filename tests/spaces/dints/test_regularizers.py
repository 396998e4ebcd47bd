"""DintsTopology tables and the vectorized regularizers against MONAI's TopologySearch (compared in float64, where
the results do not depend on the CPU's kernels: support.F64_RTOL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets.dints import TopologySearch
from support import F64_RTOL, fp32_sum_bound

from dints3d.spaces.dints import regularizers as reg
from dints3d.spaces.dints.relaxation import path_probabilities, pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology
from dints3d.utils.errors import DintsError

SPACES = [(4, 3, True), (12, 4, True), (4, 3, False)]
IN_SIZES = [(1, 1, 32, 32, 32), (2, 1, 96, 96, 96), (1, 2, 40, 56, 72), (3, 1, 37, 50, 23)]
TRIALS = 10


@pytest.fixture(scope="module", params=SPACES, ids=lambda p: f"L{p[0]}D{p[1]}ds{int(p[2])}")
def space(request):
    """(MONAI TopologySearch in float64, DintsTopology) pair; building MONAI's supernet is the slow part, so once per
    module. MONAI's regularizers follow the dtype of its arch parameters (except the float32 ram_cost and sizes:
    monai_ram_cost)."""
    num_blocks, num_depths, use_downsample = request.param
    monai_space = TopologySearch(
        channel_mul=0.125, num_blocks=num_blocks, num_depths=num_depths, use_downsample=use_downsample
    ).double()
    return monai_space, DintsTopology(num_depths)


def monai_ram_cost(monai_space: TopologySearch) -> torch.Tensor:
    """The op costs as MONAI's get_ram_cost_usage uses them: rounded to float32 (as DintsSearchSpace's buffer)."""
    return torch.from_numpy(monai_space.ram_cost).float()


def randomize(monai_space: TopologySearch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Set MONAI's arch parameters to β ~ N(0,1), α ~ N(1,1), clear their grads; return detached copies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        monai_space.log_alpha_a.copy_(torch.randn(monai_space.log_alpha_a.shape, generator=gen))
        monai_space.log_alpha_c.copy_(1 + torch.randn(monai_space.log_alpha_c.shape, generator=gen))
    monai_space.log_alpha_a.grad = None
    monai_space.log_alpha_c.grad = None
    return monai_space.log_alpha_a.detach().clone(), monai_space.log_alpha_c.detach().clone()


def assert_rel(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = F64_RTOL):
    """Elementwise relative agreement of float64 results, with an absolute floor at rtol·max|theirs| for near-zero
    entries."""
    assert ours.dtype == torch.float64 and torch.as_tensor(theirs).dtype == torch.float64
    theirs = torch.as_tensor(theirs, dtype=ours.dtype)
    atol = rtol * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def out_sizes(monai_space: TopologySearch, topology: DintsTopology, in_size) -> torch.Tensor:
    sizes = reg.feature_sizes(
        in_size, monai_space.filter_nums, monai_space.num_depths, 3, monai_space.use_downsample
    )
    return sizes[topology.path_out]


@pytest.mark.parametrize("num_depths", [1, 2, 3, 4])
def test_topology_tables_match_monai(num_depths):
    monai_space = TopologySearch(channel_mul=0.125, num_blocks=2, num_depths=num_depths)
    topo = DintsTopology(num_depths)
    assert topo.path_in.tolist() == monai_space.arch_code2in
    assert topo.path_out.tolist() == monai_space.arch_code2out
    assert topo.path_op.tolist() == monai_space.arch_code2ops
    np.testing.assert_array_equal(topo.patterns.numpy(), monai_space.child_list)
    np.testing.assert_array_equal(topo.node_sets.numpy(), monai_space.node_act_list)
    # MONAI fills node2in / node2out lazily; note node2in[n] lists patterns whose OUTPUT set is n.
    monai_space.get_topology_entropy(torch.rand(2, topo.num_patterns))
    for node_set in range(topo.num_node_sets):
        out_members = np.flatnonzero(topo.pattern_out_set.numpy() == node_set)
        in_members = np.flatnonzero(topo.pattern_in_set.numpy() == node_set)
        assert sorted(monai_space.node2in[node_set]) == out_members.tolist()
        assert sorted(monai_space.node2out[node_set]) == in_members.tolist()
    np.testing.assert_array_equal(topo.pattern_in_onehot.argmax(1).numpy(), topo.pattern_in_set.numpy())
    np.testing.assert_array_equal(topo.pattern_out_onehot.sum(1).numpy(), np.ones(topo.num_patterns))


def test_topology_d5_and_index_helpers():
    topo = DintsTopology(5)
    assert (topo.num_paths, topo.num_patterns, topo.num_node_sets) == (13, 8191, 31)
    assert topo.patterns.shape == (8191, 13) and topo.node_sets.shape == (31, 5)
    torch.testing.assert_close(topo.pattern_index(topo.patterns), torch.arange(8191))
    torch.testing.assert_close(topo.node_set_index(topo.node_sets.numpy()), torch.arange(31))
    # A pattern's input set is the set of path_in nodes of its active paths.
    used = torch.zeros(8191, 5).index_add_(1, topo.path_in, topo.patterns) > 0
    torch.testing.assert_close(topo.node_set_index(used), topo.pattern_in_set)
    with pytest.raises(ValueError):
        topo.pattern_index(np.ones((2, 10)))
    with pytest.raises(DintsError):
        DintsTopology(0)


def test_topology_to_device():
    meta = DintsTopology(3).to("meta")
    assert meta.patterns.device.type == "meta" and meta.pattern_in_onehot.device.type == "meta"
    assert meta.pattern_index(np.array([1, 0, 0, 0, 0, 0, 0])).device.type == "meta"


def test_probabilities_match_monai(space):
    monai_space, topo = space
    for seed in range(TRIALS):
        beta, _ = randomize(monai_space, seed)
        probs, eta = monai_space.get_prob_a(child=True)
        assert_rel(pattern_probabilities(beta, topo.patterns), probs.detach())
        assert_rel(path_probabilities(beta), eta.detach())


def test_probabilities_stay_normalised_where_the_product_underflows():
    topo = DintsTopology(4)
    beta = torch.tensor([[-60.0] * 10, [40.0] * 10, [-60.0] * 9 + [0.0]])
    probs = pattern_probabilities(beta, topo.patterns)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    single_paths = topo.patterns.sum(-1) == 1
    torch.testing.assert_close(probs[0, single_paths], torch.full((10,), 0.1))
    torch.testing.assert_close(path_probabilities(beta)[0], torch.full((10,), 0.1))


@pytest.mark.parametrize("full", [False, True])
def test_memory_usage_matches_monai(space, full):
    monai_space, topo = space
    ram_cost = monai_ram_cost(monai_space)
    for seed in range(TRIALS):
        beta, alpha = randomize(monai_space, seed)
        in_size = IN_SIZES[seed % len(IN_SIZES)]
        ours = reg.memory_usage(beta, alpha, ram_cost, out_sizes(monai_space, topo, in_size), full=full)
        assert_rel(ours, monai_space.get_ram_cost_usage(in_size, full=full).detach())


def test_memory_ratio_and_loss(space):
    monai_space, topo = space
    ram_cost = monai_ram_cost(monai_space)
    in_size = IN_SIZES[1]
    sizes = out_sizes(monai_space, topo, in_size)
    for seed in range(3):
        beta, alpha = randomize(monai_space, seed)
        ratio = monai_space.get_ram_cost_usage(in_size) / monai_space.get_ram_cost_usage(in_size, full=True)
        assert_rel(reg.memory_ratio(beta, alpha, ram_cost, sizes), ratio.detach())
        assert_rel(reg.memory_loss(beta, alpha, ram_cost, sizes, 0.8), (0.8 - ratio).abs().detach())
        assert 0 < float(reg.memory_ratio(beta, alpha, ram_cost, sizes)) < 1


def test_feature_sizes_follow_monai_quirks():
    # filter_nums[d], not filter_nums[d + 1], and a single /2 for use_downsample.
    sizes = reg.feature_sizes((2, 1, 96, 64, 33), [16, 32, 64, 128, 256], 4, 3, True)
    expected = [2 * f * (96 // 2**d) * (64 // 2**d) * (33 // 2**d) / 2 for d, f in enumerate([16, 32, 64, 128])]
    torch.testing.assert_close(sizes, torch.tensor(expected, dtype=torch.float32))
    assert reg.feature_sizes((1, 1, 8, 8), [4, 8], 2, 2, False).tolist() == [256.0, 128.0]


def test_topology_loss_matches_monai(space):
    monai_space, topo = space
    for seed in range(TRIALS):
        beta, _ = randomize(monai_space, seed)
        probs, _ = monai_space.get_prob_a(child=True)
        ours = reg.topology_loss(pattern_probabilities(beta, topo.patterns), topo)
        assert_rel(ours, monai_space.get_topology_entropy(probs).detach())


def test_entropies_match_reference_formulas(space):
    monai_space, topo = space
    beta, alpha = randomize(monai_space, 0)
    probs, _ = monai_space.get_prob_a(child=True)
    expected_a = -(probs * torch.log(probs + 1e-5)).mean()
    expected_c = -(torch.softmax(alpha, -1) * torch.log_softmax(alpha, -1)).mean()
    assert_rel(reg.path_entropy(pattern_probabilities(beta, topo.patterns)), expected_a.detach())
    assert_rel(reg.op_entropy(alpha), expected_c)


def test_gradients_match_monai(space):
    monai_space, topo = space
    ram_cost = monai_ram_cost(monai_space)
    in_size = IN_SIZES[2]
    sizes = out_sizes(monai_space, topo, in_size)
    for seed in range(3):
        beta, alpha = randomize(monai_space, seed)
        usage = monai_space.get_ram_cost_usage(in_size)
        full = monai_space.get_ram_cost_usage(in_size, full=True)
        probs, _ = monai_space.get_prob_a(child=True)
        theirs = (0.8 - usage / full).abs() + 0.01 * usage + 0.001 * monai_space.get_topology_entropy(probs)
        theirs.backward()

        beta.requires_grad_(True)
        alpha.requires_grad_(True)
        ours = (
            reg.memory_loss(beta, alpha, ram_cost, sizes, 0.8)
            + 0.01 * reg.memory_usage(beta, alpha, ram_cost, sizes)
            + 0.001 * reg.topology_loss(pattern_probabilities(beta, topo.patterns), topo)
        )
        ours.backward()
        assert_rel(beta.grad, monai_space.log_alpha_a.grad)
        assert_rel(alpha.grad, monai_space.log_alpha_c.grad)


def all_terms(beta, alpha, ram_cost, sizes, topo):
    probs = pattern_probabilities(beta, topo.patterns)
    return [
        path_probabilities(beta),
        probs,
        reg.memory_usage(beta, alpha, ram_cost, sizes),
        reg.memory_usage(beta, alpha, ram_cost, sizes, full=True),
        reg.memory_loss(beta, alpha, ram_cost, sizes, 0.8),
        reg.topology_loss(probs, topo),
        reg.path_entropy(probs),
        reg.op_entropy(alpha),
    ]


@pytest.fixture(scope="module")
def small_inputs():
    gen = torch.Generator().manual_seed(0)
    beta = torch.randn(4, 7, generator=gen)
    alpha = 1 + torch.randn(4, 7, 5, generator=gen)
    ram_cost = torch.rand(4, 7, 5, generator=gen) * 10
    sizes = torch.rand(7, generator=gen) * 1e5
    return beta, alpha, ram_cost, sizes


def test_autocast_bf16_returns_float32_full_precision(small_inputs):
    topo = DintsTopology(3)
    reference = all_terms(*small_inputs, topo)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = all_terms(*small_inputs, topo)
    bf16_inputs = [x.to(torch.bfloat16) for x in small_inputs]
    from_bf16 = all_terms(*bf16_inputs, topo)
    for ref, under_autocast, low in zip(reference, autocast, from_bf16):
        assert under_autocast.dtype == torch.float32 and low.dtype == torch.float32
        # the same float32 kernels on the same values on both sides: equal on any CPU (bitwise, in fact)
        torch.testing.assert_close(under_autocast, ref, rtol=1e-6, atol=0)


def test_float64_stays_float64(small_inputs):
    topo = DintsTopology(3)
    reference = all_terms(*small_inputs, topo)
    doubles = all_terms(*[x.double() for x in small_inputs], topo)
    # The float64 terms are exact to ~1e-15, so this bounds the float32 rounding of `reference`, which depends on the
    # CPU's kernels. The longest float32 reduction is path_entropy's mean over N = 4 × 127 pattern probabilities; a
    # sum of N terms is within γ_N·Σ|terms| (support.fp32_sum_bound), and the summed values are non-negative
    # (probabilities, costs, entropy contributions), so Σ|terms| is the result. The probabilities are exp(β·c + A −
    # log(1 − e^A)), A = Σ_j log σ(−β_j): the exponent sums terms of total magnitude up to K (below, ~10), so its
    # rounding is a relative error of up to ~γ_9·K in every probability, carried into every later stage. Hence
    # γ_N·K relative to the result, or to 1 where that is larger: memory_loss = |0.8 − ratio| cancels, its error
    # scales with 0.8 + ratio rather than with the difference.
    beta = small_inputs[0].double()
    log_empty = torch.nn.functional.logsigmoid(-beta).sum(-1)
    magnitude = beta.abs().sum(-1) + log_empty.abs() + torch.log(-torch.expm1(log_empty)).abs()
    bound = fp32_sum_bound(4 * topo.num_patterns) * max(float(magnitude.max()), 1.0)
    for ref, dbl in zip(reference, doubles):
        assert dbl.dtype == torch.float64 and ref.dtype == torch.float32
        error = float((dbl - ref.double()).abs().max())
        assert error <= bound * max(float(dbl.abs().max()), 1.0), (error, bound)


def test_no_host_sync_runs_on_meta(small_inputs):
    # Any .item(), .cpu(), .numpy() or data-dependent branch raises on meta tensors.
    topo = DintsTopology(3).to("meta")
    beta, alpha, ram_cost, sizes = (x.to("meta") for x in small_inputs)
    beta.requires_grad_(True)
    alpha.requires_grad_(True)
    terms = all_terms(beta, alpha, ram_cost, sizes, topo)
    assert all(t.device.type == "meta" for t in terms)
    assert [tuple(t.shape) for t in terms] == [(4, 7), (4, 127), (), (), (), (), (), ()]
    sum(terms[2:]).backward()
    assert beta.grad.device.type == "meta" and alpha.grad.device.type == "meta"
