"""End-to-end DiNTS search on a tiny synthetic task: outputs, exact resume, memory budget, AMP, non-finite steps."""

import json

import numpy as np
import pytest
import torch

from dints3d.checkpoint import load_checkpoint
from dints3d.cli import main
from dints3d.config import load_config
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.errors import DintsError
from dints3d.runtime import init_runtime
from dints3d.search.loop import SearchRun
from dints3d.spaces.base import load_architecture

TINY = [
    "device=cpu",
    "dints.num_blocks=2",
    "dints.num_depths=3",
    "dints.channel_mul=0.125",
    "data.patch_size=[32,32,32]",
    "data.num_samples=1",
    "data.max_cases=2",
    "search.iterations=6",
    "search.val_interval=3",
    "search.checkpoint_interval=2",
    "search.val_overlap=0.0",
    "search.amp=false",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    task = make_msd_task(root / "task", cases=6, test_cases=1, size=36, seed=3)
    prepare(task, root / "work", folds=3, progress=False)
    return root / "work"


def _run(work, out, overrides=(), stop_after=None, resume=False):
    cfg = load_config(None, [*TINY, *overrides])
    run = SearchRun(cfg, work, out, init_runtime(cfg.device), resume=resume)
    try:
        return run, run.run(stop_after=stop_after)
    finally:
        run.close()


def test_search_cli_writes_every_output(work, tmp_path):
    out = tmp_path / "run"
    args = ["search", "--work", str(work), "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    assert main(args) == 0
    arch = json.loads((out / "arch.json").read_text())
    assert arch["space"] == "dints" and arch["version"] == 1
    assert np.array(arch["node_a"]).shape == (3, 3) and np.array(arch["arch_code_a"]).shape == (2, 7)
    prov = arch["provenance"]
    assert prov["iteration"] == 6 and prov["seed"] == 0 and len(prov["validation_dice"]) == 2
    assert 0 < prov["estimated_memory_ratio"] <= 1.5
    assert sorted(p.name for p in (out / "arch_history").iterdir()) == ["arch_0000003.json", "arch_0000006.json"]
    assert (out / "arch.png").stat().st_size > 5000
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "best.pt").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["loop"]["iteration"] == 6

    net = load_architecture(out / "arch.json").build(in_channels=1, out_channels=3, channel_mul=0.25)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_resumed_search_equals_uninterrupted(work, tmp_path):
    _, whole = _run(work, tmp_path / "whole")
    _, partial = _run(work, tmp_path / "split", stop_after=4)
    assert partial is None
    _, resumed = _run(work, tmp_path / "split", resume=True)
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    for key in ("node_a", "arch_code_a", "arch_code_c"):
        assert a[key] == b[key]
    sa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for name in ("topology_space.log_alpha_a", "topology_space.log_alpha_c"):
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0)
    assert a["provenance"]["validation_dice"] == b["provenance"]["validation_dice"]


def test_fresh_search_refuses_existing_run_and_resume_needs_one(work, tmp_path):
    _run(work, tmp_path / "r", stop_after=2)
    with pytest.raises(DintsError, match="--resume"):
        _run(work, tmp_path / "r")
    with pytest.raises(DintsError, match="no checkpoint"):
        _run(work, tmp_path / "empty", resume=True)
    with pytest.raises(DintsError, match="different config"):
        _run(work, tmp_path / "r", overrides=["search.lr=0.5"], resume=True)


def test_memory_budget_sigma_orders_decoded_memory(work, tmp_path):
    """With architecture updates dominating, σ = 0.2 decodes to a cheaper network than σ = 0.8."""
    common = ["search.warmup_fraction=0", "search.arch_lr=0.2", "search.lr=0.0", "search.iterations=12",
              "search.val_interval=100", "search.memory_weight=20", "search.entropy_weight=0"]
    ratios = {}
    for sigma in (0.2, 0.8):
        run, path = _run(work, tmp_path / f"s{sigma}", [*common, f"search.ram_cost_factor={sigma}"])
        ratios[sigma] = json.loads(path.read_text())["provenance"]["estimated_memory_ratio"]
    assert ratios[0.2] < ratios[0.8] - 0.15, ratios


def test_bf16_autocast_search_step_runs_on_cpu(work, tmp_path):
    run, path = _run(work, tmp_path / "amp", ["search.amp=true", "search.iterations=2", "search.val_interval=2",
                                              "search.warmup_fraction=0.5"])
    assert path is not None and run.state.nonfinite_total == 0


def test_nonfinite_loss_skips_step_without_touching_parameters(work, tmp_path):
    cfg = load_config(None, [*TINY, "search.warmup_fraction=0", "search.max_nonfinite_steps=2"])
    run = SearchRun(cfg, work, tmp_path / "nan", init_runtime("cpu"))
    try:
        image = torch.randn(1, 1, 32, 32, 32)
        image[0, 0, 0, 0, 0] = float("nan")
        label = torch.zeros(1, 1, 32, 32, 32)
        before = {k: v.clone() for k, v in run.space.state_dict().items()}
        assert run.weight_step(image, label, lr=0.1) is None
        assert run.state.nonfinite_total == 1
        with pytest.raises(DintsError, match="consecutive non-finite"):
            run.arch_step(image, label, ramp=1.0)
        after = run.space.state_dict()
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
        assert (tmp_path / "nan" / "checkpoints" / "last.pt").exists()
    finally:
        run.close()


def test_patch_size_must_fit_the_space(work, tmp_path):
    with pytest.raises(DintsError, match="multiple of 16"):
        _run(work, tmp_path / "bad", ["data.patch_size=[30,32,32]"])


def test_resume_auto_continues_only_when_a_checkpoint_exists(tmp_path):
    from dints3d.search.run import wants_resume

    assert not wants_resume("auto", tmp_path) and not wants_resume(None, tmp_path) and wants_resume("yes", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.prev.pt").write_bytes(b"")
    assert wants_resume("auto", tmp_path) and not wants_resume(None, tmp_path)
