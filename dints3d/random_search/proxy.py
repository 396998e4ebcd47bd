"""The DPC proxy task: run the fixed backbone once over fixed proxy patches and cache its features on disk.

Proxy patches are seeded random crops of the preprocessed cases of the fold's training and validation lists:
class-balanced for MSD volumes (``RandCropByLabelClassesd``, equal ratios; with a 2-D backbone, axial slices
``h × w`` cut as ``h × w × 1`` crops), uniform for Cityscapes images (padded with the ignore label). The
backbone's weights come from ``dpc.backbone_weights``, or from ``dpc.pretrain_iterations`` steps of training the
backbone network on the training patches, or are its random initialisation. Its features are computed once (no
augmentation, eval mode) and stored as float16 under ``CACHE/<key>/``, where the key hashes everything they depend
on (backbone architecture and weights, data, patch, counts, seed, feature depth), so another search with the same
inputs — a resumed one, or a new one pointed at the same ``dpc.cache_dir`` — loads them without running the
backbone. An unreadable cache folder is computed again; unreadable ``dpc.backbone_weights`` are an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor
from tqdm import tqdm

from dints3d.config import Config
from dints3d.data.dataset import load_items
from dints3d.data.formats import plan_format
from dints3d.data.losses import segmentation_loss
from dints3d.data.transforms import validation_transforms
from dints3d.random_search.engine import load_state
from dints3d.random_search.train import Schedule, cycling_batches, train_steps
from dints3d.spaces.base import Architecture
from dints3d.spaces.dpc.backbones import backbone_features
from dints3d.utils.checkpoint import write_torch
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json
from dints3d.utils.runtime import Runtime, seed_everything

FEATURES_FILE, BACKBONE_FILE, META_FILE = "features.pt", "backbone.pt", "meta.json"


@dataclass
class ProxyFeatures:
    """Cached proxy data. ``*_x``: ``N C [patch / stride]`` float16 features; ``*_y``: ``N 1 [patch]`` uint8."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    channels: int
    stride: int
    folder: Path
    key: str
    hit: bool  #: loaded from the cache (the backbone did not run)
    backbone_forwards: int  #: backbone forward passes this call ran (0 on a hit)

    @property
    def backbone_state_path(self) -> Path:
        return self.folder / BACKBONE_FILE


