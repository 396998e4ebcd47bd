"""memory_budget_gb: a budget in GB becomes σ, and a tighter budget never yields a larger predicted memory."""

import json

import pytest

from dints3d.config import load_config
from dints3d.cost.budget import sigma_for_budget
from dints3d.cost.memory import predict_training_memory
from dints3d.search.loop import SearchRun
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.runtime import init_runtime

PATCH = [32, 32, 32]


@pytest.fixture(scope="module")
def space():
    return DintsSearchSpace(1, 3, num_blocks=2, num_depths=3, channel_mul=0.125)


def _sigma(space, gb):
    return sigma_for_budget(gb, space, 1, 3, PATCH, batch=2, amp=False, train_channel_mul=0.25)


def test_sigma_grows_with_the_budget_and_is_capped(space):
    fit = _sigma(space, 100.0)
    assert fit["sigma"] == 1.0 and fit["slope_gb"] > 0
    budgets = [fit["intercept_gb"] + fit["slope_gb"] * r for r in (0.3, 0.5, 0.7, 0.9)]
    sigmas = [_sigma(space, b)["sigma"] for b in budgets]
    assert sigmas == sorted(sigmas)
    assert sigmas == pytest.approx([0.3, 0.5, 0.7, 0.9], abs=1e-6)  # the memory model is deterministic


def test_impossible_budget_is_refused_with_the_need(space):
    with pytest.raises(DintsError, match="too small: even sparse architectures are predicted to need"):
        _sigma(space, 1e-6)


def test_tighter_budget_decodes_to_no_more_predicted_memory(space, prepared_task, tiny, tmp_path):
    work = prepared_task(folds=3, cases=6, test_cases=1, size=36, seed=11).work  # the decoded network depends on it
    fit = _sigma(space, 100.0)
    common = [*tiny.dints, f"data.patch_size={PATCH}", "data.num_samples=1", "data.max_cases=1", "search.iterations=12",
              "search.val_interval=100", "search.val_overlap=0.0", "search.amp=false", "search.warmup_fraction=0",
              "search.arch_lr=0.2", "search.lr=0.0", "search.memory_weight=20", "search.entropy_weight=0",
              "train.batch_size=2", "train.amp=false", "train.channel_mul=0.25"]
    predicted = {}
    for name, ratio in (("tight", 0.25), ("loose", 0.85)):
        budget = fit["intercept_gb"] + fit["slope_gb"] * ratio
        cfg = load_config(None, [*common, f"search.memory_budget_gb={budget}"])
        run = SearchRun(cfg, work, tmp_path / name, init_runtime("cpu"))
        try:
            path = run.run()
        finally:
            run.close()
        assert json.loads((tmp_path / name / "budget.json").read_text())["sigma"] == pytest.approx(ratio, abs=1e-6)
        arch = load_architecture(path)
        assert arch.provenance["memory_budget"]["budget_gb"] == pytest.approx(budget)
        predicted[name] = predict_training_memory(lambda a=arch: a.build(1, 3, channel_mul=0.25), (1, *PATCH),
                                                  batch=2)["peak"]
    assert predicted["tight"] <= predicted["loose"], predicted
