"""An exported bundle with MONAI's own tools: verify_net_in_out, ckpt_export (TorchScript = eager), inference (on a
folder and on a list of files) and evaluation in a process where ``import dints3d`` fails (masks on each input's
grid), and ``dints3d infer``'s input checks."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from support import BLOCK_DINTS3D, parse

from dints3d.bundle import runner
from dints3d.bundle.input_checks import NetworkInput, check_image, collect_inputs
from dints3d.cli import main


@pytest.fixture(scope="module")
def bundle(bundle) -> Path:
    """The module's bundle (conftest.py) with seeded random weights in models/model.pt."""
    torch.manual_seed(0)
    net = parse(bundle, "inference.yaml").get_parsed_content("network_def")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def monai_bundle(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in the bundle's folder, as the model zoo runs bundles (bundle_root ".")."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, check=False,
                          cwd=bundle)


def test_verify_net_in_out(bundle):
    done = monai_bundle(bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/inference.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verified with no error" in done.stdout + done.stderr


def test_ckpt_export_torchscript_equals_eager(bundle):
    models = bundle / "models"
    done = monai_bundle(bundle, "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file",
                        "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file",
                        "configs/inference.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    scripted = torch.jit.load(str(models / "model.ts"))
    eager = parse(bundle, "inference.yaml").get_parsed_content("network_def")
    eager.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = eager.eval()(x)
        assert expected.shape == (1, 3, 32, 32, 32)
        assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_inference_runs_without_dints3d(bundle, tmp_path):
    """`python -m monai.bundle run` in a process whose import system refuses `dints3d` (an editable install's
    finder would win over a PYTHONPATH shadow, so the refusal goes first on ``sys.meta_path``)."""
    probe = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "dints3d.cli"], capture_output=True, text=True)
    assert probe.returncode != 0 and "must not be needed" in probe.stderr
    images = bundle.parent / "task" / "imagesTs"
    done = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "monai.bundle", "run", "--config_file",
                           "configs/inference.yaml", "--dataset_dir", str(images), "--output_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, check=False, cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    inputs = sorted(images.glob("*.nii.gz"))
    assert len(inputs) == 2
    for image_path in inputs:
        image = nib.load(image_path)
        mask = nib.load(tmp_path / "out" / image_path.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == image.shape and any(s % 32 for s in image.shape)
        assert np.allclose(mask.affine, image.affine, atol=1e-4)
        assert image.affine[0, 0] < 0 and image.affine[2, 3] != 0  # LPS with an origin: not the identity grid
        values = np.unique(np.asarray(mask.dataobj))
        assert mask.get_data_dtype() == np.uint8 and set(values.tolist()) <= {0, 1, 2}


def test_inference_on_a_list_of_files(bundle, tmp_path):
    """A list of files from different folders (not a folder): `--datalist` of inference.yaml with MONAI alone, and
    `dints3d infer --input FILE FILE`; exactly those cases are segmented, each mask on its input's grid, the same
    both ways."""
    task = bundle.parent / "task"
    chosen = [sorted((task / "imagesTs").glob("*.nii.gz"))[1], sorted((task / "imagesTr").glob("*.nii.gz"))[2]]
    expected = sorted(path.name.replace(".nii.gz", "_seg.nii.gz") for path in chosen)
    done = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "monai.bundle", "run", "--config_file",
                           "configs/inference.yaml", "--datalist", repr([str(p) for p in chosen]),
                           "--output_dir", str(tmp_path / "monai")], capture_output=True, text=True, check=False,
                          cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "monai").iterdir()) == expected

    assert main(["infer", str(bundle), "--input", *map(str, chosen), "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == expected
    for image_path in chosen:
        image = nib.load(image_path)
        name = image_path.name.replace(".nii.gz", "_seg.nii.gz")
        mask, again = nib.load(tmp_path / "monai" / name), nib.load(tmp_path / "cli" / name)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
        assert np.array_equal(np.asarray(mask.dataobj), np.asarray(again.dataobj))


def test_evaluation_runs_without_dints3d(bundle):
    """evaluate.yaml on top of train.yaml: MONAI alone (not even the bundle's training handlers)."""
    done = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "monai.bundle", "run", "--config_file",
                           "['configs/train.yaml', 'configs/evaluate.yaml']", "--sw_overlap", "0.25"],
                          capture_output=True, text=True, check=False, cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (bundle / "eval" / "metrics.csv").read_text().startswith("val_mean_dice")


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = {
        "channels": _save(folder / "two_channels.nii.gz", rng.normal(size=(20, 20, 20, 2)).astype(np.float32)),
        "dims": _save(folder / "flat.nii.gz", rng.normal(size=(20, 20)).astype(np.float32)),
    }
    whole = gzip.compress(nib.Nifti1Image(rng.normal(size=(20, 20, 20)).astype(np.float32), np.eye(4)).to_bytes())
    paths["truncated"] = folder / "truncated.nii.gz"
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    paths["garbage"] = folder / "garbage.nii"
    paths["garbage"].write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("ignored: not NIfTI")
    return paths


def _with_sform(path: Path, data: np.ndarray, sform: np.ndarray) -> Path:
    """A NIfTI whose header holds ``sform`` as it is (nibabel cannot build an image from a singular affine)."""
    header = nib.Nifti1Image(data, np.eye(4)).header
    header.set_qform(None, code=0)
    for axis, row in enumerate(("srow_x", "srow_y", "srow_z")):
        header[row] = sform[axis]
    header["sform_code"] = 1
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


@pytest.fixture
def geometry_inputs(tmp_path) -> dict[str, Path]:
    """Images ``prepare`` refuses, whose headers look fine to a loader: NaN voxels, a zero spacing, a NaN origin, a
    spacing 10⁴ times too coarse (resampled to 1 mm it would need petabytes)."""
    folder = tmp_path / "geometry"
    folder.mkdir()
    data = np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32)
    with_nan = data.copy()
    with_nan[3, 4, 5] = np.nan
    zero, nan_origin = np.eye(4), np.eye(4)
    zero[0, 0] = 0.0
    nan_origin[1, 3] = np.nan
    return {"nan": _save(folder / "nan_voxel.nii.gz", with_nan),
            "zero": _with_sform(folder / "zero_spacing.nii.gz", data, zero),
            "origin": _with_sform(folder / "nan_origin.nii.gz", data, nan_origin),
            "absurd": _with_sform(folder / "absurd_spacing.nii.gz", data, np.diag([1e4, 1e4, 1e4, 1.0]))}


