"""MONAI transform chains for Cityscapes-format data (2D, RGB), with DeepLab's training augmentation.

Deterministic head (cached by ``CacheDataset``): load the PNGs in PIL's row-major order → channel first → label ids
to train ids (``MapLabelValued``; ignored ids → 255) → scale by ``image_scale`` (the search uses half-resolution
images; bilinear for the image, which at a factor of 0.5 averages each 2 × 2 block, nearest for labels) → DeepLab's
intensity scaling [0, 255] → [−1, 1]. Random tail (DeepLab): a random scale in [0.5, 2] of the whole image, padding
to the crop size (image 0, label 255 = ignored), random crops, horizontal flips.

Inference keeps the metadata ``Invertd`` needs to bring logits back to the input's size (bilinear), and
:class:`SaveLabelIdsd` writes predictions as Cityscapes label-id PNGs, the format the official evaluator reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    RandFlipd,
    RandSpatialCropSamplesd,
    RandZoomd,
    ScaleIntensityRanged,
    SpatialPadd,
    Zoomd,
)

from dints3d.cityscapes.folder import core_name
from dints3d.cityscapes.labels import (
    IGNORE_INDEX,
    known_label_ids,
    label_id_table,
    train_id_table,
)
from dints3d.utils.io import write_stream

#: DeepLab's random scale range for training
SCALE_RANGE = (0.5, 2.0)
PREDICTION_SUFFIX = "_pred_labelIds.png"


def train_ids_transform(key: str = "label") -> MapLabelValued:
    """Cityscapes label ids → train ids (uint8) with MONAI's ``MapLabelValued``, built from cityscapesscripts' table:
    every id of the table is mapped, ignored ones to 255 (``prepare`` refuses ids outside the table)."""
    ids = sorted(known_label_ids())
    table = train_id_table()
    return MapLabelValued(keys=key, orig_labels=ids, target_labels=[int(table[i]) for i in ids], dtype=np.uint8)


class SaveLabelIdsd(MapTransform):
    """Write a predicted train-id map (``1 × H × W``) as ``output_dir/<core>_pred_labelIds.png`` in Cityscapes label
    ids (atomically), ``core`` (``city_sequence_frame``) taken from the source image's file name in the metadata."""

    def __init__(self, keys: str = "pred", output_dir: str = "predictions", meta_key: str = "image",
                 suffix: str = PREDICTION_SUFFIX):
        super().__init__(keys)
        self.output_dir, self.meta_key, self.suffix = Path(output_dir), meta_key, suffix
        self.table = label_id_table()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from PIL import Image  # pillow: optional (the cityscapes extra)

        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d.get(self.meta_key), "meta", None) or getattr(d[key], "meta", {})
            source = meta.get("filename_or_obj")
            if not source:
                raise ValueError(f"'{self.meta_key}' has no source file name in its metadata to name the prediction")
            train_ids = np.asarray(torch.as_tensor(d[key]).detach().cpu())[0].astype(np.int64)
            image = Image.fromarray(self.table[train_ids.clip(0, 255)])
            write_stream(self.output_dir / f"{core_name(source)}{self.suffix}", lambda f: image.save(f, format="PNG"))
        return d


def normalization(key: str = "image") -> ScaleIntensityRanged:
    """DeepLab's input scaling: [0, 255] → [−1, 1]."""
    return ScaleIntensityRanged(keys=key, a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0)


def preprocessing(keys: Sequence[str], image_scale: float = 1.0, device: torch.device | None = None) -> list:
    """The deterministic head for ``keys`` (``image`` and optionally ``label``): image ``3 × h × w`` float32 in
    [−1, 1], label ``1 × h × w`` train ids, with (h, w) = round(``image_scale`` × the file's size)."""
    keys = list(keys)
    steps = [
        LoadImaged(keys=keys, reader=PILReader(reverse_indexing=False), image_only=True),
        EnsureChannelFirstd(keys=keys),
    ]
    if "label" in keys:
        steps.append(train_ids_transform("label"))
    if image_scale != 1.0:
        steps.append(Zoomd(keys=keys, zoom=image_scale, mode=["bilinear" if k == "image" else "nearest" for k in keys],
                           keep_size=False))
    steps += [normalization(), EnsureTyped(keys=keys, dtype=[torch.float32 if k == "image" else torch.uint8
                                                              for k in keys])]
    if device is not None:
        steps.append(EnsureTyped(keys=keys, device=device, track_meta=False))
    return steps


def augmentation(patch_size: Sequence[int], num_samples: int = 1, augment: bool = True,
                 scale_range: Sequence[float] = SCALE_RANGE) -> list:
    """DeepLab's random tail: whole-image random scale, pad (image 0, label 255), ``num_samples`` random crops of
    ``patch_size``, horizontal flip. Without ``augment``: pad and crop only."""
    keys = ["image", "label"]
    steps = []
    if augment:
        steps.append(RandZoomd(keys=keys, prob=1.0, min_zoom=float(scale_range[0]), max_zoom=float(scale_range[1]),
                               mode=["bilinear", "nearest"], keep_size=False))
    steps += [
        SpatialPadd(keys="image", spatial_size=list(patch_size), value=0.0),
        SpatialPadd(keys="label", spatial_size=list(patch_size), value=IGNORE_INDEX),
        RandSpatialCropSamplesd(keys=keys, roi_size=list(patch_size), num_samples=num_samples, random_size=False),
    ]
    if augment:
        steps.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=1))  # axis 1 of (H, W): left ↔ right
    steps.append(EnsureTyped(keys=keys, track_meta=False))
    return steps


def train_transforms(patch_size: Sequence[int], num_samples: int = 1, augment: bool = True, image_scale: float = 0.5,
                     device: torch.device | None = None, scale_range: Sequence[float] = SCALE_RANGE) -> Compose:
    """Cached head + random tail: ``num_samples`` dicts with ``image`` ``3 × patch`` and ``label`` ``1 × patch``."""
    return Compose(preprocessing(["image", "label"], image_scale, device)
                   + augmentation(patch_size, num_samples, augment, scale_range))


def validation_transforms(image_scale: float = 0.5, device: torch.device | None = None) -> Compose:
    """Whole scaled images with labels: ``image`` 3 × h × w, ``label`` 1 × h × w (train ids)."""
    return Compose(preprocessing(["image", "label"], image_scale, device))


def inference_transforms(image_scale: float = 1.0) -> Compose:
    """Image only, metadata kept for ``Invertd`` (which undoes the scaling on the logits)."""
    return Compose(preprocessing(["image"], image_scale))
