"""``dints3d export``: a searched architecture + a prepared task → a self-contained MONAI bundle.

The bundle is the template ``bundles/dints_msd`` with its task settings filled in: every YAML config starts with a
block of top-level keys (channels, classes, patch, spacing, orientation, normalization as a MONAI transform, training
settings, paths) that this module overwrites with the plan's and the config's values, keeping the template's
comments. ``metadata.json`` and ``docs/README.md`` are filled the same way, the architecture goes to
``models/arch.json`` and its picture to ``docs/arch.png``. The bundle is assembled in a temporary sibling folder and
renamed into place, so ``BUNDLE`` is either complete or absent.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

import dints3d
from dints3d.bundle import recipes
from dints3d.bundle.template import (
    arch_source_name,
    bullets,
    check_target,
    parameter_count,
    template_dir,
    versions,
    write_bundle,
)
from dints3d.config import Config, config_path, config_to_dict, load_config
from dints3d.data.dataset import load_plan
from dints3d.data.formats import plan_format
from dints3d.data.patch import resolve_patch
from dints3d.data.transforms import normalization_transform
from dints3d.spaces.base import Architecture
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json
from dints3d.utils.lock import locked_folder, never
from dints3d.utils.outputs import check_output_folder

TEMPLATE = "dints_msd"
#: configs with a task-settings block (the others are overrides of train.yaml)
FILLED_CONFIGS = ("inference.yaml", "train.yaml", "search.yaml")
COPIED_FILES = ("configs/evaluate.yaml", "configs/multi_gpu_train.yaml", "configs/multi_gpu_inference.yaml",
                "configs/logging.conf", "LICENSE", "models/README.md", "scripts/__init__.py", "scripts/ensemble.py")
#: metadata ``required_packages_version`` (besides MONAI, PyTorch and NumPy): what the bundle's configs use, dints3d
#: included because train.yaml and search.yaml need it. MONAI's tools read only this standard key, so the split
#: (inference and evaluation need none of dints3d) is stated in the description (:data:`MONAI_ONLY`).
REQUIRED_PACKAGES = ("nibabel", "pytorch-ignite", "fire", "tensorboard", "scikit-image", "dints3d")
MONAI_ONLY = ("Inference and evaluation need MONAI only: of the required packages, dints3d is needed solely for "
              "training (configs/train.yaml, whose dints3d handlers give atomic checkpoints, exact resume and skipping "
              "of non-finite steps) and for re-running the architecture search (configs/search.yaml).")


def normalization_config(plan: dict) -> dict:
    """The plan's normalization (:func:`~dints3d.data.transforms.normalization_transform`) as a bundle config item."""
    transform = normalization_transform(plan)
    if isinstance(transform, ScaleIntensityRanged):
        s = transform.scaler
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(s.a_min), "a_max": float(s.a_max),
                "b_min": float(s.b_min), "b_max": float(s.b_max), "clip": bool(s.clip)}
    if isinstance(transform, NormalizeIntensityd):
        n = transform.normalizer
        return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": bool(n.nonzero),
                "channel_wise": bool(n.channel_wise)}
    raise DintsError("plan.json", f"no bundle form for the normalization {type(transform).__name__}")


def _in_plane_axes(plan: dict, patch: list[int]) -> list[int] | None:
    """Axes for random 90° rotations (as dints3d's training transforms): the two non-anisotropic axes, if square."""
    axes = [a for a in range(3) if a != plan.get("anisotropic_axis")][:2]
    return axes if patch[axes[0]] == patch[axes[1]] else None


