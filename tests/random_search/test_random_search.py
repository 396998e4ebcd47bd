"""The random search engine (sampling mix, trials.csv, resume, budgets, top-k) and the baseline samplers."""

import json
import math

import numpy as np
import pytest
import torch

from dints3d.cli import main
from dints3d.random_search.engine import Budget, Evaluation, RandomSearch
from dints3d.random_search.samplers import (
    AutoDeepLabSampler,
    DintsSampler,
    DpcSampler,
    MemoryLimit,
)
from dints3d.random_search.trials import read_rows
from dints3d.spaces.dpc.genotype import SEP_CONV, DpcCatalog
from dints3d.utils.errors import DintsError


class FakeEvaluator:
    """Scores a cell by its operations (no training); can stop the run at a given call, like a kill."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, arch, iterations, seed):
        self.calls.append((arch.key(), iterations))
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        rates = sum(sum(b.op.size) for b in arch.branches if b.op.kind == SEP_CONV)
        score = (rates % 17) / 17 + iterations / 1000
        return Evaluation(score, {"rates": rates}, {"w": torch.tensor([float(rates)])})


def _sampler():
    return DpcSampler(DpcCatalog.default(2), 3, 4)


def _budget(**kw):
    return Budget(**{"trials": 10, "hours": None, "explore_ratio": 0.5, "iterations": 5, "top_k": 3,
                     "topk_iterations": 50, "seed": 7, **kw})


def _summary(rows):
    return [(r.trial, r.kind, r.parent, r.key, r.score) for r in rows]


def test_interrupted_search_resumes_without_redoing_trials(tmp_path):
    whole = FakeEvaluator()
    RandomSearch(tmp_path / "whole", _sampler(), whole, _budget()).run()
    expected = read_rows(tmp_path / "whole" / "trials.csv")

    first = FakeEvaluator(stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        RandomSearch(tmp_path / "split", _sampler(), first, _budget()).run()
    assert len(read_rows(tmp_path / "split" / "trials.csv")) == 4  # finished trials were written as they finished
    with pytest.raises(DintsError, match="--resume"):
        RandomSearch(tmp_path / "split", _sampler(), FakeEvaluator(), _budget())
    second = FakeEvaluator()
    RandomSearch(tmp_path / "split", _sampler(), second, _budget(), resume=True).run()
    assert len(second.calls) == 10 - 4 + 3  # the remaining trials and the top-k, nothing redone
    assert _summary(read_rows(tmp_path / "split" / "trials.csv")) == _summary(expected)
    assert json.loads((tmp_path / "split" / "arch.json").read_text()) == \
        json.loads((tmp_path / "whole" / "arch.json").read_text())


def test_resume_with_other_settings_or_nothing_to_resume_is_refused(tmp_path):
    RandomSearch(tmp_path / "a", _sampler(), FakeEvaluator(), _budget(trials=2, top_k=0)).run()
    with pytest.raises(DintsError, match="'iterations' differs"):
        RandomSearch(tmp_path / "a", _sampler(), FakeEvaluator(), _budget(iterations=6), resume=True)
    with pytest.raises(DintsError, match="no random search to resume"):
        RandomSearch(tmp_path / "b", _sampler(), FakeEvaluator(), _budget(), resume=True)
    more = FakeEvaluator()  # a larger budget is fine
    RandomSearch(tmp_path / "a", _sampler(), more, _budget(trials=4, top_k=0), resume=True).run()
    assert len(more.calls) == 2 and len(read_rows(tmp_path / "a" / "trials.csv")) == 4
    (tmp_path / "a" / "random_search.json").write_text("[1, 2]")  # valid JSON, not the settings object
    with pytest.raises(DintsError, match="random_search.json: is not a settings object"):
        RandomSearch(tmp_path / "a", _sampler(), FakeEvaluator(), _budget(trials=4, top_k=0), resume=True)


def test_partial_last_row_is_dropped(tmp_path):
    RandomSearch(tmp_path, _sampler(), FakeEvaluator(), _budget(trials=3, top_k=0)).run()
    path = tmp_path / "trials.csv"
    complete = path.read_text()
    path.write_text(complete + '3,uniform,,0.5,1.0,"b:1×1 con')  # killed in the middle of a write
    rows = read_rows(path)
    assert [r.trial for r in rows] == [0, 1, 2]
    assert path.read_text() == complete


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_explore_ratio_mixes_uniform_and_perturbed_samples(tmp_path, ratio):
    RandomSearch(tmp_path, _sampler(), FakeEvaluator(), _budget(explore_ratio=ratio, top_k=0)).run()
    rows = read_rows(tmp_path / "trials.csv")
    assert rows[0].kind == "uniform"
    if ratio == 1.0:
        assert all(r.kind == "uniform" and r.parent is None for r in rows)
    else:
        for r in rows[1:]:
            best = max(rows[: r.trial], key=lambda q: (q.score, -q.trial))
            assert r.kind == "perturb" and r.parent == best.trial  # always near the best so far
            parent = json.loads(json.dumps(rows[r.parent].arch))["branches"]
            assert sum(a != b for a, b in zip(parent, r.arch["branches"])) == 1


def test_hours_budget_stops_starting_trials(tmp_path):
    RandomSearch(tmp_path, _sampler(), FakeEvaluator(), _budget(hours=1e-12, top_k=1)).run()
    assert len(read_rows(tmp_path / "trials.csv")) == 1


def test_top_k_reevaluated_with_the_longer_schedule(tmp_path):
    evaluator = FakeEvaluator()
    RandomSearch(tmp_path, _sampler(), evaluator, _budget()).run()
    rows = read_rows(tmp_path / "trials.csv")
    top = read_rows(tmp_path / "topk.csv")
    best_short = sorted(rows, key=lambda r: (-r.score, r.trial))[:3]
    assert [r.trial for r in top] == [r.trial for r in best_short]
    assert [it for _, it in evaluator.calls] == [5] * 10 + [50] * 3
    winner = max(top, key=lambda r: (r.score, -r.trial))
    arch = json.loads((tmp_path / "arch.json").read_text())
    assert arch["space"] == "dpc" and arch["provenance"]["trial"] == winner.trial
    assert math.isclose(arch["provenance"]["long_score"], winner.score)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["w"].item() == winner.metrics["rates"]
    assert (tmp_path / "trials.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "arch.png").exists()
    table = (tmp_path / "topk.md").read_text().splitlines()
    assert len(table) == 2 + 3 and f"| 1 | {best_short[0].trial} |" in table[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials"] == 10 and summary["best_trial"] == winner.trial


def _ratio(arch):
    return arch.arch_code_a.mean()


def test_dints_sampler_respects_the_memory_limit_and_stays_connected():
    limit = MemoryLimit(_ratio, 0.5, "fraction of active paths")
    sampler = DintsSampler(4, 3, 3, True, limit)
    rng = np.random.default_rng(0)
    archs = [sampler.uniform(rng) for _ in range(30)]
    assert all(_ratio(a) <= 0.5 for a in archs)
    assert len({sampler.key(a) for a in archs}) == 30
    for arch in archs[:15]:
        near = sampler.perturb(arch, rng)
        near.check()  # connected
        assert _ratio(near) <= 0.5
        diff = (near.arch_code_a != arch.arch_code_a) | (near.arch_code_c != arch.arch_code_c)
        assert diff.sum() == 1
    with pytest.raises(DintsError, match="no random DiNTS architecture"):
        DintsSampler(4, 3, 3, True, MemoryLimit(_ratio, 0.0, "fraction")).uniform(rng)


def test_autodeeplab_sampler_draws_valid_networks():
    sampler = AutoDeepLabSampler(num_layers=8, num_blocks=3, filter_multiplier=4, spatial_dims=2)
    rng = np.random.default_rng(1)
    archs = [sampler.uniform(rng) for _ in range(40)]
    for arch in archs:
        arch.check()  # a trellis path and a cell without zero operations
        assert arch.network_path[0] in (0, 1) and arch.num_blocks == 3 and "zero" not in {op for _, op in arch.cell}
    assert {level for a in archs for level in a.network_path} == {0, 1, 2, 3}
    assert len({sampler.key(a) for a in archs}) == 40
    for arch in archs[:15]:
        near = sampler.perturb(arch, rng)
        near.check()
        changes = sum(x != y for x, y in zip(arch.network_path, near.network_path)) + \
            sum(x != y for x, y in zip(arch.cell, near.cell))
        assert changes == 1
    with torch.no_grad():
        assert archs[0].build(3, 5).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_dints_random_search_cli(search_work, tmp_path):
    out = tmp_path / "run"
    args = ["random-search", "--space", "dints", "--work", str(search_work), "--out", str(out), "--config", "demo"]
    for o in ["dints.num_blocks=2", "dints.num_depths=2", "dints.channel_mul=0.125", "train.channel_mul=0.125",
              "data.patch_size=[16,16,16]", "data.num_samples=1", "data.augment=false", "search.val_overlap=0",
              "search.ram_cost_factor=0.6", "random_search.trials=3", "random_search.iterations=2",
              "random_search.top_k=1", "random_search.topk_iterations=3"]:
        args += ["--set", o]
    assert main(args) == 0
    rows = read_rows(out / "trials.csv")
    assert len(rows) == 3 and all(0 <= r.metrics["memory"] <= 0.6 for r in rows)
    assert all(0 <= r.score <= 1 and r.metrics["parameters"] > 0 for r in rows)
    arch = json.loads((out / "arch.json").read_text())
    assert arch["space"] == "dints" and arch["provenance"]["search"] == "random"
    assert (out / "trials.png").exists() and len(read_rows(out / "topk.csv")) == 1


def test_class_scores_from_a_confusion_matrix():
    from dints3d.evaluation.confusion import confusion_matrix
    from dints3d.random_search.train import class_scores

    label = torch.tensor([0, 0, 1, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 2])
    scores = class_scores(confusion_matrix(pred, label, 4), "dice")
    # class 0: tp 1, fp 2, fn 1 → IoU 1/4; class 1: tp 2, fp 1, fn 1 → Dice 4/6, IoU 2/4; class 2: tp 0 → 0;
    # class 3 is absent from the truth → NaN, skipped by the means; the 255 pixel is not counted
    assert scores["dice"][:2] == pytest.approx([4 / 6, 0.0]) and math.isnan(scores["dice"][2])
    assert scores["iou"][:3] == pytest.approx([1 / 4, 2 / 4, 0.0]) and math.isnan(scores["iou"][3])
    assert scores["score"] == pytest.approx((4 / 6 + 0.0) / 2) == scores["mean_dice"]
    assert class_scores(confusion_matrix(pred, label, 4), "iou")["score"] == pytest.approx((1 / 4 + 0.5) / 3)


# ------------------------------------------------------------------------------------------- short training runs
def _schedule(amp=False, lr=0.5):
    from dints3d.random_search.train import Schedule

    return Schedule(lr=lr, momentum=0.9, weight_decay=0.0, decay_points=(0.5,), amp=amp)


def _toy_task(dtype=torch.float32):
    """Labels a 1×1 convolution can learn: class 1 where channel 0 is positive. Features ``N 2 8 8``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 8, 8, generator=gen)
    return x.to(dtype), (x[:, :1] > 0).to(torch.uint8)


