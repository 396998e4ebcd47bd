"""The fused supernet cells (shared ReLU, scales folded into InstanceNorm, in-place sums) compute MONAI's function:
same outputs and the same gradients for weights and architecture, with and without checkpointing and under AMP."""

import pytest
import torch
from monai.networks.nets import DiNTS, TopologySearch
from torch import nn

from dints3d.spaces.dints import DintsSearchSpace
from dints3d.spaces.dints_cells import cell_forward

TINY = dict(num_blocks=3, num_depths=3, channel_mul=0.25, use_downsample=True)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = DintsSearchSpace(in_channels=1, num_classes=3, **TINY)
    with torch.no_grad():
        ours.log_alpha_a.normal_(0, 1)
        ours.log_alpha_c.normal_(1, 1)
        for m in ours.modules():  # non-trivial affine parameters, so folding them is tested
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    reference = TopologySearch(**TINY)
    reference.load_state_dict(ours.topology_space.state_dict())
    monai = DiNTS(dints_space=reference, in_channels=1, num_classes=3, use_downsample=True)
    monai.load_state_dict(ours.net.state_dict())
    return ours, monai


def _grads(model, x, params):
    out = model(x)
    return out.detach(), torch.autograd.grad(out.square().mean(), params)


@pytest.mark.parametrize("checkpoint_cells, fraction", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_same_outputs_and_gradients_as_monai(pair, checkpoint_cells, fraction):
    ours, monai = pair
    ours.topology_space.checkpoint_cells = checkpoint_cells
    ours.topology_space.checkpoint_fraction = fraction
    try:
        x = torch.randn(1, 1, 32, 32, 32)
        ours_out, ours_g = _grads(ours, x, list(ours.parameters()))
        monai_out, monai_g = _grads(monai, x, list(monai.parameters()))
    finally:
        ours.topology_space.checkpoint_cells, ours.topology_space.checkpoint_fraction = False, 1.0
    torch.testing.assert_close(ours_out, monai_out, rtol=1e-5, atol=1e-5)
    assert len(ours_g) == len(monai_g)
    for a, b in zip(ours_g, monai_g):
        scale = b.abs().max().clamp_min(1e-12)
        assert ((a - b).abs().max() / scale) < 1e-4
    names = [name for name, _ in ours.named_parameters()]
    arch = [g for name, g in zip(names, ours_g) if name.endswith(("log_alpha_a", "log_alpha_c"))]
    assert len(arch) == 2 and all(g.abs().sum() > 0 for g in arch)  # the in-place sums cut no gradient off


def test_same_under_bf16_autocast(pair):
    """bf16 rounding differs with the order of operations; ours must be no further from the fp32 result than
    MONAI's own bf16 forward is."""
    ours, monai = pair
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        exact = monai(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = ours(x), monai(x)
    assert a.dtype == b.dtype

    def error(t):
        return float((t.float() - exact).norm() / exact.norm())

    assert error(a) < 1.5 * error(b) + 1e-3, (error(a), error(b))


def test_cell_matches_weighted_sum_of_its_ops(pair):
    """One cell of each kind (same resolution, down, up): Σ_k s_k · op_k(pre(x)), with s from a real softmax."""
    ours, _ = pair
    space = ours.topology_space
    scales = torch.softmax(torch.randn(5), 0)
    for path in range(len(space.arch_code2out)):
        cell = space.cell_tree[str((0, path))]
        channels = space.filter_nums[space.arch_code2in[path] + 1]
        side = 16 // 2 ** space.arch_code2in[path]
        x = torch.randn(2, channels, side, side, side)
        z = cell.preprocess(x)
        expected = sum(s * op(z) for s, op in zip(scales, cell.op.ops))
        shared = torch.relu(x)
        torch.testing.assert_close(cell_forward(cell, x, shared, scales), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cell_forward(cell, x, None, scales), expected, rtol=1e-5, atol=1e-5)
