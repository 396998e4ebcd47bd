"""What the search ships against what a user gets without searching: K-fold cross-validation of every candidate
architecture with the same recipe, iterations and patch, on synthetic tasks of different character.

Tasks (``dints3d synth``): ``ct`` (one CT-like channel, an organ with a lesion) and ``brain`` (two MR-like channels,
anisotropic 0.8 × 0.8 × 2.6–4 mm voxels, a thin convoluted grey-matter ribbon around white matter).

Candidates, for each fold k (their models are trained on fold k's training cases, scored on its validation cases):

- ``searched``: a DiNTS search on fold k's two training halves (``data.fold = k``), retrained at ``train.channel_mul``;
- ``dints-cvpr``: the paper's architecture, sized to the searched network's predicted training memory;
- ``segresnet`` / ``dynunet``: MONAI's SegResNetDS and the nnU-Net-planned DynUNet at their default width, and
  sized to the searched network's predicted memory (``@mem``, ±5 %: :func:`dints3d.cost.sizing.channel_mul_for_memory`);
- ``segresnet-lite @mem``: SegResNetDS without its deep encoder and deep supervision (one residual block per level,
  one output head; ``OUT/<task>/work/segresnet-lite.json``), sized the same way: an ablation of SegResNet, trained
  only when ``--candidates`` names it;
- ``searched (dints recipe)``: the searched network trained with the DiNTS paper's recipe instead of nnU-Net's.

Reported per candidate: Dice per class over the out-of-fold cases (mean ± sd over folds of the fold means), the mean
foreground Dice, the searched network's paired gap to the candidate (``searched − candidate`` per fold, on the same
validation cases: mean ± sd over folds, the spread a claimed win must exceed), parameters, predicted training peak (CUDA rule, AMP, batch as trained), training wall time per fold
on this machine (one validation, at the end: ``model.pt`` is the final model). Every stage is skipped when its output exists (rerun to resume). Prints a markdown table per task
and, last, one JSON line; writes ``OUT/<task>/results.json`` and ``OUT/results.md``.

    python bench/accuracy.py --out runs/accuracy [--tasks ct brain] [--folds 5] [--iterations 300]

``--run-folds N`` trains and scores only the first N folds of the K-fold split (mean ± sd over those N folds);
``--fold-list 1,3`` only the listed folds. Since every stage resumes, folds can run in parallel processes on one
``--out`` (start the second once ``OUT/<task>/work/plan.json`` exists); a last run with ``--run-folds K`` then only
collects and scores what they trained:

    python bench/accuracy.py --out runs/cv --tasks brain --fold-list 0,2,4 &   # one process per core
    python bench/accuracy.py --out runs/cv --tasks brain --fold-list 1,3
    python bench/accuracy.py --out runs/cv --tasks brain --run-folds 5          # the table over all 5 folds

``--candidates`` keeps the named rows only (e.g. ``searched "segresnet @mem" "dynunet @mem" "segresnet default"``).
``--score-train`` also segments each fold's own training cases with its model (``<bundle>/cv/fit/fold<k>/``) and adds
two columns: their mean foreground Dice, and its paired drop to the validation cases (``training − validation``):
a network that under-fits scores low on its own training cases, one that over-fits drops far from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import yaml

from dints3d.bundle.crossval import (
    fold_dir,
    predict_out_of_fold,
    predict_training_cases,
    score_predictions,
    train_folds,
)
from dints3d.bundle.export import export_bundle
from dints3d.config import config_path, load_config
from dints3d.cost.sizing import channel_mul_for_memory, peak_bytes
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task
from dints3d.search.loop import SearchRun
from dints3d.spaces.factory import load_architecture
from dints3d.utils.io import read_json, write_json, write_text
from dints3d.utils.runtime import init_runtime

#: patches per training step: train.batch_size volumes × data.num_samples patches each (as the bundle trains)
PATCHES_PER_STEP = 4

#: candidates trained only when --candidates names them (ablations, not what a user would pick)
OPT_IN = {"segresnet-lite @mem"}

TASKS = {
    "ct": {"modalities": 1, "anisotropic": False, "anatomy": "abdomen"},
    "brain": {"modalities": 2, "anisotropic": True, "anatomy": "brain"},
}


def patch_of(args: argparse.Namespace) -> list[int]:
    return [int(p) for p in args.patch.split(",")]


def folds_to_run(args: argparse.Namespace) -> list[int]:
    """``--fold-list`` if given, else the first ``--run-folds`` (default: all) folds."""
    if args.fold_list:
        folds = [int(f) for f in args.fold_list.split(",")]
        if any(not 0 <= f < args.folds for f in folds):
            raise SystemExit(f"--fold-list {args.fold_list}: folds are 0 … {args.folds - 1}")
        return folds
    return list(range(args.run_folds or args.folds))


def settings(args: argparse.Namespace, fold: int) -> list[str]:
    """The run's config overrides (on top of configs/demo.yaml) for fold ``fold``."""
    return [
        "device=cpu", f"seed={args.seed}", f"data.fold={fold}", "data.num_samples=2", "data.batch_size=1",
        f"data.patch_size=[{args.patch}]", f"dints.num_blocks={args.blocks}", "dints.num_depths=3", "dints.channel_mul=0.25",
        f"search.iterations={args.search_iterations}", f"search.val_interval={args.search_iterations}",
        f"search.checkpoint_interval={args.search_iterations}", "search.amp=false",
        f"train.iterations={args.iterations}", f"train.val_interval={args.iterations}",
        "train.batch_size=2", "train.amp=false", f"train.channel_mul={args.channel_mul}", *args.set,
    ]


