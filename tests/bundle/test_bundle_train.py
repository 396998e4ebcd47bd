"""``dints3d train`` on an exported bundle: a few iterations with MONAI's workflows write a plain-state-dict
models/model.pt and a checkpoint that ``--resume`` continues (refusing changed settings, and a rerun without
``--resume``); evaluate.yaml then scores model.pt. Pre-flight checks fail in one line before any work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dints3d.bundle import train as bundle_commands
from dints3d.bundle.runner import override_args
from dints3d.bundle.train import train
from dints3d.cli import main
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError

FAST = ("sw_overlap=0.25",)


def test_train_writes_model_and_resumes(bundle, tmp_path):
    models = bundle / "models"
    assert train(bundle, sets=FAST, log=tmp_path / "first.log") == 0
    state = torch.load(models / "model.pt", weights_only=True)
    net = load_architecture(models / "arch.json").build(1, 3, channel_mul=0.25)
    net.load_state_dict(state)  # a plain state dict of the bundle's network
    first = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert first["trainer"]["iteration"] == 2 and first["best_model_saver"]["_saved"]
    assert (bundle / "logs").is_dir()

    with pytest.raises(DintsError, match=r"models: already holds a training \(checkpoint_epoch=1.pt, "
                       r"checkpoint_epoch=2.pt, model.pt\); continue it with --resume, or train in a fresh bundle"):
        train(bundle, sets=FAST)
    changed = tmp_path / "changed.log"
    assert train(bundle, sets=FAST + ("learning_rate=0.02",), log=changed, resume=True) == 1
    last = changed.read_text().strip().splitlines()[-1]
    assert last == (f"error: {models / 'checkpoint_epoch=2.pt'}: was trained with other settings: learning_rate 0.01 "
                    "-> 0.02; revert them or train in a fresh bundle (only num_iterations, num_workers, cache_rate, "
                    "sw_batch_size, sw_overlap, max_nonfinite_steps, world_size may change on resume)")
    assert "Traceback" not in changed.read_text() and "Epoch:" not in changed.read_text()

    assert train(bundle, sets=FAST + ("num_iterations=3",), log=tmp_path / "second.log", resume=True) == 0
    log = (tmp_path / "second.log").read_text()
    assert "checkpoint_epoch=2.pt" in log and "Epoch: 1/3" not in log and "Epoch: 3/3" in log
    resumed = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 3 and resumed["lr_scheduler"]["last_epoch"] == 3

    # from the bundle's folder, as the model zoo runs bundles (bundle_root ".")
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           "['configs/train.yaml', 'configs/evaluate.yaml']", "--sw_overlap", "0.25"],
                          capture_output=True, text=True, check=False, cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (bundle / "eval" / "metrics.csv").read_text().startswith("val_mean_dice")


def test_train_checks_the_work_folder(bundle, tmp_path, capsys):
    assert main(["train", str(bundle), "--work", str(tmp_path)]) == 2
    assert f"error: {tmp_path}: no datalist.json here" in capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)  # away from its task: the relative dataset_dir names no folder
    assert main(["train", str(moved)]) == 2
    assert capsys.readouterr().err == (f"error: {moved / '..' / 'task'}: dataset_dir: no such folder (the bundle names "
                                       "the task relative to itself); give --work WORK, the folder written by "
                                       "`dints3d prepare`, or --set dataset_dir=TASK\n")
    assert main(["train", str(tmp_path)]) == 2
    assert "not a bundle with configs/train.yaml" in capsys.readouterr().err


def test_override_values_are_yaml():
    args = override_args(["amp=false", "patch_size=[64,64,32]", "ckpt_path=/a/b.pt", "train#trainer#max_epochs=3"])
    assert args == ["--amp", "False", "--patch_size", "[64, 64, 32]", "--ckpt_path", "/a/b.pt",
                    "--train#trainer#max_epochs", "3"]


def test_search_config_replaces_the_architecture(make_bundle, tmp_path):
    bundle = make_bundle(tmp_path)
    before = (bundle / "models" / "arch.json").read_text()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/search.yaml",
                           *override_args(["search_settings#search#iterations=2",
                                           "search_settings#search#val_interval=2",
                                           "search_settings#data#num_samples=1"])],
                          capture_output=True, text=True, check=False, cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    searched = load_architecture(bundle / "models" / "arch.json")
    assert searched.num_blocks == 4 and searched.provenance["iteration"] == 2  # the demo config's search space
    assert (bundle / "models" / "arch.json").read_text() != before
    assert (bundle / "search" / "checkpoints" / "last.pt").is_file()


@pytest.fixture
def fresh(make_bundle, tmp_path) -> Path:
    return make_bundle(tmp_path / "fresh")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_preflight_errors_are_one_line_before_any_work(fresh, tmp_path, capsys, monkeypatch):
    def fails(*args: str) -> str:
        assert main(["train", str(fresh), *args]) == 2
        return _error(capsys)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fails("--device", "cuda") == ("error: --device: 'cuda' requested but no CUDA GPU is available (use "
                                         "--device cpu or auto)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert fails("--nproc", "4").startswith("error: --nproc: 4 processes need 4 GPUs (one each), 2 visible")
    monkeypatch.undo()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert fails("--set", f"ckpt_dir={blocker / 'models'}") == (f"error: {blocker / 'models'}: cannot create the "
                                                                f"output folder: {blocker} is a file, not a folder")
    assert fails("--set", "patch_size=[40,40,40]") == ("error: patch_size: [40, 40, 40] must be 3 positive multiples "
                                                       "of 16 for this architecture (3 depths); set it with --set "
                                                       "patch_size=[..]")
    assert "no checkpoint_epoch=N.pt to resume from (start without --resume)" in fails("--resume")
    assert fails("--set", "resume_mode=newest") == "error: --set: resume_mode is set by dints3d train (use --resume)"

    usage = namedtuple("usage", "total used free")
    parameters = sum(p.numel() for p in load_architecture(fresh / "models" / "arch.json").build(
        1, 3, channel_mul=0.25).parameters())
    with monkeypatch.context() as patched:
        patched.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 0))
        assert fails().startswith(f"error: {fresh / 'models'}: needs about 0.0 GiB free for the checkpoints of a "
                                  f"{parameters / 1e6:.1f} M-parameter network, 0.0 GiB available (free space, or "
                                  "--set ckpt_dir=FOLDER on another disk)")
    with monkeypatch.context() as patched:
        patched.setattr(bundle_commands, "available_memory", lambda: 1000)
        assert fails().startswith("error: cache_rate: caching 1 of 4 cases needs about 0.0 GiB of RAM, 0.0 GiB "
                                  "available; lower it, e.g. --set cache_rate=0")

    old = fresh / "configs" / "train.yaml"
    old.write_text(old.read_text().replace("resume_mode: newest", ""))
    assert "has no resume_mode (a bundle exported by an older dints3d)" in fails()
    assert not list((fresh / "models").glob("*.pt"))  # nothing ran


def test_device_and_resume_reach_the_bundle_run(fresh, monkeypatch, capsys):
    """What `dints3d train` hands to `monai.bundle run`: the resume mode, and for --device cpu hidden GPUs."""
    runs = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: runs.append((cmd, kw.get("env"), kw)) or
                        subprocess.CompletedProcess(cmd, 0))
    assert main(["train", str(fresh), "--device", "cpu"]) == 0
    assert main(["train", str(fresh), "--resume", "auto"]) == 0
    (fresh / "models" / "checkpoint_epoch=1.pt").write_bytes(b"checked by the bundle run")
    assert main(["train", str(fresh), "--resume", "auto"]) == 0
    assert main(["train", str(fresh), "--resume"]) == 0
    work = fresh.parent / "work"
    assert main(["train", str(fresh), "--resume", "--work", str(work)]) == 0
    modes = [cmd[cmd.index("--resume_mode") + 1] for cmd, _, _ in runs]
    assert modes == ["never", "never", "same_settings", "same_settings", "same_settings"]
    # --work: the prepared folder's datalist and the task it names, instead of the bundle's own copy
    with_work = runs[-1][0]
    assert with_work[with_work.index("--datalist_file") + 1] == str(work / "datalist.json")
    assert with_work[with_work.index("--dataset_dir") + 1] == str(fresh.parent / "task")
    assert "--datalist_file" not in runs[0][0] and "--dataset_dir" not in runs[0][0]
    assert runs[0][1]["CUDA_VISIBLE_DEVICES"] == ""
    assert runs[1][1].get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert "running: CUDA_VISIBLE_DEVICES='' python -m monai.bundle run" in capsys.readouterr().out
    # the child starts through the guard that makes it die with dints3d, and inherits the lock on models/
    cmd, env, options = runs[0]
    assert cmd[1:4] == ["-m", "dints3d.utils.processes", "monai.bundle"] and env["DINTS3D_PARENT_PID"] == str(os.getpid())
    assert len(options["pass_fds"]) == 1


def test_a_bundle_exported_before_the_layout_change_is_refused_with_one_line(fresh, tmp_path, capsys):
    """Older bundles named dints3d's handlers by module path; one exported by a dints3d whose modules were elsewhere
    (``dints3d.training`` before ``dints3d.bundle.handlers``; today's bundles carry them in scripts/) is refused
    before the bundle run, not deep in MONAI's config parser, and the user is told to export again."""
    old = tmp_path / "old"
    shutil.copytree(fresh, old)
    train_yaml = old / "configs" / "train.yaml"
    text = train_yaml.read_text()
    assert "dints3d." not in text
    train_yaml.write_text(text.replace("scripts.checkpoints.RunSettings", "dints3d.training.RunSettings"))
    assert main(["train", str(old), "--work", str(fresh.parent / "work")]) == 2
    err = _error(capsys)
    assert err.startswith(f"error: {train_yaml}: names dints3d.training.") and "export it again" in err
    assert not (old / "models" / "model.pt").exists()


def test_bundle_settings_are_checked_like_config_keys(fresh, capsys):
    """`--set` ids of a bundle: unknown ones (a typo would be added and ignored by `monai.bundle run`, and a 10-minute
    default run would follow) and values of another type are refused before anything runs."""
    for setting, problem in (
            ("num_iteration=8", "unknown setting 'num_iteration'; did you mean 'num_iterations'?"),
            ("nosuchkey=3", "unknown setting 'nosuchkey'; no id of the bundle's configs is close"),
            ("num_iterations=abc", "'num_iterations' must be an integer (it is 2), got 'abc'"),
            ("num_iterations=1e3", "'num_iterations' must be an integer (it is 2), got 1000.0"),
            ("amp=1", "'amp' must be true or false (it is False), got 1"),
            ("patch_size=32", "'patch_size' must be a list such as [1, 2, 3] (it is [32, 32, 32]), got 32"),
            ("train#trainer#max_epochz=3", "unknown setting 'train#trainer#max_epochz'; did you mean "
                                           "'train#trainer#max_epochs'?"),
            ("sw_overlap=2e", "'sw_overlap' must be a finite number (it is 0.625), got '2e'")):
        assert main(["train", str(fresh), "--set", setting]) == 2
        err = _error(capsys)
        assert err.startswith(f"error: --set: {problem}"), err
    assert not list((fresh / "models").glob("*.pt"))


def test_work_of_another_task(fresh, prepared_task, monkeypatch, capsys):
    """--work of a task the network cannot take (2 channels, 4 classes for a 1-channel, 3-class bundle) is refused;
    one it can take is trained on that task's own images (dataset_dir follows WORK), not the bundle's task's."""
    other = prepared_task(folds=2, cases=4, test_cases=0, size=20, seed=5, modalities=2, classes=3)
    assert main(["train", str(fresh), "--work", str(other.work)]) == 2
    assert _error(capsys) == (f"error: {other.work}: is prepared for 2 channel(s) and 4 classes (Synthetic), but the "
                              f"bundle's network takes 1 and 3: export a bundle for this task (dints3d export --work "
                              f"{other.work})")

    same_shape = prepared_task(folds=2, cases=4, test_cases=0, size=20, seed=5)
    runs = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: runs.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert main(["train", str(fresh), "--work", str(same_shape.work)]) == 0
    cmd = runs[0]
    assert cmd[cmd.index("--datalist_file") + 1] == str(same_shape.work.absolute() / "datalist.json")
    assert cmd[cmd.index("--dataset_dir") + 1] == str(same_shape.task.resolve())


def test_task_moved_after_prepare_is_one_line_naming_the_case(fresh, capsys):
    """A task folder moved away: one line naming dataset_dir; one case missing from it: one line naming the case."""
    task = fresh.parent / "task"
    task.rename(fresh.parent / "moved")
    assert main(["train", str(fresh)]) == 2
    assert _error(capsys).startswith(f"error: {fresh / '..' / 'task'}: dataset_dir: no such folder")
    missing = sorted((fresh.parent / "moved" / "imagesTr").glob("*.nii.gz"))[0]
    missing.rename(missing.with_name("elsewhere.nii"))
    assert main(["train", str(fresh), "--set", f"dataset_dir={fresh.parent / 'moved'}"]) == 2
    err = _error(capsys)
    assert err.startswith(f"error: {missing}") and " of case 'synthetic_" in err
    assert "not found: the task folder moved; pass its location with --set dataset_dir=FOLDER or --work WORK" in err
    assert not list((fresh / "models").glob("*.pt"))
    missing.with_name("elsewhere.nii").rename(missing)
    original = missing.read_bytes()  # an image swapped for a 2-channel one after prepare: named before any training
    image = nib.load(missing)
    nib.save(nib.Nifti1Image(np.stack([np.asanyarray(image.dataobj)] * 2, axis=-1), image.affine), missing)
    assert main(["train", str(fresh), "--set", f"dataset_dir={fresh.parent / 'moved'}"]) == 2
    assert _error(capsys).startswith(f"error: {missing}: has 2 channel(s)")
    missing.write_bytes(original)
    runs = []
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(subprocess, "run", lambda cmd, **kw: runs.append(cmd) or subprocess.CompletedProcess(cmd, 0))
        assert main(["train", str(fresh), "--set", f"dataset_dir={fresh.parent / 'moved'}"]) == 0
    assert runs[0][runs[0].index("--dataset_dir") + 1] == str(fresh.parent / "moved")
