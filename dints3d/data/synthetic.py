"""``dints3d synth``: a small synthetic task folder that behaves like real MSD data.

Each case is a body (a cylinder of soft tissue in air, or in zeros for MRI) with a bright "spine", unlabelled
clutter blobs whose intensity overlaps the organ's, an ellipsoidal "organ" (class 1) with a wobbly outline, a
smaller lobulated "lesion" inside it (class 2) and, for more classes, further small organs (classes 3, 4, …).
Tissue intensities are fixed per dataset (so the classes are learnable) and jittered per case; every case has its
own smooth bias field, texture and Gaussian noise. Shapes vary per case and are never multiples of 32, the affine
is LPS with a non-zero origin, and ``anisotropic`` gives ~0.8 × 0.8 × 2.6–4 mm voxels. Output is a pure function
of the arguments (``seed`` included).
"""

from __future__ import annotations

import argparse
import gzip
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from dints3d.data.formats import DEFAULT_FORMAT, FORMATS, format_named
from dints3d.utils.errors import DintsError
from dints3d.utils.io import write_bytes, write_json
from dints3d.utils.lock import locked_folder, never
from dints3d.utils.outputs import check_output_folder

MRI_NAMES = ("T2", "ADC", "T1", "FLAIR", "T1Gd", "DWI")
CT_LIMITS = (-1024, 3071)
#: tissue index in the tissue map; labelled classes follow as FIRST_CLASS + class - 1
OUTSIDE, BODY, BONE, CLUTTER, FIRST_CLASS = 0, 1, 2, 3, 4


def modality_names(count: int) -> list[str]:
    """``["CT"]`` for one modality, else MRI-like names (``T2``, ``ADC``, …, then ``MR7``, …)."""
    if count == 1:
        return ["CT"]
    return [MRI_NAMES[i] if i < len(MRI_NAMES) else f"MR{i + 1}" for i in range(count)]


@dataclass(frozen=True)
class Tissues:
    """Dataset-wide intensities, so classes look alike across cases (each case jitters them slightly).

    ``mean`` [FIRST_CLASS + classes, M] per tissue and modality; ``noise`` and ``texture`` [M] standard deviations.
    """

    mean: np.ndarray
    noise: np.ndarray
    texture: np.ndarray
    ct: bool


def _tissues(rng: np.random.Generator, modalities: list[str], classes: int, anatomy: str = "abdomen") -> Tissues:
    n = FIRST_CLASS + classes
    if anatomy == "brain" and modalities != ["CT"]:
        # rows OUTSIDE, scalp, skull, CSF, grey matter, white matter, nuclei; T1-like and T2-like contrasts alternate
        t1 = np.array([0.0, 0.8, 0.1, 0.15, 0.45, 0.7, 0.55])
        t2 = np.array([0.0, 0.6, 0.1, 1.0, 0.6, 0.35, 0.5])
        body = rng.uniform(250.0, 450.0, len(modalities))
        rows = np.stack([(t1 if m % 2 == 0 else t2) for m in range(len(modalities))], axis=1)
        mean = np.concatenate([rows, np.repeat(rows[-1:], max(0, n - len(rows)), axis=0)])[:n] * body
        return Tissues(mean, 0.05 * body, 0.03 * body, ct=False)
    if modalities == ["CT"]:
        mean = np.empty((n, 1))
        mean[[OUTSIDE, BODY, BONE], 0] = (-1000.0, 50.0, 700.0)
        organ = 110.0
        mean[CLUTTER, 0] = organ * rng.uniform(0.9, 1.1)
        mean[FIRST_CLASS:, 0] = [organ, 65.0, *(160.0 + 30.0 * np.arange(classes - 2))][:classes]
        return Tissues(mean, np.array([18.0]), np.array([10.0]), ct=True)
    m = len(modalities)
    body = rng.uniform(250.0, 450.0, m)

    def contrast(ref: np.ndarray, first_sign: float) -> np.ndarray:
        # signs alternate across modalities so that each one adds information (bright in T2, dark in ADC, …)
        signs = first_sign * (-1.0) ** np.arange(m)
        return ref * (1.0 + signs * rng.uniform(0.35, 0.6, m))

    organ = contrast(body, 1.0)
    rows = [np.zeros(m), body, 0.3 * body, organ * rng.uniform(0.9, 1.1, m), organ, contrast(organ, -1.0)]
    rows += [contrast(body, rng.choice([-1.0, 1.0])) for _ in range(classes - 2)]
    return Tissues(np.stack(rows[:n]), 0.06 * body, 0.04 * body, ct=False)