def task_settings(arch: Architecture, plan: dict, cfg: Config, bundle_root: Path, work: Path,
                  task_dir: Path) -> dict[str, dict[str, Any]]:
    """Config file → the values of its task-settings block (and of the recipe's items of train.yaml)."""
    patch = resolve_patch(plan, arch.patch_divisor, arch.patch_requirement,
                          ("train.patch_size", cfg.train.patch_size), ("data.patch_size", cfg.data.patch_size), dims=3)
    t = cfg.train
    optimizer = t.optimizer_settings()
    common = {
        "bundle_root": str(bundle_root),
        "in_channels": int(plan["in_channels"]),
        "out_channels": int(plan["out_channels"]),
        "patch_size": patch,
        "target_spacing": [float(s) for s in plan["target_spacing"]],
        "orientation": str(plan.get("orientation", "RAS")),
        "normalization": normalization_config(plan),
        "channel_mul": float(t.channel_mul),
        "amp": bool(t.amp),
        "num_workers": int(cfg.data.num_workers),
        "network_def": arch.bundle_network(),
    }
    train = {
        **common,
        "work_dir": str(work),
        "dataset_dir": str(task_dir),
        "fold": int(cfg.data.fold),
        "rotate90_axes": _in_plane_axes(plan, patch),
        "recipe": t.recipe,
        "num_iterations": int(t.iterations),
        "val_interval": int(t.val_interval),
        "learning_rate": optimizer["lr"],
        "momentum": optimizer["momentum"],
        "weight_decay": optimizer["weight_decay"],
        "lr_decay_points": [float(p) for p in t.lr_decay_points],
        "batch_size": int(t.batch_size),
        "num_samples": int(cfg.data.num_samples),
        "cache_rate": float(cfg.data.cache_rate),
        "seed": int(cfg.seed),
        "augmentation": recipes.augmentation(t.recipe, plan, len(patch), t.elastic),
        "optimizer": recipes.optimizer(t.recipe),
        "lr_scheduler": recipes.lr_scheduler(t.recipe),
    }
    return {
        "inference.yaml": {**common, "dataset_dir": str(task_dir / "imagesTs")},
        "train.yaml": train,
        "search.yaml": {"bundle_root": str(bundle_root), "work_dir": str(work), "search_settings": config_to_dict(cfg)},
    }


def _input_format(plan: dict, patch: list[int]) -> dict[str, Any]:
    """``network_data_format.inputs.image``: the normalized patch the network sees."""
    modalities = list(plan["modalities"])
    ct = modalities == ["CT"]
    norm = normalization_config(plan)
    return {
        "type": "image",
        "format": "hounsfield" if ct else "magnitude",
        "modality": "CT" if ct else "MR",
        "num_channels": int(plan["in_channels"]),
        "spatial_shape": patch,
        "dtype": "float32",
        "value_range": [norm["b_min"], norm["b_max"]] if norm["_target_"] == "ScaleIntensityRanged" else [],
        "is_patch_data": True,
        "channel_def": {str(i): m for i, m in enumerate(modalities)},
    }


