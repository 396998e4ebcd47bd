"""A Cityscapes folder: ``leftImg8bit/<split>/<city>/<core>_leftImg8bit.png`` (RGB) and
``gtFine/<split>/<city>/<core>_gtFine_labelIds.png`` (label ids, 8 bit) for the splits ``train``, ``val`` and
``test`` (test labels are dummies and are not read). Reading and checking images and labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dints3d.cityscapes.labels import known_label_ids
from dints3d.utils.errors import DintsError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
SPLITS = ("train", "val", "test")


def core_name(path: str | os.PathLike) -> str:
    """``aachen_000000_000019_leftImg8bit.png`` → ``aachen_000000_000019`` (city, sequence, frame)."""
    return "_".join(Path(path).name.split("_")[:3])


def is_cityscapes(folder: str | os.PathLike) -> bool:
    """True if ``folder`` has the Cityscapes layout (``leftImg8bit/`` next to ``gtFine/``)."""
    folder = Path(folder)
    return (folder / "leftImg8bit").is_dir() and (folder / "gtFine").is_dir()


@dataclass(frozen=True)
class Sample:
    """One image; paths relative to the Cityscapes folder (``label`` None for test images)."""

    case: str
    split: str
    image: str
    label: str | None

    def entry(self) -> dict:
        out = {"image": self.image, "case": self.case, "split": self.split}
        if self.label is not None:
            out["label"] = self.label
        return out


def read_folder(root: str | os.PathLike) -> dict[str, list[Sample]]:
    """Split → its images (sorted by file name). Train and val must be non-empty and every train/val image needs its
    ``labelIds`` file; file names must follow ``<city>_<sequence>_<frame>_leftImg8bit.png``."""
    root = Path(root)
    if not is_cityscapes(root):
        raise DintsError(root, "not a Cityscapes folder (needs leftImg8bit/ and gtFine/)")
    out: dict[str, list[Sample]] = {}
    seen: dict[str, Path] = {}
    for split in SPLITS:
        samples = []
        for image in sorted((root / "leftImg8bit" / split).glob(f"*/*{IMAGE_SUFFIX}")):
            parts = image.name[: -len(IMAGE_SUFFIX)].split("_")
            if len(parts) != 3 or parts[0] != image.parent.name:
                raise DintsError(image, f"not a Cityscapes file name (expected {image.parent.name}_<sequence>_<frame>"
                                 f"{IMAGE_SUFFIX})")
            core = "_".join(parts)
            if core in seen:
                raise DintsError(image, f"image '{core}' also appears as {seen[core]}")
            seen[core] = image
            label = None
            if split != "test":
                label_path = root / "gtFine" / split / image.parent.name / f"{core}{LABEL_SUFFIX}"
                if not label_path.is_file():
                    raise DintsError(image, f"has no label file {label_path}")
                label = label_path.relative_to(root).as_posix()
            samples.append(Sample(core, split, image.relative_to(root).as_posix(), label))
        out[split] = samples
    for split in ("train", "val"):
        if not out[split]:
            raise DintsError(root / "leftImg8bit" / split, f"no {split} images (<city>/*{IMAGE_SUFFIX})")
    return out


def check_image(path: Path) -> tuple[int, int]:
    """(height, width) of an 8-bit RGB PNG, checked without decoding the pixels (PIL's ``verify`` reads every chunk
    and its checksum, so truncated files are caught); DintsError otherwise."""
    from PIL import Image  # pillow: optional (the cityscapes extra)

    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            image.verify()
    except (OSError, SyntaxError, ValueError) as e:
        raise DintsError(path, f"cannot read image: {e}") from None
    if mode != "RGB":
        raise DintsError(path, f"must be an 8-bit RGB image, got mode {mode}")
    return height, width


def read_label_ids(path: Path) -> np.ndarray:
    """Label ids [H, W] int64; DintsError for an unreadable file, several channels or an id not in the table."""
    from PIL import Image  # pillow: optional (the cityscapes extra)

    try:
        with Image.open(path) as image:
            data = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise DintsError(path, f"cannot read label image: {e}") from None
    if data.ndim != 2:
        raise DintsError(path, f"a label image must have one channel, got shape {list(data.shape)}")
    values = np.unique(data)
    unknown = sorted(set(int(v) for v in values) - known_label_ids())
    if unknown:
        raise DintsError(path, f"label ids {unknown[:5]} are not in cityscapesscripts' label table")
    return data.astype(np.int64)