def _case_geometry(rng: np.random.Generator, size: int, anisotropic: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape (3 ints, none a multiple of 32) and voxel spacing in mm [3]."""
    if anisotropic:
        inplane = rng.uniform(0.74, 0.86)
        spacing = np.array([inplane, inplane, rng.uniform(2.6, 4.0)])
        sides = size * np.array([rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15), 0.4 * rng.uniform(0.8, 1.2)])
    else:
        inplane = rng.uniform(0.85, 1.1)
        spacing = np.array([inplane, inplane, rng.uniform(0.9, 1.5)])
        sides = size * rng.uniform(0.85, 1.15, 3)
    shape = tuple(int(n) + 1 if int(n) % 32 == 0 else int(n) for n in np.maximum(np.round(sides), 4))
    return shape, spacing


def _lps_affine(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Voxel → world (RAS+ mm) affine with the first two axes flipped (LPS) and a scanner-like origin."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    fov = np.array(shape) * spacing
    affine[:3, 3] = [fov[0] / 2 + rng.uniform(-20, 20), fov[1] / 2 + rng.uniform(-20, 20), -rng.uniform(100, 400)]
    return affine


def _wobble(rng: np.random.Generator, grid: list[np.ndarray], wavelength: float, waves: int = 3) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of ``waves`` plane waves of the given wavelength (mm)."""
    field = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), np.float32)
    for _ in range(waves):
        k = rng.normal(size=3)
        k *= 2 * np.pi / wavelength / np.linalg.norm(k)
        field += np.cos(k[0] * grid[0] + k[1] * grid[1] + k[2] * grid[2] + rng.uniform(0, 2 * np.pi))
    return field / waves


def _ellipsoid(grid: list[np.ndarray], center, semi_axes, wobble: np.ndarray | float = 0.0) -> np.ndarray:
    """Boolean mask [X, Y, Z] of an ellipsoid in mm whose radius is scaled by ``1 + wobble`` locally."""
    r2 = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, semi_axes))
    return r2 < (1.0 + wobble) ** 2


