"""What fits a GPU: the settings of a search and of retraining each candidate network that keep the predicted peak
memory of one step under a fraction of the card, from the memory model (CUDA rule) and the task's plan. Nothing is
allocated: every prediction runs on the ``meta`` device.

The rules (``docs/gpu.md``), per candidate:

1. **Budget**: ``safety × card`` bytes (:data:`SAFETY`, 90 %: the CUDA context, cuDNN workspaces and the caching
   allocator's fragmentation are not in the model).
2. **Patch**: the plan's patch with each side rounded down to the network's divisor (per axis), then smaller
   patches by :func:`patch_ladder` (the longest side one divisor step shorter at a time): the first patch on which the
   most memory-saving setting fits at batch 1 wins (a patch the network cannot take, e.g. one that leaves its
   instance norms a single voxel, does not fit).
3. **Batch**: on that patch, the largest batch up to the cap (the config's ``data.batch_size`` for the search,
   ``train.batch_size`` for retraining, or ``--max-batch``) at which the most memory-saving setting fits (bisection:
   the peak grows with the batch).
4. **Memory savings**: on that patch and batch, the first of the candidate's :func:`modes` that fits: AMP as
   configured (if the config turns it off, fp32 first, then AMP), then for the search ``checkpoint_cells`` with
   ``checkpoint_fraction`` 0.5, then 1.0. Retraining a bundle has no activation checkpointing.

A larger card never yields a smaller patch, a smaller batch at the same patch, or more savings at the same patch and
batch (the first fitting setting in a fixed order, with more settings fitting). Cache rate (:func:`cache_plan`): the
preprocessed cases (:func:`~dints3d.utils.preflight.estimate_cache_bytes`) against :data:`CACHE_RAM_FRACTION` of the
host's RAM; a search whose whole cache also fits beside its step on the card caches on the GPU (``data.gpu_cache``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from dints3d.config import Config
from dints3d.cost.memory import (
    meta_network,
    predict_search_step_memory,
    predict_training_memory,
)
from dints3d.data.patch import Divisor, per_axis
from dints3d.spaces.dints.topology import patch_divisor
from dints3d.spaces.factory import dints_stem_stride, load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.preflight import estimate_cache_bytes

GiB = 2**30
#: fraction of the card the predicted peak may use
SAFETY = 0.9
#: fraction of the host's RAM the preprocessed-case cache may use (the rest: the OS, workers, the run itself)
CACHE_RAM_FRACTION = 0.5
#: ``checkpoint_fraction`` values the search tries, least memory saving first
CHECKPOINT_FRACTIONS = (0.5, 1.0)
#: GPU sizes of ``dints3d fit --table`` (GB)
TABLE_SIZES = (16, 24, 40, 80)
#: the networks retrained besides a searched one: the DiNTS preset and the two planned MONAI baselines
RETRAINED = ("dints-cvpr", "segresnet", "dynunet")


@dataclass(frozen=True)
class Mode:
    """Memory savings of one step: mixed precision, and the fraction of supernet blocks checkpointed (0: none)."""

    amp: bool
    checkpoint_fraction: float = 0.0


#: ``predict(patch, batch, mode)`` → predicted peak bytes of one step
Predictor = Callable[[tuple[int, ...], int, Mode], int]


@dataclass
class Candidate:
    """One thing to fit: the search (``stage="search"``) or the retraining of one network (``stage="train"``)."""

    name: str
    stage: str
    description: str
    start_patch: list[int]  #: the plan's patch rounded down to the divisor
    divisor: list[int]  #: per axis
    max_batch: int
    modes: tuple[Mode, ...]  #: least memory saving first
    predict: Predictor


@dataclass
class Choice:
    """The settings chosen for a candidate on one card (``patch`` ``None``: nothing fits)."""

    candidate: str
    stage: str
    budget: int  #: bytes the peak may use
    patch: list[int] | None = None
    batch: int = 0
    amp: bool = False
    checkpoint_fraction: float = 0.0
    peak: int = 0  #: predicted bytes

    @property
    def fits(self) -> bool:
        return self.patch is not None


@dataclass
class CachePlan:
    """Where the preprocessed cases live: host RAM (``cache_rate`` of them) and, for a search, possibly the GPU."""

    cases: int
    bytes: int  #: all cases, preprocessed
    ram: int  #: host RAM (bytes)
    cache_rate: float
    gpu_cache: dict[str, bool] = field(default_factory=dict)  #: candidate → whether its cache goes on the GPU


def start_patch(plan_patch: Sequence[int], divisor: Divisor) -> list[int]:
    """Each side of the plan's patch rounded down to a multiple of its divisor (at least the divisor)."""
    divisors = per_axis(divisor, len(plan_patch))
    return [max(d, int(p) // d * d) for p, d in zip(plan_patch, divisors)]


def patch_ladder(start: Sequence[int], divisor: Divisor) -> list[tuple[int, ...]]:
    """``start``, then smaller patches: each the previous with its longest side (the first, on ties) that is still
    above its divisor one divisor step shorter, down to one divisor per side. Volumes decrease strictly."""
    divisors = per_axis(divisor, len(start))
    patch, ladder = list(start), [tuple(start)]
    while True:
        shrinkable = [a for a in range(len(patch)) if patch[a] > divisors[a]]
        if not shrinkable:
            return ladder
        axis = max(shrinkable, key=lambda a: (patch[a], -a))
        patch[axis] -= divisors[axis]
        ladder.append(tuple(patch))


def modes(amp: bool, checkpointing: bool) -> tuple[Mode, ...]:
    """The memory savings a candidate tries, least first: AMP as configured (fp32 first when the config turns it off,
    then AMP), then, where the network can checkpoint (the search), :data:`CHECKPOINT_FRACTIONS` under AMP."""
    ladder = [Mode(amp=True)] if amp else [Mode(amp=False), Mode(amp=True)]
    if checkpointing:
        ladder += [Mode(amp=True, checkpoint_fraction=f) for f in CHECKPOINT_FRACTIONS]
    return tuple(ladder)


def choose(candidate: Candidate, budget: int, predictions: dict | None = None) -> Choice:
    """The settings of ``candidate`` for ``budget`` bytes by the rules of the module docstring.

    Args:
        predictions: a cache ``{(candidate, patch, batch, mode): bytes}`` shared between calls (a table predicts
            each setting once for all its cards).
    """
    cache = {} if predictions is None else predictions

    def peak(patch: tuple[int, ...], batch: int, mode: Mode) -> int | None:
        key = (candidate.name, patch, batch, mode)
        if key not in cache:
            try:
                cache[key] = int(candidate.predict(patch, batch, mode))
            except ValueError:  # the network cannot take the patch (e.g. instance norm of a 1-voxel bottleneck)
                cache[key] = None
        return cache[key]

    def fits(patch: tuple[int, ...], batch: int, mode: Mode) -> bool:
        value = peak(patch, batch, mode)
        return value is not None and value <= budget

    saving = candidate.modes[-1]
    for patch in patch_ladder(candidate.start_patch, candidate.divisor):
        if not fits(patch, 1, saving):
            continue
        low, high = 1, candidate.max_batch  # the largest batch at which the most saving mode fits: in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(patch, mid, saving) else (low, mid - 1)
        mode = next(m for m in candidate.modes if fits(patch, low, m))
        return Choice(candidate.name, candidate.stage, budget, list(patch), low, mode.amp, mode.checkpoint_fraction,
                      peak(patch, low, mode))
    return Choice(candidate.name, candidate.stage, budget)


def search_candidate(cfg: Config, plan: Mapping, max_batch: int | None = None) -> Candidate:
    """The configured DiNTS supernet's search step (``data.batch_size × data.num_samples`` patches per step)."""
    d = cfg.dints
    hparams = {"num_blocks": d.num_blocks, "num_depths": d.num_depths, "channel_mul": d.channel_mul,
               "use_downsample": d.use_downsample, "spatial_dims": d.spatial_dims, "cpu_conv_routing": False,
               "stem_skip": d.stem_skip, "stem_stride": dints_stem_stride(cfg, plan.get("target_spacing"))}
    channels, classes, samples = int(plan["in_channels"]), int(plan["out_channels"]), cfg.data.num_samples

    def predict(patch: tuple[int, ...], batch: int, mode: Mode) -> int:
        checkpointing = {"checkpoint_cells": mode.checkpoint_fraction > 0,
                         "checkpoint_fraction": mode.checkpoint_fraction or 1.0}
        return predict_search_step_memory({**hparams, **checkpointing}, (channels, *patch), batch=batch * samples,
                                          amp=mode.amp, num_classes=classes, device="cuda")["peak"]

    divisor = patch_divisor(d.num_depths, d.use_downsample)
    return Candidate("search", "search", f"DiNTS supernet {d.num_blocks}×{d.num_depths}, channel_mul "
                     f"{d.channel_mul:g}", start_patch(plan["patch_size"], divisor), per_axis(divisor, 3),
                     max_batch or cfg.data.batch_size, modes(cfg.search.amp, checkpointing=True), predict)


def train_candidate(name: str, arch_source: str, cfg: Config, plan: Mapping,
                    max_batch: int | None = None) -> Candidate:
    """Retraining ``arch_source`` (an ``arch.json``, a preset or a baseline planned for ``plan``) at
    ``train.channel_mul``, SGD momentum, ``train.batch_size × data.num_samples`` patches per step."""
    arch = load_architecture(arch_source, plan, cfg.train.deep_supervision)
    if arch.spatial_dims != 3:
        raise DintsError(arch_source, f"is a {arch.spatial_dims}-D architecture; dints3d fit plans 3-D tasks")
    channels, classes, samples = int(plan["in_channels"]), int(plan["out_channels"]), cfg.data.num_samples
    model = meta_network(arch, channels, classes, channel_mul=cfg.train.channel_mul)

    def predict(patch: tuple[int, ...], batch: int, mode: Mode) -> int:
        return predict_training_memory(model, (channels, *patch), batch=batch * samples, amp=mode.amp,
                                       device="cuda")["peak"]

    return Candidate(name, "train", f"{arch.display_name} at channel_mul {cfg.train.channel_mul:g}",
                     start_patch(plan["patch_size"], arch.patch_divisor), per_axis(arch.patch_divisor, 3),
                     max_batch or cfg.train.batch_size, modes(cfg.train.amp, checkpointing=False), predict)


def candidates(cfg: Config, plan: Mapping, arch: str | None = None, search_max_batch: int | None = None,
               train_max_batch: int | None = None) -> list[Candidate]:
    """The search (for the ``dints`` space: the memory model's supernet), the searched ``arch`` if given, and
    :data:`RETRAINED`."""
    if len(plan["patch_size"]) != 3:
        raise DintsError("plan.json", f"has a {len(plan['patch_size'])}-D patch; dints3d fit plans 3-D (MSD) tasks")
    found = [search_candidate(cfg, plan, search_max_batch)] if cfg.space == "dints" else []
    if arch is not None:
        found.append(train_candidate("searched", arch, cfg, plan, train_max_batch))
    return found + [train_candidate(name, name, cfg, plan, train_max_batch) for name in RETRAINED]


def fit(cands: Sequence[Candidate], gpu_gb: float, safety: float = SAFETY,
        predictions: dict | None = None) -> list[Choice]:
    """Each candidate's :class:`Choice` on a card of ``gpu_gb`` GiB (GPU makers' "GB" are GiB)."""
    if not gpu_gb > 0:
        raise DintsError("--gpu-gb", f"must be positive, got {gpu_gb}")
    if not 0 < safety <= 1:
        raise DintsError("--safety", f"must be in (0, 1], got {safety}")
    budget = int(safety * gpu_gb * GiB)
    return [choose(c, budget, predictions) for c in cands]


def cache_plan(plan: Mapping, cases: int, ram_bytes: int, choices: Sequence[Choice] = ()) -> CachePlan:
    """``data.cache_rate``: the fraction of ``cases`` whose preprocessed volumes fit in :data:`CACHE_RAM_FRACTION` of
    ``ram_bytes``, rounded down to a tenth (at most 1). A search choice whose cache of every case also fits on the
    card beside its predicted peak (within its budget) caches on the GPU."""
    full = estimate_cache_bytes(plan, cases)
    rate = min(1.0, math.floor(10 * CACHE_RAM_FRACTION * ram_bytes / max(full, 1)) / 10)
    on_gpu = {c.candidate: c.fits and c.peak + full <= c.budget for c in choices if c.stage == "search"}
    return CachePlan(cases, full, ram_bytes, rate, on_gpu)


def overlay(choice: Choice, cache: CachePlan) -> dict:
    """The config keys ``choice`` sets, in the config's nesting (``dints3d search/export --overlay``)."""
    if not choice.fits:
        raise ValueError(f"{choice.candidate} fits nowhere: no overlay")
    if choice.stage == "search":
        on_gpu = cache.gpu_cache.get(choice.candidate, False)
        return {"data": {"patch_size": choice.patch, "batch_size": choice.batch,
                         "cache_rate": 1.0 if on_gpu else cache.cache_rate, "gpu_cache": on_gpu},
                "search": {"amp": choice.amp, "checkpoint_cells": choice.checkpoint_fraction > 0,
                           "checkpoint_fraction": choice.checkpoint_fraction or 1.0}}
    return {"data": {"cache_rate": cache.cache_rate},
            "train": {"patch_size": choice.patch, "batch_size": choice.batch, "amp": choice.amp}}
