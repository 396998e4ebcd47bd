"""An exported bundle travels: copied to another folder with the original deleted, it trains, evaluates and infers
there with ``python -m monai.bundle run`` from its own folder (no ``--bundle_root``) in processes that cannot import
dints3d; training writes its result back (metadata, TorchScript, hashes, README); no file of the copy names an
absolute path; and its configs follow the model zoo's conventions (MONAI's workflow properties, load_pretrain +
checkpointloader, inference.json, the TensorRT and multi-GPU evaluation overlays)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow
from support import BLOCK_DINTS3D, parse

import dints3d
from dints3d.bundle.template import template_dir, template_module
from dints3d.data.losses import DeepSupervised, dice_ce_loss
from dints3d.utils.io import read_json

FAST = ("--sw_overlap", "0.25")
#: settings for a GPU machine that a CPU run must take without a warning (AMP is CUDA-only; at most one data-loading
#: worker per available core), and the warnings PyTorch and MONAI would give otherwise
QUIET_ON_CPU = ("--amp", "True", "--num_workers", "64")
CPU_WARNINGS = ("CUDA is not available", "GradScaler", "worker processes in total")


@pytest.fixture(scope="module")
def travelled(make_bundle, tmp_path_factory) -> dict[str, Path]:
    """A bundle exported next to its task, copied into another folder, the original deleted."""
    root = tmp_path_factory.mktemp("origin")
    original = make_bundle(root)
    copy = tmp_path_factory.mktemp("elsewhere") / "travelled_bundle"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    blocker = tmp_path_factory.mktemp("no_dints3d")
    (blocker / "dints3d").mkdir()
    (blocker / "dints3d" / "__init__.py").write_text("raise ImportError('dints3d must not be needed')\n")
    return {"copy": copy, "original": original, "task": root / "task", "blocker": blocker}


#: the import hook of support.BLOCK_DINTS3D alone, to put before a snippet of code
REFUSE_DINTS3D = BLOCK_DINTS3D.split("sys.argv =")[0]


def without_dints3d(travelled: dict[str, Path], *args: str, module: str = "monai.bundle",
                    code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (or ``python -c CODE``) in the copy's folder, in a process that cannot import
    dints3d: a PYTHONPATH holding a ``dints3d`` that raises ImportError (inherited by torchrun's workers) and, in the
    process itself, an import hook refusing it (support.BLOCK_DINTS3D)."""
    env = {**os.environ, "PYTHONPATH": str(travelled["blocker"])}
    command = ["-c", REFUSE_DINTS3D + code] if code is not None else ["-c", BLOCK_DINTS3D, module, *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False,
                          cwd=travelled["copy"], env=env)


@pytest.fixture(scope="module")
def trained(travelled) -> dict[str, Path]:
    for probe in (without_dints3d(travelled, code="import dints3d"),
                  subprocess.run([sys.executable, "-c", "import dints3d"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(travelled["blocker"])}, cwd=travelled["copy"])):
        assert probe.returncode != 0 and "must not be needed" in probe.stderr
    # amp and many data-loading workers, as on a GPU machine: on this CPU they must not even warn
    done = without_dints3d(travelled, "run", "--config_file", "configs/train.yaml", "--dataset_dir",
                           str(travelled["task"]), *FAST, *QUIET_ON_CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if any(w in line for w in CPU_WARNINGS)] == []
    return travelled


def test_training_in_the_copy_records_its_result(trained):
    copy = trained["copy"]
    meta = read_json(copy / "configs" / "metadata.json")
    best = meta["eval_metrics"]["mean_dice"]
    assert meta["version"] == "0.1.1" and list(meta["changelog"])[:2] == ["0.1.1", "0.1.0"]
    assert meta["changelog"]["0.1.1"] == (f"retrained with configs/train.yaml: 2 iterations on fold 0, best validation "
                                          f"mean Dice {best:.4f}")
    assert 0 <= best <= 1
    files = {f["path"]: f["hash_val"] for f in yaml.safe_load((copy / "large_files.yml").read_text())["large_files"]}
    for name in ("models/model.pt", "models/model.ts"):
        assert files[name] == hashlib.md5((copy / name).read_bytes()).hexdigest()
    assert f"**{best:.4f}**, fold 0, after 2 training iterations" in (copy / "docs" / "README.md").read_text()


