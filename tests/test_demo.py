"""``dints3d demo`` at minimal settings: every stage runs once, writes its output and is skipped on a rerun."""

from __future__ import annotations

import math

import pytest

from dints3d.demo import Demo, DemoSettings
from dints3d.utils.errors import DintsError

MINIMAL = DemoSettings(cases=4, test_cases=1, size=24, folds=2, overrides=[
    "search.iterations=2", "search.val_interval=2", "search.checkpoint_interval=2", "data.num_samples=1",
    "train.iterations=2", "train.val_interval=2", "train.channel_mul=0.25", "train.batch_size=1"])
STAGES = ("synth", "prepare", "search", "export", "train", "infer_test", "infer_validation", "infer_untrained",
          "evaluate", "evaluate_untrained")


def test_demo_runs_every_stage_then_skips_them(tmp_path, capsys):
    result = Demo(tmp_path, MINIMAL).run()
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] done in" in out
    for key in ("trained", "untrained"):
        assert 0 <= result[key]["mean_foreground_dice"] <= 1 and not math.isnan(result[key]["mean_foreground_dice"])
    assert "mean foreground Dice" in out and "untrained" in out
    assert len(list((tmp_path / "pred_test").glob("*_seg.nii.gz"))) == 1
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert (tmp_path / "eval_pred_validation" / "summary.json").is_file()

    again = Demo(tmp_path, MINIMAL).run()
    out = capsys.readouterr().out
    assert all(f"[{stage}] done earlier" in out for stage in STAGES) and "running:" not in out
    assert again["trained"] == result["trained"]

    with pytest.raises(DintsError, match="other settings"):
        Demo(tmp_path, DemoSettings(cases=5, size=24))
