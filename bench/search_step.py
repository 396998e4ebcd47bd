"""Search-step wall time: dints3d's SearchRun vs plain MONAI (see bench/search_common.py), same inputs, interleaved.

One search step = weight step + architecture step at L = 12, D = 4, channel_mul 0.5, batch 1, a ``--side``³ patch,
3 classes, CPU, ``--threads`` torch threads, fp32 (or bf16 autocast with ``--amp``). Both start from the same
weights; after one warm-up step each, ``--repeats`` steps alternate which side goes first. Reports the medians and
their ratio (ours / MONAI; below 1 is faster), the first steps' loss agreement, and, with ``--profile``, the
torch.profiler tables of one step each with the share of convolution kernels in the CPU time.
Usage: python bench/search_step.py [--side 64] [--repeats 3] [--threads 1] [--amp] [--profile]
[--checkpoint-cells [--checkpoint-fraction F]] (ours with activation checkpointing of a fraction of the blocks).
The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_common import MonaiSearchStep, OurSearchStep, make_batches, our_search_run  # noqa: E402

CONV_KERNELS = ("conv", "Conv")


def timed(step, batches) -> tuple[float, float]:
    start = time.perf_counter()
    loss = step.step(batches)
    return time.perf_counter() - start, loss


def profile_step(step, batches, label: str) -> dict:
    """Profile one step; print the top ops; return the convolution share of self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.step(batches)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in CONV_KERNELS))
    print(f"\n== {label}: one search step, top ops by self CPU time ==")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return {"self_cpu_s": round(total / 1e6, 2), "conv_share": round(conv / total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each")
    parser.add_argument("--checkpoint-cells", action="store_true", help="ours with search.checkpoint_cells=true")
    parser.add_argument("--checkpoint-fraction", type=float, default=1.0, help="search.checkpoint_fraction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = make_batches(args.side, seed=1)
    with our_search_run(args.side, args.amp, args.checkpoint_cells, args.checkpoint_fraction) as run:
        monai = MonaiSearchStep(run.space, args.amp)
        ours = OurSearchStep(run)
        # The same start: each side's first weight-step loss on the same batch.
        first_ours = float(run.weight_step(*batches[0], 0.0))
        first_monai = monai.weight_step(*batches[0])
        loss_gap = abs(first_ours - first_monai) / abs(first_monai)
        timed(monai, batches), timed(ours, batches)  # warm-up
        times = {"monai": [], "ours": []}
        for r in range(args.repeats):
            order = (("monai", monai), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("monai", monai))
            for name, step in order:
                seconds, _ = timed(step, batches)
                times[name].append(seconds)
                print(f"repeat {r}: {name:5s} {seconds:6.2f} s", flush=True)
        profiles = {}
        if args.profile:
            profiles = {"monai": profile_step(monai, batches, "plain MONAI"), "ours": profile_step(ours, batches, "dints3d")}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["monai"]
    if profiles:  # with convolutions as they are, ours cannot go below MONAI's convolution share
        profiles["bound_with_same_convolutions"] = profiles["monai"]["conv_share"]
    print(f"search step {args.side}^3 {'bf16' if args.amp else 'fp32'}: dints3d {med['ours']:.2f} s, "
          f"MONAI {med['monai']:.2f} s, ratio {ratio:.3f}")
    print(json.dumps({"bench": "search_step", "side": args.side, "amp": args.amp, "threads": args.threads,
                      "checkpoint_cells": args.checkpoint_cells, "checkpoint_fraction": args.checkpoint_fraction,
                      "repeats": args.repeats, "ours_median_s": round(med["ours"], 3),
                      "monai_median_s": round(med["monai"], 3), "ratio": round(ratio, 3),
                      "ours_s": [round(t, 3) for t in times["ours"]], "monai_s": [round(t, 3) for t in times["monai"]],
                      "first_loss_relative_gap": float(f"{loss_gap:.2e}"), **({"profile": profiles} if profiles else {})}))


if __name__ == "__main__":
    main()
