"""Typed configuration: YAML files loaded into dataclasses, overridable with ``--set section.key=value``.

Every stage reads one :class:`Config`. Unknown keys and values of the wrong type are refused with a
:class:`~dints3d.utils.errors.DintsError` that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dints3d.utils.errors import DintsError
from dints3d.utils.io import load_yaml_text, read_yaml


@dataclass
class DataConfig:
    """How patches are drawn from a prepared task (``WORK/plan.json`` + ``WORK/datalist.json``)."""

    fold: int = 0  #: validation fold; training uses the other folds' cases
    patch_size: list[int] | None = None  #: None → the plan's patch size
    batch_size: int = 1  #: volumes per step (each gives ``num_samples`` patches)
    num_samples: int = 1  #: random patches cropped per volume per step
    cache_rate: float = 1.0  #: fraction of volumes kept preprocessed in memory (CacheDataset)
    cache_dir: str | None = None  #: if set, also persist preprocessed volumes on disk (PersistentDataset)
    num_workers: int = 0  #: DataLoader workers (0 = main process)
    gpu_cache: bool = False  #: keep cached volumes on the GPU and use ThreadDataLoader
    augment: bool = True  #: random flips/rotations/intensity augmentation in training
    max_cases: int | None = None  #: use at most this many cases per list (quick runs)


@dataclass
class DintsConfig:
    """DiNTS supernet / discrete network shape (MONAI ``TopologySearch`` / ``TopologyInstance`` + ``DiNTS``)."""

    num_blocks: int = 12
    num_depths: int = 4
    channel_mul: float = 0.5  #: search-time width (retraining uses ``train.channel_mul``)
    use_downsample: bool = True
    #: add the stride-2 stem's full-resolution features to the output (a U-Net's first skip); false: the paper's
    #: network. No effect without ``use_downsample`` (the cells then run at full resolution already)
    stem_skip: bool = True
    #: with ``stem_skip``: for anisotropic voxels (plan.json's target spacing), the stems halve only the axes at most
    #: twice as coarse as the finest (nnU-Net's rule); false: they halve every axis, as MONAI's
    anisotropic_stem: bool = True
    spatial_dims: int = 3


@dataclass
class AutoDeepLabConfig:
    """Auto-DeepLab supernet (Liu et al., CVPR 2019): L-layer trellis over strides 4–32, B-block cells."""

    num_layers: int = 12
    num_blocks: int = 5  #: blocks per cell (B)
    filter_multiplier: int = 8  #: F during search (S/M/L networks use 20/32/48)
    spatial_dims: int = 2
    supernet: str = "per_transition"  #: "per_transition" (the paper: one cell per incoming edge) or "mixed_input"
    num_classes: int | None = None  #: None → from the data (19 for Cityscapes)


@dataclass
class SearchConfig:
    """Bilevel search schedule and losses (defaults: the DiNTS reference recipe)."""

    iterations: int = 20000  #: total weight steps
    warmup_fraction: float = 0.5  #: first fraction of iterations updates weights only
    lr: float = 0.025  #: SGD learning rate for weights (× world size when scale_lr)
    momentum: float = 0.9
    weight_decay: float = 4e-5
    lr_schedule: str = "halving"  #: "halving" (DiNTS: ×0.5 at lr_decay_points) or "cosine" (Auto-DeepLab)
    lr_decay_points: list[float] = field(default_factory=lambda: [0.4, 0.8])  #: of post-warm-up progress; ×0.5
    lr_min: float = 0.001  #: final learning rate of the cosine schedule
    arch_lr: float = 0.001  #: Adam learning rate for α and β (× world size when scale_lr)
    arch_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    arch_weight_decay: float = 0.0
    scale_lr: bool = True  #: multiply learning rates by the number of processes (reference recipe)
    ram_cost_factor: float = 0.8  #: σ, target memory ratio M/M_full
    hard_budget: bool = True  #: decode the best topology whose memory ratio is ≤ σ (false: the soft penalty alone)
    memory_budget_gb: float | None = None  #: if set, overrides σ from a predicted training memory in GB
    entropy_weight: float = 1.0
    memory_weight: float = 1.0
    topology_weight: float = 0.001
    amp: bool = True  #: autocast (fp16 + GradScaler on CUDA, bf16 on CPU)
    checkpoint_cells: bool = False  #: activation checkpointing of supernet cells
    #: DiNTS: with checkpoint_cells, checkpoint the cells of the first round(fraction × num_blocks) blocks only
    checkpoint_fraction: float = 1.0
    #: DiNTS: batch-1 CPU fp32 convolutions through oneDNN where PyTorch would pick slow_conv3d (dints3d.spaces.dints.cpu_conv)
    cpu_conv_routing: bool = True
    val_interval: int = 1000  #: iterations between validations (and decode snapshots)
    val_sw_batch_size: int = 1
    val_overlap: float = 0.625
    max_nonfinite_steps: int = 20  #: consecutive non-finite losses before the run stops
    checkpoint_interval: int = 200  #: iterations between "last" checkpoints
    check_replicas: bool = True  #: under torchrun, verify after each architecture step that α/β agree on all ranks


@dataclass
class TrainConfig:
    """Retraining a discrete architecture (searched or baseline) with a recipe (``dints3d/bundle/recipes.py``)."""

    recipe: str = "nnunet"  #: nnunet (nnU-Net's augmentation, SGD Nesterov 0.99, poly decay) or dints (the paper's)
    channel_mul: float = 1.0
    iterations: int = 40000
    lr: float | None = None  #: None → the recipe's (nnunet 0.01, dints 0.025)
    momentum: float | None = None  #: None → the recipe's (nnunet 0.99 Nesterov, dints 0.9)
    weight_decay: float | None = None  #: None → the recipe's (nnunet 3e-5, dints 4e-5)
    lr_decay_points: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])  #: dints recipe only
    deep_supervision: bool = True  #: output heads on coarser decoder levels, for networks that have them
    elastic: bool = False  #: nnunet recipe: also elastic deformation (off, as in nnU-Net v2)

    def optimizer_settings(self, recipe: str | None = None) -> dict[str, float]:
        """``lr``, ``momentum`` and ``weight_decay``: this config's where set, else those of ``recipe`` (default: the
        configured one)."""
        defaults = RECIPES[recipe or self.recipe]
        return {key: float(defaults[key] if getattr(self, key) is None else getattr(self, key))
                for key in ("lr", "momentum", "weight_decay")}
    batch_size: int = 2
    amp: bool = True
    val_interval: int = 1000
    patch_size: list[int] | None = None  #: retraining crop; None → data.patch_size, else the plan's
    image_scale: float | None = None  #: Cityscapes: image scale for retraining and inference; None → the plan's


@dataclass
class DpcConfig:
    """Dense prediction cell (Chen et al., NeurIPS 2018) on a fixed backbone, searched by ``dints3d random-search``
    on cached backbone features (``docs/dpc.md``)."""

    backbone: str = "dints-cvpr"  #: arch.json path or preset of the fixed backbone (its spatial_dims is the cell's)
    backbone_weights: str | None = None  #: state dict of the backbone network (e.g. a bundle's models/model.pt)
    backbone_channel_mul: float = 1.0
    pretrain_iterations: int = 0  #: without backbone_weights: train the backbone this long on the proxy patches
    feature_depth: int = 1  #: backbone resolution feeding the cell (DiNTS: stride 2^(depth + 1))
    num_branches: int = 5
    channels: int = 256  #: output channels of each branch and of the 1×1 projection
    rates: list[int] | None = None  #: atrous rates per axis; None → 1,3,6,…,21 (2D) or 1,2,3,4,6,8 (3D)
    grids: list[int] | None = None  #: pooling grid sizes per axis; None → 1,2,4,8 (2D) or 1,2,4 (3D)
    train_patches: int = 64  #: proxy training patches (2D: slices) whose backbone features are cached
    val_patches: int = 32  #: proxy validation patches
    batch_size: int = 8  #: cached feature maps per head step
    cache_dir: str | None = None  #: feature cache; None → RUN/feature_cache (share one folder to reuse it)


@dataclass
class RandomSearchConfig:
    """Random search: uniform samples mixed with perturbations of the best so far, short-trained and ranked."""

    trials: int = 50  #: architectures to sample (the budget, unless ``hours`` runs out first)
    hours: float | None = None  #: stop starting trials once their summed training time reaches this
    explore_ratio: float = 0.5  #: probability that a trial is uniform (else it perturbs the best so far)
    iterations: int = 300  #: short schedule per trial (network steps; DPC: head steps on cached features)
    top_k: int = 5  #: best trials re-evaluated with the longer schedule
    topk_iterations: int = 1000


@dataclass
class Config:
    """Everything a run needs. ``plan`` overrides fields of ``WORK/plan.json`` (e.g. ``patch_size``)."""

    space: str = "dints"
    seed: int = 0
    device: str = "auto"  #: "auto" (cuda if available), "cpu", "cuda", "cuda:1" …
    data: DataConfig = field(default_factory=DataConfig)
    dints: DintsConfig = field(default_factory=DintsConfig)
    autodeeplab: AutoDeepLabConfig = field(default_factory=AutoDeepLabConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpc: DpcConfig = field(default_factory=DpcConfig)
    random_search: RandomSearchConfig = field(default_factory=RandomSearchConfig)
    plan: dict = field(default_factory=dict)


SPACES = ("dints", "autodeeplab", "dpc")  #: dpc: random search only (dints3d random-search)
#: train.recipe → its optimizer defaults (``train.lr``, ``train.momentum``, ``train.weight_decay`` override them)
RECIPES = {
    "nnunet": {"lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5, "nesterov": True},
    "dints": {"lr": 0.025, "momentum": 0.9, "weight_decay": 4e-5, "nesterov": False},
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(item)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats; NaN and ±inf are not)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except DintsError:
                pass
        raise DintsError(source, f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise DintsError(source, f"'{key}' must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if not math.isfinite(number):
                raise DintsError(source, f"'{key}' must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise DintsError(source, f"'{key}' must be {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def suggest_key(key: str, valid: list[str] | tuple[str, ...], prefix: str = "") -> str:
    """``"; did you mean '<prefix><nearest>'?"``, or the list of valid keys when none is close."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"


