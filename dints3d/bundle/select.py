"""``dints3d select CANDIDATE_BUNDLE... --out FINAL``: choose what to ship from cross-validated bundles, as
nnU-Net's ``find_best_configuration`` does, and never a searched network that does not beat the plain baseline.

Each candidate's out-of-fold predictions (``cv/predictions``, the same folds and cases for all) are scored per case
(the mean Dice of the foreground classes its ground truth holds) after that candidate's own post-processing. The
ensemble of the best two (their out-of-fold probabilities averaged, when both kept them) is scored the same way,
with post-processing chosen for it. The best mean wins only where it is significantly better: among the candidates
that the best does not beat significantly (paired Wilcoxon signed-rank test over the cases, ``alpha``), the simplest
ships — a single baseline before a single searched network before an ensemble, then the fewest parameters. So a tie
ships the simpler model, and a searched network that does not beat the best baseline significantly does not ship.

Writes ``FINAL`` (the chosen bundle, or the better of the pair with the other's fold models, and an
``configs/ensemble.yaml`` with the chosen post-processing) and ``FINAL/selection/`` (``selection.json``,
``selection.md``: a table per class, the p-values, the choice and why; ``selection.png``: the per-case scores).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.stats import wilcoxon

from dints3d.bundle.crossval import CV_DIR, case_labels, held_folds, work_dir
from dints3d.bundle.ensemble import Member, write_ensemble
from dints3d.bundle.export import relocate
from dints3d.bundle.template import check_target
from dints3d.evaluation.metrics import read_label_map
from dints3d.evaluation.postprocess import (
    choose_largest_component,
    dice,
    largest_component,
)
from dints3d.spaces.baselines.networks import BASELINES
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import new_figure, save_figure
from dints3d.utils.io import read_json, write_json, write_text

#: simplicity ranks: a planned baseline, then a searched (or preset) network, then an ensemble of two candidates
BASELINE, SEARCHED, PAIR = 0, 1, 2
KINDS = {BASELINE: "baseline", SEARCHED: "searched", PAIR: "ensemble of two"}


@dataclass
class Candidate:
    """A cross-validated bundle (or the pair of the best two) and its per-case out-of-fold scores."""

    name: str
    kind: int
    parameters: int
    scores: dict[str, float]  #: case → mean foreground Dice after post-processing
    class_dice: dict[str, float]  #: class → mean Dice over the cases holding it, after post-processing
    postprocessing: list[int]
    bundles: list[Path] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values())))


def _class_names(work: Path) -> dict[int, str]:
    plan = read_json(work / "plan.json")
    return {int(k): str(v) for k, v in plan["labels"].items() if int(k) != 0}


def _scores(masks: dict[str, np.ndarray], labels: dict[str, Path], classes: dict[int, str],
            keep: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    """Per case the mean Dice over the classes its truth holds, and per class the mean over cases, after keeping the
    largest component of the classes ``keep``."""
    per_case, per_class = {}, {name: [] for name in classes.values()}
    for case, pred in masks.items():
        for c in keep:
            pred = largest_component(pred, c)
        truth = read_label_map(labels[case])[0]
        values = {c: dice(pred, truth, c) for c in classes}
        present = [v for v in values.values() if not math.isnan(v)]
        per_case[case] = float(np.mean(present)) if present else math.nan
        for c, v in values.items():
            if not math.isnan(v):
                per_class[classes[c]].append(v)
    return per_case, {name: float(np.mean(v)) if v else math.nan for name, v in per_class.items()}


def read_candidate(bundle: Path, labels: dict[str, Path], classes: dict[int, str]) -> tuple[Candidate, set[str]]:
    """A bundle's candidate (from ``cv/summary.json`` and ``cv/predictions``) and the cases it predicted."""
    summary_path = bundle / CV_DIR / "summary.json"
    if not summary_path.is_file():
        raise DintsError(bundle, "has no cross-validation (cv/summary.json); run `dints3d train BUNDLE --folds all`")
    summary = read_json(summary_path)
    arch = load_architecture(bundle / "models" / "arch.json")
    masks = {name: read_label_map(bundle / CV_DIR / "predictions" / f"{name}_seg.nii.gz")[0]
             for name in _predicted(bundle)}
    keep = summary.get("postprocessing", {}).get("largest_component_labels", [])
    scores, class_dice = _scores(masks, labels, classes, keep)
    channel_mul = _channel_mul(bundle)
    plan = read_json(work_dir(bundle, None) / "plan.json")
    parameters = sum(p.numel() for p in arch.build(int(plan["in_channels"]), int(plan["out_channels"]),
                                                   channel_mul=channel_mul).parameters())
    kind = BASELINE if arch.space in BASELINES else SEARCHED
    return Candidate(bundle.name, kind, parameters, scores, class_dice, keep, [bundle]), set(masks)


