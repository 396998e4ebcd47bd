"""Checkpoints of this bundle's training (``configs/train.yaml``) that survive a kill and a resume, with MONAI,
ignite and torch only.

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing every file (``checkpoint_epoch=N.pt``,
  ``model.pt``) to a temporary file, fsynced and renamed, so a kill never leaves a truncated checkpoint.
- :class:`ResumeFromNewest`: restores the newest *readable* ``checkpoint_epoch=N.pt`` (a corrupt one is skipped with
  a warning for the one before it) and removes temporary files a killed write left.
- :class:`ResumeCheck`: whether existing checkpoints may be continued, by train.yaml's ``resume_mode``: ``newest``
  (``python -m monai.bundle run``: always), ``never`` (``dints3d train``: refused) or ``same_settings``
  (``dints3d train --resume``: only if the :class:`RunSettings` recorded in the checkpoint match, except
  :data:`SAFE_TO_CHANGE`).
- :class:`RunSettings`: the settings that define a run (architecture, data, optimisation), saved in every checkpoint.

Failures end the run with one line ``error: <file>: <problem>`` (:mod:`scripts.errors`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from .errors import BundleError, rank, stop

logger = logging.getLogger(__name__)

#: the resumable checkpoints train.yaml's checkpointer writes: ``checkpoint_epoch=<N>.pt``
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch=(\d+)\.pt")
#: train.yaml's ``resume_mode`` values (see :class:`ResumeCheck`)
RESUME_MODES = ("newest", "never", "same_settings")
#: run settings a resumed training may change: its length and resources (``world_size``: the number of processes),
#: not the model being trained (bit-exact equality with an uninterrupted run then no longer holds)
SAFE_TO_CHANGE = ("num_iterations", "num_workers", "cache_rate", "sw_batch_size", "sw_overlap", "max_nonfinite_steps",
                  "world_size")


# --------------------------------------------------------------------------------------------- atomic checkpoints
@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` (``.<name>.<random>.tmp``); on success fsync it and rename it over
    ``target``, so readers see the old file or the complete new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give what a plain open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def written_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed ``torch.save`` (torch's zip writer reports a full disk as ``RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos``, the ``OSError`` being its context); ``None`` if none."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    return cause


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files an atomic write left behind when its process was killed; returns how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


class AtomicDiskSaver(BaseSaveHandler):
    """Write ``checkpoint`` to ``dirname/filename`` atomically (rank 0 only); ``filename`` fixes the name if given."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None):
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if rank() != 0:
            return
        target = self.dirname / (self.filename or filename)
        try:
            # through a Python file, so that a full disk is an OSError torch's zip writer wraps, not one it hides
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            error = written_error(e)
            if error is None:
                raise
            # a full or read-only disk: one line (monai.bundle run would print torch's "unexpected pos" traceback)
            code = f" [{errno.errorcode[error.errno]}]" if error.errno in errno.errorcode else ""
            raise stop(BundleError(target, f"cannot write: {error.strerror or error}{code}; the previous "
                                           f"{target.name} is unchanged")) from None

    def remove(self, filename: str) -> None:
        # ignite removes the file a save replaces before writing it; a fixed name (model.pt) is replaced by the atomic
        # rename instead, so a kill between the two never leaves no model at all
        if rank() == 0 and self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` (same arguments) with atomic writes: MONAI writes in place
    (``atomic=False``), so a kill during a save would leave a truncated ``model.pt`` or checkpoint."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any):
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, getattr(checkpoint.save_handler, "filename", None))


# ----------------------------------------------------------------------------------------------------------- resume
def checkpoint_epoch(path: Path) -> int:
    """N of ``checkpoint_epoch=N.pt``; -1 for any other name."""
    match = CHECKPOINT_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def training_state_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    """What a training left in ``ckpt_dir`` that a new one would replace: ``checkpoint_epoch=N.pt`` and ``model.pt``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if checkpoint_epoch(p) >= 0 or p.name == "model.pt")


def newest_readable_checkpoint(ckpt_dir: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
                               ) -> tuple[Path, dict] | None:
    """The newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` that loads (``weights_only=True``; ``mmap``: tensors
    mapped, not read) as a training state, and its content; ``None`` if there is none. An unreadable newer one is
    passed over with a warning; if none is readable, :class:`BundleError` names the newest."""
    candidates = sorted((p for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt") if checkpoint_epoch(p) >= 0),
                        key=checkpoint_epoch, reverse=True)
    problems = []
    for path in candidates:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            if not isinstance(state, dict) or "trainer" not in state:
                raise ValueError("not a training checkpoint")
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means "corrupt"
            problems.append(f"{path.name}: {type(e).__name__}")
            continue
        if problems:
            warnings.warn(f"{candidates[0]} is unreadable ({problems[0]}); resuming from the previous checkpoint "
                          f"{path}", stacklevel=2)
        return path, state
    if problems:
        raise BundleError(candidates[0], f"checkpoint is corrupt and no readable earlier checkpoint exists "
                          f"({'; '.join(problems)}); delete it to train from scratch")
    return None


def refuse_existing_training(ckpt_dir: str | os.PathLike, how_to_continue: str) -> None:
    """:class:`BundleError` if ``ckpt_dir`` holds checkpoints or a ``model.pt`` that a new training would replace."""
    found = training_state_files(ckpt_dir)
    if found:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise BundleError(ckpt_dir, f"already holds a training ({names}); {how_to_continue}, or train in a fresh "
                          "bundle (dints3d export)")


# ---------------------------------------------------------------------------------------------------- run settings
def plain_value(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-like data that ``torch.load(weights_only=True)`` reads back: containers and scalars as they
    are, an object (a MONAI transform) as its class and public attributes (two levels deep), anything else by type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain_value(v, depth) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain_value(v, depth) for k, v in value.items()}
    if hasattr(value, "__dict__") and not isinstance(value, type) and depth < 2:
        attributes = {k: plain_value(v, depth + 1) for k, v in sorted(vars(value).items()) if not k.startswith("_")}
        return {"class": f"{type(value).__module__}.{type(value).__qualname__}", **attributes}
    return str(value) if isinstance(value, (type, np.dtype, torch.dtype)) else type(value).__qualname__


def leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``. Lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: Mapping, now: Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (before, now) for every leaf that differs, in key order; a missing leaf counts as ``None``."""
    then, current = leaves(before), leaves(now)
    return {key: (then.get(key), current.get(key)) for key in sorted({*then, *current})
            if then.get(key) != current.get(key)}


