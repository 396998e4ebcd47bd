"""The spaces by name: reading any ``arch.json`` or packaged preset and building the configured supernet. The one
module that knows every space (each space package knows only itself)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from dints3d.config import Config
from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.supernet import AutoDeepLabSearchSpace
from dints3d.spaces.base import Architecture, SearchSpace, check_document
from dints3d.spaces.baselines.networks import BASELINES, plan_baseline
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    network_options,
    stem_stride_for_spacing,
)
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.dpc.architecture import DpcArchitecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

#: space name → its architecture class (the ``space`` field of ``arch.json``)
ARCHITECTURES: dict[str, type[Architecture]] = {cls.space: cls for cls in (
    DintsArchitecture, AutoDeepLabArchitecture, DpcArchitecture, *BASELINES.values())}
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def architecture_from_dict(data: Any, source: str | None = None) -> Architecture:
    """Dispatch on ``data["space"]``."""
    return ARCHITECTURES[check_document(data, tuple(ARCHITECTURES), source)].from_dict(data, source)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_architecture(path_or_preset: str | os.PathLike, plan: Mapping | None = None,
                      deep_supervision: bool = True) -> Architecture:
    """Read an ``arch.json`` file, a packaged preset by name (e.g. ``dints-cvpr``), or a baseline by name
    (``segresnet``, ``dynunet``: sized for ``plan``, with output heads on coarser levels if ``deep_supervision``)."""
    path = Path(path_or_preset)
    if not path.exists():
        preset = PRESET_DIR / f"{path_or_preset}.json"
        if os.fspath(path_or_preset) in BASELINES:
            if plan is None:
                raise DintsError(path_or_preset, "a baseline is sized from a prepared task's plan (give --work)")
            return plan_baseline(os.fspath(path_or_preset), plan, deep_supervision)
        if preset.exists():
            path = preset
        else:
            presets = ", ".join(list_presets()) or "none"
            raise DintsError(path_or_preset, f"no such arch file or preset (presets: {presets}; baselines sized "
                             f"from the task: {', '.join(sorted(BASELINES))})")
    return architecture_from_dict(read_json(path), os.fspath(path))


def dints_stem_stride(cfg: Config, spacing: Sequence[float] | None) -> tuple[int, ...] | None:
    """The DiNTS stems' stride per axis for the plan's target ``spacing`` (``dints.anisotropic_stem``), or None."""
    d = cfg.dints
    if not d.anisotropic_stem or not spacing:
        return None
    return network_options(d.use_downsample, d.stem_skip, stem_stride_for_spacing(spacing))["stem_stride"]


def build_search_space(cfg: Config, in_channels: int, num_classes: int,
                       spacing: Sequence[float] | None = None) -> SearchSpace:
    """The configured supernet (``cfg.space``) for a task's channels, classes and target voxel ``spacing`` (mm; sets
    the DiNTS stems' strides for anisotropic voxels, :func:`dints_stem_stride`)."""
    if cfg.space == "dints":
        d, s = cfg.dints, cfg.search
        return DintsSearchSpace(
            in_channels=in_channels, num_classes=num_classes, num_blocks=d.num_blocks, num_depths=d.num_depths,
            channel_mul=d.channel_mul, use_downsample=d.use_downsample, spatial_dims=d.spatial_dims,
            ram_cost_factor=s.ram_cost_factor, entropy_weight=s.entropy_weight, memory_weight=s.memory_weight,
            topology_weight=s.topology_weight, checkpoint_cells=s.checkpoint_cells,
            checkpoint_fraction=s.checkpoint_fraction, cpu_conv_routing=s.cpu_conv_routing, hard_budget=s.hard_budget,
            stem_skip=d.stem_skip, stem_stride=dints_stem_stride(cfg, spacing),
        )
    if cfg.space == "autodeeplab":
        a = cfg.autodeeplab
        if a.num_classes is not None and a.num_classes != num_classes:
            raise DintsError("autodeeplab.num_classes", f"is {a.num_classes} but the data has {num_classes} classes")
        return AutoDeepLabSearchSpace(
            in_channels=in_channels, num_classes=num_classes, num_layers=a.num_layers, num_blocks=a.num_blocks,
            filter_multiplier=a.filter_multiplier, spatial_dims=a.spatial_dims, supernet=a.supernet,
            checkpoint_cells=cfg.search.checkpoint_cells,
        )
    if cfg.space == "dpc":
        raise DintsError("space", "dpc has no supernet: it is searched by random search (`dints3d random-search`)")
    raise NotImplementedError(cfg.space)  # config validation admits only implemented spaces
