"""Test-time mirroring for this bundle's inference, with torch alone (inference needs MONAI, not dints3d)."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn


class MirroredSoftmax(nn.Module):
    """Class probabilities averaged over mirrored copies of the input: ``B C [spatial]`` → ``B K [spatial]``.

    For every subset of ``mirror_axes`` (spatial axes, 0-based; all 2^n subsets, as nnU-Net mirrors), the input is
    flipped along the subset's axes, ``network`` segments it, the softmax is flipped back; the mean over the subsets
    is returned. ``mirror_axes=()`` gives ``softmax(network(x))``. The wrapped network's parameters keep their own
    names under ``network.``; checkpoints load into ``network`` itself.
    """

    def __init__(self, network: nn.Module, mirror_axes: Sequence[int] = ()):
        super().__init__()
        self.network = network
        axes = [int(a) + 2 for a in mirror_axes]
        self.flips = [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.flips:
            logits = self.network(x.flip(dims) if dims else x)
            probabilities = torch.softmax(logits.float(), dim=1)
            probabilities = probabilities.flip(dims) if dims else probabilities
            total = probabilities if total is None else total + probabilities
        return total / len(self.flips)
