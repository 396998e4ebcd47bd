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

from dints3d.bundle.input_checks import check_image, collect_inputs
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


def test_check_image_names_the_problem(bad_inputs):
    assert "wrong channel count: 2 channel(s)" in check_image(bad_inputs["channels"], 1)
    assert check_image(bad_inputs["channels"], 2) is None
    assert "wrong dimensionality" in check_image(bad_inputs["dims"], 1)
    assert "truncated or corrupt" in check_image(bad_inputs["truncated"], 1)
    assert "unreadable" in check_image(bad_inputs["garbage"], 1)
    files, problems = collect_inputs([bad_inputs["dims"].parent, bad_inputs["dims"], "missing.nii.gz"])
    assert len(files) == 4 and "same case name" in problems[bad_inputs["dims"]]
    assert problems[Path("missing.nii.gz")] == "file not found"


def test_infer_skips_bad_inputs_and_processes_the_rest(bundle, bad_inputs, tmp_path, capsys):
    folder = bad_inputs["dims"].parent
    good = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    (folder / good.name).write_bytes(good.read_bytes())
    status = main(["infer", str(bundle), "--input", str(folder), "--out", str(tmp_path / "out"),
                   "--set", "sw_overlap=0.25"])
    err = capsys.readouterr().err
    assert status == 1
    for key, reason in (("channels", "wrong channel count"), ("dims", "wrong dimensionality"),
                        ("truncated", "truncated or corrupt"), ("garbage", "unreadable")):
        lines = [line for line in err.splitlines() if line.startswith(f"error: {bad_inputs[key]}: ") and reason in line]
        assert len(lines) == 1, err
    assert "4 input(s) not segmented" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [good.name.replace(".nii.gz", "_seg.nii.gz")]
