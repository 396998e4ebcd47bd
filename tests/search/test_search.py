"""End-to-end DiNTS search on a tiny synthetic task: outputs, exact resume, memory budget, AMP, non-finite steps."""

import json
import random

import numpy as np
import pytest
import torch

from dints3d.cli import main
from dints3d.config import config_path, config_to_dict, load_config
from dints3d.search.loop import SearchRun
from dints3d.search.resume import check_resumable_config
from dints3d.spaces.factory import load_architecture
from dints3d.utils.checkpoint import load_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.runtime import init_runtime


def _run(tiny, work, out, overrides=(), stop_after=None, resume=False):
    cfg = load_config(None, [*tiny.search, *overrides])
    run = SearchRun(cfg, work, out, init_runtime(cfg.device), resume=resume)
    try:
        return run, run.run(stop_after=stop_after)
    finally:
        run.close()


def test_search_cli_writes_every_output(search_work, tiny, tmp_path):
    out = tmp_path / "run"
    args = ["search", "--work", str(search_work), "--out", str(out)]
    for o in tiny.search:
        args += ["--set", o]
    assert main(args) == 0
    arch = json.loads((out / "arch.json").read_text())
    assert arch["space"] == "dints" and arch["version"] == 1
    assert np.array(arch["node_a"]).shape == (3, 3) and np.array(arch["arch_code_a"]).shape == (2, 7)
    prov = arch["provenance"]
    assert prov["iteration"] == 6 and prov["seed"] == 0 and len(prov["validation_dice"]) == 2
    assert 0 < prov["estimated_memory_ratio"] <= 1.5
    assert sorted(p.name for p in (out / "arch_history").iterdir()) == ["arch_0000003.json", "arch_0000006.json"]
    # the decoder's unconstrained per-layer argmax and whether it was connected, in arch.json and every snapshot
    for doc in [arch, *(json.loads(p.read_text()) for p in (out / "arch_history").iterdir())]:
        decode = doc["provenance"]["decode"]
        assert np.isin(decode["argmax_arch_code_a"], [0, 1]).all()
        assert np.array(decode["argmax_arch_code_a"]).shape == (2, 7)
        assert isinstance(decode["argmax_connected"], bool)
        if decode["argmax_connected"] and decode["argmax_arch_code_a"] == doc["arch_code_a"]:
            assert decode["active_paths"] == int(np.sum(doc["arch_code_a"]))
    assert (out / "arch.png").stat().st_size > 5000
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "best.pt").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["loop"]["iteration"] == 6

    net = load_architecture(out / "arch.json").build(in_channels=1, out_channels=3, channel_mul=0.25)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    # the summary names the depths the decoded DiNTS network leaves unused (the same list the CLI warns about)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unused_depths"] == load_architecture(out / "arch.json").unused_depths()


def test_resumed_search_equals_uninterrupted(search_work, tiny, tmp_path):
    _, whole = _run(tiny, search_work, tmp_path / "whole")
    _, partial = _run(tiny, search_work, tmp_path / "split", stop_after=4)
    assert partial is None
    _, resumed = _run(tiny, search_work, tmp_path / "split", resume=True)
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    for key in ("node_a", "arch_code_a", "arch_code_c"):
        assert a[key] == b[key]
    sa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for name in ("topology_space.log_alpha_a", "topology_space.log_alpha_c"):
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0)
    assert a["provenance"]["validation_dice"] == b["provenance"]["validation_dice"]

    # one SearchRun whose run() is called twice continues its streams too (bench/distributed.py does this)
    cfg = load_config(None, tiny.search)
    twice = SearchRun(cfg, search_work, tmp_path / "twice", init_runtime("cpu"))
    try:
        assert twice.run(stop_after=3) is None
        c = json.loads(twice.run().read_text())
    finally:
        twice.close()
    assert [c[k] for k in ("node_a", "arch_code_a", "arch_code_c")] == [a[k] for k in ("node_a", "arch_code_a",
                                                                                       "arch_code_c")]
    sc = load_checkpoint(tmp_path / "twice" / "checkpoints" / "last.pt")["model"]
    for name in sa:
        torch.testing.assert_close(sc[name], sa[name], rtol=0, atol=0)


