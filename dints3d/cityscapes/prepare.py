"""``dints3d prepare`` for a Cityscapes folder (:mod:`dints3d.cityscapes.folder`).

``prepare_cityscapes`` writes the three WORK files with ``"format": "cityscapes"``: the split is Cityscapes'
official one (one fold: ``fold0_train`` = train, ``fold0_validation`` = val) and the train split is cut into two
disjoint seeded halves (``fold0_weights`` / ``fold0_arch``) for the bilevel search.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dints3d.cityscapes.folder import (
    SPLITS,
    Sample,
    check_image,
    read_folder,
    read_label_ids,
)
from dints3d.cityscapes.labels import (
    IGNORE_INDEX,
    NUM_CLASSES,
    class_names,
    to_train_ids,
)
from dints3d.data.datalist import DATALIST_FILE, split_halves
from dints3d.data.fingerprint import (
    FINGERPRINT_FILE,
    PLAN_FILE,
    check_overrides,
    check_patch,
)
from dints3d.data.prepare import write_outputs
from dints3d.utils.errors import DintsError

FORMAT = "cityscapes"
FORMAT_VERSION = 1
#: the paper's search crops (321 × 321 from half-resolution images)
SEARCH_CROP = 321
SEARCH_SCALE = 0.5
#: plan fields a config's ``plan:`` section may set
PLAN_FIELDS = ("name", "image_scale", "patch_size", "patch_divisor", "median_shape")


def fingerprint(root: Path, samples: dict[str, list[Sample]], progress: bool = True) -> dict:
    """Check every train/val image and read every label once: sizes, and train-id pixel counts of the train split."""
    sizes: Counter = Counter()
    counts = np.zeros(256, np.int64)
    labelled = [s for split in ("train", "val") for s in samples[split]]
    with tqdm(labelled, desc="prepare", unit="image", file=sys.stderr, disable=None if progress else True,
              leave=False) as bar:
        for sample in bar:
            size = check_image(root / sample.image)
            label = read_label_ids(root / sample.label)
            if label.shape != size:
                raise DintsError(root / sample.label, f"size {list(label.shape)} differs from the image's {list(size)}")
            sizes[f"{size[0]}x{size[1]}"] += 1
            if sample.split == "train":
                counts += np.bincount(to_train_ids(label).ravel(), minlength=256)
    names = class_names()
    total = int(counts.sum())
    return {
        "version": FORMAT_VERSION,
        "format": FORMAT,
        "task_dir": str(root.resolve()),
        "name": root.resolve().name,
        "num_images": {split: len(samples[split]) for split in SPLITS},
        "image_sizes": dict(sorted(sizes.items())),
        "class_pixels": {names[i]: int(counts[i]) for i in range(NUM_CLASSES)},
        "class_frequency": {names[i]: float(counts[i]) / total for i in range(NUM_CLASSES)},
        "ignored_fraction": float(counts[IGNORE_INDEX]) / total,
    }


def check_plan_overrides(overrides: Any, divisor: int, source: str = "plan") -> None:
    """Refuse a config ``plan:`` section :func:`make_plan` cannot use: a field outside :data:`PLAN_FIELDS`, a value
    of the wrong type or range (the checks ``load_plan`` runs on a prepared Cityscapes plan) or a ``patch_size`` that
    does not divide by ``divisor`` (or an overridden ``patch_divisor``). Needs no image, so ``prepare`` runs it
    before reading the folder's images."""
    check_overrides(overrides, source, PLAN_FIELDS, dims=2)
    check_patch(overrides, divisor, source)


