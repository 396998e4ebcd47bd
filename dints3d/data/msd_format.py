"""The MSD task format (Medical Segmentation Decathlon: ``dataset.json``, 3D NIfTI volumes): the default
:class:`~dints3d.data.formats.TaskFormat`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.transforms import Compose, RandCropByLabelClassesd, SpatialPadd
from torch import nn

from dints3d.data.fingerprint import PLAN_FIELDS, apply_overrides, check_overrides
from dints3d.data.formats import TaskFormat
from dints3d.data.losses import dice_ce_loss
from dints3d.data.prepare import msd_summary, prepare_msd
from dints3d.data.transforms import (
    msd_inference_transforms,
    msd_train_transforms,
    msd_validation_transforms,
)


class MsdFormat(TaskFormat):
    name = "msd"
    bundle_data_type = "nifti"
    plan_fields = PLAN_FIELDS
    labelled_cases = "training"
    metric = ("dice", 1)
    stages = {"export": "dints3d.bundle.export:export_msd_bundle", "infer": "dints3d.bundle.infer:infer_nifti",
              "evaluate": "dints3d.evaluation.metrics:run_nifti", "synthesize": "dints3d.data.synthetic:make_msd_task"}

    def recognizes(self, folder: str | os.PathLike) -> bool:
        return (Path(folder) / "dataset.json").is_file()

    def prepare(self, task_dir: str | os.PathLike, work_dir: Path, folds: int, seed: int, cfg: Any,
                config_source: str | Mapping[str, str], progress: bool) -> dict[str, dict]:
        return prepare_msd(task_dir, work_dir, folds, seed, cfg, config_source, progress)

    def summary(self, outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
        return msd_summary(outputs, work_dir)

    def apply_plan_overrides(self, plan: dict, overrides: Mapping[str, Any],
                             source: str | Mapping[str, str]) -> dict:
        check_overrides(dict(overrides), source, PLAN_FIELDS, dims=len(plan["patch_size"]))
        return apply_overrides(plan, overrides, source, int(plan["in_channels"]), len(plan["labels"]))

    def train_transforms(self, plan: Mapping, patch_size: Sequence[int], num_samples: int = 1, augment: bool = True,
                         device: torch.device | None = None) -> Compose:
        return msd_train_transforms(plan, patch_size, num_samples, augment, device)

    def validation_transforms(self, plan: Mapping, device: torch.device | None = None) -> Compose:
        return msd_validation_transforms(plan, device)

    def inference_transforms(self, plan: Mapping) -> Compose:
        return msd_inference_transforms(plan)

    def loss(self, plan: Mapping) -> nn.Module:
        return dice_ce_loss()

    def proxy_crop(self, plan: Mapping, patch: Sequence[int]) -> tuple[Compose, list[int]]:
        """Class-balanced crops (equal ratios); a 2-element ``patch`` gives axial slices ``h × w × 1``."""
        keys = ["image", "label"]
        crop = list(patch) if len(patch) == 3 else [*patch, 1]
        classes = int(plan["out_channels"])
        return Compose([
            SpatialPadd(keys=keys, spatial_size=crop),
            RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=crop, num_classes=classes,
                                    ratios=[1] * classes, num_samples=1, warn=False),
        ]), crop
