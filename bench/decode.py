"""Decoding cost: dints3d's node-set DP vs MONAI's dense-matrix Dijkstra ``TopologySearch.decode()``.

Time: both decode the same random logits at L = 12, D = 4, interleaved in this process (median of repeats), and the
optimal costs are checked to agree. Memory: each decoder runs once in a fresh subprocess; extra memory is the peak
resident set during the call above the resident set just before it (Linux VmHWM, reset via /proc/self/clear_refs),
so numpy, scipy and torch allocations all count. Ours is also timed at D = 5 (MONAI's would need ~77 GB).
Usage: python bench/decode.py [--monai-repeats 3] [--repeats 50]. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from monai.networks.nets.dints import TopologySearch

from dints3d.spaces.dints.decode import decode_topology, path_cost
from dints3d.spaces.dints.relaxation import pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology

NUM_BLOCKS = 12


def random_logits(num_depths: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    paths = 3 * num_depths - 2
    return 2 * torch.randn(NUM_BLOCKS, paths, generator=gen), 1 + torch.randn(NUM_BLOCKS, paths, 5, generator=gen)


def monai_space(beta: torch.Tensor, alpha: torch.Tensor) -> TopologySearch:
    space = TopologySearch(channel_mul=0.125, num_blocks=NUM_BLOCKS, num_depths=4)
    with torch.no_grad():
        space.log_alpha_a.copy_(beta)
        space.log_alpha_c.copy_(alpha)
    return space


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure_extra_memory(which: str, num_depths: int) -> None:
    """Subprocess entry: print the extra peak RSS (MB) of one decode call."""
    beta, alpha = random_logits(num_depths, seed=0)
    if which == "monai":
        space = monai_space(beta, alpha)
        call = space.decode
    else:
        topology = DintsTopology(num_depths)

        def call():
            return decode_topology(beta, alpha, topology)

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = _status_kb("VmRSS")
    call()
    print((_status_kb("VmHWM") - before) / 1024)


def extra_memory_mb(which: str, num_depths: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", which, "--depths", str(num_depths)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monai-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--measure", choices=["monai", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--depths", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        measure_extra_memory(args.measure, args.depths)
        return

    topology = DintsTopology(4)
    monai_times, our_times, cost_gaps = [], [], []
    for seed in range(args.monai_repeats):
        beta, alpha = random_logits(4, seed)
        space = monai_space(beta, alpha)
        elapsed, (_, monai_code, _, _) = timed(space.decode)
        monai_times.append(elapsed)
        ours = decode_topology(beta, alpha, topology)
        monai_cost = path_cost(monai_code, pattern_probabilities(beta.double(), topology.patterns))
        cost_gaps.append(abs(ours.cost - monai_cost) / monai_cost)
    assert max(cost_gaps) < 1e-9, cost_gaps
    for seed in range(args.repeats):
        beta, alpha = random_logits(4, seed)
        our_times.append(timed(lambda: decode_topology(beta, alpha, topology))[0])

    topology5 = DintsTopology(5)
    d5_times = []
    for seed in range(args.repeats):
        beta, alpha = random_logits(5, seed)
        d5_times.append(timed(lambda: decode_topology(beta, alpha, topology5))[0])

    monai_mb, ours_mb, ours5_mb = extra_memory_mb("monai", 4), extra_memory_mb("ours", 4), extra_memory_mb("ours", 5)
    monai_s, ours_s, ours5_s = (statistics.median(t) for t in (monai_times, our_times, d5_times))
    print(f"L=12 D=4: dints3d {1e3 * ours_s:.2f} ms / {ours_mb:.1f} MB, MONAI {monai_s:.2f} s / {monai_mb:.0f} MB")
    print(f"L=12 D=5: dints3d {1e3 * ours5_s:.2f} ms / {ours5_mb:.1f} MB")
    summary = {
        "bench": "decode",
        "num_blocks": NUM_BLOCKS,
        "threads": 1,
        "monai_repeats": args.monai_repeats,
        "repeats": args.repeats,
        "d4_ours_median_ms": round(1e3 * ours_s, 3),
        "d4_monai_median_s": round(monai_s, 3),
        "d4_speedup": round(monai_s / ours_s),
        "d4_ours_extra_mb": round(ours_mb, 2),
        "d4_monai_extra_mb": round(monai_mb, 1),
        # RSS moves in 4 KiB pages; the floor keeps the ratio finite if ours touched none.
        "d4_memory_ratio": round(monai_mb / max(ours_mb, 4 / 1024), 1),
        "d4_max_relative_cost_gap": max(cost_gaps),
        "d5_ours_median_ms": round(1e3 * ours5_s, 3),
        "d5_ours_extra_mb": round(ours5_mb, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
