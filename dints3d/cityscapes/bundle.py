"""``dints3d export`` for a Cityscapes-format task: an architecture (Auto-DeepLab, searched or preset) + the prepared
WORK folder → a MONAI bundle from the template ``bundles/autodeeplab_cityscapes``.

Unlike the DiNTS bundle, every config of this one needs dints3d installed (the network is built from
``models/arch.json`` by dints3d, and the Cityscapes label table and transforms are dints3d's); ``metadata.json``
says so and lists dints3d among ``required_packages_version``. Filling works as for DiNTS (:mod:`dints3d.bundle.export`):
the task-settings block of each YAML config, ``metadata.json`` and ``docs/README.md``; the bundle is assembled in a
temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dints3d
from dints3d.bundle.template import (
    arch_source_name,
    bullets,
    parameter_count,
    template_dir,
    versions,
    write_bundle,
)
from dints3d.config import Config, config_to_dict
from dints3d.data.patch import resolve_patch
from dints3d.spaces.base import Architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

TEMPLATE = "autodeeplab_cityscapes"
FILLED_CONFIGS = ("inference.yaml", "train.yaml", "search.yaml")
COPIED_FILES = ("configs/evaluate.yaml", "configs/multi_gpu_train.yaml", "configs/logging.conf", "LICENSE",
                "models/README.md")
REQUIRED_PACKAGES = ("dints3d", "cityscapesscripts", "pillow", "pytorch-ignite", "fire", "tensorboard")
NEEDS_DINTS3D = ("Every config needs dints3d installed (pip install 'dints3d[cityscapes]'): it builds the network from "
                 "models/arch.json and provides the Cityscapes label table, transforms, loss and metric.")


def task_settings(arch: Architecture, plan: dict, cfg: Config, bundle_root: Path,
                  work: Path) -> dict[str, dict[str, Any]]:
    """Config file → the values of its task-settings block."""
    patch = resolve_patch(plan, arch.patch_divisor, "a 2D Cityscapes bundle", ("train.patch_size", cfg.train.patch_size),
                          ("data.patch_size", cfg.data.patch_size), dims=2)
    t, d = cfg.train, cfg.data
    common = {
        "bundle_root": str(bundle_root),
        "in_channels": int(plan["in_channels"]),
        "out_channels": int(plan["out_channels"]),
        "image_scale": float(t.image_scale if t.image_scale is not None else plan["image_scale"]),
        "channel_mul": float(t.channel_mul),
        "build_options": {},
        "sw_roi_size": None if arch.patch_divisor == 1 else patch,  # any size: whole images in one pass
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
        # DeepLab's SGD with poly decay: unset settings are the DiNTS recipe's values (not nnU-Net's)
        **{name: value for name, value in zip(("learning_rate", "momentum", "weight_decay"),
                                               t.optimizer_settings("dints").values())},
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


def metadata(template: dict, arch: Architecture, plan: dict, patch: list[int], arch_source: str) -> dict:
    """``configs/metadata.json``: the template's text fields, this environment's versions, the data format."""
    names = [str(n) for n in plan["class_names"]]
    image = {**template["network_data_format"]["inputs"]["image"], "spatial_shape": patch}
    pred = {**template["network_data_format"]["outputs"]["pred"], "spatial_shape": patch, "num_channels": len(names),
            "channel_def": {str(i): n for i, n in enumerate(names)}}
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    description = (f"{arch.headline()} segmenting the {len(names)} Cityscapes classes of {plan['name']}; "
                   f"architecture from {arch_source}. {NEEDS_DINTS3D}")
    return {
        **template,
        **versions(REQUIRED_PACKAGES),
        "changelog": {template["version"]: f"exported by dints3d {dints3d.__version__} from {arch_source}"},
        "name": f"{arch.display_name} {plan['name']}",
        "description": description,
        "data_source": f"{plan['name']} (Cityscapes-format folder {plan['task_dir']})",
        "label_classes": f"{classes}; 255 ignored",
        "pred_classes": classes,
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def readme_values(arch: Architecture, plan: dict, settings: dict, meta: dict, bundle: Path,
                  arch_source: str) -> dict[str, str]:
    """Values of the ``{{placeholders}}`` of ``docs/README.md``."""
    train = settings["train.yaml"]
    facts: dict[str, Any] = {name.replace("_", " "): value for name, value in arch.summary(train["channel_mul"]).items()}
    facts["parameters"] = f"{parameter_count(arch, plan, train['channel_mul']) / 1e6:.2f} M"
    prov = dict(arch.provenance)
    provenance = bullets({
        "source": f"`{arch_source}`",
        **{key: prov[key] for key in ("tool", "task", "iteration", "seed", "validation_metric", "variant", "origin")
           if key in prov},
        "search settings": "`configs/search.yaml` (`search_settings`)",
    }) if prov else f"- source: `{arch_source}` (no search provenance recorded)"
    data = bullets({
        "task": f"{plan['name']} ({train['dataset_dir']})",
        "classes": meta["label_classes"],
        "image scale": f"{train['image_scale']:g} (retraining and inference; the search used {plan['image_scale']:g})",
        "crop": " × ".join(map(str, train["patch_size"])),
        "normalization": "[0, 255] → [-1, 1] (DeepLab)",
        "augmentation": "random scale 0.5–2, pad (label 255), random crop, horizontal flip",
        "prepared folder": f"`{train['work_dir']}` (fold0_train / fold0_validation: Cityscapes train / val)",
        "validation": "whole images" if train["sw_roi_size"] is None else f"sliding windows {train['sw_roi_size']}",
    })
    training = bullets({key: train[key] for key in ("channel_mul", "num_iterations", "val_interval", "learning_rate",
                                                     "momentum", "weight_decay", "batch_size", "num_samples",
                                                     "amp")})
    training += "\n- learning-rate schedule: poly, power 0.9 (`poly_power`), stepped every iteration"
    return {"title": meta["name"], "description": meta["description"], "architecture": bullets(facts),
            "provenance": provenance, "data": data, "training": training, "bundle": str(bundle)}


def export_cityscapes_bundle(arch: Architecture, arch_source: str | os.PathLike, plan: dict, work: Path, out: Path,
                             cfg: Config) -> Path:
    """Write the bundle for ``arch`` and the Cityscapes task prepared in ``work`` (``plan`` its plan) to ``out``
    (already checked to be absent or replaceable). Returns ``out``."""
    if getattr(arch, "spatial_dims", 2) != 2:
        raise DintsError(arch_source, "a Cityscapes bundle needs a 2D architecture (spatial_dims 2)")
    template = template_dir(TEMPLATE)
    source = arch_source_name(arch_source)
    settings = task_settings(arch, plan, cfg, out, work)
    meta = metadata(read_json(template / "configs" / "metadata.json"), arch, plan,
                    settings["train.yaml"]["patch_size"], source)
    return write_bundle(template, out, {name: settings[name] for name in FILLED_CONFIGS}, COPIED_FILES, meta, arch,
                        lambda: readme_values(arch, plan, settings, meta, out, source))
