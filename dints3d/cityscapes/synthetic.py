"""``dints3d synth --format cityscapes``: a tiny street-scene folder in the Cityscapes layout.

Each image (height ``size``, width ``2·size``, like Cityscapes' 1024 × 2048) is a road scene drawn with Cityscapes
label ids: sky above a horizon, buildings with window grids, vegetation and terrain, a road in perspective with
lane marks, sidewalks, poles carrying traffic signs or lights, cars and persons (with instance ids), and void
regions that evaluation ignores (an ego-vehicle hood, "static" clutter, a rectification border). Every class has a
dataset-wide colour and its own texture (stripes, grids, speckle), jittered per image under a global illumination
change and noise, so the classes are learnable but not trivially separable by colour alone.

Written files (``core`` = ``<city>_<seq:06d>_000019``)::

    leftImg8bit/{train,val,test}/<city>/<core>_leftImg8bit.png   RGB, 8 bit
    gtFine/{train,val}/<city>/<core>_gtFine_labelIds.png          label ids, 8 bit
    gtFine/{train,val}/<city>/<core>_gtFine_instanceIds.png       id·1000 + k for cars and persons, else the id, 16 bit

``cases`` labelled images are split 3 : 1 into train and val (at least one val image); ``test_cases`` unlabelled
images go to ``test``. Output is a pure function of the arguments (``seed`` included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_stream

#: Cityscapes label ids drawn here (cityscapesscripts' ``labels`` table)
UNLABELED, EGO_VEHICLE, RECTIFICATION_BORDER, STATIC = 0, 1, 2, 4
ROAD, SIDEWALK, BUILDING, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 7, 8, 11, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, CAR = 21, 22, 23, 24, 26
#: label ids whose pixels carry instance ids (id·1000 + k) in ``instanceIds``
INSTANCE_CLASSES = (PERSON, CAR)
#: base colour per drawn label id (RGB), fixed for the dataset
COLOURS = {
    UNLABELED: (20, 20, 20), EGO_VEHICLE: (35, 30, 40), RECTIFICATION_BORDER: (0, 0, 0), STATIC: (150, 110, 60),
    ROAD: (120, 70, 125), SIDEWALK: (225, 60, 210), BUILDING: (85, 85, 80), FENCE: (180, 150, 140),
    POLE: (160, 160, 165), TRAFFIC_LIGHT: (235, 160, 40), TRAFFIC_SIGN: (215, 215, 20), VEGETATION: (95, 140, 45),
    TERRAIN: (160, 230, 150), SKY: (90, 140, 200), PERSON: (215, 30, 70), CAR: (20, 25, 150),
}
TRAIN_CITIES, VAL_CITIES, TEST_CITIES = ("aachen", "bochum"), ("frankfurt",), ("berlin",)
FRAME = 19  # Cityscapes' annotated frame of each snippet


def core_name(city: str, sequence: int) -> str:
    """``aachen_000003_000019``: the part of every file name of one image."""
    return f"{city}_{sequence:06d}_{FRAME:06d}"


class _Canvas:
    """Label ids [H, W] uint8 and instance ids [H, W] int32 painted in order (later shapes cover earlier ones)."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.label = np.full((height, width), UNLABELED, np.uint8)
        self.instance = np.zeros((height, width), np.int32)
        self.counts: dict[int, int] = {}

    def paint(self, mask: np.ndarray, label_id: int) -> None:
        self.label[mask] = label_id
        if label_id in INSTANCE_CLASSES:
            k = self.counts.get(label_id, 0)
            self.counts[label_id] = k + 1
            self.instance[mask] = label_id * 1000 + k
        else:
            self.instance[mask] = label_id

    def rect(self, top: float, bottom: float, left: float, right: float) -> np.ndarray:
        return (self.yy >= top) & (self.yy < bottom) & (self.xx >= left) & (self.xx < right)

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 < 1.0


