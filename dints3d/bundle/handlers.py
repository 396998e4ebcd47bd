"""The handlers that make a bundle's retraining safe to kill, resume and feed bad numbers, for dints3d's own code.

They live in the MSD template's ``scripts/`` (``bundles/dints_msd/scripts/``: ``checkpoints.py``, ``reliability.py``,
``memory.py``), which every exported bundle carries, so that its ``train.yaml`` runs with MONAI alone; this module
re-exports them (loaded by :func:`~dints3d.bundle.template.template_module`) for ``dints3d train`` and the Cityscapes
bundle (whose configs name ``dints3d.bundle.handlers.*``):

- :class:`AtomicCheckpointSaver`, :class:`ResumeFromNewest`, :class:`ResumeCheck`, :class:`RunSettings`
  (``scripts/checkpoints.py``): atomic checkpoints, resuming from the newest readable one, ``resume_mode``, and the
  settings recorded in every checkpoint;
- :class:`DeterministicEpochs`, :class:`NonFiniteGuard` (``scripts/reliability.py``): epochs seeded from
  ``(seed, epoch, rank)``, NaN/Inf steps skipped;
- :class:`OutOfMemoryReport` (``scripts/memory.py``): a CUDA out-of-memory error as one line with advice.

Only :func:`refuse_existing_training` is dints3d's own: it raises :class:`~dints3d.utils.errors.DintsError` where the
bundle's version ends the run.
"""

from __future__ import annotations

import os

from dints3d.bundle.template import template_module
from dints3d.utils.errors import DintsError

_checkpoints = template_module("dints_msd", "checkpoints")
_reliability = template_module("dints_msd", "reliability")
_memory = template_module("dints_msd", "memory")

CHECKPOINT_PATTERN = _checkpoints.CHECKPOINT_PATTERN
RESUME_MODES = _checkpoints.RESUME_MODES
SAFE_TO_CHANGE = _checkpoints.SAFE_TO_CHANGE
AtomicDiskSaver = _checkpoints.AtomicDiskSaver
AtomicCheckpointSaver = _checkpoints.AtomicCheckpointSaver
RunSettings = _checkpoints.RunSettings
ResumeCheck = _checkpoints.ResumeCheck
ResumeFromNewest = _checkpoints.ResumeFromNewest
checkpoint_epoch = _checkpoints.checkpoint_epoch
training_state_files = _checkpoints.training_state_files
newest_readable_checkpoint = _checkpoints.newest_readable_checkpoint
plain_value = _checkpoints.plain_value
DeterministicEpochs = _reliability.DeterministicEpochs
NonFiniteGuard = _reliability.NonFiniteGuard
epoch_seed = _reliability.epoch_seed
OutOfMemoryReport = _memory.OutOfMemoryReport
is_out_of_memory = _memory.is_out_of_memory
smaller_patch = _memory.smaller_patch


def refuse_existing_training(ckpt_dir: str | os.PathLike, how_to_continue: str) -> None:
    """:class:`DintsError` if ``ckpt_dir`` holds checkpoints or a ``model.pt`` that a new training would replace."""
    try:
        _checkpoints.refuse_existing_training(ckpt_dir, how_to_continue)
    except _checkpoints.BundleError as e:
        raise DintsError(e.where, e.problem) from None
