"""Task formats, decided once: from the folder when a task is prepared (:func:`folder_format`), then from the
plan's ``format`` field (:func:`plan_format`) or an exported bundle's ``data_type`` (:func:`bundle_format`).

Every stage asks the task's :class:`TaskFormat` for what differs between formats (transforms, loss, validation
metric, plan fields, how a folder is prepared) instead of testing the format itself, as nnU-Net reads its plans once.
Two formats exist: ``msd`` (3D NIfTI, Medical Segmentation Decathlon layout; the default, also for plans that
predate the field) and ``cityscapes`` (2D PNG, :mod:`dints3d.cityscapes`).

The formats live where their code does: MSD in this layer, Cityscapes in its own package above the bundle layer.
So that lower layers never import upper ones, formats are registered by name (:data:`FORMATS`) and loaded on first
use, and a format names the functions of its upper stages (bundle export, inference, evaluation, synthetic folders)
as ``"module:function"`` (:attr:`TaskFormat.stages`), also loaded when the stage runs.
"""

from __future__ import annotations

import abc
import functools
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from monai.transforms import Compose
from torch import nn

from dints3d.utils.errors import DintsError

#: format name → ``"module:class"`` of its :class:`TaskFormat`
FORMATS = {"msd": "dints3d.data.msd_format:MsdFormat", "cityscapes": "dints3d.cityscapes.format:CityscapesFormat"}
#: the format of a plan without a ``format`` field
DEFAULT_FORMAT = "msd"


def load_object(name: str) -> Any:
    """``"package.module:attribute"`` → the attribute (the module imported on first use)."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


class TaskFormat(abc.ABC):
    """What differs between task formats. Stateless: one instance per format (:func:`format_named`)."""

    #: the plan's ``format`` value
    name: ClassVar[str]
    #: ``data_type`` in the ``metadata.json`` of the bundles this format exports
    bundle_data_type: ClassVar[str]
    #: plan fields a config's ``plan:`` section may set
    plan_fields: ClassVar[tuple[str, ...]]
    #: what this format's labelled cases are (``dints3d synth``'s report)
    labelled_cases: ClassVar[str]
    #: validation metric: its name and the index of the first class it scores (Dice skips the background)
    metric: ClassVar[tuple[str, int]]
    #: upper stages → ``"module:function"``: ``export`` (arch, arch_source, plan, work, out, cfg) → bundle folder;
    #: ``infer`` (bundle, inputs, out, sets, log, nproc) → InferResult; ``evaluate`` (argparse namespace of
    #: ``dints3d evaluate``) → exit status; ``synthesize`` (out, cases, test_cases, seed, **options) → folder
    stages: ClassVar[dict[str, str]]

    def stage(self, name: str) -> Callable:
        """The function implementing upper stage ``name`` for this format."""
        return load_object(self.stages[name])

    @abc.abstractmethod
    def recognizes(self, folder: str | os.PathLike) -> bool:
        """True if ``folder`` has this format's layout."""

    @abc.abstractmethod
    def prepare(self, task_dir: str | os.PathLike, work_dir: Path, folds: int, seed: int, cfg: Any,
                config_source: str | Mapping[str, str], progress: bool) -> dict[str, dict]:
        """Validate ``task_dir``, write ``fingerprint.json``, ``plan.json`` and ``datalist.json`` to ``work_dir``
        and return them. ``cfg`` (a :class:`~dints3d.config.Config`): its ``plan:`` section overrides plan fields
        (errors name ``config_source``), its space sets the patch divisor."""

    @abc.abstractmethod
    def summary(self, outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
        """A few human-readable lines about what ``prepare`` decided."""

    @abc.abstractmethod
    def apply_plan_overrides(self, plan: dict, overrides: Mapping[str, Any],
                             source: str | Mapping[str, str]) -> dict:
        """``plan`` with a config's ``plan:`` overrides checked and applied."""

    @abc.abstractmethod
    def train_transforms(self, plan: Mapping, patch_size: Sequence[int], num_samples: int = 1, augment: bool = True,
                         device: torch.device | None = None) -> Compose:
        """Training chain: ``num_samples`` dicts of ``image`` ``C×patch`` float32 and ``label`` ``1×patch``."""

    @abc.abstractmethod
    def validation_transforms(self, plan: Mapping, device: torch.device | None = None) -> Compose:
        """Whole preprocessed cases with labels: ``image`` C×spatial, ``label`` 1×spatial."""

    @abc.abstractmethod
    def inference_transforms(self, plan: Mapping) -> Compose:
        """Image only, with the metadata needed to map predictions back to the input's grid."""

    @abc.abstractmethod
    def loss(self, plan: Mapping) -> nn.Module:
        """The segmentation loss: logits ``B K [spatial]``, labels ``B 1 [spatial]`` → scalar."""

    @abc.abstractmethod
    def proxy_crop(self, plan: Mapping, patch: Sequence[int]) -> tuple[Compose, list[int]]:
        """A transform drawing one random crop of a preprocessed case for the DPC proxy task, and the crop size
        (one more axis than ``patch`` when 2-D crops are cut as slices from 3-D volumes)."""


@functools.cache
def format_named(name: str, source: str | None = None) -> TaskFormat:
    """The format called ``name``."""
    if name not in FORMATS:
        raise DintsError(source, f"unknown task format {name!r}; expected one of {', '.join(FORMATS)}")
    return load_object(FORMATS[name])()


def plan_format(plan: Mapping) -> TaskFormat:
    """The format of a prepared task (``plan.json``)."""
    return format_named(plan.get("format", DEFAULT_FORMAT), "plan.json")


def folder_format(folder: str | os.PathLike) -> TaskFormat:
    """The format whose layout ``folder`` has; MSD when none claims it (its reader then says what is missing)."""
    for name in FORMATS:
        fmt = format_named(name)
        if name != DEFAULT_FORMAT and fmt.recognizes(folder):
            return fmt
    return format_named(DEFAULT_FORMAT)


def bundle_format(bundle: str | os.PathLike) -> TaskFormat:
    """The format of an exported bundle, by ``configs/metadata.json``'s ``data_type`` (MSD if unreadable: the NIfTI
    path then reports what is wrong with the bundle)."""
    try:
        data_type = json.loads((Path(bundle) / "configs" / "metadata.json").read_text()).get("data_type")
    except (OSError, ValueError, AttributeError):
        data_type = None
    for name in FORMATS:
        if format_named(name).bundle_data_type == data_type:
            return format_named(name)
    return format_named(DEFAULT_FORMAT)
