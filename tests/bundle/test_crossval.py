"""Baselines through the whole flow, and cross-validation: ``dints3d export --arch segresnet|dynunet`` bundles train
with dints3d and infer with MONAI alone; ``dints3d train BUNDLE --folds all`` writes one model per fold, out-of-fold
predictions of every training case exactly once and ``cv/cv_metrics.csv``; a run killed in fold k resumes at fold k."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
from support import BLOCK_DINTS3D

from dints3d.bundle import runner
from dints3d.bundle.crossval import cross_validate, held_folds, predict_training_cases
from dints3d.cli import main
from dints3d.data.datalist import read_datalist

TINY = ["train.iterations=2", "train.val_interval=1", "train.batch_size=1", "train.channel_mul=0.25",
        "data.num_samples=1", "data.patch_size=[32,32,32]"]
FAST = ("sw_overlap=0.25",)



@pytest.fixture(scope="module")
def work(prepared_task) -> Path:
    return prepared_task(folds=2, cases=4, test_cases=1, size=28, seed=2).work


def export(work: Path, arch: str, out: Path, *extra: str) -> Path:
    args = ["export", "--arch", arch, "--work", str(work), "--out", str(out), "--config", "demo"]
    for setting in (*TINY, *extra):
        args += ["--set", setting]
    assert main(args) == 0
    return out


@pytest.mark.parametrize("arch", ["segresnet", "dynunet"])
def test_baselines_export_train_and_infer_with_monai_alone(work, arch, tmp_path, capsys):
    bundle = export(work, arch, tmp_path / "bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["name"].startswith({"segresnet": "SegResNet", "dynunet": "DynUNet"}[arch])
    assert json.loads((bundle / "models" / "arch.json").read_text())["space"] == arch
    assert main(["train", str(bundle), "--set", *FAST]) == 0
    images = Path(json.loads((work / "plan.json").read_text())["task_dir"]) / "imagesTs"
    done = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "monai.bundle", "run", "--config_file",
                           "configs/inference.yaml", "--dataset_dir", str(images), "--output_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, check=False, cwd=bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    (image,) = sorted(images.glob("*.nii.gz"))
    mask = nib.load(tmp_path / "out" / image.name.replace(".nii.gz", "_seg.nii.gz"))
    assert mask.shape == nib.load(image).shape
    assert main(["describe", arch, "--work", str(work)]) == 0
    assert "predicted training peak" in capsys.readouterr().out


def test_folds_all_writes_models_out_of_fold_predictions_and_metrics(work, tmp_path, capsys):
    bundle = export(work, "segresnet", tmp_path / "bundle")
    assert main(["train", str(bundle), "--folds", "all", "--set", *FAST]) == 0
    out = capsys.readouterr().out
    assert "cross-validation: 4 out-of-fold cases, folds [0, 1]" in out
    assert sorted(held_folds(bundle)["folds"]) == ["0", "1"]
    for k in (0, 1):
        assert (bundle / "models" / f"fold{k}" / "model.pt").is_file()
    validation = {k: {Path(item["image"]).name.replace(".nii.gz", "") for item in
                      read_datalist(work, f"fold{k}_validation")} for k in (0, 1)}
    assert validation[0].isdisjoint(validation[1]) and len(validation[0] | validation[1]) == 4
    predicted = {p.name.replace("_seg.nii.gz", "") for p in (bundle / "cv" / "predictions").iterdir()}
    assert predicted == validation[0] | validation[1]  # every training case, each by its own fold's model
    with open(bundle / "cv" / "cv_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 and {r["class_name"] for r in rows} == {"organ", "lesion"}
    assert all(r["case"] in validation[int(r["fold"])] for r in rows)
    summary = json.loads((bundle / "cv" / "summary.json").read_text())
    assert summary["folds"] == [0, 1] and set(summary["per_fold"]) == {"0", "1"}
    means = [f["mean_foreground_dice"] for f in summary["per_fold"].values()]
    assert summary["fold_mean_dice"]["mean"] == pytest.approx(sum(means) / 2)

    # the fit diagnostic: fold 0's model segments fold 0's own training cases (none of its validation cases)
    fit = predict_training_cases(bundle, 0, sets=FAST)
    assert f"predicting 2 training case(s) with {bundle / 'models' / 'fold0' / 'model.pt'}" in capsys.readouterr().out
    training = {Path(item["image"]).name.replace(".nii.gz", "") for item in read_datalist(work, "fold0_train")}
    assert set(fit) == training == validation[1]
    for case, path in fit.items():
        assert path.parent == bundle / "cv" / "fit" / "fold0" and path.name == f"{case}_seg.nii.gz"
        image = next(item["image"] for item in read_datalist(work, "fold0_train") if case in item["image"])
        assert nib.load(path).shape == nib.load(image).shape[:3]
    assert predict_training_cases(bundle, 0, sets=FAST) == fit
    assert "2 training prediction(s) present, skipped" in capsys.readouterr().out

    assert main(["train", str(bundle), "--folds", "all", "--resume", "--set", *FAST]) == 0
    again = capsys.readouterr().out
    assert "fold 0: trained (2 iterations), skipped" in again and "out-of-fold prediction(s) present, skipped" in again
    assert main(["train", str(bundle), "--folds", "2"]) == 2
    assert "fold indices must be in 0..1" in capsys.readouterr().err


def test_a_run_killed_in_fold_1_resumes_at_fold_1(work, tmp_path, monkeypatch, capsys):
    """The bundle run of fold 1 is SIGKILLed at its second iteration (after the first epoch's checkpoint); rerun
    with --resume: fold 0 is not trained again, fold 1 continues from its checkpoint, the cross-validation ends."""
    bundle = export(work, "segresnet", tmp_path / "bundle")
    killer = ("import os, runpy, signal, sys\n"
              "from monai.engines import SupervisedTrainer\n"
              "real = SupervisedTrainer._iteration\n"
              "def iteration(self, engine, batch):\n"
              "    if engine.state.iteration == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(self, engine, batch)\n"
              "SupervisedTrainer._iteration = iteration\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    real_launcher, calls = runner.launcher, []

    def launcher(nproc: int) -> list[str]:
        calls.append(nproc)
        return [sys.executable, "-c", killer] if len(calls) == 2 else real_launcher(nproc)  # fold 1's training

    with monkeypatch.context() as patched:
        patched.setattr(runner, "launcher", launcher)
        assert cross_validate(bundle, "all", sets=FAST) is None
    assert "fold(s) 1 failed; rerun with --resume" in capsys.readouterr().out
    assert list(held_folds(bundle)["folds"]) == ["0"]
    assert (bundle / "models" / "fold1" / "checkpoint_epoch=1.pt").is_file()
    summary = cross_validate(bundle, "all", sets=FAST, resume="auto")
    out = capsys.readouterr().out
    assert "fold 0: trained (2 iterations), skipped" in out and "fold 1: training" in out
    assert summary is not None and summary["folds"] == [0, 1]
    log = (bundle / "logs" / "fold1")
    assert log.is_dir()
