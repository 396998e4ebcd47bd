"""Benchmark the tiny DiNTS search (``configs/demo.yaml``) with 1 and 2 processes under torchrun (CPU, gloo).

Side by side in one run, on one synthetic task: 1 process with 1 thread, 2 processes with 1 thread each
(``torchrun --standalone --nproc_per_node 2``, gloo all-reduces) and 1 process with 2 threads (the other way to use
both cores). Each setup builds a ``SearchRun`` (the code ``dints3d search`` runs), searches ``--warmup`` iterations,
then times ``--iterations`` more between two barriers: steady-state search steps only, without start-up, caching,
validation or decoding. Every iteration is a weight step and an architecture step (no warm-up phase), each process
drawing ``batch_size × num_samples`` patches for each, so a 2-process iteration handles twice the patches.
Setups are interleaved ``--repeats`` times and the fastest timing of each is kept. The last line printed is one JSON
object. Run: ``python bench/distributed.py [--iterations 20] [--warmup 3] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEARCH = ["device=cpu", "data.max_cases=2", "search.iterations=100000", "search.warmup_fraction=0.0",
          "search.val_interval=100000", "search.checkpoint_interval=100000", "search.check_replicas=true"]
#: name → (processes, threads per process)
SETUPS = {"1 process × 1 thread": (1, 1), "2 processes × 1 thread": (2, 1), "1 process × 2 threads": (1, 2)}


def worker(args: argparse.Namespace) -> None:
    """One process of a setup: search, then time ``args.iterations`` steps; rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist

    from dints3d.config import config_path, load_config
    from dints3d.search.loop import SearchRun
    from dints3d.utils.runtime import init_runtime

    torch.set_num_threads(args.threads)
    cfg = load_config(config_path("demo"), SEARCH)
    rt = init_runtime(cfg.device)
    run = SearchRun(cfg, args.work, args.out, rt)
    run.run(stop_after=args.warmup)
    if rt.distributed:
        dist.barrier()
    start = time.perf_counter()
    run.run(stop_after=args.warmup + args.iterations)
    if rt.distributed:
        dist.barrier()
    seconds = time.perf_counter() - start
    run.close()
    rt.close()
    if rt.is_main:
        samples = rt.world_size * cfg.data.batch_size * cfg.data.num_samples
        print(json.dumps({"seconds_per_iteration": seconds / args.iterations, "samples_per_iteration": samples}))


def time_setup(script: Path, work: Path, out: Path, processes: int, threads: int, args: argparse.Namespace) -> dict:
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launch, str(script), "--worker", "--work", str(work), "--out", str(out), "--threads", str(threads),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) × {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per setup")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per setup (fastest kept)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    dints3d = [sys.executable, "-m", "dints3d"]
    load_before = os.getloadavg()[0]
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dints3d-bench-") as tmp:
        task, work = Path(tmp) / "task", Path(tmp) / "work"
        subprocess.run([*dints3d, "synth", "--out", str(task), "--cases", "8", "--test-cases", "0", "--size", "40"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*dints3d, "prepare", "--task", str(task), "--out", str(work)], check=True,
                       stdout=subprocess.DEVNULL)
        run = 0
        for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every setup alike
            for name, (processes, threads) in SETUPS.items():
                run += 1
                timing = time_setup(Path(__file__).resolve(), work, Path(tmp) / f"run{run}", processes, threads,
                                    args)
                if name not in best or timing["seconds_per_iteration"] < best[name]["seconds_per_iteration"]:
                    best[name] = timing
    rows = {name: {"seconds_per_iteration": round(t["seconds_per_iteration"], 4),
                   "samples_per_second": round(t["samples_per_iteration"] / t["seconds_per_iteration"], 3)}
            for name, t in best.items()}
    base = rows["1 process × 1 thread"]["samples_per_second"]
    print(f"{'setup':<24} {'s/iteration':>12} {'samples/s':>10} {'× 1 process':>12}")
    for name, row in rows.items():
        print(f"{name:<24} {row['seconds_per_iteration']:>12.3f} {row['samples_per_second']:>10.2f} "
              f"{row['samples_per_second'] / base:>12.2f}")
    result = {"bench": "distributed", "iterations": args.iterations, "warmup": args.warmup, "repeats": args.repeats,
              "setups": rows,
              "speedup_2_processes": round(rows["2 processes × 1 thread"]["samples_per_second"] / base, 3),
              "speedup_2_threads": round(rows["1 process × 2 threads"]["samples_per_second"] / base, 3),
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
