"""Training that a bad number or a kill does not derail, with MONAI, ignite and torch only.

- :class:`DeterministicEpochs`: reseeds every RNG at the start of each epoch from ``(seed, epoch, rank)`` and starts a
  fresh data iterator, so an epoch's batches do not depend on what ran before it and a run resumed from epoch e's
  checkpoint continues exactly like the uninterrupted run (bit for bit on CPU).
- :class:`NonFiniteGuard`: a step whose loss is NaN/Inf (from a bad batch or a diverging model) is skipped without
  touching the weights or the optimizer state, counted and logged; after ``max_consecutive`` in a row the run saves a
  resumable checkpoint and stops with one line.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointSaver
from monai.utils.enums import CommonKeys

from .errors import BundleError, rank, stop

logger = logging.getLogger(__name__)


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
        logger.info(f"rank {rank()}/{world}: {len(loader.dataset)} training case(s); epoch e is seeded from "
                    f"({self.seed}, e, rank)")

    def __call__(self, engine: Engine) -> None:
        seed = epoch_seed(self.seed, engine.state.epoch, rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        set_rnd(engine.state.dataloader.dataset, seed)
        if self._first_epoch:
            # ignite creates the run's first iterator right after this event, from the RNG seeded above
            self._first_epoch = False
        else:
            engine.set_data(engine.state.dataloader)


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
            raise stop(BundleError("max_nonfinite_steps", f"must be ≥ 1, got {max_consecutive}"))
        self.max_consecutive, self.checkpointer = int(max_consecutive), checkpointer
        self.stopped: BundleError | None = None
        self._skipped_loss: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        if not getattr(engine, "optim_set_to_none", False):
            raise stop(BundleError("train#trainer", "needs optim_set_to_none: true (a skipped step must leave no "
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
        self.stopped = BundleError("train", f"{engine.state.nonfinite_consecutive} consecutive non-finite losses up to "
                                  f"iteration {engine.state.iteration} ({engine.state.nonfinite_total} in total); "
                                  f"stopped with {where}. Check the data for NaN/Inf, lower learning_rate or set "
                                  "amp false, then rerun to resume")
        logger.error(self.stopped.line())
        engine.terminate()

    def raise_if_stopped(self) -> None:
        """Exit with the guard's one-line message if it stopped the run."""
        if self.stopped is not None:
            raise stop(self.stopped)
