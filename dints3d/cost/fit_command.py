"""``dints3d fit``: what fits a GPU of a given size, for the search and for retraining each candidate network, printed
and written as config overlays that ``dints3d search`` and ``dints3d export`` take with ``--overlay``.

For each card size G it writes ``OUT/fit-<G>gb/``: ``search.yaml`` (the search's keys), ``train-<candidate>.yaml``
(one per retrained network that fits) and ``fit.json`` (every choice, its predicted peak, the rules' constants),
as one group. The rules are those of :mod:`dints3d.cost.fit`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from dints3d.config import config_path, load_config
from dints3d.cost.fit import (
    CACHE_RAM_FRACTION,
    CHECKPOINT_FRACTIONS,
    SAFETY,
    TABLE_SIZES,
    CachePlan,
    Candidate,
    Choice,
    GiB,
    cache_plan,
    candidates,
    fit,
    overlay,
)
from dints3d.data.datalist import read_datalist
from dints3d.data.dataset import load_plan
from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_texts_together
from dints3d.utils.preflight import total_memory


def gb_name(gpu_gb: float) -> str:
    """``24`` → ``"24"``, ``10.5`` → ``"10.5"`` (folder names and headings)."""
    return f"{gpu_gb:g}"


def overlay_files(choices: Sequence[Choice], cache: CachePlan, gpu_gb: float) -> dict[str, str]:
    """File name → YAML text of the overlays of the choices that fit, each headed by a comment saying what it is
    for and how to use it."""
    files = {}
    for c in choices:
        if not c.fits:
            continue
        name = "search.yaml" if c.stage == "search" else f"train-{c.candidate}.yaml"
        use = ("dints3d search --work WORK --out RUN --overlay THIS_FILE" if c.stage == "search" else
               f"dints3d export --arch {'RUN/arch.json' if c.candidate == 'searched' else c.candidate} "
               "--work WORK --out BUNDLE --overlay THIS_FILE")
        head = (f"# dints3d fit: {'the search' if c.stage == 'search' else 'retraining ' + c.candidate} on a GPU "
                f"of {gb_name(gpu_gb)} GB; predicted peak {c.peak / GiB:.2f} GiB of {c.budget / GiB:.2f} GiB "
                f"allowed (memory model, CUDA rule)\n# use: {use}\n")
        files[name] = head + overlay_yaml(overlay(c, cache))
    return files


def overlay_yaml(sections: dict[str, dict]) -> str:
    """Block-style sections with one ``key: value`` a line, values in flow style (JSON is YAML)."""
    return "".join(f"{section}:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in keys.items())
                   for section, keys in sections.items())


def size(n: int) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _checkpointing(c: Choice) -> str:
    if c.stage != "search":
        return "n/a"
    return "off" if not c.checkpoint_fraction else f"{c.checkpoint_fraction:g} of blocks"


def choice_row(c: Choice) -> list[str]:
    if not c.fits:
        return [c.candidate, "does not fit", "", "", "", f"(> {size(c.budget)} at every patch)"]
    return [c.candidate, "×".join(map(str, c.patch)), str(c.batch), "on" if c.amp else "off", _checkpointing(c),
            size(c.peak)]


def aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def format_text(task: dict, results: list[dict], cache: CachePlan, cands: Sequence[Candidate], notes: list[str],
                safety: float) -> str:
    lines = [f"task {task['name']}: plan patch {'×'.join(map(str, task['patch_size']))}, {task['in_channels']} "
             f"input channel{'s' if task['in_channels'] > 1 else ''} → {task['out_channels']} classes, "
             f"{cache.cases} cases ({size(cache.bytes)} preprocessed)",
             "rule: the largest patch, then batch, then the fewest memory savings whose predicted peak of one step "
             f"(memory model, CUDA rule; nothing allocated) stays ≤ {100 * safety:g} % of the card"]
    lines += [f"  {c.name}: {c.description}, batch ≤ {c.max_batch}" for c in cands]
    header = ["GPU", "candidate", "patch", "batch", "AMP", "checkpointing", "predicted peak"]
    rows = [header] + [[f"{gb_name(r['gpu_gb'])} GB"] + choice_row(c) for r in results for c in r["choices"]]
    lines += [""] + aligned(rows) + [""]
    lines.append(f"cache: data.cache_rate {cache.cache_rate:g} (all cases: {size(cache.bytes)}; "
                 f"{100 * CACHE_RAM_FRACTION:g} % of {cache.ram / GiB:.1f} GiB host RAM may hold it)")
    on_gpu = [f"{gb_name(r['gpu_gb'])} GB" for r in results if any(r["cache"].gpu_cache.values())]
    if on_gpu:
        lines.append(f"       the search caches every case on the GPU (data.gpu_cache: true, cache_rate 1) on: "
                     f"{', '.join(on_gpu)}")
    lines += notes
    for r in results:
        lines.append(f"overlays: {r['folder']}/ {', '.join(r['files'])}")
    if results:
        folder = results[-1]["folder"]
        lines.append(f"use:   dints3d search --work WORK --out RUN --overlay {folder}/search.yaml")
        lines.append(f"       dints3d export --arch NAME --work WORK --out BUNDLE --overlay {folder}/train-NAME.yaml")
    return "\n".join(lines)


def choice_dict(c: Choice) -> dict:
    return {"candidate": c.candidate, "stage": c.stage, "fits": c.fits, "patch_size": c.patch, "batch_size": c.batch,
            "amp": c.amp, "checkpoint_cells": c.checkpoint_fraction > 0,
            "checkpoint_fraction": c.checkpoint_fraction, "predicted_peak_bytes": c.peak, "budget_bytes": c.budget}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", required=True, help="folder written by `dints3d prepare` (plan.json, datalist.json)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--gpu-gb", type=float, help="the GPU's memory in GB (as sold: 16, 24, 40, 80; read as GiB)")
    size.add_argument("--table", action="store_true",
                      help=f"the settings for {', '.join(map(str, TABLE_SIZES))} GB GPUs")
    parser.add_argument("--ram-gb", type=float, default=None,
                        help="host RAM in GB for the case cache (default: this machine's, MemTotal)")
    parser.add_argument("--arch", default=None,
                        help="a searched arch.json (RUN/arch.json) to fit for retraining too (optional)")
    parser.add_argument("--config", default="dints_search",
                        help="config the settings are planned for: its dints: supernet, data.batch_size and "
                             "num_samples, search.amp, train.channel_mul, batch_size and amp, plan: overrides "
                             "(default: dints_search)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.channel_mul=0.5 or train.batch_size=4 (repeatable)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="largest batch to try (default: data.batch_size for the search, train.batch_size for "
                             "retraining)")
    parser.add_argument("--safety", type=float, default=SAFETY,
                        help=f"fraction of the card the predicted peak may use (default {SAFETY})")
    parser.add_argument("--out", default=None,
                        help="folder that receives fit-<G>gb/ with the overlays for each GPU size (default: --work)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(config_path(args.config), args.overrides)
    work = Path(args.work)
    plan = load_plan(work, cfg.plan)
    if args.max_batch is not None and args.max_batch < 1:
        raise DintsError("--max-batch", f"must be at least 1, got {args.max_batch}")
    if args.ram_gb is not None and not args.ram_gb > 0:
        raise DintsError("--ram-gb", f"must be positive, got {args.ram_gb}")
    ram = int(args.ram_gb * GiB) if args.ram_gb is not None else total_memory()
    if ram is None:
        raise DintsError("--ram-gb", "this machine's RAM is unknown; give it")
    cases = len(read_datalist(work, "training"))
    cands = candidates(cfg, plan, args.arch, args.max_batch, args.max_batch)
    notes = []
    if cfg.space != "dints":
        notes.append(f"search: the memory model covers the dints space only, not {cfg.space}")
    elif args.arch is None:
        notes.append("searched: after the search, run fit again with --arch RUN/arch.json for its retraining")
    sizes = TABLE_SIZES if args.table else (args.gpu_gb,)
    predictions: dict = {}
    results = []
    for gpu_gb in sizes:
        choices = fit(cands, gpu_gb, args.safety, predictions)
        cache = cache_plan(plan, cases, ram, choices)
        folder = Path(args.out or work) / f"fit-{gb_name(gpu_gb)}gb"
        files = overlay_files(choices, cache, gpu_gb)
        record = {"gpu_gb": gpu_gb, "budget_bytes": choices[0].budget if choices else 0,
                  "choices": [choice_dict(c) for c in choices],
                  "cache": {"cases": cache.cases, "bytes": cache.bytes, "ram_bytes": cache.ram,
                            "cache_rate": cache.cache_rate, "gpu_cache": cache.gpu_cache},
                  "overlays": sorted(files)}
        rules = {"safety": args.safety, "cache_ram_fraction": CACHE_RAM_FRACTION,
                 "checkpoint_fractions": list(CHECKPOINT_FRACTIONS), "memory_model": "cuda",
                 "config": os.fspath(config_path(args.config)), "overrides": list(args.overrides),
                 "arch": args.arch, "work": os.fspath(work.absolute())}
        write_texts_together(folder, {**files, "fit.json": json.dumps({**record, "rules": rules}, indent=2) + "\n"})
        results.append({"gpu_gb": gpu_gb, "choices": choices, "cache": cache, "folder": os.fspath(folder),
                        "files": sorted(files), "record": record})
    task = {key: plan[key] for key in ("name", "patch_size", "in_channels", "out_channels")}
    if args.json:
        print(json.dumps({"task": task, "gpus": [{**r["record"], "folder": r["folder"]} for r in results],
                          "notes": notes}))
    else:
        print(format_text(task, results, results[-1]["cache"], cands, notes, args.safety))
    return 0
