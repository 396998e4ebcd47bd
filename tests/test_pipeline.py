"""``dints3d run`` end to end at tiny settings (prepare → search → export → cross-validation → select → predict), and
a run killed between two stages continuing where it stopped; ``dints3d demo`` is this run on its embedded task."""

from __future__ import annotations

import json

import pytest

from dints3d.cli import main
from dints3d.pipeline import Pipeline, RunSettings
from dints3d.utils.errors import DintsError

TINY = ["search.iterations=2", "search.val_interval=2", "search.checkpoint_interval=2", "data.num_samples=1",
        "train.iterations=2", "train.val_interval=1", "train.channel_mul=0.25", "train.batch_size=1"]


def test_run_end_to_end_and_resume_after_a_kill_between_stages(msd_task, tmp_path, monkeypatch, capsys):
    task = msd_task(cases=4, test_cases=1, size=24, seed=5)
    settings = RunSettings(config="demo", overrides=TINY, folds=2, candidates=["searched", "segresnet"])
    calls = []

    def killed(self):
        calls.append(1)
        raise KeyboardInterrupt  # a kill after cross-validation, before the selection is written

    with monkeypatch.context() as patched:
        patched.setattr(Pipeline, "select", killed)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(task, tmp_path / "run", settings).run()
    assert calls and not (tmp_path / "run" / "final").exists()
    first = capsys.readouterr().out
    for stage in ("prepare", "search", "export_searched", "export_segresnet", "cross_validate_searched",
                  "cross_validate_segresnet"):
        assert f"[{stage}] done in" in first

    result = Pipeline(task, tmp_path / "run", settings).run()
    out = capsys.readouterr().out
    assert "[cross_validate_segresnet] done earlier" in out and "[select] done in" in out
    assert "| candidate | kind |" in out and "final bundle:" in out
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(state["stages"]) == {"prepare", "search", "export_searched", "export_segresnet",
                                    "cross_validate_searched", "cross_validate_segresnet", "select", "predict"}
    assert result["chosen"]["chosen"] == state["stages"]["select"]["chosen"]
    assert len(list((tmp_path / "run" / "predictions").glob("*_seg.nii.gz"))) == 1

    with pytest.raises(DintsError, match="other settings"):
        Pipeline(task, tmp_path / "run", RunSettings(config="demo", folds=3))
    assert main(["run", "--task", str(task), "--out", str(tmp_path / "x"), "--candidates", "unet"]) == 2
    assert "unknown ['unet']" in capsys.readouterr().err
