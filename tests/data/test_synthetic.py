"""``dints3d synth``: an MSD-format folder that behaves like real data, byte-identical for a seed."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dints3d.cli import main
from dints3d.data.synthetic import make_msd_task


def _arrays(task: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {str(p.relative_to(task)): (np.asanyarray(nib.load(p).dataobj), nib.load(p).affine)
            for p in sorted(task.rglob("*.nii.gz"))}


def _training(task: Path):
    """(image array, label array, image nifti, label nifti) per training case."""
    meta = json.loads((task / "dataset.json").read_text())
    for item in meta["training"]:
        img, lab = nib.load(task / item["image"]), nib.load(task / item["label"])
        yield np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img, lab


@pytest.fixture(scope="module")
def ct_task(msd_task):
    return msd_task(cases=4, test_cases=1, size=32, seed=3)


@pytest.fixture(scope="module")
def mri_task(msd_task):
    return msd_task(cases=4, test_cases=1, classes=3, modalities=2, anisotropic=True, size=32, seed=1)


def test_dataset_json_follows_msd_layout(ct_task):
    meta = json.loads((ct_task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert (meta["numTraining"], meta["numTest"]) == (4, 1)
    assert len(meta["training"]) == 4 and len(meta["test"]) == 1
    for item in meta["training"]:
        assert item["image"].startswith("./imagesTr/") and item["label"].startswith("./labelsTr/")
        assert (ct_task / item["image"]).is_file() and (ct_task / item["label"]).is_file()
    assert meta["test"][0].startswith("./imagesTs/") and (ct_task / meta["test"][0]).is_file()
    assert not (ct_task / "labelsTr" / Path(meta["test"][0]).name).exists()


def test_ct_cases_look_like_real_ct(ct_task):
    shapes = set()
    for image, label, img, lab in _training(ct_task):
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape and image.ndim == 3
        assert all(n % 32 for n in image.shape), image.shape  # size 32 would give sides of exactly 32 otherwise
        shapes.add(image.shape)
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert np.linalg.norm(img.affine[:3, 3]) > 10 and np.array_equal(img.affine, lab.affine)
        assert set(np.unique(label)) == {0, 1, 2}
        assert image.min() >= -1024 and image[label == 0].min() < -900  # air outside the body
        organ, lesion = image[label == 1].mean(), image[label == 2].mean()
        assert 60 < organ < 160 and lesion < organ - 20
    assert len(shapes) == 4


def test_classes_are_not_separable_by_intensity_alone(ct_task):
    """Clutter and noise put many unlabelled voxels inside the organ's intensity range."""
    for image, label, _, _ in _training(ct_task):
        low, high = np.percentile(image[label == 1], [25, 75])
        lookalikes = np.count_nonzero((label == 0) & (image >= low) & (image <= high))
        assert lookalikes > 0.1 * np.count_nonzero(label == 1)


def test_cases_differ_in_drift(ct_task):
    organ_means = [image[label == 1].mean() for image, label, _, _ in _training(ct_task)]
    assert np.std(organ_means) > 2.0  # HU: per-case bias field and jitter, beyond the averaged-out noise


def test_mri_task_is_4d_anisotropic_and_multiclass(mri_task):
    meta = json.loads((mri_task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T2", "1": "ADC"} and meta["tensorImageSize"] == "4D"
    assert list(meta["labels"]) == ["0", "1", "2", "3"]
    z_spacings = []
    for image, label, img, _ in _training(mri_task):
        assert image.ndim == 4 and image.shape[3] == 2 and image.shape[:3] == label.shape
        assert image.dtype == np.float32 and image.min() >= 0
        zooms = img.header.get_zooms()[:3]
        assert zooms[2] > 3 * max(zooms[:2])
        z_spacings.append(zooms[2])
        assert np.all(image[label > 0] > 0)
        assert set(np.unique(label)) >= {0, 1, 3}
        # the two modalities carry different contrast between organ and body
        ratios = image[label == 1].mean(axis=0) / image[(label == 0) & (image[..., 0] > 0)].mean(axis=0)
        assert abs(ratios[0] - ratios[1]) > 0.1
    assert len(set(z_spacings)) == len(z_spacings)


def test_same_seed_same_arrays_other_seed_differs(tmp_path):
    a = _arrays(make_msd_task(tmp_path / "a", cases=2, test_cases=1, size=20, seed=7))
    b = _arrays(make_msd_task(tmp_path / "b", cases=2, test_cases=1, size=20, seed=7))
    c = _arrays(make_msd_task(tmp_path / "c", cases=2, test_cases=1, size=20, seed=8))
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert a[key][0].tobytes() == b[key][0].tobytes() and np.array_equal(a[key][1], b[key][1])
    assert any(a[k][0].shape != c[k][0].shape or not np.array_equal(a[k][0], c[k][0]) for k in a)


def test_cli_defaults_are_small(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "t")]) == 0
    meta = json.loads((tmp_path / "t" / "dataset.json").read_text())
    assert (len(meta["training"]), len(meta["test"]), meta["modality"]) == (8, 2, {"0": "CT"})
    shape = nib.load(tmp_path / "t" / meta["training"][0]["image"]).shape
    assert all(36 <= n <= 60 for n in shape)
    assert "8 training" in capsys.readouterr().out


@pytest.mark.parametrize("argv, problem", [
    (["--cases", "0"], "cases ≥ 1"),
    (["--size", "8"], "size must be ≥ 16"),
])
def test_cli_refuses_bad_options(tmp_path, capsys, argv, problem):
    assert main(["synth", "--out", str(tmp_path / "t"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 't'}: ") and problem in err


def test_cli_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: already exists")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