def searched(args: argparse.Namespace, root: Path, work: Path, fold: int) -> Path:
    """Fold ``fold``'s searched architecture (``root/search/fold<k>/arch.json``), searching if it is not there."""
    out = root / "search" / f"fold{fold}"
    if not (out / "arch.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(config_path("demo"), settings(args, fold))
        runtime = init_runtime("cpu")
        run = SearchRun(cfg, work, out, runtime)
        try:
            run.run()
        finally:
            run.close()
    return out / "arch.json"


def candidates(args: argparse.Namespace, work: Path, arch_file: Path) -> dict[str, dict]:
    """Candidate name → architecture source, channel_mul and recipe, sized against the searched network."""
    plan = read_json(work / "plan.json")
    channels, classes, patch = int(plan["in_channels"]), int(plan["out_channels"]), patch_of(args)
    target = peak_bytes(load_architecture(arch_file), channels, classes, patch, args.channel_mul, PATCHES_PER_STEP, True)
    out = {"searched": {"arch": str(arch_file), "channel_mul": args.channel_mul, "recipe": "nnunet"},
           "searched (dints recipe)": {"arch": str(arch_file), "channel_mul": args.channel_mul, "recipe": "dints"}}
    for name in ("dints-cvpr", "segresnet", "dynunet"):
        arch = load_architecture(name, plan)
        mul, _ = channel_mul_for_memory(arch, channels, classes, patch, target, batch=PATCHES_PER_STEP, amp=True)
        out[f"{name} @mem"] = {"arch": name, "channel_mul": mul, "recipe": "nnunet"}
    segresnet = load_architecture("segresnet", plan)
    lite = dataclasses.replace(segresnet, blocks_down=[1] * len(segresnet.blocks_down), dsdepth=1)
    lite_file = work / "segresnet-lite.json"
    write_json(lite_file, lite.to_dict())
    mul, _ = channel_mul_for_memory(lite, channels, classes, patch, target, batch=PATCHES_PER_STEP, amp=True)
    out["segresnet-lite @mem"] = {"arch": str(lite_file), "channel_mul": mul, "recipe": "nnunet"}
    for name in ("segresnet", "dynunet"):
        out[f"{name} default"] = {"arch": name, "channel_mul": 1.0, "recipe": "nnunet"}
    return out


def run_fold(args: argparse.Namespace, root: Path, work: Path, fold: int, name: str, spec: dict) -> dict:
    """Export, train fold ``fold`` and predict its validation cases; the bundle's facts and training time."""
    bundle = root / "bundles" / name.replace(" ", "_").replace("(", "").replace(")", "").replace("@", "at_") / \
        f"fold{fold}"
    overrides = settings(args, fold) + [f"train.channel_mul={spec['channel_mul']}", f"train.recipe={spec['recipe']}"]
    if not (bundle / "configs" / "train.yaml").is_file():
        export_bundle(spec["arch"], work, bundle, load_config(config_path("demo"), overrides), force=True)
    timing = bundle / "timing.json"
    if not timing.is_file() or not (fold_dir(bundle, fold) / "model.pt").is_file():
        start = time.perf_counter()
        status = train_folds(bundle, [fold], sets=["sw_overlap=0.25"], resume="auto", device="cpu")
        if status.get(fold, 0) != 0:
            raise SystemExit(f"{name} fold {fold}: training failed (see {bundle}/logs)")
        write_json(timing, {"seconds": time.perf_counter() - start})
    predict_out_of_fold(bundle, [fold], sets=["sw_overlap=0.25"])
    fit = {}
    if args.score_train:
        preds = predict_training_cases(bundle, fold, sets=["sw_overlap=0.25"])
        summary = score_predictions(preds, dict.fromkeys(preds, fold), work, bundle / "cv" / "fit" / f"fold{fold}")
        fit = {"fit_dice": summary["per_fold"][str(fold)]["mean_foreground_dice"]}
    plan = read_json(work / "plan.json")
    arch = load_architecture(bundle / "models" / "arch.json")
    channels, classes = int(plan["in_channels"]), int(plan["out_channels"])
    # the width the bundle was trained at (a resumed or reused bundle keeps it even if the sizing has moved since)
    channel_mul = float(yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())["channel_mul"])
    model = arch.build(channels, classes, channel_mul=channel_mul)
    return {"bundle": bundle, "seconds": read_json(timing)["seconds"], "channel_mul": channel_mul,
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_bytes": peak_bytes(arch, channels, classes, patch_of(args), channel_mul, PATCHES_PER_STEP, True),
            **fit}


