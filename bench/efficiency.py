"""Achieved GFLOP/s of a DiNTS search step against what one large 3-D convolution reaches on the same machine.

Search step: our ``SearchRun.weight_step`` + ``arch_step`` (bench/search_common.py) at L = 12, D = 4, channel_mul 0.5,
batch 1, a ``--side``³ patch, CPU fp32, ``--threads`` torch threads; the plain-MONAI step (same inputs, same
weights) is measured the same way. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one plain-MONAI step
(convolutions and matrix products, forward and backward; 2 FLOPs per multiply-add; element-wise ops such as
instance norm are not counted, so the achieved figure is a lower bound of the work done). Ours computes the same
function with the same multiply-adds, so the same count serves both: counted on ours, the CPU routing's 2-group
convolutions would be overcounted (the counter ignores groups in its convolution-backward formula). Time: median of
``--repeats`` steps after a warm-up.

References, timed the same way in the same run: a 3×3×3 convolution forward + backward (input and weight
gradients), batch 1, at the shapes of the supernet's finest resolution (the patch / 2, where most
of its FLOPs are: 32 channels at channel_mul 0.5) and a larger one (64 channels at the same size). Efficiency = step GFLOP/s ÷ reference GFLOP/s.
Usage: python bench/efficiency.py [--side 64] [--repeats 3] [--threads 1]. Last line: JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_common import MonaiSearchStep, OurSearchStep, make_batches, our_search_run  # noqa: E402


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_reference(channels: int, side: int, repeats: int) -> dict:
    """A 3×3×3 conv, batch 1, ``channels`` → ``channels`` at ``side``³: forward + input and weight gradients."""
    x = torch.randn(1, channels, side, side, side, requires_grad=True)
    w = torch.randn(channels, channels, 3, 3, 3, requires_grad=True)

    def step():
        F.conv3d(x, w, padding=1).sum().backward()

    flops, seconds = flops_of(step), median_seconds(step, repeats)
    return {"shape": f"1x{channels}x{side}^3, k3", "gflop": round(flops / 1e9, 3), "seconds": round(seconds, 4),
            "gflops_per_s": round(flops / seconds / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = make_batches(args.side, seed=1)
    steps = {}
    with our_search_run(args.side, False) as run:
        monai = MonaiSearchStep(run.space, False)
        flops = flops_of(lambda: monai.step(batches))
        for name, step in (("ours", OurSearchStep(run)), ("monai", monai)):
            seconds = median_seconds(lambda: step.step(batches), args.repeats)
            steps[name] = {"gflop": round(flops / 1e9, 2), "seconds": round(seconds, 3),
                           "gflops_per_s": round(flops / seconds / 1e9, 2)}
            print(f"{name:5s} search step: {flops / 1e9:7.1f} GFLOP in {seconds:6.2f} s = "
                  f"{flops / seconds / 1e9:6.2f} GFLOP/s", flush=True)
    finest = args.side // 2
    references = {"similar": conv_reference(32, finest, args.repeats), "large": conv_reference(64, finest, args.repeats)}
    for name, ref in references.items():
        print(f"{name:7s} conv3d {ref['shape']}: {ref['gflops_per_s']:6.2f} GFLOP/s", flush=True)
    efficiency = {f"{s}_vs_{r}": round(steps[s]["gflops_per_s"] / references[r]["gflops_per_s"], 3)
                  for s in steps for r in references}
    print("efficiency: " + ", ".join(f"{k} {v:.2f}" for k, v in efficiency.items()))
    print(json.dumps({"bench": "efficiency", "side": args.side, "threads": args.threads, "repeats": args.repeats,
                      "steps": steps, "references": references, "efficiency": efficiency}))


if __name__ == "__main__":
    main()
