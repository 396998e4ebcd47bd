"""Corrupted tasks: ``dints3d prepare`` exits 2 with one line ``error: <file>: <problem>`` naming the offending file,
no traceback, and writes nothing (a fresh WORK stays absent, an existing WORK keeps its files byte for byte)."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dints3d.cli import main

IMAGE = "imagesTr/synthetic_001.nii.gz"
LABEL = "labelsTr/synthetic_001.nii.gz"


def _edit_json(task: Path, edit) -> Path:
    path = task / "dataset.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _rewrite(task: Path, rel: str, change) -> Path:
    """Replace a NIfTI by ``change(array, affine) -> (array, affine)``."""
    path = task / rel
    img = nib.load(path)
    data, affine = change(np.asanyarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def missing_key(task):
    return _edit_json(task, lambda d: d.pop("labels")), "missing required key(s): labels"


def invalid_json(task):
    path = task / "dataset.json"
    path.write_text(path.read_text()[:-20])
    return path, "invalid JSON"


def missing_dataset_json(task):
    (task / "dataset.json").unlink()
    return task / "dataset.json", "file not found"


def label_not_found(task):
    (task / LABEL).unlink()
    return task / LABEL, "file not found"


def missing_test_image(task):
    path = task / "imagesTs/synthetic_004.nii.gz"
    path.unlink()
    return path, "file not found"


def truncated(task):
    path = task / IMAGE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, "truncated or corrupt"


def not_gzip(task):
    path = task / LABEL
    path.write_bytes(b"this is not a NIfTI file" * 40)
    return path, "truncated or corrupt"


def label_shape(task):
    return _rewrite(task, LABEL, lambda a, aff: (a[:-3], aff)), "differs from the image's spatial shape"


def affine_mismatch(task):
    def shift(a, aff):
        aff[:3, 3] += 5.0
        return a, aff
    return _rewrite(task, LABEL, shift), "label affine differs from the image's"


def label_value(task):
    def add_seven(a, aff):
        a = a.copy()
        a[1, 1, 1] = 7
        return a, aff
    return _rewrite(task, LABEL, add_seven), "label value(s) [7] not declared"


def nan_voxels(task):
    def poke(a, aff):
        a = a.astype(np.float32)
        a[2:4, 2, 2] = np.nan
        return a, aff
    return _rewrite(task, IMAGE, poke), "2 NaN or infinite voxels"


def _nonfinite_label(task, value: float):
    def poke(a, aff):
        a = a.astype(np.float32)
        a[1, 1, 1] = value
        return a, aff
    return _rewrite(task, LABEL, poke), "label contains NaN/Inf"


def inf_label(task):
    return _nonfinite_label(task, np.inf)


def nan_label(task):
    return _nonfinite_label(task, np.nan)


def complex_image(task):
    return _rewrite(task, IMAGE, lambda a, aff: (a.astype(np.complex64), aff)), "image is complex-valued (complex64)"


def image_2d(task):
    return _rewrite(task, IMAGE, lambda a, aff: (a[:, :, 0], aff)), "(2D); expected 3D"


def modality_count(task):
    return _rewrite(task, IMAGE, lambda a, aff: (np.stack([a, a], -1), aff)), "(4D); expected 3D, or 4D with 1"


def empty_training(task):
    return _edit_json(task, lambda d: d.update(training=[])), "'training' must be a non-empty list"


def duplicate_case(task):
    problem = "duplicate case 'synthetic_000' (imagesTr/synthetic_000.nii.gz and imagesTr/synthetic_000.nii.gz)"
    return _edit_json(task, lambda d: d["training"].append(d["training"][0])), problem


def duplicate_case_id(task):
    def add(d):
        d["training"].append({"image": "./imagesTr/other/synthetic_000.nii.gz", "label": d["training"][1]["label"]})
    return _edit_json(task, add), "duplicate case 'synthetic_000'"


def duplicate_in_test_set(task):
    problem = "duplicate case 'synthetic_002' (imagesTr/synthetic_002.nii.gz and imagesTs/synthetic_002.nii.gz)"
    return _edit_json(task, lambda d: d["test"].append("./imagesTs/synthetic_002.nii.gz")), problem


def constant_image(task):
    return _rewrite(task, IMAGE, lambda a, aff: (np.full_like(a, 50), aff)), "image is constant (every voxel is 50)"


def constant_foreground(task):
    """Every training image's foreground is one value (the background still varies): no CT intensity range."""
    for case in json.loads((task / "dataset.json").read_text())["training"]:
        label = np.asanyarray(nib.load(task / case["label"]).dataobj)
        _rewrite(task, case["image"], lambda a, aff: (np.where(label > 0, 50, a).astype(a.dtype), aff))
    return task / "dataset.json", "are (almost) all one value: their 0.5–99.5 percentile range is [50, 50]"


