"""``bench/gpu_check.py`` on a CPU-only machine: one line and exit 0 without measuring; and every measuring function
run on the CPU with tiny sizes, so that none of the script is dead code before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import tiny_arch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CPU = torch.device("cpu")
#: a 2-block, 3-depth supernet on the CPU (the search's tiny settings)
TINY_SPACE = {"num_blocks": 2, "num_depths": 3}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(tmp_path / "t.md")], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["cuda"] is False and "no CUDA device" in line
    assert not (tmp_path / "t.md").exists()


def test_search_step(gpu_check):
    r = gpu_check.search_step(CPU, side=32, steps=1, warmup=1, **TINY_SPACE)
    assert r["precision"] == "bfloat16" and set(r["variants"]) == {"monai", "ours", "ours_ckpt_1", "ours_ckpt_0.5"}
    for name, row in r["variants"].items():
        assert row["seconds_per_step"] > 0 and isinstance(row["peak_bytes"], int)
        assert (name == "monai") == ("predicted_bytes" not in row)
    ours = r["variants"]
    assert ours["ours"]["predicted_bytes"] > ours["ours_ckpt_0.5"]["predicted_bytes"] > 0
    assert set(r["time_vs_monai"]) == {"ours", "ours_ckpt_1", "ours_ckpt_0.5"}


def test_memory_model(gpu_check):
    r = gpu_check.memory_model(CPU, sides=(64,), batch=1, channel_mul=0.125, search_side=32, **TINY_SPACE)
    assert r["device_rule"] == "cpu" and [c["what"] for c in r["cases"]] == [
        "search step 2x3", "train dints-cvpr", "train segresnet", "train dynunet"]
    for case in r["cases"]:
        assert case["predicted_bytes"] > 0 and isinstance(case["measured_bytes"], int)
        assert case["within_target"] == (case["error"] is not None and abs(case["error"]) <= 0.2)
    assert r["within_target"].endswith("/4")


def test_bf16_autocast(gpu_check):
    r = gpu_check.bf16_autocast(CPU, arch="segresnet", side=32, batch=1, channel_mul=0.125, steps=1, warmup=0)
    assert r["output_dtype"] == "torch.bfloat16" and r["losses_finite"] is True
    assert r["bf16"]["seconds_per_step"] > 0 and r["policy"]["precision"] == "bfloat16"  # the CPU policy is bf16


def test_grad_scaler_skips_an_inf_step(gpu_check):
    r = gpu_check.grad_scaler_skip(CPU, side=32, **TINY_SPACE)
    assert r["policy_scales_loss"] is False  # dints3d scales losses on CUDA only; an enabled CPU scaler stands in
    assert r["passed"] and r["weights_unchanged"] and r["scale_after"] == r["scale_before"] / 2
    assert r["loss_finite"] and r["next_step_updates"]


def test_gpu_cache_loader(gpu_check, search_work):
    r = gpu_check.gpu_cache_loader(CPU, search_work, batches=2, batch_size=1, num_samples=1)
    assert r["loader"] == "ThreadDataLoader" and r["batch_device"] == "cpu" and r["batches"] == 2
    assert r["image_shape"][:2] == [1, 1] and r["cached_bytes"] is None


@pytest.mark.slow
def test_bundle_train_infer(gpu_check, search_work, tmp_path):
    arch = tmp_path / "arch.json"
    tiny_arch().save(arch)
    r = gpu_check.bundle_train_infer(CPU, search_work, tmp_path / "check", arch=str(arch), channel_mul=0.25,
                                     iterations=2)
    assert r["passed"], r
    assert r.get("model_written") or "train_skipped" in r
    assert r["masks"] == r["inputs"] >= 1


def test_torchrun_command_and_backend(gpu_check, tmp_path):
    assert gpu_check.process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert gpu_check.process_group_backend(CPU) == "gloo"
    command = gpu_check.torchrun_command(tmp_path / "work", tmp_path / "run", torch.device("cuda", 0), iterations=3)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert command[5] == str(SCRIPT) and command[6:8] == ["--torchrun-child", "search"]
    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    assert "device=cuda" in sets and "search.iterations=3" in sets


@pytest.mark.slow
def test_torchrun_search_on_gloo(gpu_check, search_work, tmp_path):
    """The same child on the CPU: a 1-process gloo group, the loop's collectives going through it."""
    settings = ("dints.num_blocks=2", "dints.channel_mul=0.125", "search.val_overlap=0.0", "data.max_cases=2")
    r = gpu_check.torchrun_search(CPU, search_work, tmp_path / "run", iterations=2, settings=settings)
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["passed"], r
    assert (r["backend"], r["world_size"]) == ("gloo", 1) and r["collectives"] > 0


