"""Dataset fingerprint (what the data looks like) and plan (how to process it), nnU-Net style.

The fingerprint is built one case at a time: exact streaming moments for mean/std/min/max, and percentiles from a
bounded seeded sample of foreground voxels per case, so memory does not grow with the dataset's voxel count.
The plan applies nnU-Net's rules to the fingerprint; see ``docs/data.md`` for every field.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dints3d.data.msd import Case, Task, Volume
from dints3d.errors import DintsError
from dints3d.io import read_json

FORMAT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
PLAN_FILE = "plan.json"
SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 50.0, 99.5)
ANISOTROPY_RATIO = 3.0
MAX_PATCH_SIDE = 96
TARGET_ORIENTATION = "RAS"
#: plan fields a config's ``plan:`` section may set
PLAN_FIELDS = ("name", "in_channels", "out_channels", "class_names", "labels", "modalities", "orientation",
               "target_spacing", "spacing_rule", "anisotropic_axis", "normalization", "median_shape",
               "patch_size", "patch_divisor")


class ForegroundIntensity:
    """Streaming intensity statistics of one modality over foreground voxels.

    Count, mean and variance merge per-case moments (Chan et al.'s parallel update), so they are exact up to
    float64 rounding regardless of the case order; percentiles come from at most ``samples_per_case`` voxels
    drawn per case.
    """

    def __init__(self, modality: str, samples_per_case: int = SAMPLES_PER_CASE):
        self.modality = modality
        self.samples_per_case = samples_per_case
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.low = math.inf
        self.high = -math.inf
        self.samples: list[np.ndarray] = []

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        """Merge one case's foreground voxels ``values`` [N] (N may be 0)."""
        n = values.size
        if n == 0:
            return
        values = values.astype(np.float64)
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        keep = values if n <= self.samples_per_case else rng.choice(values, self.samples_per_case, replace=False)
        self.samples.append(keep.astype(np.float32))

    def summary(self) -> dict:
        """The ``intensity`` entry of ``fingerprint.json`` (population std)."""
        p = np.percentile(np.concatenate(self.samples), PERCENTILES)
        return {"modality": self.modality, "mean": self.mean, "std": math.sqrt(self.m2 / self.count),
                "min": self.low, "max": self.high, "percentile_00_5": float(p[0]), "percentile_50_0": float(p[1]),
                "percentile_99_5": float(p[2])}


class FingerprintBuilder:
    """Accumulates ``fingerprint.json`` from (image, label) pairs given one at a time, in any order."""

    def __init__(self, task: Task, seed: int = 0):
        self.task = task
        self.seed = seed
        self.records: dict[int, dict] = {}
        self.intensity = [ForegroundIntensity(m) for m in task.modalities]

    def add(self, index: int, case: Case, image: Volume, label: Volume) -> None:
        """Record training case ``index``: image [X, Y, Z, C], label [X, Y, Z] (validated by ``msd``)."""
        # one comparison per class rather than np.bincount, which would copy the label map as int64
        counts = {k: int(np.count_nonzero(label.data == int(k))) for k in self.task.labels}
        self.records[index] = {
            "case": case.case, "image": case.image, "label": case.label,
            "shape": list(label.data.shape), "spacing": [round(s, 6) for s in image.spacing],
            "orientation": image.orientation, "class_voxels": counts,
        }
        foreground = label.data > 0
        # one stream per case, so the sample does not depend on the order cases arrive in
        rng = np.random.default_rng([self.seed, index])
        for c, stats in enumerate(self.intensity):
            stats.add(image.data[..., c][foreground], rng)

    def result(self) -> dict:
        """The fingerprint dict; raises DintsError when no training case has a foreground voxel."""
        if any(s.count == 0 for s in self.intensity):
            raise DintsError(self.task.dataset_json, "no training label has foreground voxels (value > 0)")
        cases = [self.records[i] for i in sorted(self.records)]
        totals = {k: sum(c["class_voxels"][k] for c in cases) for k in self.task.labels}
        voxels = sum(totals.values())
        return {
            "version": FORMAT_VERSION,
            "task_dir": str(self.task.task_dir.resolve()),
            "name": self.task.name,
            "modalities": self.task.modalities,
            "labels": self.task.labels,
            "num_cases": len(cases),
            "cases": cases,
            "intensity": [s.summary() for s in self.intensity],
            "class_frequency": {k: totals[k] / voxels for k in totals},
        }


def target_spacing(spacings: np.ndarray) -> tuple[list[float], int | None, str]:
    """nnU-Net's target spacing from per-case spacings [N, 3]: (spacing [3], anisotropic axis or None, rule).

    The per-axis median, except that when the coarsest median is more than 3× the finest, that axis takes the
    10th percentile instead (more slices kept), but never finer than the other axes' spacing.
    """
    median = np.median(spacings, axis=0)
    axis = int(np.argmax(median))
    if median[axis] <= ANISOTROPY_RATIO * median.min():
        return [round(float(s), 6) for s in median], None, "median"
    spacing = median.copy()
    others = np.delete(median, axis)
    spacing[axis] = max(float(np.percentile(spacings[:, axis], 10)), float(others.max()))
    rule = f"median; axis {axis} uses the 10th percentile (anisotropic > {ANISOTROPY_RATIO:g}x)"
    return [round(float(s), 6) for s in spacing], axis, rule


def patch_size(median_shape: list[float], divisor: int, max_side: int = MAX_PATCH_SIDE) -> list[int]:
    """Per axis: the median shape rounded up to a multiple of ``divisor``, capped at ``max_side`` (rounded down to
    a multiple of ``divisor``), and never below ``divisor``."""
    cap = max(divisor, max_side // divisor * divisor)
    return [max(divisor, min(cap, math.ceil(m / divisor) * divisor)) for m in median_shape]


def normalization(fingerprint: dict) -> list[dict]:
    """One entry per input channel: CT → ``ct`` (clip to foreground percentiles, dataset z-score), else
    ``zscore_nonzero`` (per image and channel, over non-zero voxels)."""
    out = []
    for stats in fingerprint["intensity"]:
        if stats["modality"].upper() == "CT":
            out.append({"modality": stats["modality"], "scheme": "ct",
                        "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                        "mean": stats["mean"], "std": stats["std"]})
        else:
            out.append({"modality": stats["modality"], "scheme": "zscore_nonzero"})
    return out


def check_overrides(overrides: dict, source: str) -> None:
    """Refuse a config ``plan:`` key that is not a plan field, or a malformed patch size, spacing, median shape or
    divisor."""
    unknown = [k for k in overrides if k not in PLAN_FIELDS]
    if unknown:
        raise DintsError(source, f"unknown plan field 'plan.{unknown[0]}'; plan fields: {', '.join(PLAN_FIELDS)}")
    for key in ("patch_size", "target_spacing", "median_shape"):
        value = overrides.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != 3
                                  or not all(isinstance(v, (int, float)) and v > 0 for v in value)):
            raise DintsError(source, f"'plan.{key}' must be a list of 3 positive numbers, got {value!r}")
    divisor = overrides.get("patch_divisor", 1)
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise DintsError(source, f"'plan.patch_divisor' must be a positive integer, got {divisor!r}")


def make_plan(fingerprint: dict, divisor: int, overrides: dict | None = None, source: str = "plan") -> dict:
    """``plan.json`` from a fingerprint. ``divisor`` = 2 ** (num_depths + use_downsample) of the network.

    ``overrides`` (a config's ``plan:`` section) replace computed fields; fields derived from an overridden one
    (median shape and patch from ``target_spacing``, patch from ``patch_divisor``) follow the override. An unknown
    field or a malformed patch size / spacing raises DintsError naming ``source``.
    """
    overrides = dict(overrides or {})
    check_overrides(overrides, source)
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]])
    spacing, axis, rule = target_spacing(spacings)
    plan = {
        "version": FORMAT_VERSION,
        "task_dir": fingerprint["task_dir"],
        "name": fingerprint["name"],
        "in_channels": len(fingerprint["modalities"]),
        "out_channels": len(fingerprint["labels"]),
        "class_names": list(fingerprint["labels"].values()),
        "labels": fingerprint["labels"],
        "modalities": fingerprint["modalities"],
        "orientation": TARGET_ORIENTATION,
        "target_spacing": spacing,
        "spacing_rule": rule,
        "anisotropic_axis": axis,
        "normalization": normalization(fingerprint),
    }
    plan.update({k: v for k, v in overrides.items() if k in plan})
    shapes = np.array([c["shape"] for c in fingerprint["cases"]], dtype=float)
    resampled = shapes * spacings / np.array(plan["target_spacing"], dtype=float)
    plan["median_shape"] = overrides.get("median_shape", [round(float(m), 2) for m in np.median(resampled, axis=0)])
    divisor = overrides.get("patch_divisor", divisor)
    patch = overrides.get("patch_size", patch_size(plan["median_shape"], divisor))
    if any(int(p) != p or p % divisor for p in patch):
        raise DintsError(source, f"'plan.patch_size' {patch} must be integers divisible by the network's "
                                 f"patch divisor {divisor}")
    plan["patch_size"] = [int(p) for p in patch]
    plan["patch_divisor"] = divisor
    plan["overrides"] = overrides
    return plan


def read_plan(work_dir: str | os.PathLike) -> dict:
    """Load ``WORK/plan.json`` written by ``dints3d prepare`` (DintsError if missing, malformed or too new)."""
    path = Path(work_dir) / PLAN_FILE
    plan = read_json(path)
    if not isinstance(plan, dict) or plan.get("version") != FORMAT_VERSION:
        raise DintsError(path, f"not a version-{FORMAT_VERSION} plan; rerun 'dints3d prepare'")
    return plan