def test_the_exported_torchscript_equals_the_eager_network(trained):
    copy = trained["copy"]
    scripted = torch.jit.load(str(copy / "models" / "model.ts"))
    eager = parse(copy, "inference.yaml").get_parsed_content("network_def")
    eager.load_state_dict(torch.load(copy / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-5)
    with zipfile.ZipFile(copy / "models" / "model.ts") as archive:
        extra = {name.rsplit("/", 1)[-1]: archive.read(name) for name in archive.namelist() if "/extra/" in name}
    assert json.loads(extra["metadata.json"])["version"] == "0.1.1" and "inference.json" in extra


def test_evaluation_in_the_copy_scores_the_recorded_model(trained):
    done = without_dints3d(trained, "run", "--config_file", "['configs/train.yaml', 'configs/evaluate.yaml']",
                           "--dataset_dir", str(trained["task"]), *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    name, value = (trained["copy"] / "eval" / "metrics.csv").read_text().strip().split(",")
    best = read_json(trained["copy"] / "configs" / "metadata.json")["eval_metrics"]["mean_dice"]
    assert name == "val_mean_dice" and float(value) == pytest.approx(best, abs=1e-4)


def test_evaluation_on_two_processes_gives_the_same_dice(trained, tmp_path):
    configs = "['configs/train.yaml', 'configs/evaluate.yaml', 'configs/multi_gpu_evaluate.yaml']"
    done = without_dints3d(trained, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "--config_file",
                           configs, "--dataset_dir", str(trained["task"]), "--output_dir", str(tmp_path), *FAST,
                           module="torch.distributed.run")
    assert done.returncode == 0, done.stderr[-3000:]
    best = read_json(trained["copy"] / "configs" / "metadata.json")["eval_metrics"]["mean_dice"]
    assert float((tmp_path / "metrics.csv").read_text().strip().split(",")[1]) == pytest.approx(best, abs=1e-4)
    assert len((tmp_path / "val_mean_dice_raw.csv").read_text().strip().splitlines()) == 3  # both cases, once


def test_inference_in_the_copy_offers_both_mask_names(trained, tmp_path):
    images = trained["task"] / "imagesTs"
    for postfix, out in (([], tmp_path / "seg"), (["--output_postfix", "''"], tmp_path / "plain")):
        done = without_dints3d(trained, "run", "--config_file", "configs/inference.yaml", "--dataset_dir",
                               str(images), "--output_dir", str(out), *postfix, *FAST, *QUIET_ON_CPU)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [line for line in done.stderr.splitlines() if any(w in line for w in CPU_WARNINGS)] == []
    cases = sorted(p.name for p in images.glob("*.nii.gz"))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == cases  # <case>.nii.gz: MSD / nnU-Net naming
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == [c.replace(".nii.gz", "_seg.nii.gz") for c in cases]
    for case in cases:
        plain, seg = nib.load(tmp_path / "plain" / case), nib.load(tmp_path / "seg" / case.replace(".nii", "_seg.nii"))
        assert (plain.get_fdata() == seg.get_fdata()).all() and plain.shape == nib.load(images / case).shape


def test_monai_bundle_load_finds_the_inference_workflow(trained):
    """monai.bundle.load(workflow_type="inference") builds network_def from configs/inference.json (not a bare
    state dict) and loads models/model.pt into it."""
    copy = trained["copy"]
    code = (f"import monai, torch; net = monai.bundle.load({copy.name!r}, bundle_dir={str(copy.parent)!r}, "
            "workflow_type='inference', device='cpu'); print(type(net).__name__); "
            "torch.save(net.state_dict(), 'loaded.pt')")
    done = without_dints3d(trained, code=code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "DiNTSStemSkip"  # scripts/networks.py, from the copy
    loaded, saved = torch.load(copy / "loaded.pt", weights_only=True), torch.load(copy / "models" / "model.pt",
                                                                                 weights_only=True)
    (copy / "loaded.pt").unlink()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def _absolute_paths(travelled: dict[str, Path], tmp_path_factory) -> list[str]:
    """What no file of the copy may name: the original and the copy's folders, the test's temporary root, this
    repository and this Python environment."""
    return sorted({str(travelled["original"]), str(travelled["original"].parent), str(travelled["copy"]),
                   str(tmp_path_factory.getbasetemp()), str(Path(dints3d.__file__).parents[1]), sys.prefix})


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of a file, or of each entry of a zip archive (TorchScript, torch checkpoints)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [(f"{path}:{name}", archive.read(name)) for name in archive.namelist()]
    return [(str(path), path.read_bytes())]


def test_no_file_of_the_copy_names_an_absolute_path(trained, tmp_path_factory):
    """Every file of the trained copy, configs to model.ts's entries; not eval/ and logs/, the runs' records of the
    data they read (which --dataset_dir named)."""
    copy = trained["copy"]
    forbidden = [p.encode() for p in _absolute_paths(trained, tmp_path_factory)]
    files = [p for p in copy.rglob("*") if p.is_file() and p.relative_to(copy).parts[0] not in ("eval", "logs")]
    names = {str(p.relative_to(copy)) for p in files}
    assert {"configs/datalist.json", "configs/inference.json", "models/model.ts", "models/model.pt",
            "scripts/results.py", "large_files.yml", "docs/README.md", "docs/data_license.txt"} <= names
    hits = [(name, bad.decode()) for path in files for name, data in _contents(path) for bad in forbidden
            if bad in data]
    assert hits == []
    assert _contents(Path(dints3d.__file__))[0][1]  # the reader reads (a vacuous pass would look the same)


def test_the_workflows_have_every_property_monai_checks(travelled):
    """ConfigWorkflow.check_properties(): no missing or wrongly referenced property for training (train.yaml),
    evaluation (train.yaml + evaluate.yaml, an inference-type workflow, as the model zoo's evaluate configs) and
    inference."""
    copy, task = travelled["copy"], travelled["task"]
    for files, kind, data in ((["train.yaml"], "train", task), (["train.yaml", "evaluate.yaml"], "infer", task),
                              (["inference.yaml"], "inference", task / "imagesTs")):
        workflow = ConfigWorkflow(config_file=[str(copy / "configs" / f) for f in files], workflow_type=kind,
                                  logging_file=False, bundle_root=str(copy), dataset_dir=str(data),
                                  load_pretrain=False, resume_mode="newest")
        workflow.initialize()
        assert workflow.check_properties() == [], files
    train = ConfigParser.load_config_file(copy / "configs" / "train.yaml")
    validation = [h for h in train["train"]["handlers"] if h["_target_"] == "ValidationHandler"]
    assert [h["interval"] for h in validation] == ["@val_interval"]  # epochs between validations, as in the zoo


@pytest.mark.parametrize("configs", [["inference.yaml", "inference_trt.yaml"],
                                     ["train.yaml", "evaluate.yaml", "multi_gpu_evaluate.yaml"],
                                     ["inference.yaml", "multi_gpu_inference.yaml"],
                                     ["train.yaml", "multi_gpu_train.yaml"]])
def test_overlays_parse_and_reference_existing_ids(travelled, configs):
    """The overlays that cannot all run here (TensorRT needs an NVIDIA GPU) parse on top of their base, and every
    id they reference exists."""
    parser = ConfigParser()
    parser.read_config([str(travelled["copy"] / "configs" / name) for name in configs])
    parser.parse()
    overlay = (travelled["copy"] / "configs" / configs[-1]).read_text()
    references = set(re.findall(r"@([A-Za-z_][\w#]*)", overlay))
    assert references and [ref for ref in sorted(references) if ref not in parser] == []
    if configs[-1] == "inference_trt.yaml":
        assert parser["load_pretrain"] is False and parser["use_amp"] is False
        assert parser["network_def"] == "$torch.jit.load(@bundle_root + '/models/model_trt.ts')"


def test_the_bundle_loss_is_dints3ds():
    """scripts/losses.py (what bundles train with) computes dints3d's DeepSupervised loss, for one output and for
    deep-supervision heads as a list and stacked."""
    ours = template_module("dints_msd", "losses").DeepSupervised(dice_ce_loss())
    reference = DeepSupervised(dice_ce_loss())
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=generator)
    heads = [torch.randn(2, 3, 16 // 2**i, 16 // 2**i, 16 // 2**i, generator=generator) for i in range(3)]
    stacked = torch.randn(2, 3, 3, 16, 16, 16, generator=generator)
    for output in (heads[0], heads, stacked):
        assert torch.equal(ours(output, label), reference(output, label))
    assert (template_dir("dints_msd") / "scripts" / "losses.py").is_file()
