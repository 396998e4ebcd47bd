"""One check of every CUDA path, for a maintainer with one GPU (docs/gpu.md): at most 8 minutes, one JSON line on
stdout (progress on stderr) and a markdown table.

What it measures, each by a function taking the device and the sizes (defaults: the GPU's; the tests call each on
the CPU with tiny sizes):

- :func:`search_step`: a DiNTS search step (L = 12, D = 4, channel_mul 0.5, 96³, AMP: fp16 autocast + GradScaler on
  CUDA): plain MONAI (bench/search_common.py) vs ours, ours with ``checkpoint_cells`` (fractions 1 and 0.5); seconds
  per step (CUDA events, after warm-up), peak ``torch.cuda.max_memory_allocated`` above the level before the model
  was built, and the memory model's prediction for ours;
- :func:`memory_model`: the memory model's predictions (``device="cuda"``) vs measured peaks for one search step
  and for training steps of dints-cvpr, SegResNet and DynUNet at two patch sizes, against the ±20 % target;
- :func:`bf16_autocast`: a training step under bf16 autocast (no GradScaler) next to fp16 + GradScaler;
- :func:`grad_scaler_skip`: dints3d's weight step when a gradient is inf: GradScaler skips it (weights unchanged,
  scale halved) and the next step updates;
- :func:`gpu_cache_loader`: ``data.gpu_cache``: cases cached on the GPU, patches drawn there, ThreadDataLoader;
- :func:`bundle_train_infer`: an exported bundle trained for 20 iterations and one inference, both through
  ``monai.bundle run`` (``dints3d train`` / ``dints3d infer``);
- :func:`torchrun_search`: a search of a few iterations under ``torchrun`` with 1 process on NCCL (gloo on a CPU),
  its collectives forced through the process group (a 1-process run normally skips them).

Without CUDA the script prints one line saying so and exits 0 without measuring. It needs PyTorch with CUDA and the
pure-Python wheels monai, nibabel, fire, pytorch-ignite, pyyaml (and dints3d on the path); checks that need
TensorBoard (bundle training, the torchrun search: their logs) are skipped with the reason where it is missing;
nothing needs SimpleITK. Usage: python bench/gpu_check.py [--markdown gpu_check.md] [--only NAME ...].
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_common import (  # noqa: E402
    CHANNEL_MUL,
    CLASSES,
    LR,
    ArchitectStep,
    MonaiSearchStep,
    make_batches,
)

import dints3d  # noqa: E402
import dints3d.search.run  # noqa: E402
from dints3d.bundle.export import export_bundle  # noqa: E402
from dints3d.bundle.infer import infer  # noqa: E402
from dints3d.bundle.train import train  # noqa: E402
from dints3d.cli import main as dints3d_main  # noqa: E402
from dints3d.config import load_config  # noqa: E402
from dints3d.cost.memory import (  # noqa: E402
    meta_network,
    predict_search_step_memory,
    predict_training_memory,
    proc_status_kib,
    training_loss,
)
from dints3d.data.dataset import load_items, load_plan, make_dataset  # noqa: E402
from dints3d.data.prepare import prepare  # noqa: E402
from dints3d.data.stream import PatchStream, stream_loader  # noqa: E402
from dints3d.data.transforms import train_transforms  # noqa: E402
from dints3d.spaces.factory import load_architecture  # noqa: E402
from dints3d.utils import runtime as runtime_module  # noqa: E402
from dints3d.utils.runtime import Runtime, process_group_backend  # noqa: E402

MiB = 2**20
#: the memory model's accuracy target
TOLERANCE = 0.2
#: what the check must stay under on one GPU (seconds)
TIME_LIMIT = 8 * 60


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------------- timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(device: torch.device, step: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones: CUDA events on CUDA,
    ``time.perf_counter`` on the CPU."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            start_time = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start_time)
    return seconds


class PeakMemory:
    """Peak bytes above the level at entry, over the block: ``torch.cuda.max_memory_allocated`` on CUDA (and the
    caching allocator's reserved peak); on the CPU the peak RSS (VmHWM, reset at entry) above the RSS at entry
    (Linux; rough, the allocator keeps freed memory)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self.reserved: int | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = proc_status_kib("VmRSS") * 1024
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self.peak = proc_status_kib("VmHWM") * 1024 - self.base


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_of(predicted: int, measured: int | None) -> float | None:
    """(predicted − measured) / measured; ``None`` without a positive measurement (an in-process CPU peak may be
    none: the allocator reuses memory it already holds)."""
    return None if measured is None or measured <= 0 else round((predicted - measured) / measured, 3)


def precision(device: torch.device, amp: bool) -> str:
    dtype, scaling = runtime_module.amp_policy(device.type, amp)
    return "fp32" if dtype is None else str(dtype).replace("torch.", "") + (" + GradScaler" if scaling else "")


# ------------------------------------------------------------------------------------------------------ the checks
def search_step(device: torch.device, side: int = 96, num_blocks: int = 12, num_depths: int = 4, steps: int = 5,
                warmup: int = 2, amp: bool = True, fractions: tuple[float, ...] = (1.0, 0.5)) -> dict:
    """One bilevel iteration (weight + architecture step, batch 1, ``side``³, 3 classes, channel_mul 0.5): plain
    MONAI, ours, ours with ``checkpoint_cells`` at each of ``fractions``. Per variant: median seconds per step,
    peak bytes above the level before the model was built, and for ours the memory model's prediction."""
    batches = make_batches(side, seed=1, device=device)
    variants = {"monai": None, "ours": 0.0, **{f"ours_ckpt_{f:g}": f for f in fractions}}
    results: dict[str, dict] = {}
    for name, fraction in variants.items():
        torch.manual_seed(0)
        with PeakMemory(device) as memory:
            if fraction is None:
                step = MonaiSearchStep(None, amp, num_blocks, num_depths, device)
            else:
                step = ArchitectStep(device, amp, checkpoint_cells=fraction > 0, fraction=fraction or 1.0,
                                     num_blocks=num_blocks, num_depths=num_depths)
            seconds = time_steps(device, functools.partial(step.step, batches), steps, warmup)
        del step
        release(device)
        row = {"seconds_per_step": round(statistics.median(seconds), 4), "peak_bytes": memory.peak,
               "reserved_bytes": memory.reserved}
        if fraction is not None:
            hparams = {"num_blocks": num_blocks, "num_depths": num_depths, "channel_mul": CHANNEL_MUL,
                       "checkpoint_cells": fraction > 0, "checkpoint_fraction": fraction or 1.0}
            predicted = predict_search_step_memory(hparams, (1, side, side, side), batch=1, amp=amp,
                                                   num_classes=CLASSES, device=device.type)["peak"]
            row.update(predicted_bytes=predicted, error=error_of(predicted, memory.peak))
        results[name] = row
    monai = results["monai"]
    return {"side": side, "num_blocks": num_blocks, "num_depths": num_depths, "precision": precision(device, amp),
            "steps": steps, "warmup": warmup, "variants": results,
            "time_vs_monai": {k: round(v["seconds_per_step"] / monai["seconds_per_step"], 3)
                              for k, v in results.items() if k != "monai"},
            "memory_vs_monai": {k: round(v["peak_bytes"] / monai["peak_bytes"], 3)
                                for k, v in results.items() if k != "monai" and monai["peak_bytes"]}}


def _training_step(model: torch.nn.Module, rt: Runtime, amp: bool, batch: int, side: int,
                   dtype: torch.dtype | None = None, losses: list | None = None) -> Callable[[], None]:
    """One SGD-momentum DiceCE step of ``model`` (every head of a deep-supervised one) on fixed random data: under
    dints3d's autocast policy (fp16 + GradScaler on CUDA), or with ``dtype`` under autocast in that dtype without
    loss scaling. Each step's loss is appended to ``losses`` if given."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = rt.grad_scaler(amp and dtype is None)
    autocast = (lambda: torch.autocast(rt.device.type, dtype=dtype)) if dtype else (lambda: rt.autocast(amp))
    loss_fn = training_loss()
    x = torch.randn(batch, 1, side, side, side, device=rt.device)
    y = torch.randint(0, CLASSES, (batch, 1, side, side, side), device=rt.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if losses is not None:
            losses.append(loss.detach())

    return step


def _arch_for(name: str, side: int):
    """A preset, or a baseline planned for a ``side``³ patch at 1 mm."""
    return load_architecture(name, {"name": "gpu_check", "patch_size": [side] * 3, "target_spacing": [1.0] * 3})


def memory_model(device: torch.device, sides: tuple[int, ...] = (64, 96),
                 archs: tuple[str, ...] = ("dints-cvpr", "segresnet", "dynunet"), batch: int = 2, amp: bool = True,
                 channel_mul: float = 1.0, search_side: int = 96, num_blocks: int = 12,
                 num_depths: int = 4) -> dict:
    """The memory model (rule ``device.type``) vs measured peaks: one search step of ours at ``search_side``
    (batch 1), and two training steps (SGD momentum, ``batch``) of each of ``archs`` at each of ``sides``; the
    measured peak counts from before the model was built, like the predicted ``peak``."""
    rt = Runtime(device=device)
    cases = []
    with PeakMemory(device) as memory:
        step = ArchitectStep(device, amp, num_blocks=num_blocks, num_depths=num_depths)
        batches = make_batches(search_side, seed=1, device=device)
        time_steps(device, functools.partial(step.step, batches), 1, 1)
    del step, batches
    release(device)
    hparams = {"num_blocks": num_blocks, "num_depths": num_depths, "channel_mul": CHANNEL_MUL}
    predicted = predict_search_step_memory(hparams, (1, *[search_side] * 3), batch=1, amp=amp, num_classes=CLASSES,
                                           device=device.type)["peak"]
    cases.append({"what": f"search step {num_blocks}x{num_depths}", "side": search_side, "batch": 1,
                  "predicted_bytes": predicted, "measured_bytes": memory.peak, "reserved_bytes": memory.reserved})
    for name in archs:
        for side in sides:
            arch = _arch_for(name, side)
            torch.manual_seed(0)
            with PeakMemory(device) as memory:
                model = arch.build(1, CLASSES, channel_mul=channel_mul).to(device)
                time_steps(device, _training_step(model, rt, amp, batch, side), 1, 1)
            del model
            release(device)
            predicted = predict_training_memory(meta_network(arch, 1, CLASSES, channel_mul=channel_mul),
                                                (1, side, side, side), batch=batch, amp=amp, device=device.type)
            cases.append({"what": f"train {name}", "side": side, "batch": batch, "predicted_bytes": predicted["peak"],
                          "measured_bytes": memory.peak, "reserved_bytes": memory.reserved})
    for case in cases:
        case["error"] = error_of(case["predicted_bytes"], case["measured_bytes"])
        case["within_target"] = case["error"] is not None and abs(case["error"]) <= TOLERANCE
    errors = [abs(c["error"]) for c in cases if c["error"] is not None]
    return {"device_rule": device.type, "precision": precision(device, amp), "channel_mul": channel_mul,
            "cases": cases, "within_target": f"{sum(c['within_target'] for c in cases)}/{len(cases)}",
            "max_abs_error": max(errors, default=None)}


def bf16_autocast(device: torch.device, arch: str = "dints-cvpr", side: int = 64, batch: int = 2,
                  channel_mul: float = 0.5, steps: int = 3, warmup: int = 1) -> dict:
    """Training steps of ``arch`` under bf16 autocast (no loss scaling) next to dints3d's AMP policy (fp16 +
    GradScaler on CUDA): the network's output dtype, finite losses, seconds per step, peak bytes."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return {"supported": False, "skipped": "this GPU has no bf16"}
    rt, network = Runtime(device=device), _arch_for(arch, side)
    result: dict[str, Any] = {"supported": True, "arch": arch, "side": side, "batch": batch}
    for name, dtype in (("bf16", torch.bfloat16), ("policy", None)):
        torch.manual_seed(0)
        losses: list = []
        with PeakMemory(device) as memory:
            model = network.build(1, CLASSES, channel_mul=channel_mul).to(device)
            seconds = time_steps(device, _training_step(model, rt, True, batch, side, dtype, losses), steps, warmup)
        if dtype is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                out = model(torch.randn(1, 1, side, side, side, device=device))
            result["output_dtype"] = str((out[0] if isinstance(out, (list, tuple)) else out).dtype)
        result[name] = {"seconds_per_step": round(statistics.median(seconds), 4), "peak_bytes": memory.peak,
                        "precision": "bfloat16" if dtype else precision(device, True),
                        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all())}
        del model
        release(device)
    result["losses_finite"] = result["bf16"]["losses_finite"]
    result["bf16_time_vs_policy"] = round(result["bf16"]["seconds_per_step"] / result["policy"]["seconds_per_step"], 3)
    return result


