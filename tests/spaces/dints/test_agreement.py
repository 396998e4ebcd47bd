"""Agreement of decoded DiNTS architectures: checked path by path against a plain loop over the grid."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from dints3d.spaces.dints.agreement import agreement, pair_agreement
from dints3d.spaces.dints.architecture import random_dints_architecture
from dints3d.utils.errors import DintsError


def counted(a, b) -> tuple[float, float, float | None]:
    """Jaccard of kept paths, fraction of equal path decisions, fraction of shared paths with one operation."""
    both = either = equal = same_op = 0
    for layer, path in itertools.product(range(a.arch_code_a.shape[0]), range(a.arch_code_a.shape[1])):
        ka, kb = bool(a.arch_code_a[layer, path]), bool(b.arch_code_a[layer, path])
        both += ka and kb
        either += ka or kb
        equal += ka == kb
        same_op += ka and kb and a.arch_code_c[layer, path] == b.arch_code_c[layer, path]
    return both / either, equal / a.arch_code_a.size, (same_op / both if both else None)


@pytest.mark.parametrize("seed", range(6))
def test_pair_agreement_counts_paths_and_operations(seed):
    rng = np.random.default_rng(seed)
    a, b = (random_dints_architecture(4, 3, rng) for _ in range(2))
    result = pair_agreement(a, b)
    jaccard, equal, ops = counted(a, b)
    assert result["paths_jaccard"] == pytest.approx(jaccard)
    assert result["paths_equal"] == pytest.approx(equal)
    assert result["operations"] == (pytest.approx(ops) if ops is not None else None)
    assert len(result["per_layer"]) == 4 and all(0.0 <= v <= 1.0 for v in result["per_layer"])


def test_identical_architectures_agree_fully_and_other_operations_lower_it():
    arch = random_dints_architecture(4, 3, np.random.default_rng(7))
    same = agreement([arch, arch, arch])
    assert same["pairs"] == 3 and same["identical"] == 3
    assert same["paths_jaccard"] == same["paths_equal"] == same["operations"] == 1.0
    assert same["per_layer"] == [1.0] * 4
    kept = np.argwhere(arch.arch_code_a > 0)
    codes = arch.arch_code_c.copy()
    layer, path = kept[0]
    codes[layer, path] = (codes[layer, path] + 1) % 5
    other = dataclasses.replace(arch, arch_code_c=codes)
    changed = agreement([arch, other])
    assert changed["identical"] == 0 and changed["paths_equal"] == 1.0
    assert changed["operations"] == pytest.approx(1 - 1 / len(kept))


def test_refuses_other_grids_and_single_architectures():
    rng = np.random.default_rng(0)
    with pytest.raises(DintsError, match="grids differ"):
        pair_agreement(random_dints_architecture(4, 3, rng), random_dints_architecture(3, 3, rng))
    with pytest.raises(DintsError, match="at least two"):
        agreement([random_dints_architecture(4, 3, rng)])
