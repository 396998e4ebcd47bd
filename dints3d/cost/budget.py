"""A memory budget in gigabytes instead of the abstract ratio σ.

DiNTS's memory loss pulls the decoded architecture's memory ratio r = M/M_full (MONAI's activation-size units)
towards σ. What a user knows is their GPU: "training must fit in B GB". Across DiNTS architectures the predicted
peak training memory (``dints3d.cost.memory``, bytes, at the *training* width, batch, patch and precision) is close to
affine in r, so we sample connected architectures, fit ``bytes ≈ a + b·r`` by least squares, and search with
σ = (B − a) / b. A tighter budget therefore always means a smaller σ and a cheaper target.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dints3d.cost.memory import predict_training_memory
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    random_dints_architecture,
)
from dints3d.utils.errors import DintsError

GB = 1024**3


def sigma_for_budget(
    budget_gb: float,
    space,
    in_channels: int,
    num_classes: int,
    patch: Sequence[int],
    batch: int,
    amp: bool,
    train_channel_mul: float,
    device: str = "cpu",
    samples: int = 6,
    seed: int = 0,
) -> dict:
    """σ whose decoded architectures are predicted to train within ``budget_gb``.

    Args:
        space: the :class:`~dints3d.spaces.dints.architecture.DintsSearchSpace` being searched (for the memory ratio).
        patch, batch, amp, train_channel_mul: the retraining settings the budget is for.
        device: ``"cpu"`` or ``"cuda"`` (the memory model differs slightly).
    Returns:
        ``{"sigma", "budget_gb", "intercept_gb", "slope_gb", "samples": [[ratio, predicted_gb], …]}``.
    """
    if budget_gb <= 0:
        raise DintsError("search.memory_budget_gb", f"must be positive, got {budget_gb}")
    hp = space.hparams
    rng = np.random.default_rng(seed)
    archs = [random_dints_architecture(hp["num_blocks"], hp["num_depths"], rng, hp["spatial_dims"])
             for _ in range(samples)]
    full_a = np.ones((hp["num_blocks"], space.topology.num_paths), dtype=np.int64)
    archs.append(DintsArchitecture(node_a=np.ones((hp["num_blocks"] + 1, hp["num_depths"]), dtype=np.int64),
                                   arch_code_a=full_a, arch_code_c=full_a, spatial_dims=hp["spatial_dims"]))
    shape = (batch, in_channels, *patch)
    points = []
    for arch in archs:
        arch.use_downsample, arch.stem_skip, arch.stem_stride = hp["use_downsample"], hp["stem_skip"], hp["stem_stride"]
        ratio = space.discrete_memory_ratio(arch, shape)
        peak = predict_training_memory(lambda a=arch: a.build(in_channels, num_classes, channel_mul=train_channel_mul),
                                       (in_channels, *patch), batch=batch, amp=amp, device=device)["peak"]
        points.append((ratio, peak / GB))
    ratios, gbs = np.array(points).T
    slope, intercept = np.polyfit(ratios, gbs, 1)
    if slope <= 0:
        raise DintsError("search.memory_budget_gb", "predicted memory does not grow with the architecture; "
                         "set search.ram_cost_factor instead")
    sigma = (budget_gb - intercept) / slope
    smallest = float(intercept + slope * ratios.min())
    if sigma < 0.5 * ratios.min():
        raise DintsError("search.memory_budget_gb", f"{budget_gb:g} GB is too small: even sparse architectures "
                         f"are predicted to need about {smallest:.2f} GB at patch {list(patch)}, batch {batch}, "
                         f"amp={amp} (lower the patch size or batch, or enable amp)")
    return {"sigma": float(min(sigma, 1.0)), "budget_gb": budget_gb, "intercept_gb": float(intercept),
            "slope_gb": float(slope), "samples": [[float(r), float(g)] for r, g in points]}
