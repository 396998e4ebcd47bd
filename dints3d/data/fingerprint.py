"""Dataset fingerprint (what the data looks like) and plan (how to process it), nnU-Net style.

The fingerprint is built one case at a time: exact streaming moments for mean/std/min/max, and percentiles from a
bounded seeded sample of foreground voxels per case, so memory does not grow with the dataset's voxel count.
The plan applies nnU-Net's rules to the fingerprint; see ``docs/data.md`` for every field.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dints3d.config import suggest_key
from dints3d.data.image_checks import resampled_problem
from dints3d.data.msd import Case, Task, Volume
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

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


def normalization(fingerprint: dict, modalities: list[str] | None = None) -> list[dict]:
    """One entry per input channel: CT → ``ct`` (clip to foreground percentiles, dataset z-score), else
    ``zscore_nonzero`` (per image and channel, over non-zero voxels). ``modalities`` renames the channels (a
    ``plan.modalities`` override), else the fingerprint's names are used."""
    out = []
    for c, stats in enumerate(fingerprint["intensity"]):
        modality = stats["modality"] if modalities is None else modalities[c]
        if modality.upper() == "CT":
            out.append({"modality": modality, "scheme": "ct",
                        "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                        "mean": stats["mean"], "std": stats["std"]})
        else:
            out.append({"modality": modality, "scheme": "zscore_nonzero"})
    return out


# ---- plan overrides: every field a config's ``plan:`` section sets is checked before anything is written ----

def where(source: str | Mapping[str, str], key: str) -> str:
    """The config file (or ``--set``) that set plan field ``key``."""
    return source if isinstance(source, str) else source.get(key, "plan")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _names(value: Any, least: int) -> bool:
    return isinstance(value, list) and len(value) >= least and all(_name(v) for v in value)


def _labels(value: Any) -> bool:
    """``{"0": name, "1": name, …}``; YAML's unquoted ``0: background`` (int keys) is accepted too."""
    return (isinstance(value, dict) and len(value) >= 2 and all(isinstance(k, (str, int)) for k in value)
            and not any(isinstance(k, bool) for k in value)
            and {str(k) for k in value} == {str(i) for i in range(len(value))} and all(map(_name, value.values())))


def _orientation(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 3
            and all(sum(c in pair for c in value) == 1 for pair in ("LR", "AP", "SI")))


def _sizes(value: Any, dims: int, integers: bool) -> bool:
    ok = _integer if integers else _finite
    return isinstance(value, list) and len(value) == dims and all(ok(v) and v > 0 for v in value)


#: plan field → (is the value well-formed, for ``dims`` spatial axes; what it must be)
FIELD_RULES: dict[str, tuple[Callable[[Any, int], bool], str]] = {
    "name": (lambda v, d: _name(v), "must be a non-empty string"),
    "in_channels": (lambda v, d: _integer(v) and v >= 1, "must be a positive integer"),
    "out_channels": (lambda v, d: _integer(v) and v >= 2, "must be an integer ≥ 2 (background and ≥ 1 class)"),
    "class_names": (lambda v, d: _names(v, 2), "must be a list of ≥ 2 non-empty names, background first"),
    "labels": (lambda v, d: _labels(v), 'must map "0", "1", … (≥ 2 labels, none missing) to non-empty names'),
    "modalities": (lambda v, d: _names(v, 1), "must be a list of non-empty modality names, one per channel"),
    "orientation": (lambda v, d: _orientation(v), 'must be 3 axis letters, one of L/R, A/P, S/I each, e.g. "RAS"'),
    "target_spacing": (lambda v, d: _sizes(v, d, integers=False), "must be a list of {dims} positive numbers"),
    "spacing_rule": (lambda v, d: isinstance(v, str), "must be a string"),
    "anisotropic_axis": (lambda v, d: v is None or (_integer(v) and 0 <= v < d), "must be null or 0 … {last}"),
    "median_shape": (lambda v, d: _sizes(v, d, integers=False), "must be a list of {dims} positive numbers"),
    "patch_size": (lambda v, d: _sizes(v, d, integers=True), "must be a list of {dims} positive integers"),
    "patch_divisor": (lambda v, d: _integer(v) and v >= 1, "must be a positive integer"),
    "image_scale": (lambda v, d: _finite(v) and 0 < v <= 4, "must be a number in (0, 4]"),  # Cityscapes plans
}
NORMALIZATION_SCHEMES = ("ct", "zscore_nonzero")
_NORMALIZATION_KEYS = ("modality", "scheme", "clip", "mean", "std")


def _normalization_problem(value: Any) -> tuple[str, str] | None:
    """(sub-key, problem) for a malformed ``normalization`` list, or None."""
    if not isinstance(value, list) or not value:
        return "", f'must be a list of {{"modality", "scheme"}} entries, one per channel, got {_show(value)}'
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not _name(entry.get("modality")):
            return f"[{i}]", f'must be a mapping with a "modality" name and a "scheme", got {_show(entry)}'
        unknown = [k for k in entry if k not in _NORMALIZATION_KEYS]
        if unknown:
            return f"[{i}]", f"has unknown key '{unknown[0]}'{suggest_key(str(unknown[0]), _NORMALIZATION_KEYS)}"
        scheme = entry.get("scheme")
        if scheme not in NORMALIZATION_SCHEMES:
            return f"[{i}].scheme", f"must be 'ct' or 'zscore_nonzero', got {_show(scheme)}"
        if scheme == "ct":
            clip, std = entry.get("clip"), entry.get("std")
            if not (isinstance(clip, list) and len(clip) == 2 and all(map(_finite, clip)) and clip[0] < clip[1]):
                return f"[{i}].clip", f"must be [low, high] with low < high, got {_show(clip)}"
            if not _finite(entry.get("mean")):
                return f"[{i}].mean", f"must be a finite number, got {_show(entry.get('mean'))}"
            if not (_finite(std) and std > 0):
                return f"[{i}].std", f"must be a positive number, got {_show(std)}"
    return None


def check_overrides(overrides: Any, source: str | Mapping[str, str], fields: tuple[str, ...] = PLAN_FIELDS,
                    dims: int = 3) -> None:
    """Refuse a config ``plan:`` section with a key that is not one of ``fields`` (naming the nearest field) or a
    value of the wrong type or range. Needs no data, so ``prepare`` runs it before reading any case."""
    if not isinstance(overrides, dict):
        raise DintsError(where(source, ""), f"'plan' must be a mapping of plan fields, got {_show(overrides)}")
    for key, value in overrides.items():
        if key not in fields:
            raise DintsError(where(source, str(key)),
                             f"unknown plan field 'plan.{key}'{suggest_key(str(key), fields, 'plan.')}")
        if key == "normalization":
            problem = _normalization_problem(value)
            if problem:
                raise DintsError(where(source, key), f"'plan.normalization{problem[0]}' {problem[1]}")
            continue
        ok, rule = FIELD_RULES[key]
        if not ok(value, dims):
            raise DintsError(where(source, key),
                             f"'plan.{key}' {rule.format(dims=dims, last=dims - 1)}, got {_show(value)}")


def apply_overrides(plan: dict, overrides: Mapping[str, Any], source: str | Mapping[str, str], channels: int,
                    classes: int) -> dict:
    """Set the overridden fields of an MSD ``plan`` (in place; also returned) and make the ones tied to them follow:
    ``labels`` ↔ ``class_names``. Then refuse an override that disagrees with the data (``channels`` image
    channels, ``classes`` declared labels) or with another field. Types are checked by :func:`check_overrides`."""
    plan.update({k: v for k, v in overrides.items() if k in plan})
    if "labels" in overrides:
        names = {str(k): v for k, v in overrides["labels"].items()}
        plan["labels"] = {str(i): names[str(i)] for i in range(len(names))}
        if "class_names" not in overrides:
            plan["class_names"] = list(plan["labels"].values())
    elif "class_names" in overrides:
        plan["labels"] = {str(i): n for i, n in enumerate(overrides["class_names"])}

    def fail(key: str, problem: str) -> None:
        raise DintsError(where(source, key), f"'plan.{key}' {problem}")

    declared = f"the task declares {classes} labels ({', '.join(map(str, plan['class_names'][:classes]))})"
    for key, value in overrides.items():
        if key == "in_channels" and value != channels:
            fail(key, f"is {value} but the images have {channels} channel(s)")
        elif key in ("modalities", "normalization") and len(value) != channels:
            fail(key, f"has {len(value)} entries but the images have {channels} channel(s)")
        elif key == "out_channels" and value != classes:
            fail(key, f"is {value} but {declared}")
        elif key in ("class_names", "labels") and len(value) != classes:
            fail(key, f"has {len(value)} names but the task declares {classes} labels (0–{classes - 1})")
    if "class_names" in overrides and "labels" in overrides and list(plan["labels"].values()) != plan["class_names"]:
        fail("class_names", "disagrees with plan.labels; set one of the two (the other follows)")
    named = [entry["modality"] for entry in plan["normalization"]]
    if named != plan["modalities"]:
        if "normalization" in overrides:
            fail("normalization", f"is for modalities {named} but plan.modalities is {plan['modalities']}")
        fail("modalities", f"is {plan['modalities']} but the plan's normalization is for {named}; set it when "
                           "running dints3d prepare, so that the normalization follows")
    return plan


def check_patch(overrides: Mapping[str, Any], divisor: int, source: str | Mapping[str, str]) -> None:
    """An overridden patch size must divide by the divisor (the network's, or an overridden ``patch_divisor``)."""
    patch = overrides.get("patch_size")
    divisor = overrides.get("patch_divisor", divisor)
    if patch is not None and any(p % divisor for p in patch):
        raise DintsError(where(source, "patch_size"), f"'plan.patch_size' {patch} must be integers divisible by "
                                                      f"the network's patch divisor {divisor}")


def check_overrides_for_task(overrides: dict, source: str | Mapping[str, str], modalities: list[str],
                             labels: dict[str, str], divisor: int) -> None:
    """Every check of :func:`make_plan` that needs no image: types and ranges, agreement with ``dataset.json``'s
    ``modalities`` and ``labels``, patch divisibility. ``prepare`` runs it before reading any case."""
    check_overrides(overrides, source)
    renamed = overrides.get("modalities")
    names = renamed if renamed is not None and len(renamed) == len(modalities) else modalities
    outline = {"in_channels": len(modalities), "out_channels": len(labels), "class_names": list(labels.values()),
               "labels": dict(labels), "modalities": list(modalities),
               "normalization": [{"modality": m} for m in names]}  # names only: what the checks compare
    apply_overrides(outline, overrides, source, len(modalities), len(labels))
    check_patch(overrides, divisor, source)


def make_plan(fingerprint: dict, divisor: int, overrides: dict | None = None,
              source: str | Mapping[str, str] = "plan") -> dict:
    """``plan.json`` from a fingerprint. ``divisor`` = 2 ** (num_depths + use_downsample) of the network.

    ``overrides`` (a config's ``plan:`` section) replace computed fields; fields derived from an overridden one
    follow the override (median shape and patch from ``target_spacing``, patch from ``patch_divisor``,
    normalization from ``modalities``, ``labels`` ↔ ``class_names``). An unknown field, a malformed value or one
    that disagrees with the data raises DintsError naming ``source`` (one file, or the file of each key).
    """
    overrides = dict(overrides or {})
    check_overrides(overrides, source)
    channels, classes = len(fingerprint["modalities"]), len(fingerprint["labels"])
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]])
    spacing, axis, rule = target_spacing(spacings)
    plan = {
        "version": FORMAT_VERSION,
        "task_dir": fingerprint["task_dir"],
        "name": fingerprint["name"],
        "in_channels": channels,
        "out_channels": classes,
        "class_names": list(fingerprint["labels"].values()),
        "labels": fingerprint["labels"],
        "modalities": fingerprint["modalities"],
        "orientation": TARGET_ORIENTATION,
        "target_spacing": spacing,
        "spacing_rule": rule,
        "anisotropic_axis": axis,
        "normalization": normalization(fingerprint),
    }
    modalities = overrides.get("modalities")
    if modalities is not None and "normalization" not in overrides and len(modalities) == channels:
        plan["normalization"] = normalization(fingerprint, modalities)
    apply_overrides(plan, overrides, source, channels, classes)
    shapes = np.array([c["shape"] for c in fingerprint["cases"]], dtype=float)
    resampled = shapes * spacings / np.array(plan["target_spacing"], dtype=float)
    median = np.median(resampled, axis=0)
    if "median_shape" not in overrides and not (np.isfinite(median).all() and median.min() >= 1):
        raise DintsError(where(source, "target_spacing"), f"'plan.target_spacing' {plan['target_spacing']} gives "
                         f"a median resampled shape of {[float(f'{m:.3g}') for m in median]} voxels; every axis needs a "
                         "finite size of at least 1 voxel")
    _check_resampled_sizes(fingerprint, shapes, spacings, plan["target_spacing"], source, "target_spacing" in overrides)
    _check_intensity_range(fingerprint, plan["normalization"], "normalization" in overrides)
    plan["median_shape"] = overrides.get("median_shape", [round(float(m), 2) for m in median])
    divisor = overrides.get("patch_divisor", divisor)
    check_patch(overrides, divisor, source)
    patch = overrides.get("patch_size", patch_size(plan["median_shape"], divisor))
    plan["patch_size"] = [int(p) for p in patch]
    plan["patch_divisor"] = divisor
    plan["overrides"] = overrides
    return plan


