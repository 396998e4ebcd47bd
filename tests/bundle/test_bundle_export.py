"""``dints3d export``: a tiny decoded architecture + a tiny synthetic task → a MONAI bundle whose configs parse,
carry the plan's values and preprocess exactly like dints3d. Every bundle test builds its bundle with ``make_bundle``
(tests/bundle/conftest.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from support import parse, tiny_arch

from dints3d.bundle.export import TEMPLATE, export_bundle
from dints3d.bundle.template import template_dir
from dints3d.cityscapes.bundle import TEMPLATE as CITYSCAPES_TEMPLATE
from dints3d.cli import main
from dints3d.config import config_path, load_config
from dints3d.data.transforms import inference_transforms
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

MANDATORY_META = ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
                  "description", "authors", "copyright", "network_data_format")
TENSOR_FORMAT = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                 "is_patch_data", "channel_def")
INFERENCE_IDS = ("bundle_root", "device", "network_def", "inferer", "output_dir")
TRAIN_IDS = ("bundle_root", "device", "dataset_dir", "train#trainer", "train#trainer#max_epochs", "train#dataset",
             "train#handlers", "validate#evaluator", "validate#handlers", "validate#dataset", "val_interval")


def test_metadata_has_every_mandatory_key(bundle):
    meta = read_json(bundle / "configs" / "metadata.json")
    assert all(key in meta for key in MANDATORY_META)
    assert set(meta["required_packages_version"]) >= {"nibabel", "pytorch-ignite", "fire", "dints3d"}
    # only MONAI's standard key: dints3d is listed (train.yaml and search.yaml need it) and the description says
    # inference does not (test_bundle_inference.py::test_inference_runs_without_dints3d shows it)
    assert not [key for key in meta if key.endswith("packages_version") and key != "required_packages_version"]
    assert "Inference and evaluation need MONAI only" in meta["description"]
    assert "dints3d is needed solely for training" in meta["description"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert all(key in image and key in pred for key in TENSOR_FORMAT)
    assert (image["num_channels"], image["spatial_shape"], image["modality"]) == (1, [32, 32, 32], "CT")
    assert image["is_patch_data"] is True and len(image["value_range"]) == 2
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}


def test_configs_parse_and_carry_the_plan(bundle):
    plan = read_json(bundle.parent / "work" / "plan.json")
    inference = parse(bundle, "inference.yaml")
    assert all(i in inference for i in INFERENCE_IDS)
    assert inference["bundle_root"] == str(bundle)
    assert inference["target_spacing"] == plan["target_spacing"]
    assert (inference["in_channels"], inference["out_channels"], inference["channel_mul"]) == (1, 3, 0.25)
    train = parse(bundle, "train.yaml")
    assert all(i in train for i in TRAIN_IDS)
    # the learning rate is the default recipe's (nnunet: 0.01) when the config sets none
    assert (train["num_iterations"], train["val_interval"], train["learning_rate"]) == (2, 1, 0.01)
    assert train["lr_decay_points"] == [0.2, 0.4, 0.6, 0.8] and train["dataset_dir"] == plan["task_dir"]
    assert train["work_dir"] == str(bundle.parent / "work")
    for overlay in ("evaluate.yaml", "multi_gpu_train.yaml"):
        merged = parse(bundle, "train.yaml", overlay)
        assert "validate#evaluator" in merged and merged["num_iterations"] == 2
    search = parse(bundle, "search.yaml")
    assert search["search_settings"]["dints"]["num_depths"] == 3 and search["work_dir"] == train["work_dir"]


def test_network_is_the_architecture(bundle):
    """The config's TopologyInstance + DiNTS (built from models/arch.json by `$` expressions) equals
    DintsArchitecture.build: same parameters, same output for the same weights."""
    arch = load_architecture(bundle / "models" / "arch.json")
    assert arch.to_dict() == tiny_arch().to_dict()
    net = parse(bundle, "inference.yaml").get_parsed_content("network_def").eval()
    reference = arch.build(1, 3, channel_mul=0.25).eval()
    reference.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def test_bundle_preprocessing_equals_dints3d(bundle):
    """The bundle's MONAI-native chain (orientation, spacing, normalization) gives dints3d's tensors."""
    plan = read_json(bundle.parent / "work" / "plan.json")
    image = sorted((bundle.parent / "task" / "imagesTs").glob("*.nii.gz"))[0]
    ours = parse(bundle, "inference.yaml").get_parsed_content("preprocessing")({"image": str(image)})["image"]
    theirs = inference_transforms(plan)({"image": str(image)})["image"]
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs)
    assert np.allclose(ours.affine, theirs.affine)


def test_docs_license_and_picture(bundle):
    readme = (bundle / "docs" / "README.md").read_text()
    assert "{{" not in readme and "![searched topology](arch.png)" in readme
    assert f"--config_file {bundle}/configs/train.yaml" in readme and "Trust" in readme
    assert (bundle / "docs" / "arch.png").read_bytes()[:4] == b"\x89PNG"
    assert "Apache License" in (bundle / "LICENSE").read_text()


def test_refuses_a_non_empty_folder_unless_forced(bundle, tiny, tmp_path):
    work = bundle.parent / "work"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DintsError, match="not empty"):
        export_bundle(bundle / "models" / "arch.json", work, tmp_path / "out")
    cfg = load_config(config_path("demo"), tiny.bundle)
    export_bundle(bundle / "models" / "arch.json", work, tmp_path / "out", cfg, force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "configs" / "metadata.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_an_exported_bundle_follows_the_umask(bundle, tiny, tmp_path):
    """Assembled in a temporary folder (mkdtemp: 0700), the bundle still gets the permissions every other output
    gets from the umask."""
    import stat

    old = os.umask(0o022)
    try:
        out = export_bundle(bundle / "models" / "arch.json", bundle.parent / "work", tmp_path / "shared",
                            load_config(config_path("demo"), tiny.bundle))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")} == {0o755, 0o644}


def test_cli_export_and_bad_patch(bundle, tmp_path, capsys):
    arch, work = str(bundle / "models" / "arch.json"), str(bundle.parent / "work")
    args = ["export", "--arch", arch, "--work", work, "--config", "demo"]
    assert main(args + ["--out", str(tmp_path / "b1")]) == 0
    meta = json.loads((tmp_path / "b1" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    assert main(args + ["--out", str(tmp_path / "b2"), "--set", "data.patch_size=[40,40,40]"]) == 2
    assert "error: data.patch_size: [40, 40, 40] must be 3 positive multiples of 16" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def fence_problems(text: str) -> list[str]:
    """Malformed Markdown code fences: a fence after text on a line, an opening fence with more than a language
    name, text after a closing fence (which CommonMark reads as text inside the block, so every later block is
    inverted), or a block still open at the end."""
    problems, opened = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if "```" not in line:
            continue
        fence = line.strip()
        if not fence.startswith("```") or fence.count("```") > 1:
            problems.append(f"line {number}: fence after text: {line!r}")
        elif opened is None:
            opened = number
            if not re.fullmatch(r"```[\w+-]*", fence):
                problems.append(f"line {number}: opening fence with more than a language: {line!r}")
        else:
            opened = None
            if fence != "```":
                problems.append(f"line {number}: text after a closing fence: {line!r}")
    if opened is not None:
        problems.append(f"line {opened}: code block never closed")
    return problems


@pytest.fixture(scope="module")
def cityscapes_bundle(prepared_cityscapes, tmp_path_factory) -> Path:
    work = prepared_cityscapes(config="autodeeplab_demo", cases=8, test_cases=0, size=64, seed=0).work
    bundle = tmp_path_factory.mktemp("cityscapes") / "bundle"
    assert main(["export", "--config", "autodeeplab_demo", "--arch", "autodeeplab-s", "--work", str(work),
                 "--out", str(bundle), "--set", "train.patch_size=[32,32]"]) == 0
    return bundle


def test_every_readme_has_well_formed_code_fences(bundle, cityscapes_bundle):
    assert fence_problems("```\npython -m x\n``` With dints3d installed\n```\ny\n```\n")  # the checker bites
    assert fence_problems("text ```\n") and fence_problems("```\nopen\n") and not fence_problems("```yaml\na\n```\n")
    readmes = [root / folder / "README.md" for root in (bundle, cityscapes_bundle, template_dir(TEMPLATE),
                                                        template_dir(CITYSCAPES_TEMPLATE)) for folder in ("docs", "models")]
    for readme in readmes:
        text = readme.read_text()
        assert text.count("```") >= 2 or readme.parent.name == "models"
        assert fence_problems(text) == [], readme