def _ce(logits, label):
    return torch.nn.functional.cross_entropy(logits, label[:, 0].long())


def _poisoned(loss_fn, bad_calls):
    calls = []

    def loss(logits, label):
        calls.append(None)
        return loss_fn(logits, label) * (float("nan") if len(calls) in bad_calls else 1.0)

    return loss


def _head():
    torch.manual_seed(0)
    return torch.nn.Conv2d(2, 2, 1)


def test_a_trial_trains_on_float16_features_and_skips_non_finite_steps():
    from dints3d.random_search.train import cycling_batches, train_steps
    from dints3d.utils.runtime import Runtime

    x, y = _toy_task(torch.float16)  # as cached: float16 features, converted on the device
    batches = cycling_batches(x, y, 4, seed=0)
    assert next(batches)[0].dtype == torch.float16
    rt, head = Runtime(device=torch.device("cpu")), _head()
    before = _ce(head(x.float()), y).item()
    log = train_steps(head, cycling_batches(x, y, 4, seed=0), 30, _schedule(), rt, _ce)
    after = _ce(head(x.float()), y).item()
    assert after < 0.5 * before and log["nonfinite_steps"] == 0 and log["train_loss"] < before

    head = _head()
    log = train_steps(head, cycling_batches(x, y, 4, seed=0), 1, _schedule(), rt, _poisoned(_ce, {1}))
    assert torch.equal(head.weight, _head().weight)  # the non-finite step left the weights alone
    assert log["nonfinite_steps"] == 1 and math.isnan(log["train_loss"])
    log = train_steps(head, cycling_batches(x, y, 4, seed=0), 20, _schedule(), rt, _poisoned(_ce, {19}))
    assert log["nonfinite_steps"] == 1 and math.isfinite(log["train_loss"])  # the tail mean skips the bad step