def grad_scaler_skip(device: torch.device, side: int = 64, num_blocks: int = 12, num_depths: int = 4) -> dict:
    """dints3d's weight step (:class:`~dints3d.search.architect.Architect`, AMP) when one gradient is inf: the
    GradScaler must skip the update (weights and momentum unchanged), halve its scale, and update at the next
    step. On the CPU, where dints3d's policy scales nothing, an enabled CPU GradScaler stands in."""
    torch.manual_seed(0)
    step = ArchitectStep(device, amp=True, num_blocks=num_blocks, num_depths=num_depths)
    architect = step.architect
    policy_scales = architect.scaler_w.is_enabled()
    if not policy_scales:
        architect.scaler_w = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    (image, label), _ = make_batches(side, seed=1, device=device)
    weights = architect.weight_params
    before = [p.detach().clone() for p in weights]
    scale_before = architect.scaler_w.get_scale()
    hook = weights[0].register_hook(lambda grad: torch.full_like(grad, math.inf))
    loss = architect.weight_step(image, label, LR)
    hook.remove()
    unchanged = all(torch.equal(p.detach(), b) for p, b in zip(weights, before))
    momentum_empty = all(not architect.opt_w.state.get(p) for p in weights)
    scale_after = architect.scaler_w.get_scale()
    architect.weight_step(image, label, LR)
    updated = any(not torch.equal(p.detach(), b) for p, b in zip(weights, before))
    result = {"policy_scales_loss": policy_scales, "loss_finite": loss is not None and bool(torch.isfinite(loss)),
              "weights_unchanged": unchanged, "momentum_untouched": momentum_empty, "scale_before": scale_before,
              "scale_after": scale_after, "next_step_updates": updated,
              "passed": unchanged and momentum_empty and scale_after == scale_before / 2 and updated}
    del step, architect
    release(device)
    return result


