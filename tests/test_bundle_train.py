"""``dints3d train`` on an exported bundle: a few iterations with MONAI's workflows write a plain-state-dict
models/model.pt and a checkpoint a second run resumes from; evaluate.yaml then scores model.pt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dints3d.bundle_commands import override_args, train
from dints3d.cli import main
from dints3d.spaces.base import load_architecture
from test_bundle_export import make_bundle

FAST = ("sw_overlap=0.25",)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("train"))


def test_train_writes_model_and_resumes(bundle, tmp_path):
    models = bundle / "models"
    assert train(bundle, sets=FAST, log=tmp_path / "first.log") == 0
    state = torch.load(models / "model.pt", weights_only=True)
    net = load_architecture(models / "arch.json").build(1, 3, channel_mul=0.25)
    net.load_state_dict(state)  # a plain state dict of the bundle's network
    first = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert first["trainer"]["iteration"] == 2 and first["best_model_saver"]["_saved"]
    assert (bundle / "logs").is_dir()

    assert train(bundle, sets=FAST + ("num_iterations=3",), log=tmp_path / "second.log") == 0
    log = (tmp_path / "second.log").read_text()
    assert "checkpoint_epoch=2.pt" in log and "Epoch: 1/3" not in log and "Epoch: 3/3" in log
    resumed = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 3 and resumed["lr_scheduler"]["last_epoch"] == 3

    configs = bundle / "configs"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str([str(configs / "train.yaml"), str(configs / "evaluate.yaml")]), "--sw_overlap", "0.25"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (bundle / "eval" / "metrics.csv").read_text().startswith("val_mean_dice")


def test_train_checks_the_work_folder(bundle, tmp_path, capsys):
    assert main(["train", str(bundle), "--work", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: no datalist.json here" in capsys.readouterr().err
    assert main(["train", str(tmp_path)]) == 2
    assert "not a bundle with configs/train.yaml" in capsys.readouterr().err


def test_override_values_are_yaml():
    args = override_args(["amp=false", "patch_size=[64,64,32]", "ckpt_path=/a/b.pt", "train#trainer#max_epochs=3"])
    assert args == ["--amp", "False", "--patch_size", "[64, 64, 32]", "--ckpt_path", "/a/b.pt",
                    "--train#trainer#max_epochs", "3"]


def test_search_config_replaces_the_architecture(tmp_path):
    bundle = make_bundle(tmp_path)
    before = (bundle / "models" / "arch.json").read_text()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(bundle / "configs" / "search.yaml"), *override_args([
                               "search_settings#search#iterations=2", "search_settings#search#val_interval=2",
                               "search_settings#data#num_samples=1"])],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    searched = load_architecture(bundle / "models" / "arch.json")
    assert searched.num_blocks == 4 and searched.provenance["iteration"] == 2  # the demo config's search space
    assert (bundle / "models" / "arch.json").read_text() != before
    assert (bundle / "search" / "checkpoints" / "last.pt").is_file()
