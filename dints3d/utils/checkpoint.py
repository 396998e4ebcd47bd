"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

``save_checkpoint`` writes ``<name>.pt`` atomically and keeps the file it replaces as ``<name>.prev.pt``. The order
of the steps is what makes a kill harmless: the new checkpoint is written and fsynced to a temporary file first; only
then is the old one kept as ``<name>.prev.pt`` (a hard link, so ``<name>.pt`` never disappears), and finally the
temporary file is renamed over ``<name>.pt``. On resume a missing, truncated or garbled ``<name>.pt`` falls back to
``<name>.prev.pt`` with a warning. Garbage inside tensor data does not break unpickling, so every checkpoint carries
a digest of its contents (``"digest"``), checked on load.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from dints3d.utils.errors import DintsError
from dints3d.utils.io import atomic_file


class CorruptCheckpoint(ValueError):
    """A checkpoint that unpickles but is not what was saved."""


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def has_checkpoint(path: str | os.PathLike) -> bool:
    """Whether :func:`load_checkpoint` has a file to try: ``path`` or its ``<name>.prev.pt``."""
    path = Path(path)
    return path.exists() or previous_path(path).exists()


def _keep_as_previous(path: Path) -> None:
    """Make ``<name>.prev.pt`` the current ``<name>.pt``, leaving ``<name>.pt`` in place when the file system
    has hard links (else it is renamed, and a kill before the new file arrives leaves only ``<name>.prev.pt``,
    which :func:`load_checkpoint` falls back to)."""
    previous = previous_path(path)
    link = path.with_name(f".{previous.name}.{os.getpid()}.tmp")  # removed as a stale temporary if we are killed
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    os.replace(link, previous)


def content_digest(state: Any) -> str:
    """BLAKE2b of every key, value and tensor byte of ``state``, in order (dicts keep their insertion order
    through ``torch.save``/``torch.load``)."""
    h = hashlib.blake2b(digest_size=16)

    def visit(value: Any) -> None:
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            h.update(f"D{len(value)}".encode())
            for k, v in value.items():
                h.update(repr(k).encode())
                visit(v)
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}".encode())
            for v in value:
                visit(v)
        else:
            h.update(repr(value).encode())

    visit(state)
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], kept: str | None = None) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts only) and its digest to ``path``. A failed
    write (a full disk) raises :class:`DintsError` naming ``path``; ``kept`` says what is still intact (default: the
    previous checkpoint)."""
    path = Path(path)

    def keep_previous() -> None:  # runs once the new checkpoint is fsynced: the old one is touched only then
        if path.exists():
            _keep_as_previous(path)

    kept = kept or f"the previous {path.name} is unchanged"
    with atomic_file(path, before_rename=keep_previous, kept=kept) as f:
        torch_save({**state, "digest": content_digest(state)}, f)
    return path


def torch_save(obj: Any, f: IO[bytes]) -> None:
    """``torch.save(obj, f)`` whose failure to write (a full disk) is the ``OSError`` the file raised: torch's zip
    writer turns it into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" (always, writing to a
    path), which :func:`~dints3d.utils.io.atomic_file` could not tell from a bug."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def write_torch(path: str | os.PathLike, obj: Any, kept: str | None = None) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path`` (:func:`torch_save`); a failed write is one line naming
    ``path`` (``kept``: what is still intact)."""
    path = Path(path)
    with atomic_file(path, kept=kept or f"the previous {path.name} is unchanged") as f:
        torch_save(obj, f)
    return path


def _load(path: Path, map_location: Any) -> dict:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise CorruptCheckpoint("not a checkpoint dictionary")
    digest = state.pop("digest", None)  # checkpoints of earlier versions have none
    if digest is not None and digest != content_digest(state):
        raise CorruptCheckpoint("contents do not match their digest")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load ``path``; if it is missing or unreadable, fall back to ``<name>.prev.pt`` with a warning, else raise
    :class:`DintsError` naming the file."""
    path = Path(path)
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        raise DintsError(path, "checkpoint not found")
    problems = []
    for candidate in (path, previous):
        if candidate.exists() and not candidate.is_file():
            raise DintsError(candidate, "is not a file (a folder?) where a checkpoint should be; move it away, then "
                             "resume")
        if not candidate.exists():
            problems.append(f"{candidate.name}: missing")
            continue
        try:
            state = _load(candidate, map_location)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means "corrupt"
            problems.append(f"{candidate.name}: {e if isinstance(e, CorruptCheckpoint) else type(e).__name__}")
            continue
        if candidate != path:
            warnings.warn(f"{path} is {'missing' if not path.exists() else 'unreadable'} ({problems[0]}); "
                          f"resuming from the previous checkpoint {candidate}", stacklevel=2)
        return state
    raise DintsError(path, f"checkpoint is corrupt and no readable previous checkpoint exists ({'; '.join(problems)})")