def gpu_cache_loader(device: torch.device, work: Path, batches: int = 20, batch_size: int = 2,
                     num_samples: int = 2) -> dict:
    """``data.gpu_cache``: the fold's training cases preprocessed into a cache on ``device`` (CUDA; on the CPU the
    cache stays in RAM), patches cropped and augmented there, batches from a ThreadDataLoader over a PatchStream, as
    the search loop draws them."""
    plan = load_plan(work)
    cache_device = device if device.type == "cuda" else None
    transform = train_transforms(plan, plan["patch_size"], num_samples, True, device=cache_device)
    allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    dataset = make_dataset(load_items(work, "fold0_train"), transform, cache_rate=1.0, progress=False)
    cache_seconds = time.perf_counter() - start
    cached = torch.cuda.memory_allocated(device) - allocated if device.type == "cuda" else None
    loader = stream_loader(PatchStream(dataset, seed=0, stream=0, length=batches * batch_size), batch_size,
                           gpu_cache=True)
    it = iter(loader)
    first = next(it)
    start = time.perf_counter()
    count = 1 + sum(1 for _ in it)
    synchronize(device)
    seconds = (time.perf_counter() - start) / max(count - 1, 1)
    return {"loader": type(loader).__name__, "cases": len(dataset), "batch_device": str(first["image"].device),
            "image_shape": list(first["image"].shape), "label_dtype": str(first["label"].dtype),
            "batches": count, "seconds_per_batch": round(seconds, 4), "cache_seconds": round(cache_seconds, 2),
            "cached_bytes": cached}


