"""``dints3d export`` for a Cityscapes-format task: an architecture (Auto-DeepLab, searched or preset) + the prepared
WORK folder → a MONAI bundle from the template ``bundles/autodeeplab_cityscapes``.

Unlike the DiNTS bundle, every config of this one needs dints3d installed (the network is built from
``models/arch.json`` by dints3d, and the Cityscapes label table and transforms are dints3d's); ``metadata.json``
says so and lists dints3d among ``required_packages_version``. Filling works as for DiNTS (:mod:`dints3d.bundle`):
the task-settings block of each YAML config, ``metadata.json`` and ``docs/README.md``; the bundle is assembled in a
temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import dints3d
from dints3d.bundle import _bullets, _swap_into_place, fill_text, fill_yaml
from dints3d.config import Config, config_to_dict
from dints3d.errors import DintsError
from dints3d.io import read_json, write_json, write_text
from dints3d.spaces.base import Architecture

TEMPLATE = "autodeeplab_cityscapes"
FILLED_CONFIGS = ("inference.yaml", "train.yaml", "search.yaml")
COPIED_FILES = ("configs/evaluate.yaml", "configs/multi_gpu_train.yaml", "configs/logging.conf", "LICENSE",
                "models/README.md")
REQUIRED_PACKAGES = ("dints3d", "cityscapesscripts", "pillow", "pytorch-ignite", "fire", "tensorboard")
NEEDS_DINTS3D = ("Every config needs dints3d installed (pip install 'dints3d[cityscapes]'): it builds the network from "
                 "models/arch.json and provides the Cityscapes label table, transforms, loss and metric.")


def template_dir() -> Path:
    """The template: packaged as ``dints3d/bundles`` or, in a source checkout, the top-level ``bundles/``."""
    for root in (Path(dints3d.__file__).parent / "bundles", Path(dints3d.__file__).parent.parent / "bundles"):
        if (root / TEMPLATE / "configs" / "metadata.json").exists():
            return root / TEMPLATE
    raise DintsError(TEMPLATE, "template bundle not found in the dints3d installation")


def any_size(arch: Architecture) -> bool:
    """True if the network takes images of any size (Auto-DeepLab), so whole images are inferred in one pass."""
    return arch.space == "autodeeplab"


def resolve_patch(arch: Architecture, plan: dict, cfg: Config) -> list[int]:
    """The retraining crop: ``train.patch_size``, else ``data.patch_size``, else the plan's; 2 positive sides, each a
    multiple of a DiNTS architecture's divisor."""
    key = "train.patch_size" if cfg.train.patch_size else "data.patch_size"
    patch = [int(p) for p in (cfg.train.patch_size or cfg.data.patch_size or plan["patch_size"])]
    divisor = 1
    if arch.space == "dints":
        from dints3d.spaces.dints import patch_divisor

        divisor = patch_divisor(arch.num_depths, arch.use_downsample)
    if len(patch) != 2 or any(p <= 0 or p % divisor for p in patch):
        raise DintsError(key, f"{patch} must be 2 positive sides, each a multiple of {divisor}, for a 2D Cityscapes "
                         f"bundle; set it with --set {key}=[..]")
    return patch


def task_settings(arch: Architecture, plan: dict, cfg: Config, bundle_root: Path,
                  work: Path) -> dict[str, dict[str, Any]]:
    """Config file → the values of its task-settings block."""
    patch = resolve_patch(arch, plan, cfg)
    t, d = cfg.train, cfg.data
    common = {
        "bundle_root": str(bundle_root),
        "in_channels": int(plan["in_channels"]),
        "out_channels": int(plan["out_channels"]),
        "image_scale": float(t.image_scale if t.image_scale is not None else plan["image_scale"]),
        "channel_mul": float(t.channel_mul),
        "build_options": {},
        "sw_roi_size": None if any_size(arch) else patch,
        "amp": bool(t.amp),
        "num_workers": int(d.num_workers),
    }
    train = {
        **common,
        "work_dir": str(work),
        "dataset_dir": str(plan["task_dir"]),
        "fold": int(d.fold),
        "patch_size": patch,
        "num_iterations": int(t.iterations),
        "val_interval": int(t.val_interval),
        "learning_rate": float(t.lr),
        "momentum": float(t.momentum),
        "weight_decay": float(t.weight_decay),
        "batch_size": int(t.batch_size),
        "num_samples": int(d.num_samples),
        "cache_rate": float(d.cache_rate),
        "seed": int(cfg.seed),
    }
    return {
        "inference.yaml": {**common, "dataset_dir": str(Path(plan["task_dir"]) / "leftImg8bit" / "val")},
        "train.yaml": train,
        "search.yaml": {"bundle_root": str(bundle_root), "work_dir": str(work), "search_settings": config_to_dict(cfg)},
    }


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def describe_architecture(arch: Architecture) -> str:
    """One phrase naming the network (for the description)."""
    if arch.space == "autodeeplab":
        return (f"Auto-DeepLab network ({arch.num_layers} layers, final stride {arch.strides[-1]}, "
                f"{arch.num_blocks}-block cell)")
    return f"{arch.space} network"


