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
import yaml
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

#: MONAI's current metadata schema, meta_schema_20240725.json (MONAI-extra-test-data release 0.8.1): its "required"
#: list, and the "required" list of a tensor in network_data_format
SCHEMA = "meta_schema_20240725.json"
SCHEMA_REQUIRED = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                   "required_packages_version", "task", "description", "authors", "copyright", "network_data_format")
SCHEMA_TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
#: what the model zoo's bundles give besides (their CONTRIBUTING.md and metadata.json files)
ZOO_META = ("changelog", "name", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
            "eval_metrics", "intended_use", "references")
TENSOR_FORMAT = (*SCHEMA_TENSOR_REQUIRED, "modality", "is_patch_data", "channel_def")
INFERENCE_IDS = ("bundle_root", "device", "network_def", "inferer", "output_dir", "checkpointloader", "load_pretrain")
TRAIN_IDS = ("bundle_root", "device", "dataset_dir", "train#trainer", "train#trainer#max_epochs", "train#dataset",
             "train#handlers", "validate#evaluator", "validate#handlers", "validate#dataset", "val_interval",
             "train#preprocessing", "validate#preprocessing")


def test_metadata_has_every_field_the_schema_requires(bundle):
    meta = read_json(bundle / "configs" / "metadata.json")
    assert meta["schema"].endswith("/" + SCHEMA)
    assert [key for key in SCHEMA_REQUIRED if key not in meta] == []
    assert [key for key in ZOO_META if key not in meta] == []
    assert meta["data_type"] == "nibabel" and meta["eval_metrics"] == {}  # filled by training
    # the architecture's source by its run folder's name, not its path
    assert meta["changelog"] == {meta["version"]: f"exported by dints3d 0.1.0 from {bundle.parent.name}/arch.json"}
    # what training, evaluation and inference import; not dints3d, which only configs/search.yaml needs
    assert set(meta["required_packages_version"]) >= {"nibabel", "pytorch-ignite", "fire", "pyyaml"}
    assert "dints3d" not in meta["required_packages_version"]
    assert not [key for key in meta if key.endswith("packages_version") and key != "required_packages_version"]
    assert "need MONAI and this bundle's own scripts/ only" in meta["description"]
    assert any("DiNTS" in r for r in meta["references"]) and any("nnU-Net" in r for r in meta["references"])
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert all(key in image and key in pred for key in TENSOR_FORMAT)
    assert all(isinstance(v, (int, float)) for v in image["value_range"] + pred["value_range"])
    assert (image["num_channels"], image["spatial_shape"], image["modality"]) == (1, [32, 32, 32], "CT")
    assert image["is_patch_data"] is True and len(image["value_range"]) == 2
    assert pred["num_channels"] == 3 and pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}