def bundle_train_infer(device: torch.device, work: Path, out: Path, arch: str = "dints-cvpr",
                       channel_mul: float = 0.5, iterations: int = 20) -> dict:
    """``dints3d export`` of ``arch`` for the task in ``work``, ``iterations`` training iterations with one
    validation at the end, then one inference of the task's test images, each through ``monai.bundle run`` in a
    child process (its log in ``out/*.log``). Training logs to TensorBoard: without it, training is skipped and the
    inference runs the exported network's initial weights."""
    cfg = load_config(None, [f"train.channel_mul={channel_mul}", f"train.iterations={iterations}",
                             f"train.val_interval={iterations}", "train.batch_size=1", "data.num_samples=1",
                             "data.num_workers=0", "train.amp=true", "data.cache_rate=1.0"])
    bundle = export_bundle(arch, work, out / "bundle", cfg, force=True)
    result: dict[str, Any] = {"arch": arch, "channel_mul": channel_mul, "iterations": iterations}
    if has("tensorboard"):
        start = time.perf_counter()
        result["train_rc"] = train(bundle, log=out / "train.log", device=device.type)
        result["train_seconds"] = round(time.perf_counter() - start, 1)
        result["model_written"] = (bundle / "models" / "model.pt").is_file()
    else:
        result["train_skipped"] = "needs tensorboard (the training's TensorBoardStatsHandler)"
        network = arch_network(bundle)
        torch.save(network.state_dict(), bundle / "models" / "model.pt")
    images = Path(load_plan(work)["task_dir"]) / "imagesTs"
    start = time.perf_counter()
    done = infer(bundle, [images], out / "masks", log=out / "infer.log")
    result.update(infer_rc=done.returncode, infer_seconds=round(time.perf_counter() - start, 1),
                  masks=len(done.masks), inputs=len(done.masks) + len(done.failures))
    result["passed"] = result.get("train_rc", 0) == 0 and done.returncode == 0 and not done.failures
    return result