def proxy_patches(plan: dict, items: list[dict], patch: list[int], count: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` crops spread evenly over ``items``: images ``N C [patch]`` float32 and labels ``N 1 [patch]``
    uint8. For MSD volumes a 2-element ``patch`` gives axial slices ``h × w``."""
    pick, crop = plan_format(plan).proxy_crop(plan, patch)
    preprocess = validation_transforms(plan)
    per_case = [count // len(items) + (i < count % len(items)) for i in range(len(items))]
    images, labels = [], []
    for index, (item, n) in enumerate(tqdm(list(zip(items, per_case)), desc="proxy patches", leave=False)):
        if n == 0:
            continue
        case = preprocess(item)
        pick.set_random_state(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
        for _ in range(n):
            (sample,) = pick(case)
            images.append(convert_to_tensor(sample["image"], dtype=torch.float32, track_meta=False))
            labels.append(convert_to_tensor(sample["label"], dtype=torch.uint8, track_meta=False))
    x, y = torch.stack(images), torch.stack(labels)
    if len(crop) > len(patch):
        x, y = x[..., 0], y[..., 0]
    return x, y


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_identity(cfg: Config, work: str | os.PathLike, backbone: Architecture, plan: dict,
                   patch: list[int]) -> dict:
    """Everything the cached features depend on (hashed into the cache key)."""
    d, dpc = cfg.data, cfg.dpc
    if dpc.backbone_weights is not None:
        if not Path(dpc.backbone_weights).is_file():
            raise DintsError(dpc.backbone_weights, "backbone weights file not found (dpc.backbone_weights)")
        weights = {"sha256": _sha256(dpc.backbone_weights)}
    elif dpc.pretrain_iterations > 0:
        weights = {"pretrain_iterations": dpc.pretrain_iterations, "schedule": Schedule.from_config(cfg).__dict__,
                   "batch_size": dpc.batch_size}
    else:
        weights = "random initialisation"
    return {
        "backbone": {**backbone.to_dict(), "provenance": {}},
        "weights": weights,
        "channel_mul": dpc.backbone_channel_mul,
        "feature_depth": dpc.feature_depth,
        "plan": plan,
        "train": [item["image"] for item in load_items(work, f"fold{d.fold}_train", d.max_cases)],
        "validation": [item["image"] for item in load_items(work, f"fold{d.fold}_validation", d.max_cases)],
        "patch": list(patch),
        "counts": [dpc.train_patches, dpc.val_patches],
        "seed": cfg.seed,
        "amp": cfg.train.amp,
    }


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_tensors(path: Path, tensors: dict) -> None:
    write_torch(path, tensors)


def cached_features(cfg: Config, work: str | os.PathLike, backbone: Architecture, plan: dict, patch: list[int],
                    cache_dir: str | os.PathLike, runtime: Runtime) -> ProxyFeatures:
    """Load the proxy features from ``cache_dir`` or compute and store them (``meta.json`` last: a folder
    without it is incomplete and recomputed)."""
    identity = cache_identity(cfg, work, backbone, plan, patch)
    key = cache_key(identity)
    folder = Path(cache_dir) / key
    if (folder / META_FILE).is_file():
        try:
            meta = read_json(folder / META_FILE)
            if not (folder / BACKBONE_FILE).is_file():
                raise FileNotFoundError(folder / BACKBONE_FILE)
            data = torch.load(folder / FEATURES_FILE, weights_only=True)
            return ProxyFeatures(**data, channels=int(meta["channels"]), stride=int(meta["stride"]), folder=folder,
                                 key=key, hit=True, backbone_forwards=0)
        except Exception as e:  # noqa: BLE001 - any unreadable cache (meta.json or features.pt) is recomputed
            tqdm.write(f"warning: feature cache {folder} is unreadable ({type(e).__name__}); recomputing it")
            (folder / META_FILE).unlink()

    d, dpc = cfg.data, cfg.dpc
    in_channels, classes = int(plan["in_channels"]), int(plan["out_channels"])
    train = proxy_patches(plan, load_items(work, f"fold{d.fold}_train", d.max_cases), patch, dpc.train_patches,
                          cfg.seed)
    val = proxy_patches(plan, load_items(work, f"fold{d.fold}_validation", d.max_cases), patch, dpc.val_patches,
                        cfg.seed + 1)
    seed_everything(cfg.seed)
    net = backbone.build(in_channels, classes, channel_mul=dpc.backbone_channel_mul).to(runtime.device)
    if dpc.backbone_weights is not None:
        state = load_state(dpc.backbone_weights, "backbone weights (dpc.backbone_weights)", runtime.device)
        try:
            net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError) as e:
            raise DintsError(dpc.backbone_weights, f"does not fit the backbone {dpc.backbone}: "
                             f"{str(e).splitlines()[0]}") from None
    elif dpc.pretrain_iterations > 0:
        tqdm.write(f"pre-training the backbone for {dpc.pretrain_iterations} iterations on the proxy patches")
        train_steps(net, cycling_batches(*train, dpc.batch_size, cfg.seed), dpc.pretrain_iterations,
                    Schedule.from_config(cfg), runtime, segmentation_loss(plan))
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    features, channels = backbone_features(backbone, in_channels, classes, dpc.feature_depth,
                                           dpc.backbone_channel_mul, state)
    features = features.to(runtime.device).eval()
    forwards = 0
    outputs = {}
    with torch.no_grad():
        for split, (images, labels) in (("train", train), ("val", val)):
            chunks = []
            for start in tqdm(range(0, len(images), dpc.batch_size), desc=f"backbone features ({split})",
                              leave=False):
                with runtime.autocast(cfg.train.amp):
                    chunks.append(features(images[start : start + dpc.batch_size].to(runtime.device)).half().cpu())
                forwards += 1
            outputs[f"{split}_x"], outputs[f"{split}_y"] = torch.cat(chunks), labels
    _save_tensors(folder / FEATURES_FILE, outputs)
    _save_tensors(folder / BACKBONE_FILE, state)
    write_json(folder / META_FILE, {"key": key, "channels": channels, "stride": features.stride,
                                    "train_patches": len(train[0]), "val_patches": len(val[0]),
                                    "identity": json.loads(json.dumps(identity, default=str))})
    return ProxyFeatures(**outputs, channels=channels, stride=features.stride, folder=folder, key=key, hit=False,
                         backbone_forwards=forwards)
