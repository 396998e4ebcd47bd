"""Checks run before heavy work, so a run fails in its first second with one clear line, not after an hour."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dints3d.utils.errors import DintsError
from dints3d.utils.io import probe_writable
from dints3d.utils.outputs import check_output_folder, describe_os_error


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it."""
    folder = Path(folder)
    check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as e:
        raise DintsError(folder, f"cannot write here ({describe_os_error(e)})") from None
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files an atomic write left behind when its process was killed; returns how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def estimate_cache_bytes(plan: Mapping, num_cases: int) -> int:
    """Disk a ``PersistentDataset`` cache needs: each case at target spacing, float32 image + uint8 label."""
    median = np.asarray(plan.get("median_shape") or plan["patch_size"], dtype=float)
    voxels = float(np.prod(median))
    return int(num_cases * voxels * (4 * int(plan["in_channels"]) + 1) * 1.2)  # 20% for shape spread and metadata


def total_memory() -> int | None:
    """Bytes of RAM this machine has (``MemTotal`` of ``/proc/meminfo``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_free_disk(folder: str | os.PathLike, needed: int, purpose: str = "the cache",
                    advice: str = "free space, choose another data.cache_dir, or set data.cache_dir: null") -> None:
    """Refuse to start when ``folder``'s file system has less than ``needed`` bytes free for ``purpose``."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DintsError(folder, f"needs about {needed / 2**30:.1f} GiB free for {purpose}, {free / 2**30:.1f} GiB "
                         f"available ({advice})")


def out_of_memory_advice(predicted_bytes: int | None, patch: Sequence[int], checkpoint_cells: bool,
                         stage: str | None = None) -> str:
    """What to tell a user whose GPU ran out of memory in a search step (``predicted_bytes``: the memory model's
    need of one step), or during ``stage="validation"``: sliding windows of the patch size without gradients, so
    the window batch and the patch size are what matter there (activation checkpointing saves nothing)."""
    if stage == "validation":
        return (f"CUDA out of memory during validation; try search.val_sw_batch_size=1, "
                f"a smaller data.patch_size than {list(patch)}")
    predicted = "" if predicted_bytes is None else f"; predicted need {predicted_bytes / 2**30:.1f} GiB"
    # not σ / memory_budget_gb: they shape the decoded network, while the supernet always runs every path
    advice = [f"a smaller data.patch_size than {list(patch)}", "data.batch_size=1 / data.num_samples=1"]
    if not checkpoint_cells:
        advice.insert(0, "search.checkpoint_cells=true (about half the memory for ~1.3x the time)")
    return f"CUDA out of memory{predicted}; try " + ", ".join(advice)
