"""Reading and validating an MSD task folder: ``dataset.json`` and every image and label it references.

Every problem becomes a :class:`~dints3d.utils.errors.DintsError` naming the offending file, so ``dints3d prepare`` fails
with one clear line instead of a traceback deep inside a training run.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from dints3d.data.image_checks import affine_problem, spacing_of, voxel_problem
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json

REQUIRED_KEYS = ("name", "modality", "labels", "training")
#: largest allowed difference between an image's and its label's affine entries (mm)
AFFINE_TOLERANCE = 1e-3
#: values an error message lists at most
MAX_LISTED = 10


@dataclass(frozen=True)
class Case:
    """One entry of ``dataset.json``: paths relative to the task folder (POSIX, no leading ``./``)."""

    case: str  #: file name without ``.nii.gz`` / ``.nii``
    image: str
    label: str | None = None  #: None for test cases

    def entry(self) -> dict:
        """The decathlon-datalist form: ``{"image", ["label",] "case"}``."""
        out = {"image": self.image}
        if self.label is not None:
            out["label"] = self.label
        out["case"] = self.case
        return out


@dataclass(frozen=True)
class Task:
    """A validated ``dataset.json``. ``labels`` maps ``"0"``, ``"1"``, … (ascending) to class names."""

    task_dir: Path
    name: str
    modalities: list[str]
    labels: dict[str, str]
    training: list[Case]
    test: list[Case]

    @property
    def dataset_json(self) -> Path:
        return self.task_dir / "dataset.json"

    def path(self, relative: str) -> Path:
        """A path of ``dataset.json`` resolved against the task folder."""
        return self.task_dir / relative


@dataclass
class Volume:
    """A NIfTI volume. ``data`` is [X, Y, Z, C] for images (channels last, C ≥ 1) and integer [X, Y, Z] for
    labels, in the stored dtype (float when the header scales values)."""

    data: np.ndarray
    affine: np.ndarray  #: 4 × 4 voxel → world (RAS+ mm)

    @property
    def spacing(self) -> list[float]:
        """Voxel size in mm along the three array axes [3]."""
        return spacing_of(self.affine)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def case_id(path: str) -> str:
    """``imagesTr/spleen_2.nii.gz`` → ``spleen_2``."""
    name = posixpath.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _relative(value, where: Path, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DintsError(where, f"{what} must be a non-empty path string, got {value!r}")
    return posixpath.normpath(value.strip())


def _mapping(data: dict, key: str, where: Path) -> dict[str, str]:
    """``modality`` / ``labels``: a non-empty mapping with keys "0", "1", … (all present) to strings."""
    value = data[key]
    if not isinstance(value, dict) or not value:
        raise DintsError(where, f"'{key}' must be a non-empty mapping such as {{\"0\": ...}}")
    expected = [str(i) for i in range(len(value))]
    if sorted(value) != sorted(expected):
        raise DintsError(where, f"'{key}' keys must be \"0\" … \"{len(value) - 1}\", got {sorted(value)}")
    if not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise DintsError(where, f"'{key}' values must be non-empty strings")
    if key == "labels":
        seen: dict[str, str] = {}
        for k in expected:
            name = value[k].strip().lower()
            if name in seen:
                raise DintsError(where, f"'labels' names class {seen[name]} and class {k} both '{value[k]}'; give "
                                 "each class its own name (a merged class needs one label value)")
            seen[name] = k
    return {k: value[k] for k in expected}


def read_task(task_dir: str | Path) -> Task:
    """Read ``task_dir/dataset.json`` and check its structure and that every referenced file exists.

    File contents are checked by :func:`load_image` / :func:`load_label`.
    """
    task_dir = Path(task_dir)
    where = task_dir / "dataset.json"
    if not task_dir.is_dir():
        raise DintsError(task_dir, "task folder not found")
    data = read_json(where)
    if not isinstance(data, dict):
        raise DintsError(where, "must be a JSON object")
    if "channel_names" in data or "file_ending" in data:
        raise DintsError(where, "is an nnU-Net v2 dataset.json (channel_names, file_ending, one image file per channel "
                         "and labels as name → value); dints3d reads the Medical Segmentation Decathlon format "
                         "(modality, labels as value → name, a 'training' list of {image, label} with one 4D image "
                         "per case): use the task's MSD release, or write an MSD dataset.json and 4D images")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DintsError(where, f"missing required key(s): {', '.join(missing)}")
    modalities = list(_mapping(data, "modality", where).values())
    labels = _mapping(data, "labels", where)
    if not isinstance(data["training"], list) or not data["training"]:
        raise DintsError(where, "'training' must be a non-empty list of {\"image\", \"label\"} entries")
    training = []
    for i, item in enumerate(data["training"]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DintsError(where, f"training[{i}] must have 'image' and 'label', got {item!r}")
        image = _relative(item["image"], where, f"training[{i}].image")
        training.append(Case(case_id(image), image, _relative(item["label"], where, f"training[{i}].label")))
    if not isinstance(data.get("test", []), list):
        raise DintsError(where, "'test' must be a list of image paths")
    test = []
    for i, item in enumerate(data.get("test", [])):
        image = _relative(item.get("image") if isinstance(item, dict) else item, where, f"test[{i}]")
        test.append(Case(case_id(image), image))
    _check_unique(training + test, where)
    task = Task(task_dir, str(data["name"]), modalities, labels, training, test)
    for case in training + test:
        for rel in (case.image, case.label):
            if rel is not None and not task.path(rel).is_file():
                raise DintsError(task.path(rel), "file not found (referenced by dataset.json)")
    return task


def _check_unique(cases: list[Case], where: Path) -> None:
    """Refuse a case listed twice: the same file name (hence the same image path) once more, training or test."""
    seen: dict[str, str] = {}
    for c in cases:
        if c.case in seen:
            raise DintsError(where, f"duplicate case '{c.case}' ({seen[c.case]} and {c.image})")
        seen[c.case] = c.image


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array (stored dtype, or float after NIfTI scaling) and affine; a truncated or corrupt file, or an affine no
    stage can use (:func:`~dints3d.data.image_checks.affine_problem`) → DintsError."""
    try:
        img = nib.load(path)
        affine = img.affine
    except (ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ValueError) as e:
        raise DintsError(path, f"cannot read NIfTI (truncated or corrupt file?): {e}") from None
    problem = affine_problem(affine)
    if problem:
        raise DintsError(path, problem)
    try:
        data = np.asanyarray(img.dataobj)
    except (ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ValueError) as e:
        raise DintsError(path, f"cannot read NIfTI (truncated or corrupt file?): {e}") from None
    return data, affine


