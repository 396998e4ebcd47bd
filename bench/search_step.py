"""Search-step wall time: dints3d's SearchRun vs plain MONAI (see bench/search_common.py), same inputs, interleaved.

One search step = weight step + architecture step at L = 12, D = 4, channel_mul 0.5, batch 1, a ``--side``³ patch,
3 classes, CPU, ``--threads`` torch threads, fp32 (or bf16 autocast with ``--amp``). Three variants start from the
same weights: ``monai`` (the baseline), ``ours_same_kernels`` (``search.cpu_conv_routing=false``: every convolution
runs the kernel PyTorch picks, as in the baseline — the figure that carries over to a GPU) and ``ours``
(the default, ``cpu_conv_routing=true``: batch-1 convolutions PyTorch would run with ``slow_conv3d`` go to oneDNN,
``dints3d/spaces/dints/cpu_conv.py``). After one warm-up step each, ``--repeats`` rounds run every variant once, in rotating
order. Reports the medians and ratios to MONAI (below 1 is faster), the first steps' loss agreement, and, with
``--profile``, the torch.profiler tables of one step each with the share of convolution kernels in the CPU time.
Usage: python bench/search_step.py [--side 64] [--repeats 3] [--threads 1] [--amp] [--profile]
[--checkpoint-cells [--checkpoint-fraction F]] (ours with activation checkpointing of a fraction of the blocks).
The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
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
    with contextlib.ExitStack() as stack:
        runs = {name: stack.enter_context(our_search_run(args.side, args.amp, args.checkpoint_cells,
                                                         args.checkpoint_fraction, routing=routing))
                for name, routing in (("ours", True), ("ours_same_kernels", False))}
        runs["ours_same_kernels"].space.load_state_dict(runs["ours"].space.state_dict())
        steps = {"monai": MonaiSearchStep(runs["ours"].space, args.amp),
                 **{name: OurSearchStep(run) for name, run in runs.items()}}
        # The same start: each variant's first weight-step loss on the same batch.
        first = {name: float(run.weight_step(*batches[0], 0.0)) for name, run in runs.items()}
        first["monai"] = steps["monai"].weight_step(*batches[0])
        loss_gap = max(abs(v - first["monai"]) for v in first.values()) / abs(first["monai"])
        for step in steps.values():
            timed(step, batches)  # warm-up
        names = list(steps)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:
                seconds, _ = timed(steps[name], batches)
                times[name].append(seconds)
                print(f"repeat {r}: {name:17s} {seconds:6.2f} s", flush=True)
        profiles = {}
        if args.profile:
            profiles = {name: profile_step(step, batches, name) for name, step in steps.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: round(med[k] / med["monai"], 3) for k in names if k != "monai"}
    if profiles:  # with the baseline's convolution kernels, ours cannot go below MONAI's convolution share
        profiles["bound_with_same_convolutions"] = profiles["monai"]["conv_share"]
    print(f"search step {args.side}^3 {'bf16' if args.amp else 'fp32'}: "
          + ", ".join(f"{k} {med[k]:.2f} s" for k in names) + "; vs MONAI: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(json.dumps({"bench": "search_step", "side": args.side, "amp": args.amp, "threads": args.threads,
                      "checkpoint_cells": args.checkpoint_cells, "checkpoint_fraction": args.checkpoint_fraction,
                      "repeats": args.repeats, "median_s": {k: round(v, 3) for k, v in med.items()},
                      "ratio_vs_monai": ratios, "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
                      "first_loss_relative_gap": float(f"{loss_gap:.2e}"), **({"profile": profiles} if profiles else {})}))


if __name__ == "__main__":
    main()