def task_results(args: argparse.Namespace, task: str) -> dict:
    root = args.out / task
    work = root / "work"
    if not (work / "plan.json").is_file():
        make_msd_task(root / "task", cases=args.cases, test_cases=0, size=args.size, seed=args.seed, **TASKS[task]) \
            if not (root / "task" / "dataset.json").is_file() else None
        # patches a multiple of 32, so that dints-cvpr's 4 resolutions fit the same patch as every other candidate
        config = load_config(config_path("demo"), [*settings(args, 0), "plan.patch_divisor=32"])
        prepare(root / "task", work, folds=args.folds, seed=args.seed, config=config, progress=False)
    datalist = read_json(work / "datalist.json")
    per_fold: dict[str, list[dict]] = {}
    for fold in folds_to_run(args):
        arch_file = searched(args, root, work, fold)
        for name, spec in candidates(args, work, arch_file).items():
            if (args.candidates and name not in args.candidates) or (not args.candidates and name in OPT_IN):
                continue
            result = run_fold(args, root, work, fold, name, spec)
            per_fold.setdefault(name, []).append({**spec, **result, "fold": fold})
            print(f"{task} fold {fold} {name}: trained in {result['seconds']:.0f} s", flush=True)
    rows = {}
    for name, folds in per_fold.items():
        preds, fold_of = {}, {}
        for entry in folds:
            for path in (entry["bundle"] / "cv" / "predictions").glob("*_seg.nii.gz"):
                case = path.name[: -len("_seg.nii.gz")]
                preds[case], fold_of[case] = path, entry["fold"]
        summary = score_predictions(preds, fold_of, work, root / "scores" / name.replace(" ", "_"))
        classes = {c["name"]: [f["dice"][key] for f in summary["per_fold"].values()]
                   for key, c in summary["classes"].items()}
        rows[name] = {
            "dice": {cls: _spread(values) for cls, values in classes.items()},
            "mean_foreground_dice": summary["fold_mean_dice"],
            "fold_dice": {k: f["mean_foreground_dice"] for k, f in summary["per_fold"].items()},
            **({"fit_fold_dice": {str(f["fold"]): f["fit_dice"] for f in folds}} if args.score_train else {}),
            "parameters": statistics.mean(f["parameters"] for f in folds),
            "peak_gib": statistics.mean(f["peak_bytes"] for f in folds) / 2**30,
            "seconds_per_fold": statistics.mean(f["seconds"] for f in folds),
            "channel_mul": [f["channel_mul"] for f in folds], "recipe": folds[0]["recipe"],
        }
    result = {"task": task, "cases": len(datalist["training"]), "folds": args.folds,
              "folds_run": len(folds_to_run(args)), "iterations": args.iterations,
              "search_iterations": args.search_iterations, "patch": patch_of(args),
              "rows": rows}
    write_json(root / "results.json", result)
    return result


