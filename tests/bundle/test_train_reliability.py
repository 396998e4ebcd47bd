"""Faults during a bundle's training (configs/train.yaml): SIGKILL at three points then exact resume (through
`python -m monai.bundle run` and `dints3d train [--resume]`), corrupt checkpoints, NaN/Inf batches or losses, and CUDA
out-of-memory errors (the bundle's scripts/: checkpoints.py, reliability.py, memory.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from support import alive, children, wait_until

from dints3d.bundle import runner
from dints3d.bundle.export import relocate
from dints3d.bundle.handlers import (
    NonFiniteGuard,
    OutOfMemoryReport,
    ResumeFromNewest,
    newest_readable_checkpoint,
)
from dints3d.bundle.runner import override_args
from dints3d.bundle.train import train
from dints3d.cli import main
from dints3d.cost.memory import meta_network, predict_training_memory
from dints3d.spaces.factory import load_architecture
from dints3d.utils.lock import lock_folder

#: 3 epochs of 2 iterations: a checkpoint_epoch=N.pt and a validation after each
RUN = ["num_iterations=6", "epoch_length=2", "sw_overlap=0.25"]

# Runs `monai.bundle run` with a fault injected from outside the product code: the process SIGKILLs itself
#   write NAME K  -- half-way through the K-th torch.save whose target file name contains NAME
#   step K        -- at the start of training iteration K
# Arguments: POINT NAME K monai.bundle run ... (as `python -m monai.bundle run ...` after the fault).
KILLER = textwrap.dedent('''
    import io, os, runpy, signal, sys
    import torch
    point, what, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "write":
        real_save, seen = torch.save, [0]
        def save(obj, f, *a, **k):  # f: a path, or a file open on the temporary file of an atomic write
            if what in os.path.basename(str(getattr(f, "name", f))):
                seen[0] += 1
                if seen[0] == at:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *a, **k)
                    out = f if hasattr(f, "write") else open(f, "wb")
                    out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                    die()
            return real_save(obj, f, *a, **k)
        torch.save = save
    else:
        from monai.engines import SupervisedTrainer
        real_iteration = SupervisedTrainer._iteration
        def iteration(self, engine, batch):
            if engine.state.iteration == at:
                die()
            return real_iteration(self, engine, batch)
        SupervisedTrainer._iteration = iteration
    sys.argv = sys.argv[4:]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
''')


@pytest.fixture(scope="module")
def template(bundle) -> Path:
    """The module's bundle (conftest.py), never trained itself: each test trains a copy."""
    return bundle


def _copy(template: Path, dest: Path) -> Path:
    """A copy of the bundle, pointed at its task and WORK folders from its new place (as `dints3d select` does)."""
    shutil.copytree(template, dest)
    relocate(dest, template.parent / "work", template.parent / "task")
    return dest


def _train_args(bundle: Path, *extra: str) -> list[str]:
    return ["monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.yaml"), "--bundle_root",
            str(bundle), *override_args([*RUN, *extra])]