def _merge(obj: Any, data: Any, prefix: str, source: str | None) -> Any:
    """Return a copy of dataclass ``obj`` with ``data`` (a mapping) merged in, validating keys and types."""
    if not isinstance(data, dict):
        raise DintsError(source, f"'{prefix or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    updates = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise DintsError(source, f"unknown key '{full}'{suggest_key(str(key), names, prefix)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = _merge(current, value, f"{full}.", source)
        elif hints[key] is dict and isinstance(value, dict):
            updates[key] = {**current, **value}
        else:
            updates[key] = _coerce(value, hints[key], full, source)
    return dataclasses.replace(obj, **updates)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (value in YAML syntax) into (["a", "b"], value)."""
    if "=" not in text:
        raise DintsError("--set", f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DintsError("--set", f"empty key in '{text}'")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def validate(cfg: Config, source: str | None = None, overridden: frozenset[str] = frozenset(),
             origins: Mapping[str, str] | None = None) -> Config:
    """Semantic checks that types alone cannot express. Errors name ``--set`` for keys in ``overridden``, else the
    file ``origins`` gives for the key (an overlay: ``{"data.patch_size": "fit/search.yaml"}``), else ``source``
    (the config file)."""
    d, s, data = cfg.dints, cfg.search, cfg.data
    origins = origins or {}

    def check(ok: bool, key: str, problem: str) -> None:
        if not ok:
            top = key.split(".")[0]
            where = "--set" if key in overridden or top in overridden else origins.get(key, origins.get(top, source))
            raise DintsError(where, f"'{key}' {problem}")

    check(cfg.space in SPACES, "space", f"must be one of {', '.join(SPACES)}, got '{cfg.space}'"
          f"{suggest_key(cfg.space, list(SPACES))}")
    check(d.num_blocks >= 1, "dints.num_blocks", "must be ≥ 1")
    check(d.num_depths >= 1, "dints.num_depths", "must be ≥ 1")
    check(d.spatial_dims in (2, 3), "dints.spatial_dims", f"must be 2 or 3, got {d.spatial_dims}")
    check(d.channel_mul > 0, "dints.channel_mul", "must be > 0")
    adl = cfg.autodeeplab
    for name in ("num_layers", "num_blocks", "filter_multiplier"):
        check(getattr(adl, name) >= 1, f"autodeeplab.{name}", "must be ≥ 1")
    check(adl.spatial_dims in (2, 3), "autodeeplab.spatial_dims", f"must be 2 or 3, got {adl.spatial_dims}")
    check(adl.supernet in ("per_transition", "mixed_input"), "autodeeplab.supernet",
          f"must be 'per_transition' or 'mixed_input', got '{adl.supernet}'")
    t = cfg.train
    check(t.recipe in RECIPES, "train.recipe", f"must be one of {', '.join(RECIPES)}, got '{t.recipe}'"
          f"{suggest_key(t.recipe, list(RECIPES))}")
    check(t.channel_mul > 0, "train.channel_mul", "must be > 0")
    for name in ("lr", "momentum", "weight_decay"):
        check(getattr(t, name) is None or getattr(t, name) >= 0, f"train.{name}", "must be ≥ 0")
    check(cfg.train.image_scale is None or cfg.train.image_scale > 0, "train.image_scale", "must be > 0")
    if cfg.train.patch_size is not None:
        check(len(cfg.train.patch_size) in (2, 3) and min(cfg.train.patch_size) >= 1, "train.patch_size",
              "must be 2 or 3 positive integers")
    check(0 <= s.warmup_fraction <= 1, "search.warmup_fraction", f"must be in [0, 1], got {s.warmup_fraction}")
    check(0 < s.ram_cost_factor <= 1, "search.ram_cost_factor", f"must be in (0, 1], got {s.ram_cost_factor}")
    check(0 <= s.checkpoint_fraction <= 1, "search.checkpoint_fraction",
          f"must be in [0, 1], got {s.checkpoint_fraction}")
    for name in ("iterations", "val_interval", "checkpoint_interval", "max_nonfinite_steps"):
        check(getattr(s, name) >= 1, f"search.{name}", "must be ≥ 1")
    check(s.lr_schedule in ("halving", "cosine"), "search.lr_schedule",
          f"must be 'halving' or 'cosine', got '{s.lr_schedule}'")
    check(len(s.arch_betas) == 2, "search.arch_betas", "must have 2 values")
    check(data.batch_size >= 1, "data.batch_size", "must be ≥ 1")
    r, dpc = cfg.random_search, cfg.dpc
    for name in ("trials", "iterations", "topk_iterations"):
        check(getattr(r, name) >= 1, f"random_search.{name}", "must be ≥ 1")
    check(r.top_k >= 0, "random_search.top_k", "must be ≥ 0")
    check(0 <= r.explore_ratio <= 1, "random_search.explore_ratio", f"must be in [0, 1], got {r.explore_ratio}")
    check(r.hours is None or r.hours > 0, "random_search.hours", "must be > 0")
    for name in ("num_branches", "channels", "train_patches", "val_patches", "batch_size"):
        check(getattr(dpc, name) >= 1, f"dpc.{name}", "must be ≥ 1")
    check(dpc.feature_depth >= 0, "dpc.feature_depth", "must be ≥ 0")
    check(dpc.pretrain_iterations >= 0, "dpc.pretrain_iterations", "must be ≥ 0")
    check(dpc.backbone_channel_mul > 0, "dpc.backbone_channel_mul", "must be > 0")
    for name in ("rates", "grids"):
        values = getattr(dpc, name)
        check(values is None or (len(values) > 0 and min(values) >= 1), f"dpc.{name}", "must be positive integers")
    check(data.num_samples >= 1, "data.num_samples", "must be ≥ 1")
    check(0 <= data.cache_rate <= 1, "data.cache_rate", f"must be in [0, 1], got {data.cache_rate}")
    if data.patch_size is not None:
        check(len(data.patch_size) in (2, 3) and min(data.patch_size) >= 1, "data.patch_size",
              "must be 2 or 3 positive integers")
    return cfg


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the values in a nested mapping (``{"data": {"batch_size": 2}}`` → ``["data.batch_size"]``)."""
    if not isinstance(data, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, value in data.items() for key in _leaf_keys(value, f"{prefix}{name}.")]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                overlays: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), merge the ``overlays`` (YAML files in the config's format holding some
    keys only, e.g. what ``dints3d fit`` chose), in order, then apply ``key=value`` overrides, in order. Errors name
    the file (or ``--set``) a wrong value came from."""
    cfg = Config()
    source = None
    if path is not None:
        source = os.fspath(path)
        data = read_yaml(path)
        if data is None:
            data = {}
        cfg = _merge(cfg, data, "", source)
    origins: dict[str, str] = {}
    for overlay in overlays:
        data = read_yaml(overlay)
        data = {} if data is None else data
        cfg = _merge(cfg, data, "", os.fspath(overlay))
        origins.update(dict.fromkeys(_leaf_keys(data), os.fspath(overlay)))
    overridden = set()
    for text in overrides:
        keys, value = parse_override(text)
        cfg = _merge(cfg, _nest(keys, value), "", "--set")
        overridden.add(".".join(keys))
    return validate(cfg, source or "--set", frozenset(overridden), origins)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (for provenance in arch.json and checkpoints)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str | None = None) -> Config:
    """Inverse of :func:`config_to_dict`, with validation."""
    return validate(_merge(Config(), data, "", source), source)


def config_path(name_or_path: str) -> Path:
    """Resolve ``demo`` / ``dints_search`` to the packaged config, or return an existing file path."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for folder in (Path(__file__).parent / "configs", Path(__file__).parent.parent / "configs"):
        packaged = folder / f"{name_or_path}.yaml"
        if packaged.exists():
            return packaged
    raise DintsError(name_or_path, "config file not found (give a path, or a packaged name such as 'demo')")
