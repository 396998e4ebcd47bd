"""What every search space and every architecture provides, so the search loop, checkpointing, AMP, DDP, export
and logging serve DiNTS, Auto-DeepLab and DPC alike.

- :class:`Architecture`: a discrete, decoded network description. Round-trips through ``arch.json`` (plain,
  versioned JSON with the space's name and hyper-parameters) and builds an ``nn.Module``.
- :class:`SearchSpace`: a supernet with separate weight and architecture parameters, a forward pass, the
  regularizers of an input shape, and ``decode()`` → :class:`Architecture`.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dints3d.errors import DintsError
from dints3d.io import read_json, write_json

ARCH_FORMAT_VERSION = 1
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class Architecture(abc.ABC):
    """A discrete architecture of one search space."""

    space: ClassVar[str]
    provenance: dict

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """Plain JSON-able dict with ``space``, ``version``, hyper-parameters, codes and ``provenance``."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "Architecture":
        """Validate and parse :meth:`to_dict`'s output; raise :class:`DintsError` naming ``source`` on bad input."""

    @abc.abstractmethod
    def build(self, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        """The discrete network: ``BC[spatial]`` image → ``B out_channels [spatial]`` logits."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``arch.json`` atomically."""
        return write_json(path, self.to_dict())

    def figure(self, title: str | None = None):
        """A matplotlib figure of the architecture (``arch.png``), or None if the space draws none."""
        return None


class SearchSpace(nn.Module, abc.ABC):
    """A supernet whose architecture parameters are searched by gradient descent."""

    @abc.abstractmethod
    def weight_parameters(self) -> list[nn.Parameter]:
        """Parameters updated on the ``weights`` half (never the architecture's)."""

    @abc.abstractmethod
    def arch_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Architecture parameters by group (each group gets its own optimizer, e.g. ``{"alpha": …, "beta": …}``)."""

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.arch_parameter_groups().values() for p in group]

    @abc.abstractmethod
    def regularizers(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Named scalar losses on the architecture parameters for a ``BC[spatial]`` input shape (already weighted
        relative to each other as documented in ``docs/search.md``; the loop only ramps their sum)."""

    @abc.abstractmethod
    def decode(self) -> tuple[Architecture, dict]:
        """The current discrete architecture and scalar facts about the decoding (for logs)."""

    #: every side of an input patch must be a multiple of this
    patch_divisor: int = 1

    def log_scalars(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Space-specific scalars (or 1-D tensors, logged as histograms) for TensorBoard."""
        return {}

    def architecture_facts(self, arch: Architecture, input_shape: tuple[int, ...]) -> dict[str, float]:
        """Space-specific facts about a decoded architecture, recorded in its provenance."""
        return {}


#: space name → module defining its Architecture subclass (imported on first use)
SPACE_MODULES = {"dints": "dints3d.spaces.dints", "autodeeplab": "dints3d.spaces.autodeeplab",
                 "dpc": "dints3d.spaces.dpc"}


def architecture_class(space: str) -> type[Architecture]:
    """The Architecture subclass of ``space`` (its module imported on demand)."""
    import importlib

    importlib.import_module(SPACE_MODULES[space])
    return next(c for c in _all_subclasses(Architecture) if getattr(c, "space", None) == space)


def _all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


def architecture_from_dict(data: Any, source: str | None = None) -> Architecture:
    """Dispatch on ``data["space"]``."""
    if not isinstance(data, dict):
        raise DintsError(source, "an architecture must be a JSON object")
    space = data.get("space")
    if not isinstance(space, str) or space not in SPACE_MODULES:
        raise DintsError(source, f"unknown or missing 'space' {space!r}; expected one of {', '.join(SPACE_MODULES)}")
    version = data.get("version")
    if version != ARCH_FORMAT_VERSION:
        raise DintsError(source, f"unsupported arch format version {version!r} (this dints3d reads {ARCH_FORMAT_VERSION})")
    return architecture_class(space).from_dict(data, source)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_architecture(path_or_preset: str | os.PathLike) -> Architecture:
    """Read an ``arch.json`` file, or a packaged preset by name (e.g. ``dints-cvpr``)."""
    path = Path(path_or_preset)
    if not path.exists():
        preset = PRESET_DIR / f"{path_or_preset}.json"
        if preset.exists():
            path = preset
        else:
            presets = ", ".join(list_presets()) or "none"
            raise DintsError(path_or_preset, f"no such arch file or preset (presets: {presets})")
    return architecture_from_dict(read_json(path), os.fspath(path))