def _header_rewrite(task: Path, rel: str, change) -> Path:
    """Replace a NIfTI's sform by ``change(sform)`` in its header (nibabel cannot build an image from an affine
    without a decomposition, so the header is edited directly; the qform is cleared)."""
    path = task / rel
    img = nib.load(path)
    header = img.header.copy()
    sform = change(img.affine.copy())
    header.set_qform(None, code=0)
    for axis, row in enumerate(("srow_x", "srow_y", "srow_z")):
        header[row] = sform[axis]
    header["sform_code"] = 1
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header=header), path)
    return path


def zero_spacing(task):
    def zero_column(aff):
        aff[:3, 0] = 0.0
        return aff
    return _header_rewrite(task, IMAGE, zero_column), "has a zero axis (a zero column in the header's sform/qform)"


def nan_origin(task):
    def nan(aff):
        aff[0, 3] = np.nan
        return aff
    return _header_rewrite(task, IMAGE, nan), "affine (sform/qform) has NaN or infinite values in its origin"


def outlier_spacing(task):
    """One case's header says 10⁴ times the others' spacing: resampled, it would need petabytes."""
    def coarse(a, aff):
        aff[:3, :3] *= 1e4
        return a, aff
    _rewrite(task, LABEL, coarse)
    return _rewrite(task, IMAGE, coarse), "GiB per channel, more than 8); check the voxel size in the header"


def image_as_label(task):
    shutil.copyfile(task / IMAGE, task / LABEL)
    return task / LABEL, "undeclared values in all; is this an image rather than a label map?)] not declared"


def duplicate_class_names(task):
    def rename(d):
        d["labels"] = {"0": "background", "1": "organ", "2": "Organ"}
    return _edit_json(task, rename), "'labels' names class 1 and class 2 both 'Organ'"


def duplicate_json_key(task):
    path = task / "dataset.json"
    path.write_text(path.read_text().replace('"labels":', '"labels": {"0": "background"}, "labels":', 1))
    return path, "invalid JSON: key 'labels' appears twice in one object"


def deeply_nested_json(task):
    path = task / "dataset.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path, "invalid JSON: nested too deeply to read"


def nnunet_v2_dataset_json(task):
    """An nnU-Net v2 raw dataset's dataset.json (the format users most often have besides MSD's)."""
    path = task / "dataset.json"
    path.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                                "numTraining": 4, "file_ending": ".nii.gz"}))
    return path, "is an nnU-Net v2 dataset.json"


CORRUPTIONS = [missing_key, invalid_json, missing_dataset_json, label_not_found, missing_test_image, truncated,
               not_gzip, label_shape, affine_mismatch, label_value, nan_voxels, inf_label, nan_label, complex_image,
               image_2d, modality_count,
               empty_training, duplicate_case, duplicate_case_id, duplicate_in_test_set,
               constant_image, constant_foreground, zero_spacing, nan_origin, outlier_spacing, image_as_label,
               duplicate_class_names, duplicate_json_key, deeply_nested_json, nnunet_v2_dataset_json]


@pytest.fixture(scope="module")
def good_work(small_task):
    """The good task's work folder (2 folds), for the tests that prepare over an existing one (they copy it)."""
    return small_task.work


