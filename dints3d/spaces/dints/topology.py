"""Index tables of the DiNTS search space, built once per ``num_depths`` (no nn modules).

Shapes use D = ``num_depths`` resolutions (nodes per layer), P = 3D − 2 paths per layer,
N = 2^P − 1 non-empty path patterns and S = 2^D − 1 non-empty node sets.

Path j of a layer reads node ``path_in[j]`` and writes node ``path_out[j]``; the tables and all orderings
agree with MONAI's ``TopologySearch`` (``arch_code2in``/``arch_code2out``/``arch_code2ops``, ``child_list``,
``node_act_list``), so pattern and node-set indices can be exchanged with it. Both orderings read a 0/1 vector as
a binary number with element 0 as the most significant bit: index = number − 1.
"""

from __future__ import annotations

import numpy as np
import torch

from dints3d.utils.errors import DintsError

# The pattern table has 2^(3D-2) rows; D = 6 is already 65535 patterns per layer.
MAX_DEPTHS = 6


def _bits(count: int, width: int) -> np.ndarray:
    """(count, width) 0/1 rows of the numbers 1..count, most significant bit first."""
    numbers = np.arange(1, count + 1, dtype=np.int64)[:, None]
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)[None, :]
    return (numbers >> shifts) & 1


class DintsTopology:
    """Paths, path patterns and node sets of a DiNTS layer, as tensors on one device.

    Attributes:
        num_depths, num_paths, num_patterns, num_node_sets: D, P, N, S.
        path_in, path_out: (P,) long, input / output node of each path.
        path_op: (P,) long, −1 downsample, 0 same resolution, +1 upsample.
        patterns: (N, P) float32 0/1, all non-empty path patterns in MONAI ``child_list`` order.
        node_sets: (S, D) long 0/1, all non-empty node sets in MONAI ``node_act_list`` order.
        pattern_in_set, pattern_out_set: (N,) long, index into ``node_sets`` of the nodes a pattern reads / writes.
        pattern_in_onehot, pattern_out_onehot: (N, S) float32 one-hot of the two above, for per-set sums by matmul.
    """

    def __init__(self, num_depths: int, device: torch.device | str | None = None):
        if not 1 <= int(num_depths) <= MAX_DEPTHS:
            raise DintsError(
                "num_depths",
                f"must be between 1 and {MAX_DEPTHS} (got {num_depths}); a layer has 2^(3*num_depths-2) - 1 "
                "path patterns and all of them are enumerated",
            )
        depth = int(num_depths)
        paths = 3 * depth - 2
        j = np.arange(paths)
        # Paths come in (down-from-finer, same, up-from-coarser) triples per output node, minus the two that
        # would leave the grid at the top and bottom.
        path_out = (j + 1) // 3
        path_op = (j + 1) % 3 - 1
        path_in = path_out + path_op

        patterns = _bits(2**paths - 1, paths)
        in_nodes = (patterns @ np.eye(depth, dtype=np.int64)[path_in]) > 0
        out_nodes = (patterns @ np.eye(depth, dtype=np.int64)[path_out]) > 0
        in_set = binary_index(in_nodes)
        out_set = binary_index(out_nodes)
        num_sets = 2**depth - 1

        self.num_depths = depth
        self.num_paths = paths
        self.num_patterns = 2**paths - 1
        self.num_node_sets = num_sets
        self.device = torch.device("cpu") if device is None else torch.device(device)
        as_long = dict(dtype=torch.long, device=self.device)
        self.path_in = torch.as_tensor(path_in, **as_long)
        self.path_out = torch.as_tensor(path_out, **as_long)
        self.path_op = torch.as_tensor(path_op, **as_long)
        self.patterns = torch.as_tensor(patterns, dtype=torch.float32, device=self.device)
        self.node_sets = torch.as_tensor(_bits(num_sets, depth), **as_long)
        self.pattern_in_set = torch.as_tensor(in_set, **as_long)
        self.pattern_out_set = torch.as_tensor(out_set, **as_long)
        eye = torch.eye(num_sets, dtype=torch.float32, device=self.device)
        self.pattern_in_onehot = eye[self.pattern_in_set]
        self.pattern_out_onehot = eye[self.pattern_out_set]

    def to(self, device: torch.device | str) -> DintsTopology:
        """The same tables on ``device`` (a new object; this one is unchanged)."""
        return DintsTopology(self.num_depths, device=device)

    def node_set_index(self, node_vector) -> torch.Tensor:
        """Index into ``node_sets`` of 0/1 node vectors.

        Args:
            node_vector: (..., D) 0/1 (tensor or array-like); must not be all zero.
        Returns:
            (...) long tensor on this topology's device.
        """
        return self._index(node_vector, self.num_depths)

    def pattern_index(self, arch_code) -> torch.Tensor:
        """Index into ``patterns`` of 0/1 path patterns (rows of an ``arch_code_a``).

        Args:
            arch_code: (..., P) 0/1 (tensor or array-like); must not be all zero.
        Returns:
            (...) long tensor on this topology's device.
        """
        return self._index(arch_code, self.num_paths)

    def _index(self, vectors, width: int) -> torch.Tensor:
        vectors = torch.as_tensor(vectors)
        if vectors.shape[-1] != width:
            raise ValueError(f"expected last dimension {width}, got shape {tuple(vectors.shape)}")
        return binary_index(vectors).to(self.device)


def binary_index(vectors):
    """Row index of 0/1 vectors in MONAI's enumeration order (element 0 most significant; all-zero row → −1).

    Args:
        vectors: (..., W) 0/1 tensor or numpy array.
    Returns:
        (...) int64, of the same kind (tensor on the same device, or numpy array).
    """
    width = vectors.shape[-1]
    if torch.is_tensor(vectors):
        weights = 2 ** torch.arange(width - 1, -1, -1, device=vectors.device)
        return ((vectors != 0).long() * weights).sum(-1) - 1
    weights = 2 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((np.asarray(vectors) != 0).astype(np.int64) * weights).sum(-1) - 1


def patch_divisor(num_depths: int, use_downsample: bool) -> int:
    """Every side of an input patch must be a multiple of this (MONAI only warns; we refuse)."""
    return 2 ** (num_depths + int(use_downsample))
