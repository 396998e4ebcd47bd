"""MONAI transform chains built from ``plan.json``.

Deterministic steps (load → channel first → orientation → spacing → normalization) come first so that
``CacheDataset``/``PersistentDataset`` cache their result; random steps (patch sampling, augmentation) follow.
Inference keeps the metadata ``Invertd`` needs to map predictions back to the input's grid.
:func:`train_transforms`, :func:`validation_transforms` and :func:`inference_transforms` give the chains of the plan's
format (:mod:`dints3d.data.formats`); the ``msd_*`` functions are MSD's (Cityscapes': :mod:`dints3d.cityscapes.transforms`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from dints3d.data.formats import plan_format
from dints3d.utils.errors import DintsError


def normalization_transform(plan: Mapping, key: str = "image") -> MapTransform:
    """The plan's intensity normalization as one MONAI transform (so bundles can use it with MONAI alone).

    CT (``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``): clip to [lo, hi] then (x − m) / s, which is
    exactly ``ScaleIntensityRanged`` mapping [lo, hi] → [(lo − m)/s, (hi − m)/s] with clipping. Other modalities
    (``zscore_nonzero``): ``NormalizeIntensityd(nonzero=True, channel_wise=True)``.
    """
    specs = list(plan["normalization"])
    schemes = {spec.get("scheme") for spec in specs}
    if schemes == {"zscore_nonzero"}:
        return NormalizeIntensityd(keys=key, nonzero=True, channel_wise=True)
    if schemes == {"ct"} and len(specs) == 1:
        (spec,) = specs
        lo, hi = (float(v) for v in spec["clip"])
        mean, std = float(spec["mean"]), max(float(spec["std"]), 1e-8)
        return ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=(lo - mean) / std, b_max=(hi - mean) / std,
                                    clip=True)
    raise DintsError("plan.json", f"unsupported normalization {sorted(map(str, schemes))} for {len(specs)} channels "
                     "(one CT channel, or z-score for every channel)")


_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes, stated to keep MONAI's behaviour fixed


def _preprocessing(plan: Mapping, keys: Sequence[str], device: torch.device | None = None) -> list:
    """The deterministic head of every chain."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    steps = [
        LoadImaged(keys=list(keys), image_only=True),
        EnsureChannelFirstd(keys=list(keys)),
        Orientationd(keys=list(keys), axcodes=plan.get("orientation", "RAS"), labels=_RAS_LABELS),
        Spacingd(keys=list(keys), pixdim=plan["target_spacing"], mode=modes),
        normalization_transform(plan),
        EnsureTyped(keys=list(keys), dtype=[torch.float32 if k == "image" else torch.uint8 for k in keys]),
    ]
    if device is not None:
        steps.append(EnsureTyped(keys=list(keys), device=device, track_meta=False))
    return steps


def train_transforms(plan: Mapping, patch_size: Sequence[int], num_samples: int = 1, augment: bool = True,
                     device: torch.device | None = None) -> Compose:
    """The training chain of the plan's format: ``num_samples`` dicts with ``image`` ``C×patch`` float32 and
    ``label`` ``1×patch``. ``device`` caches the preprocessed case there (GPU)."""
    return plan_format(plan).train_transforms(plan, patch_size, num_samples, augment, device)


def validation_transforms(plan: Mapping, device: torch.device | None = None) -> Compose:
    """Whole preprocessed cases with labels (the plan's format): ``image`` C×spatial, ``label`` 1×spatial."""
    return plan_format(plan).validation_transforms(plan, device)


def inference_transforms(plan: Mapping) -> Compose:
    """Image only, with the metadata needed to map predictions back to the input's grid (the plan's format)."""
    return plan_format(plan).inference_transforms(plan)


def msd_train_transforms(
    plan: Mapping,
    patch_size: Sequence[int],
    num_samples: int = 1,
    augment: bool = True,
    device: torch.device | None = None,
) -> Compose:
    """Training chain: cached preprocessing, then class-balanced random patches of ``patch_size`` (equal ratios
    over all classes, as the DiNTS recipe) and augmentation. Output: ``num_samples`` dicts with ``image``
    ``C×patch`` float32 and ``label`` ``1×patch``. ``device`` caches the preprocessed volume there (GPU)."""
    keys = ["image", "label"]
    num_classes = int(plan["out_channels"])
    steps = _preprocessing(plan, keys, device)
    steps += [
        SpatialPadd(keys=keys, spatial_size=list(patch_size)),
        RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=list(patch_size),
            num_classes=num_classes,
            ratios=[1] * num_classes,
            num_samples=num_samples,
            warn=False,
        ),
    ]
    if augment:
        anisotropic = plan.get("anisotropic_axis")
        in_plane = [a for a in range(len(patch_size)) if a != anisotropic][:2]
        steps += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(len(patch_size))]
        if len(patch_size) == 3 and patch_size[in_plane[0]] == patch_size[in_plane[1]]:
            steps.append(RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=tuple(in_plane)))
        steps += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.15, std=0.05),
        ]
    steps.append(EnsureTyped(keys=keys, track_meta=False))
    return Compose(steps)


def msd_validation_transforms(plan: Mapping, device: torch.device | None = None) -> Compose:
    """Whole preprocessed volumes with labels: ``image`` C×spatial, ``label`` 1×spatial."""
    return Compose(_preprocessing(plan, ["image", "label"], device))


def msd_inference_transforms(plan: Mapping) -> Compose:
    """Image only, metadata kept for ``Invertd`` (orientation and spacing are undone on the prediction)."""
    return Compose(_preprocessing(plan, ["image"]))
