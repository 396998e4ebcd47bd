"""``dints3d evaluate`` on tiny synthetic label maps written with nibabel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dints3d.cli import main
from dints3d.evaluation.metrics import CSV_COLUMNS, case_name, evaluate_folders
from dints3d.utils.errors import DintsError

SHAPE = (12, 12, 12)


def cube(lo: tuple[int, int, int], size: int = 4, value: int = 1, shape=SHAPE) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    x, y, z = lo
    out[x:x + size, y:y + size, z:z + size] = value
    return out


def save(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)
    return path


def read_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_perfect_prediction(tmp_path):
    label = cube((2, 2, 2)) + cube((7, 7, 7), value=2)
    save(tmp_path / "labels/case_1.nii.gz", label)
    save(tmp_path / "pred/case_1.nii.gz", label)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert [r["class"] for r in rows] == ["1", "2"]
    for r in rows:
        assert (float(r["dice"]), float(r["hd95_mm"]), float(r["nsd"])) == (1.0, 0.0, 1.0)
        assert r["status"] == "ok" and r["gt_voxels"] == r["pred_voxels"] == "64"
    assert summary["mean_foreground_dice"] == 1.0
    assert json.loads((tmp_path / "out/summary.json").read_text())["classes"]["2"]["dice"]["count"] == 1


def test_shifted_prediction_and_spacing_in_mm(tmp_path):
    # A 4³ cube shifted by one voxel along x: overlap 3·4·4 = 48 → Dice 2·48 / 128 = 0.75; the worst surface
    # distance is one voxel along x, i.e. the x spacing in mm.
    save(tmp_path / "labels/a.nii.gz", cube((2, 2, 2)), spacing=(1.0, 1.0, 1.0))
    save(tmp_path / "pred/a_seg.nii.gz", cube((3, 2, 2)), spacing=(1.0, 1.0, 1.0))
    save(tmp_path / "labels/b.nii.gz", cube((2, 2, 2)), spacing=(2.0, 1.0, 1.0))
    save(tmp_path / "pred/b/b_seg.nii.gz", cube((3, 2, 2)), spacing=(2.0, 1.0, 1.0))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out", nsd_tolerance_mm=1.0)
    rows = {r["case"]: r for r in read_rows(tmp_path / "out")}
    assert float(rows["a"]["dice"]) == pytest.approx(0.75)
    assert float(rows["b"]["dice"]) == pytest.approx(0.75)
    assert float(rows["a"]["hd95_mm"]) == pytest.approx(1.0)
    assert float(rows["b"]["hd95_mm"]) == pytest.approx(2.0)
    assert float(rows["a"]["nsd"]) == pytest.approx(1.0)  # within the 1 mm tolerance
    assert float(rows["b"]["nsd"]) < 1.0  # 2 mm apart
    assert summary["classes"]["1"]["hd95_mm"]["mean"] == pytest.approx(1.5)


def test_absent_class_is_not_dice_zero(tmp_path, capsys):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    save(tmp_path / "labels/x.nii.gz", cube((2, 2, 2)))                       # no tumour in x
    save(tmp_path / "pred/x.nii.gz", cube((2, 2, 2)) + cube((8, 8, 8), 2, 2))  # …but predicted: false positive
    save(tmp_path / "labels/y.nii.gz", cube((2, 2, 2)) + cube((7, 7, 7), value=2))
    save(tmp_path / "pred/y.nii.gz", cube((2, 2, 2)) + cube((7, 7, 7), value=2))
    save(tmp_path / "labels/z.nii.gz", cube((2, 2, 2)))                       # no prediction for z: skipped
    code = main(["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels"),
                 "--dataset-json", str(tmp_path / "dataset.json"), "--out", str(tmp_path / "out")])
    assert code == 0
    rows = {(r["case"], r["class_name"]): r for r in read_rows(tmp_path / "out")}
    fp = rows[("x", "tumour")]
    assert fp["status"] == "absent_in_gt" and fp["dice"] == "" and fp["gt_voxels"] == "0" and fp["pred_voxels"] == "8"
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    tumour = summary["classes"]["2"]
    assert tumour["dice"] == {"mean": 1.0, "std": 0.0, "count": 1}
    assert (tumour["absent_in_gt"], tumour["false_positive_cases"], tumour["cases_present"]) == (1, 1, 1)
    assert summary["mean_foreground_dice"] == 1.0
    assert summary["labels_without_prediction"] == ["z"]
    assert "mean foreground Dice 1.0000" in capsys.readouterr().out


def test_missed_class_and_class_seen_in_other_case(tmp_path):
    save(tmp_path / "labels/a.nii.gz", cube((2, 2, 2)))
    save(tmp_path / "pred/a.nii.gz", np.zeros(SHAPE, np.uint8))
    save(tmp_path / "labels/b.nii.gz", cube((2, 2, 2), value=3))
    save(tmp_path / "pred/b.nii.gz", cube((2, 2, 2), value=3))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out")
    rows = {(r["case"], r["class"]): r for r in read_rows(tmp_path / "out")}
    assert rows[("a", "1")]["status"] == "missed" and float(rows[("a", "1")]["dice"]) == 0.0
    assert rows[("a", "1")]["hd95_mm"] == ""
    assert rows[("a", "3")]["status"] == "absent_in_gt" and rows[("a", "3")]["class_name"] == "class_3"
    assert summary["classes"]["1"]["missed"] == 1
    assert summary["mean_foreground_dice"] == pytest.approx(0.5)  # mean of class means 0 and 1
    assert list(read_rows(tmp_path / "out")[0]) == list(CSV_COLUMNS)


def test_mismatched_shape_names_the_file(tmp_path):
    save(tmp_path / "labels/a.nii.gz", cube((2, 2, 2)))
    bad = save(tmp_path / "pred/a.nii.gz", cube((2, 2, 2), shape=(12, 12, 10)))
    with pytest.raises(DintsError) as err:
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out")
    assert err.value.where == str(bad) and "shape [12, 12, 10]" in err.value.problem
    assert not (tmp_path / "out/metrics.csv").exists()


def test_mismatched_affine_unreadable_file_and_missing_label(tmp_path, capsys):
    save(tmp_path / "labels/a.nii.gz", cube((2, 2, 2)))
    save(tmp_path / "pred/a.nii.gz", cube((2, 2, 2)), spacing=(1.5, 1.0, 1.0))
    with pytest.raises(DintsError, match="affine differs"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out")
    truncated = tmp_path / "pred/a.nii.gz"
    save(truncated, cube((2, 2, 2)))
    truncated.write_bytes(truncated.read_bytes()[:60])
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels"),
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {truncated}: cannot read NIfTI image")
    save(tmp_path / "pred/orphan.nii.gz", cube((2, 2, 2)))
    save(truncated, cube((2, 2, 2)))
    with pytest.raises(DintsError, match="no label for case 'orphan'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", tmp_path / "out")


def test_case_name_suffixes():
    assert case_name(Path("spleen_2.nii.gz")) == "spleen_2"
    assert case_name(Path("spleen_2_seg.nii.gz"), ("_seg", "_pred")) == "spleen_2"
    assert case_name(Path("hippocampus_001_pred.nii"), ("_seg", "_pred")) == "hippocampus_001"
    assert case_name(Path("_seg.nii.gz"), ("_seg",)) == "_seg"


def test_a_label_without_prediction_is_reported_or_scored_as_zero(tmp_path, capsys):
    """8 labels, 7 predictions: the 8th is said (a warning, summary.json), and left out of the means unless
    --missing zero scores it as a case that predicted nothing (as challenge evaluators count it)."""
    for k in range(8):
        save(tmp_path / f"labels/c{k}.nii.gz", cube((2, 2, 2)))
        if k < 7:
            save(tmp_path / f"pred/c{k}_seg.nii.gz", cube((2, 2, 2)))
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels")]
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    out, err = capsys.readouterr()
    assert err == (f"warning: 1 label(s) in {tmp_path / 'labels'} have no prediction in {tmp_path / 'pred'}: c7; "
                   "left out of the means (--missing zero scores them as 0)\n")
    assert "7 cases; mean foreground Dice 1.0000" in out
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["labels_without_prediction"] == ["c7"] and summary["missing"] == "report"

    assert main([*args, "--out", str(tmp_path / "zero"), "--missing", "zero"]) == 0
    out, err = capsys.readouterr()
    assert "c7; scored as Dice 0 (--missing zero)" in err and "8 cases; mean foreground Dice 0.8750" in out
    summary = json.loads((tmp_path / "zero/summary.json").read_text())
    assert summary["classes"]["1"]["no_prediction"] == 1 and summary["classes"]["1"]["dice"]["count"] == 8
    rows = {r["case"]: r for r in read_rows(tmp_path / "zero")}
    assert rows["c7"]["status"] == "no_prediction" and float(rows["c7"]["dice"]) == 0.0
    assert rows["c7"]["pred_voxels"] == "0" and rows["c7"]["gt_voxels"] == "64"


def test_an_error_comes_before_any_scoring_and_without_monais_warnings(tmp_path, capsys):
    """Every pair's header is checked first (a bad second case is not found after scoring the first), and MONAI's
    deprecation notices from inside its metrics never reach the user."""
    import warnings

    for name in ("a", "b"):
        save(tmp_path / f"labels/{name}.nii.gz", cube((2, 2, 2)))
    save(tmp_path / "pred/a.nii.gz", cube((3, 2, 2)))
    bad = save(tmp_path / "pred/b.nii.gz", cube((2, 2, 2)), spacing=(1.5, 1.0, 1.0))
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels"),
            "--out", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 2
        assert [str(w.message) for w in caught] == []
        assert capsys.readouterr().err.startswith(f"error: {bad}: affine differs")
        save(bad, cube((2, 2, 2)))
        assert main(args) == 0  # scored (HD95, NSD): still no warning
        assert [str(w.message) for w in caught] == []


def test_default_output_is_the_prediction_folder_and_rerunning_ignores_it(tmp_path, capsys):
    """Without --out, metrics.csv and summary.json go next to the predictions (as nnU-Net's summary.json), not into
    the current folder; a second run scores the same masks (its own outputs are not taken for predictions)."""
    save(tmp_path / "labels/a.nii.gz", cube((2, 2, 2)))
    save(tmp_path / "pred/a.nii.gz", cube((2, 2, 2)))
    for _ in range(2):
        assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "labels")]) == 0
        assert f"wrote {tmp_path / 'pred' / 'metrics.csv'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a.nii.gz", "metrics.csv", "summary.json"]
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["num_cases"] == 1
