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

from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_json

ARCH_FORMAT_VERSION = 1


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

    @property
    def patch_divisor(self) -> int | tuple[int, ...]:
        """Every side of an input patch must be a multiple of this (1: any size), or per axis a tuple."""
        return 1

    @property
    def patch_requirement(self) -> str:
        """What sets :attr:`patch_divisor`, for messages (``"this architecture (4 depths)"``)."""
        return "this architecture"

    #: the space's name as people write it (bundle names and descriptions)
    display_name: ClassVar[str] = ""

    def headline(self) -> str:
        """One phrase naming the network, e.g. ``DiNTS network (12 blocks × 4 resolutions, 20 active paths)``."""
        return f"{self.display_name or self.space} network"

    def summary(self, channel_mul: float = 1.0) -> dict[str, Any]:
        """Space-specific facts (JSON-able) for ``dints3d describe`` and bundle READMEs, for a network built with
        ``channel_mul``."""
        return {}

    def bundle_network(self, arch_ref: str = "@arch") -> dict[str, Any]:
        """The network as a MONAI bundle config item (MONAI classes only, so the bundle infers with MONAI alone),
        built from the bundle's ``@in_channels``, ``@out_channels``, ``@channel_mul`` and, where the space reads it,
        ``arch_ref`` (a reference to the parsed ``arch.json``)."""
        raise DintsError(self.space, "architectures of this space have no MONAI-only form; export them with a "
                         "task format whose bundle builds them with dints3d")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``arch.json`` atomically."""
        return write_json(path, self.to_dict())

    def figure(self, title: str | None = None):
        """A matplotlib figure of the architecture (``arch.png``), or None if the space draws none (or matplotlib is
        not installed)."""
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
    def decode(self, input_shape: tuple[int, ...] | None = None) -> tuple[Architecture, dict]:
        """The current discrete architecture and scalar facts about the decoding (for logs); ``input_shape``
        (``BC[spatial]``) where the decoding depends on sizes (a memory budget)."""

    #: every side of an input patch must be a multiple of this
    patch_divisor: int = 1

    def log_scalars(self, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Space-specific scalars (or 1-D tensors, logged as histograms) for TensorBoard."""
        return {}

    def architecture_facts(self, arch: Architecture, input_shape: tuple[int, ...]) -> dict[str, float]:
        """Space-specific facts about a decoded architecture, recorded in its provenance."""
        return {}


def check_document(data: Any, spaces: tuple[str, ...], source: str | None = None) -> str:
    """The ``space`` of an ``arch.json`` document after checking it is an object of a known format version whose
    space is one of ``spaces``."""
    if not isinstance(data, dict):
        raise DintsError(source, "an architecture must be a JSON object")
    space = data.get("space")
    if not isinstance(space, str) or space not in spaces:
        raise DintsError(source, f"unknown or missing 'space' {space!r}; expected one of {', '.join(spaces)}")
    version = data.get("version")
    if version != ARCH_FORMAT_VERSION:
        raise DintsError(source, f"unsupported arch format version {version!r} (this dints3d reads {ARCH_FORMAT_VERSION})")
    return space
