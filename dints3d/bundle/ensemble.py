"""A bundle's ensemble: several trained models (its fold models; for a selected pair, also another candidate's)
averaged with MONAI's ``EnsembleEvaluator`` and ``MeanEnsembled`` over each model's mirrored sliding-window
probabilities (``scripts/ensemble.py``'s ``MirroredSoftmax``).

It is written as ``configs/ensemble.yaml``, an overlay of ``inference.yaml`` (MONAI alone, plus the bundle's own
``scripts/``)::

    python -m monai.bundle run --config_file "['configs/inference.yaml', 'configs/ensemble.yaml']"  # in the bundle

``dints3d infer`` uses it whenever the bundle has one. Every model's output is a full volume of class probabilities;
``inference.yaml``'s ``stitch_cpu_voxels`` moves the stitching to the CPU for volumes whose outputs would not fit a
quarter of the GPU, so an ensemble of large volumes does not run out of GPU memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dints3d.bundle.template import dump_yaml
from dints3d.spaces.base import Architecture
from dints3d.utils.io import write_text

ENSEMBLE_CONFIG = "ensemble.yaml"


@dataclass(frozen=True)
class Member:
    """One architecture of the ensemble: its ``arch.json`` and its trained models, paths relative to the bundle."""

    arch: Architecture
    arch_file: str
    checkpoints: tuple[str, ...]


def ensemble_config(members: Sequence[Member], mirror_axes: Sequence[int],
                    largest_component_labels: Sequence[int]) -> dict[str, Any]:
    """The overlay: one ``MirroredSoftmax`` network per checkpoint, each loaded by a ``CheckpointLoader`` handler
    (so inference.yaml's single-model ``checkpointloader`` is off: ``load_pretrain: false``), their probabilities
    averaged by ``MeanEnsembled`` before ``inference.yaml``'s post-processing steps."""
    nets, handlers = [], []
    for i, member in enumerate(members):
        for checkpoint in member.checkpoints:
            j = len(nets)
            nets.append({"_target_": "scripts.ensemble.MirroredSoftmax", "mirror_axes": "@mirror_axes",
                         "network": member.arch.bundle_network(arch_ref=f"@members#{i}#arch")})
            handlers.append({"_target_": "CheckpointLoader", "load_path": f"$@bundle_root + '/{checkpoint}'",
                             "load_dict": {"model": f"@nets#{j}#network"}, "map_location": "@device"})
    keys = [f"pred_{j}" for j in range(len(nets))]
    return {
        "members": [{"arch": f"$json.loads(pathlib.Path(@bundle_root, '{m.arch_file}').read_text())",
                     "checkpoints": list(m.checkpoints)} for m in members],
        "load_pretrain": False,
        "mirror_axes": [int(a) for a in mirror_axes],
        "largest_component_labels": [int(c) for c in largest_component_labels],
        "nets": nets,
        "models": "$[net.to(@device) for net in @nets]",
        "pred_keys": keys,
        "postprocessing": {"_target_": "Compose", "transforms": "$[monai.transforms.MeanEnsembled(keys=@pred_keys, "
                                                                 "output_key='pred')] + @postprocessing_steps"},
        "handlers": [*handlers, {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "EnsembleEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "networks": "@models", "pred_keys": "@pred_keys", "inferer": "@inferer",
                      "postprocessing": "@postprocessing", "val_handlers": "@handlers", "amp": "@use_amp"},
    }


def write_ensemble(bundle: str | os.PathLike, members: Sequence[Member], mirror_axes: Sequence[int],
                   largest_component_labels: Sequence[int] = ()) -> Path:
    """Write ``configs/ensemble.yaml`` (atomically) with a header saying what it holds."""
    models = sum(len(m.checkpoints) for m in members)
    header = (f"# Ensemble of {models} model(s) ({len(members)} architecture(s)) on top of inference.yaml, written by "
              "dints3d:\n#   python -m monai.bundle run --config_file \"['configs/inference.yaml', "
              "'configs/ensemble.yaml']\"\n# mirror_axes: test-time mirroring ([] = off); largest_component_labels: "
              "post-processing chosen on cross-validation.\n")
    body = dump_yaml(ensemble_config(members, mirror_axes, largest_component_labels))
    return write_text(Path(bundle) / "configs" / ENSEMBLE_CONFIG, header + body)


def ensemble_configs(bundle: str | os.PathLike) -> list[str]:
    """The inference configs of a bundle: ``inference.yaml``, plus ``ensemble.yaml`` when it has one."""
    has_ensemble = (Path(bundle) / "configs" / ENSEMBLE_CONFIG).is_file()
    return ["inference.yaml", ENSEMBLE_CONFIG] if has_ensemble else ["inference.yaml"]