def make_plan(fp: dict, divisor: int, overrides: dict | None = None, source: str = "plan") -> dict:
    """``plan.json``: RGB in, 19 classes out, images scaled by ``image_scale`` (the paper searches at half
    resolution), crops of min(321, the scaled image's shorter side) rounded down to a multiple of ``divisor``.
    ``overrides`` (a config's ``plan:`` section) are checked by :func:`check_plan_overrides`."""
    check_plan_overrides(overrides or {}, divisor, source)
    overrides = dict(overrides or {})
    scale = overrides.get("image_scale", SEARCH_SCALE)
    divisor = overrides.get("patch_divisor", divisor)
    heights, widths = zip(*(tuple(map(int, k.split("x"))) for k, n in fp["image_sizes"].items() for _ in range(n)))
    image_size = [int(np.median(heights)), int(np.median(widths))]
    median = overrides.get("median_shape", [int(s * scale) for s in image_size])
    side = max(divisor, int(min(SEARCH_CROP, *median)) // divisor * divisor)
    patch = overrides.get("patch_size", [side, side])
    names = class_names()
    return {
        "version": FORMAT_VERSION,
        "format": FORMAT,
        "task_dir": fp["task_dir"],
        "name": overrides.get("name", fp["name"]),
        "in_channels": 3,
        "out_channels": NUM_CLASSES,
        "class_names": names,
        "labels": {str(i): n for i, n in enumerate(names)},
        "ignore_index": IGNORE_INDEX,
        "modalities": ["R", "G", "B"],
        "normalization": [{"modality": "RGB", "scheme": "deeplab", "range": [0, 255], "to": [-1.0, 1.0]}],
        "image_size": image_size,
        "image_scale": float(scale),
        "median_shape": median,
        "patch_size": patch,
        "patch_divisor": divisor,
        "overrides": overrides,
    }


def make_datalist(root: Path, samples: dict[str, list[Sample]], seed: int = 0) -> dict:
    """``datalist.json``: ``training`` (train split), ``validation`` (val), ``test``, and fold 0's lists."""
    training = [s.entry() for s in samples["train"]]
    weights, arch = split_halves(list(range(len(training))), np.random.default_rng(np.random.SeedSequence(seed)))
    return {
        "version": FORMAT_VERSION,
        "format": FORMAT,
        "task_dir": str(root.resolve()),
        "seed": seed,
        "num_folds": 1,
        "training": training,
        "validation": [s.entry() for s in samples["val"]],
        "test": [s.entry() for s in samples["test"]],
        "fold0_train": training,
        "fold0_validation": [s.entry() for s in samples["val"]],
        "fold0_weights": [training[i] for i in weights],
        "fold0_arch": [training[i] for i in arch],
    }


def prepare_cityscapes(root: str | os.PathLike, work_dir: str | os.PathLike, seed: int = 0, divisor: int = 1,
                       overrides: dict | None = None, config_source: str = "--set",
                       progress: bool = True) -> dict[str, dict]:
    """Validate a Cityscapes folder and write ``fingerprint.json``, ``plan.json``, ``datalist.json`` to
    ``work_dir`` (only after everything passed); returns them as ``{"fingerprint", "plan", "datalist"}``."""
    root, work = Path(root), Path(work_dir)
    if work.exists() and not work.is_dir():
        raise DintsError(work, "exists and is not a folder")
    check_plan_overrides(overrides or {}, divisor, config_source)
    samples = read_folder(root)
    outputs = {"fingerprint": fingerprint(root, samples, progress)}
    outputs["plan"] = make_plan(outputs["fingerprint"], divisor, overrides, config_source)
    outputs["datalist"] = make_datalist(root, samples, seed)
    write_outputs(work, outputs)
    return outputs


def summary(outputs: dict[str, dict], work_dir: str | os.PathLike) -> str:
    """A few human-readable lines about what ``prepare`` decided for a Cityscapes folder."""
    fp, plan, datalist = outputs["fingerprint"], outputs["plan"], outputs["datalist"]
    n = fp["num_images"]
    return "\n".join([
        f"{plan['name']} (Cityscapes): {n['train']} train + {n['val']} val + {n['test']} test images; search halves "
        f"{len(datalist['fold0_weights'])} / {len(datalist['fold0_arch'])} (seed {datalist['seed']})",
        f"images {' '.join(f'{k} ×{v}' for k, v in fp['image_sizes'].items())}, scaled by {plan['image_scale']:g} → "
        f"{' × '.join(map(str, plan['median_shape']))}; crops {' × '.join(map(str, plan['patch_size']))}",
        f"{plan['out_channels']} classes (train ids), ignore index {plan['ignore_index']} "
        f"({100 * fp['ignored_fraction']:.1f}% of train pixels)",
        f"wrote {', '.join(str(Path(work_dir) / f) for f in (FINGERPRINT_FILE, PLAN_FILE, DATALIST_FILE))}",
    ])
