"""The random search engine (DPC's strategy: uniform exploration mixed with samples near the best so far).

Trial t draws from ``numpy.random.default_rng([seed, t])``: with probability ``explore_ratio`` (and always for the
first trial) a uniform sample of the space, otherwise a perturbation of the best finished trial. Each trial is
short-trained and scored by an evaluator and appended to ``trials.csv`` as soon as it finishes, so a rerun of a
stopped search continues where it stopped and samples exactly what an uninterrupted run would have. The budget is
a number of trials and, optionally, hours of summed trial time. The ``top_k`` best are then re-evaluated with a
longer schedule (``topk.csv``, also resumable); the best of those is the result (``arch.json``, ``model.pt``).
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from dints3d import __version__
from dints3d.random_search.trials import (
    TrialRow,
    append_row,
    ranked,
    read_rows,
    top_k_table,
    trials_figure,
)
from dints3d.spaces.base import Architecture
from dints3d.utils.checkpoint import write_torch
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import save_figure
from dints3d.utils.io import read_json, write_json, write_text
from dints3d.utils.resume_settings import changed_settings

TRIALS_FILE, TOPK_FILE, SETTINGS_FILE = "trials.csv", "topk.csv", "random_search.json"
#: re-draws of a sample whose key was already tried before accepting a repeat (tiny spaces)
MAX_REDRAWS = 20


class Sampler(Protocol):
    """A space random search can sample: uniformly, or near a given architecture."""
    name: str

    def settings(self) -> dict:
        """What defines the sampled space (a resumed search must have the same)."""
    def uniform(self, rng: np.random.Generator) -> Architecture: ...

    def perturb(self, arch: Architecture, rng: np.random.Generator) -> Architecture:
        """A small change of ``arch`` (a different architecture)."""
    def key(self, arch: Architecture) -> str:
        """Short canonical text identifying the architecture (repeats are re-drawn)."""
    def from_dict(self, data: dict) -> Architecture: ...


@dataclass
class Evaluation:
    """A trial's result: the score ranked on (higher is better), other scalars, and optionally the trained weights
    (kept for the top-k so the winner's can be exported)."""
    score: float
    metrics: dict
    state: dict | None = None


#: (architecture, training iterations, seed) → Evaluation
Evaluator = Callable[[Architecture, int, int], Evaluation]


@dataclass
class Budget:
    trials: int
    hours: float | None
    explore_ratio: float
    iterations: int
    top_k: int
    topk_iterations: int
    seed: int = 0


class RandomSearch:
    """One random search into the folder ``out``.

    Args:
        sampler, evaluate: the space and how a trial is trained and scored.
        budget: trials / hours / schedules.
        settings: everything else that must not change between a run and its resumption (e.g. the evaluator's
            data and backbone); written to ``random_search.json``.
        finalize: applied to the winning architecture before it is saved (e.g. to attach a DPC cell's backbone).
        finalize_state: applied to the winner's kept weights before they are saved as ``model.pt`` (e.g. to add
            the backbone's weights to a DPC head's).
        resume: continue the search already in ``out``.
    """
    def __init__(self, out: str | Path, sampler: Sampler, evaluate: Evaluator, budget: Budget,
                 settings: dict | None = None, finalize: Callable[[Architecture], Architecture] | None = None,
                 finalize_state: Callable[[dict], dict] | None = None, resume: bool = False):
        self.out, self.sampler, self.evaluate, self.budget = Path(out), sampler, evaluate, budget
        self.finalize = finalize or (lambda arch: arch)
        self.finalize_state = finalize_state or (lambda state: state)
        self.summary_extra: dict = {}  #: more facts for summary.json (e.g. the feature cache's)
        #: what trial seconds (and so the hours budget) count: wall time; a benchmark sharing a machine may use
        #: ``time.process_time`` instead
        self.clock = time.perf_counter
        fixed = {"space": sampler.name, "sampler": sampler.settings(), "seed": budget.seed,
                 "iterations": budget.iterations, "topk_iterations": budget.topk_iterations, **(settings or {})}
        settings_path = self.out / SETTINGS_FILE
        if settings_path.exists():
            if not resume:
                raise DintsError(self.out, "already holds a random search; pass --resume to continue it or choose "
                                 "another --out")
            saved = read_json(settings_path)
            if not isinstance(saved, dict):
                raise DintsError(settings_path, "is not a settings object (damaged?); start a new --out")
            changes = changed_settings(saved, _plain(fixed))
            if changes:
                raise DintsError(settings_path, f"was written with different settings ('{next(iter(changes))}' "
                                 "differs); resume with the same settings (only the budget may change)")
        elif resume:
            raise DintsError(settings_path, "no random search to resume (start without --resume)")
        write_json(settings_path, _plain(fixed))

    # ---------------------------------------------------------------------------------------------- sampling
    def sample(self, trial: int, rows: list[TrialRow]) -> tuple[Architecture, str, int | None]:
        """Trial ``trial``'s architecture, kind and parent, a pure function of the seed and the finished rows."""
        rng = np.random.default_rng([self.budget.seed, trial])
        seen = {r.key for r in rows}
        explore = not rows or rng.random() < self.budget.explore_ratio
        parent = None if explore else ranked(rows)[0]
        for _ in range(MAX_REDRAWS):
            if parent is None:
                arch = self.sampler.uniform(rng)
            else:
                arch = self.sampler.perturb(self.sampler.from_dict(parent.arch), rng)
            if self.sampler.key(arch) not in seen:
                break
        return arch, "uniform" if parent is None else "perturb", None if parent is None else parent.trial

    def _spent(self, rows: list[TrialRow]) -> float:
        return sum(r.seconds for r in rows)

    def _run_trial(self, trial: int, arch: Architecture, kind: str, parent: int | None,
                   iterations: int) -> tuple[TrialRow, dict | None]:
        start = self.clock()
        result = self.evaluate(arch, iterations, self.budget.seed * 100_003 + trial)
        row = TrialRow(trial, kind, parent, float(result.score), self.clock() - start,
                       self.sampler.key(arch), result.metrics, arch.to_dict())
        return row, result.state

    # ------------------------------------------------------------------------------------------------ phases
    def explore(self) -> list[TrialRow]:
        """Run trials until the trial or time budget is spent; returns every finished row."""
        b, path = self.budget, self.out / TRIALS_FILE
        rows = read_rows(path)
        bar = tqdm(total=b.trials, initial=min(len(rows), b.trials), desc="random search", dynamic_ncols=True)
        while len(rows) < b.trials:
            if b.hours is not None and self._spent(rows) >= b.hours * 3600:
                tqdm.write(f"time budget of {b.hours:g} h spent after {len(rows)} trials")
                break
            arch, kind, parent = self.sample(len(rows), rows)
            row, _ = self._run_trial(len(rows), arch, kind, parent, b.iterations)
            append_row(path, row)
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"best {ranked(rows)[0].score:.4f}")
        bar.close()
        return rows

    def reevaluate(self, rows: list[TrialRow]) -> list[TrialRow]:
        """The ``top_k`` best trials with the longer schedule (their trained weights kept in ``topk/``)."""
        path = self.out / TOPK_FILE
        done = {r.trial: r for r in read_rows(path)}
        chosen = ranked(rows)[: self.budget.top_k]
        for r in tqdm([r for r in chosen if r.trial not in done], desc="top-k", dynamic_ncols=True):
            row, state = self._run_trial(r.trial, self.sampler.from_dict(r.arch), r.kind, r.parent,
                                         self.budget.topk_iterations)
            if state is not None:
                _save_state(self.out / "topk" / f"trial_{r.trial:04d}.pt", state)
            append_row(path, row)
            done[r.trial] = row
        return [done[r.trial] for r in chosen]

    def run(self) -> Path | None:
        """Explore, re-evaluate the top-k, write the results; returns ``arch.json`` (None if nothing ran)."""
        rows = self.explore()
        if not rows:
            return None
        top = self.reevaluate(rows)
        return self.write_results(rows, top)

    def write_results(self, rows: list[TrialRow], top: list[TrialRow]) -> Path:
        """``arch.json`` (+ ``arch.png``), ``model.pt`` when the winner's weights were kept, ``trials.png``,
        ``topk.md`` and ``summary.json``."""
        winner = ranked(top)[0] if top else ranked(rows)[0]
        short = next(r.score for r in rows if r.trial == winner.trial)
        arch = self.finalize(self.sampler.from_dict(winner.arch))
        arch.provenance = _json_safe({
            "tool": f"dints3d {__version__}",
            "search": "random",
            "trial": winner.trial,
            "kind": winner.kind,
            "short_score": short,
            "long_score": winner.score if top else None,
            "metrics": winner.metrics,
            "trials": len(rows),
            "seed": self.budget.seed,
            "settings": read_json(self.out / SETTINGS_FILE),
        })
        path = arch.save(self.out / "arch.json")
        figure = arch.figure()
        if figure is not None:
            save_figure(figure, self.out / "arch.png")
        state = self.out / "topk" / f"trial_{winner.trial:04d}.pt"
        if top and state.exists():
            kept = load_state(state, "the trial's trained weights", hint=f"; delete it and the trial's row in "
                              f"{TOPK_FILE}, then rerun with --resume to re-evaluate it")
            _save_state(self.out / "model.pt", self.finalize_state(kept))
        save_figure(trials_figure(rows, top, f"{self.sampler.name} random search: {len(rows)} trials"),
                    self.out / "trials.png")
        table = top_k_table(rows, top, max(self.budget.top_k, 1))
        write_text(self.out / "topk.md", table)
        write_json(self.out / "summary.json", _json_safe({
            "space": self.sampler.name, "trials": len(rows), "trial_seconds": self._spent(rows),
            "topk_seconds": sum(r.seconds for r in top), "best_trial": winner.trial, "best_short_score": short,
            "best_long_score": winner.score if top else None,
            "uniform_trials": sum(r.kind == "uniform" for r in rows), **self.summary_extra,
        }))
        tqdm.write(table)
        return path


