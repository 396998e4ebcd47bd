"""``dints3d random-search``: random search over DPC cells on cached backbone features (``--space dpc``), or over
discrete DiNTS or Auto-DeepLab networks within the differentiable search's memory budget (``--space dints`` /
``autodeeplab``, the baselines).

Outputs in ``RUN/``: ``trials.csv`` (one row per trial, appended as it finishes), ``topk.csv``, ``trials.png``
(score vs trial), ``topk.md``, ``arch.json`` and ``arch.png`` (the winner), ``model.pt`` (DPC: the winner's
backbone + head weights), ``summary.json``, ``config.yaml``, ``random_search.json`` (what a resumed run must match).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dints3d.config import Config, config_path, config_to_dict, load_config
from dints3d.cost.budget import GB
from dints3d.cost.memory import meta_search_space, predict_training_memory
from dints3d.data.dataset import load_plan
from dints3d.data.patch import resolve_patch
from dints3d.random_search.engine import RandomSearch, budget_from_config, load_state
from dints3d.random_search.proxy import cached_features
from dints3d.random_search.samplers import (
    AutoDeepLabSampler,
    DintsSampler,
    DpcSampler,
    MemoryLimit,
)
from dints3d.random_search.train import HeadEvaluator, NetworkEvaluator, Schedule
from dints3d.spaces.dints.topology import patch_divisor
from dints3d.spaces.dpc.backbones import backbone_features, backbone_patch_divisor
from dints3d.spaces.dpc.genotype import DpcCatalog
from dints3d.spaces.factory import dints_stem_stride, load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_yaml
from dints3d.utils.lock import locked_folder
from dints3d.utils.outputs import check_output_folder
from dints3d.utils.runtime import Runtime, init_runtime

SPACES = ("dints", "autodeeplab", "dpc")


def dpc_search(cfg: Config, work: str | Path, out: str | Path, runtime: Runtime, resume: bool = False):
    """A DPC random search on ``cfg.dpc.backbone``'s cached features; returns ``(RandomSearch, ProxyFeatures)``."""
    out, dpc = Path(out), cfg.dpc
    plan = load_plan(work, cfg.plan)
    backbone = load_architecture(dpc.backbone)
    if backbone.space not in ("dints", "autodeeplab"):
        raise DintsError("dpc.backbone", f"{dpc.backbone} is a '{backbone.space}' architecture; DPC runs on DiNTS "
                         "or Auto-DeepLab backbones")
    dims = backbone.spatial_dims
    patch = resolve_patch(plan, backbone_patch_divisor(backbone), "the backbone", ("data.patch_size", cfg.data.patch_size),
                          dims=dims)
    if (out / "random_search.json").exists() and not resume:  # refuse before the (long) feature computation
        raise DintsError(out, "already holds a random search; pass --resume to continue it or choose another --out")
    features = cached_features(cfg, work, backbone, plan, patch, dpc.cache_dir or out / "feature_cache", runtime)
    print(f"backbone features: {'reused' if features.hit else 'computed'} {features.folder} "
          f"({len(features.train_x)} + {len(features.val_x)} patches, {features.channels} channels, "
          f"stride {features.stride})", flush=True)
    classes = int(plan["out_channels"])
    schedule = Schedule.from_config(cfg)
    sampler = DpcSampler(DpcCatalog.default(dims, dpc.rates, dpc.grids), dpc.num_branches, dpc.channels)

    def full_state(head: dict) -> dict:
        """Backbone (feature extractor) + head weights: the state dict of the winner's ``DpcNetwork``."""
        state = load_state(features.backbone_state_path, "the cached backbone weights",
                           hint=f"; delete the cache folder {features.folder} to compute it again")
        extractor, _ = backbone_features(backbone, int(plan["in_channels"]), classes, dpc.feature_depth,
                                         dpc.backbone_channel_mul, state)
        return {**{f"backbone.{k}": v for k, v in extractor.state_dict().items()},
                **{f"head.{k}": v for k, v in head.items()}}

    search = RandomSearch(
        out, sampler, HeadEvaluator(features, plan, schedule, dpc.batch_size, runtime), budget_from_config(cfg),
        settings={"feature_cache": features.key, "schedule": schedule.__dict__, "batch_size": dpc.batch_size},
        finalize=lambda cell: cell.with_backbone(backbone, dpc.feature_depth, dpc.backbone_channel_mul),
        finalize_state=full_state, resume=resume)
    search.summary_extra = {"feature_cache": {"folder": str(features.folder), "reused": features.hit,
                                              "backbone_forwards": features.backbone_forwards}}
    return search, features


