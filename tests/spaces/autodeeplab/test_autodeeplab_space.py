"""The Auto-DeepLab supernet: β normalisation and masking in the forward pass, the two supernet variants, cell
decoding, 3-D at tiny size, and the search-space protocol."""

import math

import numpy as np
import pytest
import torch
from support import F64_RTOL, rel_error

from dints3d.config import load_config
from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.decode import STEPS, decode_cell, edge_offset, num_edges
from dints3d.spaces.autodeeplab.operations import OPERATIONS, ZERO, level_sizes, resize
from dints3d.spaces.autodeeplab.supernet import AutoDeepLabSearchSpace, search_head_rate
from dints3d.spaces.factory import architecture_from_dict, build_search_space
from dints3d.utils.errors import DintsError

TINY = dict(num_layers=3, num_blocks=2, filter_multiplier=2)


def tiny_space(supernet="per_transition", seed=0, **kwargs):
    torch.manual_seed(seed)
    return AutoDeepLabSearchSpace(3, 4, supernet=supernet, **{**TINY, **kwargs})


# ------------------------------------------------------------------------------------------------ cell decoding
def test_decode_cell_keeps_two_strongest_inputs_and_never_zero():
    alpha = torch.full((num_edges(2), len(OPERATIONS)), -5.0)
    op = OPERATIONS.index
    # block 0 (edges 0, 1): both inputs kept; edge 0 is dominated by zero, but zero is never the chosen op
    alpha[0, ZERO], alpha[0, op("sep_conv_5x5")] = 9.0, 1.0
    alpha[1, op("skip_connect")] = 2.0
    # block 1 (edges 2, 3, 4 from H^{l-2}, H^{l-1}, block 0): zero on edge 3 is huge but its best real op is weak;
    # edge 2's real op is strongest, edge 4 second
    alpha[2, op("max_pool_3x3")] = 4.0
    alpha[3, ZERO], alpha[3, op("atrous_conv_3x3")] = 20.0, -1.0
    alpha[4, op("atrous_conv_5x5")] = 3.0
    assert decode_cell(alpha, 2) == [(0, "sep_conv_5x5"), (1, "skip_connect"),
                                     (0, "max_pool_3x3"), (2, "atrous_conv_5x5")]


def test_decode_cell_matches_the_rule_on_random_alpha():
    gen = torch.Generator().manual_seed(0)
    for blocks in (1, 3, 5):
        alpha = torch.randn(num_edges(blocks), len(OPERATIONS), generator=gen) * 3
        weights = torch.softmax(alpha, -1).numpy()
        real = np.delete(weights, ZERO, axis=1)
        names = [o for o in OPERATIONS if o != "zero"]
        genotype = decode_cell(alpha, blocks)
        assert len(genotype) == 2 * blocks
        for b in range(blocks):
            rows = real[edge_offset(b): edge_offset(b) + 2 + b]
            strongest = sorted(np.argsort(-rows.max(1))[:2].tolist())
            assert [i for i, _ in genotype[2 * b: 2 * b + 2]] == strongest
            assert [o for _, o in genotype[2 * b: 2 * b + 2]] == [names[int(rows[i].argmax())] for i in strongest]
    with pytest.raises(ValueError):
        decode_cell(torch.zeros(4, 8), 2)


# --------------------------------------------------------------------------------------------- the supernet
def test_transition_probabilities_in_the_supernet():
    space = tiny_space(num_levels=3)
    probs = space.transition_probs()
    valid = space.valid
    assert probs.shape == (3, 3, 3)
    reachable = valid.any(-1)
    assert torch.allclose(probs.sum(-1)[reachable], torch.ones(int(reachable.sum())), atol=1e-6)
    assert (probs[~valid] == 0).all()
    # nodes have the sources the trellis allows: (1, 0) from the stem (same); (2, 1) from levels 0 (down) and 1 (same)
    assert space.incoming(1, 0) == [0] and space.incoming(1, 1) == [0]
    assert space.incoming(2, 1) == [0, 1] and space.incoming(3, 1) == [0, 1, 2] and space.incoming(3, 2) == [1, 2]
    assert [search_head_rate(j) for j in range(4)] == [24, 12, 6, 3]


