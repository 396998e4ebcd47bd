"""How much decoded DiNTS architectures agree (searches from different seeds, folds or settings).

Two topologies of the same grid (L layers × P paths) agree on a path when both keep it or both drop it; they agree
on an operation where both keep the path and chose the same operation on it. The summaries are means over the
pairs of architectures, so 1.0 means every search decoded the same network.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence

import numpy as np

from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.utils.errors import DintsError


def pair_agreement(a: DintsArchitecture, b: DintsArchitecture) -> dict:
    """Agreement of two architectures of the same grid.

    Returns ``paths_jaccard`` (|kept by both| / |kept by either|), ``paths_equal`` (fraction of the L × P paths both
    keep or both drop), ``operations`` (fraction of the paths kept by both that use the same operation; None when
    they share no path) and ``per_layer``: for each layer, the Jaccard index of its kept paths.
    """
    if a.arch_code_a.shape != b.arch_code_a.shape:
        raise DintsError("architectures", f"grids differ: {a.arch_code_a.shape} vs {b.arch_code_a.shape} (layers × "
                         "paths); agreement compares searches of one space")
    kept_a, kept_b = np.asarray(a.arch_code_a) > 0, np.asarray(b.arch_code_a) > 0
    both, either = kept_a & kept_b, kept_a | kept_b
    same_op = (np.asarray(a.arch_code_c) == np.asarray(b.arch_code_c)) & both
    per_layer = [float(both[i].sum() / either[i].sum()) if either[i].any() else 1.0 for i in range(both.shape[0])]
    return {
        "paths_jaccard": float(both.sum() / either.sum()) if either.any() else 1.0,
        "paths_equal": float((kept_a == kept_b).mean()),
        "operations": float(same_op.sum() / both.sum()) if both.any() else None,
        "per_layer": per_layer,
    }


def agreement(archs: Sequence[DintsArchitecture]) -> dict:
    """Mean :func:`pair_agreement` over every pair of ``archs`` (at least two), plus ``pairs`` and ``identical``
    (how many pairs decoded the very same network)."""
    if len(archs) < 2:
        raise DintsError("architectures", f"agreement needs at least two architectures, got {len(archs)}")
    pairs = [pair_agreement(a, b) for a, b in itertools.combinations(archs, 2)]

    def mean(key: str) -> float | None:
        values = [p[key] for p in pairs if p[key] is not None]
        return statistics.mean(values) if values else None

    layers = len(pairs[0]["per_layer"])
    identical = sum(p["paths_equal"] == 1.0 and p["operations"] in (1.0, None) for p in pairs)
    return {"pairs": len(pairs), "identical": identical, "paths_jaccard": mean("paths_jaccard"),
            "paths_equal": mean("paths_equal"), "operations": mean("operations"),
            "per_layer": [statistics.mean(p["per_layer"][i] for p in pairs) for i in range(layers)]}