def arch_network(bundle: Path) -> torch.nn.Module:
    """The bundle's network as its inference config builds it."""
    if str(bundle) not in sys.path:  # its scripts/ (the network class), as `monai.bundle run` puts the root there
        sys.path.insert(1, str(bundle))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network_def")


def torchrun_command(work: Path, out: Path, device: torch.device, iterations: int = 4,
                     settings: tuple[str, ...] = ()) -> list[str]:
    """``torchrun --standalone --nproc_per_node=1`` of this script's child mode, which runs ``dints3d search`` on
    ``device`` with the demo space (4 blocks × 3 depths), ``iterations`` iterations and ``settings`` added."""
    overrides = [f"device={device.type}", f"search.iterations={iterations}", f"search.val_interval={iterations}",
                 f"search.checkpoint_interval={iterations}", "search.amp=true", "data.max_cases=4", *settings]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(Path(__file__).resolve()), "--torchrun-child", "search", "--config", "demo", "--work", str(work),
            "--out", str(out), *[a for o in overrides for a in ("--set", o)]]


def torchrun_search(device: torch.device, work: Path, out: Path, iterations: int = 4,
                    settings: tuple[str, ...] = (), timeout: float = 240) -> dict:
    """A search of ``iterations`` iterations under ``torchrun`` with 1 process: the process group on NCCL (on a
    CPU: gloo, :func:`~dints3d.utils.runtime.process_group_backend`), every collective of the loop forced through
    it. Needs TensorBoard (the search logs to it)."""
    expected = process_group_backend(device)
    if not has("tensorboard"):
        return {"backend": expected, "skipped": "needs tensorboard (the search loop logs to it)"}
    command = torchrun_command(work, out, device, iterations, settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(dints3d.__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"torchrun_child"')]
    child = json.loads(lines[-1]) if lines else {}
    result = {"expected_backend": expected, "backend": child.get("backend"), "world_size": child.get("world_size"),
              "collectives": child.get("collectives"), "rc": done.returncode, "seconds": round(seconds, 1),
              "arch_json": (out / "arch.json").is_file(), "iterations": iterations}
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-1500:]
    result["passed"] = done.returncode == 0 and result["arch_json"] and child.get("backend") == expected
    return result


def torchrun_child(argv: list[str]) -> int:
    """Under torchrun: join a process group on the backend dints3d picks for the device, make the runtime use it
    with 1 process (collectives included), run ``dints3d <argv>``, print one ``{"torchrun_child": …}`` line."""
    state: dict[str, Any] = {"collectives": 0}
    real_init = dints3d.search.run.init_runtime

    def init_runtime(device_name: str = "auto") -> Runtime:
        device = runtime_module.resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=process_group_backend(device))
        state.update(backend=dist.get_backend(), world_size=dist.get_world_size())
        return real_init(device_name)

    real_all_reduce = dist.all_reduce

    def all_reduce(*args: Any, **kwargs: Any) -> Any:
        state["collectives"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = all_reduce
    Runtime.distributed = property(lambda self: dist.is_initialized())  # type: ignore[assignment]
    dints3d.search.run.init_runtime = init_runtime
    rc = dints3d_main(argv)
    print(json.dumps({"torchrun_child": True, "rc": rc, **state}), flush=True)
    return rc


# ---------------------------------------------------------------------------------------------------- the report
def device_info(device: torch.device) -> dict:
    """The card, its memory, the driver (nvidia-smi, where present) and the versions."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "monai": _version("monai"),
            "dints3d": dints3d.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), driver=_driver())
    return info


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):
        return __import__(module).__version__
    return None


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    return None


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / MiB:,.0f}"


def _pct(e: float | None) -> str:
    return "–" if e is None else f"{100 * e:+.1f} %"


def markdown(info: dict, results: dict, seconds: float) -> str:
    """The results as markdown tables (docs/gpu.md keeps the last ones)."""
    lines = [f"GPU check of {info['date']}: {info.get('gpu', 'no GPU')} ({info.get('gpu_memory_gib', '–')} GiB), "
             f"driver {info.get('driver') or 'unknown'}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
             f"torch {info['torch']}, MONAI {info['monai']}, dints3d {info['dints3d']}; {seconds:.0f} s in all.", ""]
    step = results.get("search_step", {})
    if "variants" in step:
        lines += [f"Search step (L = {step['num_blocks']}, D = {step['num_depths']}, channel_mul 0.5, "
                  f"{step['side']}³, batch 1, {step['precision']}; median of {step['steps']} after {step['warmup']} "
                  "warm-up):", "",
                  "| variant | s / step | vs MONAI | peak MiB | vs MONAI | model MiB | model error |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in step["variants"].items():
            lines.append(f"| {name} | {row['seconds_per_step']:.3f} | {step['time_vs_monai'].get(name, 1.0):.2f} | "
                         f"{_mib(row['peak_bytes'])} | {step['memory_vs_monai'].get(name, 1.0):.2f} | "
                         f"{_mib(row.get('predicted_bytes'))} | {_pct(row.get('error'))} |")
        lines.append("")
    model = results.get("memory_model", {})
    if "cases" in model:
        lines += [f"Memory model ({model['device_rule']} rule, {model['precision']}) vs measured peak "
                  f"(max_memory_allocated from before the model was built): {model['within_target']} within ±20 %.",
                  "", "| step | patch | batch | predicted MiB | measured MiB | reserved MiB | error |",
                  "|---|---|---|---|---|---|---|"]
        for c in model["cases"]:
            lines.append(f"| {c['what']} | {c['side']}³ | {c['batch']} | {_mib(c['predicted_bytes'])} | "
                         f"{_mib(c['measured_bytes'])} | {_mib(c['reserved_bytes'])} | {_pct(c['error'])} |")
        lines.append("")
    lines += ["| check | result |", "|---|---|"]
    for name in ("bf16_autocast", "grad_scaler_skip", "gpu_cache_loader", "bundle_train_infer", "torchrun_search"):
        if name in results:
            lines.append(f"| {name} | {_summary(name, results[name])} |")
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict) -> str:
    if "error" in r:
        return f"**failed**: {r['error']}"
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if name == "bf16_autocast":
        return (f"output {r['output_dtype']}, losses finite: {r['losses_finite']}; {r['bf16']['seconds_per_step']:.3f}"
                f" s/step vs {r['policy']['seconds_per_step']:.3f} ({r['policy']['precision']}), peak "
                f"{_mib(r['bf16']['peak_bytes'])} vs {_mib(r['policy']['peak_bytes'])} MiB")
    if name == "grad_scaler_skip":
        return (f"{'passed' if r['passed'] else '**failed**'}: weights unchanged {r['weights_unchanged']}, scale "
                f"{r['scale_before']:g} → {r['scale_after']:g}, next step updates {r['next_step_updates']}")
    if name == "gpu_cache_loader":
        return (f"{r['loader']}, batches on {r['batch_device']} {r['image_shape']}, {r['seconds_per_batch']:.4f} "
                f"s/batch, {r['cases']} cases cached in {r['cache_seconds']} s ({_mib(r['cached_bytes'])} MiB)")
    if name == "bundle_train_infer":
        trained = (f"{r['iterations']} iterations in {r['train_seconds']} s (rc {r['train_rc']})" if "train_rc" in r
                   else f"training skipped ({r['train_skipped']})")
        return (f"{'passed' if r['passed'] else '**failed**'}: {r['arch']} at channel_mul {r['channel_mul']}: "
                f"{trained}; inference {r['masks']}/{r['inputs']} masks in {r['infer_seconds']} s")
    if name == "torchrun_search":
        return (f"{'passed' if r['passed'] else '**failed**'}: backend {r['backend']} (world size "
                f"{r['world_size']}, {r['collectives']} all-reduces), {r['iterations']} iterations in "
                f"{r['seconds']} s, arch.json written: {r['arch_json']}")
    return json.dumps(r)


def sphere_task(out: Path, cases: int = 8, test_cases: int = 2, size: int = 64, seed: int = 0) -> Path:
    """A CT-like MSD task without ``dints3d synth`` (which needs scipy): per case a noisy ``size``³ volume at 1 mm
    holding an ellipsoidal body (40 HU), an organ sphere (label 1, 100 HU) and a lesion in it (label 2, 60 HU)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).astype(np.float32)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(cases + test_cases):
        centre = size / 2 + rng.uniform(-size / 8, size / 8, 3)
        radius, lesion = size * rng.uniform(0.15, 0.22), size * rng.uniform(0.05, 0.08)
        distance = np.linalg.norm(grid - centre[:, None, None, None], axis=0)
        body = np.linalg.norm((grid - size / 2) / np.array([0.45, 0.4, 0.48])[:, None, None, None] / size, axis=0) < 1
        label = np.zeros((size,) * 3, np.uint8)
        label[distance < radius] = 1
        label[distance < lesion] = 2
        image = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, label.shape)
        image[label == 1], image[label == 2] = 100 + rng.normal(0, 15, (label == 1).sum()), 60
        name = f"sphere_{index:03d}.nii.gz"
        if index < cases:
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), out / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, np.eye(4)), out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), out / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    (out / "dataset.json").write_text(json.dumps({
        "name": "Spheres", "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"}, "numTraining": cases, "numTest": test_cases,
        "training": training, "test": test}))
    return out