@pytest.mark.parametrize("supernet", ["per_transition", "mixed_input"])
def test_forward_backward_any_size(supernet):
    space = tiny_space(supernet)
    x = torch.randn(2, 3, 29, 43)  # sides are no multiple of anything
    y = space(x)
    assert y.shape == (2, 4, 29, 43)
    y.square().mean().backward()
    assert space.alpha.grad is not None and space.alpha.grad.abs().sum() > 0
    grad = space.beta.grad
    assert (grad[~space.valid] == 0).all() and grad[space.valid].abs().sum() > 0
    assert all(p.grad is not None for p in space.weight_parameters() if p.requires_grad and p.dim() > 1)


def test_invalid_beta_entries_do_not_change_the_output():
    space = tiny_space().eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        before = space(x)
        space.beta[~space.valid] = 50.0
        assert torch.equal(space(x), before)
        space.beta[1, 0, 0] += 1.0  # a valid one does
        assert not torch.allclose(space(x), before)


@pytest.mark.parametrize("supernet", ["per_transition", "mixed_input"])
def test_supernet_follows_its_relaxation(supernet):
    """Two layers, two levels, written out: per_transition H = Σ_t p_t·Cell(H^{l-2}, proj_t(H^{l-1})), mixed_input
    H = Cell(H^{l-2}, Σ_t p_t·proj_t(H^{l-1})); H^{l-2} is the stem's stride-2 output for layer 1 and its stride-4
    output for both nodes of layer 2."""
    space = tiny_space(supernet, num_layers=2, num_levels=2).eval().double()  # float64: support.F64_RTOL
    with torch.no_grad():
        space.beta.normal_()
        x = torch.randn(1, 3, 22, 18, dtype=torch.float64)
        half, quarter = space.stem(x)
        sizes = level_sizes(quarter.shape[2:], 2)
        p, w = space.transition_probs(), space.op_weights()

        def node_output(node, layer, before, previous):
            s0 = node.prev_prev(before, sizes[node.level])
            inputs = [(p[layer - 1, src, STEPS.index(node.level - src)], proj(previous[src], sizes[node.level]))
                      for src, proj in zip(node.sources, node.transitions)]
            if supernet == "per_transition":
                return sum(q * node.cell(s0, s1, w) for q, s1 in inputs)
            return node.cell(s0, sum(q * s1 for q, s1 in inputs), w)

        first = {node.level: node_output(node, 1, half, {0: quarter}) for node in space.nodes[0]}
        second = {node.level: node_output(node, 2, quarter, first) for node in space.nodes[1]}
        assert [n.sources for n in space.nodes[1]] == [[0, 1], [0, 1]]
        expected = sum(resize(head(torch.relu(second[j])), x.shape[2:]) for j, head in enumerate(space.heads))
        assert rel_error(space(x), expected) < F64_RTOL


def test_three_dimensional_space_forward_backward():
    torch.manual_seed(0)
    space = AutoDeepLabSearchSpace(1, 2, num_layers=2, num_blocks=2, filter_multiplier=2, num_levels=3, spatial_dims=3)
    x = torch.randn(2, 1, 20, 16, 12)
    y = space(x)
    assert y.shape == (2, 2, 20, 16, 12)
    y.mean().backward()
    assert space.alpha.grad.abs().sum() > 0 and space.beta.grad[space.valid].abs().sum() > 0
    arch, _ = space.decode()
    assert arch.spatial_dims == 3
    net = arch.build(1, 2)
    assert net(torch.randn(1, 1, 20, 16, 12)).shape == (1, 2, 20, 16, 12)


def test_checkpointed_cells_give_the_same_gradients():
    plain, ckpt = tiny_space().double(), tiny_space(checkpoint_cells=True).double()  # float64: support.F64_RTOL
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for space in (plain, ckpt):
        space(x).sum().backward()
    assert plain.alpha.grad.dtype == torch.float64
    assert rel_error(ckpt.alpha.grad, plain.alpha.grad) < F64_RTOL
    assert rel_error(ckpt.beta.grad, plain.beta.grad) < F64_RTOL


