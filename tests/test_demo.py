"""``dints3d demo`` at minimal settings: the run on the embedded task writes the selection and the predictions of the
test images, says it cross-validates fewer folds than a real run, and skips every stage on a rerun."""

from __future__ import annotations

from dints3d.demo import DemoSettings, demo

MINIMAL = DemoSettings(cases=4, test_cases=1, size=24, folds=2, candidates=["searched", "dynunet"], overrides=[
    "search.iterations=2", "search.val_interval=2", "search.checkpoint_interval=2", "data.num_samples=1",
    "train.iterations=2", "train.val_interval=1", "train.channel_mul=0.25", "train.batch_size=1"])


def test_demo_runs_the_pipeline_then_skips_it(tmp_path, capsys):
    result = demo(tmp_path, MINIMAL)
    out = capsys.readouterr().out
    assert "demo: 2-fold cross-validation" in out and "a real run: dints3d run" in out
    assert "| candidate | kind |" in out and result["chosen"]["chosen"] in out
    assert len(list((tmp_path / "predictions").glob("*_seg.nii.gz"))) == 1
    assert (tmp_path / "final" / "selection" / "selection.json").is_file()

    again = demo(tmp_path, MINIMAL)
    out = capsys.readouterr().out
    assert "[select] done earlier" in out and "running:" not in out
    assert again["chosen"] == result["chosen"]
