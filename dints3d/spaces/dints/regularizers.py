"""DiNTS architecture regularizers (memory, topology, entropy) as loop-free tensor functions.

Equal to MONAI's ``get_ram_cost_usage`` / ``get_topology_entropy`` and the entropy
terms of MONAI's DiNTS search script, but vectorized over layers, paths and patterns and free of host syncs, so they
can run every architecture step on a GPU. Each function computes in float32 (float64 if given float64) with autocast
disabled, so under autocast it still returns float32.

Shapes: L layers, P = 3D − 2 paths per layer, K cell ops, N = 2^P − 1 path patterns, S = 2^D − 1 node sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dints3d.spaces.dints.relaxation import (
    LOG_EPS,
    full_precision,
    path_probabilities,
    working_dtype,
)
from dints3d.spaces.dints.topology import DintsTopology

# MONAI reports memory in MB of float32 activations.
BYTES_TO_MB = 4 / 1024**2


def feature_sizes(
    in_size: Sequence[int],
    filter_nums: Sequence[int],
    num_depths: int,
    spatial_dims: int,
    use_downsample: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-resolution feature-map element counts used by the memory estimate, exactly as MONAI computes them.

    size_d = batch · filter_nums[d] · Π_i (in_size_i // 2^d) / 2^use_downsample.

    Args:
        in_size: (B, C, *spatial) network input shape at the highest search resolution.
        filter_nums: channel counts per resolution (MONAI ``filter_nums``, length ≥ num_depths).
        num_depths: D.
        spatial_dims: 2 or 3.
        use_downsample: whether the stem halves the input.
        device: where to put the result.
    Returns:
        (D,) float32.
    """
    batch, image = int(in_size[0]), [int(s) for s in in_size[-spatial_dims:]]
    # MONAI indexes filter_nums[d] although resolution d carries filter_nums[d + use_downsample] channels, and
    # divides by 2^use_downsample once rather than per spatial axis. Kept as is so σ means the same as in MONAI.
    sizes = [batch * int(filter_nums[d]) * math.prod(s // 2**d for s in image) for d in range(num_depths)]
    return torch.tensor(sizes, dtype=torch.float32, device=device) / 2 ** int(use_downsample)


@full_precision
def memory_usage(
    log_alpha_a: torch.Tensor,
    log_alpha_c: torch.Tensor,
    ram_cost: torch.Tensor,
    out_sizes: torch.Tensor,
    full: bool = False,
) -> torch.Tensor:
    """Expected activation memory in MB (MONAI ``get_ram_cost_usage(in_size, full)``).

    M = 4/1024² · Σ_l Σ_j η_lj (1 + Σ_k ram_cost_ljk softmax(α_lj)_k) · out_sizes_j; ``full`` sets η = 1 (the cell
    softmax, and its gradient, stay).

    Args:
        log_alpha_a: (L, P) path logits β.
        log_alpha_c: (L, P, K) cell-op logits α.
        ram_cost: (L, P, K) memory per op in output-size units (MONAI ``TopologySearch.ram_cost``).
        out_sizes: (P,) feature size at each path's output node, e.g. ``feature_sizes(...)[topology.path_out]``.
        full: every path active.
    Returns:
        () scalar.
    """
    dtype = working_dtype(log_alpha_a)
    cell = torch.softmax(log_alpha_c.to(dtype), dim=-1)
    per_path = 1 + (ram_cost.to(dtype) * cell).sum(-1)
    if not full:
        per_path = per_path * path_probabilities(log_alpha_a)
    return (per_path * out_sizes.to(dtype)).sum() * BYTES_TO_MB


def memory_ratio(
    log_alpha_a: torch.Tensor, log_alpha_c: torch.Tensor, ram_cost: torch.Tensor, out_sizes: torch.Tensor
) -> torch.Tensor:
    """M / M_full, the expected fraction of the full supernet's memory. Arguments as :func:`memory_usage`; () scalar."""
    usage = memory_usage(log_alpha_a, log_alpha_c, ram_cost, out_sizes)
    return usage / memory_usage(log_alpha_a, log_alpha_c, ram_cost, out_sizes, full=True)


def memory_loss(
    log_alpha_a: torch.Tensor,
    log_alpha_c: torch.Tensor,
    ram_cost: torch.Tensor,
    out_sizes: torch.Tensor,
    ram_cost_factor: float,
) -> torch.Tensor:
    """|σ − M / M_full| with σ = ``ram_cost_factor`` (0.8 in the reference configs). () scalar."""
    return (ram_cost_factor - memory_ratio(log_alpha_a, log_alpha_c, ram_cost, out_sizes)).abs()


@full_precision
def topology_loss(pattern_probs: torch.Tensor, topology: DintsTopology) -> torch.Tensor:
    """Cross-entropy between consecutive layers' node-set distributions (MONAI ``get_topology_entropy``).

    For l < L − 1 and node set n: p = Σ P_l(c) over patterns c whose OUTPUT node set is n, q = Σ P_{l+1}(c) over
    patterns whose INPUT node set is n; loss = −Σ [p log(q + 1e-5) + (1 − p) log(1 − q + 1e-5)].

    Args:
        pattern_probs: (L, N) from :func:`pattern_probabilities`.
        topology: tables for the same D, on the same device.
    Returns:
        () scalar (0 for L = 1).
    """
    dtype = working_dtype(pattern_probs)
    probs = pattern_probs.to(dtype)
    # Per-set sums as a matmul with one-hots: deterministic on GPU, unlike index_add's atomics.
    p_out = probs[:-1] @ topology.pattern_out_onehot.to(dtype)
    q_in = probs[1:] @ topology.pattern_in_onehot.to(dtype)
    return -(p_out * torch.log(q_in + LOG_EPS) + (1 - p_out) * torch.log(1 - q_in + LOG_EPS)).sum()


@full_precision
def path_entropy(pattern_probs: torch.Tensor) -> torch.Tensor:
    """H_a = −mean over L×N of P log(P + 1e-5). (L, N) → () scalar."""
    probs = pattern_probs.to(working_dtype(pattern_probs))
    return -(probs * torch.log(probs + LOG_EPS)).mean()


@full_precision
def op_entropy(log_alpha_c: torch.Tensor) -> torch.Tensor:
    """H_c = −mean over L×P×K of softmax(α) · log_softmax(α). (L, P, K) → () scalar."""
    alpha = log_alpha_c.to(working_dtype(log_alpha_c))
    return -(torch.softmax(alpha, dim=-1) * torch.log_softmax(alpha, dim=-1)).mean()