def _tissue_map(rng: np.random.Generator, grid: list[np.ndarray], shape: tuple[int, ...], spacing: np.ndarray,
                classes: int) -> np.ndarray:
    """Tissue index per voxel [X, Y, Z] uint8 (OUTSIDE, BODY, BONE, CLUTTER or FIRST_CLASS + class - 1)."""
    fov = np.array(shape) * spacing
    base = fov[:2].min()
    body = _ellipsoid(grid[:2], (0, 0), (0.46 * fov[0], 0.4 * fov[1]), 0.03 * _wobble(rng, grid, base))
    tissue = body.astype(np.uint8)
    tissue[_ellipsoid(grid[:2], (0, -0.28 * fov[1]), (0.06 * base,) * 2) & body] = BONE
    for _ in range(rng.integers(3, 7)):
        center = rng.uniform(-0.3, 0.3, 3) * fov
        tissue[_ellipsoid(grid, center, rng.uniform(0.06, 0.15) * base * np.ones(3)) & body] = CLUTTER

    organ_center = rng.uniform(-0.1, 0.1, 3) * fov
    organ_axes = np.minimum(rng.uniform(0.16, 0.26, 3) * base, 0.35 * fov)
    tissue[_ellipsoid(grid, organ_center, organ_axes, 0.2 * _wobble(rng, grid, 2 * organ_axes.max()))] = FIRST_CLASS
    for k in range(3, classes + 1):
        angle = 2 * np.pi * k / (classes - 1) + rng.uniform(-0.3, 0.3)
        center = [0.3 * base * np.cos(angle), 0.3 * base * np.sin(angle), rng.uniform(-0.2, 0.2) * fov[2]]
        mask = _ellipsoid(grid, center, np.minimum(rng.uniform(0.07, 0.12, 3) * base, 0.3 * fov)) & body
        tissue[mask] = FIRST_CLASS + k - 1
    if classes >= 2:
        direction = rng.normal(size=3)
        center = organ_center + 0.45 * organ_axes * direction / np.linalg.norm(direction)
        # at least 1.5 voxels on the coarsest axis, so thick slices still show the lesion
        radius = max(rng.uniform(0.3, 0.45) * organ_axes.min(), 1.5 * spacing.max())
        axes = radius * rng.uniform(0.8, 1.2, 3)
        tissue[_ellipsoid(grid, center, axes, 0.3 * _wobble(rng, grid, radius))] = FIRST_CLASS + 1
    return tissue


def _brain_map(rng: np.random.Generator, grid: list[np.ndarray], shape: tuple[int, ...], spacing: np.ndarray,
               classes: int) -> np.ndarray:
    """Tissue index per voxel [X, Y, Z] of a head: scalp (BODY), skull (BONE), cerebrospinal fluid and ventricles
    (CLUTTER), cortical grey matter (class 1) as a ribbon about 2.5 mm thick along a folded surface (gyri and sulci
    of about 12 mm: one voxel or less across thick slices), white matter (class 2) inside it; further classes are
    deep grey-matter nuclei."""
    fov = np.array(shape) * spacing
    head = np.array([0.47, 0.47, 0.47]) * fov
    tissue = _ellipsoid(grid, (0, 0, 0), head, 0.02 * _wobble(rng, grid, fov.min())).astype(np.uint8)
    tissue[_ellipsoid(grid, (0, 0, 0), 0.93 * head) & (tissue > 0)] = BONE
    tissue[_ellipsoid(grid, (0, 0, 0), 0.88 * head) & (tissue > 0)] = CLUTTER  # cerebrospinal fluid
    brain = 0.78 * head
    scale = float(brain.mean())
    # the pial surface at normalised radius 1 + folds; mm from it measured radially (about the true distance)
    radius = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, brain)))
    field = 0.7 * _wobble(rng, grid, 12.0, waves=8) + 0.3 * _wobble(rng, grid, 25.0, waves=4)
    folds = rng.uniform(2.5, 3.5) / scale * field / max(float(field.std()), 1e-6)  # about ±6 mm at the extremes
    depth = (radius - 1.0 - folds) * scale  # mm outside (> 0) or inside (< 0) the folded surface
    thickness = rng.uniform(2.2, 2.8)  # mm of cortex
    tissue[(depth < 0) & (depth > -thickness) & (tissue > 0)] = FIRST_CLASS
    inner = depth <= -thickness
    tissue[inner] = FIRST_CLASS + 1 if classes >= 2 else FIRST_CLASS
    for side in (-1, 1):  # lateral ventricles
        center = np.array([side * 0.11, 0.05, 0.05]) * fov
        tissue[_ellipsoid(grid, center, np.array([0.045, 0.15, 0.07]) * fov) & inner] = CLUTTER
    for k in range(3, classes + 1):  # deep grey-matter nuclei
        angle = 2 * np.pi * k / max(classes - 2, 1) + rng.uniform(-0.3, 0.3)
        center = np.array([0.17 * np.cos(angle), 0.17 * np.sin(angle), rng.uniform(-0.1, 0.1)]) * fov
        tissue[_ellipsoid(grid, center, np.array([0.05, 0.07, 0.08]) * fov) & inner] = FIRST_CLASS + k - 1
    return tissue


