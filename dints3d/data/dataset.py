"""Reading a prepared WORK folder and turning its lists into cached MONAI datasets and loaders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, ThreadDataLoader, load_decathlon_datalist

from dints3d.errors import DintsError
from dints3d.io import read_json


def load_plan(work: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> dict:
    """``WORK/plan.json`` with config ``plan:`` overrides applied (unknown fields refused)."""
    path = Path(work) / "plan.json"
    if not path.exists():
        raise DintsError(path, "not found; run `dints3d prepare --task TASK --out WORK` first")
    plan = read_json(path)
    for key, value in (overrides or {}).items():
        if key not in plan:
            raise DintsError("plan", f"unknown plan field '{key}' (fields: {', '.join(sorted(plan))})")
        plan[key] = value
    return plan


def load_items(work: str | os.PathLike, key: str, max_cases: int | None = None) -> list[dict]:
    """One list of ``WORK/datalist.json`` (e.g. ``fold0_weights``) with absolute paths."""
    path = Path(work) / "datalist.json"
    if not path.exists():
        raise DintsError(path, "not found; run `dints3d prepare --task TASK --out WORK` first")
    datalist = read_json(path)
    if key not in datalist:
        raise DintsError(path, f"has no list '{key}' (was it prepared with fewer folds?)")
    try:
        items = load_decathlon_datalist(os.fspath(path), data_list_key=key, base_dir=datalist["task_dir"])
    except (KeyError, ValueError) as e:
        raise DintsError(path, f"cannot read list '{key}': {e}") from None
    if not items:
        raise DintsError(path, f"list '{key}' is empty")
    return items[:max_cases] if max_cases else items


def make_dataset(
    items: Sequence[dict],
    transform: Callable,
    cache_rate: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """``PersistentDataset`` when ``cache_dir`` is given (survives restarts), else ``CacheDataset`` with
    ``cache_rate`` (0 → plain ``Dataset``)."""
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(list(items), transform=transform, cache_dir=cache_dir)
    if cache_rate <= 0:
        return Dataset(list(items), transform=transform)
    return CacheDataset(list(items), transform=transform, cache_rate=cache_rate,
                        num_workers=num_workers or None, progress=progress)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    gpu_cache: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """``ThreadDataLoader`` for data cached on the GPU (no worker processes can touch CUDA tensors), otherwise a
    MONAI ``DataLoader`` with pinned memory when CUDA is available."""
    if gpu_cache:
        return ThreadDataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                num_workers=0, sampler=sampler, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), sampler=sampler, generator=generator,
                      persistent_workers=num_workers > 0)