def unsafe_changes(changes: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes of keys that are not in (or under an entry of) :data:`SAFE_TO_CHANGE`."""
    return {k: v for k, v in changes.items() if not any(k == p or k.startswith(p + ".") for p in SAFE_TO_CHANGE)}


class RunSettings:
    """The settings that make a training run what it is (architecture, cases, data handling, optimisation, process
    count), as plain values. Saved in every checkpoint (``state_dict``) so that a resume can tell whether it continues
    the same run; loading a checkpoint never overwrites the current settings."""

    def __init__(self, values: Mapping[str, Any]):
        self.values = plain_value(dict(values))

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: Mapping) -> None:
        """Nothing to restore: the checkpoint's record is compared (:func:`changed_settings`), not adopted."""


def _describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key} {short(old)} -> {short(new)}" for key, (old, new) in changes.items())


class ResumeCheck:
    """Whether this run may use the checkpoints in ``ckpt_dir``, decided in ``initialize`` (before the data are cached)
    by train.yaml's ``resume_mode``:

    - ``newest`` (default, plain ``python -m monai.bundle run``): continue from them; settings that differ from the
      :class:`RunSettings` recorded in the newest readable checkpoint are logged as a warning;
    - ``never`` (``dints3d train``): a checkpoint or ``model.pt`` in ``ckpt_dir`` stops the run (one line);
    - ``same_settings`` (``dints3d train --resume``): a readable checkpoint must exist and its recorded settings must
      equal ``settings`` except :data:`SAFE_TO_CHANGE`.

    Only the settings are read (``mmap``), not the weights; :class:`ResumeFromNewest` loads the state later."""

    def __init__(self, ckpt_dir: str | os.PathLike, mode: str = "newest", settings: RunSettings | None = None):
        self.ckpt_dir, self.mode = Path(ckpt_dir), mode
        try:
            if mode not in RESUME_MODES:
                raise BundleError("resume_mode", f"must be one of {', '.join(RESUME_MODES)}, got '{mode}'")
            if mode == "never":
                refuse_existing_training(self.ckpt_dir, "set resume_mode: newest or same_settings to continue it")
                return
            with warnings.catch_warnings():  # ResumeFromNewest warns about an unreadable newest checkpoint
                warnings.simplefilter("ignore")
                found = newest_readable_checkpoint(self.ckpt_dir, "cpu", mmap=True)
            if found is None and mode == "same_settings":
                raise BundleError(self.ckpt_dir, "no checkpoint_epoch=N.pt to resume from (start without --resume)")
            if found is not None and settings is not None:
                self._compare(found[0], found[1].get("run_settings"), settings.values)
        except BundleError as e:
            raise stop(e) from None

    def _compare(self, path: Path, recorded: Any, current: dict) -> None:
        if not isinstance(recorded, dict):
            if self.mode == "same_settings":
                raise BundleError(path, "records no run settings (written by an older train.yaml), so resuming cannot "
                                  "be checked; continue it with `python -m monai.bundle run` or train in a fresh bundle")
            return
        changes = changed_settings(recorded, current)
        unsafe = unsafe_changes(changes)
        if unsafe and self.mode == "same_settings":
            raise BundleError(path, f"was trained with other settings: {_describe_changes(unsafe)}; revert them or "
                              f"train in a fresh bundle (only {', '.join(SAFE_TO_CHANGE)} may change on resume)")
        if unsafe:
            logger.warning(f"resuming {path} with changed settings: {_describe_changes(unsafe)}")
        elif changes:
            logger.info(f"resuming {path} with {_describe_changes(changes)}")


class ResumeFromNewest:
    """Restore ``load_dict`` (model, optimizer, scheduler, trainer, …) from the newest readable checkpoint of
    ``ckpt_dir`` when the trainer starts; start from scratch if there is none.

    The checkpoint is chosen and read when this object is built (so a corrupt one fails before any training), and
    temporary files left by a killed atomic write are removed. ``max_epochs`` keeps the value of the current config,
    so resuming with a larger ``num_iterations`` extends a finished training. ``check`` is the run's
    :class:`ResumeCheck`: referencing it here makes it run even under an overlay whose ``initialize`` omits it."""

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: dict, map_location: Any = None,
                 check: ResumeCheck | None = None):
        self.ckpt_dir, self.load_dict, self.check = Path(ckpt_dir), load_dict, check
        if rank() == 0 and self.ckpt_dir.is_dir():
            remove_stale_temporaries(self.ckpt_dir)
        try:
            found = newest_readable_checkpoint(self.ckpt_dir, map_location)
        except BundleError as e:
            raise stop(e) from None
        self.path, self._state = found if found is not None else (None, None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self._state is None:
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=self.load_dict, checkpoint=self._state, strict=True)
        self._state = None
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise stop(BundleError(self.path, f"has trained {engine.state.epoch} epochs, more than this config's "
                                   f"{max_epochs}; raise num_iterations or start in another bundle"))
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.path} (iteration {engine.state.iteration})")