#: --anatomy → (tissue map, class names): ``abdomen`` an organ with a lesion (CT-like with one modality), ``brain``
#: thin, convoluted grey matter around white matter (MR-like)
ANATOMIES = {"abdomen": ("organ", "lesion"), "brain": ("grey matter", "white matter")}


def _bias(rng: np.random.Generator, grid: list[np.ndarray], fov: np.ndarray) -> np.ndarray:
    """A smooth quadratic field [X, Y, Z] of unit scale, different per case (scanner drift / coil bias)."""
    u = [2 * g / f for g, f in zip(grid, fov)]
    a, b = rng.normal(0, 0.5, 3), rng.normal(0, 0.3, 3)
    return (rng.normal(0, 0.5) + sum(a[i] * u[i] + b[i] * u[i] ** 2 for i in range(3))
            + rng.normal(0, 0.3) * u[0] * u[1]).astype(np.float32)


def synth_case(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, tissues: Tissues,
               classes: int, anatomy: str = "abdomen") -> tuple[np.ndarray, np.ndarray]:
    """One case: image [X, Y, Z] (CT, int16 HU) or [X, Y, Z, M] (MRI, float32 ≥ 0) and label [X, Y, Z] uint8."""
    grid = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32).reshape([-1 if i == a else 1 for i in range(3)])
            for a, (n, s) in enumerate(zip(shape, spacing))]
    fov = np.array(shape) * spacing
    tissue = (_brain_map if anatomy == "brain" else _tissue_map)(rng, grid, shape, spacing, classes)
    label = np.where(tissue >= FIRST_CLASS, tissue - (FIRST_CLASS - 1), 0).astype(np.uint8)

    mean = tissues.mean * rng.uniform(0.97, 1.03, tissues.mean.shape)
    texture = gaussian_filter(rng.standard_normal(shape, np.float32), 1.0)
    texture /= texture.std()
    bias = _bias(rng, grid, fov)
    channels = []
    for m in range(mean.shape[1]):
        x = mean[tissue, m].astype(np.float32) + tissues.texture[m] * texture
        x += tissues.noise[m] * rng.standard_normal(shape, np.float32)
        if tissues.ct:
            x += 20.0 * bias
            channels.append(np.clip(np.round(x), *CT_LIMITS).astype(np.int16))
        else:
            x *= np.exp(0.2 * bias)
            channels.append(np.where(tissue == OUTSIDE, 0, np.maximum(x, 0)).astype(np.float32))
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    return image, label


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    if path.name.endswith(".gz"):  # as nibabel writes .nii.gz: level 1, no time stamp
        data = gzip.compress(data, compresslevel=1, mtime=0)
    write_bytes(path, data)  # through dints3d's writer: a full disk is one line, not a traceback


