"""Checks on inference inputs before a bundle sees them, so one bad file costs one clear line, not the whole run.

A bundle's inference processes a list of NIfTI images in one MONAI workflow; an unreadable file, a 2-D image or an
image with the wrong number of channels would stop it half-way with a traceback. :func:`collect_inputs` expands the
user's files and folders and :func:`check_image` reads each image completely (headers can be fine while the
compressed data is truncated), so only images the network can take are passed on.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from dints3d.evaluate import NIFTI_SUFFIXES, case_name


def collect_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], dict[Path, str]]:
    """Files named directly and the NIfTI files of folders named (sorted, hidden files skipped).

    Returns the candidates and a problem per input that names nothing usable (missing path, not NIfTI, empty
    folder, or a second file with the same case name, whose mask ``<case>_seg.nii.gz`` would overwrite the first
    one's)."""
    files: list[Path] = []
    problems: dict[Path, str] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                problems[entry] = "folder holds no NIfTI files (*.nii, *.nii.gz)"
            files += found
        elif not entry.exists():
            problems[entry] = "file not found"
        elif not entry.name.endswith(NIFTI_SUFFIXES):
            problems[entry] = "not a NIfTI file (*.nii, *.nii.gz)"
        else:
            files.append(entry)
    seen: dict[str, Path] = {}
    unique = []
    for path in files:
        name = case_name(path)
        if name in seen:
            problems[path] = f"same case name '{name}' as {seen[name]}; its mask would overwrite that one's"
        else:
            seen[name] = path
            unique.append(path)
    return unique, problems


def check_image(path: Path, num_channels: int) -> str | None:
    """``None`` if ``path`` is a readable 3-D image with ``num_channels`` channels (4-D, channels last, when more
    than one), else one sentence saying what is wrong."""
    try:
        image = nib.load(path)
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
    try:
        np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        return f"unreadable: image data is truncated or corrupt ({type(e).__name__}: {e})"
    return None