def test_markdown_report(gpu_check):
    info = {"date": "2026-01-01", "gpu": "Test GPU", "gpu_memory_gib": 80.0, "driver": "999.1", "cuda": "12.8",
            "cudnn": 90000, "torch": "2.x", "monai": "1.x", "dints3d": "0.x"}
    results = {"grad_scaler_skip": {"passed": True, "weights_unchanged": True, "scale_before": 65536.0,
                                    "scale_after": 32768.0, "next_step_updates": True},
               "torchrun_search": {"skipped": "needs tensorboard"}, "bf16_autocast": {"error": "RuntimeError: x"}}
    text = gpu_check.markdown(info, results, 100.0)
    assert "Test GPU (80.0 GiB), driver 999.1" in text
    assert "| grad_scaler_skip | passed: weights unchanged True, scale 65536 → 32768" in text
    assert "| torchrun_search | skipped: needs tensorboard |" in text and "**failed**: RuntimeError: x" in text


#: modules a GPU machine with PyTorch and the pure-Python wheels may lack (None in sys.modules: not importable)
ABSENT = ("matplotlib", "scipy", "SimpleITK", "tensorboard")
WITHOUT_THEM = f"""
import importlib.util, json, sys
from pathlib import Path
for name in {ABSENT!r}:
    sys.modules[name] = None
import torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
root, arch = Path(sys.argv[1]), sys.argv[2]
cpu = torch.device("cpu")
work = g.synthetic_work(root, size=24, cases=4)
results = {{"loader": g.gpu_cache_loader(cpu, work, batches=1, batch_size=1, num_samples=1),
            "bundle": g.bundle_train_infer(cpu, work, root / "check", arch=arch, channel_mul=0.25, iterations=1),
            "torchrun": g.torchrun_search(cpu, work, root / "run")}}
print(json.dumps({{"absent": [m for m in {ABSENT!r} if importlib.util.find_spec(m) is None], **results}}))
"""


@pytest.mark.slow
def test_runs_without_matplotlib_scipy_simpleitk_tensorboard(tmp_path):
    """Its own synthetic task (no scipy), export without arch.png (no matplotlib), bundle training and the torchrun
    search skipped with their reason (no TensorBoard), inference of the untrained network."""
    arch = tmp_path / "arch.json"
    tiny_arch().save(arch)
    done = subprocess.run([sys.executable, "-c", WITHOUT_THEM, str(tmp_path), str(arch)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["absent"] == list(ABSENT)
    assert r["loader"]["loader"] == "ThreadDataLoader"
    assert "needs tensorboard" in r["bundle"]["train_skipped"] and r["bundle"]["passed"], r["bundle"]
    assert not (tmp_path / "check" / "bundle" / "docs" / "arch.png").exists()
    assert "needs tensorboard" in r["torchrun"]["skipped"] and r["torchrun"]["backend"] == "gloo"


def test_sphere_task_prepares(gpu_check, tmp_path):
    work = gpu_check.synthetic_work(tmp_path, size=24, cases=4)
    plan = json.loads((work / "plan.json").read_text())
    assert plan["out_channels"] == 3 and plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert len(json.loads((work / "datalist.json").read_text())["training"]) == 4


def test_run_checks_records_results_and_errors_and_reports(gpu_check, tmp_path):
    """The orchestration of main(): each check with its sizes, a failing one recorded without stopping the others,
    then the markdown and the JSON line."""
    sizes = {"grad_scaler_skip": {"side": 32, **TINY_SPACE},
             "gpu_cache_loader": {"batches": 1, "batch_size": 1, "num_samples": 1},
             "bf16_autocast": {"arch": "no-such-preset"}}
    results = gpu_check.run_checks(CPU, tmp_path, ("grad_scaler_skip", "bf16_autocast", "gpu_cache_loader"), sizes,
                                   task_size=24)
    assert results["grad_scaler_skip"]["passed"] and results["gpu_cache_loader"]["batches"] == 1
    assert "no-such-preset" in results["bf16_autocast"]["error"]
    assert all(r["seconds"] >= 0 for r in results.values())
    text = gpu_check.markdown(gpu_check.device_info(CPU), results, 1.0)
    assert "| grad_scaler_skip | passed" in text and "| bf16_autocast | **failed**" in text
    json.dumps(results)  # the JSON line holds them
