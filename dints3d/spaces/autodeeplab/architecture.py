"""A decoded Auto-DeepLab network (Liu et al., CVPR 2019) in its ``arch.json`` form: the network-level path
through the trellis and the cell genotype; builds :class:`~dints3d.spaces.autodeeplab.network.AutoDeepLabNet`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from dints3d.spaces.autodeeplab.figure import autodeeplab_figure
from dints3d.spaces.autodeeplab.network import AutoDeepLabNet
from dints3d.spaces.autodeeplab.operations import CELL_OPERATIONS
from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import matplotlib_available


@dataclass
class AutoDeepLabArchitecture(Architecture):
    """A decoded Auto-DeepLab network.

    Attributes:
        network_path: level (0 = stride 4 … 3 = stride 32) of each of the L layers; starts at level 0 or 1 and moves
            at most one level per layer.
        cell: two (input, operation) pairs per block; input 0 = H^{l-2}, 1 = H^{l-1}, 2 + j = block j.
        filter_multiplier: F (block channels F·s/4 at stride s).
    """

    space: ClassVar[str] = "autodeeplab"

    network_path: list[int]
    cell: list[tuple[int, str]]
    filter_multiplier: int = 20
    num_levels: int = 4
    spatial_dims: int = 2
    provenance: dict = field(default_factory=dict)

    display_name: ClassVar[str] = "Auto-DeepLab"

    def headline(self) -> str:
        return (f"Auto-DeepLab network ({self.num_layers} layers, final stride {self.strides[-1]}, "
                f"{self.num_blocks}-block cell)")

    def summary(self, channel_mul: float = 1.0) -> dict[str, Any]:
        """Path, strides, cell, and the filter multiplier F of a network built with ``channel_mul``."""
        return {"num_layers": self.num_layers, "num_blocks": self.num_blocks, "spatial_dims": self.spatial_dims,
                "filter_multiplier": max(1, round(self.filter_multiplier * channel_mul)),
                "network_path": self.network_path, "strides": self.strides, "cell": [list(p) for p in self.cell]}

    @property
    def num_layers(self) -> int:
        return len(self.network_path)

    @property
    def num_blocks(self) -> int:
        return len(self.cell) // 2

    @property
    def strides(self) -> list[int]:
        return [4 * 2**level for level in self.network_path]

    def to_dict(self) -> dict:
        return {
            "space": self.space,
            "version": ARCH_FORMAT_VERSION,
            "network_path": [int(v) for v in self.network_path],
            "cell": [[int(i), op] for i, op in self.cell],
            "filter_multiplier": int(self.filter_multiplier),
            "num_blocks": self.num_blocks,
            "num_layers": self.num_layers,
            "num_levels": int(self.num_levels),
            "spatial_dims": int(self.spatial_dims),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "AutoDeepLabArchitecture":
        def need(key: str) -> Any:
            if key not in data:
                raise DintsError(source, f"missing key '{key}' in Auto-DeepLab architecture")
            return data[key]

        def integer(key: str, value: Any, low: int) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DintsError(source, f"'{key}' must be an integer ≥ {low}, got {value!r}")
            return value

        path = need("network_path")
        if not isinstance(path, list) or not path:
            raise DintsError(source, "'network_path' must be a non-empty list of levels")
        path = [integer(f"network_path[{i}]", v, 0) for i, v in enumerate(path)]
        cell = need("cell")
        if not isinstance(cell, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cell):
            raise DintsError(source, "'cell' must be a list of [input, operation] pairs")
        cell = [(integer(f"cell[{k}][0]", i, 0), op) for k, (i, op) in enumerate(cell)]
        spatial_dims = data.get("spatial_dims", 2)
        if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
            raise DintsError(source, f"'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise DintsError(source, "'provenance' must be an object")
        arch = cls(
            network_path=path,
            cell=cell,
            filter_multiplier=integer("filter_multiplier", need("filter_multiplier"), 1),
            num_levels=integer("num_levels", data.get("num_levels", 4), 1),
            spatial_dims=spatial_dims,
            provenance=provenance,
        )
        arch.check(source)
        for key in ("num_blocks", "num_layers"):
            if key in data and data[key] != getattr(arch, key):
                raise DintsError(source, f"'{key}' is {data[key]!r} but the codes say {getattr(arch, key)}")
        return arch

    def check(self, source: str | None = None) -> None:
        """A path the trellis allows and a cell whose blocks read earlier states through non-``zero`` operations."""
        for layer, level in enumerate(self.network_path):
            previous = 0 if layer == 0 else self.network_path[layer - 1]
            if not 0 <= level < self.num_levels:
                raise DintsError(source, f"network_path[{layer}] = {level} is outside levels 0..{self.num_levels - 1}")
            if abs(level - previous) > 1:
                raise DintsError(source, f"network_path[{layer}] = {level} jumps more than one level from "
                                 f"{previous} (the stem is level 0)")
        if len(self.cell) < 2 or len(self.cell) % 2:
            raise DintsError(source, f"'cell' needs two [input, operation] pairs per block, got {len(self.cell)} pairs")
        for k, (i, op) in enumerate(self.cell):
            block = k // 2
            if i > block + 1:
                raise DintsError(source, f"cell[{k}]: block {block} can read inputs 0..{block + 1}, not {i}")
            if op not in CELL_OPERATIONS:
                raise DintsError(source, f"cell[{k}]: unknown operation {op!r} (one of {', '.join(CELL_OPERATIONS)})")

    def figure(self, title: str | None = None):
        return autodeeplab_figure(self, title) if matplotlib_available() else None

    def build(self, in_channels: int, out_channels: int, channel_mul: float = 1.0,
              filter_multiplier: int | None = None, **kwargs: Any) -> nn.Module:
        """The discrete network (:class:`AutoDeepLabNet`), ``B in_channels [spatial]`` → ``B out_channels [spatial]``.

        ``filter_multiplier`` replaces F (e.g. 20/32/48 for the S/M/L networks); ``channel_mul`` scales it (rounded,
        at least 1), as ``channel_mul`` scales DiNTS' widths."""
        width = max(1, round((filter_multiplier or self.filter_multiplier) * channel_mul))
        return AutoDeepLabNet(in_channels, out_channels, self.network_path, self.cell, width,
                              spatial_dims=self.spatial_dims, **kwargs)