def test_fresh_search_refuses_existing_run_and_resume_needs_one(search_work, tiny, tmp_path):
    _run(tiny, search_work, tmp_path / "r", stop_after=2)
    with pytest.raises(DintsError, match="--resume"):
        _run(tiny, search_work, tmp_path / "r")
    with pytest.raises(DintsError, match="no checkpoint"):
        _run(tiny, search_work, tmp_path / "empty", resume=True)
    with pytest.raises(DintsError, match=r"different config \(search.momentum: 0.9 then, 0.5 now\).*only search.lr"):
        _run(tiny, search_work, tmp_path / "r", overrides=["search.momentum=0.5"], resume=True)
    with pytest.raises(DintsError, match="holds 2 completed iterations, more than search.iterations=1"):
        _run(tiny, search_work, tmp_path / "r", overrides=["search.iterations=1"], resume=True)


def test_resume_may_change_the_documented_settings_with_a_warning(search_work, tiny, tmp_path):
    _run(tiny, search_work, tmp_path / "r", ["search.warmup_fraction=0"], stop_after=2)
    with pytest.warns(UserWarning, match=r"search.arch_lr 0.001 → 0.0005, search.iterations 6 → 4, search.lr "):
        run, path = _run(tiny, search_work, tmp_path / "r", ["search.warmup_fraction=0", "search.lr=0.01",
                                                             "search.arch_lr=0.0005", "search.iterations=4"],
                         resume=True)
    assert path is not None and run.state.iteration == 4
    assert [o.param_groups[0]["lr"] for o in run.architect.opt_arch.values()] == [0.0005, 0.0005]  # not the saved 0.001
    assert run.architect.base_lr == 0.01


def test_resume_may_turn_on_checkpointing_as_the_out_of_memory_report_advises(search_work, tiny, tmp_path):
    _run(tiny, search_work, tmp_path / "r", ["search.warmup_fraction=0"], stop_after=2)
    with pytest.warns(UserWarning, match=r"search.checkpoint_cells False → True"):
        run, path = _run(tiny, search_work, tmp_path / "r", ["search.warmup_fraction=0",
                                                             "search.checkpoint_cells=true",
                                                             "search.cpu_conv_routing=false"], resume=True)
    assert path is not None and run.space.topology_space.checkpoint_cells


def test_memory_budget_sigma_orders_decoded_memory(search_work, tiny, tmp_path):
    """With architecture updates dominating, σ = 0.2 decodes to a cheaper network than σ = 0.8."""
    common = ["search.warmup_fraction=0", "search.arch_lr=0.2", "search.lr=0.0", "search.iterations=12",
              "search.val_interval=100", "search.memory_weight=20", "search.entropy_weight=0"]
    ratios = {}
    for sigma in (0.2, 0.8):
        run, path = _run(tiny, search_work, tmp_path / f"s{sigma}", [*common, f"search.ram_cost_factor={sigma}"])
        ratios[sigma] = json.loads(path.read_text())["provenance"]["estimated_memory_ratio"]
    assert ratios[0.2] < ratios[0.8] - 0.15, ratios


def test_bf16_autocast_search_step_runs_on_cpu(search_work, tiny, tmp_path):
    cfg = load_config(None, [*tiny.search, "search.amp=true", "search.iterations=2", "search.val_interval=2",
                             "search.warmup_fraction=0.5"])
    run = SearchRun(cfg, search_work, tmp_path / "amp", init_runtime("cpu"))
    seen = []
    convs = [m for m in run.space.modules() if isinstance(m, torch.nn.Conv3d)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in convs]
    try:
        assert not run.architect.scaler_w.is_enabled() and not run.architect.scaler_a.is_enabled()  # bf16 needs no loss scaling
        assert run.run() is not None and run.state.nonfinite_total == 0
    finally:
        for h in hooks:
            h.remove()
        run.close()
    assert seen and set(seen) == {torch.bfloat16}  # every convolution of both steps and validation ran in bf16
    for p in run.space.parameters():
        assert p.dtype == torch.float32  # master weights stay fp32


