"""Time the demo search waits for data, as the search loop itself logs it (TensorBoard ``data/wait_fraction``).

Makes the demo's synthetic task (``dints3d demo`` defaults: 10 cases of 40³, 2 test cases, seed 0), prepares it with
the ``demo`` config, then runs ``python -m dints3d search --config demo`` (the CLI, in a subprocess) once with the
demo's caching (``data.cache_rate=1.0``) and once without (``data.cache_rate=0``: every patch is loaded and
preprocessed from NIfTI). The loop accumulates wall time spent in ``next(loader)`` and in the steps and logs
wait / (wait + steps) every 10 iterations; the last value covers the whole run (validation excluded).
Usage: python bench/data_wait.py [--iterations 60] [--threads 1] [--keep DIR]. Last line: JSON summary.
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

from dints3d.config import config_path, load_config
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.demo import DemoSettings


def wait_fractions(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, cumulative wait fraction) as logged by the loop."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("data/wait_fraction")]


def search(work: Path, out: Path, iterations: int, cache_rate: float, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "dints3d", "search", "--config", "demo", "--work", str(work), "--out", str(out),
           "--set", f"search.iterations={iterations}", "--set", f"data.cache_rate={cache_rate}",
           "--set", f"search.val_interval={iterations}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"search failed:\n{done.stderr[-3000:]}")
    logged = wait_fractions(out)
    return {"cache_rate": cache_rate, "seconds": round(time.perf_counter() - start, 1),
            "final_wait_fraction": round(logged[-1][1], 4), "max_logged_wait_fraction": round(max(v for _, v in logged), 4),
            "logged": [[step, round(value, 4)] for step, value in logged]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60, help="search iterations (the demo config: 60)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dints3d-datawait-") as tmp:
        root = Path(args.keep or tmp)
        settings = DemoSettings()
        cfg = load_config(config_path(settings.config))
        task = make_msd_task(root / "task", cases=settings.cases, test_cases=settings.test_cases, size=settings.size,
                             seed=settings.seed, name="Demo")
        prepare(task, root / "work", folds=settings.folds, seed=settings.seed, config=cfg, progress=False)
        runs = {}
        for name, rate in (("cached", 1.0), ("uncached", 0.0)):
            runs[name] = search(root / "work", root / f"search_{name}", args.iterations, rate, args.threads)
            print(f"{name:8s}: wait fraction {100 * runs[name]['final_wait_fraction']:.2f} % of step time "
                  f"({runs[name]['seconds']:.0f} s run)", flush=True)
    print(json.dumps({"bench": "data_wait", "iterations": args.iterations, "threads": args.threads,
                      "cached_wait_fraction": runs["cached"]["final_wait_fraction"],
                      "uncached_wait_fraction": runs["uncached"]["final_wait_fraction"], "runs": runs}))


if __name__ == "__main__":
    main()
