"""A fused forward for MONAI's DiNTS search cells: the same modules and parameters, less repeated work.

A supernet cell on path (l, j) computes ``η_lj · Σ_k softmax(α_lj)_k · op_k(pre(x))`` with op_0 = skip and the other
ops ``act → conv(s) → InstanceNorm(affine)``. MONAI runs this literally: every conv op applies its own ReLU to the
same tensor (and saves its own copy for backward), then each op's output is scaled and summed in a separate pass.
:func:`cell_forward` computes the identical function with

- one ReLU per tensor, shared by the four conv ops of a cell and, for same-resolution and down cells, by every cell
  that reads the same node (``relu_x``; ``relu ∘ relu = relu``); under autocast it is cast to the low-precision
  dtype once (:func:`activation`) instead of once per convolution, and that one copy is what the convolutions save
  for backward;
- the scales ``s_k = η · softmax(α)_k`` folded into the InstanceNorm affine (``s·(γ x̂ + β) = (sγ) x̂ + sβ``), so no
  separate multiply or saved product per op;
- in-place accumulation into one output tensor per cell (sums save nothing for backward).

All on tensors, no host sync; any op that does not have the expected ``act → … → InstanceNorm`` shape falls back to
``op(z) * s_k``. Shapes: x ``B C_in [spatial]``, output ``B C_out [spatial']``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_NORMS = (nn.InstanceNorm2d, nn.InstanceNorm3d)


def _foldable(op: nn.Module) -> bool:
    """``op`` is ``Sequential(ReLU, …, InstanceNorm(affine, batch statistics))``."""
    if not isinstance(op, nn.Sequential) or len(op) < 3:
        return False
    norm = op[-1]
    return (isinstance(op[0], nn.ReLU) and isinstance(norm, _NORMS) and norm.affine
            and not norm.track_running_stats)


def _scaled_norm(norm: nn.Module, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale · norm(u)`` in one instance-norm call (scale folded into the affine parameters)."""
    return F.instance_norm(u, weight=norm.weight * scale, bias=norm.bias * scale, eps=norm.eps)


def activation(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)`` as the convolutions will read it: in autocast's low-precision dtype when autocast is on (where
    every convolution would otherwise cast its own copy). Rounding commutes with ReLU, so the values are the ones
    each convolution would have seen; only the gradients of the (up to five) readers are summed in that dtype."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    return torch.relu(x)


def _preprocess(pre: nn.Module, x: torch.Tensor, relu_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cell's resolution change: ``(z, relu(z) if already known else None)``."""
    if isinstance(pre, nn.Identity):
        return x, relu_x
    if hasattr(pre, "conv_1") and hasattr(pre, "conv_2") and isinstance(getattr(pre, "act", None), nn.ReLU):
        # FactorizedReduceBlock: act → two stride-2 1×1 convs (the second shifted by one voxel) → concat → norm.
        shifted = relu_x[(slice(None), slice(None)) + (slice(1, None),) * (relu_x.dim() - 2)]
        return pre.norm(torch.cat([pre.conv_1(relu_x), pre.conv_2(shifted)], dim=1)), None
    return pre(x), None


def accumulate(total: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """``total + term``, in place when the sum keeps ``total``'s dtype (autograd saves no operand of a sum)."""
    return total.add_(term) if torch.result_type(total, term) == total.dtype else total + term


def cell_forward(cell: nn.Module, x: torch.Tensor, relu_x: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    """``Σ_k scales[k] · op_k(cell.preprocess(x))`` for a MONAI ``Cell`` whose ``MixedOp`` holds every op.

    Args:
        cell: ``monai.networks.nets.dints.Cell`` of the search space.
        x: the cell's input node ``B C_in [spatial]``.
        relu_x: ``activation(x)`` if the caller shares it between cells, else None (computed here).
        scales: (K,) per-op scales, ``η_lj · softmax(α_lj)``.
    Returns:
        ``B C_out [spatial']``, a fresh tensor the caller may accumulate into in place.
    """
    if relu_x is None:
        relu_x = activation(x)
    z, relu_z = _preprocess(cell.preprocess, x, relu_x)
    out: torch.Tensor | None = None
    for k, op in enumerate(cell.op.ops):
        if isinstance(op, nn.Identity):
            term = z * scales[k]
        elif _foldable(op):
            if relu_z is None:
                relu_z = activation(z)
            u = relu_z
            for layer in list(op)[1:-1]:
                u = layer(u)
            term = _scaled_norm(op[-1], u, scales[k])
        else:
            term = op(z) * scales[k]
        out = term if out is None else accumulate(out, term)
    assert out is not None, "a search cell has at least one operation"
    return out
