"""Auto-DeepLab supernet variants side by side: ``per_transition`` (the paper's Eq. 6, one cell run per incoming
transition) vs ``mixed_input`` (inputs mixed first, one cell run per node).

One search iteration = a weight step (SGD momentum, cross-entropy, α/β frozen) + an architecture step (Adam on α/β,
weights frozen), as in ``dints3d.search.loop``. Each variant runs in a fresh subprocess (one torch thread): build the
supernet, one warm-up iteration on a small input (pages in kernels and allocator pools), then reset the peak-RSS
counter (``/proc/self/clear_refs``) and run ``--steps`` iterations; peak memory = VmHWM − VmRSS before the timed
iterations, with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors return to the OS. The variants alternate for
``--rounds`` rounds (median time per iteration, largest peak). Beside the measurement, the memory model
(``dints3d.cost.memory.step_activation_memory``, meta tensors, nothing allocated) gives each variant's activations saved
for backward in one weight step, at the measured crop and at the paper's search setting (``--model-size``, 321×321,
batch 2).
Usage: python bench/autodeeplab_supernet.py [--size 64 64] [--layers 12] [--filters 8]. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("per_transition", "mixed_input")


def child(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from dints3d.cost.memory import proc_status_kib
    from dints3d.spaces.autodeeplab.supernet import AutoDeepLabSearchSpace

    torch.set_num_threads(1)
    torch.manual_seed(0)
    space = AutoDeepLabSearchSpace(3, spec["classes"], num_layers=spec["layers"], num_blocks=spec["blocks"],
                                   filter_multiplier=spec["filters"], supernet=spec["variant"])
    weights, arch = space.weight_parameters(), space.arch_parameters()
    opt_w = torch.optim.SGD(weights, lr=0.025, momentum=0.9, weight_decay=3e-4)
    opt_a = torch.optim.Adam(arch, lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)

    def iteration(x, y):
        for trainable, frozen, opt in ((weights, arch, opt_w), (arch, weights, opt_a)):
            for p in trainable:
                p.requires_grad_(True)
            for p in frozen:
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(space(x), y).backward()
            opt.step()

    def batch(size):
        return torch.randn(spec["batch"], 3, *size), torch.randint(0, spec["classes"], (spec["batch"], *size))

    iteration(*batch([8, 8]))
    x, y = batch(spec["size"])
    baseline = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        iteration(x, y)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": (proc_status_kib("VmHWM") - baseline) * 1024, "seconds": times,
            "weights": sum(p.numel() for p in weights)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_activations(spec: dict, size: list[int]) -> int:
    """Bytes saved for backward by one weight step (α/β frozen), fp32, from the memory model."""
    from dints3d.cost.memory import parameters_on_meta, step_activation_memory
    from dints3d.spaces.autodeeplab.supernet import AutoDeepLabSearchSpace

    with parameters_on_meta():
        space = AutoDeepLabSearchSpace(3, spec["classes"], num_layers=spec["layers"], num_blocks=spec["blocks"],
                                       filter_multiplier=spec["filters"], supernet=spec["variant"])
    for p in space.arch_parameters():
        p.requires_grad_(False)
    return step_activation_memory(space, (3, *size), spec["batch"], amp=False)["activations"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64], help="crop size (default 64 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--model-size", type=int, nargs=2, default=[321, 321],
                        help="crop size of the memory-model column (default 321 321, the paper's)")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {k: getattr(args, k) for k in ("size", "batch", "layers", "blocks", "filters", "classes", "steps")}
    results = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            results[variant].append(run_child({**base, "variant": variant}))
    summary = {"setting": base}
    for variant, runs in results.items():
        seconds = [s for r in runs for s in r["seconds"]]
        spec = {**base, "variant": variant}
        summary[variant] = {"median_seconds_per_iteration": statistics.median(seconds),
                            "peak_mb": max(r["peak_bytes"] for r in runs) / 2**20, "weights": runs[0]["weights"],
                            "model_activations_mb": predicted_activations(spec, args.size) / 2**20,
                            "model_activations_mb_at_model_size": predicted_activations(spec, args.model_size) / 2**20}
        row = summary[variant]
        print(f"{variant:>15}: {row['median_seconds_per_iteration']:.2f} s/iteration, peak {row['peak_mb']:.0f} MB "
              f"(model: {row['model_activations_mb']:.0f} MB of activations; "
              f"{row['model_activations_mb_at_model_size']:.0f} MB at {args.model_size[0]}x{args.model_size[1]}), "
              f"{row['weights'] / 1e6:.2f} M weights")
    per, mixed = summary["per_transition"], summary["mixed_input"]
    summary["time_ratio"] = per["median_seconds_per_iteration"] / mixed["median_seconds_per_iteration"]
    summary["memory_ratio"] = per["peak_mb"] / mixed["peak_mb"]
    summary["model_memory_ratio"] = per["model_activations_mb"] / mixed["model_activations_mb"]
    print(f"per_transition / mixed_input: time ×{summary['time_ratio']:.2f}, peak RSS ×{summary['memory_ratio']:.2f}, "
          f"modelled activations ×{summary['model_memory_ratio']:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