def _predicted(bundle: Path) -> list[str]:
    return sorted(p.name[: -len("_seg.nii.gz")] for p in (bundle / CV_DIR / "predictions").glob("*_seg.nii.gz"))


def _channel_mul(bundle: Path) -> float:
    for line in (bundle / "configs" / "train.yaml").read_text().splitlines():
        if line.startswith("channel_mul:"):
            return float(line.split(":", 1)[1])
    return 1.0


def pair_candidate(first: Candidate, second: Candidate, labels: dict[str, Path],
                   classes: dict[int, str]) -> Candidate | None:
    """The ensemble of two candidates: their out-of-fold probabilities averaged case by case (``None`` when either
    did not keep them: ``dints3d train --folds all --save-probabilities``), with post-processing chosen for it."""
    masks = {}
    for case in first.scores:
        files = [b / CV_DIR / "predictions" / f"{case}_prob.nii.gz" for b in (first.bundles[0], second.bundles[0])]
        if not all(f.is_file() for f in files):
            return None
        mean = sum(np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files) / 2
        masks[case] = np.argmax(mean, axis=-1)  # saved channels last
    post = choose_largest_component(masks, labels, list(classes))
    scores, class_dice = _scores(masks, labels, classes, post["largest_component_labels"])
    return Candidate(f"{first.name} + {second.name}", PAIR, first.parameters + second.parameters, scores, class_dice,
                     post["largest_component_labels"], [*first.bundles, *second.bundles])


