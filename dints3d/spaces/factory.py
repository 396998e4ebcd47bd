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
            checkpoint_fraction=s.checkpoint_fraction, cpu_conv_routing=s.cpu_conv_routing,
        )
    if cfg.space == "autodeeplab":
        from dints3d.errors import DintsError
        from dints3d.spaces.autodeeplab import AutoDeepLabSearchSpace

        a = cfg.autodeeplab
        if a.num_classes is not None and a.num_classes != num_classes:
            raise DintsError("autodeeplab.num_classes", f"is {a.num_classes} but the data has {num_classes} classes")
        return AutoDeepLabSearchSpace(
            in_channels=in_channels, num_classes=num_classes, num_layers=a.num_layers, num_blocks=a.num_blocks,
            filter_multiplier=a.filter_multiplier, spatial_dims=a.spatial_dims, supernet=a.supernet,
            checkpoint_cells=cfg.search.checkpoint_cells,
        )
    if cfg.space == "dpc":
        from dints3d.errors import DintsError

        raise DintsError("space", "dpc has no supernet: it is searched by random search (`dints3d random-search`)")
    raise NotImplementedError(cfg.space)  # config validation admits only implemented spaces
