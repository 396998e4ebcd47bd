"""A decoded DiNTS network (Yu et al., CVPR 2021) in its ``arch.json`` form.

:class:`DintsArchitecture` holds the three codes of MONAI's DiNTS (``node_a``, ``arch_code_a``, ``arch_code_c``),
checks that they describe a connected topology, round-trips through JSON and builds MONAI's own
``TopologyInstance`` + ``DiNTS`` (so exported bundles need MONAI alone).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from monai.networks.nets import DiNTS, TopologyInstance
from torch import nn

from dints3d.spaces.base import ARCH_FORMAT_VERSION, Architecture
from dints3d.spaces.dints.figure import dints_figure
from dints3d.spaces.dints.operations import operation_names
from dints3d.spaces.dints.topology import DintsTopology, patch_divisor
from dints3d.utils.bundle_templates import template_module
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import matplotlib_available


@contextlib.contextmanager
def quiet_monai():
    """MONAI's topology constructors print a timestamped hint on every build; keep our output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def stem_stride_for_spacing(spacing: Sequence[float] | None) -> tuple[int, ...] | None:
    """The stems' stride per axis for voxels of ``spacing`` (mm): 2 where the axis is at most twice as coarse as the
    finest (nnU-Net's rule for pooling an axis), else 1; ``None`` when that is 2 everywhere (MONAI's stems)."""
    if not spacing:
        return None
    finest = min(float(s) for s in spacing)
    stride = tuple(2 if float(s) <= 2 * finest else 1 for s in spacing)
    return None if set(stride) == {2} else stride


def network_options(use_downsample: bool, stem_skip: bool,
                    stem_stride: Sequence[int] | None = None) -> dict[str, Any]:
    """The fixed-part options a DiNTS network with this stem really gets (``DintsArchitecture``'s fields):
    ``stem_skip`` only with the stride-2 stem (``use_downsample``; without it the cells already run at full
    resolution), ``stem_stride`` only with ``stem_skip`` (:class:`DiNTSStemSkip` builds it; MONAI's stems halve every
    axis)."""
    skip = bool(stem_skip and use_downsample)
    return {"stem_skip": skip, "stem_stride": tuple(int(s) for s in stem_stride) if skip and stem_stride else None}


def stem_skip_network() -> type[DiNTS]:
    """:class:`DiNTSStemSkip`: MONAI's DiNTS plus the full-resolution skip, from the MSD bundle template's
    ``scripts/networks.py`` (the file every exported bundle carries, so that it builds with MONAI alone)."""
    return template_module("dints_msd", "networks").DiNTSStemSkip