def paired_p(a: Candidate, b: Candidate) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the per-case differences (1 when they are all zero)."""
    cases = sorted(set(a.scores) & set(b.scores))
    diff = np.array([a.scores[c] - b.scores[c] for c in cases])
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0 or np.all(diff == 0):
        return 1.0
    return float(wilcoxon(diff, zero_method="wilcox").pvalue)


def choose(candidates: list[Candidate], alpha: float) -> tuple[Candidate, dict[str, Any]]:
    """The simplest candidate that the best-scoring one does not beat significantly; the reasons."""
    best = max(candidates, key=lambda c: c.mean)
    p_values = {c.name: (1.0 if c is best else paired_p(best, c)) for c in candidates}
    tied = [c for c in candidates if c is best or not (best.mean > c.mean and p_values[c.name] < alpha)]
    chosen = min(tied, key=lambda c: (c.kind, c.parameters))
    if chosen is best:
        why = (f"{best.name} has the best mean out-of-fold Dice ({best.mean:.4f})" +
               (" and is significantly better than every simpler candidate" if len(tied) == 1 else
                " and no simpler candidate ties with it"))
    else:
        why = (f"{best.name} has the best mean ({best.mean:.4f}) but does not beat {chosen.name} "
               f"({chosen.mean:.4f}) significantly (paired Wilcoxon p = {p_values[chosen.name]:.3g} ≥ {alpha}), so "
               f"the simpler {KINDS[chosen.kind]} ships")
    searched = [c for c in candidates if c.kind == SEARCHED]
    baselines = [c for c in candidates if c.kind == BASELINE]
    if searched and baselines and chosen.kind != SEARCHED and all(c is not chosen for c in searched):
        best_baseline = max(baselines, key=lambda c: c.mean)
        best_searched = max(searched, key=lambda c: c.mean)
        verb = "loses to" if best_searched.mean < best_baseline.mean else "does not significantly beat"
        label = "" if best_searched.name == "searched" else f" {best_searched.name}"
        why += (f". The searched network{label} ({best_searched.mean:.4f}) {verb} the best baseline "
                f"{best_baseline.name} ({best_baseline.mean:.4f}): the baseline ships, not the search's network")
    return chosen, {"best": best.name, "p_values_vs_best": p_values, "why": why}


def write_final(chosen: Candidate, out: Path, force: bool, work: Path) -> Path:
    """``out``: a copy of the chosen bundle (the pair's first member, with the second's fold models under
    ``models/member1/``) whose ``configs/ensemble.yaml`` holds every fold model and the chosen post-processing, its
    data (``work`` and its task) named relative to its new place."""
    check_target(out, force)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(chosen.bundles[0], out, ignore=shutil.ignore_patterns("predictions", "logs", "checkpoint_*.pt"))
    relocate(out, work, Path(read_json(work / "plan.json")["task_dir"]))
    members = []
    for index, bundle in enumerate(chosen.bundles):
        prefix = "models" if index == 0 else f"models/member{index}"
        if index > 0:
            (out / prefix).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle / "models" / "arch.json", out / prefix / "arch.json")
        folds = sorted(int(k) for k in held_folds(bundle)["folds"])
        for k in folds:
            if index > 0:
                (out / prefix / f"fold{k}").mkdir(exist_ok=True)
                shutil.copyfile(bundle / "models" / f"fold{k}" / "model.pt", out / prefix / f"fold{k}" / "model.pt")
        members.append(Member(load_architecture(bundle / "models" / "arch.json"), f"{prefix}/arch.json",
                              tuple(f"{prefix}/fold{k}/model.pt" for k in folds)))
    mirror = read_json(chosen.bundles[0] / CV_DIR / "summary.json").get("mirror_axes", [0, 1, 2])
    write_ensemble(out, members, mirror, chosen.postprocessing)
    return out


def selection_figure(candidates: list[Candidate], chosen: Candidate):
    """Per-case out-of-fold scores of every candidate (one column each), the chosen one highlighted."""
    fig, ax = new_figure((1.8 + 1.5 * len(candidates), 4.0))
    for i, c in enumerate(candidates):
        values = [v for v in c.scores.values() if not math.isnan(v)]
        ax.boxplot(values, positions=[i], widths=0.5, showfliers=False)
        ax.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=10,
                   color="#d62728" if c is chosen else "#1f77b4", zorder=3)
    ax.set_xticks(range(len(candidates)), [c.name.replace(" + ", "\n+ ") for c in candidates], fontsize=7)
    ax.set_ylabel("out-of-fold Dice per case (foreground mean)")
    ax.set_title(f"chosen: {chosen.name}")
    fig.tight_layout()
    return fig


def markdown(candidates: list[Candidate], chosen: Candidate, decision: dict, classes: dict[int, str]) -> str:
    names = list(classes.values())
    lines = ["| candidate | kind | " + " | ".join(f"Dice {n}" for n in names) + " | mean per case | p vs best | "
             "parameters |", "|" + "---|" * (len(names) + 5)]
    for c in sorted(candidates, key=lambda c: -c.mean):
        mark = " **(chosen)**" if c is chosen else ""
        lines.append(f"| {c.name}{mark} | {KINDS[c.kind]} | " + " | ".join(f"{c.class_dice[n]:.4f}" for n in names) +
                     f" | {c.mean:.4f} | {decision['p_values_vs_best'][c.name]:.3g} | {c.parameters / 1e6:.2f} M |")
    return "\n".join(lines) + f"\n\n{decision['why']}.\n"


def select(bundles: list[str | os.PathLike], out: str | os.PathLike, alpha: float = 0.05,
           force: bool = False) -> dict:
    """Compare cross-validated bundles, write ``out`` (the chosen model or ensemble) and its selection report."""
    paths = [Path(b).absolute() for b in bundles]
    if len(paths) < 2:
        raise DintsError("select", "needs at least two cross-validated bundles to compare")
    work = work_dir(paths[0], None)
    labels, classes = case_labels(work), _class_names(work)
    candidates, cases = [], None
    for path in paths:
        candidate, predicted = read_candidate(path, labels, classes)
        if cases is not None and predicted != cases:
            raise DintsError(path, "its out-of-fold cases differ from the first candidate's; cross-validate every "
                             "candidate on the same prepared task and folds")
        cases = predicted
        candidates.append(candidate)
    first, second = sorted(candidates, key=lambda c: -c.mean)[:2]
    pair = pair_candidate(first, second, labels, classes)
    pool = candidates + ([pair] if pair is not None else [])
    chosen, decision = choose(pool, alpha)
    final = write_final(chosen, Path(out).absolute(), force, work)
    report = {"version": 1, "alpha": alpha, "chosen": chosen.name, "kind": KINDS[chosen.kind],
              "postprocessing": {"largest_component_labels": chosen.postprocessing}, **decision,
              "pair_scored": pair is not None, "cases": len(cases),
              "candidates": [{"name": c.name, "kind": KINDS[c.kind], "bundles": [str(b) for b in c.bundles],
                              "mean": c.mean, "class_dice": c.class_dice, "parameters": c.parameters,
                              "scores": c.scores} for c in pool]}
    folder = final / "selection"
    write_json(folder / "selection.json", report)
    write_text(folder / "selection.md", f"# Selection\n\n{len(cases)} out-of-fold cases, paired Wilcoxon signed-rank, "
               f"alpha {alpha}" + ("" if pair else " (no ensemble of two: a candidate kept no probabilities)") +
               "\n\n" + markdown(pool, chosen, decision, classes))
    save_figure(selection_figure(pool, chosen), folder / "selection.png")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="CANDIDATE_BUNDLE",
                        help="bundles cross-validated on the same prepared task (dints3d train BUNDLE --folds all)")
    parser.add_argument("--out", required=True, help="the final bundle to write (the chosen model or ensemble)")
    parser.add_argument("--alpha", type=float, default=0.05,
                        help="significance level of the paired Wilcoxon test (default 0.05)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.alpha < 1:
        raise DintsError("--alpha", f"must be in (0, 1), got {args.alpha}")
    report = select(args.bundles, args.out, args.alpha, args.force)
    print((Path(args.out) / "selection" / "selection.md").read_text())
    print(f"final bundle: {args.out} ({report['kind']}: {report['chosen']})")
    return 0