@pytest.fixture
def task(small_task, tmp_path):
    """A copy of a good task (4 training cases, synthetic_004 the test case) for each test to corrupt."""
    return Path(shutil.copytree(small_task.task, tmp_path / "task"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


def _assert_one_error_line(err: str, path: Path, problem: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, err  # one line, of a readable length
    assert lines[0].startswith(f"error: {path}: "), err
    assert problem in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_fresh_work_gets_nothing(task, tmp_path, capsys, corrupt):
    path, problem = corrupt(task)
    work = tmp_path / "work"
    assert main(["prepare", "--task", str(task), "--out", str(work), "--folds", "2"]) == 2
    out, err = capsys.readouterr()
    _assert_one_error_line(err, path, problem)
    assert out == "" and not work.exists()


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_existing_work_is_left_intact(task, good_work, tmp_path, capsys, corrupt):
    work = Path(shutil.copytree(good_work, tmp_path / "work"))
    before = _snapshot(work)
    path, problem = corrupt(task)
    assert main(["prepare", "--task", str(task), "--out", str(work), "--folds", "2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, path, problem)
    assert _snapshot(work) == before


def test_inf_label_gives_no_warning(task, tmp_path, capsys):
    path, problem = inf_label(task)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old int64 cast of Inf raised "invalid value encountered in cast"
        assert main(["prepare", "--task", str(task), "--out", str(tmp_path / "work"), "--folds", "2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, path, problem)


@pytest.mark.parametrize("argv, where, problem", [
    (["--folds", "6"], "--folds", "6 folds need at least 6 training cases, the task has 4"),
    (["--folds", "1"], "--folds", "need at least 2 folds"),
    (["--folds", "2", "--set", "plan.patch_sise=[64,64,64]"], "--set", "unknown plan field 'plan.patch_sise'"),
    (["--folds", "2", "--config", "no_such_config.yaml"], "no_such_config.yaml", "config file not found"),
])
def test_bad_options(task, tmp_path, capsys, argv, where, problem):
    assert main(["prepare", "--task", str(task), "--out", str(tmp_path / "work"), *argv]) == 2
    _assert_one_error_line(capsys.readouterr().err, where, problem)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("corrupt", [truncated, invalid_json, inf_label], ids=lambda f: f.__name__)
def test_subprocess_prints_no_traceback(task, tmp_path, corrupt):
    path, problem = corrupt(task)
    result = subprocess.run([sys.executable, "-m", "dints3d", "prepare", "--task", str(task), "--out",
                             str(tmp_path / "work"), "--folds", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    _assert_one_error_line(result.stderr, path, problem)
    assert result.stdout == "" and not (tmp_path / "work").exists()


def _no_case_read(monkeypatch):
    def fail(*_):
        raise AssertionError("a case was read before the output folder was checked")

    monkeypatch.setattr("dints3d.data.prepare.load_image", fail)


def test_output_folder_inside_a_file_is_refused_before_work(task, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _no_case_read(monkeypatch)
    for out, problem in ((blocker / "w", f"cannot create the output folder: {blocker} is a file, not a folder"),
                         (blocker / "w" / "deeper", f"{blocker} is a file, not a folder"),
                         (blocker, "exists and is not a folder")):
        assert main(["prepare", "--task", str(task), "--out", str(out), "--folds", "2"]) == 2
        _assert_one_error_line(capsys.readouterr().err, out, problem)
    assert blocker.read_text() == "x"


def test_unwritable_output_folder_is_refused_before_work(task, tmp_path, capsys, monkeypatch):
    _no_case_read(monkeypatch)
    # root may write anywhere, so a read-only file system is simulated where access(2) would report it
    monkeypatch.setattr("dints3d.data.prepare.os.access", lambda path, mode: Path(path) != tmp_path)
    out = tmp_path / "work"
    assert main(["prepare", "--task", str(task), "--out", str(out), "--folds", "2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, out, f"cannot write in {tmp_path}, where the output folder")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_refused(task, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["prepare", "--task", str(task), "--out", str(locked), "--folds", "2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, locked, "cannot write in the output folder")


def _full_disk(monkeypatch, module, function: str, hits) -> None:
    """Make ``module.function`` raise ENOSPC for the calls ``hits(*args, **kwargs)`` picks (a simulated full disk)."""
    real = getattr(module, function)

    def failing(*args, **kwargs):
        if hits(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, failing)


@pytest.mark.parametrize("stage", ["temporary datalist.json", "rename of plan.json"])
def test_failed_write_leaves_the_previous_files_and_no_temporaries(task, good_work, tmp_path, capsys, monkeypatch,
                                                                   stage):
    """The three files land as a group: a failure while writing the temporary files or while renaming them over
    the old ones leaves every old file byte for byte, and no temporary file."""
    work = Path(shutil.copytree(good_work, tmp_path / "work"))
    before = _snapshot(work)
    _edit_json(task, lambda d: d.update(name="renamed"))  # so that every new file differs from the old one
    if stage.startswith("temporary"):  # the third temporary file cannot be created
        _full_disk(monkeypatch, tempfile, "mkstemp", lambda *a, prefix="", **k: prefix == ".datalist.json.")
    else:  # fingerprint.json is already replaced when plan.json's rename fails
        _full_disk(monkeypatch, os, "replace", lambda src, dst: Path(dst).name == "plan.json")
    assert main(["prepare", "--task", str(task), "--out", str(work), "--folds", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "unchanged" in err, err
    assert _snapshot(work) == before  # no new file, no .tmp left

    monkeypatch.undo()
    assert main(["prepare", "--task", str(task), "--out", str(work), "--folds", "2"]) == 0
    assert all(json.loads((work / f).read_text()).get("name", "renamed") == "renamed" for f in before)
    assert sorted(p.name for p in work.iterdir()) == sorted(before)
