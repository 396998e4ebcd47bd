"""``dints3d infer`` for a Cityscapes bundle: PNG images in, Cityscapes label-id PNGs out.

Inputs are checked before the bundle sees them (as :mod:`dints3d.infer_checks` does for NIfTI): folders are searched
recursively for ``*.png`` (``leftImg8bit/val`` holds one folder per city); each file must be an 8-bit RGB PNG whose
chunks all verify, and two inputs must not share a ``city_sequence_frame`` name (their predictions would collide).
The good ones are segmented in one run of ``configs/inference.yaml``, which writes
``OUT/<city>_<sequence>_<frame>_pred_labelIds.png``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from dints3d.data.cityscapes import check_image, core_name
from dints3d.data.cityscapes_transforms import PREDICTION_SUFFIX
from dints3d.errors import DintsError


def collect_images(inputs: list[str | os.PathLike]) -> tuple[list[Path], dict[Path, str]]:
    """PNG files named directly and those under folders named (sorted, hidden files skipped), and a problem per
    input that names nothing usable or repeats an image name."""
    files: list[Path] = []
    problems: dict[Path, str] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*.png") if p.is_file() and not p.name.startswith("."))
            if not found:
                problems[entry] = "folder holds no PNG images (searched recursively)"
            files += found
        elif not entry.exists():
            problems[entry] = "file not found"
        elif entry.suffix.lower() != ".png":
            problems[entry] = "not a PNG image"
        else:
            files.append(entry)
    seen: dict[str, Path] = {}
    unique = []
    for path in files:
        name = core_name(path)
        if name in seen:
            problems[path] = f"same image name '{name}' as {seen[name]}; its prediction would overwrite that one's"
        else:
            seen[name] = path
            unique.append(path)
    return unique, problems


def image_problem(path: Path, num_channels: int) -> str | None:
    """``None`` if ``path`` is an RGB PNG the network can take (``num_channels`` must be 3), else one sentence."""
    if num_channels != 3:
        return f"the network expects {num_channels} channel(s); Cityscapes images are RGB"
    try:
        check_image(path)
    except DintsError as e:
        return e.problem
    return None


def infer_png(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
              sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1):
    """Segment the PNG files and folders ``inputs`` into ``out/<core>_pred_labelIds.png`` with the bundle's
    ``configs/inference.yaml``; returns a :class:`dints3d.bundle_commands.InferResult`."""
    from dints3d.bundle_commands import InferResult, bundle_run, config_file, network_channels, override_args

    if nproc != 1:
        raise DintsError("--nproc", "a Cityscapes bundle infers in one process")
    channels = network_channels(bundle)
    config_file(bundle, "inference.yaml")
    result = InferResult()
    files, result.failures = collect_images(inputs)
    for path, problem in result.failures.items():
        print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    good = []
    for path in files:
        problem = image_problem(path, channels)
        if problem is None:
            good.append(path.absolute())
        else:
            result.failures[path] = problem
            print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    if not good:
        return result
    out = Path(out).absolute()
    with tempfile.TemporaryDirectory(prefix="dints3d-infer-") as tmp:
        datalist = Path(tmp) / "datalist.json"
        datalist.write_text(json.dumps([str(p) for p in good]))
        args = ["--datalist", f"$json.loads(pathlib.Path({str(datalist)!r}).read_text())", "--output_dir", str(out)]
        result.returncode = bundle_run(bundle, ["inference.yaml"], args + override_args(sets), log)
    for path in good:
        mask = out / f"{core_name(path)}{PREDICTION_SUFFIX}"
        if mask.is_file():
            result.masks[path] = mask
        else:
            result.failures[path] = f"no prediction written (the bundle run exited with status {result.returncode})"
    return result


def is_png_bundle(bundle: str | os.PathLike) -> bool:
    """True if the bundle's ``metadata.json`` says it reads PNG images (the Cityscapes template)."""
    path = Path(bundle) / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text()).get("data_type") == "png"
    except (OSError, ValueError, AttributeError):
        return False
