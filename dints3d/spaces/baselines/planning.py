"""nnU-Net's rule for the resolution stages of a U-Net, from the plan's target spacing and patch: an axis is
downsampled (stride 2) only while its spacing is within 2× of the finest axis' and its feature map stays at least
:data:`MIN_FEATURE_MAP` voxels; a stage's kernel is 3 on axes within 2× of the finest spacing and 1 on coarser
ones (3×3×1-style kernels on thick slices)."""

from __future__ import annotations

from typing import Sequence

#: the smallest feature-map side nnU-Net downsamples to
MIN_FEATURE_MAP = 4
#: at most this many downsamplings (nnU-Net's 3D full-resolution networks have 5 or 6 stages)
MAX_DOWNSAMPLINGS = 5


def unet_stages(spacing: Sequence[float], patch: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP,
                max_downsamplings: int = MAX_DOWNSAMPLINGS) -> tuple[list[list[int]], list[list[int]]]:
    """(kernel sizes, strides) per stage; stage 0 has stride 1 on every axis."""
    spacing, size = [float(s) for s in spacing], [int(p) for p in patch]

    def kernel(current: list[float]) -> list[int]:
        return [3 if s <= 2 * min(current) else 1 for s in current]

    kernels, strides = [kernel(spacing)], [[1] * len(size)]
    while len(strides) <= max_downsamplings:
        finest = min(spacing)
        stride = [2 if s <= 2 * finest and n % 2 == 0 and n // 2 >= min_feature_map else 1
                  for s, n in zip(spacing, size)]
        if all(st == 1 for st in stride):
            break
        size = [n // st for n, st in zip(size, stride)]
        spacing = [s * st for s, st in zip(spacing, stride)]
        kernels.append(kernel(spacing))
        strides.append(stride)
    return kernels, strides


def stage_count(patch: Sequence[int], min_feature_map: int = MIN_FEATURE_MAP,
                max_downsamplings: int = MAX_DOWNSAMPLINGS) -> int:
    """Resolution stages of an isotropic encoder whose smallest map keeps ``min_feature_map`` voxels a side."""
    side, stages = min(int(p) for p in patch), 1
    while stages <= max_downsamplings and side % 2 == 0 and side // 2 >= min_feature_map:
        side //= 2
        stages += 1
    return stages
