"""A CUDA out-of-memory error during this bundle's training or validation as one line with advice
(:class:`OutOfMemoryReport`), with MONAI, ignite and torch only (dints3d, if installed, adds a memory prediction)."""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator

from .errors import BundleError, stop


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
    """Turn a CUDA out-of-memory error of the trainer or the evaluator into one line (``SystemExit``): the device's
    memory and the settings to change; where dints3d is installed, also the predicted memory of a training step with
    these settings (:func:`dints3d.cost.memory.predict_training_memory`), which sizes the advice. Any other exception
    is re-raised unchanged.

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
        raise stop(BundleError(str(self.device), self.message(isinstance(engine, Evaluator))))

    def _capacity(self) -> int | None:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def _prediction(self) -> tuple[dict[str, int], int] | None:
        """Predicted bytes of a training step (on CUDA) and the step by which a patch side may shrink (the
        architecture's patch divisor, or 32 for one that takes any size); ``None`` if unknown."""
        try:
            # dints3d's memory model, when dints3d is installed (the bundle trains without it)
            memory = importlib.import_module("dints3d.cost.memory")
            arch = importlib.import_module("dints3d.spaces.factory").load_architecture(self.arch_file)
            model = memory.meta_network(arch, self.in_channels, self.out_channels, **self.build_options)
            predicted = memory.predict_training_memory(model, (self.in_channels, *self.patch), batch=self.batch,
                                                       amp=self.amp, device="cuda")
            step = max(importlib.import_module("dints3d.data.patch").per_axis(arch.patch_divisor, arch.spatial_dims))
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
