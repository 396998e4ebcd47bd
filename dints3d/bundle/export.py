"""``dints3d export``: a searched architecture + a prepared task → a self-contained, relocatable MONAI bundle.

The bundle is the template ``bundles/dints_msd`` with its task settings filled in: every YAML config starts with a
block of top-level keys (channels, classes, patch, spacing, orientation, normalization as a MONAI transform, training
settings, where the data are) that this module overwrites with the plan's and the config's values, keeping the
template's comments. ``metadata.json``, ``docs/README.md`` and ``docs/data_license.txt`` are filled the same way, the
architecture goes to ``models/arch.json`` and its picture to ``docs/arch.png``, the prepared datalist to
``configs/datalist.json`` and inference.yaml's JSON form to ``configs/inference.json``; the template's ``scripts/``
(the code train.yaml, evaluate.yaml and inference.yaml import besides MONAI) are copied. No file holds an absolute
path: ``bundle_root`` is ``.`` and the task and WORK folders are written relative to the bundle
(:func:`data_locations`). The bundle is assembled in a temporary sibling folder and renamed into place, so ``BUNDLE``
is either complete or absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

import dints3d
from dints3d.bundle import recipes
from dints3d.bundle.template import (
    arch_source_name,
    bullets,
    bundle_relative,
    check_target,
    fill_text,
    fill_yaml,
    parameter_count,
    template_dir,
    versions,
    write_bundle,
)
from dints3d.config import Config, config_path, config_to_dict, load_config
from dints3d.cost.memory import meta_network, predict_training_memory
from dints3d.data.datalist import DATALIST_FILE
from dints3d.data.dataset import load_plan
from dints3d.data.formats import plan_format
from dints3d.data.patch import resolve_patch
from dints3d.data.transforms import normalization_transform
from dints3d.spaces.base import Architecture
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_text
from dints3d.utils.lock import locked_folder, never
from dints3d.utils.outputs import check_output_folder
from dints3d.utils.preflight import estimate_cache_bytes

TEMPLATE = "dints_msd"
#: configs with a task-settings block (the others are overrides of train.yaml or inference.yaml)
FILLED_CONFIGS = ("inference.yaml", "train.yaml", "search.yaml")
#: the bundle's own code (``scripts/``): what train.yaml, evaluate.yaml and inference.yaml import besides MONAI
SCRIPTS = ("scripts/__init__.py", "scripts/checkpoints.py", "scripts/ensemble.py", "scripts/errors.py",
           "scripts/losses.py", "scripts/memory.py", "scripts/networks.py", "scripts/reliability.py",
           "scripts/results.py")
COPIED_FILES = ("configs/evaluate.yaml", "configs/multi_gpu_train.yaml", "configs/multi_gpu_evaluate.yaml",
                "configs/multi_gpu_inference.yaml", "configs/inference_trt.yaml", "configs/logging.conf", "LICENSE",
                "large_files.yml", "models/README.md", *SCRIPTS)
#: metadata ``required_packages_version`` (besides MONAI, PyTorch and NumPy): what training, evaluation and inference
#: import. Not dints3d: only configs/search.yaml needs it, which the description and docs/README.md say.
REQUIRED_PACKAGES = ("nibabel", "pytorch-ignite", "fire", "tensorboard", "pyyaml", "scikit-image")
SELF_CONTAINED = ("Training, evaluation and inference need MONAI and this bundle's own scripts/ only; re-running the "
                  "architecture search (configs/search.yaml) needs dints3d.")
#: the datalist lists a bundle trains and evaluates on (the search's halves of each fold stay in WORK)
DATALIST_LISTS = re.compile(r"training|test|fold\d+_(train|validation)")
REFERENCES = {
    "dints": "He, Y., Yang, D., Roth, H., Zhao, C. and Xu, D., 2021. DiNTS: Differentiable Neural Network Topology "
             "Search for 3D Medical Image Segmentation. CVPR 2021, pp. 5841-5850.",
    "nnunet": "Isensee, F., Jaeger, P.F., Kohl, S.A.A., Petersen, J. and Maier-Hein, K.H., 2021. nnU-Net: a "
              "self-configuring method for deep learning-based biomedical image segmentation. Nature Methods 18, "
              "pp. 203-211.",
    "msd": "Antonelli, M., Reinke, A., Bakas, S. et al., 2022. The Medical Segmentation Decathlon. Nature "
           "Communications 13, 4128.",
    "monai": "Cardoso, M.J., Li, W., Brown, R. et al., 2022. MONAI: An open-source framework for deep learning in "
             "healthcare. arXiv:2211.02701.",
}


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


def data_locations(bundle: Path, work: Path, task_dir: Path) -> dict[str, dict[str, str]]:
    """Config file → its settings that locate the data, relative to ``bundle`` (:func:`bundle_relative`): the task
    folder (train.yaml), its test images (inference.yaml), the prepared folder (search.yaml)."""
    return {"train.yaml": {"dataset_dir": bundle_relative(task_dir, bundle)},
            "inference.yaml": {"dataset_dir": bundle_relative(task_dir / "imagesTs", bundle)},
            "search.yaml": {"work_dir": bundle_relative(work, bundle)}}


def task_settings(arch: Architecture, plan: dict, cfg: Config, bundle_root: Path, work: Path,
                  task_dir: Path) -> dict[str, dict[str, Any]]:
    """Config file → the values of its task-settings block (and of the recipe's items of train.yaml). No value is
    an absolute path: ``bundle_root`` is ``.`` and the data are located relative to it (:func:`data_locations`)."""
    patch = resolve_patch(plan, arch.patch_divisor, arch.patch_requirement,
                          ("train.patch_size", cfg.train.patch_size), ("data.patch_size", cfg.data.patch_size), dims=3)
    t = cfg.train
    optimizer = t.optimizer_settings()
    located = data_locations(bundle_root, work, task_dir)
    common = {
        "bundle_root": ".",
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
        **located["train.yaml"],
        "fold": int(cfg.data.fold),
        "rotate90_axes": _in_plane_axes(plan, patch),
        "recipe": t.recipe,
        "num_iterations": int(t.iterations),
        "epoch_length": int(t.val_interval),  # dints3d validates every train.val_interval iterations: one epoch
        "val_interval": 1,
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
        "inference.yaml": {**common, **located["inference.yaml"]},
        "train.yaml": train,
        "search.yaml": {"bundle_root": ".", **located["search.yaml"], "search_settings": config_to_dict(cfg)},
    }


def bundle_datalist(work: Path) -> str:
    """``configs/datalist.json``: the prepared datalist's cases and folds (paths relative to the task folder), without
    the task's absolute path and the search's halves of each fold."""
    datalist = read_json(work / DATALIST_FILE)
    kept = {key: value for key, value in datalist.items()
            if key in ("version", "seed", "num_folds") or DATALIST_LISTS.fullmatch(key)}
    return json.dumps(kept, indent=2) + "\n"


def inference_json(inference_yaml: str) -> str:
    """``configs/inference.json``: inference.yaml as JSON, the file ``monai.bundle.load(workflow_type="inference")``
    reads."""
    return json.dumps(yaml.safe_load(inference_yaml), indent=2) + "\n"


def relocate(bundle: Path, work: Path, task_dir: Path) -> None:
    """Point a bundle that was copied to ``bundle`` at its data again: the settings of :func:`data_locations`
    rewritten relative to its new place (and ``configs/inference.json`` with them)."""
    for name, values in data_locations(bundle, work, task_dir).items():
        path = bundle / "configs" / name
        write_text(path, fill_yaml(path.read_text(), values, str(path)))
    write_text(bundle / "configs" / "inference.json",
               inference_json((bundle / "configs" / "inference.yaml").read_text()))


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


def metadata(template: dict, arch: Architecture, plan: dict, patch: list[int], arch_source: str, recipe: str) -> dict:
    """``configs/metadata.json``: the template's text fields, this environment's versions, the plan's data format;
    ``eval_metrics`` stays empty until training fills it (``scripts/results.py``)."""
    image = _input_format(plan, patch)
    names = [str(n) for n in plan["class_names"]]
    pred = {**image, "format": "segmentation", "num_channels": len(names), "value_range": [],
            "channel_def": {str(i): n for i, n in enumerate(names)}}  # logits, one channel per class
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(names))
    modality = "/".join(plan["modalities"])
    description = (f"{arch.headline()} segmenting {', '.join(names[1:])} in {modality} images "
                   f"of {plan['name']}; architecture from {arch_source}. {SELF_CONTAINED}")
    references = [REFERENCES[key] for key in ("dints", "nnunet", "msd", "monai")
                  if key != "nnunet" or recipe == "nnunet"]
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
        "eval_metrics": {},
        "references": references,
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _relative(value: str) -> str:
    """A :func:`bundle_relative` value as a reader sees it: ``../task``."""
    match = re.fullmatch(r"\$@bundle_root \+ '/(.*)'", value)
    return match.group(1) if match else value


def requirements(arch: Architecture, plan: dict, train: dict, cases: int) -> str:
    """The README's system requirements: the GPU memory of a training step as dints3d's memory model predicts it
    (:func:`~dints3d.cost.memory.predict_training_memory`), the RAM of the data cache, the disk of the checkpoints."""
    batch = train["batch_size"] * train["num_samples"]
    model = meta_network(arch, int(plan["in_channels"]), int(plan["out_channels"]), channel_mul=train["channel_mul"])
    step = predict_training_memory(model, (int(plan["in_channels"]), *train["patch_size"]), batch=batch,
                                   amp=train["amp"], device="cuda")
    parameters = sum(p.numel() for p in model.parameters())
    return bullets({
        "GPU memory for training": f"about {_size(step['peak'])} per process (predicted by dints3d's memory model for "
                                   f"a step of {batch} patch(es) of {' × '.join(map(str, train['patch_size']))}, amp "
                                   f"{str(train['amp']).lower()}; cuDNN workspaces not included)",
        "GPU memory for inference": "less than for training (no gradients); volumes whose outputs would exceed a "
                                    "quarter of the GPU are stitched on the CPU (stitch_cpu_voxels)",
        "RAM": f"about {_size(estimate_cache_bytes(plan, cases) * min(train['cache_rate'], 1.0))} for the training "
               f"data cache ({cases} cases at cache_rate {train['cache_rate']}), plus MONAI and PyTorch",
        "disk": f"about {_size(3 * 8 * parameters + 2 * 4 * parameters)} for the checkpoints ({parameters / 1e6:.2f} M "
                "parameters: two checkpoints kept, one being written, model.pt)",
        "tested with": "CPU and NVIDIA GPUs (CUDA); several processes with torchrun (NCCL, or gloo on CPU)",
    })


def readme_values(arch: Architecture, plan: dict, settings: dict, meta: dict, arch_source: str,
                  cases: int) -> dict[str, str]:
    """Values of the ``{{placeholders}}`` of ``docs/README.md`` (none of them an absolute path)."""
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
        "task": f"{plan['name']} (`dataset_dir`: `{_relative(train['dataset_dir'])}`, relative to the bundle, as "
                "export found it; override it with `--dataset_dir`)",
        "cases": f"{cases} training cases in `configs/datalist.json` (paths relative to `dataset_dir`), trained on "
                 f"fold {train['fold']}",
        "classes": meta["label_classes"],
        "channels": ", ".join(plan["modalities"]),
        "orientation": plan.get("orientation", "RAS"),
        "target spacing": " × ".join(f"{s:.4g}" for s in plan["target_spacing"]) + " mm",
        "patch": " × ".join(map(str, train["patch_size"])),
        "normalization": ", ".join(f"{k}={v}" for k, v in norm.items() if k != "keys"),
    })
    training = bullets({key: train[key] for key in ("recipe", "channel_mul", "num_iterations", "epoch_length",
                                                     "val_interval", "learning_rate", "momentum", "weight_decay",
                                                     "batch_size", "num_samples", "amp")})
    return {"title": meta["name"], "description": meta["description"], "architecture": architecture,
            "provenance": provenance, "data": data, "training": training,
            "requirements": requirements(arch, plan, train, cases),
            "references": "\n".join(f"- {reference}" for reference in meta["references"])}


def data_license(template: Path, plan: dict) -> str:
    """``docs/data_license.txt``: the task and the licence its ``dataset.json`` states."""
    dataset = Path(plan["task_dir"]) / "dataset.json"
    stated = read_json(dataset) if dataset.is_file() else {}
    licence = stated.get("licence") or stated.get("license")
    terms = (f"Its dataset.json states the licence: {licence}." if licence else
             "Its dataset.json states no licence: write the data's terms here before sharing the weights.")
    return fill_text((template / "docs" / "data_license.txt").read_text(),
                     {"data": f"{plan['name']} (a Medical Segmentation Decathlon-format task)", "data_license": terms},
                     f"{template}/docs/data_license.txt")


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
                    settings["train.yaml"]["patch_size"], source, cfg.train.recipe)
    cases = len(read_json(work / DATALIST_FILE).get("training", []))

    def written(build: Path) -> dict[str, str]:
        return {"configs/datalist.json": bundle_datalist(work),
                "configs/inference.json": inference_json((build / "configs" / "inference.yaml").read_text()),
                "docs/data_license.txt": data_license(template, plan)}

    return write_bundle(template, out, {name: settings[name] for name in FILLED_CONFIGS}, COPIED_FILES, meta, arch,
                        lambda: readme_values(arch, plan, settings, meta, source, cases), written)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="arch.json of a search run, or a preset name")
    parser.add_argument("--work", required=True, help="folder written by `dints3d prepare` (plan.json, datalist.json)")
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument("--config", default="dints_search",
                        help="config whose train: and data: sections set the training (default: dints_search)")
    parser.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="FILE",
                        help="YAML holding some config keys (e.g. fit-24gb/search.yaml written by `dints3d fit`), "
                             "merged after --config and before --set (repeatable, applied in order)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.iterations=2000 or data.patch_size=[64,64,64]")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config), args.overrides, args.overlays)
    out = export_bundle(args.arch, args.work, args.out, cfg, force=args.force)
    meta = read_json(out / "configs" / "metadata.json")
    image = meta["network_data_format"]["inputs"]["image"]
    print(f"wrote bundle {out}: {meta['task']}; patch {image['spatial_shape']}, "
          f"{image['num_channels']} channel(s) → {meta['network_data_format']['outputs']['pred']['num_channels']} "
          "classes")
    print(f"train:  dints3d train {out}   (or, in {out}: python -m monai.bundle run --config_file configs/train.yaml)")
    print(f"infer:  dints3d infer {out} --input IMAGES --out PREDICTIONS")
    print(f"docs:   {out / 'docs' / 'README.md'}")
    return 0