def _run(bundle: Path, fault: tuple[str, str, int] | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault is None:
        cmd = [sys.executable, "-m", *_train_args(bundle, *extra)]
    else:
        cmd = [sys.executable, "-c", KILLER, *map(str, fault), *_train_args(bundle, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_tensors(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_tensors(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def uninterrupted(template, tmp_path_factory) -> Path:
    bundle = _copy(template, tmp_path_factory.mktemp("whole") / "bundle")
    done = _run(bundle)
    assert done.returncode == 0, done.stderr[-3000:]
    return bundle / "models"


def _train_with_fault(monkeypatch, bundle: Path, fault: tuple[str, str, int], log: Path, resume) -> int:
    """`dints3d train` (the parent process: checks, resume mode) whose bundle run gets the KILLER's fault."""
    with monkeypatch.context() as patched:
        patched.setattr(runner, "launcher", lambda nproc: [sys.executable, "-c", KILLER, *map(str, fault)])
        return train(bundle, sets=RUN, log=log, resume=resume)


def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_weights(template, uninterrupted, tmp_path,
                                                                          monkeypatch, capfd):
    bundle = _copy(template, tmp_path / "bundle")
    models = bundle / "models"
    log = tmp_path / "train.log"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the uninterrupted run (inherited by `dints3d train`'s runs)

    # 1. `dints3d train`, half-way through writing epoch 2's checkpoint: the old files stay whole, the temporary file
    #    is left behind
    assert _train_with_fault(monkeypatch, bundle, ("write", "checkpoint_epoch=2.pt", 1), log, False) == -signal.SIGKILL
    assert not (models / "checkpoint_epoch=2.pt").exists() and list(models.glob(".checkpoint_epoch=2.pt.*.tmp"))
    assert _load(models / "checkpoint_epoch=1.pt")["trainer"]["iteration"] == 2
    assert main(["train", str(bundle)]) == 2  # a training is there: without --resume, refused in one line
    refused = capfd.readouterr().err
    assert "already holds a training (checkpoint_epoch=1.pt, model.pt); continue it with --resume" in refused

    # 2. plain `python -m monai.bundle run` (resumes from the newest checkpoint), in the middle of epoch 3
    #    (iteration 5), after epoch 2's checkpoint landed
    killed = _run(bundle, ("step", "-", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not list(models.glob(".*.tmp"))  # the resumed run removed the stale temporary file
    assert _load(models / "checkpoint_epoch=2.pt")["trainer"]["iteration"] == 4

    # 3. `dints3d train --resume`, half-way through validation's save of the best model (end of epoch 3): model.pt
    #    stays the previous best
    assert _train_with_fault(monkeypatch, bundle, ("write", "model.pt", 1), log, True) == -signal.SIGKILL
    assert list(models.glob(".model.pt.*.tmp")) and _load(models / "model.pt")

    capfd.readouterr()
    assert main(["train", str(bundle), "--resume", *[a for s in RUN for a in ("--set", s)]]) == 0
    out = capfd.readouterr()
    assert "--resume_mode same_settings" in out.out
    assert "resumed from" in out.out + out.err and "checkpoint_epoch=2.pt" in out.out + out.err
    final, reference = _load(models / "checkpoint_epoch=3.pt"), _load(uninterrupted / "checkpoint_epoch=3.pt")
    for key in ("model", "optimizer", "lr_scheduler", "trainer", "run_settings"):
        _assert_same_tensors(final[key], reference[key])
    _assert_same_tensors(_load(models / "model.pt"), _load(uninterrupted / "model.pt"))
    assert not list(models.glob(".*.tmp"))

    # a truncated newest checkpoint: the rerun warns, falls back to epoch 2 and reaches the same weights again
    (models / "checkpoint_epoch=3.pt").write_bytes((models / "checkpoint_epoch=3.pt").read_bytes()[:1000])
    again = _run(bundle)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint_epoch=3.pt is unreadable" in again.stderr and "previous checkpoint" in again.stderr
    _assert_same_tensors(_load(models / "checkpoint_epoch=3.pt")["model"], reference["model"])


def test_sigkill_of_dints3d_train_takes_its_bundle_run_along(template, tmp_path):
    """SIGKILL cannot be caught or forwarded: the `monai.bundle run` child asked the kernel to die with its parent, so
    no orphan trains on (writing model.pt, or racing a `train --resume` on the same models/), and the folder's lock,
    which the child inherited, is free again once both are gone."""
    bundle = _copy(template, tmp_path / "bundle")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "dints3d", "train", str(bundle), "--set", "num_iterations=1000",
                               "--set", "val_interval=500"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: children(parent.pid), 120, "the bundle run")
        (child,) = children(parent.pid)
        assert "monai.bundle" in Path(f"/proc/{child}/cmdline").read_text()
        wait_until(lambda: "libtorch" in Path(f"/proc/{child}/maps").read_text(), 120, "the bundle run to load torch")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not alive(child), 15, f"the orphaned bundle run {child} to die")
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
    lock_folder(bundle / "models").release()  # nobody holds models/ any more
    assert not (bundle / "models" / "model.pt").exists()


def test_garbled_checkpoints_stop_with_one_line_naming_the_file(tmp_path):
    for n in (1, 2):
        (tmp_path / f"checkpoint_epoch={n}.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint_epoch=x.pt").write_bytes(b"ignored: not a checkpoint name")
    with pytest.raises(SystemExit) as stopped:
        ResumeFromNewest(tmp_path, {})
    message = str(stopped.value)
    assert "\n" not in message and message.startswith(f"error: {tmp_path / 'checkpoint_epoch=2.pt'}: ")
    assert "corrupt" in message and "checkpoint_epoch=1.pt" in message
    torch.save({"trainer": {"iteration": 2}}, tmp_path / "checkpoint_epoch=1.pt")
    with pytest.warns(UserWarning, match="previous checkpoint"):
        path, state = newest_readable_checkpoint(tmp_path)
    assert path.name == "checkpoint_epoch=1.pt" and state["trainer"]["iteration"] == 2
    assert newest_readable_checkpoint(tmp_path / "empty") is None


# ---------------------------------------------------------------------------------------------- non-finite steps
def _parser(bundle: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.yaml"))
    settings = {"bundle_root": str(bundle), "num_iterations": 4, "epoch_length": 2, "sw_overlap": 0.25, **overrides}
    for key, value in settings.items():
        parser[key] = value
    parser.get_parsed_content("initialize")
    return parser


def _poison(parser: ConfigParser, bad_batches=(), bad_losses=()) -> dict[int, tuple[list, list]]:
    """Make the batches of ``bad_batches`` NaN and the losses of ``bad_losses`` Inf; return, per iteration, the
    parameters and SGD momentum buffers before and after it."""
    trainer = parser.get_parsed_content("train#trainer")
    prepare, loss_fn = trainer.prepare_batch, trainer.loss_function

    def prepare_batch(*args, **kwargs):
        image, label = prepare(*args, **kwargs)
        if trainer.state.iteration in bad_batches:
            image = image.clone()
            image[0, 0, 0, 0, 0] = float("nan")
        return image, label

    def loss(*args):
        value = loss_fn(*args)
        return value + float("inf") if trainer.state.iteration in bad_losses else value

    trainer.prepare_batch, trainer.loss_function = prepare_batch, loss
    snapshots: dict[int, tuple[list, list]] = {}

    def snapshot() -> list:
        momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values() if "momentum_buffer" in s]
        return [p.detach().clone() for p in trainer.network.parameters()], momentum

    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: snapshots.__setitem__(e.state.iteration, snapshot()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: snapshots.__setitem__(e.state.iteration, (snapshots[e.state.iteration],
                                                                                  snapshot())))
    return snapshots


def _unchanged(snapshots, iteration) -> bool:
    (params_before, momentum_before), (params_after, momentum_after) = snapshots[iteration]
    return (all(torch.equal(a, b) for a, b in zip(params_before, params_after))
            and len(momentum_before) == len(momentum_after)
            and all(torch.equal(a, b) for a, b in zip(momentum_before, momentum_after)))


def test_nonfinite_batch_and_loss_skip_the_step_without_touching_weights(template, tmp_path, caplog):
    bundle = _copy(template, tmp_path / "bundle")
    parser = _parser(bundle, max_nonfinite_steps=3)
    snapshots = _poison(parser, bad_batches={2}, bad_losses={3})
    with caplog.at_level("WARNING", logger="scripts"):
        parser.get_parsed_content("run")
    assert not _unchanged(snapshots, 1) and not _unchanged(snapshots, 4)
    assert _unchanged(snapshots, 2) and _unchanged(snapshots, 3)
    warnings = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(warnings) == 2
    assert "iteration 2 (the input batch has NaN/Inf values)" in warnings[0] and "1 in a row, 1 in total" in warnings[0]
    assert "iteration 3 (loss inf)" in warnings[1] and "2 in a row, 2 in total" in warnings[1]
    state = _load(bundle / "models" / "checkpoint_epoch=2.pt")["trainer"]
    assert (state["iteration"], state["nonfinite_total"], state["nonfinite_consecutive"]) == (4, 2, 0)


def test_consecutive_nonfinite_losses_stop_with_a_resumable_checkpoint(template, tmp_path):
    bundle = _copy(template, tmp_path / "bundle")
    parser = _parser(bundle, max_nonfinite_steps=2)
    snapshots = _poison(parser, bad_losses={2, 3, 4})
    with pytest.raises(SystemExit) as stopped:
        parser.get_parsed_content("run")
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("error: train: 2 consecutive non-finite losses up to "
                                                      "iteration 3 (2 in total)")
    checkpoint = bundle / "models" / "checkpoint_epoch=2.pt"
    assert f"resumable checkpoint {checkpoint}" in message
    assert _unchanged(snapshots, 2) and _unchanged(snapshots, 3) and 4 not in snapshots
    assert _load(checkpoint)["trainer"]["iteration"] == 3

    resumed = _parser(bundle, max_nonfinite_steps=2)
    snapshots = _poison(resumed)
    resumed.get_parsed_content("run")
    assert list(snapshots) == [4] and not _unchanged(snapshots, 4)
    state = _load(checkpoint)["trainer"]
    assert (state["iteration"], state["nonfinite_total"], state["nonfinite_consecutive"]) == (4, 2, 0)


def test_with_an_active_grad_scaler_the_scaler_skips_the_step(template, tmp_path):
    """The fp16 path (GradScaler on CUDA), run on CPU with torch's CPU GradScaler: the guard leaves the non-finite
    loss in place and the scaler refuses the step."""
    bundle = _copy(template, tmp_path / "bundle")
    parser = _parser(bundle, use_amp=True, num_iterations=2)  # `amp` itself applies on CUDA only
    snapshots = _poison(parser, bad_losses={2})
    trainer = parser.get_parsed_content("train#trainer")
    scalers = []

    def cpu_scaler(engine):
        engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        scalers.append(engine.scaler)

    trainer.add_event_handler(Events.STARTED, cpu_scaler)
    parser.get_parsed_content("run")
    assert scalers[0].is_enabled() and scalers[0].get_scale() == 2.0**3  # one skipped step halved the scale
    assert not _unchanged(snapshots, 1) and _unchanged(snapshots, 2)


def test_guard_needs_gradients_reset_to_none(template, tmp_path):
    parser = _parser(_copy(template, tmp_path / "bundle"), **{"train#trainer#optim_set_to_none": False})
    with pytest.raises(SystemExit, match="needs optim_set_to_none: true"):
        NonFiniteGuard(3).attach(parser.get_parsed_content("train#trainer"))
    with pytest.raises(SystemExit, match="max_nonfinite_steps: must be ≥ 1"):
        NonFiniteGuard(0)


# ---------------------------------------------------------------------------------------------- CUDA out of memory
def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_cuda_out_of_memory_in_training_is_one_line_with_the_prediction(template, tmp_path, caplog):
    """A simulated torch.OutOfMemoryError in a training step: one line (no traceback logged) with the memory model's
    prediction for these settings and concrete settings to change."""
    bundle = _copy(template, tmp_path / "bundle")
    parser = _parser(bundle, batch_size=2)
    parser.get_parsed_content("train#trainer").loss_function = _out_of_memory
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as stopped:
        parser.get_parsed_content("run")
    message = str(stopped.value)
    arch = load_architecture(bundle / "models" / "arch.json")
    predicted = predict_training_memory(meta_network(arch, 1, 3, channel_mul=0.25), (1, 32, 32, 32), batch=2,
                                        device="cuda")["peak"]
    assert "\n" not in message and message.startswith(
        "error: cpu: CUDA out of memory during training (patch [32, 32, 32], 2 patch(es) per step, amp false): a step "
        f"is predicted to need {predicted / 2**20:.0f} MiB; try --set patch_size=[16, 32, 32], or batch_size=1 "
        "num_samples=1, or amp=true, or a smaller channel_mul")
    assert not any(record.exc_info for record in caplog.records)  # MONAI's StatsHandler never saw the error


def test_cuda_out_of_memory_in_validation_and_other_errors(template, tmp_path):
    bundle = _copy(template, tmp_path / "bundle")
    parser = _parser(bundle, sw_batch_size=4)
    parser.get_parsed_content("validate#evaluator").inferer = _out_of_memory
    with pytest.raises(SystemExit) as stopped:
        parser.get_parsed_content("run")
    assert str(stopped.value) == (
        "error: cpu: CUDA out of memory during validation (sliding windows of [32, 32, 32], sw_batch_size 4); try "
        "--set sw_batch_size=1, or validate#inferer#device=cpu (the prediction is stitched on the CPU), or a smaller "
        "validate#inferer#roi_size than [32, 32, 32] (validation windows only)")

    other = _parser(_copy(template, tmp_path / "other"))
    other.get_parsed_content("train#trainer").loss_function = lambda *args: 1 / 0
    with pytest.raises(RuntimeError) as failed:  # anything else passes through unchanged (MONAI wraps it)
        other.get_parsed_content("run")
    assert isinstance(failed.value.__cause__, ZeroDivisionError)


def test_out_of_memory_advice_follows_the_gpu_capacity(make_bundle, tmp_path):
    """With the GPU's size known: a patch whose predicted step fits in 90 % of it, or, when the weights alone do
    not fit, a narrower network."""
    arch = make_bundle(tmp_path) / "models" / "arch.json"
    report = OutOfMemoryReport(arch, 1, 3, [64, 64, 64], batch=1, amp=True, device="cpu",
                               build_options={"channel_mul": 0.25})
    predicted = predict_training_memory(meta_network(load_architecture(arch), 1, 3, channel_mul=0.25),
                                        (1, 64, 64, 64), amp=True, device="cuda")
    fixed = predicted["parameters"] + predicted["gradients"] + predicted["optimizer_state"]
    report._capacity = lambda: int((fixed + (predicted["peak"] - fixed) / 4) / 0.9)  # room for a quarter patch
    assert "try --set patch_size=[32, 32, 48], or a smaller channel_mul" in report.message(validation=False)
    report._capacity = lambda: fixed
    assert report.message(validation=False).endswith(
        f"try --set a smaller channel_mul (weights, gradients and momentum alone need {fixed / 2**20:.0f} MiB)")