def memory_limit(cfg: Config, space: str, in_channels: int, classes: int, patch: list[int], device: str):
    """The search's memory budget for sampled networks: predicted training memory ≤ ``search.memory_budget_gb``
    if set; else, for DiNTS, the memory ratio M/M_full ≤ σ = ``search.ram_cost_factor``; else none."""
    d, s, t = cfg.dints, cfg.search, cfg.train
    if s.memory_budget_gb is not None:
        def gigabytes(arch) -> float:
            build = lambda: arch.build(in_channels, classes, channel_mul=t.channel_mul)  # noqa: E731
            return predict_training_memory(build, (in_channels, *patch), batch=t.batch_size, amp=t.amp,
                                           device=device)["peak"] / GB

        return MemoryLimit(gigabytes, s.memory_budget_gb, "predicted training memory (GB)")
    if space != "dints":
        return None
    supernet = meta_search_space(in_channels, classes, num_blocks=d.num_blocks, num_depths=d.num_depths,
                                 channel_mul=d.channel_mul, use_downsample=d.use_downsample,
                                 spatial_dims=d.spatial_dims)
    # The ratio reads only the device of β (the sizes are put there): a small real β instead of the meta one.
    supernet.topology_space.log_alpha_a = torch.nn.Parameter(torch.zeros(supernet.log_alpha_a.shape))
    shape = (cfg.data.batch_size * cfg.data.num_samples, in_channels, *patch)
    return MemoryLimit(lambda arch: supernet.discrete_memory_ratio(arch, shape), s.ram_cost_factor,
                       "memory ratio M/M_full")


def network_random_search(cfg: Config, work: str | Path, out: str | Path, runtime: Runtime, space: str = "dints",
                          resume: bool = False) -> RandomSearch:
    """Random discrete DiNTS or Auto-DeepLab networks of the search's shape (``dints:`` / ``autodeeplab:``) and
    memory budget, short-trained as whole networks and ranked."""
    d, a = cfg.dints, cfg.autodeeplab
    plan = load_plan(work, cfg.plan)
    if space == "dints":
        patch = resolve_patch(plan, patch_divisor(d.num_depths, d.use_downsample), "the DiNTS grid",
                              ("data.patch_size", cfg.data.patch_size), dims=d.spatial_dims)
    else:
        patch = resolve_patch(plan, 1, "the Auto-DeepLab network", ("data.patch_size", cfg.data.patch_size),
                              dims=a.spatial_dims)
    in_channels, classes = int(plan["in_channels"]), int(plan["out_channels"])
    limit = memory_limit(cfg, space, in_channels, classes, patch, runtime.device.type)
    if space == "dints":
        sampler = DintsSampler(d.num_blocks, d.num_depths, d.spatial_dims, d.use_downsample, limit,
                               stem_skip=d.stem_skip, stem_stride=dints_stem_stride(cfg, plan.get("target_spacing")))
    else:
        sampler = AutoDeepLabSampler(a.num_layers, a.num_blocks, a.filter_multiplier, a.spatial_dims, limit)
    train_and_score = NetworkEvaluator(cfg, work, runtime, plan, patch)

    def evaluator(arch, iterations: int, seed: int):
        result = train_and_score(arch, iterations, seed)
        if limit is not None:  # in the limit's units (see random_search.json); measured when the sampler admitted it
            result.metrics["memory"] = sampler.memory(arch)
        return result

    settings = {"train": config_to_dict(cfg)["train"], "data": config_to_dict(cfg)["data"],
                "validation": {"sw_batch_size": cfg.search.val_sw_batch_size, "overlap": cfg.search.val_overlap}}
    return RandomSearch(out, sampler, evaluator, budget_from_config(cfg), settings=settings, resume=resume)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="dints_search",
                        help="YAML config path or packaged name (dints_search, demo); default: dints_search")
    parser.add_argument("--work", required=True, help="folder written by `dints3d prepare`")
    parser.add_argument("--out", required=True,
                        help="run folder: trials.csv, topk.csv, trials.png, topk.md, arch.json, model.pt (dpc)")
    parser.add_argument("--space", choices=SPACES, default=None,
                        help="dpc: dense prediction cells on cached backbone features; dints / autodeeplab: "
                             "discrete networks of the search's shape within its memory budget (default: the "
                             "config's space)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set random_search.trials=20 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search in --out (finished trials are kept, the budget may change)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config), args.overrides)
    space = args.space or cfg.space
    if space not in SPACES:
        raise DintsError("--space", f"random search covers {', '.join(SPACES)}, not '{space}'")
    runtime = init_runtime(cfg.device)
    if runtime.distributed:
        raise DintsError("random-search", "runs in one process (start it without torchrun)")
    out = Path(args.out)
    check_output_folder(out)
    # one process per run folder; a folder this run created goes again if it fails before writing anything
    with locked_folder(out):
        if space == "dpc":
            search, _ = dpc_search(cfg, args.work, out, runtime, args.resume)
        else:
            search = network_random_search(cfg, args.work, out, runtime, space, args.resume)
        write_yaml(out / "config.yaml", config_to_dict(cfg))
        arch = search.run()
    if arch is None:
        print("no trial ran (the time budget was already spent)")
        return 0
    print(f"architecture: {arch}")
    print(f"trials:       {out / 'trials.csv'}  (plot: {out / 'trials.png'}, top-k: {out / 'topk.md'})")
    if (out / "model.pt").exists():
        print(f"weights:      {out / 'model.pt'}")
    return 0
