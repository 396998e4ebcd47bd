"""The DiNTS cell's operation set: what ``arch_code_c`` indexes (MONAI ``Cell``'s ``OPS_3D`` / ``OPS_2D`` order)."""

from __future__ import annotations

OPERATIONS_3D = ("skip_connect", "conv_3x3x3", "conv_3x3x1", "conv_3x1x3", "conv_1x3x3")
OPERATIONS_2D = ("skip_connect", "conv_3x3")



def operation_names(spatial_dims: int) -> tuple[str, ...]:
    return OPERATIONS_3D if spatial_dims == 3 else OPERATIONS_2D