def _draw_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Label ids and instance ids [H, W] of one street scene."""
    c = _Canvas(height, width)
    horizon = height * rng.uniform(0.35, 0.48)
    c.paint(c.yy < horizon, SKY)
    c.paint(c.yy >= horizon, TERRAIN)
    # buildings: blocks rising from the horizon on both sides, leaving a gap of sky in the middle
    for side in (0, 1):
        x = 0.0 if side == 0 else width * rng.uniform(0.62, 0.72)
        end = width * rng.uniform(0.3, 0.4) if side == 0 else float(width)
        while x < end:
            w = width * rng.uniform(0.06, 0.14)
            top = horizon - height * rng.uniform(0.12, 0.35)
            c.paint(c.rect(top, horizon + 1, x, min(x + w, end)), BUILDING)
            x += w
    for _ in range(rng.integers(2, 5)):  # trees in front of the buildings
        cx = width * rng.uniform(0.05, 0.95)
        c.paint(c.ellipse(horizon - height * 0.04, cx, height * rng.uniform(0.06, 0.12),
                          width * rng.uniform(0.03, 0.06)), VEGETATION)
    # road in perspective: a trapezoid from a vanishing point to the bottom edge, sidewalks along both sides
    vanish = width * rng.uniform(0.42, 0.58)
    depth = np.clip((c.yy - horizon) / (height - horizon), 0.0, 1.0)
    half = depth * width * rng.uniform(0.38, 0.5)
    below = c.yy > horizon
    c.paint(below & (np.abs(c.xx - vanish) < half * 1.35), SIDEWALK)
    c.paint(below & (np.abs(c.xx - vanish) < half), ROAD)
    if rng.random() < 0.6:  # a fence along the left sidewalk
        c.paint(below & (c.xx < vanish - half * 1.35) & (c.yy < horizon + height * 0.1), FENCE)
    # poles on the sidewalks, each with a sign or a light
    for _ in range(rng.integers(1, 4)):
        bottom = horizon + (height - horizon) * rng.uniform(0.3, 0.8)
        d = (bottom - horizon) / (height - horizon)
        sign = rng.choice([-1.0, 1.0])
        x = vanish + sign * d * width * 0.48 * 1.17
        top = bottom - height * (0.15 + 0.35 * d)
        thick = max(1.0, width * 0.006 * (0.5 + d))
        c.paint(c.rect(top, bottom, x - thick, x + thick), POLE)
        box = max(2.0, height * 0.05 * (0.5 + d))
        if rng.random() < 0.5:
            c.paint(c.rect(top - box, top + box * 0.5, x - box * 0.7, x + box * 0.7), TRAFFIC_SIGN)
        else:
            c.paint(c.rect(top - box * 1.5, top + box * 0.3, x - box * 0.4, x + box * 0.4), TRAFFIC_LIGHT)
    # cars on the road and persons on the sidewalks, nearer ones (lower) larger and drawn later
    objects = [("car", horizon + (height - horizon) * rng.uniform(0.2, 0.85)) for _ in range(rng.integers(1, 4))]
    objects += [("person", horizon + (height - horizon) * rng.uniform(0.3, 0.85)) for _ in range(rng.integers(1, 4))]
    for kind, bottom in sorted(objects, key=lambda o: o[1]):
        d = (bottom - horizon) / (height - horizon)
        if kind == "car":
            x = vanish + rng.uniform(-0.7, 0.7) * d * width * 0.45
            w, h = width * 0.22 * (0.3 + d), height * 0.2 * (0.3 + d)
            body = c.rect(bottom - h * 0.6, bottom, x - w / 2, x + w / 2) | c.ellipse(bottom - h * 0.6, x, h * 0.4,
                                                                                   w * 0.3)
            c.paint(body, CAR)
        else:
            x = vanish + rng.choice([-1.0, 1.0]) * d * width * rng.uniform(0.5, 0.62)
            h = height * 0.35 * (0.3 + d)
            torso = c.ellipse(bottom - h * 0.4, x, h * 0.4, h * 0.12)
            c.paint(torso | c.ellipse(bottom - h * 0.88, x, h * 0.1, h * 0.08), PERSON)
    # void: static clutter, an ego-vehicle hood in some images, a rectification border
    if rng.random() < 0.7:
        cx, cy = width * rng.uniform(0.1, 0.9), horizon + height * rng.uniform(0.0, 0.1)
        c.paint(c.ellipse(cy, cx, height * 0.04, width * 0.02), STATIC)
    if rng.random() < 0.5:
        c.paint(c.ellipse(height * 1.02, width * 0.5, height * rng.uniform(0.08, 0.14), width * 0.45), EGO_VEHICLE)
    border = max(1, int(round(width * 0.004)))
    edge = np.zeros((height, width), bool)
    edge[:, :border] = edge[:, -border:] = True
    c.paint(edge, RECTIFICATION_BORDER)
    return c.label, c.instance


def _render(rng: np.random.Generator, label: np.ndarray, colours: dict[int, np.ndarray]) -> np.ndarray:
    """RGB [H, W, 3] uint8 for a label map: class colour × texture × illumination + noise."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(3.0, h / 24)
    textures = {
        BUILDING: 1.0 - 0.35 * ((np.mod(yy, period) < period / 2) & (np.mod(xx, period) < period / 2)),
        ROAD: 1.0 + 0.08 * np.sin(xx * 2.1 + yy * 1.3),
        SIDEWALK: 1.0 - 0.2 * (np.mod(xx + yy, period) < 1.0),
        VEGETATION: 1.0 + 0.3 * rng.standard_normal((h, w)).astype(np.float32),
        FENCE: 1.0 - 0.4 * (np.mod(xx, period) < 1.0),
        SKY: 1.0 + 0.25 * (1.0 - yy / h),
    }
    image = np.zeros((h, w, 3), np.float32)
    for label_id, colour in colours.items():
        mask = label == label_id
        if mask.any():
            shade = textures.get(label_id)
            image[mask] = colour * (1.0 if shade is None else shade[mask][:, None])
    gain = rng.uniform(0.75, 1.25) * (1.0 + 0.15 * (xx / w - 0.5) * rng.uniform(-1, 1))  # illumination
    image = image * gain[..., None] + rng.normal(0, 8.0, (h, w, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image  # pillow: optional (the cityscapes extra)

    image = Image.fromarray(array)
    write_stream(path, lambda f: image.save(f, format="PNG"))  # a full disk is one line, not a traceback


def make_cityscapes_task(out: str | Path, cases: int = 8, test_cases: int = 2, size: int | None = None, seed: int = 0,
                         anisotropic: bool = False, **options: object) -> Path:
    """Write a Cityscapes-format folder to ``out`` (see the module docstring); returns ``out``.

    ``size`` is the image height (default 64; width is twice that). The MSD writer's ``classes``, ``modalities`` and
    ``anisotropic`` have no meaning here (the label table is Cityscapes', images are RGB) and are refused.
    """
    out = Path(out)
    size = 64 if size is None else size
    if anisotropic or options:
        name = "anisotropic" if anisotropic else next(iter(options))
        raise DintsError(out, f"--{name} does not apply to the cityscapes format (RGB images, Cityscapes' labels)")
    if cases < 2 or test_cases < 0:
        raise DintsError(out, "need at least 2 labelled cases (train and val) and test cases ≥ 0")
    if size < 16:
        raise DintsError(out, f"size must be ≥ 16 pixels, got {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DintsError(out, "already exists and is not an empty folder; choose another --out")
    val = max(1, cases // 4)
    dataset_seq, *image_seqs = np.random.SeedSequence(seed).spawn(1 + cases + test_cases)
    jitter = np.random.default_rng(dataset_seq)
    colours = {k: np.clip(np.array(v, np.float32) + jitter.normal(0, 6, 3), 0, 255) for k, v in COLOURS.items()}
    splits = ["train"] * (cases - val) + ["val"] * val + ["test"] * test_cases
    cities = {"train": TRAIN_CITIES, "val": VAL_CITIES, "test": TEST_CITIES}
    for index, (split, seq) in enumerate(zip(splits, image_seqs)):
        rng = np.random.default_rng(seq)
        city = cities[split][index % len(cities[split])]
        core = core_name(city, index)
        label, instance = _draw_scene(rng, size, 2 * size)
        _save_png(_render(rng, label, colours), out / "leftImg8bit" / split / city / f"{core}_leftImg8bit.png")
        if split != "test":
            _save_png(label, out / "gtFine" / split / city / f"{core}_gtFine_labelIds.png")
            _save_png(instance.astype(np.uint16), out / "gtFine" / split / city / f"{core}_gtFine_instanceIds.png")
    return out
