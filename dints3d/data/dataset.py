"""Reading a prepared WORK folder and turning its lists into cached MONAI datasets and loaders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import torch
from monai.data import (
    CacheDataset,
    DataLoader,
    Dataset,
    PersistentDataset,
    ThreadDataLoader,
)

from dints3d.data.datalist import read_datalist, read_datalist_file
from dints3d.data.fingerprint import read_plan
from dints3d.data.formats import plan_format
from dints3d.utils.errors import DintsError


def load_plan(work: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
              source: str | Mapping[str, str] = "plan") -> dict:
    """``WORK/plan.json`` with a config's ``plan:`` overrides applied, checked as ``dints3d prepare`` checks them
    (unknown field → the nearest one, type, range, agreement with the prepared data). Overrides replace fields as
    given; derived fields (patch from spacing, normalization from modalities) follow only in ``prepare``."""
    plan = read_plan(work)
    if not overrides:
        return plan
    return plan_format(plan).apply_plan_overrides(plan, overrides, source)


def load_items(work: str | os.PathLike, key: str, max_cases: int | None = None) -> list[dict]:
    """One non-empty list of ``WORK/datalist.json`` (e.g. ``fold0_weights``), absolute paths, at most
    ``max_cases`` items."""
    items = read_datalist(work, key)
    if not items:
        raise DintsError(Path(work) / "datalist.json", f"list '{key}' is empty (too few cases for this split)")
    return items[:max_cases] if max_cases else items


def check_items(items: Sequence[dict], channels: int, plan_file: str | os.PathLike, advice: str) -> None:
    """Before any case is loaded: every image and label of ``items`` exists, and every NIfTI image's header has
    ``channels`` channels (what ``plan_file`` says the network takes). A task folder moved or changed after
    ``dints3d prepare``, or an edited ``plan.json``, is then one line naming the case, not an error deep in MONAI's
    loader or a convolution; ``advice`` says what to do about a missing file."""
    for item in items:
        for key in ("image", "label"):
            if key in item and not Path(item[key]).is_file():
                case = item.get("case") or Path(item[key]).name
                raise DintsError(item[key], f"{key} of case '{case}' not found: {advice}")
    for item in items:
        image = Path(item["image"])
        if not image.name.endswith((".nii", ".nii.gz")):
            continue
        try:
            shape = nib.load(image).shape
        except Exception as e:  # noqa: BLE001 - nibabel raises many types for damaged headers
            raise DintsError(image, f"cannot read the NIfTI header ({type(e).__name__}: {e}); the file changed after "
                             "`dints3d prepare`: prepare again") from None
        found = shape[3] if len(shape) == 4 else 1
        if found != channels:
            raise DintsError(image, f"has {found} channel(s) (shape {list(shape)}), but {plan_file} says the network "
                             f"takes {channels}: the image or plan.json changed after `dints3d prepare`; prepare again")


def prepared_digest(work: str | os.PathLike, plan: Mapping[str, Any]) -> dict[str, str]:
    """Digests of what a prepared WORK folder makes a run learn from: the (effective) plan and the datalist (its
    split), each without the task folder's location (moving the task changes neither). A resumed search compares
    them with its checkpoint's."""
    datalist = read_datalist_file(work)

    def digest(value: Any) -> str:
        text = json.dumps({k: v for k, v in value.items() if k != "task_dir"}, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    return {"plan": digest(dict(plan)), "datalist": digest(datalist)}


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
