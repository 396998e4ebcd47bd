"""MONAI transform chains built from ``plan.json``.

Deterministic steps (load → channel first → orientation → spacing → normalization) come first so that
``CacheDataset``/``PersistentDataset`` cache their result; random steps (patch sampling, augmentation) follow.
Inference keeps the metadata ``Invertd`` needs to map predictions back to the input's grid.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from dints3d.errors import DintsError


class NormalizeByPland(MapTransform):
    """Per-channel intensity normalization as the plan says (``C[spatial]`` in, float32 out).

    ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to [lo, hi], then (x − m) / s with dataset
    statistics. ``{"scheme": "zscore_nonzero"}``: per image, (x − mean) / std over the channel's non-zero voxels,
    zero voxels stay 0 (as MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``).
    """

    def __init__(self, keys: KeysCollection, normalization: Sequence[Mapping], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.normalization = [dict(n) for n in normalization]
        for n in self.normalization:
            if n.get("scheme") not in ("ct", "zscore_nonzero"):
                raise DintsError("plan.json", f"unknown normalization scheme {n.get('scheme')!r}")

    @staticmethod
    def _normalize(channel: torch.Tensor, spec: Mapping) -> torch.Tensor:
        if spec["scheme"] == "ct":
            lo, hi = spec["clip"]
            return (channel.clamp(lo, hi) - spec["mean"]) / max(float(spec["std"]), 1e-8)
        mask = channel != 0
        if not bool(mask.any()):
            return channel
        values = channel[mask]
        std = values.std(unbiased=False) if values.numel() > 1 else values.new_tensor(1.0)
        out = torch.zeros_like(channel)
        out[mask] = (values - values.mean()) / torch.clamp(std, min=1e-8)
        return out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.normalization):
                raise DintsError(
                    str(d.get(f"{key}_path", key)),
                    f"image has {img.shape[0]} channels but the plan normalizes {len(self.normalization)}",
                )
            # In-place on a float copy keeps a MetaTensor's affine and applied operations (needed by Invertd).
            out = img.float().clone()
            raw = out.as_tensor() if hasattr(out, "as_tensor") else out
            for c, spec in enumerate(self.normalization):
                raw[c] = self._normalize(raw[c], spec)
            d[key] = out
        return d


_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # NIfTI world axes, stated to keep MONAI's behaviour fixed


def _preprocessing(plan: Mapping, keys: Sequence[str], device: torch.device | None = None) -> list:
    """The deterministic head of every chain."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    steps = [
        LoadImaged(keys=list(keys), image_only=True),
        EnsureChannelFirstd(keys=list(keys)),
        Orientationd(keys=list(keys), axcodes=plan.get("orientation", "RAS"), labels=_RAS_LABELS),
        Spacingd(keys=list(keys), pixdim=plan["target_spacing"], mode=modes),
        NormalizeByPland(keys="image", normalization=plan["normalization"]),
        EnsureTyped(keys=list(keys), dtype=[torch.float32 if k == "image" else torch.uint8 for k in keys]),
    ]
    if device is not None:
        steps.append(EnsureTyped(keys=list(keys), device=device, track_meta=False))
    return steps


def train_transforms(
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


def validation_transforms(plan: Mapping, device: torch.device | None = None) -> Compose:
    """Whole preprocessed volumes with labels: ``image`` C×spatial, ``label`` 1×spatial."""
    return Compose(_preprocessing(plan, ["image", "label"], device))


def inference_transforms(plan: Mapping) -> Compose:
    """Image only, metadata kept for ``Invertd`` (orientation and spacing are undone on the prediction)."""
    return Compose(_preprocessing(plan, ["image"]))