def test_amp_policy_fp16_with_grad_scaler_on_cuda_bf16_without_on_cpu():
    from dints3d.utils.runtime import Runtime, amp_policy

    assert amp_policy("cuda", True) == (torch.float16, True)
    assert amp_policy("cpu", True) == (torch.bfloat16, False)
    assert amp_policy("cuda", False) == (None, False) and amp_policy("cpu", False) == (None, False)
    cpu = Runtime(device=torch.device("cpu"))
    assert not cpu.grad_scaler(True).is_enabled()
    with cpu.autocast(True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with cpu.autocast(False):
        assert not torch.is_autocast_enabled("cpu")


def _inf_from(run, iteration, where="loss"):
    """Make the weight loss (``where="loss"``) or the architecture loss (``"arch"``) +Inf from ``iteration`` on."""
    if where == "loss":
        real = run.architect.loss_fn

        def loss_fn(out, label):
            loss = real(out, label)
            return loss * float("inf") if run.state.iteration >= iteration else loss

        run.architect.loss_fn = loss_fn
    else:
        real = run.space.regularizers

        def regularizers(shape):
            terms = real(shape)
            if run.state.iteration >= iteration:
                terms["memory"] = terms["memory"] * float("inf")
            return terms

        run.space.regularizers = regularizers


def test_nonfinite_loss_skips_step_without_touching_parameters(search_work, tiny, tmp_path):
    cfg = load_config(None, [*tiny.search, "search.warmup_fraction=0", "search.max_nonfinite_steps=3"])
    run = SearchRun(cfg, search_work, tmp_path / "nan", init_runtime("cpu"))
    try:
        image = torch.randn(1, 1, 32, 32, 32)
        image[0, 0, 0, 0, 0] = float("nan")
        label = torch.zeros(1, 1, 32, 32, 32)
        before = {k: v.clone() for k, v in run.space.state_dict().items()}
        momentum = {k: v.clone() for k, v in run.architect.opt_w.state_dict()["state"].items()}
        assert run.weight_step(image, label, lr=0.1) is None
        assert run.arch_step(image, label, ramp=1.0) is None
        assert run.state.nonfinite_total == 2 and run.state.nonfinite_streak == {"weight": 1, "architecture": 1}
        after = run.space.state_dict()
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0)
        assert run.architect.opt_w.state_dict()["state"] == momentum
    finally:
        run.close()


def test_inf_loss_stops_with_a_consistent_checkpoint_and_a_lower_lr_resume_finishes(search_work, tiny, tmp_path):
    """Inf weight losses from iteration 2 on: 2 in a row stop the run after iteration 3 is complete; the checkpoint
    holds the weights of iteration 2 (the skipped steps changed nothing) and counts both batches as read, and a
    resume with the advised lower learning rate continues and finishes."""
    out = tmp_path / "inf"
    overrides = ["search.max_nonfinite_steps=2"]
    run, _ = _run(tiny, search_work, out, overrides, stop_after=2)
    weights_at_2 = {k: v for k, v in load_checkpoint(out / "checkpoints" / "last.pt")["model"].items()
                    if "log_alpha" not in k}
    cfg = load_config(None, [*tiny.search, *overrides])
    run = SearchRun(cfg, search_work, out, init_runtime("cpu"), resume=True)
    _inf_from(run, 2, "loss")
    try:
        with pytest.raises(DintsError, match=r"2 consecutive non-finite weight losses up to iteration 3.*"
                                             r"--resume.*search.lr=<lower>"):
            run.run()
    finally:
        run.close()
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["loop"]["iteration"] == 4 and saved["loop"]["stopped_nonfinite"]
    # iterations 2 and 3 skipped their weight steps, and iteration 3 (after warm-up) its architecture step too
    assert saved["loop"]["consumed"] == {"weights": 4, "arch": 1} and saved["loop"]["nonfinite_total"] == 3
    for name, value in weights_at_2.items():
        torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=0)

    with pytest.warns(UserWarning, match="search.lr 0.025 → 0.005"):
        run, path = _run(tiny, search_work, out, [*overrides, "search.lr=0.005"], resume=True)
    assert path is not None and run.state.iteration == 6 and run.state.nonfinite_total == 3
    assert json.loads(path.read_text())["provenance"]["iteration"] == 6