def test_trial_loss_scaling_follows_the_amp_policy(monkeypatch):
    """fp16 on CUDA gets a GradScaler, whose own check refuses a non-finite step; CPU (bf16) gets none. Checked
    without a GPU: a policy that asks for scaling on the CPU gives torch's CPU GradScaler."""
    import dints3d.utils.runtime
    from dints3d.random_search.train import cycling_batches, train_steps
    from dints3d.utils.runtime import Runtime

    x, y = _toy_task()
    scalers = []
    rt = Runtime(device=torch.device("cpu"))
    real = rt.grad_scaler

    def recorded(amp):
        scalers.append((amp, real(amp)))
        return scalers[-1][1]

    rt.grad_scaler = recorded
    train_steps(_head(), cycling_batches(x, y, 4, seed=0), 2, _schedule(amp=True), rt, _ce)
    assert scalers[-1][0] is True and not scalers[-1][1].is_enabled()  # bf16 autocast on CPU: no scaling

    monkeypatch.setattr(dints3d.utils.runtime, "amp_policy", lambda device, enabled: (None, enabled))  # as on CUDA
    head = _head()
    log = train_steps(head, cycling_batches(x, y, 4, seed=0), 6, _schedule(amp=True), rt, _poisoned(_ce, {3}))
    amp, scaler = scalers[-1]
    assert amp is True and scaler.is_enabled()
    assert scaler.get_scale() == 2.0**16 * scaler.get_backoff_factor()  # the scaled steps ran; one was refused
    assert log["nonfinite_steps"] == 1
    assert _ce(head(x), y).item() < _ce(_head()(x), y).item()  # and the trial still trained

    train_steps(_head(), cycling_batches(x, y, 4, seed=0), 1, _schedule(amp=False), rt, _ce)
    assert scalers[-1][0] is False and not scalers[-1][1].is_enabled()