def metadata(template: dict, arch: Architecture, plan: dict, patch: list[int], arch_source: str) -> dict:
    """``configs/metadata.json``: the template's text fields, this environment's versions, the plan's data format."""
    image = _input_format(plan, patch)
    names = [str(n) for n in plan["class_names"]]
    pred = {**image, "format": "segmentation", "num_channels": len(names), "value_range": [],
            "channel_def": {str(i): n for i, n in enumerate(names)}}  # logits, one channel per class
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    modality = "/".join(plan["modalities"])
    description = (f"{arch.headline()} segmenting {', '.join(names[1:])} in {modality} images "
                   f"of {plan['name']}; architecture from {arch_source}. {MONAI_ONLY}")
    return {
        **template,
        **versions(REQUIRED_PACKAGES),
        "changelog": {template["version"]: f"exported by dints3d {dints3d.__version__} from {arch_source}"},
        "name": f"{arch.display_name} {plan['name']}",
        "task": f"Segmentation of {', '.join(names[1:])} in {modality} ({plan['name']})",
        "description": description,
        "data_source": f"{plan['name']} (MSD-format task)",
        "image_classes": f"{len(plan['modalities'])} channel(s) ({modality}), resampled to "
                         f"{' × '.join(f'{s:.4g}' for s in plan['target_spacing'])} mm, normalized by "
                         f"{normalization_config(plan)['_target_']}",
        "label_classes": classes,
        "pred_classes": classes,
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def readme_values(arch: Architecture, plan: dict, settings: dict, meta: dict, bundle: Path,
                  arch_source: str) -> dict[str, str]:
    """Values of the ``{{placeholders}}`` of ``docs/README.md``."""
    train = settings["train.yaml"]
    facts = {name.replace("_", " "): value for name, value in arch.summary(train["channel_mul"]).items()}
    architecture = bullets({
        "network": arch.headline(),
        **facts,
        "parameters": f"{parameter_count(arch, plan, train['channel_mul']) / 1e6:.2f} M at channel_mul "
                      f"{train['channel_mul']}",
    })
    prov = dict(arch.provenance)
    provenance = bullets({
        "source": f"`{arch_source}`",
        **{key: prov[key] for key in ("tool", "task", "iteration", "seed", "validation_dice",
                                      "estimated_memory_ratio", "ram_cost_factor", "patch_size") if key in prov},
        "search settings": "`configs/search.yaml` (`search_settings`)",
    }) if prov else f"- source: `{arch_source}` (no search provenance recorded)"
    norm = settings["inference.yaml"]["normalization"]
    data = bullets({
        "task": f"{plan['name']} ({settings['train.yaml']['dataset_dir']})",
        "classes": meta["label_classes"],
        "channels": ", ".join(plan["modalities"]),
        "orientation": plan.get("orientation", "RAS"),
        "target spacing": " × ".join(f"{s:.4g}" for s in plan["target_spacing"]) + " mm",
        "patch": " × ".join(map(str, train["patch_size"])),
        "normalization": ", ".join(f"{k}={v}" for k, v in norm.items() if k != "keys"),
        "prepared folder": f"`{train['work_dir']}` (datalist fold {train['fold']})",
    })
    training = bullets({key: train[key] for key in ("recipe", "channel_mul", "num_iterations", "val_interval",
                                                     "learning_rate", "momentum", "weight_decay", "batch_size",
                                                     "num_samples", "amp")})
    return {"title": meta["name"], "description": meta["description"], "architecture": architecture,
            "provenance": provenance, "data": data, "training": training, "bundle": str(bundle)}


def export_bundle(arch_source: str | os.PathLike, work: str | os.PathLike, out: str | os.PathLike,
                  cfg: Config | None = None, force: bool = False) -> Path:
    """Write the bundle for ``arch_source`` (an ``arch.json`` path or a preset name) and the task prepared in
    ``work`` to ``out`` with the template of the task's format; train settings come from ``cfg.train`` (and
    ``cfg.data``). Returns ``out``."""
    cfg = cfg or Config()
    out, work = Path(out).absolute(), Path(work).absolute()
    check_output_folder(out)
    check_target(out, force)
    plan = load_plan(work, cfg.plan)
    arch = load_architecture(arch_source, plan, cfg.train.deep_supervision)
    with locked_folder(out, keep=never):  # one export at a time; a folder this export created goes if it fails
        check_target(out, force)
        return plan_format(plan).stage("export")(arch, arch_source, plan, work, out, cfg)


def export_msd_bundle(arch: Architecture, arch_source: str | os.PathLike, plan: dict, work: Path, out: Path,
                      cfg: Config) -> Path:
    """The bundle for a 3D ``arch`` with a MONAI-only form (DiNTS, SegResNet, DynUNet) and the MSD task prepared in
    ``work`` (``plan`` its plan), written to ``out`` (already checked to be absent or replaceable) from the template
    ``bundles/dints_msd``."""
    if arch.spatial_dims != 3:
        raise DintsError(arch_source, "the MSD bundle template holds 3D architectures only (2D architectures "
                         "export with a Cityscapes-format task)")
    arch.bundle_network()  # refuses a space without a MONAI-only network
    template = template_dir(TEMPLATE)
    source = arch_source_name(arch_source)
    settings = task_settings(arch, plan, cfg, out, work, Path(plan["task_dir"]))
    meta = metadata(read_json(template / "configs" / "metadata.json"), arch, plan,
                    settings["train.yaml"]["patch_size"], source)
    return write_bundle(template, out, {name: settings[name] for name in FILLED_CONFIGS}, COPIED_FILES, meta, arch,
                        lambda: readme_values(arch, plan, settings, meta, out, source))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="arch.json of a search run, or a preset name")
    parser.add_argument("--work", required=True, help="folder written by `dints3d prepare` (plan.json, datalist.json)")
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument("--config", default="dints_search",
                        help="config whose train: and data: sections set the training (default: dints_search)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.iterations=2000 or data.patch_size=[64,64,64]")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config), args.overrides)
    out = export_bundle(args.arch, args.work, args.out, cfg, force=args.force)
    meta = read_json(out / "configs" / "metadata.json")
    image = meta["network_data_format"]["inputs"]["image"]
    print(f"wrote bundle {out}: {meta['task']}; patch {image['spatial_shape']}, "
          f"{image['num_channels']} channel(s) → {meta['network_data_format']['outputs']['pred']['num_channels']} "
          "classes")
    print(f"train:  dints3d train {out}   (or python -m monai.bundle run --config_file {out}/configs/train.yaml)")
    print(f"infer:  dints3d infer {out} --input IMAGES --out PREDICTIONS")
    print(f"docs:   {out / 'docs' / 'README.md'}")
    return 0