#: what check_image says about each of :func:`geometry_inputs` (the words of prepare's own checks)
GEOMETRY_PROBLEMS = {"nan": "image contains 1 NaN or infinite voxels", "zero": "has a zero axis",
                     "origin": "NaN or infinite values in its origin", "absurd": "GiB per channel, more than 8"}


def test_check_image_names_the_problem(bad_inputs, geometry_inputs):
    one = NetworkInput(1, target_spacing=(1.0, 1.0, 1.0))
    assert "wrong channel count: 2 channel(s)" in check_image(bad_inputs["channels"], one)
    assert check_image(bad_inputs["channels"], NetworkInput(2)) is None
    assert "wrong dimensionality" in check_image(bad_inputs["dims"], one)
    assert "truncated or corrupt" in check_image(bad_inputs["truncated"], one)
    assert "unreadable" in check_image(bad_inputs["garbage"], one)
    for key, problem in GEOMETRY_PROBLEMS.items():
        assert problem in check_image(geometry_inputs[key], one), key
    files, problems = collect_inputs([bad_inputs["dims"].parent, bad_inputs["dims"], "missing.nii.gz",
                                      "images/*.nii.gz"])
    assert len(files) == 4 and "same case name" in problems[bad_inputs["dims"]]
    assert problems[Path("missing.nii.gz")] == "file not found"
    assert problems[Path("images/*.nii.gz")] == ("file not found (a pattern no shell expanded: give the folder, or "
                                                 "unquoted file names)")


def test_infer_skips_bad_inputs_and_processes_the_rest(bundle, bad_inputs, geometry_inputs, tmp_path, capsys):
    folder = bad_inputs["dims"].parent
    good = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    (folder / good.name).write_bytes(good.read_bytes())
    for path in geometry_inputs.values():  # prepare's checks apply: an absurd spacing no longer kills the whole run
        path.rename(folder / path.name)
    bad_inputs.update({key: folder / path.name for key, path in geometry_inputs.items()})
    status = main(["infer", str(bundle), "--input", str(folder), "--out", str(tmp_path / "out"),
                   "--set", "sw_overlap=0.25"])
    err = capsys.readouterr().err
    assert status == 1
    for key, reason in (("channels", "wrong channel count"), ("dims", "wrong dimensionality"),
                        ("truncated", "truncated or corrupt"), ("garbage", "unreadable"), *GEOMETRY_PROBLEMS.items()):
        lines = [line for line in err.splitlines() if line.startswith(f"error: {bad_inputs[key]}: ") and reason in line]
        assert len(lines) == 1, err
    assert "8 input(s) not segmented" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [good.name.replace(".nii.gz", "_seg.nii.gz")]


