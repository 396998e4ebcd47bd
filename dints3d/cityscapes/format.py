"""The Cityscapes task format (``leftImg8bit/`` + ``gtFine/``, 2D PNG images, 19 classes): how each stage treats a
Cityscapes task (:class:`~dints3d.data.formats.TaskFormat`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.transforms import Compose, RandSpatialCropSamplesd, SpatialPadd
from torch import nn

from dints3d.cityscapes import transforms
from dints3d.cityscapes.folder import is_cityscapes
from dints3d.cityscapes.labels import IGNORE_INDEX
from dints3d.cityscapes.loss import IgnoreIndexCrossEntropy
from dints3d.cityscapes.prepare import FORMAT, PLAN_FIELDS, prepare_cityscapes, summary
from dints3d.data.fingerprint import check_overrides
from dints3d.data.formats import TaskFormat
from dints3d.data.prepare import one_source
from dints3d.spaces.dints.topology import patch_divisor


class CityscapesFormat(TaskFormat):
    name = FORMAT
    bundle_data_type = "png"
    plan_fields = PLAN_FIELDS
    labelled_cases = "labelled (train + val)"
    metric = ("iou", 0)
    stages = {"export": "dints3d.cityscapes.bundle:export_cityscapes_bundle",
              "infer": "dints3d.cityscapes.infer:infer_png", "evaluate": "dints3d.cityscapes.evaluate:run_evaluate",
              "synthesize": "dints3d.cityscapes.synthetic:make_cityscapes_task"}

    def recognizes(self, folder: str | os.PathLike) -> bool:
        return is_cityscapes(folder)

    def prepare(self, task_dir: str | os.PathLike, work_dir: Path, folds: int, seed: int, cfg: Any,
                config_source: str | Mapping[str, str], progress: bool) -> dict[str, dict]:
        """One fold (Cityscapes' official train / val split); crops divisible by the DiNTS grid's divisor when the
        configured space is DiNTS (Auto-DeepLab takes any crop size)."""
        divisor = patch_divisor(cfg.dints.num_depths, cfg.dints.use_downsample) if cfg.space == "dints" else 1
        return prepare_cityscapes(task_dir, work_dir, seed, divisor, cfg.plan, one_source(config_source), progress)

    def summary(self, outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
        return summary(outputs, work_dir)

    def apply_plan_overrides(self, plan: dict, overrides: Mapping[str, Any],
                             source: str | Mapping[str, str]) -> dict:
        check_overrides(dict(overrides), source, PLAN_FIELDS, dims=2)
        plan.update(overrides)
        return plan

    def train_transforms(self, plan: Mapping, patch_size: Sequence[int], num_samples: int = 1, augment: bool = True,
                         device: torch.device | None = None) -> Compose:
        return transforms.train_transforms(patch_size, num_samples, augment, float(plan["image_scale"]), device)

    def validation_transforms(self, plan: Mapping, device: torch.device | None = None) -> Compose:
        return transforms.validation_transforms(float(plan["image_scale"]), device)

    def inference_transforms(self, plan: Mapping) -> Compose:
        return transforms.inference_transforms(float(plan["image_scale"]))

    def loss(self, plan: Mapping) -> nn.Module:
        return IgnoreIndexCrossEntropy(int(plan.get("ignore_index", IGNORE_INDEX)))

    def proxy_crop(self, plan: Mapping, patch: Sequence[int]) -> tuple[Compose, list[int]]:
        """Uniform random crops; the label padded with the ignore index."""
        crop = list(patch)
        return Compose([
            SpatialPadd(keys="image", spatial_size=crop, value=0.0),
            SpatialPadd(keys="label", spatial_size=crop, value=int(plan.get("ignore_index", IGNORE_INDEX))),
            RandSpatialCropSamplesd(keys=["image", "label"], roi_size=crop, num_samples=1, random_size=False),
        ]), crop
