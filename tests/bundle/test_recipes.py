"""Training recipes as MONAI config items: nnU-Net's augmentations each active with its probability, labels moved
with their images, anisotropic plans rotated in-plane only, deterministic under a seed; the recipes' optimizers and
learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from dints3d.bundle import recipes
from dints3d.config import RECIPES, load_config

PATCH = [16, 16, 16]
#: nnU-Net v2's default data augmentation: transform → probability
NNUNET_PROBABILITIES = {
    "RandRotated": 0.2, "RandZoomd": 0.2, "RandGaussianNoised": 0.1, "RandGaussianSmoothd": 0.2,
    "RandScaleIntensityd": 0.15, "RandScaleIntensityFixedMeand": 0.15, "RandSimulateLowResolutiond": 0.25,
    "RandFlipd": 0.5,
}
TRIALS = 400


def chain(recipe: str, plan: dict, dims: int = 3, elastic: bool = False) -> list:
    items = recipes.augmentation(recipe, plan, dims, elastic)
    parser = ConfigParser({"patch_size": PATCH[:dims], "out_channels": 3, "num_samples": 1,
                           "rotate90_axes": [0, 1], "items": items})
    return parser.get_parsed_content("items")


def sample(seed: int, dims: int = 3) -> dict:
    """A labelled case larger than the patch: a ball of class 1 with a smaller ball of class 2 inside, on noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * dims, indexing="ij"))
    radius = np.sqrt(((grid - 11.5) ** 2).sum(0))
    label = (radius < 9).astype(np.uint8) + (radius < 4)
    image = (label * 100.0 + rng.normal(0, 10, label.shape)).astype(np.float32)
    return {"image": torch.as_tensor(image[None]), "label": torch.as_tensor(label[None])}


def by_name(transforms: list, name: str) -> list:
    return [t for t in transforms if type(t).__name__ == name]


def test_nnunet_chain_has_every_augmentation_with_its_probability():
    transforms = chain("nnunet", {"anisotropic_axis": None})
    names = [type(t).__name__ for t in transforms]
    assert names[:2] == ["SpatialPadd", "RandCropByPosNegLabeld"] and names[-1] == "EnsureTyped"
    crop = transforms[1]
    assert crop.cropper.pos_ratio == pytest.approx(1 / 3)  # foreground oversampling: a third of the patches
    for name, prob in NNUNET_PROBABILITIES.items():
        assert by_name(transforms, name) and all(t.prob == prob for t in by_name(transforms, name)), name
    gammas = by_name(transforms, "RandAdjustContrastd")
    assert sorted((t.prob, t.adjuster.invert_image) for t in gammas) == [(0.1, True), (0.3, False)]
    assert [t.flipper.spatial_axis for t in by_name(transforms, "RandFlipd")] == [0, 1, 2]  # mirroring every axis
    assert not by_name(transforms, "Rand3DElasticd")
    assert by_name(chain("nnunet", {}, elastic=True), "Rand3DElasticd")[0].prob == 0.2


@pytest.mark.parametrize("name", sorted(set(NNUNET_PROBABILITIES) | {"RandAdjustContrastd"}))
def test_each_augmentation_fires_at_its_rate(name):
    """Applied alone to a cropped patch TRIALS times: the fraction of changed patches is the probability, within
    4 standard deviations of a binomial count."""
    transforms = chain("nnunet", {"anisotropic_axis": None})
    patch = transforms[1](transforms[0](sample(0)))[0]
    for index, transform in enumerate(by_name(transforms, name)):
        transform.set_random_state(seed=index)
        changed = sum(not torch.equal(torch.as_tensor(transform(dict(patch))["image"]), patch["image"])
                      for _ in range(TRIALS))
        p = transform.prob
        assert abs(changed - p * TRIALS) <= 4 * math.sqrt(TRIALS * p * (1 - p)), (name, changed / TRIALS, p)


