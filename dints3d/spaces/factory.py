"""Build the configured search space (``cfg.space``) for a task's channels and classes."""

from __future__ import annotations

from dints3d.config import Config
from dints3d.spaces.base import SearchSpace


def build_search_space(cfg: Config, in_channels: int, num_classes: int) -> SearchSpace:
    if cfg.space == "dints":
        from dints3d.spaces.dints import DintsSearchSpace

        d, s = cfg.dints, cfg.search
        return DintsSearchSpace(
            in_channels=in_channels, num_classes=num_classes, num_blocks=d.num_blocks, num_depths=d.num_depths,
            channel_mul=d.channel_mul, use_downsample=d.use_downsample, spatial_dims=d.spatial_dims,
            ram_cost_factor=s.ram_cost_factor, entropy_weight=s.entropy_weight, memory_weight=s.memory_weight,
            topology_weight=s.topology_weight, checkpoint_cells=s.checkpoint_cells,
        )
    raise NotImplementedError(cfg.space)  # config validation admits only implemented spaces
