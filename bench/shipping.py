"""What ``dints3d run`` ships, scored on held-out cases: the rows of a single model, the K-fold ensemble, + test-time
mirroring, + post-processing chosen on cross-validation, and the FINAL bundle ``dints3d select`` chose.

A synthetic task (``dints3d synth``: ``ct`` or ``brain``, as in ``bench/accuracy.py``) goes through the whole pipeline
(``dints3d.pipeline``: prepare → search → export the searched network and the baselines → K-fold cross-validation of
each → select → FINAL). A second task from the same generator with another seed gives labelled cases none of the
models saw. Each candidate is then scored on them four ways:

- ``fold-0 model``: the model of fold 0 alone (``configs/inference.yaml``, its ``ckpt_path``), no mirroring;
- ``K-fold ensemble``: the mean softmax of the K fold models (``configs/ensemble.yaml``), no mirroring, no
  post-processing;
- ``+ mirroring``: the same with test-time mirroring on every axis;
- ``+ post-processing``: the same with the largest-component post-processing chosen on the out-of-fold predictions
  (what the bundle ships);

and the FINAL bundle once. Reported per row: held-out Dice per class (mean ± sd over the held-out cases), the mean
foreground Dice, and the candidate's out-of-fold mean Dice (the numbers ``select`` chose from). Prints a markdown
table and, last, one JSON line; writes ``OUT/results.json`` and ``OUT/results.md``. Every stage is skipped when its
output exists (rerun to resume).

    python bench/shipping.py --out runs/shipping [--task ct] [--folds 3] [--cases 12] [--held-out 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from accuracy import TASKS

from dints3d.bundle.infer import infer, nifti_kind, segment
from dints3d.data.synthetic import make_msd_task
from dints3d.evaluation.metrics import evaluate_folders
from dints3d.pipeline import BUNDLE_SETS, SEARCHED, Pipeline, RunSettings
from dints3d.utils.io import read_json, write_json, write_text

#: held-out scoring variants of a candidate bundle: row name → (use the ensemble, extra bundle overrides)
VARIANTS = {
    "fold-0 model": (False, ["mirror_axes=[]", "largest_component_labels=[]"]),
    "K-fold ensemble": (True, ["mirror_axes=[]", "largest_component_labels=[]"]),
    "+ mirroring": (True, ["largest_component_labels=[]"]),
    "+ post-processing": (True, []),
}


def overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides of the run (on top of configs/demo.yaml): the sizes of ``bench/accuracy.py``."""
    return [
        "device=cpu", f"seed={args.seed}", "data.num_samples=2", "data.batch_size=1", f"data.patch_size=[{args.patch}]",
        f"dints.num_blocks={args.blocks}", "dints.num_depths=3", "dints.channel_mul=0.25",
        f"search.iterations={args.search_iterations}", f"search.val_interval={args.search_iterations}",
        f"search.checkpoint_interval={args.search_iterations}", "search.amp=false",
        f"train.iterations={args.iterations}", f"train.val_interval={args.iterations}", "train.batch_size=2",
        "train.amp=false", f"train.channel_mul={args.channel_mul}", "plan.patch_divisor=32", *args.set,
    ]


def predict(bundle: Path, images: Path, out: Path, ensemble: bool, sets: list[str]) -> Path:
    """Segment ``images`` with ``bundle`` (its ensemble, or its fold-0 model alone) into ``out`` (skipped if done)."""
    done = out / "done.json"
    if done.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    options = [*BUNDLE_SETS, *sets]
    if ensemble:
        result = infer(bundle, [images], out, options, device="cpu")
    else:
        options.append(f"ckpt_path={bundle / 'models' / 'fold0' / 'model.pt'}")
        result = segment(bundle, [images], out, nifti_kind(bundle, options), ["inference.yaml"], options)
    if result.failures or result.returncode:
        raise SystemExit(f"{bundle}: {len(result.failures)} held-out image(s) not segmented")
    write_json(done, {"masks": len(result.masks)})
    return out


def score(pred: Path, held_out: Path, out: Path) -> dict:
    summary = evaluate_folders(pred, held_out / "labelsTr", out, held_out / "dataset.json")
    return {"mean_foreground_dice": summary["mean_foreground_dice"], "cases": summary["num_cases"],
            "dice": {entry["name"]: entry["dice"] for entry in summary["classes"].values()}}


