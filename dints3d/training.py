"""Handlers that make a bundle's retraining (``configs/train.yaml``) safe to kill, resume and feed bad numbers.

MONAI's workflows give the training loop; these four objects, referenced from ``train.yaml`` by ``_target_``, give
what a multi-day run needs on top of it:

- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` writing every file (``checkpoint_epoch=N.pt``,
  ``model.pt``) to a temporary file, fsynced and renamed, so a kill never leaves a truncated checkpoint.
- :class:`ResumeFromNewest`: restores the newest *readable* ``checkpoint_epoch=N.pt`` (a corrupt one is skipped with
  a warning for the one before it) and removes temporary files a killed write left.
- :class:`DeterministicEpochs`: reseeds every RNG at the start of each epoch from ``(seed, epoch, rank)`` and starts a
  fresh data iterator, so an epoch's batches do not depend on what ran before it and a run resumed from epoch e's
  checkpoint continues exactly like the uninterrupted run (bit for bit on CPU).
- :class:`NonFiniteGuard`: a step whose loss is NaN/Inf (from a bad batch or a diverging model) is skipped without
  touching the weights or the optimizer state, counted and logged; after ``max_consecutive`` in a row the run saves a
  resumable checkpoint and stops with one line.

The bundle's inference and evaluation configs use none of these, so they still run with MONAI alone. The failures
these objects report are meant for ``python -m monai.bundle run``: they end the process with one line
``error: <file>: <problem>`` (``SystemExit``) rather than a traceback.
"""

from __future__ import annotations

import logging
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from monai.utils.enums import CommonKeys

from dints3d.errors import DintsError
from dints3d.io import atomic_path
from dints3d.preflight import remove_stale_temporaries

logger = logging.getLogger("dints3d.training")

#: the resumable checkpoints train.yaml's checkpointer writes: ``checkpoint_epoch=<N>.pt``
CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch=(\d+)\.pt")


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
        with atomic_path(self.dirname / (self.filename or filename)) as tmp:
            torch.save(checkpoint, tmp)

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


def newest_readable_checkpoint(ckpt_dir: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """The newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` that loads (``weights_only=True``) as a training state,
    and its content; ``None`` if there is none. An unreadable newer one is passed over with a warning; if none is
    readable, :class:`DintsError` names the newest."""
    candidates = sorted((p for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt") if checkpoint_epoch(p) >= 0),
                        key=checkpoint_epoch, reverse=True)
    problems = []
    for path in candidates:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
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


class ResumeFromNewest:
    """Restore ``load_dict`` (model, optimizer, scheduler, trainer, …) from the newest readable checkpoint of
    ``ckpt_dir`` when the trainer starts; start from scratch if there is none.

    The checkpoint is chosen and read when this object is built (so a corrupt one fails before any work), and temporary
    files left by a killed atomic write are removed. ``max_epochs`` keeps the value of the current config, so rerunning
    with a larger ``num_iterations`` extends a finished training."""

    def __init__(self, ckpt_dir: str | os.PathLike, load_dict: dict, map_location: Any = None):
        self.ckpt_dir, self.load_dict = Path(ckpt_dir), load_dict
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
