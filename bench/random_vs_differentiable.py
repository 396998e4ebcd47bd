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

``--search-seeds N`` repeats steps 2–4 with search seeds seed … seed+N−1 on the same data and split (the baselines
are sized once, to the searched networks' mean predicted memory): one search seed cannot rank two search methods;
the spread over search seeds is reported per row.

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
    parser.add_argument("--seed", type=int, default=0, help="data seed and first search seed")
    parser.add_argument("--search-seeds", type=int, default=1,
                        help="repeat both searches with this many search seeds (seed, seed+1, …): one search seed "
                             "cannot rank two search methods")
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
        seeds = list(range(args.seed, args.seed + args.search_seeds))
        pairs = {s: search_pair(args, root, runtime, s, args.search_seeds > 1) for s in seeds}
        first = pairs[seeds[0]]["search"]

        plan, patch = first.plan, first.patch
        final_cfg = load_config(None, [*settings(args), "data.fold=1"])
        evaluator = NetworkEvaluator(final_cfg, root / "work", runtime, plan, patch)
        cfg = load_config(None, settings(args))
        limit = memory_limit(cfg, "dints", int(plan["in_channels"]), int(plan["out_channels"]), patch, "cpu")
        channels, classes, width = int(plan["in_channels"]), int(plan["out_channels"]), final_cfg.train.channel_mul
        patches = final_cfg.data.batch_size * final_cfg.data.num_samples

        def peak(arch, mul: float) -> int:
            return peak_bytes(arch, channels, classes, patch, mul, patches, True)

        # per row: (architecture, channel_mul) for each search seed; the baselines do not depend on it
        candidates: dict[str, list[tuple]] = {name: [] for name in DINTS_ROWS}
        for s in seeds:
            pair = pairs[s]
            candidates[DINTS_ROWS[0]].append((load_architecture(pair["differentiable"]), width))
            candidates[DINTS_ROWS[1]].append((load_architecture(pair["random"]), width))
            candidates[DINTS_ROWS[2]].append((architecture_from_dict(pair["rows"][0].arch), width))
        # sized to the searched networks' mean predicted memory (each row reports its own ratio to it)
        target = statistics.mean(peak(arch, mul) for arch, mul in candidates[DINTS_ROWS[0]])
        # planned for the patch this bench trains (the plan's own patch is larger), one loss for every row
        bench_plan = {**plan, "patch_size": list(patch)}
        for name in ("segresnet", "dynunet"):
            baseline = load_architecture(name, bench_plan, deep_supervision=False)
            mul, _ = channel_mul_for_memory(baseline, channels, classes, patch, target, batch=patches, amp=True)
            candidates[f"{baseline.display_name} @ equal memory"] = [(baseline, mul)]
        results = {}
        for name, versions in candidates.items():
            results[name] = retrain_row(evaluator, versions, args, limit, peak, target)
            print(f"{name}: held-out Dice {results[name]['mean']:.4f} ± {results[name]['stdev']:.4f}",
                  file=sys.stderr)

    print_table(results, args.search_seeds)
    summary = {
        "bench": "random_vs_differentiable", "split": split, "search_seeds": seeds,
        "search_cpu_seconds": [round(pairs[s]["search_seconds"], 1) for s in seeds],
        "random_cpu_seconds": [round(pairs[s]["random_seconds"], 1) for s in seeds],
        "random_trials": [len(pairs[s]["rows"]) for s in seeds],
        "random_trial_cpu_seconds": [round(sum(r.seconds for r in pairs[s]["rows"]), 1) for s in seeds],
        "random_short_dice": [short_scores(pairs[s]["rows"]) for s in seeds],
        "retrain_iterations": args.retrain_iterations, "seeds": args.seeds,
        **{name.split(" (")[0].replace(" @ ", "_at_").replace(" ", "_"): r for name, r in results.items()},
        "ratio_differentiable_to_random": results[DINTS_ROWS[0]]["mean"] / results[DINTS_ROWS[1]]["mean"],
    }
    print(json.dumps(summary))
    return 0


DINTS_ROWS = ("differentiable search", "random search (best of K)", "one uniform random sample")


def search_pair(args, root: Path, runtime, seed: int, per_seed_folders: bool) -> dict:
    """Both searches with search seed ``seed``: the differentiable one, then random search given its CPU time."""
    tag = f"_seed{seed}" if per_seed_folders else ""
    cfg = load_config(None, [*settings(args), f"seed={seed}"])
    start = time.process_time()
    search = SearchRun(cfg, root / "work", root / f"search{tag}", runtime)
    search_arch = search.run()
    search.close()
    search_seconds = time.process_time() - start
    print(f"differentiable search (seed {seed}): {args.search_iterations} iterations in {search_seconds:.0f} CPU s",
          file=sys.stderr)

    random_cfg = load_config(None, [*settings(args), f"seed={seed}", f"random_search.hours={search_seconds / 3600}"])
    start = time.process_time()
    random = network_random_search(random_cfg, root / "work", root / f"random{tag}", runtime, "dints")
    random.clock = time.process_time
    random_arch = random.run()
    random_seconds = time.process_time() - start
    rows = read_rows(root / f"random{tag}" / "trials.csv")
    print(f"random search (seed {seed}): {len(rows)} trials in {random_seconds:.0f} CPU s", file=sys.stderr)
    return {"search": search, "differentiable": search_arch, "search_seconds": search_seconds,
            "random": random_arch, "random_seconds": random_seconds, "rows": rows}


def short_scores(rows) -> dict:
    """Best, median and worst short-trial validation Dice of one random search."""
    short = sorted(r.score for r in rows)
    return {"best": short[-1], "median": statistics.median(short), "worst": short[0]}


def retrain_row(evaluator, versions: list[tuple], args, limit, peak, target: float) -> dict:
    """Retrain each (architecture, channel_mul) of a row from ``args.seeds`` seeds and score it on the held-out cases.

    ``versions`` holds one entry per search seed (one for the baselines). ``mean`` / ``stdev`` are over every
    (search seed, retraining seed) score; ``search_seed_stdev`` over the per-search-seed means."""
    per_version = []
    for arch, mul in versions:
        scores = [evaluator(arch, args.retrain_iterations, 1000 + s, mul).score for s in range(args.seeds)]
        dints = getattr(arch, "arch_code_a", None) is not None
        per_version.append({"held_out_dice": scores, "mean": statistics.mean(scores),
                            "memory_ratio": limit.measure(arch) if dints else None,
                            "peak_vs_searched": peak(arch, mul) / target, "channel_mul": mul,
                            "active_paths": int(arch.arch_code_a.sum()) if dints else None})
    scores = [x for v in per_version for x in v["held_out_dice"]]
    means = [v["mean"] for v in per_version]

    def average(key):
        values = [v[key] for v in per_version]
        return None if values[0] is None else statistics.mean(values)

    return {"held_out_dice": scores, "mean": statistics.mean(scores),
            "stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "search_seed_means": means,
            "search_seed_stdev": statistics.stdev(means) if len(means) > 1 else None,
            "memory_ratio": average("memory_ratio"), "peak_vs_searched": average("peak_vs_searched"),
            "channel_mul": average("channel_mul"), "active_paths": average("active_paths"),
            "per_search_seed": per_version}


def print_table(results: dict, search_seeds: int) -> None:
    spread = " | mean per search seed (sd)" if search_seeds > 1 else ""
    print(f"| architecture | held-out Dice (mean ± sd over all runs) | memory ratio (σ) | predicted peak vs searched "
          f"| channel_mul | active paths{spread} |")
    print("|---|---|---|---|---|---|" + ("---|" if search_seeds > 1 else ""))
    for name, r in results.items():
        ratio = "—" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        paths = "—" if r["active_paths"] is None else f"{r['active_paths']:.3g}"
        line = (f"| {name} | {r['mean']:.4f} ± {r['stdev']:.4f} | {ratio} | {r['peak_vs_searched']:.2f} | "
                f"{r['channel_mul']:.3g} | {paths} |")
        if search_seeds > 1:
            per_seed = " / ".join(f"{m:.3f}" for m in r["search_seed_means"])
            sd = "" if r["search_seed_stdev"] is None else f" (± {r['search_seed_stdev']:.3f})"
            line += f" {per_seed}{sd} |"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
