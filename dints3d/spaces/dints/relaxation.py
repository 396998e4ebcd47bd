"""The DiNTS continuous relaxation: path logits β → path and path-pattern probabilities.

The supernet's forward weighs each path by its marginal η (:func:`path_probabilities`); the regularizers and the
decoder read the distribution over each layer's path patterns (:func:`pattern_probabilities`). Both equal MONAI's
``TopologySearch.get_prob_a`` but are vectorized, computed in float32 (float64 if given float64) with autocast off.

Shapes: L layers, P = 3D − 2 paths per layer, N = 2^P − 1 non-empty path patterns.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# MONAI's constant inside the logs of the topology and path entropies.
LOG_EPS = 1e-5


def full_precision(fn):
    """Run ``fn`` with autocast off on its first argument's device; bf16/fp16 products lose too much here."""

    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        device_type = first.device.type
        if torch.amp.is_autocast_available(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


def working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@full_precision
def path_probabilities(log_alpha_a: torch.Tensor) -> torch.Tensor:
    """Path marginals η = σ(β) / (1 − Π_j (1 − σ(β_j))): the empty pattern is removed and the rest renormalised.

    Args:
        log_alpha_a: (L, P) path logits β.
    Returns:
        (L, P) η (MONAI ``get_prob_a()[1]``).
    """
    beta = log_alpha_a.to(working_dtype(log_alpha_a))
    # 1 − Π(1 − σ) = −expm1(Σ log σ(−β)), exact even when every σ is tiny.
    norm = -torch.expm1(F.logsigmoid(-beta).sum(-1, keepdim=True))
    return torch.sigmoid(beta) / norm


@full_precision
def pattern_probabilities(log_alpha_a: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Probability of every non-empty path pattern c in each layer (MONAI ``get_prob_a(child=True)[0]``).

    P(c) = Π_j [c_j σ(β_j) + (1 − c_j)(1 − σ(β_j))] / (1 − Π_j (1 − σ(β_j))), evaluated in log space as
    log P(c) = β·c + A − log(1 − e^A) with A = Σ_j log σ(−β_j), because log σ(β) − log σ(−β) = β.

    Args:
        log_alpha_a: (L, P) path logits β.
        patterns: (N, P) 0/1 patterns (``DintsTopology.patterns``).
    Returns:
        (L, N) pattern probabilities; each row sums to 1.
    """
    dtype = working_dtype(log_alpha_a)
    beta = log_alpha_a.to(dtype)
    log_empty = F.logsigmoid(-beta).sum(-1, keepdim=True)
    log_probs = beta @ patterns.to(dtype).T + log_empty - torch.log(-torch.expm1(log_empty))
    return torch.exp(log_probs)