def _check_resampled_sizes(fingerprint: dict, shapes: np.ndarray, spacings: np.ndarray, target: list[float],
                           source: str | Mapping[str, str], overridden: bool) -> None:
    """Refuse a case that, resampled to the target spacing, would be too large to hold (a spacing off by orders of
    magnitude in one header), before any stage tries to allocate it; when even the median case would be, the target
    spacing (an override) is at fault."""
    problems = [resampled_problem(shape, spacing, target) for shape, spacing in zip(shapes, spacings)]
    if not any(problems):
        return
    median_case = int(np.argsort([float(np.prod(s * sp)) for s, sp in zip(shapes, spacings)])[len(shapes) // 2])
    if problems[median_case] and overridden:
        raise DintsError(where(source, "target_spacing"), f"'plan.target_spacing' {target}: a median case, "
                         f"{problems[median_case]}")
    index = next(i for i, p in enumerate(problems) if p)
    case = fingerprint["cases"][index]
    median = [round(float(m), 4) for m in np.median(spacings, axis=0)]
    raise DintsError(Path(fingerprint["task_dir"]) / case["image"], f"{problems[index]} (the median case's spacing is "
                     f"{median} mm)")


def _check_intensity_range(fingerprint: dict, normalization: list[dict], overridden: bool) -> None:
    """Refuse a CT normalization whose clipping range is empty: every training case's foreground has one value."""
    if overridden:
        return  # checked by check_overrides
    for entry in normalization:
        if entry["scheme"] == "ct" and not (entry["clip"][0] < entry["clip"][1] and entry["std"] > 0):
            low, high = entry["clip"]
            raise DintsError(Path(fingerprint["task_dir"]) / "dataset.json", f"the foreground voxels of modality "
                             f"{entry['modality']} are (almost) all one value: their 0.5–99.5 percentile range is "
                             f"[{low:g}, {high:g}], std {entry['std']:g}, so there is no intensity range to normalize "
                             "(check the images, or set plan.normalization)")


def read_plan(work_dir: str | os.PathLike) -> dict:
    """Load ``WORK/plan.json`` written by ``dints3d prepare`` (DintsError if missing, malformed or too new)."""
    path = Path(work_dir) / PLAN_FILE
    plan = read_json(path)
    if not isinstance(plan, dict) or plan.get("version") != FORMAT_VERSION:
        raise DintsError(path, f"not a version-{FORMAT_VERSION} plan; rerun 'dints3d prepare'")
    return plan