def _save_state(path: Path, state: dict) -> None:
    write_torch(path, state)


def load_state(path: str | Path, what: str, map_location: str | torch.device = "cpu", hint: str = "") -> dict:
    """``torch.load(path, weights_only=True)`` of a dict of tensors (a state dict, or a dict holding one). A
    missing, unreadable or non-dict file is a :class:`DintsError` naming ``path``, ``what`` it should hold and
    ``hint`` (appended to the message)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DintsError(path, f"{what}: file not found{hint}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling, zip or I/O failure means the file is unusable
        # torch's unpickling message suggests weights_only=False, which is not an option for files users pass in
        reason = ("not loadable with torch.load(weights_only=True)" if isinstance(e, pickle.UnpicklingError)
                  else (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160])
        raise DintsError(path, f"cannot be read as {what} ({type(e).__name__}: {reason}){hint}") from None
    if not isinstance(state, dict):
        raise DintsError(path, f"holds a {type(state).__name__}, not {what} (a dict of tensors){hint}")
    return state


def _json_safe(data):
    """``data`` with NaN and infinite floats as None (strict JSON, like the rest of the state files)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_safe(v) for v in data]
    return data


def _plain(data):
    """JSON-normalised copy (tuples → lists), so settings compare equal after a round trip through the file."""
    return json.loads(json.dumps(data))


def budget_from_config(cfg) -> Budget:
    r = cfg.random_search
    return Budget(trials=r.trials, hours=r.hours, explore_ratio=r.explore_ratio, iterations=r.iterations,
                  top_k=r.top_k, topk_iterations=r.topk_iterations, seed=cfg.seed)
