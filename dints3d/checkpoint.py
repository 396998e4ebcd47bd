"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

``save_checkpoint`` writes ``<name>.pt`` atomically and keeps the file it replaces as ``<name>.prev.pt``, so a
checkpoint that is found truncated or garbled on resume falls back to the one before it, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from dints3d.errors import DintsError
from dints3d.io import atomic_path


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts only) to ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():
            os.replace(path, previous_path(path))
    return path


def _load(path: Path, map_location: Any) -> dict:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dictionary")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load ``path``; if it is unreadable, fall back to ``<name>.prev.pt`` with a warning, else raise
    :class:`DintsError` naming the file."""
    path = Path(path)
    if not path.exists() and not previous_path(path).exists():
        raise DintsError(path, "checkpoint not found")
    errors = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = _load(candidate, map_location)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means "corrupt"
            errors.append(f"{candidate.name}: {type(e).__name__}")
            continue
        if candidate != path:
            warnings.warn(f"{path} is unreadable ({errors[0]}); resuming from the previous checkpoint {candidate}")
        return state
    raise DintsError(path, f"checkpoint is corrupt and no readable previous checkpoint exists ({'; '.join(errors)})")
