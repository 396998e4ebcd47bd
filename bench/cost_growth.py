"""How a DiNTS search step's time and peak memory grow with the patch and with the number of blocks.

Our search step (``SearchRun.weight_step`` + ``arch_step``, bench/search_common.py) at D = ``--depths`` (default 3,
so that patches need only be multiples of 16 and 48³ and 80³ are valid; D = 4 needs multiples of 32), channel_mul
0.5, batch 1, CPU fp32 (default CPU convolution routing), ``--threads`` torch threads:
- patch sweep: L = 12 blocks, patches ``--sides`` (default 32³, 48³, 64³, 80³);
- block sweep: a ``--block-side``³ patch (default 48³), L = ``--blocks`` (default 3, 6, 9, 12).
Time: median of ``--repeats`` steps after one warm-up, in this process. Peak memory: one step in a fresh subprocess,
peak RSS minus the RSS before it (``search_common.measure_step_peak``; parameters and optimizer state excluded).
Exponents: least-squares slope of log(cost) on log(voxels) or log(blocks); a fit over the two largest points is
reported too, since fixed per-step costs flatten the small end.
Usage: python bench/cost_growth.py [--sides 32 48 64 80] [--blocks 3 6 9 12] [--block-side 48] [--depths 3]
[--repeats 3] [--threads 1]. Last line: JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_common import (  # noqa: E402
    OurSearchStep,
    make_batches,
    measure_step_peak,
    our_search_run,
    run_in_fresh_process,
)


def child(spec: dict) -> dict:
    """Runs in the fresh subprocess: the peak memory of one step."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    with our_search_run(spec["side"], False, num_blocks=spec["blocks"], num_depths=spec["depths"]) as run:
        return measure_step_peak(OurSearchStep(run), make_batches(spec["side"], seed=1), make_batches(32, seed=2))


def step_seconds(side: int, blocks: int, depths: int, repeats: int) -> list[float]:
    torch.manual_seed(0)
    batches = make_batches(side, seed=1)
    with our_search_run(side, False, num_blocks=blocks, num_depths=depths) as run:
        step = OurSearchStep(run)
        step.step(batches)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step.step(batches)
            times.append(time.perf_counter() - start)
    return times


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def sweep(points: list[tuple[int, int]], x_of, args) -> dict:
    rows = []
    for side, blocks in points:
        seconds = statistics.median(step_seconds(side, blocks, args.depths, args.repeats))
        spec = {"side": side, "blocks": blocks, "depths": args.depths, "threads": args.threads}
        peak = run_in_fresh_process(__file__, spec, args.threads)["peak_mib"]
        rows.append({"side": side, "blocks": blocks, "seconds": round(seconds, 3), "peak_mib": round(peak, 1)})
        print(f"  {side}^3, {blocks:2d} blocks: {seconds:7.2f} s/step, peak +{peak:7.1f} MiB", flush=True)
    xs = [x_of(r) for r in rows]
    fit = {}
    for name in ("seconds", "peak_mib"):
        ys = [r[name] for r in rows]
        fit[name] = {"all": round(slope(xs, ys), 3), "largest_two": round(slope(xs[-2:], ys[-2:]), 3)}
    return {"rows": rows, "exponents": fit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 48, 64, 80])
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--block-side", type=int, default=48)
    parser.add_argument("--depths", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    print("patch sweep (12 blocks):")
    patch = sweep([(s, 12) for s in args.sides], lambda r: r["side"] ** 3, args)
    print(f"block sweep ({args.block_side}^3):")
    blocks = sweep([(args.block_side, b) for b in args.blocks], lambda r: r["blocks"], args)
    for name, result, unit in (("patch voxels", patch, "voxels"), ("blocks", blocks, "blocks")):
        e = result["exponents"]
        print(f"vs {name}: time ∝ {unit}^{e['seconds']['all']} (largest two: {e['seconds']['largest_two']}), "
              f"peak memory ∝ {unit}^{e['peak_mib']['all']} (largest two: {e['peak_mib']['largest_two']})")
    print(json.dumps({"bench": "cost_growth", "depths": args.depths, "threads": args.threads, "repeats": args.repeats,
                      "patch_sweep": patch, "block_sweep": blocks}))


if __name__ == "__main__":
    main()