def synthetic_work(root: Path, size: int = 64, cases: int = 8) -> Path:
    """:func:`sphere_task` (``size`` voxels a side) prepared with 2 folds into ``root/work``."""
    task = sphere_task(root / "task", cases=cases, size=size)
    with contextlib.redirect_stdout(sys.stderr):
        prepare(task, root / "work", folds=2, progress=False)
    return root / "work"


CHECKS = ("search_step", "memory_model", "bf16_autocast", "grad_scaler_skip", "gpu_cache_loader",
          "bundle_train_infer", "torchrun_search")


def run_checks(device: torch.device, root: Path, only: tuple[str, ...] = CHECKS, sizes: dict | None = None,
               task_size: int = 64) -> dict:
    """Every check in ``only`` on a :func:`synthetic_work` task in ``root``, with the GPU sizes (or the keyword
    arguments ``sizes[check]``); a check that raises is recorded with its error and the others run."""
    work, sizes = synthetic_work(root, size=task_size), sizes or {}
    calls: dict[str, Callable[..., dict]] = {
        "search_step": lambda **kw: search_step(device, **kw),
        "memory_model": lambda **kw: memory_model(device, **kw),
        "bf16_autocast": lambda **kw: bf16_autocast(device, **kw),
        "grad_scaler_skip": lambda **kw: grad_scaler_skip(device, **kw),
        "gpu_cache_loader": lambda **kw: gpu_cache_loader(device, work, **kw),
        "bundle_train_infer": lambda **kw: bundle_train_infer(device, work, root / "bundle", **kw),
        "torchrun_search": lambda **kw: torchrun_search(device, work, root / "torchrun", **kw),
    }
    results = {}
    for name in only:
        print(f"gpu_check: {name} …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            results[name] = calls[name](**sizes.get(name, {}))
        except Exception as e:  # one failing path must not hide the others' figures
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        release(device)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torchrun-child"]:
        return torchrun_child(argv[1:])
    parser = argparse.ArgumentParser(description="One check of every CUDA path on one GPU (docs/gpu.md): one JSON "
                                     "line on stdout, markdown tables in --markdown; without CUDA, one line and exit 0.")
    parser.add_argument("--markdown", default="gpu_check.md", help="markdown tables to write (default gpu_check.md)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), metavar="CHECK",
                        help=f"run these checks only (of: {', '.join(CHECKS)})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_check", "cuda": False, "torch": torch.__version__,
                          "message": "no CUDA device: nothing measured (docs/gpu.md: run it on a machine with a GPU)"}))
        return 0
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    info = device_info(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dints3d-gpu-check-") as tmp:
        results = run_checks(device, Path(tmp), tuple(args.only))
    seconds = time.perf_counter() - start
    Path(args.markdown).write_text(markdown(info, results, seconds))
    failed = sorted(name for name, r in results.items() if "error" in r or r.get("passed") is False)
    print(json.dumps({"bench": "gpu_check", "cuda": True, **info, "seconds": round(seconds, 1),
                      "within_time_limit": seconds <= TIME_LIMIT, "failed": failed, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