def test_nothing_to_segment_is_one_line(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["infer", str(bundle), "--input", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {empty}: no NIfTI files (*.nii, *.nii.gz) in this "
                                                        "folder; nothing to segment")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, problem", [
    ("missing", "no trained model here: train the bundle first"),
    ("empty", "is empty (0 bytes"),
    ("truncated", "cannot be read as trained weights (truncated or corrupt?"),
])
def test_missing_truncated_or_empty_weights_are_one_line(bundle, tmp_path, capsys, damage, problem):
    weights = tmp_path / "model.pt"
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes((bundle / "models" / "model.pt").read_bytes()[:2000])
    good = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    assert main(["infer", str(bundle), "--input", str(good), "--out", str(tmp_path / "out"), "--set",
                 f"ckpt_path={weights}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {weights}: {problem}") and len(err.splitlines()) == 1, err


def test_infer_set_keys_and_types_are_checked(bundle, tmp_path, capsys):
    good = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    for setting, problem in (("sw_overlapp=0.25", "unknown setting 'sw_overlapp'; did you mean 'sw_overlap'?"),
                             ("sw_batch_size=two", "'sw_batch_size' must be an integer (it is 1), got 'two'")):
        assert main(["infer", str(bundle), "--input", str(good), "--out", str(tmp_path / "out"), "--set",
                     setting]) == 2
        assert capsys.readouterr().err.startswith(f"error: --set: {problem}")


#: ``monai.bundle run`` whose NIfTI writes of the case named argv[1] hit a full disk: an empty file, then ENOSPC
FULL_DISK = """
import errno, os, runpy, sys
import nibabel
case, real_save = sys.argv.pop(1), nibabel.save
def save(image, filename, *args, **kwargs):
    if os.path.basename(str(filename)).startswith(case):
        open(filename, "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    return real_save(image, filename, *args, **kwargs)
nibabel.save = save
sys.argv = sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def test_full_disk_leaves_no_empty_mask_and_the_other_cases_are_segmented(bundle, tmp_path, capsys, monkeypatch):
    """The disk fills while the first case's mask is written: that mask is neither left (0 bytes) nor counted, the
    case is reported, and the bundle runs again for the cases after it."""
    images = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))
    first = images[0].name.replace(".nii.gz", "")
    monkeypatch.setattr(runner, "launcher", lambda nproc: [sys.executable, "-c", FULL_DISK, first])
    out = tmp_path / "out"
    assert main(["infer", str(bundle), "--input", *map(str, images), "--out", str(out), "--set",
                 "sw_overlap=0.25"]) == 1
    captured = capsys.readouterr()
    assert f"wrote {len(images) - 1} mask(s)" in captured.out
    assert f"error: {images[0]}: the bundle run failed on this case" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [p.name.replace(".nii.gz", "_seg.nii.gz") for p in images[1:]]
    assert all(nib.load(p).shape for p in out.iterdir())  # every mask there is complete


def test_infer_device_progress_and_msd_naming(bundle, tmp_path, capsys, monkeypatch):
    """`--device cpu` hides the GPUs from the bundle run, each case is announced as its mask is written, and
    `--set output_postfix=''` gives MSD / nnU-Net names (<case>.nii.gz), counted as written."""
    cases = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[:2]
    envs = []
    real = runner.run_child
    monkeypatch.setattr(runner, "run_child", lambda cmd, env, **kw: envs.append({**env, **kw}) or real(cmd, env, **kw))
    status = main(["infer", str(bundle), "--input", *map(str, cases), "--out", str(tmp_path / "out"), "--device",
                   "cpu", "--set", "sw_overlap=0.25", "--set", "output_postfix=''"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert envs[0]["CUDA_VISIBLE_DEVICES"] == ""
    assert len(envs[0]["pass_fds"]) == 1  # the lock on OUT, held by the bundle run too
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in cases)
    progress = [line for line in out.splitlines() if line.startswith("segmented ")]
    assert progress == [f"segmented {k}/2: {case}" for k, case in enumerate(cases, 1)]
    assert "wrote 2 mask(s)" in out


def test_infer_device_cuda_without_a_gpu_is_one_line(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    good = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    assert main(["infer", str(bundle), "--input", str(good), "--out", str(tmp_path / "out"), "--device",
                 "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device: 'cuda' requested but no CUDA GPU is available (use --device "
                                       "cpu or auto)\n")
    assert not (tmp_path / "out").exists()
