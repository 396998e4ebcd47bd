"""Stateless schedules (a pure function of the iteration, so resuming needs no scheduler state)."""

from __future__ import annotations

import math
from typing import Sequence


def warmup_iterations(iterations: int, warmup_fraction: float) -> int:
    return int(round(iterations * warmup_fraction))


def weight_lr_factor(t: int, iterations: int, warmup: int, decay_points: Sequence[float]) -> float:
    """Constant during warm-up, then halved each time post-warm-up progress passes a point (e.g. 40%, 80%)."""
    if t < warmup or iterations <= warmup:
        return 1.0
    progress = (t - warmup) / (iterations - warmup)
    return 0.5 ** sum(progress >= p for p in decay_points)


def cosine_lr(t: int, iterations: int, lr: float, lr_min: float) -> float:
    """Cosine annealing from ``lr`` at t = 0 to ``lr_min`` at the last iteration (Auto-DeepLab's search)."""
    progress = t / max(1, iterations - 1)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(progress, 1.0)))


def weight_lr(t: int, iterations: int, warmup: int, lr: float, schedule: str, decay_points: Sequence[float],
              lr_min: float) -> float:
    """The weight optimizer's learning rate at iteration ``t`` for the configured schedule."""
    if schedule == "cosine":
        return cosine_lr(t, iterations, lr, lr_min)
    return lr * weight_lr_factor(t, iterations, warmup, decay_points)


def regularizer_ramp(t: int, iterations: int, warmup: int) -> float:
    """w(t): 0 at the end of warm-up, rising linearly to 1 at the last iteration."""
    if t < warmup or iterations <= warmup:
        return 0.0
    return min(1.0, (t - warmup) / max(1, iterations - 1 - warmup))