def test_configs_parse_and_carry_the_plan(bundle):
    """Every config parses; the data are named relative to the bundle (bundle_root "."), which with the bundle's
    path as bundle_root resolves to the task and WORK folders export was given."""
    plan = read_json(bundle.parent / "work" / "plan.json")
    written = {name: yaml.safe_load((bundle / "configs" / name).read_text())
               for name in ("inference.yaml", "train.yaml", "search.yaml")}
    assert {name: config["bundle_root"] for name, config in written.items()} == dict.fromkeys(written, ".")
    assert written["inference.yaml"]["dataset_dir"] == "$@bundle_root + '/../task/imagesTs'"
    assert written["train.yaml"]["dataset_dir"] == "$@bundle_root + '/../task'"
    assert written["search.yaml"]["work_dir"] == "$@bundle_root + '/../work'"
    inference = parse(bundle, "inference.yaml")  # bundle_root: the bundle's path, as --bundle_root gives it
    assert all(i in inference for i in INFERENCE_IDS)
    assert inference["target_spacing"] == plan["target_spacing"]
    assert (inference["in_channels"], inference["out_channels"], inference["channel_mul"]) == (1, 3, 0.25)
    train = parse(bundle, "train.yaml")
    assert all(i in train for i in TRAIN_IDS)
    # the learning rate is the default recipe's (nnunet: 0.01) when the config sets none; dints3d's
    # train.val_interval (iterations between validations) is the epoch length, validation every epoch
    assert (train["num_iterations"], train["epoch_length"], train["val_interval"]) == (2, 1, 1)
    assert train["learning_rate"] == 0.01 and train["lr_decay_points"] == [0.2, 0.4, 0.6, 0.8]
    assert Path(train.get_parsed_content("dataset_dir")).resolve() == Path(plan["task_dir"])
    assert train.get_parsed_content("datalist_file") == f"{bundle}/configs/datalist.json"
    datalist = read_json(bundle / "configs" / "datalist.json")
    work_list = read_json(bundle.parent / "work" / "datalist.json")
    assert "task_dir" not in datalist and datalist["fold1_validation"] == work_list["fold1_validation"]
    assert not [key for key in datalist if key.endswith(("_weights", "_arch"))]  # the search's halves stay in WORK
    for overlay in ("evaluate.yaml", "multi_gpu_train.yaml"):
        merged = parse(bundle, "train.yaml", overlay)
        assert "validate#evaluator" in merged and merged["num_iterations"] == 2
    search = parse(bundle, "search.yaml")
    assert search["search_settings"]["dints"]["num_depths"] == 3
    assert Path(search.get_parsed_content("work_dir")).resolve() == bundle.parent / "work"
    # configs/inference.json is inference.yaml in JSON (what monai.bundle.load(workflow_type="inference") reads)
    assert read_json(bundle / "configs" / "inference.json") == yaml.safe_load(
        (bundle / "configs" / "inference.yaml").read_text())


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
    assert "python -m monai.bundle run --config_file configs/train.yaml" in readme and "Trust" in readme
    sections = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert {"Performance", "System requirements", "References"} <= set(sections)
    requirements = readme.split("## System requirements")[1].split("##")[0]
    assert re.search(r"GPU memory for training: about \d+ MiB", requirements)  # dints3d's memory model
    assert "0.58 M parameters" in requirements and "4 cases" in requirements
    assert "Not trained yet" in readme.split("## Performance")[1]
    assert (bundle / "docs" / "arch.png").read_bytes()[:4] == b"\x89PNG"
    assert "Apache License" in (bundle / "LICENSE").read_text()
    assert "Its dataset.json states the licence: CC0." in (bundle / "docs" / "data_license.txt").read_text()
    files = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [(f["path"], f["url"], f["hash_type"]) for f in files] == [("models/model.pt", "", "md5"),
                                                                       ("models/model.ts", "", "md5")]


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


def test_export_uses_the_plan_patch_unless_told_and_says_so(bundle, tmp_path, capsys):
    """The reference config (dints_search) sets no patch: the plan's is exported silently; a setting that differs
    from the plan wins and is said in one line."""
    arch, work = str(bundle / "models" / "arch.json"), bundle.parent / "work"
    args = ["export", "--arch", arch, "--work", str(work), "--config", "dints_search"]

    def exported(name: str, *sets: str) -> tuple[list[int], list[str]]:
        assert main([*args, "--out", str(tmp_path / name), *[a for s in sets for a in ("--set", s)]]) == 0
        meta = read_json(tmp_path / name / "configs" / "metadata.json")
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
        return meta["network_data_format"]["inputs"]["image"]["spatial_shape"], notes

    planned = read_json(work / "plan.json")["patch_size"]
    assert exported("plan") == (planned, [])
    patch, notes = exported("override", "data.patch_size=[48,48,48]")
    assert patch == [48, 48, 48] and notes == [f"note: patch [48, 48, 48] from data.patch_size, not the plan's "
                                               f"{planned} (plan.json: what `dints3d prepare` chose for the task)"]


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
