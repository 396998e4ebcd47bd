"""``dints3d prepare``: fingerprint, nnU-Net-style plan and datalist on synthetic tasks."""

import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dints3d.cli import main
from dints3d.data.datalist import read_datalist
from dints3d.data.fingerprint import (
    FingerprintBuilder,
    ForegroundIntensity,
    patch_size,
    read_plan,
)
from dints3d.data.msd import load_image, load_label, read_task
from dints3d.data.prepare import prepare
from dints3d.utils.errors import DintsError

ROOT = Path(__file__).resolve().parents[2]


def _load(work: Path, name: str) -> dict:
    return json.loads((work / f"{name}.json").read_text())


#: anisotropic, 2 modalities, 3 foreground classes
MRI = dict(cases=7, test_cases=2, classes=3, modalities=2, anisotropic=True, size=28, seed=2)


@pytest.fixture(scope="module")
def mri_task(msd_task):
    return msd_task(**MRI)


@pytest.fixture(scope="module")
def ct_task(msd_task):
    return msd_task(cases=4, test_cases=0, size=24, seed=4)


@pytest.fixture(scope="module")
def mri_work(prepared_task):
    return prepared_task(folds=3, **MRI).work


def test_plan_of_anisotropic_two_modality_task(mri_task, mri_work, capsys):
    plan = read_plan(mri_work)
    assert plan["in_channels"] == 2 and plan["modalities"] == ["T2", "ADC"]
    assert plan["out_channels"] == 4 and plan["class_names"] == ["background", "organ", "lesion", "organ2"]
    spacings = np.array([nib.load(mri_task / "imagesTr" / f"synthetic_{i:03d}.nii.gz").header.get_zooms()[:3]
                         for i in range(7)])
    assert plan["anisotropic_axis"] == 2
    assert "axis 2 uses the 10th percentile" in plan["spacing_rule"]
    assert plan["target_spacing"][2] == pytest.approx(np.percentile(spacings[:, 2], 10), abs=1e-5)
    assert plan["target_spacing"][2] < np.median(spacings[:, 2])
    assert plan["target_spacing"][:2] == pytest.approx(np.median(spacings[:, :2], axis=0), abs=1e-5)
    assert [n["scheme"] for n in plan["normalization"]] == ["zscore_nonzero"] * 2
    assert plan["patch_divisor"] == 32 and plan["overrides"] == {}
    shapes = np.array([nib.load(mri_task / "imagesTr" / f"synthetic_{i:03d}.nii.gz").shape[:3] for i in range(7)])
    median = np.median(shapes * spacings / plan["target_spacing"], axis=0)
    assert plan["median_shape"] == pytest.approx(median, abs=0.01)
    assert plan["patch_size"] == [min(96, int(np.ceil(m / 32)) * 32) for m in median]


def test_fingerprint_matches_the_files(mri_task, mri_work):
    fp = _load(mri_work, "fingerprint")
    assert fp["num_cases"] == 7 and fp["modalities"] == ["T2", "ADC"] and fp["task_dir"] == str(mri_task.resolve())
    values = {0: [], 1: []}
    for case in fp["cases"]:
        img, lab = nib.load(mri_task / case["image"]), np.asanyarray(nib.load(mri_task / case["label"]).dataobj)
        assert case["shape"] == list(lab.shape) and case["orientation"] == "LPS"
        assert case["spacing"] == pytest.approx(img.header.get_zooms()[:3], abs=1e-5)
        assert case["class_voxels"] == {str(k): int((lab == k).sum()) for k in range(4)}
        data = np.asanyarray(img.dataobj)
        for c in values:
            values[c].append(data[..., c][lab > 0].astype(np.float64))
    for c, stats in enumerate(fp["intensity"]):
        v = np.concatenate(values[c])  # fewer than 10k foreground voxels per case: the sample is every voxel
        assert stats["mean"] == pytest.approx(v.mean(), rel=1e-9) and stats["std"] == pytest.approx(v.std(), rel=1e-9)
        assert (stats["min"], stats["max"]) == pytest.approx((v.min(), v.max()))
        assert stats["percentile_00_5"] == pytest.approx(np.percentile(v, 0.5), rel=1e-5)
        assert stats["percentile_99_5"] == pytest.approx(np.percentile(v, 99.5), rel=1e-5)
    assert sum(fp["class_frequency"].values()) == pytest.approx(1.0)


