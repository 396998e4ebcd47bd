"""``trials.csv`` and ``topk.csv``: one row per finished trial, appended (and fsynced) as soon as it finishes.

A run killed mid-write leaves at most one partial last line; reading drops it (and truncates the file to the last
complete row), so a rerun redoes only that trial. Also the score-vs-trial picture and the top-k table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from dints3d.utils.errors import DintsError
from dints3d.utils.figures import new_figure

FIELDS = ("trial", "kind", "parent", "score", "seconds", "key", "metrics", "arch")


@dataclass
class TrialRow:
    """One finished trial. ``kind``: ``uniform`` or ``perturb`` (of trial ``parent``); ``metrics``: extra scalars;
    ``arch``: the architecture's ``arch.json`` dict."""

    trial: int
    kind: str
    parent: int | None
    score: float
    seconds: float
    key: str
    metrics: dict = field(default_factory=dict)
    arch: dict = field(default_factory=dict)

    def to_csv(self) -> dict:
        return {"trial": self.trial, "kind": self.kind, "parent": "" if self.parent is None else self.parent,
                "score": repr(float(self.score)), "seconds": f"{self.seconds:.3f}", "key": self.key,
                "metrics": json.dumps(self.metrics, allow_nan=True),
                "arch": json.dumps(self.arch, separators=(",", ":"))}

    @classmethod
    def from_csv(cls, row: dict, where: str) -> "TrialRow":
        try:
            return cls(trial=int(row["trial"]), kind=row["kind"],
                       parent=int(row["parent"]) if row["parent"] else None, score=float(row["score"]),
                       seconds=float(row["seconds"]), key=row["key"], metrics=json.loads(row["metrics"]),
                       arch=json.loads(row["arch"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DintsError(where, f"malformed trial row {row.get('trial')!r} ({e}); delete the row to redo it") \
                from None


def read_rows(path: str | os.PathLike) -> list[TrialRow]:
    """Complete rows of a trials file (a missing file has none); a partial last line is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    reader = csv.DictReader(io.StringIO(data.decode()))
    if reader.fieldnames is not None and tuple(reader.fieldnames) != FIELDS:
        raise DintsError(path, f"unexpected columns {reader.fieldnames}; expected {list(FIELDS)}")
    return [TrialRow.from_csv(row, str(path)) for row in reader]


def append_row(path: str | os.PathLike, row: TrialRow) -> None:
    """Append one row (with the header if the file is new) and fsync, so a finished trial is never lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow(row.to_csv())
    with open(path, "a") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Best first (NaN scores last; ties: earlier trial first)."""
    return sorted(rows, key=lambda r: (math.isnan(r.score), -r.score if not math.isnan(r.score) else 0, r.trial))


def top_k_table(trials: list[TrialRow], top: list[TrialRow], k: int) -> str:
    """Markdown table of the ``k`` best trials by short score, with their long-schedule score where known."""
    long = {r.trial: r.score for r in top}
    lines = ["| rank | trial | kind | short score | long score | architecture |", "|---|---|---|---|---|---|"]
    for rank, r in enumerate(ranked(trials)[:k], start=1):
        again = f"{long[r.trial]:.4f}" if r.trial in long else "—"
        lines.append(f"| {rank} | {r.trial} | {r.kind} | {r.score:.4f} | {again} | `{r.key}` |")
    return "\n".join(lines) + "\n"


def trials_figure(trials: list[TrialRow], top: list[TrialRow], title: str):
    """Score vs trial (uniform and perturbation samples), the running best, and the long-schedule re-evaluations."""
    fig, ax = new_figure((7.0, 3.8))
    for kind, color in (("uniform", "#1f77b4"), ("perturb", "#ff7f0e")):
        pts = [(r.trial, r.score) for r in trials if r.kind == kind]
        if pts:
            ax.scatter(*zip(*pts), s=16, color=color, label=f"{kind} ({len(pts)})", zorder=3)
    best, line = -math.inf, []
    for r in sorted(trials, key=lambda r: r.trial):
        if not math.isnan(r.score):
            best = max(best, r.score)
        line.append((r.trial, best if best > -math.inf else math.nan))
    if line:
        ax.step(*zip(*line), where="post", color="#444444", lw=1.2, label="best so far")
    if top:
        ax.scatter([r.trial for r in top], [r.score for r in top], marker="*", s=90, color="#d62728",
                   label="top-k, long schedule", zorder=4)
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