def load_image(path: Path, num_modalities: int) -> Volume:
    """An image [X, Y, Z, C] in its stored dtype (no float copy of integer CT): 3D needs one modality, 4D the
    declared count on the 4th axis; every voxel finite."""
    data, affine = _read(path)
    if data.ndim == 3 and num_modalities == 1:
        data = data[..., None]
    elif data.ndim != 4 or data.shape[3] != num_modalities:
        expected = "3D, or 4D with 1 modality" if num_modalities == 1 else f"4D with {num_modalities} modalities"
        raise DintsError(path, f"image has shape {list(data.shape)} ({data.ndim}D); expected {expected} "
                               f"on the 4th axis as declared in dataset.json")
    problem = voxel_problem(data, "image")
    if problem:
        raise DintsError(path, problem)
    channels = data.reshape(-1, data.shape[3])
    low, high = channels.min(axis=0), channels.max(axis=0)
    flat = [c for c in range(data.shape[3]) if low[c] == high[c]]
    if flat:
        which = "image" if data.shape[3] == 1 else f"channel {flat[0]} of the image"
        raise DintsError(path, f"{which} is constant (every voxel is {low[flat[0]].item():g}): it holds no intensity "
                               "information (an empty or blanked export?)")
    return Volume(data, affine)


def load_label(path: Path, labels: dict[str, str], image: Volume) -> Volume:
    """A label map as integer [X, Y, Z] on the image's grid, with values among the declared ``labels``."""
    data, affine = _read(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape != image.data.shape[:3]:
        raise DintsError(path, f"label shape {list(data.shape)} differs from the image's spatial shape "
                               f"{list(image.data.shape[:3])}")
    difference = float(np.abs(affine - image.affine).max())
    if difference > AFFINE_TOLERANCE:
        raise DintsError(path, f"label affine differs from the image's by up to {difference:.4g} mm "
                               f"(tolerance {AFFINE_TOLERANCE}); label and image must share one voxel grid")
    _check_real(path, data, "label")
    integer = np.issubdtype(data.dtype, np.integer)
    if not integer:
        # checked before any cast: NaN/Inf (or 1e30) cast to int64 gives garbage values and a RuntimeWarning
        if not np.isfinite(data).all():
            raise DintsError(path, "label contains NaN/Inf")
        if not np.array_equal(data, np.round(data)):
            raise DintsError(path, "label contains non-integer values")
    if data.min() < 0 or data.max() >= len(labels):
        unknown = [int(v) for v in np.unique(data) if not 0 <= v < len(labels)]
        shown = ", ".join(map(str, unknown[:MAX_LISTED]))
        more = f", … ({len(unknown)} undeclared values in all; is this an image rather than a label map?)" \
            if len(unknown) > MAX_LISTED else ""
        raise DintsError(path, f"label value(s) [{shown}{more}] not declared in dataset.json labels "
                               f"(0–{len(labels) - 1})")
    return Volume(data if integer else data.astype(np.int64), affine)


def _check_real(path: Path, data: np.ndarray, what: str) -> None:
    """Refuse complex voxels (NIfTI can store them) and non-numeric ones (e.g. RGB): both would be silently cut
    down to real numbers, or fail deep inside a transform."""
    if np.iscomplexobj(data):
        raise DintsError(path, f"{what} is complex-valued ({data.dtype}); expected real voxel values")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise DintsError(path, f"{what} has voxels of type {data.dtype}; expected integer or floating-point values")
