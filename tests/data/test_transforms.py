"""Transform chains from a prepared plan."""

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from dints3d.data.dataset import load_items, load_plan, make_dataset
from dints3d.data.transforms import (
    inference_transforms,
    normalization_transform,
    train_transforms,
    validation_transforms,
)
from dints3d.utils.errors import DintsError


@pytest.fixture(scope="module")
def work(prepared_task):
    """Two modalities, anisotropic voxels."""
    return prepared_task(folds=2, cases=4, test_cases=1, modalities=2, anisotropic=True, size=40).work


def test_ct_normalization_is_clip_then_zscore():
    plan = {"normalization": [{"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 25.0}]}
    x = torch.tensor([[-500.0, -100.0, 50.0, 75.0, 999.0]])
    out = normalization_transform(plan)({"image": x})["image"]
    expected = (x.clamp(-100, 200) - 50) / 25
    torch.testing.assert_close(torch.as_tensor(out), expected)


def test_mri_normalization_is_per_channel_nonzero_zscore():
    plan = {"normalization": [{"scheme": "zscore_nonzero"}, {"scheme": "zscore_nonzero"}]}
    x = torch.tensor([[0.0, 1.0, 3.0], [10.0, 20.0, 0.0]])
    out = torch.as_tensor(normalization_transform(plan)({"image": x})["image"])
    assert out[0, 0] == 0 and out[1, 2] == 0
    torch.testing.assert_close(out[0, 1:], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out[1, :2], torch.tensor([-1.0, 1.0]))


def test_mixed_normalization_refused():
    plan = {"normalization": [{"scheme": "ct", "clip": [0, 1], "mean": 0, "std": 1}, {"scheme": "zscore_nonzero"}]}
    with pytest.raises(DintsError, match="unsupported normalization"):
        normalization_transform(plan)


def test_train_patches_have_plan_shape_channels_and_labels(work):
    plan = load_plan(work)
    patch = [32, 32, 32]
    ds = make_dataset(load_items(work, "fold0_weights"), train_transforms(plan, patch, num_samples=3), progress=False)
    samples = ds[0]
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (plan["in_channels"], *patch)
        assert s["image"].dtype == torch.float32
        assert tuple(s["label"].shape) == (1, *patch)
        assert set(np.unique(s["label"].numpy())) <= set(range(plan["out_channels"]))


def test_validation_volume_is_resampled_to_target_spacing(work):
    plan = load_plan(work)
    item = load_items(work, "fold0_validation")[0]
    out = validation_transforms(plan)(item)
    assert out["image"].shape[0] == plan["in_channels"] and out["label"].shape[1:] == out["image"].shape[1:]
    spacing = np.sqrt((out["image"].affine[:3, :3].numpy() ** 2).sum(0))
    np.testing.assert_allclose(spacing, plan["target_spacing"], rtol=1e-3)


def test_inference_prediction_inverts_to_input_grid(work):
    """Invertd maps a prediction made on the preprocessed grid back to the input's shape and affine."""
    import nibabel as nib

    plan = load_plan(work)
    item = {"image": load_items(work, "fold0_validation")[0]["image"]}
    pre = inference_transforms(plan)
    data = pre(item)
    data["pred"] = data["image"][:1].clone()
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)
    original = nib.load(item["image"])
    assert tuple(inverted["pred"].shape[1:]) == original.shape[:3]
    np.testing.assert_allclose(inverted["pred"].affine.numpy(), original.affine, atol=1e-4)
