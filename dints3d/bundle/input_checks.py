"""Checks on inference inputs before a bundle sees them, so one bad file costs one clear line, not the whole run.

A bundle's inference processes a list of NIfTI images in one MONAI workflow; an unreadable file, a 2-D image or an
image with the wrong number of channels would stop it half-way with a traceback. :func:`collect_inputs` expands the
user's files and folders (of any :class:`InputKind`) and :func:`check_image` reads each image completely (headers can be fine while the
compressed data is truncated), so only images the network can take are passed on. The geometry and voxel checks are
``prepare``'s own (:mod:`dints3d.data.image_checks`): an image ``prepare`` would refuse (NaN voxels, a zero or NaN in
the affine, a spacing that would resample to an absurd size) is not segmented either.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from dints3d.data.image_checks import (
    affine_problem,
    resampled_problem,
    spacing_of,
    voxel_problem,
)
from dints3d.evaluation.metrics import NIFTI_SUFFIXES, case_name


@dataclass(frozen=True)
class NetworkInput:
    """What a bundle's network takes: ``channels``, and the spacing (mm) its inference resamples to, where it has
    one (MSD bundles: ``target_spacing`` of ``inference.yaml``)."""

    channels: int
    target_spacing: tuple[float, ...] | None = None


def check_image(path: Path, network: NetworkInput) -> str | None:
    """``None`` if ``path`` is a readable 3-D image with ``network.channels`` channels (4-D, channels last, when more
    than one), a usable affine, finite voxels and a size the resampling can hold; else one sentence saying what is
    wrong."""
    num_channels = network.channels
    try:
        image = nib.load(path)
        affine = image.affine
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for non-NIfTI or damaged headers
        return f"unreadable: not a valid NIfTI image ({type(e).__name__}: {e})"
    shape = tuple(int(s) for s in image.shape)
    if len(shape) == 3:
        channels = 1
    elif len(shape) == 4:
        channels = shape[3]
    else:
        return (f"wrong dimensionality: shape {list(shape)} is {len(shape)}-D; the network needs a 3-D image "
                "(4-D with channels last for several channels)")
    if channels != num_channels:
        return f"wrong channel count: {channels} channel(s) (shape {list(shape)}), the network expects {num_channels}"
    problem = affine_problem(affine)
    if problem is None and network.target_spacing is not None:
        problem = resampled_problem(shape[:3], spacing_of(affine), network.target_spacing)
    if problem is not None:
        return problem
    try:
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        return f"unreadable: image data is truncated or corrupt ({type(e).__name__}: {e})"
    return voxel_problem(data)


def nifti_readable(path: Path) -> bool:
    """Whether ``path`` is a complete NIfTI file (header and every voxel decompress)."""
    try:
        np.asanyarray(nib.load(path).dataobj)
    except Exception:  # noqa: BLE001 - nibabel raises many types for damaged files
        return False
    return True


@dataclass(frozen=True)
class InputKind:
    """How a format's inference inputs are found, named and checked.

    Attributes:
        accepts: whether a file name is one of these inputs (e.g. ends with ``.nii.gz``).
        described: the inputs in an error message (``"NIfTI files (*.nii, *.nii.gz)"``), and one of them
            (``one``: ``"a NIfTI file (*.nii, *.nii.gz)"``).
        recursive: search folders recursively.
        name: the name a prediction is written under (two inputs with one name would collide).
        check: ``(path, the network's input)`` → ``None`` if the network can take the input, else one sentence.
        output: ``(out folder, name)`` → the prediction file the bundle writes.
        readable: whether a file the bundle wrote is complete (only complete files are moved into place).
        noun: what one input is called (``"case"``).
        what: what the bundle writes per input (``"mask"``).
    """

    accepts: Callable[[str], bool]
    described: str
    one: str
    recursive: bool
    name: Callable[[Path], str]
    check: Callable[[Path, NetworkInput], str | None]
    output: Callable[[Path, str], Path]
    noun: str
    what: str
    readable: Callable[[Path], bool]


#: NIfTI volumes (MSD bundles)
NIFTI = InputKind(accepts=lambda name: name.endswith(NIFTI_SUFFIXES), described="NIfTI files (*.nii, *.nii.gz)",
                  one="a NIfTI file (*.nii, *.nii.gz)",
                  recursive=False, name=case_name, check=check_image,
                  output=lambda out, name: out / f"{name}_seg.nii.gz", noun="case", what="mask",
                  readable=nifti_readable)


def collect_inputs(inputs: list[str | os.PathLike], kind: InputKind = NIFTI) -> tuple[list[Path], dict[Path, str]]:
    """Files named directly and the files of ``kind`` in folders named (sorted, hidden files skipped).

    Returns the candidates and a problem per input that names nothing usable (missing path, another kind of file,
    empty folder, or a second file with the same name, whose prediction would overwrite the first one's)."""
    files: list[Path] = []
    problems: dict[Path, str] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            candidates = entry.rglob("*") if kind.recursive else entry.iterdir()
            found = sorted(p for p in candidates if p.is_file() and not p.name.startswith(".")
                           and kind.accepts(p.name))
            if not found:
                problems[entry] = f"no {kind.described} in this folder" + (" (searched recursively)"
                                                                           if kind.recursive else "")
            files += found
        elif not entry.exists():
            pattern = any(c in str(entry) for c in "*?[")
            problems[entry] = "file not found" + (" (a pattern no shell expanded: give the folder, or unquoted "
                                                  "file names)" if pattern else "")
        elif not kind.accepts(entry.name):
            problems[entry] = f"not {kind.one}"
        else:
            files.append(entry)
    seen: dict[str, Path] = {}
    unique = []
    for path in files:
        name = kind.name(path)
        if name in seen:
            problems[path] = f"same {kind.noun} name '{name}' as {seen[name]}; its {kind.what} would overwrite that one's"
        else:
            seen[name] = path
            unique.append(path)
    return unique, problems
