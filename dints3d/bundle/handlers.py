"""Handlers that make a bundle's retraining (``configs/train.yaml``) safe to kill, resume and feed bad numbers.

MONAI's workflows give the training loop; these objects, referenced from ``train.yaml`` by ``_target_``, give what a
multi-day run needs on top of it:

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing every file (``checkpoint_epoch=N.pt``,
  ``model.pt``) to a temporary file, fsynced and renamed, so a kill never leaves a truncated checkpoint.
- :class:`ResumeFromNewest`: restores the newest *readable* ``checkpoint_epoch=N.pt`` (a corrupt one is skipped with
  a warning for the one before it) and removes temporary files a killed write left.
- :class:`ResumeCheck`: whether existing checkpoints may be continued, by train.yaml's ``resume_mode``: ``newest``
  (``python -m monai.bundle run``: always), ``never`` (``dints3d train``: refused) or ``same_settings``
  (``dints3d train --resume``: only if the :class:`RunSettings` recorded in the checkpoint match, except
  :data:`SAFE_TO_CHANGE`).
- :class:`RunSettings`: the settings that define a run (architecture, data, optimisation), saved in every checkpoint.
- :class:`DeterministicEpochs`: reseeds every RNG at the start of each epoch from ``(seed, epoch, rank)`` and starts a
  fresh data iterator, so an epoch's batches do not depend on what ran before it and a run resumed from epoch e's
  checkpoint continues exactly like the uninterrupted run (bit for bit on CPU).
- :class:`NonFiniteGuard`: a step whose loss is NaN/Inf (from a bad batch or a diverging model) is skipped without
  touching the weights or the optimizer state, counted and logged; after ``max_consecutive`` in a row the run saves a
  resumable checkpoint and stops with one line.

- :class:`OutOfMemoryReport`: a CUDA out-of-memory error in the trainer or the evaluator becomes one line with the
  predicted memory of a training step (:mod:`dints3d.cost.memory`), the device's memory and concrete settings to change.

The bundle's inference and evaluation configs use none of these, so they still run with MONAI alone. The failures
these objects report are meant for ``python -m monai.bundle run``: they end the process with one line
``error: <file>: <problem>`` (``SystemExit``) rather than a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.data.utils import set_rnd
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from monai.utils.enums import CommonKeys

from dints3d.cost.memory import meta_network, predict_training_memory
from dints3d.data.patch import per_axis
from dints3d.spaces.factory import load_architecture
from dints3d.utils.checkpoint import write_torch
from dints3d.utils.errors import DintsError
from dints3d.utils.preflight import remove_stale_temporaries
from dints3d.utils.resume_settings import changed_settings, split_changes

logger = logging.getLogger("dints3d.bundle.handlers")

#: the resumable checkpoints train.yaml's checkpointer writes: ``checkpoint_epoch=<N>.pt``
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch=(\d+)\.pt")
#: train.yaml's ``resume_mode`` values (see :class:`ResumeCheck`)
RESUME_MODES = ("newest", "never", "same_settings")
#: run settings a resumed training may change: its length and resources (``world_size``: the number of processes),
#: not the model being trained (bit-exact equality with an uninterrupted run then no longer holds)
SAFE_TO_CHANGE = ("num_iterations", "num_workers", "cache_rate", "sw_batch_size", "sw_overlap", "max_nonfinite_steps",
                  "world_size")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _exit(error: DintsError) -> SystemExit:
    """The one-line failure of a bundle run (``monai.bundle run`` would otherwise print a traceback)."""
    return SystemExit(f"error: {error.line()}")


# --------------------------------------------------------------------------------------------- atomic checkpoints
class AtomicDiskSaver(BaseSaveHandler):
    """Write ``checkpoint`` to ``dirname/filename`` atomically (rank 0 only); ``filename`` fixes the name if given."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None):
        self.dirname, self.filename = Path(dirname), filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() != 0:
            return
        try:
            write_torch(self.dirname / (self.filename or filename), checkpoint)
        except DintsError as e:  # a full disk: one line (the bundle run would print a traceback)
            raise _exit(e) from None

    def remove(self, filename: str) -> None:
        # ignite removes the file a save replaces before writing it; a fixed name (model.pt) is replaced by the atomic
        # rename instead, so a kill between the two never leaves no model at all
        if _rank() == 0 and self.filename is None:
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
    passed over with a warning; if none is readable, :class:`DintsError` names the newest."""
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
        raise DintsError(candidates[0], f"checkpoint is corrupt and no readable earlier checkpoint exists "
                         f"({'; '.join(problems)}); delete it to train from scratch")
    return None


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


class RunSettings:
    """The settings that make a training run what it is (architecture, cases, data handling, optimisation, process
    count), as plain values. Saved in every checkpoint (``state_dict``) so that a resume can tell whether it continues
    the same run; loading a checkpoint never overwrites the current settings."""

    def __init__(self, values: Mapping[str, Any]):
        self.values = plain_value(dict(values))

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: Mapping) -> None:
        """Nothing to restore: the checkpoint's record is compared
        (:func:`~dints3d.utils.resume_settings.changed_settings`), not adopted."""


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
                raise DintsError("resume_mode", f"must be one of {', '.join(RESUME_MODES)}, got '{mode}'")
            if mode == "never":
                refuse_existing_training(self.ckpt_dir, "set resume_mode: newest or same_settings to continue it")
                return
            with warnings.catch_warnings():  # ResumeFromNewest warns about an unreadable newest checkpoint
                warnings.simplefilter("ignore")
                found = newest_readable_checkpoint(self.ckpt_dir, "cpu", mmap=True)
            if found is None and mode == "same_settings":
                raise DintsError(self.ckpt_dir, "no checkpoint_epoch=N.pt to resume from (start without --resume)")
            if found is not None and settings is not None:
                self._compare(found[0], found[1].get("run_settings"), settings.values)
        except DintsError as e:
            raise _exit(e) from None

    def _compare(self, path: Path, recorded: Any, current: dict) -> None:
        if not isinstance(recorded, dict):
            if self.mode == "same_settings":
                raise DintsError(path, "records no run settings (written by an older train.yaml), so resuming cannot "
                                 "be checked; continue it with `python -m monai.bundle run` or train in a fresh bundle")
            return
        changes = changed_settings(recorded, current)
        _, unsafe = split_changes(changes, SAFE_TO_CHANGE)
        if unsafe and self.mode == "same_settings":
            raise DintsError(path, f"was trained with other settings: {_describe_changes(unsafe)}; revert them or "
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
        if _rank() == 0 and self.ckpt_dir.is_dir():
            remove_stale_temporaries(self.ckpt_dir)
        try:
            found = newest_readable_checkpoint(self.ckpt_dir, map_location)
        except DintsError as e:
            raise _exit(e) from None
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
            raise _exit(DintsError(self.path, f"has trained {engine.state.epoch} epochs, more than this config's "
                                   f"{max_epochs}; raise num_iterations or start in another bundle"))
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {self.path} (iteration {engine.state.iteration})")


def refuse_existing_training(ckpt_dir: str | os.PathLike, how_to_continue: str) -> None:
    """:class:`DintsError` if ``ckpt_dir`` holds checkpoints or a ``model.pt`` that a new training would replace."""
    found = training_state_files(ckpt_dir)
    if found:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DintsError(ckpt_dir, f"already holds a training ({names}); {how_to_continue}, or train in a fresh "
                         "bundle (dints3d export)")


# ----------------------------------------------------------------------------------------------------- determinism
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed for one epoch of one rank, independent for every ``(seed, epoch, rank)``."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank]).generate_state(1)[0])


class DeterministicEpochs:
    """At the start of every epoch, seed Python, NumPy, torch and the training data's random transforms from
    ``(seed, epoch, rank)`` and restart the data iterator, so the shuffle order and the augmentation of epoch e are a
    function of e alone. Without this, epoch e would continue RNG streams and a data iterator that a resumed run no
    longer has. Ranks get different seeds (each augments its own partition differently)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._first_epoch = True

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def _started(self, engine: Engine) -> None:
        self._first_epoch = True
        loader = engine.state.dataloader
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        logger.info(f"rank {_rank()}/{world}: {len(loader.dataset)} training case(s); epoch e is seeded from "
                    f"({self.seed}, e, rank)")

    def __call__(self, engine: Engine) -> None:
        seed = epoch_seed(self.seed, engine.state.epoch, _rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        set_rnd(engine.state.dataloader.dataset, seed)
        if self._first_epoch:
            # ignite creates the run's first iterator right after this event, from the RNG seeded above
            self._first_epoch = False
        else:
            engine.set_data(engine.state.dataloader)


# ------------------------------------------------------------------------------------------------ numerical faults
class NonFiniteGuard:
    """Skip training steps whose loss is NaN or Inf, and stop after ``max_consecutive`` in a row.

    On a non-finite loss (on any rank: ranks agree, so all skip together) the step is skipped: without a gradient
    scaler the loss is swapped for a constant before ``backward()``, so no parameter gets a gradient and the optimizer
    (whose gradients are reset to ``None`` each step) changes neither weights nor momentum; with an active fp16
    ``GradScaler`` the loss is made NaN so that its gradients are, and the scaler skips the step itself. Each skip is
    logged (with the real loss restored for the loggers after ``backward()``); the counts
    live in the trainer's state (saved in its checkpoints). The ``max_consecutive``-th skip in a row saves a
    resumable checkpoint through ``checkpointer`` and ends the run; :meth:`raise_if_stopped`, called after the trainer
    returns, then exits with one line.
    """

    def __init__(self, max_consecutive: int = 20, checkpointer: CheckpointSaver | None = None):
        if int(max_consecutive) < 1:
            raise _exit(DintsError("max_nonfinite_steps", f"must be ≥ 1, got {max_consecutive}"))
        self.max_consecutive, self.checkpointer = int(max_consecutive), checkpointer
        self.stopped: DintsError | None = None
        self._skipped_loss: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        if not getattr(engine, "optim_set_to_none", False):
            raise _exit(DintsError("train#trainer", "needs optim_set_to_none: true (a skipped step must leave no "
                                   "gradients for the optimizer to apply)"))
        for key in ("nonfinite_total", "nonfinite_consecutive"):
            setattr(engine.state, key, 0)
            if key not in engine.state_dict_user_keys:
                engine.state_dict_user_keys.append(key)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._restore_loss)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_stop)

    @staticmethod
    def _all_ranks_finite(loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _check_loss(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output[CommonKeys.LOSS]
        if self._all_ranks_finite(loss):
            engine.state.nonfinite_consecutive = 0
            return
        engine.state.nonfinite_total += 1
        engine.state.nonfinite_consecutive += 1
        image = output.get(CommonKeys.IMAGE)
        bad_input = isinstance(image, torch.Tensor) and not bool(torch.isfinite(image).all())
        cause = "the input batch has NaN/Inf values" if bad_input else f"loss {float(loss.detach()):g}"
        logger.warning(f"non-finite training loss at iteration {engine.state.iteration} ({cause}); step skipped "
                       f"({engine.state.nonfinite_consecutive} in a row, {engine.state.nonfinite_total} in total)")
        self._skipped_loss = loss.detach()
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # NaN gradients make the scaler skip optimizer.step() itself (a non-finite loss alone need not give
            # non-finite gradients: a constant Inf has gradient 0), and back off its scale as after any overflow
            output[CommonKeys.LOSS] = loss * float("nan")
        else:
            output[CommonKeys.LOSS] = torch.zeros((), device=loss.device, requires_grad=True)

    def _restore_loss(self, engine: Engine) -> None:
        if self._skipped_loss is not None:  # log the real loss, not the stand-in
            engine.state.output[CommonKeys.LOSS] = self._skipped_loss
            self._skipped_loss = None

    def _maybe_stop(self, engine: Engine) -> None:
        if engine.state.nonfinite_consecutive < self.max_consecutive:
            return
        if self.checkpointer is not None:
            self.checkpointer.interval_completed(engine)
            path = Path(self.checkpointer.save_dir) / f"checkpoint_epoch={engine.state.epoch}.pt"
            where = f"a resumable checkpoint {path}"
        else:
            where = "no checkpoint (train#checkpointer is disabled)"
        self.stopped = DintsError("train", f"{engine.state.nonfinite_consecutive} consecutive non-finite losses up to "
                                  f"iteration {engine.state.iteration} ({engine.state.nonfinite_total} in total); "
                                  f"stopped with {where}. Check the data for NaN/Inf, lower learning_rate or set "
                                  "amp false, then rerun to resume")
        logger.error(self.stopped.line())
        engine.terminate()

    def raise_if_stopped(self) -> None:
        """Exit with the guard's one-line message if it stopped the run."""
        if self.stopped is not None:
            raise _exit(self.stopped)


# --------------------------------------------------------------------------------------------------- out of memory
def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                         and "CUDA out of memory" in str(error))


def smaller_patch(patch: Sequence[int], step: int, fraction: float) -> list[int]:
    """``patch`` with its largest side cut by ``step`` again and again until it has at most ``fraction`` of the voxels
    (at least one cut; no side below ``step``)."""
    patch = [int(p) for p in patch]
    target = max(fraction, 0.0) * math.prod(patch)
    while True:
        largest = max(patch)
        if largest <= step:
            return patch
        patch[patch.index(largest)] = largest - step
        if math.prod(patch) <= target:
            return patch


class OutOfMemoryReport:
    """Turn a CUDA out-of-memory error of the trainer or the evaluator into one line (``SystemExit``): the predicted
    memory of a training step with these settings (:func:`dints3d.cost.memory.predict_training_memory`), the device's
    memory and the settings to change. Any other exception is re-raised unchanged.

    Ignite calls only the first ``EXCEPTION_RAISED`` handler of an engine, so this object is listed first in both
    ``train#handlers`` and ``validate#handlers`` (before MONAI's ``StatsHandler``, which would log a traceback).

    Args:
        arch_file: the bundle's ``models/arch.json``.
        build_options: keyword arguments of ``Architecture.build`` (``channel_mul``, …).
        batch: patches per training step (``batch_size × num_samples``).
    """

    def __init__(self, arch_file: str | os.PathLike, in_channels: int, out_channels: int, patch_size: Sequence[int],
                 batch: int, amp: bool, device: Any, build_options: Mapping[str, Any] | None = None,
                 sw_batch_size: int = 1):
        self.arch_file, self.in_channels, self.out_channels = Path(arch_file), int(in_channels), int(out_channels)
        self.patch, self.batch, self.amp = [int(p) for p in patch_size], int(batch), bool(amp)
        self.device, self.build_options, self.sw_batch_size = torch.device(device), dict(build_options or {}), \
            int(sw_batch_size)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, error: BaseException) -> None:
        if not is_out_of_memory(error):
            raise error
        raise _exit(DintsError(str(self.device), self.message(isinstance(engine, Evaluator))))

    def _capacity(self) -> int | None:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def _prediction(self) -> tuple[dict[str, int], int] | None:
        """Predicted bytes of a training step (on CUDA) and the step by which a patch side may shrink (the
        architecture's patch divisor, or 32 for one that takes any size); ``None`` if unknown."""
        try:
            arch = load_architecture(self.arch_file)
            model = meta_network(arch, self.in_channels, self.out_channels, **self.build_options)
            predicted = predict_training_memory(model, (self.in_channels, *self.patch), batch=self.batch,
                                                amp=self.amp, device="cuda")
            step = max(per_axis(arch.patch_divisor, arch.spatial_dims))
            return predicted, step if step > 1 else 32
        except Exception:  # noqa: BLE001 - the advice must not fail where the report is needed most
            return None

    def message(self, validation: bool) -> str:
        """The one-line report of an out-of-memory error during training or (``validation``) during validation."""
        capacity = self._capacity()
        has = "" if capacity is None else f" of the {_size(capacity)} the GPU has"
        if validation:
            advice = [*(["sw_batch_size=1"] if self.sw_batch_size > 1 else []),
                      "validate#inferer#device=cpu (the prediction is stitched on the CPU)",
                      f"a smaller validate#inferer#roi_size than {self.patch} (validation windows only)"]
            return (f"CUDA out of memory during validation (sliding windows of {self.patch}, sw_batch_size "
                    f"{self.sw_batch_size}); try --set " + ", or ".join(advice))
        prediction = self._prediction()
        setting = f"patch {self.patch}, {self.batch} patch(es) per step, amp {str(self.amp).lower()}"
        if prediction is None:
            return (f"CUDA out of memory during training ({setting}); try --set a smaller patch_size, batch_size=1 "
                    "num_samples=1, amp=true or a smaller channel_mul")
        predicted, step = prediction
        fixed = predicted["parameters"] + predicted["gradients"] + predicted["optimizer_state"]
        per_patch = predicted["peak"] - fixed
        if capacity is not None and fixed >= 0.9 * capacity:
            advice = [f"a smaller channel_mul (weights, gradients and momentum alone need {_size(fixed)})"]
        else:
            room = 0.5 if capacity is None else (0.9 * capacity - fixed) / max(per_patch, 1)
            advice = [f"patch_size={smaller_patch(self.patch, step, room)}"]
            if self.batch > 1:
                advice.append("batch_size=1 num_samples=1")
            if not self.amp:
                advice.append("amp=true")
            advice.append("a smaller channel_mul (a narrower network)")
        return (f"CUDA out of memory during training ({setting}): a step is predicted to need "
                f"{_size(predicted['peak'])}{has}; try --set " + ", or ".join(advice))


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