def test_ct_task_gets_clip_and_dataset_zscore(ct_task, tmp_path, capsys):
    outputs = prepare(ct_task, tmp_path / "work", folds=2)
    (norm,) = outputs["plan"]["normalization"]
    (stats,) = outputs["fingerprint"]["intensity"]
    assert norm == {"modality": "CT", "scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                    "mean": stats["mean"], "std": stats["std"]}
    assert -100 < norm["clip"][0] < norm["clip"][1] < 300  # HU of the soft-tissue foreground, not air or bone
    assert outputs["plan"]["anisotropic_axis"] is None and outputs["plan"]["spacing_rule"] == "median"


def test_streaming_statistics_are_exact_and_sample_is_bounded():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(100, 20, n) for n in (5000, 1, 300, 0, 12000)]
    stats = ForegroundIntensity("CT", samples_per_case=1000)
    for chunk in chunks:
        stats.add(chunk, np.random.default_rng(1))
    everything = np.concatenate(chunks)
    summary = stats.summary()
    assert summary["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert summary["std"] == pytest.approx(everything.std(), rel=1e-12)
    assert sum(s.size for s in stats.samples) == 1000 + 1 + 300 + 1000
    assert summary["percentile_50_0"] == pytest.approx(100, abs=3)


def test_fingerprint_does_not_depend_on_case_order(ct_task):
    task = read_task(ct_task)
    results = []
    for order in (range(4), reversed(range(4))):
        builder = FingerprintBuilder(task, seed=0)
        for i in order:
            image = load_image(task.path(task.training[i].image), 1)
            builder.add(i, task.training[i], image, load_label(task.path(task.training[i].label), task.labels, image))
        results.append(builder.result())
    assert results[0]["cases"] == results[1]["cases"]
    for a, b in zip(results[0]["intensity"], results[1]["intensity"]):
        assert a.pop("modality") == b.pop("modality") and a == pytest.approx(b, rel=1e-12)


def test_patch_size_rule():
    assert patch_size([150.0, 40.2, 10.0], 32) == [96, 64, 32]
    assert patch_size([150.0, 40.2, 10.0], 16) == [96, 48, 16]
    assert patch_size([150.0, 70.0, 10.0], 64) == [64, 64, 64]  # cap 96 rounds down to the divisor
    assert patch_size([300.0, 70.0, 10.0], 128) == [128, 128, 128]


def test_folds_and_halves_are_disjoint_and_cover(mri_work):
    data = _load(mri_work, "datalist")
    cases = [e["case"] for e in data["training"]]
    assert len(cases) == 7 and data["num_folds"] == 3 and [e["case"] for e in data["test"]] == [
        "synthetic_007", "synthetic_008"]
    validation_sets = []
    for k in range(3):
        names = {key: [e["case"] for e in data[f"fold{k}_{key}"]] for key in ("train", "validation", "weights", "arch")}
        train, val = set(names["train"]), set(names["validation"])
        assert not train & val and train | val == set(cases)
        assert val == {e["case"] for e in data["training"] if e["fold"] == k}
        weights, arch = set(names["weights"]), set(names["arch"])
        assert weights and arch and not weights & arch and weights | arch == train
        assert abs(len(weights) - len(arch)) <= 1
        validation_sets.append(val)
    assert sorted(len(v) for v in validation_sets) == [2, 2, 3]
    assert set().union(*validation_sets) == set(cases)


def test_same_seed_same_files_other_seed_other_split(ct_task, tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["prepare", "--task", str(ct_task), "--out", str(tmp_path / name), "--folds", "2",
                     "--seed", str(seed)]) == 0
    for file in ("fingerprint.json", "plan.json", "datalist.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    folds = [[e["fold"] for e in _load(tmp_path / n, "datalist")["training"]] for n in "ac"]
    halves = [[e["case"] for e in _load(tmp_path / n, "datalist")["fold0_weights"]] for n in "ac"]
    assert folds[0] != folds[1] or halves[0] != halves[1]


def test_config_overrides_plan_and_divisor(ct_task, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("plan:\n  patch_size: [64, 64, 32]\n  orientation: LPS\n")
    assert main(["prepare", "--task", str(ct_task), "--out", str(tmp_path / "w"), "--folds", "2",
                 "--config", str(config)]) == 0
    plan = read_plan(tmp_path / "w")
    assert plan["patch_size"] == [64, 64, 32] and plan["orientation"] == "LPS"
    assert plan["overrides"] == {"patch_size": [64, 64, 32], "orientation": "LPS"}
    assert "patch 64 × 64 × 32" in capsys.readouterr().out

    assert main(["prepare", "--task", str(ct_task), "--out", str(tmp_path / "w3"), "--folds", "2",
                 "--set", "dints.num_depths=3", "--set", "plan.target_spacing=[2.0,2.0,2.0]"]) == 0
    plan = read_plan(tmp_path / "w3")
    assert plan["patch_divisor"] == 16 and plan["target_spacing"] == [2.0, 2.0, 2.0]
    assert all(p % 16 == 0 for p in plan["patch_size"]) and max(plan["patch_size"]) <= 32  # ~24 mm cases at 2 mm


@pytest.mark.parametrize("override, problem", [
    ("plan.patch_sise=[64,64,64]", "unknown plan field 'plan.patch_sise'; did you mean 'plan.patch_size'?"),
    ("plan.normalisation=[]", "did you mean 'plan.normalization'?"),
    ("plan.patch_size=[64,64,40]", "divisible by the network's patch divisor 32"),
    ("plan.patch_size=[64.5,64,64]", "'plan.patch_size' must be a list of 3 positive integers, got [64.5, 64, 64]"),
    ("plan.patch_divisor=0", "'plan.patch_divisor' must be a positive integer, got 0"),
    ("plan.target_spacing=[1,1]", "'plan.target_spacing' must be a list of 3 positive numbers"),
    ("plan.target_spacing=[1,1,.nan]", "'plan.target_spacing' must be a list of 3 positive numbers"),
    ("plan.median_shape=[0,10,10]", "'plan.median_shape' must be a list of 3 positive numbers"),
    ("plan.normalization=foo", "'plan.normalization' must be a list of {\"modality\", \"scheme\"} entries"),
    ("plan.normalization=[{modality: CT, scheme: zscore}]",
     "'plan.normalization[0].scheme' must be 'ct' or 'zscore_nonzero', got 'zscore'"),
    ("plan.normalization=[{modality: CT, scheme: ct, clip: [5, 1], mean: 0, std: 1}]",
     "'plan.normalization[0].clip' must be [low, high] with low < high"),
    ("plan.normalization=[{modality: CT, scheme: ct, clip: [1, 5], mean: 0, std: 0}]",
     "'plan.normalization[0].std' must be a positive number, got 0"),
    ("plan.normalization=[{modality: CT, scheme: zscore_nonzero, clipp: 1}]",
     "'plan.normalization[0]' has unknown key 'clipp'; did you mean 'clip'?"),
    ("plan.normalization=[{modality: MR, scheme: zscore_nonzero}]",
     "'plan.normalization' is for modalities ['MR'] but plan.modalities is ['CT']"),
    ("plan.normalization=[{modality: CT, scheme: zscore_nonzero}, {modality: CT, scheme: zscore_nonzero}]",
     "'plan.normalization' has 2 entries but the images have 1 channel(s)"),
    ("plan.in_channels=abc", "'plan.in_channels' must be a positive integer, got 'abc'"),
    ("plan.in_channels=2", "'plan.in_channels' is 2 but the images have 1 channel(s)"),
    ("plan.out_channels=7", "'plan.out_channels' is 7 but the task declares 3 labels (background, organ, lesion)"),
    ("plan.class_names=[background]", "'plan.class_names' must be a list of ≥ 2 non-empty names"),
    ("plan.class_names=[bg, a, b, c]", "'plan.class_names' has 4 names but the task declares 3 labels (0–2)"),
    ("plan.labels={0: bg, 2: b}", "'plan.labels' must map \"0\", \"1\", … (≥ 2 labels, none missing)"),
    ("plan.modalities=[CT, MR]", "'plan.modalities' has 2 entries but the images have 1 channel(s)"),
    ("plan.orientation=RAA", "'plan.orientation' must be 3 axis letters, one of L/R, A/P, S/I each"),
    ("plan.anisotropic_axis=3", "'plan.anisotropic_axis' must be null or 0 … 2, got 3"),
    ("plan.name=", "'plan.name' must be a non-empty string, got None"),
])
def test_bad_plan_override_is_refused_before_any_case_is_read(ct_task, tmp_path, capsys, monkeypatch, override,
                                                              problem):
    def no_reading(*_):
        raise AssertionError("a case was read before the plan overrides were checked")

    monkeypatch.setattr("dints3d.data.prepare.load_image", no_reading)
    assert main(["prepare", "--task", str(ct_task), "--out", str(tmp_path / "w"), "--folds", "2",
                 "--set", override]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --set: ") and problem in err and len(err.splitlines()) == 1, err
    assert out == "" and not (tmp_path / "w").exists()


def test_bad_plan_override_leaves_the_previous_work_intact(ct_task, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(["prepare", "--task", str(ct_task), "--out", str(work), "--folds", "2"]) == 0
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    for override in ("plan.normalization=foo", "plan.out_channels=7", "plan.in_channels=abc"):
        assert main(["prepare", "--task", str(ct_task), "--out", str(work), "--folds", "2", "--set", override]) == 2
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    assert capsys.readouterr().err.count("error: --set: ") == 3


def test_plan_errors_name_the_file_or_set_that_gave_the_key(ct_task, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("plan:\n  orientation: LPS\n  class_names: [background, organ]\n")
    argv = ["prepare", "--task", str(ct_task), "--out", str(tmp_path / "w"), "--folds", "2", "--config", str(config)]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: 'plan.class_names' has 2 names")
    assert main([*argv, "--set", "plan.class_names=[bg, organ, lesion]", "--set", "plan.out_channels=4"]) == 2
    assert capsys.readouterr().err.startswith("error: --set: 'plan.out_channels' is 4")
    assert not (tmp_path / "w").exists()


def test_tied_plan_fields_follow_an_override(ct_task, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(["prepare", "--task", str(ct_task), "--out", str(work), "--folds", "2",
                 "--set", "plan.class_names=[bg, liver, tumour]", "--set", "plan.modalities=[MR]",
                 "--set", "plan.target_spacing=[1e0, 1e0, 1.5e0]"]) == 0
    plan = read_plan(work)
    assert plan["labels"] == {"0": "bg", "1": "liver", "2": "tumour"} and plan["out_channels"] == 3
    assert plan["normalization"] == [{"modality": "MR", "scheme": "zscore_nonzero"}]  # MR: no CT clipping
    assert plan["target_spacing"] == [1.0, 1.0, 1.5]
    assert "normalization: MR zscore_nonzero" in capsys.readouterr().out

    assert main(["prepare", "--task", str(ct_task), "--out", str(work), "--folds", "2",
                 "--set", "plan.labels={0: background, 1: liver, 2: tumour}"]) == 0
    assert read_plan(work)["class_names"] == ["background", "liver", "tumour"]


def test_load_plan_checks_overrides_against_the_prepared_data(mri_work):
    from dints3d.data.dataset import load_plan

    plan = load_plan(mri_work, {"class_names": ["bg", "a", "b", "c"], "patch_size": [32, 32, 32]})
    assert plan["labels"] == {"0": "bg", "1": "a", "2": "b", "3": "c"} and plan["patch_size"] == [32, 32, 32]
    for overrides, problem in [
        ({"patch_sise": [32, 32, 32]}, "unknown plan field 'plan.patch_sise'; did you mean 'plan.patch_size'?"),
        ({"in_channels": 3}, "'plan.in_channels' is 3 but the images have 2 channel(s)"),
        ({"normalization": "foo"}, "'plan.normalization' must be a list"),
        ({"modalities": ["T1", "T2"]}, "'plan.modalities' is ['T1', 'T2'] but the plan's normalization is for"),
    ]:
        with pytest.raises(DintsError) as e:
            load_plan(mri_work, overrides, "config.yaml")
        assert e.value.line().startswith("config.yaml: ") and problem in e.value.line()


def test_datalist_loads_with_monai(mri_task, mri_work):
    from monai.data import load_decathlon_datalist

    path = mri_work / "datalist.json"
    for key in ("fold0_weights", "fold2_validation", "training"):
        items = load_decathlon_datalist(path, data_list_key=key, base_dir=mri_task)
        assert items and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
        assert [(i["image"], i["label"]) for i in items] == [
            (i["image"], i["label"]) for i in read_datalist(mri_work, key)]
    test = load_decathlon_datalist(path, is_segmentation=False, data_list_key="test", base_dir=mri_task)
    assert all(Path(i["image"]).is_file() for i in test)


def test_summary_and_script_entry_point(ct_task, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "preprocess" / "prepare_msd.py"), "--task", str(ct_task),
                             "--out", str(tmp_path / "w"), "--folds", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "4 training + 0 test cases, 2 folds" in result.stdout and "normalization: CT ct clip" in result.stdout
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["datalist.json", "fingerprint.json", "plan.json"]


def test_progress_bar_on_a_terminal_only(ct_task, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        prepare(ct_task, tmp_path / "w", folds=2)
        assert ("prepare:" in stream.getvalue() and "/4 " in stream.getvalue()) is shown
