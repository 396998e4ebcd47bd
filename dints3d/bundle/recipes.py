"""Training recipes for a bundle's retraining (``train.recipe``), written as MONAI config items for ``train.yaml``.

- ``nnunet`` (default): nnU-Net's defaults (Isensee et al., Nature Methods 2021; nnU-Net v2's trainer), with MONAI
  transforms: foreground oversampling (a third of the patches centred on foreground), rotation and scaling
  (in-plane only for anisotropic plans), optional elastic deformation, Gaussian noise, Gaussian blur, multiplicative
  brightness, contrast, simulated low resolution, gamma (also on the inverted image), mirroring on every axis; SGD
  with Nesterov momentum 0.99, learning rate 0.01 with poly decay (power 0.9), weight decay 3e-5; DiceCE on every
  output head of deep-supervised networks (weights 1, ½, ¼, …).
- ``dints``: the DiNTS paper's retraining recipe as dints3d shipped it first: class-balanced patches (equal ratios),
  flips, in-plane 90° rotations, light intensity jitter; SGD momentum 0.9, learning rate 0.025 halved at 20/40/60/80 %
  of the iterations, weight decay 4e-5.

Each function returns plain data (dicts and lists) that ``monai.bundle.ConfigParser`` instantiates; references such
as ``@patch_size`` are the bundle's own settings.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from dints3d.config import RECIPES

KEYS = ["image", "label"]


def in_plane_axes(plan: Mapping, dims: int) -> list[int]:
    """The axes of a slice: all but the plan's anisotropic (thick-slice) axis, if it has one."""
    return [a for a in range(dims) if a != plan.get("anisotropic_axis")]


def _nnunet_spatial(plan: Mapping, dims: int, elastic: bool) -> list[dict[str, Any]]:
    """Rotation (±30° about every axis; anisotropic plans: ±180° about the thick axis only, so slices stay slices)
    and scaling 0.7–1.4 (one factor for all axes), each with probability 0.2, then optional elastic deformation."""
    anisotropic = plan.get("anisotropic_axis")
    if dims == 2:
        rotate: list[float] = [math.pi]
    elif anisotropic is None:
        rotate = [math.pi / 6] * 3
    else:
        rotate = [math.pi if a == anisotropic else 0.0 for a in range(3)]
    steps = [
        {"_target_": "RandRotated", "keys": KEYS, "prob": 0.2, "mode": ["bilinear", "nearest"],
         "padding_mode": "zeros", "keep_size": True,
         **{f"range_{axis}": angle for axis, angle in zip("xyz", rotate)}},
        {"_target_": "RandZoomd", "keys": KEYS, "prob": 0.2, "min_zoom": 0.7, "max_zoom": 1.4,
         "mode": ["trilinear" if dims == 3 else "bilinear", "nearest"], "padding_mode": "constant", "keep_size": True},
    ]
    if elastic:
        steps.append({"_target_": "Rand3DElasticd" if dims == 3 else "Rand2DElasticd", "keys": KEYS, "prob": 0.2,
                      "sigma_range": [9, 13], "magnitude_range": [0, 900] if dims == 3 else [0, 200],
                      "mode": ["bilinear", "nearest"], "padding_mode": "zeros"})
    return steps


def augmentation(recipe: str, plan: Mapping, dims: int, elastic: bool = False) -> list[dict[str, Any]]:
    """The random part of the training chain (after the cached preprocessing): patch sampling then augmentation.
    Output per sample: ``image`` ``C×patch`` float32, ``label`` ``1×patch``."""
    pad = {"_target_": "SpatialPadd", "keys": KEYS, "spatial_size": "@patch_size"}
    end = {"_target_": "EnsureTyped", "keys": KEYS, "track_meta": False}
    flips = [{"_target_": "RandFlipd", "keys": KEYS, "prob": 0.5, "spatial_axis": axis} for axis in range(dims)]
    if recipe == "dints":
        return [
            pad,
            {"_target_": "RandCropByLabelClassesd", "keys": KEYS, "label_key": "label", "spatial_size": "@patch_size",
             "num_classes": "@out_channels", "ratios": "$[1] * @out_channels", "num_samples": "@num_samples",
             "warn": False},
            *flips,
            {"_target_": "RandRotate90d", "keys": KEYS, "prob": 0.5, "max_k": 3,
             "spatial_axes": in_plane_axes(plan, dims)[:2], "_disabled_": "$@rotate90_axes is None"},
            {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
            {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
            {"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.15, "std": 0.05},
            end,
        ]
    if recipe != "nnunet":
        raise ValueError(recipe)
    return [
        pad,
        {"_target_": "RandCropByPosNegLabeld", "keys": KEYS, "label_key": "label", "spatial_size": "@patch_size",
         "pos": 1, "neg": 2, "num_samples": "@num_samples"},
        *_nnunet_spatial(plan, dims, elastic),
        {"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.1, "mean": 0.0, "std": 0.1},
        {"_target_": "RandGaussianSmoothd", "keys": "image", "prob": 0.2,
         **{f"sigma_{axis}": [0.5, 1.0] for axis in "xyz"[:dims]}},
        {"_target_": "RandScaleIntensityd", "keys": "image", "prob": 0.15, "factors": 0.25},
        {"_target_": "RandScaleIntensityFixedMeand", "keys": "image", "prob": 0.15, "factors": 0.25,
         "preserve_range": True},
        {"_target_": "RandSimulateLowResolutiond", "keys": "image", "prob": 0.25, "zoom_range": [0.5, 1.0]},
        {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.1, "gamma": [0.7, 1.5], "invert_image": True,
         "retain_stats": True},
        {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5], "invert_image": False,
         "retain_stats": True},
        *flips,
        end,
    ]


def optimizer(recipe: str) -> dict[str, Any]:
    """SGD over the network's parameters with the bundle's ``@learning_rate``, ``@momentum``, ``@weight_decay``."""
    return {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate",
            "momentum": "@momentum", "weight_decay": "@weight_decay", "nesterov": RECIPES[recipe]["nesterov"]}


def lr_scheduler(recipe: str) -> dict[str, Any]:
    """Stepped every iteration: poly decay to 0 (``nnunet``) or halving at ``@lr_decay_points`` (``dints``)."""
    if recipe == "nnunet":
        return {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "optimizer": "@optimizer",
                "total_iters": "@num_iterations", "power": 0.9}
    return {"_target_": "torch.optim.lr_scheduler.MultiStepLR", "optimizer": "@optimizer",
            "milestones": "$[int(p * @num_iterations) for p in @lr_decay_points]", "gamma": 0.5}