def metadata(template: dict, arch: Architecture, plan: dict, patch: list[int], arch_source: str) -> dict:
    """``configs/metadata.json``: the template's text fields, this environment's versions, the data format."""
    names = [str(n) for n in plan["class_names"]]
    image = {**template["network_data_format"]["inputs"]["image"], "spatial_shape": patch}
    pred = {**template["network_data_format"]["outputs"]["pred"], "spatial_shape": patch, "num_channels": len(names),
            "channel_def": {str(i): n for i, n in enumerate(names)}}
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    description = (f"{describe_architecture(arch)} segmenting the {len(names)} Cityscapes classes of {plan['name']}; "
                   f"architecture from {arch_source}. {NEEDS_DINTS3D}")
    return {
        **template,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: _version(name) for name in REQUIRED_PACKAGES},
        "changelog": {template["version"]: f"exported by dints3d {dints3d.__version__} from {arch_source}"},
        "name": f"Auto-DeepLab {plan['name']}" if arch.space == "autodeeplab" else f"{arch.space} {plan['name']}",
        "description": description,
        "data_source": f"{plan['name']} (Cityscapes-format folder {plan['task_dir']})",
        "label_classes": f"{classes}; 255 ignored",
        "pred_classes": classes,
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def _parameter_count(arch: Architecture, plan: dict, channel_mul: float) -> int:
    with torch.device("meta"):
        net = arch.build(int(plan["in_channels"]), int(plan["out_channels"]), channel_mul=channel_mul)
    return sum(p.numel() for p in net.parameters())


def readme_values(arch: Architecture, plan: dict, settings: dict, meta: dict, bundle: Path,
                  arch_source: str) -> dict[str, str]:
    """Values of the ``{{placeholders}}`` of ``docs/README.md``."""
    train = settings["train.yaml"]
    facts: dict[str, Any] = {}
    if arch.space == "autodeeplab":
        facts["network path (level per layer, 0 = stride 4)"] = arch.network_path
        facts["strides"] = " → ".join(map(str, arch.strides))
        facts["cell (input, operation) per branch"] = ", ".join(f"({i}, {op})" for i, op in arch.cell)
        width = max(1, round(arch.filter_multiplier * train["channel_mul"]))
        facts["filter multiplier"] = f"F = {width} (searched at {arch.filter_multiplier}, × channel_mul " \
                                     f"{train['channel_mul']})"
    facts["parameters"] = f"{_parameter_count(arch, plan, train['channel_mul']) / 1e6:.2f} M"
    prov = dict(arch.provenance)
    provenance = _bullets({
        "source": f"`{arch_source}`",
        **{key: prov[key] for key in ("tool", "task", "iteration", "seed", "validation_metric", "variant", "origin")
           if key in prov},
        "search settings": "`configs/search.yaml` (`search_settings`)",
    }) if prov else f"- source: `{arch_source}` (no search provenance recorded)"
    data = _bullets({
        "task": f"{plan['name']} ({train['dataset_dir']})",
        "classes": meta["label_classes"],
        "image scale": f"{train['image_scale']:g} (retraining and inference; the search used {plan['image_scale']:g})",
        "crop": " × ".join(map(str, train["patch_size"])),
        "normalization": "[0, 255] → [-1, 1] (DeepLab)",
        "augmentation": "random scale 0.5–2, pad (label 255), random crop, horizontal flip",
        "prepared folder": f"`{train['work_dir']}` (fold0_train / fold0_validation: Cityscapes train / val)",
        "validation": "whole images" if train["sw_roi_size"] is None else f"sliding windows {train['sw_roi_size']}",
    })
    training = _bullets({key: train[key] for key in ("channel_mul", "num_iterations", "val_interval", "learning_rate",
                                                     "momentum", "weight_decay", "batch_size", "num_samples",
                                                     "amp")})
    training += "\n- learning-rate schedule: poly, power 0.9 (`poly_power`), stepped every iteration"
    return {"title": meta["name"], "description": meta["description"], "architecture": _bullets(facts),
            "provenance": provenance, "data": data, "training": training, "bundle": str(bundle)}


def export_cityscapes_bundle(arch: Architecture, arch_source: str | os.PathLike, plan: dict, work: Path, out: Path,
                             cfg: Config) -> Path:
    """Write the bundle for ``arch`` and the Cityscapes task prepared in ``work`` (``plan`` its plan) to ``out``
    (already checked to be absent or replaceable). Returns ``out``."""
    from dints3d.viz import save_figure

    if getattr(arch, "spatial_dims", 2) != 2:
        raise DintsError(arch_source, "a Cityscapes bundle needs a 2D architecture (spatial_dims 2)")
    template = template_dir()
    source = str(Path(arch_source).resolve()) if Path(arch_source).exists() else os.fspath(arch_source)
    settings = task_settings(arch, plan, cfg, out, work)
    meta = metadata(read_json(template / "configs" / "metadata.json"), arch, plan,
                    settings["train.yaml"]["patch_size"], source)

    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        for name in FILLED_CONFIGS:
            text = (template / "configs" / name).read_text()
            write_text(build / "configs" / name, fill_yaml(text, settings[name], f"{template}/configs/{name}"))
        for name in COPIED_FILES:
            (build / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template / name, build / name)
        write_json(build / "configs" / "metadata.json", meta)
        arch.save(build / "models" / "arch.json")
        figure = arch.figure()
        if figure is not None:
            save_figure(figure, build / "docs" / "arch.png")
        readme = fill_text((template / "docs" / "README.md").read_text(),
                           readme_values(arch, plan, settings, meta, out, source), f"{template}/docs/README.md")
        write_text(build / "docs" / "README.md", readme)
        _swap_into_place(build, out)
    finally:
        if build.exists():
            shutil.rmtree(build)
    return out
