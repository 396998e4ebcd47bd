"""What a finished training writes back into this bundle, as model-zoo bundles record it (:class:`TrainingResults`),
with MONAI, ignite, torch and PyYAML only."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import yaml
from ignite.engine import Engine, Events
from monai.bundle import ckpt_export
from monai.handlers import CheckpointSaver

from .checkpoints import atomic_path

logger = logging.getLogger(__name__)

#: ``docs/README.md`` holds the performance text between these lines
PERFORMANCE_START, PERFORMANCE_END = "<!-- performance -->", "<!-- /performance -->"


def next_patch_version(version: str) -> str:
    """``"0.1.3"`` → ``"0.1.4"``; a version that is not ``major.minor.patch`` gets ``.1`` appended."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    if match is None:
        return f"{version}.1"
    major, minor, patch = map(int, match.groups())
    return f"{major}.{minor}.{patch + 1}"


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def without_debug_tables(torchscript: Path) -> None:
    """Drop the ``*.debug_pkl`` entries of a TorchScript archive: source ranges for error messages, which name the
    exporting machine's files (its MONAI and PyTorch installation); the model loads and computes the same without
    them."""
    with zipfile.ZipFile(torchscript) as source, atomic_path(torchscript) as tmp:
        with zipfile.ZipFile(tmp, "w") as target:
            for entry in source.infolist():
                if not entry.filename.endswith(".debug_pkl"):
                    target.writestr(entry, source.read(entry.filename))


class TrainingResults:
    """When the trainer completes its last epoch, record the result in the bundle ``bundle_root``:

    - ``configs/metadata.json``: ``eval_metrics`` ``{"mean_dice": the best validation mean Dice}`` (the score of
      ``models/model.pt``, kept by ``best_saver`` across resumes), the patch version bumped and a changelog entry;
    - ``models/model.ts``: ``models/model.pt`` as TorchScript with the metadata and ``configs/inference.yaml`` inside
      (MONAI's ``ckpt_export`` of ``network_def``; ``network_overrides``: the training's network settings, e.g.
      ``channel_mul``, applied to inference.yaml), without TorchScript's debug tables (:func:`without_debug_tables`);
    - ``large_files.yml``: the md5 of ``model.pt`` and ``model.ts`` (``url`` stays for you to fill);
    - ``docs/README.md``: the performance text between :data:`PERFORMANCE_START` and :data:`PERFORMANCE_END`.

    A run stopped early (by a guard) records nothing; rerunning a finished training records nothing new. List it only
    on the process that writes files (rank 0).
    """

    def __init__(self, bundle_root: str | os.PathLike, best_saver: CheckpointSaver, fold: int,
                 network_overrides: Mapping[str, Any] | None = None, torchscript: bool = True):
        self.root, self.best_saver, self.fold = Path(bundle_root), best_saver, int(fold)
        self.network_overrides, self.torchscript = dict(network_overrides or {}), bool(torchscript)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def best_dice(self) -> float | None:
        """The best validation score of the run (and of the runs it resumed), ``None`` before any validation."""
        saved = self.best_saver._key_metric_checkpoint.state_dict()["_saved"]
        return max(float(priority) for priority, _ in saved) if saved else None

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if getattr(engine, "should_terminate", False) or state.iteration < state.max_epochs * state.epoch_length:
            return  # stopped early: nothing to record
        best = self.best_dice()
        model = self.root / "models" / "model.pt"
        if best is None or not model.is_file():
            logger.warning("training ended without a validated models/model.pt: nothing recorded in metadata.json")
            return
        meta_file = self.root / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        entry = (f"retrained with configs/train.yaml: {state.iteration} iterations on fold {self.fold}, best "
                 f"validation mean Dice {best:.4f}")
        if meta.get("changelog", {}).get(meta.get("version")) != entry:
            version = next_patch_version(str(meta.get("version", "0.0.0")))
            meta["version"] = version
            meta["changelog"] = {version: entry, **meta.get("changelog", {})}
            meta["eval_metrics"] = {"mean_dice": round(best, 4)}
            _write(meta_file, json.dumps(meta, indent=2) + "\n")
            logger.info(f"metadata.json: version {version}, eval_metrics mean_dice {best:.4f}")
        torchscript = self.root / "models" / "model.ts"
        if self.torchscript:
            self._export_torchscript(model, torchscript, meta_file, meta)
        self._record_files([model, torchscript])
        self._record_performance(best, state.iteration)

    def _export_torchscript(self, model: Path, torchscript: Path, meta_file: Path, meta: Mapping) -> None:
        """``ckpt_export`` by scripting, else (a network TorchScript cannot compile, e.g. MONAI's SegResNetDS) by
        tracing one input patch; a network neither can export is logged, and training still succeeds."""
        image = meta["network_data_format"]["inputs"]["image"]
        shape = [1, int(image["num_channels"]), *map(int, image["spatial_shape"])]
        problems = []
        for options in ({}, {"use_trace": True, "input_shape": shape}):
            try:
                ckpt_export(net_id="network_def", filepath=str(torchscript), ckpt_file=str(model),
                            meta_file=str(meta_file), config_file=str(self.root / "configs" / "inference.yaml"),
                            bundle_root=str(self.root), **options, **self.network_overrides)
            except Exception as e:  # noqa: BLE001 - TorchScript fails in many ways; the weights stay in model.pt
                problems.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            without_debug_tables(torchscript)
            if problems:
                logger.info(f"models/model.ts traced on a {shape} input (scripting failed: {problems[0]})")
            return
        logger.warning(f"models/model.ts not written: TorchScript cannot export this network ({problems[-1]})")

    def _record_files(self, files: list[Path]) -> None:
        """Fill the md5 of the files that exist into ``large_files.yml``."""
        path = self.root / "large_files.yml"
        if not path.is_file():
            return
        text = path.read_text()
        listing = yaml.safe_load(text) or {}
        hashes = {f"models/{f.name}": md5(f) for f in files if f.is_file()}
        for item in listing.get("large_files", []):
            if item.get("path") in hashes:
                item.update(hash_val=hashes[item["path"]], hash_type="md5")
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        _write(path, header + yaml.safe_dump(listing, sort_keys=False))

    def _record_performance(self, best: float, iterations: int) -> None:
        path = self.root / "docs" / "README.md"
        if not path.is_file():
            return
        text = path.read_text()
        start, end = text.find(PERFORMANCE_START), text.find(PERFORMANCE_END)
        if start < 0 or end < start:
            return
        result = (f"\nBest validation mean Dice (foreground classes, on the resampled grid, sliding window): "
                  f"**{best:.4f}**, fold {self.fold}, after {iterations} training iterations "
                  "(`eval_metrics` in `configs/metadata.json`, written by training).\n")
        _write(path, text[: start + len(PERFORMANCE_START)] + result + text[end:])
