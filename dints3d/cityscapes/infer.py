"""``dints3d infer`` for a Cityscapes bundle: PNG images in, Cityscapes label-id PNGs out.

Inputs are checked before the bundle sees them (as :mod:`dints3d.bundle.input_checks` does for NIfTI): folders are searched
recursively for ``*.png`` (``leftImg8bit/val`` holds one folder per city); each file must be an 8-bit RGB PNG whose
chunks all verify, and two inputs must not share a ``city_sequence_frame`` name (their predictions would collide).
The good ones are segmented in one run of ``configs/inference.yaml``, which writes
``OUT/<city>_<sequence>_<frame>_pred_labelIds.png``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from dints3d.bundle.infer import segment
from dints3d.bundle.input_checks import InputKind, NetworkInput
from dints3d.bundle.runner import InferResult
from dints3d.cityscapes.folder import check_image, core_name, read_label_ids
from dints3d.cityscapes.transforms import PREDICTION_SUFFIX
from dints3d.utils.errors import DintsError


def image_problem(path: Path, network: NetworkInput) -> str | None:
    """``None`` if ``path`` is an RGB PNG the network can take (it must take 3 channels), else one sentence."""
    if network.channels != 3:
        return f"the network expects {network.channels} channel(s); Cityscapes images are RGB"
    try:
        check_image(path)
    except DintsError as e:
        return e.problem
    return None


def prediction_readable(path: Path) -> bool:
    """Whether ``path`` is a complete label-id PNG."""
    try:
        read_label_ids(path)
    except DintsError:
        return False
    return True


#: Cityscapes PNG images
PNG = InputKind(accepts=lambda name: name.lower().endswith(".png"), described="PNG images", one="a PNG image",
                recursive=True,
                name=core_name, check=image_problem, output=lambda out, name: out / f"{name}{PREDICTION_SUFFIX}",
                noun="image", what="prediction", readable=prediction_readable)


def infer_png(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
              sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1,
              env: Mapping[str, str] | None = None) -> InferResult:
    """Segment the PNG files and folders ``inputs`` into ``out/<core>_pred_labelIds.png`` with the bundle's
    ``configs/inference.yaml`` (one process)."""
    if nproc != 1:
        raise DintsError("--nproc", "a Cityscapes bundle infers in one process")
    return segment(bundle, inputs, out, PNG, ["inference.yaml"], sets, log, env=env)
