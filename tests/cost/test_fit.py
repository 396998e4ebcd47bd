"""``dints3d fit``: the rules (patch ladder, batch, memory savings) on a stand-in predictor and on the memory model,
monotone in the GPU size with every chosen peak under the card, and the overlays ``search`` and ``export`` accept."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from support import parse, tiny_arch

from dints3d.cli import main
from dints3d.config import config_path, load_config
from dints3d.cost.fit import (
    CACHE_RAM_FRACTION,
    Candidate,
    Choice,
    GiB,
    Mode,
    cache_plan,
    candidates,
    choose,
    fit,
    modes,
    overlay,
    patch_ladder,
    start_patch,
)
from dints3d.data.dataset import load_plan
from dints3d.utils.errors import DintsError
from dints3d.utils.preflight import estimate_cache_bytes

#: the tiny DiNTS space of the search tests, retraining at 1/4 of the channels
TINY = ["device=cpu", "dints.num_blocks=2", "dints.num_depths=3", "dints.channel_mul=0.125", "train.channel_mul=0.25",
        "search.amp=true"]


def _order(choice: Choice, cand: Candidate) -> tuple:
    """Where ``choice`` sits in the candidate's preference order (smaller = preferred: larger patch, then batch,
    then fewer savings)."""
    ladder = patch_ladder(cand.start_patch, cand.divisor)
    mode = Mode(choice.amp, choice.checkpoint_fraction)
    return ladder.index(tuple(choice.patch)), -choice.batch, cand.modes.index(mode)


def _assert_monotone(cands, choices_by_size):
    """A larger card never gets a less preferred setting; every chosen peak is within its budget."""
    for index, cand in enumerate(cands):
        previous = None
        for choices in choices_by_size:
            c = choices[index]
            if c.fits:
                assert c.peak <= c.budget
                order = _order(c, cand)
                assert previous is None or order <= previous, (cand.name, c)
                previous = order
            else:
                assert previous is None, f"{cand.name} fits a smaller card but not a larger one"


def test_patch_ladder_keeps_the_divisor_and_shrinks_the_longest_side():
    assert start_patch([96, 100, 40], 32) == [96, 96, 32]
    assert start_patch([8, 64, 64], 16) == [16, 64, 64]  # never below the divisor
    ladder = patch_ladder([96, 96, 96], 32)
    assert ladder[:4] == [(96, 96, 96), (64, 96, 96), (64, 64, 96), (64, 64, 64)] and ladder[-1] == (32, 32, 32)
    anisotropic = patch_ladder([160, 160, 48], (32, 32, 8))  # a per-axis divisor (a U-Net planned for 5 mm slices)
    volumes = [math.prod(p) for p in anisotropic]
    assert volumes == sorted(volumes, reverse=True) and len(set(volumes)) == len(volumes)
    assert all(p[0] % 32 == 0 and p[1] % 32 == 0 and p[2] % 8 == 0 for p in anisotropic)
    assert anisotropic[1] == (128, 160, 48) and anisotropic[-1] == (32, 32, 8)


def test_modes_ladder():
    assert modes(amp=True, checkpointing=False) == (Mode(True),)
    assert modes(amp=False, checkpointing=False) == (Mode(False), Mode(True))
    assert modes(amp=True, checkpointing=True) == (Mode(True), Mode(True, 0.5), Mode(True, 1.0))


def _stand_in(max_batch: int = 4, amp: bool = False) -> Candidate:
    """A candidate whose peak is voxels × batch × a factor per memory saving (AMP 0.6, checkpointing 1 − 0.4·f)."""
    def predict(patch, batch, mode):
        return int(math.prod(patch) * batch * (0.6 if mode.amp else 1.0) * (1 - 0.4 * mode.checkpoint_fraction))

    return Candidate("stand-in", "search", "", [96, 96, 96], [16, 16, 16], max_batch, modes(amp, True), predict)


def test_choose_prefers_patch_then_batch_then_fewer_savings():
    cand, full = _stand_in(), 96**3
    assert choose(cand, 3 * full) == Choice("stand-in", "search", 3 * full, [96, 96, 96], 4, True, 0.0,
                                            int(4 * full * 0.6))  # fp32 does not fit at batch 4: AMP
    assert choose(cand, 4 * full).amp is False
    # batch 2 rather than batch 1 without checkpointing
    c = choose(cand, int(2 * full * 0.6 * 0.8))
    assert (c.patch, c.batch, c.amp, c.checkpoint_fraction) == ([96, 96, 96], 2, True, 0.5)
    small = choose(cand, int(full * 0.6 * 0.6) - 1)  # below batch 1 with every saving: a smaller patch
    assert small.patch == [80, 96, 96] and small.batch == 1 and small.checkpoint_fraction == 1.0
    assert not choose(cand, 100).fits


def test_choices_are_monotone_in_the_budget_on_a_stand_in():
    cand = _stand_in(max_batch=6)
    budgets = [int(96**3 * f) for f in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 8)]
    _assert_monotone([cand], [[choose(cand, b)] for b in budgets])


@pytest.fixture(scope="module")
def tiny_task(search_work):
    cfg = load_config(config_path("demo"), TINY)
    return cfg, load_plan(search_work, cfg.plan)


def test_memory_model_choices_are_monotone_and_fit(tiny_task):
    cfg, plan = tiny_task
    cands = candidates(cfg, plan, search_max_batch=4, train_max_batch=4)
    assert [c.name for c in cands] == ["search", "dints-cvpr", "segresnet", "dynunet"]
    predictions: dict = {}
    sizes = [0.01, 0.03, 0.06, 0.1, 0.2, 0.4, 16, 24, 40, 80]
    by_size = [fit(cands, gb, predictions=predictions) for gb in sizes]
    _assert_monotone(cands, by_size)
    settings = {i: {(tuple(c[i].patch or ()), c[i].batch, c[i].checkpoint_fraction) for c in by_size}
                for i in range(len(cands))}
    assert sum(len(s) > 1 for s in settings.values()) >= 3, settings  # the small cards do force other settings
    for c, cand in zip(by_size[-1], cands):  # 80 GB: the plan's patch, the largest batch, no savings beyond AMP
        assert (c.patch, c.batch, c.checkpoint_fraction) == (cand.start_patch, 4, 0.0)


def test_candidates_refuse_a_2d_plan(tiny_task):
    cfg, plan = tiny_task
    with pytest.raises(DintsError, match="3-D"):
        candidates(cfg, {**plan, "patch_size": [64, 64]})


def test_cache_rate_follows_host_ram_and_search_may_cache_on_the_gpu(tiny_task):
    _, plan = tiny_task
    full = estimate_cache_bytes(plan, 10)
    assert cache_plan(plan, 10, ram_bytes=10 * full).cache_rate == 1.0
    assert cache_plan(plan, 10, ram_bytes=int(full / CACHE_RAM_FRACTION * 0.55)).cache_rate == 0.5
    assert cache_plan(plan, 10, ram_bytes=1).cache_rate == 0.0
    roomy = Choice("search", "search", budget=10 * full, patch=[32, 32, 32], batch=1, amp=True, peak=full)
    tight = Choice("search", "search", budget=full, patch=[32, 32, 32], batch=1, amp=True, peak=full)
    assert cache_plan(plan, 10, 1, [roomy]).gpu_cache == {"search": True}
    assert cache_plan(plan, 10, 1, [tight]).gpu_cache == {"search": False}
    assert overlay(roomy, cache_plan(plan, 10, 1, [roomy]))["data"] == {
        "patch_size": [32, 32, 32], "batch_size": 1, "cache_rate": 1.0, "gpu_cache": True}


def _fit(work, out, *extra):
    return ["fit", "--work", str(work), "--config", "demo", *[a for o in TINY for a in ("--set", o)],
            "--ram-gb", "8", "--out", str(out), *extra]


def test_cli_writes_overlays_and_prints_json(search_work, tmp_path, capsys):
    arch = tmp_path / "arch.json"
    tiny_arch().save(arch)
    assert main(_fit(search_work, tmp_path, "--gpu-gb", "16", "--arch", str(arch), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    (gpu,) = result["gpus"]
    folder = tmp_path / "fit-16gb"
    assert gpu["folder"] == str(folder) and gpu["overlays"] == [
        "search.yaml", "train-dints-cvpr.yaml", "train-dynunet.yaml", "train-searched.yaml", "train-segresnet.yaml"]
    assert [c["candidate"] for c in gpu["choices"]] == ["search", "searched", "dints-cvpr", "segresnet", "dynunet"]
    assert "--arch RUN/arch.json" in (folder / "train-searched.yaml").read_text() and not result["notes"]
    assert json.loads((folder / "fit.json").read_text())["rules"]["safety"] == 0.9
    for choice in gpu["choices"]:
        assert choice["fits"] and choice["predicted_peak_bytes"] <= 0.9 * 16 * GiB
    search = yaml.safe_load((folder / "search.yaml").read_text())
    assert search["data"]["patch_size"] == gpu["choices"][0]["patch_size"]
    assert set(search) == {"data", "search"} and set(search["search"]) == {"amp", "checkpoint_cells",
                                                                           "checkpoint_fraction"}
    assert (folder / "search.yaml").read_text().startswith("# dints3d fit: the search on a GPU of 16 GB")


def test_cli_table_lists_every_size(search_work, tmp_path, capsys):
    assert main(_fit(search_work, tmp_path, "--table")) == 0
    text = capsys.readouterr().out
    for gb in (16, 24, 40, 80):
        assert f"\n{gb} GB  search" in text and (tmp_path / f"fit-{gb}gb" / "search.yaml").is_file()
    assert "searched: after the search, run fit again with --arch" in text


@pytest.mark.parametrize("option, value, message", [("--gpu-gb", "0", "must be positive"),
                                                    ("--max-batch", "0", "must be at least 1"),
                                                    ("--safety", "1.5", "must be in (0, 1]")])
def test_cli_refuses_bad_values_in_one_line(search_work, tmp_path, capsys, option, value, message):
    extra = ["--gpu-gb", "16"] if option != "--gpu-gb" else []
    assert main(_fit(search_work, tmp_path, *extra, option, value)) == 2
    assert message in capsys.readouterr().err


def test_search_and_export_accept_the_overlays(search_work, tiny_task, tmp_path):
    cfg, plan = tiny_task
    (search,) = [c for c in candidates(cfg, plan) if c.stage == "search"]
    patch = tuple(search.start_patch)
    without, halved = search.predict(patch, 1, Mode(True)), search.predict(patch, 1, Mode(True, 0.5))
    assert halved < without
    gpu_gb = (halved + without) / 2 / 0.9 / GiB  # a card on which the search needs half of its blocks checkpointed
    assert main(_fit(search_work, tmp_path, "--gpu-gb", repr(gpu_gb))) == 0
    folder = next(tmp_path.glob("fit-*gb"))
    chosen = yaml.safe_load((folder / "search.yaml").read_text())
    assert chosen["search"] == {"amp": True, "checkpoint_cells": True, "checkpoint_fraction": 0.5}

    run = tmp_path / "run"
    settings = [*TINY, "data.max_cases=2", "search.iterations=2", "search.val_interval=2",
                "search.checkpoint_interval=1", "search.val_overlap=0.0"]
    assert main(["search", "--config", "demo", "--work", str(search_work), "--out", str(run),
                 "--overlay", str(folder / "search.yaml"), *[a for o in settings for a in ("--set", o)],
                 "--stop-after", "1"]) == 0
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: used["data"][k] for k in chosen["data"]} == chosen["data"]
    assert {k: used["search"][k] for k in chosen["search"]} == chosen["search"]

    if not (folder / "train-segresnet.yaml").is_file():
        pytest.fail("segresnet does not fit that card")
    train = yaml.safe_load((folder / "train-segresnet.yaml").read_text())
    bundle = tmp_path / "bundle"
    assert main(["export", "--arch", "segresnet", "--work", str(search_work), "--out", str(bundle), "--config", "demo",
                 "--set", "train.channel_mul=0.25", "--overlay", str(folder / "train-segresnet.yaml")]) == 0
    values = parse(bundle, "train.yaml")
    assert values["patch_size"] == train["train"]["patch_size"] and values["batch_size"] == train["train"]["batch_size"]
    assert values["amp"] == train["train"]["amp"] and values["cache_rate"] == train["data"]["cache_rate"]