def table(result: dict) -> str:
    classes = list(next(iter(result["rows"].values()))["dice"])
    lines = ["| candidate | held-out scoring | " + " | ".join(f"{c} Dice" for c in classes) +
             " | mean foreground Dice | out-of-fold mean Dice (CV) |",
             "|---|---|" + "---|" * (len(classes) + 2)]
    for name, row in result["rows"].items():
        candidate, variant = name.split(": ", 1)
        cells = [f"{row['dice'][c]['mean']:.3f} ± {row['dice'][c]['std']:.3f}" if row["dice"][c]["mean"] is not None
                 else "n/a" for c in classes]
        cv = result["cv"].get(candidate)
        lines.append(f"| {candidate} | {variant} | " + " | ".join(cells) +
                     f" | {row['mean_foreground_dice']:.3f} | {'' if cv is None else f'{cv:.3f}'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(TASKS), default="ct")
    parser.add_argument("--cases", type=int, default=12, help="cases of the cross-validated task")
    parser.add_argument("--held-out", type=int, default=6, help="labelled cases no model sees")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--size", type=int, default=40, help="synthetic volume side (voxels)")
    parser.add_argument("--patch", default="32,32,32")
    parser.add_argument("--iterations", type=int, default=200, help="training iterations of every fold model")
    parser.add_argument("--search-iterations", type=int, default=120)
    parser.add_argument("--blocks", type=int, default=4, help="DiNTS layers searched")
    parser.add_argument("--channel-mul", type=float, default=0.5, help="retraining width of every candidate")
    parser.add_argument("--candidates", nargs="+", default=[SEARCHED, "segresnet", "dynunet"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, held_out = args.out / "task", args.out / "held_out"
    if not (task / "dataset.json").is_file():
        make_msd_task(task, cases=args.cases, test_cases=0, size=args.size, seed=args.seed, **TASKS[args.task])
    if not (held_out / "dataset.json").is_file():
        make_msd_task(held_out, cases=args.held_out, test_cases=0, size=args.size, seed=args.seed + 1000,
                      **TASKS[args.task])
    run = Pipeline(task, args.out / "run", RunSettings(config="demo", overrides=overrides(args), folds=args.folds,
                                                        candidates=list(args.candidates), seed=args.seed))
    run.run()
    rows, cv = {}, {}
    for name in args.candidates:
        bundle = run.candidate_dir(name)
        cv[name] = read_json(bundle / "cv" / "summary.json")["mean_foreground_dice"]
        for variant, (ensemble, sets) in VARIANTS.items():
            folder = args.out / "held_out_predictions" / name / variant.replace(" ", "_").replace("+", "plus")
            rows[f"{name}: {variant}"] = score(predict(bundle, held_out / "imagesTr", folder, ensemble, sets),
                                               held_out, folder / "scores")
    chosen = read_json(run.final / "selection" / "selection.json")
    folder = args.out / "held_out_predictions" / "FINAL"
    rows[f"FINAL ({chosen['chosen']}): as shipped"] = score(predict(run.final, held_out / "imagesTr", folder, True, []),
                                                             held_out, folder / "scores")
    best_cv = {c["name"]: c["mean"] for c in chosen["candidates"]}
    result = {"task": args.task, "cases": args.cases, "held_out": args.held_out, "folds": args.folds,
              "iterations": args.iterations, "search_iterations": args.search_iterations, "chosen": chosen["chosen"],
              "why": chosen.get("why"), "cv": {**cv, f"FINAL ({chosen['chosen']})": best_cv.get(chosen["chosen"])},
              "final_not_below_best_single_baseline_on_cv":
                  best_cv.get(chosen["chosen"], 0) >= max(v for k, v in cv.items() if k != SEARCHED),
              "rows": rows}
    write_json(args.out / "results.json", result)
    text = (f"### {args.task}: {args.cases} cases, {args.folds}-fold CV, {args.held_out} held-out cases, "
            f"{args.iterations} iterations per fold model\n\n{table(result)}\n\nFINAL: {chosen['chosen']} "
            f"({chosen.get('why')})")
    write_text(args.out / "results.md", text + "\n")
    print(text)
    print(json.dumps({"bench": "shipping", **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
