"""CPU convolution routing (dints3d.spaces.dints.cpu_conv): same function and gradients as nn.Conv3d, oneDNN where promised."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support import fp32_sum_bound
from torch import nn
from torch.profiler import profile

from dints3d.spaces.dints.cpu_conv import (
    OneDnnConv3d,
    route_cpu_convolutions,
    routes_to_onednn,
)

ROUTED = [  # (in, out, kernel, side): batch-1 shapes PyTorch runs with slow_conv3d, routed to oneDNN
    (32, 32, (3, 3, 3), 8),
    (16, 32, (3, 3, 1), 8),
    (24, 16, (1, 3, 3), 6),
]
NOT_ROUTED = [
    (32, 32, (1, 1, 1), 8),   # 1×1×1: oneDNN is slower
    (32, 32, (3, 1, 1), 8),   # single-axis kernel
    (1, 16, (3, 3, 3), 8),    # one input channel (a stem)
    (32, 31, (3, 3, 3), 8),   # odd output channels cannot split into two groups
]


def _pair(cin: int, cout: int, kernel, bias: bool = True):
    torch.manual_seed(0)
    plain = nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=bias)
    routed = copy.deepcopy(plain)
    assert route_cpu_convolutions(routed) == 1
    return plain, routed


def _kernels(module: nn.Module, x: torch.Tensor) -> set[str]:
    with profile() as prof:
        module(x).sum().backward()
    return {e.key for e in prof.key_averages()}


def _magnitudes(conv: nn.Conv3d, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor | None]:
    """Σ|terms| of every element of y, grad_x, grad_W, grad_b: the same convolution and its backward, in float64, on
    |x|, |W|, |b| and |grad| (with no negative term nothing cancels, so each sum is the sum of magnitudes)."""
    conv = copy.deepcopy(conv).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.abs_()
    x = x.detach().double().abs().requires_grad_()
    y = conv(x)
    y.backward(grad.double().abs())
    return [y.detach(), x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad]


@pytest.mark.parametrize("cin, cout, kernel, side", ROUTED + NOT_ROUTED)
@pytest.mark.parametrize("bias", [True, False])
def test_same_output_and_gradients_as_nn_conv3d(cin, cout, kernel, side, bias):
    plain, routed = _pair(cin, cout, kernel, bias)
    x = torch.randn(1, cin, side, side, side + 1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), routed(xb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    # The routing exists only for float32, so compare there, with a bound derived from the sums: every element of
    # y is a float32 sum of n = C_in·k³ products (+ the bias), of grad_x of n = C_out·k³, of grad_W and grad_b of n =
    # the output voxels. slow_conv3d (im2col + GEMM) and oneDNN (whose blocking depends on the CPU's ISA) sum them in
    # different orders; any order is within γ_n·Σ|terms| of the exact sum (support.fp32_sum_bound), so the two are
    # within 2·γ_n·Σ|terms| elementwise, hence in norm: ‖routed − plain‖ ≤ 2·γ_n·‖M‖, M the Σ|terms| (_magnitudes).
    kernel_volume, voxels = math.prod(kernel), ya[0, 0].numel()
    terms = [cin * kernel_volume + int(bias), cout * kernel_volume, voxels, voxels]
    pairs = [(yb, ya), (xb.grad, xa.grad), (routed.weight.grad, plain.weight.grad)]
    if bias:
        pairs.append((routed.bias.grad, plain.bias.grad))
    for (ours, theirs), n, magnitude in zip(pairs, terms, _magnitudes(plain, x, grad)):
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
        difference = float((ours.detach().double() - theirs.detach().double()).norm())
        assert difference <= 2 * fp32_sum_bound(n) * float(magnitude.norm()), (n, difference, float(magnitude.norm()))


@pytest.mark.parametrize("cin, cout, kernel, side", ROUTED)
def test_routed_shapes_leave_slow_conv3d_for_onednn(cin, cout, kernel, side):
    torch.set_num_threads(1)  # the suite's setting (conftest); PyTorch's choice depends on it
    plain, routed = _pair(cin, cout, kernel)
    x = torch.randn(1, cin, side, side, side, requires_grad=True)
    assert routes_to_onednn(x.shape, plain.weight.shape, plain.stride, plain.dilation, 1)
    assert any("slow_conv3d" in k for k in _kernels(plain, x))
    used = _kernels(routed, x)
    assert not any("slow_conv3d" in k for k in used)
    assert any("mkldnn" in k for k in used)


@pytest.mark.parametrize("cin, cout, kernel, side", NOT_ROUTED)
def test_other_shapes_keep_pytorch_kernel(cin, cout, kernel, side):
    plain, _ = _pair(cin, cout, kernel)
    assert not routes_to_onednn((1, cin, side, side, side), plain.weight.shape, plain.stride, plain.dilation, 1)


def test_routes_only_batch_one_fp32_outside_autocast(monkeypatch):
    import dints3d.spaces.dints.cpu_conv as cpu_conv

    calls = []
    original = cpu_conv._DuplicatedInputConv.apply
    monkeypatch.setattr(cpu_conv._DuplicatedInputConv, "apply", lambda *a: calls.append(1) or original(*a))
    _, routed = _pair(*ROUTED[0][:3])
    routed(torch.randn(1, 32, 8, 8, 8))
    assert len(calls) == 1  # the routed case does go through the grouped form
    routed(torch.randn(2, 32, 8, 8, 8))  # batch 2: PyTorch already picks oneDNN
    routed.double()(torch.randn(1, 32, 8, 8, 8, dtype=torch.float64))  # fp64: not the fp32 rule
    routed.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = routed(torch.randn(1, 32, 8, 8, 8))
    assert y.dtype == torch.bfloat16
    assert len(calls) == 1


def test_backward_saves_the_input_not_its_duplicate():
    """Activation memory does not grow: the graph keeps x (and W), not the 2·C concatenation."""
    _, routed = _pair(*ROUTED[0][:3])
    x = torch.randn(1, 32, 8, 8, 8, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        routed(x)
    assert x.shape in saved
    assert all(s[1] != 64 for s in saved if len(s) == 5 and s[0] == 1)


def test_routing_keeps_parameters_and_state_dict():
    model = nn.Sequential(nn.Conv3d(4, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv3d(8, 8, 1)), nn.Conv2d(8, 8, 3))
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert route_cpu_convolutions(model) == 2
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert isinstance(model[0], OneDnnConv3d) and isinstance(model[2][0], OneDnnConv3d)
    assert type(model[3]) is nn.Conv2d


def test_supernet_routes_by_default_and_on_request_only():
    from dints3d.spaces.dints.supernet import DintsSearchSpace

    small = dict(num_blocks=2, num_depths=2, channel_mul=0.25)
    routed = DintsSearchSpace(1, 3, **small)
    plain = DintsSearchSpace(1, 3, cpu_conv_routing=False, **small)
    assert any(isinstance(m, OneDnnConv3d) for m in routed.modules())
    assert not any(isinstance(m, OneDnnConv3d) for m in plain.modules())
    plain.load_state_dict(routed.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    # Routing exists only in float32. The two networks run every op alike except the routed convolutions, which sum
    # the same products in another order, so they differ only by float32 rounding. Its size for this network on this
    # CPU (whose kernels set the summation order) is measured against the same weights run in float64:
    # e = ‖plain − exact‖ (~4e-6·‖exact‖). Each float32 output is within ~e of the exact one, so within ~2e of the
    # other (observed ≤ 0.25e with AVX-512, AVX2 and SSE4.1 kernels); a routing that changed the function would
    # be off by O(‖exact‖).
    exact = copy.deepcopy(plain).double()(x.double()).detach()
    ours, theirs = routed(x).detach().double(), plain(x).detach().double()
    rounding = float((theirs - exact).norm())
    assert rounding < 1e-3 * float(exact.norm())  # a sanity check: the float64 run is the same network
    assert float((ours - theirs).norm()) <= 2 * rounding
