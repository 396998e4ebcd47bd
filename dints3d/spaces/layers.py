"""Dimension-generic tensor helpers shared by the search spaces."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def interpolation_mode(spatial_dims: int) -> str:
    return ("linear", "bilinear", "trilinear")[spatial_dims - 1]


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``B C [spatial]`` → ``B C [size]`` by (bi/tri)linear interpolation; a no-op when the size already matches."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode=interpolation_mode(x.dim() - 2), align_corners=False)
