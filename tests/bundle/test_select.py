"""``dints3d select`` on constructed cross-validation tables (a clear winner, a tie → the simpler model, a searched
network that loses → the baseline ships) and end to end: candidates cross-validated on a tiny task, the pair's
ensemble scored from their out-of-fold probabilities, the final bundle inferring with MONAI alone and equal to the
mean of its models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from support import BLOCK_DINTS3D

from dints3d.bundle.select import BASELINE, PAIR, SEARCHED, Candidate, choose, paired_p
from dints3d.cli import main

CASES = [f"case{i}" for i in range(20)]


def candidate(name: str, kind: int, scores: list[float], parameters: int = 1_000_000) -> Candidate:
    return Candidate(name, kind, parameters, dict(zip(CASES, scores)), {}, [])


def noisy(mean: float, seed: int) -> list[float]:
    return list(np.clip(mean + np.random.default_rng(seed).normal(0, 0.02, len(CASES)), 0, 1))


def test_a_clear_winner_ships():
    searched = candidate("searched", SEARCHED, [v + 0.1 for v in noisy(0.7, 0)])
    baseline = candidate("segresnet", BASELINE, noisy(0.7, 0))
    chosen, decision = choose([baseline, searched], alpha=0.05)
    assert chosen is searched and decision["p_values_vs_best"]["segresnet"] < 0.05
    assert "significantly better" in decision["why"]


def test_a_tie_ships_the_simpler_model():
    base = noisy(0.8, 1)
    jitter = np.random.default_rng(4).normal(0.002, 0.01, (2, len(CASES)))  # slightly better on average, by noise
    searched = candidate("searched", SEARCHED, list(base + jitter[0]))
    baseline = candidate("dynunet", BASELINE, base)
    pair = candidate("searched + dynunet", PAIR, list(base + jitter[1]), parameters=2_000_000)
    best = max([searched, baseline, pair], key=lambda c: c.mean)
    assert best is not baseline and paired_p(best, baseline) >= 0.05  # the best is not the simplest, not significantly
    chosen, decision = choose([searched, baseline, pair], alpha=0.05)
    assert chosen is baseline  # ...so the simplest of the tied candidates, the baseline, ships
    assert "does not beat dynunet" in decision["why"] and "the simpler baseline ships" in decision["why"]
    smaller = candidate("segresnet", BASELINE, base, parameters=500_000)
    assert choose([baseline, smaller], alpha=0.05)[0] is smaller  # equal kinds: the fewer parameters


def test_a_searched_network_that_loses_never_ships():
    searched = candidate("searched", SEARCHED, noisy(0.6, 2))
    baseline = candidate("segresnet", BASELINE, noisy(0.75, 3))
    chosen, decision = choose([searched, baseline], alpha=0.05)
    assert chosen is baseline
    assert "loses to the best baseline" in decision["why"] and "the baseline ships" in decision["why"]
    assert "The searched network (0.5" in decision["why"]  # named once, not "The searched network searched"
    renamed = candidate("dints-seed1", SEARCHED, noisy(0.6, 2))
    assert "The searched network dints-seed1 (0.5" in choose([renamed, baseline], alpha=0.05)[1]["why"]
    assert paired_p(baseline, baseline) == 1.0


@pytest.fixture(scope="module")
def candidates(prepared_task, tmp_path_factory) -> dict[str, Path]:
    """A DiNTS preset and a baseline, exported and cross-validated (2 folds, probabilities kept) on a tiny task."""
    work = prepared_task(folds=2, cases=4, test_cases=1, size=28, seed=2).work
    root = tmp_path_factory.mktemp("select")
    out = {}
    for arch in ("dints-cvpr", "segresnet"):
        args = ["export", "--arch", arch, "--work", str(work), "--out", str(root / arch), "--config", "demo"]
        for setting in ("train.iterations=2", "train.val_interval=1", "train.batch_size=1", "train.channel_mul=0.25",
                        "data.num_samples=1", "data.patch_size=[32,32,32]"):
            args += ["--set", setting]
        assert main(args) == 0
        assert main(["train", str(root / arch), "--folds", "all", "--save-probabilities", "--set",
                     "sw_overlap=0.25"]) == 0
        out[arch] = root / arch
    out["work"] = work
    return out


def test_select_end_to_end_writes_a_final_bundle_and_its_report(candidates, tmp_path, capsys):
    final = tmp_path / "final"
    assert main(["select", str(candidates["dints-cvpr"]), str(candidates["segresnet"]), "--out", str(final)]) == 0
    out = capsys.readouterr().out
    report = json.loads((final / "selection" / "selection.json").read_text())
    assert report["pair_scored"] and {c["kind"] for c in report["candidates"]} == {"baseline", "searched",
                                                                                   "ensemble of two"}
    assert report["chosen"] in {c["name"] for c in report["candidates"]} and report["why"] in out
    assert (final / "selection" / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert "| candidate | kind |" in (final / "selection" / "selection.md").read_text()
    ensemble = (final / "configs" / "ensemble.yaml").read_text()
    assert ensemble.count("CheckpointLoader") == (4 if report["kind"] == "ensemble of two" else 2)


def test_ensemble_inference_is_the_mean_of_its_models_with_monai_alone(candidates, tmp_path):
    """The fold models' ensemble of a bundle (configs/ensemble.yaml over inference.yaml), run in a process that
    refuses dints3d, writes probabilities equal to the mean of each fold model's own (mirrored) probabilities."""
    bundle = candidates["segresnet"]
    images = Path(json.loads((candidates["work"] / "plan.json").read_text())["task_dir"]) / "imagesTs"
    (image,) = sorted(images.glob("*.nii.gz"))
    name = image.name.replace(".nii.gz", "")

    def run(out: Path, configs: list[str], *extra: str) -> np.ndarray:
        files = repr([str(bundle / "configs" / c) for c in configs])
        done = subprocess.run([sys.executable, "-c", BLOCK_DINTS3D, "monai.bundle", "run", "--config_file", files,
                               "--bundle_root", str(bundle), "--dataset_dir", str(images), "--output_dir", str(out),
                               "--save_probabilities", "True", "--sw_overlap", "0.25", *extra],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.asarray(nib.load(out / f"{name}_prob.nii.gz").dataobj)

    together = run(tmp_path / "ensemble", ["inference.yaml", "ensemble.yaml"])
    singles = [run(tmp_path / f"fold{k}", ["inference.yaml"], "--ckpt_path",
                   str(bundle / "models" / f"fold{k}" / "model.pt"), "--mirror_axes", "[0, 1, 2]") for k in (0, 1)]
    assert together.shape == singles[0].shape and together.shape[-1] == 3
    np.testing.assert_allclose(together, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(singles[0], singles[1])  # two different models: the mean is a real ensemble