@dataclass
class DintsArchitecture(Architecture):
    """A decoded DiNTS network.

    Attributes:
        node_a: (L+1) × D 0/1, active feature nodes (row 0: the multi-resolution inputs).
        arch_code_a: L × P 0/1, active paths.
        arch_code_c: L × P, operation index per path (see :func:`operation_names`).
    """

    space: ClassVar[str] = "dints"

    node_a: np.ndarray
    arch_code_a: np.ndarray
    arch_code_c: np.ndarray
    spatial_dims: int = 3
    use_downsample: bool = True
    channel_mul_search: float = 0.5
    #: the stride-2 stem's full-resolution features added to the output (:class:`DiNTSStemSkip`); false: the paper's
    stem_skip: bool = False
    #: the stems' stride per axis (1 or 2) for anisotropic voxels; None: 2 on every axis (needs stem_skip)
    stem_stride: tuple[int, ...] | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return int(self.arch_code_a.shape[0])

    @property
    def num_depths(self) -> int:
        return int(self.node_a.shape[1])

    @property
    def num_active_paths(self) -> int:
        return int(self.arch_code_a.sum())

    def unused_depths(self) -> list[int]:
        """The depths (0: the finest searched resolution) that no layer reads or writes: a tight budget may drop
        them all but the coarsest."""
        return [d for d in range(self.num_depths) if not self.node_a[:, d].any()]

    def to_dict(self) -> dict:
        return {
            "space": self.space,
            "version": ARCH_FORMAT_VERSION,
            "num_blocks": self.num_blocks,
            "num_depths": self.num_depths,
            "spatial_dims": self.spatial_dims,
            "use_downsample": self.use_downsample,
            "stem_skip": self.stem_skip,
            "stem_stride": list(self.stem_stride) if self.stem_stride else None,
            "channel_mul_search": self.channel_mul_search,
            "operations": list(operation_names(self.spatial_dims)),
            "node_a": self.node_a.astype(int).tolist(),
            "arch_code_a": self.arch_code_a.astype(int).tolist(),
            "arch_code_c": self.arch_code_c.astype(int).tolist(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> "DintsArchitecture":
        def need(key: str) -> Any:
            if key not in data:
                raise DintsError(source, f"missing key '{key}' in DiNTS architecture")
            return data[key]

        def matrix(key: str) -> np.ndarray:
            value = need(key)
            try:
                arr = np.asarray(value, dtype=float)
            except (TypeError, ValueError):
                raise DintsError(source, f"'{key}' must be a matrix of numbers") from None
            if arr.ndim != 2 or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise DintsError(source, f"'{key}' must be a 2-D matrix of integers")
            return arr.astype(np.int64)

        spatial_dims = need("spatial_dims")
        if spatial_dims not in (2, 3):
            raise DintsError(source, f"'spatial_dims' must be 2 or 3, got {spatial_dims!r}")
        use_downsample = data.get("use_downsample", True)
        if not isinstance(use_downsample, bool):
            raise DintsError(source, "'use_downsample' must be true or false")
        stem_skip = data.get("stem_skip", False)
        if not isinstance(stem_skip, bool):
            raise DintsError(source, "'stem_skip' must be true or false")
        if stem_skip and not use_downsample:
            raise DintsError(source, "'stem_skip' needs 'use_downsample': true (without the stride-2 stem the cells "
                             "already run at full resolution)")
        stem_stride = data.get("stem_stride")
        if stem_stride is not None:
            if (not isinstance(stem_stride, list) or len(stem_stride) != spatial_dims
                    or any(s not in (1, 2) or isinstance(s, bool) for s in stem_stride)):
                raise DintsError(source, f"'stem_stride' must be null or {spatial_dims} values of 1 or 2, got "
                                 f"{stem_stride!r}")
            if not stem_skip:
                raise DintsError(source, "'stem_stride' needs 'stem_skip': true (MONAI's DiNTS stems halve every axis)")
        channel_mul = data.get("channel_mul_search", 0.5)
        if not isinstance(channel_mul, (int, float)) or isinstance(channel_mul, bool) or channel_mul <= 0:
            raise DintsError(source, "'channel_mul_search' must be a positive number")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise DintsError(source, "'provenance' must be an object")
        arch = cls(
            node_a=matrix("node_a"),
            arch_code_a=matrix("arch_code_a"),
            arch_code_c=matrix("arch_code_c"),
            spatial_dims=int(spatial_dims),
            use_downsample=use_downsample,
            stem_skip=stem_skip,
            stem_stride=tuple(stem_stride) if stem_stride else None,
            channel_mul_search=float(channel_mul),
            provenance=provenance,
        )
        for key in ("num_blocks", "num_depths"):
            if key in data and data[key] != getattr(arch, key):
                raise DintsError(source, f"'{key}' is {data[key]!r} but the codes say {getattr(arch, key)}")
        arch.check(source)
        return arch

    def check(self, source: str | None = None) -> None:
        """Shapes, value ranges, and a connected topology (each layer reads exactly the previous layer's outputs)."""
        L, D = self.num_blocks, self.num_depths
        if L < 1 or D < 1:
            raise DintsError(source, "an architecture needs at least one block and one depth")
        topo = DintsTopology(D)
        P = topo.num_paths
        if self.node_a.shape != (L + 1, D):
            raise DintsError(source, f"'node_a' must be {L + 1}×{D}, got {'×'.join(map(str, self.node_a.shape))}")
        for key in ("arch_code_a", "arch_code_c"):
            if getattr(self, key).shape != (L, P):
                shape = "×".join(map(str, getattr(self, key).shape))
                raise DintsError(source, f"'{key}' must be {L}×{P} for {D} depths, got {shape}")
        if not np.isin(self.node_a, (0, 1)).all() or not np.isin(self.arch_code_a, (0, 1)).all():
            raise DintsError(source, "'node_a' and 'arch_code_a' must contain only 0 and 1")
        num_ops = len(operation_names(self.spatial_dims))
        if self.arch_code_c.min() < 0 or self.arch_code_c.max() >= num_ops:
            raise DintsError(source, f"'arch_code_c' values must be operation indices 0..{num_ops - 1}")
        path_in, path_out = topo.path_in.numpy(), topo.path_out.numpy()
        for layer in range(L):
            active = self.arch_code_a[layer] > 0
            if not active.any():
                raise DintsError(source, f"layer {layer} has no active path")
            used_in = np.zeros(D, dtype=np.int64)
            used_in[path_in[active]] = 1
            made_out = np.zeros(D, dtype=np.int64)
            made_out[path_out[active]] = 1
            if not np.array_equal(used_in, self.node_a[layer]):
                raise DintsError(source, f"layer {layer} reads nodes {used_in.tolist()} but node_a[{layer}] is "
                                 f"{self.node_a[layer].tolist()} (disconnected topology)")
            if not np.array_equal(made_out, self.node_a[layer + 1]):
                raise DintsError(source, f"layer {layer} writes nodes {made_out.tolist()} but node_a[{layer + 1}] is "
                                 f"{self.node_a[layer + 1].tolist()}")

    display_name: ClassVar[str] = "DiNTS"

    @property
    def patch_divisor(self) -> int:
        return patch_divisor(self.num_depths, self.use_downsample)

    @property
    def patch_requirement(self) -> str:
        return f"this architecture ({self.num_depths} depths)"

    def headline(self) -> str:
        skip = ", full-resolution skip" if self.stem_skip else ""
        skip += f", stems strided {'×'.join(map(str, self.stem_stride))}" if self.stem_stride else ""
        return (f"DiNTS network ({self.num_blocks} blocks × {self.num_depths} resolutions, {self.num_active_paths} "
                f"active paths{skip})")

    def summary(self, channel_mul: float = 1.0) -> dict[str, Any]:
        """Grid, search width, and the active paths with how many use each operation."""
        active = self.arch_code_a > 0
        names = operation_names(self.spatial_dims)
        return {"num_blocks": self.num_blocks, "num_depths": self.num_depths, "spatial_dims": self.spatial_dims,
                "channel_mul_search": self.channel_mul_search, "active_paths": int(active.sum()),
                "total_paths": int(active.size),
                "operations": {name: int((self.arch_code_c[active] == i).sum()) for i, name in enumerate(names)}}

    def figure(self, title: str | None = None):
        return dints_figure(self, title) if matplotlib_available() else None

    def bundle_network(self, arch_ref: str = "@arch") -> dict[str, Any]:
        """MONAI's ``TopologyInstance`` + ``DiNTS`` from the bundle's ``models/arch.json`` (``arch_ref``)."""
        a = "$" + arch_ref
        return {
            "_target_": "scripts.networks.DiNTSStemSkip" if self.stem_skip else "DiNTS",
            "dints_space": {
                "_target_": "TopologyInstance", "channel_mul": "@channel_mul", "num_blocks": f"{a}['num_blocks']",
                "num_depths": f"{a}['num_depths']", "spatial_dims": f"{a}['spatial_dims']",
                "use_downsample": f"{a}['use_downsample']",
                "arch_code": f"$[np.array({arch_ref}['arch_code_a'], dtype='float64'), "
                             f"np.array({arch_ref}['arch_code_c'], dtype='int64')]",
            },
            "in_channels": "@in_channels", "num_classes": "@out_channels", "spatial_dims": f"{a}['spatial_dims']",
            "use_downsample": f"{a}['use_downsample']", "node_a": f"$torch.tensor({arch_ref}['node_a'])",
            **({"stem_stride": f"{a}['stem_stride']"} if self.stem_stride else {}),
        }

    def build(self, in_channels: int, out_channels: int, channel_mul: float = 1.0, **kwargs: Any) -> nn.Module:
        """MONAI ``DiNTS(TopologyInstance(...))`` for this architecture: BC[spatial] → B·out_channels·[spatial]."""
        with quiet_monai():
            space = TopologyInstance(
                arch_code=[self.arch_code_a.astype(np.float64), self.arch_code_c.astype(np.int64)],
                channel_mul=channel_mul,
                num_blocks=self.num_blocks,
                num_depths=self.num_depths,
                spatial_dims=self.spatial_dims,
                use_downsample=self.use_downsample,
            )
        network = stem_skip_network() if self.stem_skip else DiNTS
        if self.stem_stride:
            kwargs = {"stem_stride": self.stem_stride, **kwargs}
        return network(
            dints_space=space,
            in_channels=in_channels,
            num_classes=out_channels,
            spatial_dims=self.spatial_dims,
            use_downsample=self.use_downsample,
            node_a=torch.as_tensor(self.node_a),
            **kwargs,
        )


def random_dints_architecture(num_blocks: int, num_depths: int, rng: np.random.Generator,
                              spatial_dims: int = 3, keep: float = 0.5) -> DintsArchitecture:
    """A random connected DiNTS architecture: each layer reads exactly the nodes the previous layer wrote.

    Every active node gets at least one outgoing path (its others are kept with probability ``keep``); ops are
    uniform."""
    topo = DintsTopology(num_depths)
    path_in, path_out = topo.path_in.numpy(), topo.path_out.numpy()
    num_ops = len(operation_names(spatial_dims))
    node_a = np.zeros((num_blocks + 1, num_depths), dtype=np.int64)
    code_a = np.zeros((num_blocks, topo.num_paths), dtype=np.int64)
    node_a[0] = rng.integers(0, 2, num_depths)
    node_a[0, rng.integers(num_depths)] = 1
    for layer in range(num_blocks):
        for node in np.flatnonzero(node_a[layer]):
            paths = np.flatnonzero(path_in == node)
            chosen = rng.random(len(paths)) < keep
            chosen[rng.integers(len(paths))] = True
            code_a[layer, paths[chosen]] = 1
        node_a[layer + 1, path_out[code_a[layer] > 0]] = 1
    code_c = rng.integers(0, num_ops, code_a.shape) * code_a
    return DintsArchitecture(node_a=node_a, arch_code_a=code_a, arch_code_c=code_c, spatial_dims=spatial_dims,
                             provenance={"sampler": "random_dints_architecture"})
