"""Checks on inference inputs before a bundle sees them, so one bad file costs one clear line, not the whole run.

A bundle's inference processes a list of NIfTI images in one MONAI workflow; an unreadable file, a 2-D image or an
image with the wrong number of channels would stop it half-way with a traceback. :func:`collect_inputs` expands the
user's files and folders (of any :class:`InputKind`) and :func:`check_image` reads each image completely (headers can be fine while the
compressed data is truncated), so only images the network can take are passed on.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from dints3d.evaluation.metrics import NIFTI_SUFFIXES, case_name


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


@dataclass(frozen=True)
class InputKind:
    """How a format's inference inputs are found, named and checked.

    Attributes:
        accepts: whether a file name is one of these inputs (e.g. ends with ``.nii.gz``).
        described: the inputs in an error message (``"NIfTI files (*.nii, *.nii.gz)"``), and one of them
            (``one``: ``"a NIfTI file (*.nii, *.nii.gz)"``).
        recursive: search folders recursively.
        name: the name a prediction is written under (two inputs with one name would collide).
        check: ``(path, network channels)`` → ``None`` if the network can take the input, else one sentence.
        output: ``(out folder, name)`` → the prediction file the bundle writes.
        noun: what one input is called (``"case"``).
        what: what the bundle writes per input (``"mask"``).
    """

    accepts: Callable[[str], bool]
    described: str
    one: str
    recursive: bool
    name: Callable[[Path], str]
    check: Callable[[Path, int], str | None]
    output: Callable[[Path, str], Path]
    noun: str
    what: str


#: NIfTI volumes (MSD bundles)
NIFTI = InputKind(accepts=lambda name: name.endswith(NIFTI_SUFFIXES), described="NIfTI files (*.nii, *.nii.gz)",
                  one="a NIfTI file (*.nii, *.nii.gz)",
                  recursive=False, name=case_name, check=check_image,
                  output=lambda out, name: out / f"{name}_seg.nii.gz", noun="case", what="mask")


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
                problems[entry] = f"folder holds no {kind.described}" + (" (searched recursively)"
                                                                          if kind.recursive else "")
            files += found
        elif not entry.exists():
            problems[entry] = "file not found"
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
