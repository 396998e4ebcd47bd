"""Test-wide settings: one CPU thread (tiny tensors run fastest single-threaded, and CI machines are shared)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# --- Numerical comparisons that hold on any CPU ---------------------------------------------------------------------
# Equivalence tests (ours against MONAI, a second implementation or brute force) compare in float64 where the ops
# allow it: float32 results move with the CPU's kernels (oneDNN and ATen pick AVX-512, AVX2 or SSE4.1 code, which
# sum in different orders), float64 results move ~2^29 times less. Comparisons that must stay float32 derive their
# bound from the computation with fp32_sum_bound.

#: Unit roundoff of float32 (half its machine epsilon): one rounding moves a value by at most U32·|value|.
U32 = 2.0**-24

#: Bound on rel_error for float64 equivalence tests. In float32 these comparisons differ by up to ~1.4e-4 (fused-cell
#: weight gradients against MONAI's, on an AVX-512 CPU); float64's unit roundoff is 2^-53 / 2^-24 ≈ 1.9e-9 times
#: float32's, so the same summation-order effects give ≲ 3e-13 (observed ≤ 1.4e-14). 1e-10 leaves a margin of more than
#: 300 over that, and is still ~10^7 below a real discrepancy (a missing term or a wrong scale is ≥ 1e-3).
F64_RTOL = 1e-10


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected| (computed in float64): the difference relative to the scale of the
    result, not per element, so entries that happen to be near zero need no hand-picked absolute tolerance."""
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


def fp32_sum_bound(n: int) -> float:
    """γ_n = n·u / (1 − n·u), u = 2^-24: a float32 sum (or dot product) of n terms, in any order and blocking, is
    within γ_n·Σ|terms| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1).
    Two float32 evaluations of the same sum, in different orders, are thus within 2·γ_n·Σ|terms| of each other."""
    assert n * U32 < 0.5
    return n * U32 / (1 - n * U32)