# ------------------------------------------------------------------------------------------------ the protocol
def test_protocol_and_decode():
    space = tiny_space()
    arch_ids = {id(space.alpha), id(space.beta)}
    assert {id(p) for p in space.arch_parameters()} == arch_ids
    assert not arch_ids & {id(p) for p in space.weight_parameters()}
    assert len(space.weight_parameters()) + 2 == len(list(space.parameters()))
    assert space.alpha.shape == (num_edges(2), 8) and space.beta.shape == (3, 4, 3)
    assert space.regularizers((2, 3, 32, 32)) == {} and space.patch_divisor == 1
    with torch.no_grad():
        space.beta.zero_()
        space.beta[0, 0, 0] = 5.0  # down to stride 8 first, then the "up" of every stride-8 node wins
        space.beta[1:, 1, 2] = 5.0
    arch, info = space.decode()
    assert arch.network_path == [1, 0, 0] and info["final_stride"] == 4
    assert info["path_log_probability"] == pytest.approx(
        float(space.transition_log_probs()[0, 0, 0] + space.transition_log_probs()[1, 1, 2]
              + space.transition_log_probs()[2, 0, 1]))
    facts = space.architecture_facts(arch, (2, 3, 32, 32))
    assert facts["path_log_probability"] == pytest.approx(info["path_log_probability"])
    scalars = space.log_scalars((2, 3, 32, 32))
    assert scalars["arch/beta_probabilities"].numel() == int(space.valid.sum())
    assert 0 < float(scalars["arch/alpha_entropy"]) <= math.log(8) + 1e-6
    again = architecture_from_dict(arch.to_dict(), "decoded")
    assert isinstance(again, AutoDeepLabArchitecture) and again == arch


def test_factory_and_config():
    cfg = load_config(None, ["space=autodeeplab", "autodeeplab.num_layers=2", "autodeeplab.num_blocks=2",
                             "autodeeplab.filter_multiplier=2", "autodeeplab.supernet=mixed_input"])
    space = build_search_space(cfg, in_channels=3, num_classes=5)
    assert isinstance(space, AutoDeepLabSearchSpace) and space.supernet == "mixed_input" and space.num_layers == 2
    with pytest.raises(DintsError, match="autodeeplab.supernet"):
        load_config(None, ["autodeeplab.supernet=mixed"])
    bad = load_config(None, ["space=autodeeplab", "autodeeplab.num_classes=19"])
    with pytest.raises(DintsError, match="19 but the data has 5"):
        build_search_space(bad, in_channels=3, num_classes=5)


def test_tiny_search_on_a_cityscapes_folder(prepared_cityscapes, tiny, tmp_path):
    """The shared engine with this space: synth → prepare → search writes arch.json, arch.png, checkpoints, events."""
    from dints3d.search.loop import SearchRun
    from dints3d.spaces.factory import load_architecture
    from dints3d.utils.runtime import init_runtime

    overrides = ["space=autodeeplab", "device=cpu", *tiny.autodeeplab, "autodeeplab.filter_multiplier=2",
                 "data.patch_size=[24,24]", "data.batch_size=2", "search.iterations=4", "search.val_interval=2",
                 "search.checkpoint_interval=2", "search.amp=false", "search.val_overlap=0.0",
                 "search.lr_schedule=cosine"]
    cfg = load_config(None, overrides)
    work = prepared_cityscapes(overrides=overrides, cases=4, test_cases=0, size=32, seed=0).work
    run = SearchRun(cfg, work, tmp_path / "run", init_runtime("cpu"))
    try:
        path = run.run()
    finally:
        run.close()
    arch = load_architecture(path)
    assert isinstance(arch, AutoDeepLabArchitecture) and arch.num_layers == 3 and arch.num_blocks == 2
    assert arch.provenance["iteration"] == 4 and "path_log_probability" in arch.provenance
    out = tmp_path / "run"
    assert (out / "arch.png").stat().st_size > 5000
    assert (out / "checkpoints" / "last.pt").exists() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "arch_history").iterdir())) == 2
    with torch.no_grad():
        assert arch.build(3, 19).eval()(torch.randn(1, 3, 24, 40)).shape == (1, 19, 24, 40)