def _spread(values: list) -> dict:
    finite = [v for v in values if v is not None]
    return {"mean": statistics.mean(finite) if finite else None,
            "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0}


def paired_gap(rows: dict, name: str) -> str:
    """``searched − name`` in mean foreground Dice, fold by fold (the same validation cases): mean ± sd over folds."""
    if name == "searched" or "searched" not in rows:
        return ""
    ours, theirs = rows["searched"]["fold_dice"], rows[name]["fold_dice"]
    gaps = [ours[k] - theirs[k] for k in ours if k in theirs and None not in (ours[k], theirs[k])]
    if not gaps:
        return ""
    return f"{statistics.mean(gaps):+.3f}" + (f" ± {statistics.stdev(gaps):.3f}" if len(gaps) > 1 else "")


def fit_cells(row: dict, one_fold: bool) -> list[str]:
    """``--score-train``: the mean foreground Dice on each fold's own training cases (mean ± sd over folds), and its
    paired drop to the same fold's validation cases (over-fitting shows as a large drop, under-fitting as a low
    training-case Dice)."""
    fits = row.get("fit_fold_dice", {})
    pairs = [(fits[k], v) for k, v in row["fold_dice"].items() if k in fits and None not in (fits[k], v)]
    if not pairs:
        return ["", ""]

    def show(values: list[float], sign: str = "") -> str:
        return f"{statistics.mean(values):{sign}.3f}" + ("" if one_fold or len(values) < 2 else
                                                          f" ± {statistics.stdev(values):.3f}")
    return [show([f for f, _ in pairs]), show([f - v for f, v in pairs], "+")]


def table(result: dict) -> str:
    """Markdown, best first: per-class and mean foreground Dice (mean ± sd of the fold means), the searched network's
    paired gap to each row (``searched − row``, fold by fold), size, predicted memory and training time."""
    classes = list(next(iter(result["rows"].values()))["dice"])
    fit = any("fit_fold_dice" in r for r in result["rows"].values())
    head = ["network", *[f"Dice {c}" for c in classes], "mean fg Dice", "searched − this (paired)",
            *(["training-case Dice", "training − validation"] if fit else []), "parameters", "pred. peak (GiB)",
            "train s/fold"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = max(r["mean_foreground_dice"]["mean"] or 0 for r in result["rows"].values())
    for name, r in sorted(result["rows"].items(), key=lambda kv: -(kv[1]["mean_foreground_dice"]["mean"] or 0)):
        mean = r["mean_foreground_dice"]
        one_fold = result["folds_run"] == 1  # no fold-to-fold spread to show
        cells = [f"{d['mean']:.3f}" + ("" if one_fold else f" ± {d['sd']:.3f}") for d in r["dice"].values()]
        spread = _spread(list(r["fold_dice"].values()))["sd"] if "fold_dice" in r else mean["std"]  # sample sd
        overall = f"{mean['mean']:.3f}" + ("" if one_fold else f" ± {spread:.3f}")
        lines.append("| " + " | ".join([name, *cells, f"**{overall}**" if mean["mean"] == best else overall,
                                         paired_gap(result["rows"], name), *(fit_cells(r, one_fold) if fit else []),
                                         f"{r['parameters'] / 1e6:.2f} M", f"{r['peak_gib']:.2f}",
                                         f"{r['seconds_per_fold']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=48, help="synthetic volume side (voxels)")
    parser.add_argument("--patch", default="32,32,32", help="training patch of every candidate (multiples of 32)")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations of every candidate")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for search and training (e.g. dints.use_downsample=false)")
    parser.add_argument("--run-folds", type=int, help="train and score only the first N folds (default: all)")
    parser.add_argument("--fold-list", metavar="K,K,…", help="train and score only these folds (e.g. 1,3)")
    parser.add_argument("--candidates", nargs="+", metavar="NAME", help="only these rows (default: all)")
    parser.add_argument("--search-iterations", type=int, default=120)
    parser.add_argument("--blocks", type=int, default=4, help="DiNTS layers searched")
    parser.add_argument("--channel-mul", type=float, default=0.5, help="retraining width of the searched network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-train", action="store_true",
                        help="also segment and score each fold's own training cases (the fit: under- or over-fitting)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [task_results(args, task) for task in args.tasks]
    text = "\n\n".join(f"### {r['task']}: {r['cases']} cases, {r['folds_run']} of {r['folds']} CV folds, "
                       f"{r['iterations']} iterations, "
                       f"patch {r['patch']}\n\n{table(r)}" for r in results)
    write_text(args.out / "results.md", text + "\n")
    print(text)
    print(json.dumps({"bench": "accuracy", "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