def test_cached_features_go_to_the_gpu_only_when_they_fit():
    from types import SimpleNamespace

    from dints3d.random_search.train import features_fit_on_device, place_features

    assert features_fit_on_device(1 << 30, 8 << 30) and not features_fit_on_device(3 << 30, 8 << 30)
    x, y = _toy_task(torch.float16)
    features = SimpleNamespace(train_x=x, train_y=y, val_x=x, val_y=y)
    place_features(features, torch.device("cpu"))
    assert features.train_x is x and features.val_y is y  # on the CPU nothing moves or is copied


# --------------------------------------------------------------------------------------- unreadable state files
def test_unreadable_top_k_weights_are_one_line_errors(tmp_path):
    from dints3d.random_search.engine import load_state

    RandomSearch(tmp_path / "a", _sampler(), FakeEvaluator(), _budget(trials=3, top_k=1)).run()
    winner = json.loads((tmp_path / "a" / "arch.json").read_text())["provenance"]["trial"]
    kept = tmp_path / "a" / "topk" / f"trial_{winner:04d}.pt"
    assert torch.load(kept, weights_only=True)["w"].shape == (1,)
    kept.write_bytes(b"not a zip file")
    search = RandomSearch(tmp_path / "a", _sampler(), FakeEvaluator(), _budget(trials=3, top_k=1), resume=True)
    with pytest.raises(DintsError, match=r"trial_\d{4}\.pt: cannot be read as the trial's trained weights .*topk\.csv"):
        search.run()
    torch.save([1, 2], kept)
    with pytest.raises(DintsError, match="holds a list, not"):
        load_state(kept, "weights")
    with pytest.raises(DintsError, match="weights: file not found"):
        load_state(tmp_path / "missing.pt", "weights")


def test_network_sampler_measures_each_architecture_once():
    calls = []

    def ratio(arch):
        calls.append(arch)
        return _ratio(arch)

    sampler = DintsSampler(4, 3, 3, True, MemoryLimit(ratio, 0.5, "fraction of active paths"))
    arch = sampler.uniform(np.random.default_rng(0))
    drawn = len(calls)
    assert sampler.memory(arch) == _ratio(arch) and len(calls) == drawn  # the admitted value, not re-measured
    copy = sampler.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert sampler.memory(copy) == _ratio(arch) and len(calls) == drawn  # same key, same value