def test_labels_move_with_their_images():
    """Spatial steps (crop, rotation, zoom, flips) on an image that is its own label map: after the transforms the
    image (interpolated) still overlaps the label (nearest) almost perfectly, in every trial that moved them."""
    spatial = [t for t in chain("nnunet", {"anisotropic_axis": None})
               if type(t).__name__ in ("SpatialPadd", "RandCropByPosNegLabeld", "RandRotated", "RandZoomd",
                                       "RandFlipd")]
    for seed in range(12):
        case = sample(seed)
        case["image"] = case["label"].float()
        pipeline = Compose(spatial)
        pipeline.set_random_state(seed=seed)
        (out,) = pipeline(case)
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        for cls in (1, 2):
            a, b = image.round() >= cls, label >= cls
            if b.sum() > 20:
                assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, (seed, cls)


def test_anisotropic_plans_rotate_in_plane_only():
    """Every slice across the thick axis stays one slice: a label whose slice z holds only z + 1 keeps, after any
    number of random rotations, only 0 or z + 1 in slice z. An isotropic plan does rotate out of plane."""
    label = torch.arange(1, 17, dtype=torch.uint8).reshape(1, 1, 1, 16).expand(1, 16, 16, 16).clone()
    case = {"image": label.float(), "label": label}
    for plan, stays in (({"anisotropic_axis": 2}, True), ({"anisotropic_axis": None}, False)):
        (rotate,) = by_name(chain("nnunet", plan), "RandRotated")
        rotate.set_random_state(seed=0)
        mixed = False
        for _ in range(60):
            out = torch.as_tensor(rotate(dict(case))["label"])
            for z in range(16):
                values = set(out[0, :, :, z].unique().tolist()) - {0}
                mixed |= not values <= {z + 1}
        assert mixed is not stays


def test_the_chain_is_deterministic_under_a_seed():
    transforms = chain("nnunet", {"anisotropic_axis": 2})
    outputs = []
    for _ in range(2):
        pipeline = Compose(transforms)
        pipeline.set_random_state(seed=7)
        outputs.append([pipeline(sample(1))[0] for _ in range(5)])
    for a, b in zip(*outputs):
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))


def test_dints_recipe_is_the_papers():
    names = [type(t).__name__ for t in chain("dints", {"anisotropic_axis": None})]
    assert names == ["SpatialPadd", "RandCropByLabelClassesd", "RandFlipd", "RandFlipd", "RandFlipd", "RandRotate90d",
                     "RandScaleIntensityd", "RandShiftIntensityd", "RandGaussianNoised", "EnsureTyped"]


@pytest.mark.parametrize("recipe, nesterov, first, last", [("nnunet", True, 0.01, 0.0), ("dints", False, 0.025,
                                                                                        0.025 / 16)])
def test_optimizer_and_schedule(recipe, nesterov, first, last):
    train = load_config(None, [f"train.recipe={recipe}"]).train
    settings = train.optimizer_settings()
    assert settings["lr"] == first and RECIPES[recipe]["momentum"] == settings["momentum"]
    network = torch.nn.Linear(2, 2)
    parser = ConfigParser({"network": network, "learning_rate": settings["lr"], "momentum": settings["momentum"],
                           "weight_decay": settings["weight_decay"], "num_iterations": 100,
                           "lr_decay_points": [0.2, 0.4, 0.6, 0.8], "optimizer": recipes.optimizer(recipe),
                           "lr_scheduler": recipes.lr_scheduler(recipe)})
    optimizer, scheduler = parser.get_parsed_content("optimizer"), parser.get_parsed_content("lr_scheduler")
    assert optimizer.defaults["nesterov"] is nesterov
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(first) and optimizer.param_groups[0]["lr"] == pytest.approx(last, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises
    explicit = load_config(None, [f"train.recipe={recipe}", "train.lr=0.5"]).train
    assert explicit.optimizer_settings()["lr"] == 0.5
