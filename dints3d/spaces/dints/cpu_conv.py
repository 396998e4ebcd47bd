"""Route batch-1 CPU fp32 3-D convolutions to oneDNN instead of PyTorch's ``slow_conv3d``.

PyTorch picks a CPU convolution kernel with a heuristic tuned on 2-D images (``ConvParams::use_mkldnn`` in ATen's
``Convolution.cpp``, restated in :func:`uses_slow_conv3d`): a batch of one volume with few channels goes to
``slow_conv3d`` (im2col + GEMM), which for DiNTS's shapes is 2–5× slower, forward and backward, than oneDNN. The
heuristic admits oneDNN for any grouped convolution, and a convolution equals a 2-group convolution of its input
concatenated with itself, each group producing half of the output channels with the same weights:

    conv(x, W) = conv([x, x], W, groups=2)        W: C_out × C_in × k…, C_out even

The same multiply-adds, the same result up to summation order. :class:`OneDnnConv3d` applies it where PyTorch would
take ``slow_conv3d`` and oneDNN would take the grouped form; the duplicated input lives only inside the call (the
custom backward rebuilds it), so activation memory does not grow. CUDA, autocast (oneDNN already) and every other
case run the ordinary ``nn.Conv3d`` path. :func:`route_cpu_convolutions` switches a model's ``nn.Conv3d`` modules
to it in place (same parameters, same ``state_dict``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def uses_slow_conv3d(input_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int], groups: int, threads: int) -> bool:
    """Whether PyTorch runs an fp32 CPU 3-D convolution with ``slow_conv3d`` (im2col + GEMM) rather than oneDNN.

    The rule of ``ConvParams::use_mkldnn``: oneDNN needs (a strided or dilated conv, a batch ≥ 16, a kernel whose
    last two sides are not both 1, or several threads) and (groups > 1, both last kernel sides > 3, a batch > 1, or
    ``N·C·D·H > 20480``). So batch-1 volumes with few channels take the slow path."""
    n, c, d, h = input_shape[:4]
    kh, kw = weight_shape[-2:]
    strided = any(s != 1 for s in stride) or any(x != 1 for x in dilation)
    first = strided or n >= 16 or kw != 1 or kh != 1 or threads > 1
    second = groups > 1 or (kw > 3 and kh > 3) or n > 1 or n * c * d * h > 20480
    return not (first and second)


class _DuplicatedInputConv(torch.autograd.Function):
    """``conv3d([x, x], W, groups=2)`` that saves ``x`` (not the concatenation) for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, bias is not None, None if bias is None else bias.shape)
        return F.conv3d(torch.cat([x, x], 1), weight, bias, stride, padding, dilation, groups=2)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias, bias_shape = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, torch.cat([x, x], 1), weight, bias_shape, stride, padding, dilation, False, [0, 0, 0], 2, mask)
        if grad_input is not None:
            half = x.shape[1]
            grad_input = grad_input[:, :half] + grad_input[:, half:]
        return grad_input, grad_weight, grad_bias if mask[2] else None, None, None, None


def routes_to_onednn(input_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int], threads: int) -> bool:
    """Whether :class:`OneDnnConv3d` runs this ungrouped fp32 CPU convolution as the 2-group oneDNN form.

    Where PyTorch would take ``slow_conv3d``, for the shapes oneDNN wins on (measured fwd + bwd on DiNTS's supernet
    shapes, docs/performance.md): stride 1, at least 16 input channels, an even number of output channels and a
    kernel with at least two sides > 1. oneDNN loses on 1×1×1 and single-axis kernels (per-call overhead, and its
    depth-only kernels are slow) and on tiny inputs. Such a kernel has a last side > 1, and the grouped form has
    groups > 1, which is all PyTorch's rule asks of a convolution before it picks oneDNN."""
    return (all(s == 1 for s in stride) and all(d == 1 for d in dilation) and input_shape[1] >= 16
            and weight_shape[0] % 2 == 0 and sum(k > 1 for k in weight_shape[2:]) >= 2
            and uses_slow_conv3d(input_shape, weight_shape, stride, dilation, 1, threads))


def _routable(x: torch.Tensor, conv: nn.Conv3d) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 5 or torch.is_autocast_enabled("cpu"):
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return routes_to_onednn(x.shape, conv.weight.shape, conv.stride, conv.dilation, torch.get_num_threads())


class OneDnnConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose CPU fp32 convolutions that PyTorch would run with ``slow_conv3d`` run through oneDNN
    (module docstring). Input ``B C_in D H W`` → ``B C_out D' H' W'``, as ``nn.Conv3d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _routable(input, self):
            return _DuplicatedInputConv.apply(input, weight, bias, self.stride, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)


def route_cpu_convolutions(model: nn.Module) -> int:
    """Make every plain ``nn.Conv3d`` of ``model`` a :class:`OneDnnConv3d` in place; returns how many changed.

    Only the class changes (parameters, buffers, hooks and ``state_dict`` keys stay), and the routing decides per
    call, so a model moved to CUDA afterwards runs the ordinary path."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDnnConv3d
            changed += 1
    return changed
