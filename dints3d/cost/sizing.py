"""Sizing a network to a memory budget: the width (``channel_mul``) whose predicted training peak comes closest to a
target, so that networks are compared at equal memory (as nnU-Net's presets are sized to a GPU)."""

from __future__ import annotations

import math
from typing import Sequence

from dints3d.cost.memory import meta_network, predict_training_memory
from dints3d.spaces.base import Architecture


def peak_bytes(arch: Architecture, in_channels: int, out_channels: int, patch: Sequence[int], channel_mul: float,
               batch: int, amp: bool, device: str = "cuda") -> int:
    """The predicted peak bytes of one training step (SGD momentum) of ``arch`` at ``channel_mul``."""
    model = meta_network(arch, in_channels, out_channels, channel_mul=channel_mul)
    return predict_training_memory(model, (in_channels, *patch), batch=batch, amp=amp, device=device)["peak"]


def channel_mul_for_memory(arch: Architecture, in_channels: int, out_channels: int, patch: Sequence[int],
                           target_bytes: int, batch: int = 2, amp: bool = True, device: str = "cuda",
                           low: float = 1 / 16, high: float = 8.0, steps: int = 14) -> tuple[float, int]:
    """The ``channel_mul`` in [``low``, ``high``] whose predicted peak is closest to ``target_bytes`` (bisection in
    log space; the peak grows with the width), and that peak."""
    def peak(mul: float) -> int:
        return peak_bytes(arch, in_channels, out_channels, patch, mul, batch, amp, device)

    best = min(((mul, peak(mul)) for mul in (low, high)), key=lambda mp: abs(mp[1] - target_bytes))
    lo, hi = math.log(low), math.log(high)
    for _ in range(steps):
        mid = math.exp((lo + hi) / 2)
        value = peak(mid)
        if abs(value - target_bytes) < abs(best[1] - target_bytes):
            best = (mid, value)
        if value < target_bytes:
            lo = math.log(mid)
        else:
            hi = math.log(mid)
    return round(best[0], 4), best[1]