def test_nonfinite_architecture_stop_does_not_repeat_the_weight_update(search_work, tiny, tmp_path):
    """The weight step of the stopping iteration was applied: the checkpoint counts that iteration as done, so a
    resume starts with the next one instead of applying a second update for the same iteration."""
    out = tmp_path / "arch_inf"
    cfg = load_config(None, [*tiny.search, "search.warmup_fraction=0", "search.max_nonfinite_steps=2"])
    run = SearchRun(cfg, search_work, out, init_runtime("cpu"))
    _inf_from(run, 1, "arch")
    try:
        with pytest.raises(DintsError, match="2 consecutive non-finite architecture losses up to iteration 2"):
            run.run()
        live = {k: v.clone() for k, v in run.space.state_dict().items()}
    finally:
        run.close()
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["loop"]["iteration"] == 3
    assert saved["loop"]["consumed"] == {"weights": 3, "arch": 3}
    for name, value in live.items():  # the checkpoint is the state after iteration 2's weight update
        torch.testing.assert_close(saved["model"][name], value, rtol=0, atol=0)
    run, path = _run(tiny, search_work, out, ["search.warmup_fraction=0", "search.max_nonfinite_steps=2"], resume=True)
    assert path is not None and run.state.iteration == 6


def test_resume_restores_python_numpy_and_torch_generators(search_work, tiny, tmp_path):
    out = tmp_path / "rng"
    _run(tiny, search_work, out, stop_after=2)
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(saved["rng"]) >= {"python", "numpy", "torch"}
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    cfg = load_config(None, tiny.search)
    run = SearchRun(cfg, search_work, out, init_runtime("cpu"), resume=True)
    run.close()
    assert list(random.getstate()[1]) == saved["rng"]["python"]["state"].tolist()
    numpy_state = np.random.get_state(legacy=False)
    assert numpy_state["state"]["key"].tolist() == saved["rng"]["numpy"]["key"].tolist()
    assert numpy_state["state"]["pos"] == saved["rng"]["numpy"]["pos"]
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])

    from dints3d.utils.checkpoint import save_checkpoint

    saved["rng"]["numpy"]["key"] = saved["rng"]["numpy"]["key"][:10]
    save_checkpoint(out / "checkpoints" / "last.pt", saved)
    with pytest.raises(DintsError, match=r"last.pt: holds an unusable random generator state"):
        SearchRun(cfg, search_work, out, init_runtime("cpu"), resume=True)


def test_patch_size_must_fit_the_space(search_work, tiny, tmp_path):
    with pytest.raises(DintsError, match="multiple of 16"):
        _run(tiny, search_work, tmp_path / "bad", ["data.patch_size=[30,32,32]"])


def test_resume_auto_continues_only_when_a_checkpoint_exists(tmp_path):
    from dints3d.search.run import wants_resume

    assert not wants_resume("auto", tmp_path) and not wants_resume(None, tmp_path) and wants_resume("yes", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.prev.pt").write_bytes(b"")
    assert wants_resume("auto", tmp_path) and not wants_resume(None, tmp_path)


def test_a_search_saved_before_the_network_options_resumes_only_as_it_ran(tmp_path):
    """A checkpoint whose config has no dints.stem_skip / anisotropic_stem ran the paper's network: resuming it under
    today's defaults (both on) is refused with the key named; with both set to false it resumes."""
    old = config_to_dict(load_config(config_path("demo")))
    for key in ("stem_skip", "anisotropic_stem"):
        del old["dints"][key]
    saved = {"config": old, "loop": {"iteration": 1}}
    with pytest.raises(DintsError, match=r"dints.anisotropic_stem: False then, True now"):
        check_resumable_config(saved, load_config(config_path("demo")), tmp_path / "last.pt")
    as_it_ran = load_config(config_path("demo"), ["dints.stem_skip=false", "dints.anisotropic_stem=false"])
    check_resumable_config(saved, as_it_ran, tmp_path / "last.pt")