def make_msd_task(out: str | Path, cases: int = 8, test_cases: int = 2, classes: int = 2, modalities: int = 1,
                  anisotropic: bool = False, size: int = 48, seed: int = 0, name: str = "Synthetic",
                  anatomy: str = "abdomen") -> Path:
    """Write an MSD-format task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``) to ``out``.

    Images are ``<name lower>_<nnn>.nii.gz``: 3D for one modality (CT), 4D [X, Y, Z, M] otherwise; labels 3D uint8.
    ``dataset.json`` is written last, so an interrupted run never looks like a complete task. Returns ``out``.
    """
    out = Path(out)
    if cases < 1 or test_cases < 0 or classes < 1 or modalities < 1:
        raise DintsError(out, "need cases ≥ 1, test cases ≥ 0, classes ≥ 1 and modalities ≥ 1")
    if size < 16:
        raise DintsError(out, f"size must be ≥ 16 voxels, got {size}")
    if anatomy not in ANATOMIES:
        raise DintsError(out, f"anatomy must be one of {', '.join(ANATOMIES)}, got '{anatomy}'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DintsError(out, "already exists and is not an empty folder; choose another --out")
    names = modality_names(modalities)
    dataset_seq, *case_seqs = np.random.SeedSequence(seed).spawn(1 + cases + test_cases)
    tissues = _tissues(np.random.default_rng(dataset_seq), names, classes, anatomy)
    prefix = name.lower()
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    training, test = [], []
    for index, seq in enumerate(case_seqs):
        rng = np.random.default_rng(seq)
        shape, spacing = _case_geometry(rng, size, anisotropic)
        affine = _lps_affine(rng, shape, spacing)
        image, label = synth_case(rng, shape, spacing, tissues, classes, anatomy)
        file = f"{prefix}_{index:03d}.nii.gz"
        if index < cases:
            _save_nifti(image, affine, out / "imagesTr" / file)
            _save_nifti(label, affine, out / "labelsTr" / file)
            training.append({"image": f"./imagesTr/{file}", "label": f"./labelsTr/{file}"})
        else:
            _save_nifti(image, affine, out / "imagesTs" / file)
            test.append(f"./imagesTs/{file}")

    first, second = ANATOMIES[anatomy]
    labels = {"0": "background", "1": first}
    if classes >= 2:
        labels["2"] = second
    labels.update({str(k): f"{'nucleus' if anatomy == 'brain' else 'organ'}{k - 2 if anatomy == 'brain' else k - 1}"
                   for k in range(3, classes + 1)})
    write_json(out / "dataset.json", {
        "name": name,
        "description": f"dints3d synthetic {anatomy} task (seed {seed}, size {size}, anisotropic {anisotropic})",
        "reference": "generated by dints3d synth",
        "licence": "CC0",
        "tensorImageSize": "3D" if modalities == 1 else "4D",
        "modality": {str(i): m for i, m in enumerate(names)},
        "labels": labels,
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    })
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="task folder to create (must not exist or be empty)")
    parser.add_argument("--format", choices=sorted(FORMATS), default=DEFAULT_FORMAT,
                        help=f"folder layout (default: {DEFAULT_FORMAT})")
    parser.add_argument("--cases", type=int, default=8,
                        help="labelled cases (default: 8); cityscapes splits them 3:1 into train and val")
    parser.add_argument("--test-cases", type=int, default=2, help="test cases without labels (default: 2)")
    parser.add_argument("--classes", type=int, help="foreground classes (msd only; default: 2)")
    parser.add_argument("--modalities", type=int, help="1 → CT; ≥ 2 → MRI-like 4D images (msd only; default: 1)")
    parser.add_argument("--anisotropic", action="store_true", help="~0.8 × 0.8 × 2.6–4 mm voxels (msd only)")
    parser.add_argument("--size", type=int,
                        help="msd: approximate in-plane side in voxels (default: 48); cityscapes: image height, "
                             "width twice that (default: 64)")
    parser.add_argument("--anatomy", choices=sorted(ANATOMIES),
                        help="msd only: abdomen (an organ with a lesion; default) or brain (thin, convoluted grey "
                             "matter around white matter; use with --modalities 2 --anisotropic for an MR-like task)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("classes", args.classes), ("modalities", args.modalities), ("size", args.size),
                                 ("anisotropic", args.anisotropic or None), ("anatomy", args.anatomy))
               if v is not None}
    # each format's writer takes out, cases, test_cases, seed and those other options that apply to it
    fmt = format_named(args.format)
    check_output_folder(args.out)
    with locked_folder(args.out, keep=never):  # one writer; a failed run leaves no half-written task behind
        out = fmt.stage("synthesize")(args.out, cases=args.cases, test_cases=args.test_cases, seed=args.seed,
                                      **options)
    print(f"wrote {args.cases} {fmt.labelled_cases} and {args.test_cases} test cases to {out}")
    return 0
