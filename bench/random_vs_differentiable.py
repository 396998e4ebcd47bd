"""Differentiable DiNTS search vs random search at equal compute, on a synthetic MSD task.

1. A synthetic CT task (``make_msd_task``) is prepared; its cases are split into a search pool and held-out cases
   (the datalist is rewritten: fold 0 = the pool's own train/validation split used by both searches, fold 1 = the
   whole pool for retraining and the held-out cases for the final score), so neither search sees the cases that
   decide the comparison.
2. The differentiable search (``SearchRun``) runs; its CPU time T (``time.process_time``, one thread: other work
   on a shared machine does not count) is the compute budget.
3. Random search (``dints3d random-search --space dints``) samples architectures of the same grid within the same
   memory budget (memory ratio ≤ σ) and short-trains each until its summed trial CPU time reaches T; the best by
   validation Dice wins (no top-k re-evaluation, so all of its compute is in the trials).
4. Both winners, the first uniform random sample as a reference, and MONAI's SegResNetDS and DynUNet (nnU-Net
   rule, :mod:`dints3d.spaces.baselines`) widened or narrowed to the differentiable winner's predicted training
   memory (``channel_mul``, within a few %, predicted for a GPU step of the same patches with AMP) are retrained
   with the same schedule from several seeds on the whole pool and scored on the held-out cases. Each row states
   its predicted peak memory relative to the searched network's.

Prints a table and, last, one JSON line. ``--scale`` multiplies every iteration count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dints3d.config import load_config
from dints3d.cost.sizing import channel_mul_for_memory, peak_bytes
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.random_search.run import memory_limit, network_random_search
from dints3d.random_search.train import NetworkEvaluator
from dints3d.random_search.trials import read_rows
from dints3d.search.loop import SearchRun
from dints3d.spaces.factory import architecture_from_dict, load_architecture
from dints3d.utils.io import read_json, write_json
from dints3d.utils.runtime import init_runtime


def settings(args) -> list[str]:
    return [
        "device=cpu", f"seed={args.seed}", "data.fold=0", f"data.patch_size=[{args.patch}]",
        "data.num_samples=2", "data.batch_size=1", "dints.num_blocks=4", "dints.num_depths=2",
        "dints.channel_mul=0.25", "search.amp=false", "train.amp=false", "train.channel_mul=0.5",
        f"search.iterations={args.search_iterations}", f"search.val_interval={args.search_iterations}",
        f"search.checkpoint_interval={args.search_iterations}", "search.val_overlap=0.0", "search.arch_lr=0.01",
        "search.ram_cost_factor=0.8", f"random_search.iterations={args.trial_iterations}",
        "random_search.trials=100000", "random_search.top_k=0", "random_search.explore_ratio=0.5",
    ]


def held_out_datalist(work: Path, held_out: int, validation: int) -> dict:
    """Rewrite ``datalist.json``: fold 0 = the search pool's train / validation, fold 1 = pool / held-out cases."""
    path = work / "datalist.json"
    data = read_json(path)
    cases = data["training"]
    pool, final = cases[:-held_out], cases[-held_out:]
    train, val = pool[:-validation], pool[-validation:]
    half = (len(train) + 1) // 2
    data.update(fold0_train=train, fold0_validation=val, fold0_weights=train[:half], fold0_arch=train[half:],
                fold1_train=pool, fold1_validation=final, fold1_weights=pool, fold1_arch=pool)
    write_json(path, data)
    return {"search_train": len(train), "search_validation": len(val), "retrain": len(pool), "held_out": len(final)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--size", type=int, default=40, help="synthetic volume side (voxels)")
    parser.add_argument("--patch", default="24,24,24")
    parser.add_argument("--search-iterations", type=int, default=300)
    parser.add_argument("--trial-iterations", type=int, default=40)
    parser.add_argument("--retrain-iterations", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds per architecture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every iteration count")
    parser.add_argument("--keep", help="keep the run folders here instead of a temporary folder")
    args = parser.parse_args()
    for name in ("search_iterations", "trial_iterations", "retrain_iterations"):
        setattr(args, name, max(1, round(getattr(args, name) * args.scale)))
    torch.set_num_threads(args.threads)
    runtime = init_runtime("cpu")

    with tempfile.TemporaryDirectory(prefix="dints3d-bench-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        task = make_msd_task(root / "task", cases=args.cases, test_cases=0, size=args.size, seed=args.seed + 11)
        prepare(task, root / "work", folds=2, seed=args.seed, progress=False)
        split = held_out_datalist(root / "work", args.held_out, validation=3)
        cfg = load_config(None, settings(args))

        start = time.process_time()
        search = SearchRun(cfg, root / "work", root / "search", runtime)
        search_arch = search.run()
        search.close()
        search_seconds = time.process_time() - start
        print(f"differentiable search: {args.search_iterations} iterations in {search_seconds:.0f} CPU s",
              file=sys.stderr)

        random_cfg = load_config(None, [*settings(args), f"random_search.hours={search_seconds / 3600}"])
        start = time.process_time()
        random = network_random_search(random_cfg, root / "work", root / "random", runtime, "dints")
        random.clock = time.process_time
        random_arch = random.run()
        random_seconds = time.process_time() - start
        rows = read_rows(root / "random" / "trials.csv")
        print(f"random search: {len(rows)} trials in {random_seconds:.0f} CPU s", file=sys.stderr)

        plan = search.plan
        patch = search.patch
        final_cfg = load_config(None, [*settings(args), "data.fold=1"])
        evaluator = NetworkEvaluator(final_cfg, root / "work", runtime, plan, patch)
        limit = memory_limit(cfg, "dints", int(plan["in_channels"]), int(plan["out_channels"]), patch, "cpu")
        channels, classes, width = int(plan["in_channels"]), int(plan["out_channels"]), final_cfg.train.channel_mul
        searched = load_architecture(search_arch)
        patches = final_cfg.data.batch_size * final_cfg.data.num_samples

        def peak(arch, mul: float) -> int:
            return peak_bytes(arch, channels, classes, patch, mul, patches, True)

        target = peak(searched, width)
        candidates = {
            "differentiable search": (searched, width),
            "random search (best of K)": (load_architecture(random_arch), width),
            "one uniform random sample": (architecture_from_dict(rows[0].arch), width),
        }
        # planned for the patch this bench trains (the plan's own patch is larger), one loss for every row
        bench_plan = {**plan, "patch_size": list(patch)}
        for name in ("segresnet", "dynunet"):
            baseline = load_architecture(name, bench_plan, deep_supervision=False)
            mul, _ = channel_mul_for_memory(baseline, channels, classes, patch, target, batch=patches, amp=True)
            candidates[f"{baseline.display_name} @ equal memory"] = (baseline, mul)
        results = {}
        for name, (arch, mul) in candidates.items():
            scores = [evaluator(arch, args.retrain_iterations, 1000 + s, mul).score for s in range(args.seeds)]
            dints = getattr(arch, "arch_code_a", None) is not None
            results[name] = {"held_out_dice": scores, "mean": statistics.mean(scores),
                             "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                             "memory_ratio": limit.measure(arch) if dints else None,
                             "peak_vs_searched": peak(arch, mul) / target, "channel_mul": mul,
                             "active_paths": int(arch.arch_code_a.sum()) if dints else None}
            print(f"{name}: held-out Dice {statistics.mean(scores):.4f} ± {results[name]['stdev']:.4f}",
                  file=sys.stderr)

    print("| architecture | held-out Dice (mean ± sd over seeds) | memory ratio (σ) | predicted peak vs searched "
          "| channel_mul | active paths |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        print(f"| {name} | {r['mean']:.4f} ± {r['stdev']:.4f} | {ratio} | {r['peak_vs_searched']:.2f} | "
              f"{r['channel_mul']:.3g} | {r['active_paths'] or '—'} |")
    short = sorted(r.score for r in rows)
    summary = {
        "bench": "random_vs_differentiable", "split": split, "search_cpu_seconds": round(search_seconds, 1),
        "random_cpu_seconds": round(random_seconds, 1), "random_trials": len(rows),
        "random_trial_cpu_seconds": round(sum(r.seconds for r in rows), 1),
        "random_short_dice": {"best": short[-1], "median": statistics.median(short), "worst": short[0]},
        "retrain_iterations": args.retrain_iterations, "seeds": args.seeds,
        **{name.split(" (")[0].replace(" @ ", "_at_").replace(" ", "_"): r for name, r in results.items()},
        "ratio_differentiable_to_random": results["differentiable search"]["mean"]
        / results["random search (best of K)"]["mean"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
