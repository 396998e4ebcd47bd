"""Seeded K-fold split of the training cases, and the two disjoint halves of each fold's training part that a
bilevel search uses (one updates the weights, the other the architecture). Written as a MONAI decathlon datalist.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dints3d.data.msd import Task
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

FORMAT_VERSION = 1
DATALIST_FILE = "datalist.json"


def check_folds(num_cases: int, num_folds: int) -> None:
    """Refuse fewer than 2 folds, or more folds than training cases (a fold would be empty)."""
    if num_folds < 2:
        raise DintsError("--folds", f"need at least 2 folds, got {num_folds}")
    if num_folds > num_cases:
        raise DintsError("--folds", f"{num_folds} folds need at least {num_folds} training cases, the task has "
                                    f"{num_cases}; use --folds {num_cases} or fewer")


def assign_folds(num_cases: int, num_folds: int, rng: np.random.Generator) -> list[int]:
    """Fold index per case [num_cases]: a random permutation dealt round-robin, so fold sizes differ by ≤ 1."""
    folds = [0] * num_cases
    for position, case in enumerate(rng.permutation(num_cases)):
        folds[int(case)] = position % num_folds
    return folds


def split_halves(indices: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Two disjoint random halves of ``indices`` (each kept in ascending order); the first gets the odd one out."""
    shuffled = [indices[int(i)] for i in rng.permutation(len(indices))]
    middle = (len(indices) + 1) // 2
    return sorted(shuffled[:middle]), sorted(shuffled[middle:])


def make_datalist(task: Task, num_folds: int = 5, seed: int = 0) -> dict:
    """The ``datalist.json`` dict: ``training`` (with ``fold``), ``test``, and per fold k ``fold{k}_train``,
    ``fold{k}_validation``, ``fold{k}_weights`` and ``fold{k}_arch``. Paths are relative to ``task_dir``."""
    check_folds(len(task.training), num_folds)
    fold_seq, *half_seqs = np.random.SeedSequence(seed).spawn(1 + num_folds)
    folds = assign_folds(len(task.training), num_folds, np.random.default_rng(fold_seq))
    training = [{**case.entry(), "fold": fold} for case, fold in zip(task.training, folds)]
    out = {
        "version": FORMAT_VERSION,
        "task_dir": str(task.task_dir.resolve()),
        "seed": seed,
        "num_folds": num_folds,
        "training": training,
        "test": [case.entry() for case in task.test],
    }
    for k in range(num_folds):
        train = [i for i, f in enumerate(folds) if f != k]
        weights, arch = split_halves(train, np.random.default_rng(half_seqs[k]))
        out[f"fold{k}_train"] = [training[i] for i in train]
        out[f"fold{k}_validation"] = [training[i] for i, f in enumerate(folds) if f == k]
        out[f"fold{k}_weights"] = [training[i] for i in weights]
        out[f"fold{k}_arch"] = [training[i] for i in arch]
    return out


def read_datalist_file(work_dir: str | os.PathLike) -> dict:
    """``WORK/datalist.json`` as written by ``dints3d prepare`` (DintsError if missing, malformed or too new)."""
    path = Path(work_dir) / DATALIST_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise DintsError(path, f"not a version-{FORMAT_VERSION} datalist; rerun 'dints3d prepare'")
    return data


def read_datalist(work_dir: str | os.PathLike, key: str, base: str | os.PathLike | None = None) -> list[dict]:
    """One list of ``WORK/datalist.json`` (e.g. ``"fold0_weights"``) with ``image``/``label`` made absolute against
    ``base`` (default: the task folder recorded by ``prepare``).

    Equivalent to ``monai.data.load_decathlon_datalist(path, data_list_key=key, base_dir=task_dir)``.
    """
    path = Path(work_dir) / DATALIST_FILE
    data = read_datalist_file(work_dir)
    if key not in data or not isinstance(data[key], list):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        raise DintsError(path, f"no list '{key}'; lists: {', '.join(lists)}")
    root = Path(data["task_dir"] if base is None else base)
    return [{k: str(root / v) if k in ("image", "label") else v for k, v in item.items()} for item in data[key]]
