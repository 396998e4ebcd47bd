"""Filling a bundle template (``bundles/<name>``) and writing the bundle atomically; shared by every exporter.

Every YAML config of a template starts with a block of top-level keys (the task settings) that :func:`fill_yaml`
overwrites, keeping the template's comments; ``docs/README.md`` has ``{{placeholders}}`` (:func:`fill_text`).
:func:`write_bundle` assembles the bundle in a temporary sibling folder and renames it into place, so the bundle
folder is either complete or absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import monai
import numpy as np
import torch
import yaml

import dints3d
from dints3d.spaces.base import Architecture
from dints3d.utils.bundle_templates import template_dir, template_module  # noqa: F401 (re-exported)
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import save_figure
from dints3d.utils.io import umask, write_bytes, write_json, write_text
from dints3d.utils.outputs import cannot_write


def versions(required_packages: tuple[str, ...]) -> dict[str, Any]:
    """``metadata.json``'s version fields: MONAI, PyTorch, NumPy and ``required_packages`` as installed here."""
    def version(name: str) -> str:
        if name == "dints3d":
            return dints3d.__version__
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: version(name) for name in required_packages},
    }


def parameter_count(arch: Architecture, plan: dict, channel_mul: float) -> int:
    """Parameters of ``arch``'s network for the plan's channels and classes (built on the meta device)."""
    with torch.device("meta"):
        net = arch.build(int(plan["in_channels"]), int(plan["out_channels"]), channel_mul=channel_mul)
    return sum(p.numel() for p in net.parameters())


def arch_source_name(arch_source: str | os.PathLike) -> str:
    """How a bundle names where its architecture came from without an absolute path: ``<run folder>/<file>`` for a
    file (``search-run/arch.json``), or the preset's name."""
    path = Path(arch_source)
    if not path.exists():
        return os.fspath(arch_source)
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def bundle_relative(target: str | os.PathLike, bundle: str | os.PathLike) -> str:
    """``target`` as a bundle config value relative to the bundle root, ``$@bundle_root + '/../task'``, so that the
    bundle holds no absolute path: right while both stay where they are, overridden (``--dataset_dir``) otherwise.
    Folders that share nothing below the filesystem root get ``'/../<target name>'``, a placeholder that reveals no
    path."""
    target, bundle = Path(target).absolute(), Path(bundle).absolute()
    if os.path.commonpath([target, bundle]) == target.anchor:
        relative = f"../{target.name}"
    else:
        relative = Path(os.path.relpath(target, bundle)).as_posix()
    return f"$@bundle_root + '/{relative}'"


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: a value that occurs twice (a shared list) is written twice, so separately dumped
    keys never reuse an anchor name."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML text of ``data`` without anchors and aliases."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, width=120, allow_unicode=True)


def fill_yaml(text: str, values: dict[str, Any], source: str) -> str:
    """Replace the value of each top-level key of ``values`` in the YAML ``text`` (the key's line and its indented
    continuation lines), keeping everything else (comments included). Every key must occur exactly once."""
    lines = text.splitlines()
    for key, value in values.items():
        starts = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}:(\s|$)", line)]
        if len(starts) != 1:
            raise DintsError(source, f"template must define top-level '{key}' exactly once, found {len(starts)}")
        start = end = starts[0]
        while end + 1 < len(lines) and lines[end + 1][:1] == " " and lines[end + 1].strip():
            end += 1
        dumped = yaml.dump({key: value}, Dumper=_PlainDumper, default_flow_style=None, sort_keys=False,
                           width=2**31 - 1, allow_unicode=True).rstrip("\n")
        if dumped.startswith("{"):  # a scalar or a flat list is dumped as a one-line flow mapping {key: value}
            dumped = dumped[1:-1]
        lines[start:end + 1] = dumped.splitlines()
    filled = "\n".join(lines) + "\n"
    loaded = yaml.safe_load(filled)
    for key, value in values.items():
        if loaded.get(key) != value:
            raise DintsError(source, f"filling '{key}' did not round-trip: {loaded.get(key)!r} != {value!r}")
    return filled


def fill_text(text: str, values: dict[str, str], source: str) -> str:
    """Replace ``{{name}}`` placeholders; all must be known and all must be used."""
    for name, value in values.items():
        if "{{" + name + "}}" not in text:
            raise DintsError(source, f"template has no placeholder {{{{{name}}}}}")
        text = text.replace("{{" + name + "}}", value)
    left = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)))
    if left:
        raise DintsError(source, f"placeholders left unfilled: {', '.join(left)}")
    return text


def bullets(items: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in items.items())


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DintsError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DintsError(out, "exists and is not empty; choose another --out or pass --force to replace it")


def swap_into_place(built: Path, out: Path) -> None:
    """Rename the finished bundle to ``out``, replacing (and then deleting) what was there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(built, out)
    if old is not None:
        shutil.rmtree(old)


def write_bundle(template: Path, out: Path, filled: dict[str, dict[str, Any]], copied: tuple[str, ...], meta: dict,
                 arch: Architecture, readme: Callable[[], dict[str, str]],
                 written: Callable[[Path], dict[str, str]] | None = None) -> Path:
    """Write the bundle ``out`` from ``template``: each ``configs/<name>`` of ``filled`` with its task settings, the
    ``copied`` files as they are, ``metadata.json``, ``models/arch.json``, ``docs/arch.png`` (if the space draws
    one), ``docs/README.md`` with the values ``readme()`` returns, and the files ``written(build)`` returns (path in
    the bundle → text; ``build`` is the folder being assembled). Assembled next to ``out``, then renamed."""
    kept = "nothing was written (a bundle already there is unchanged)"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
        os.chmod(build, 0o777 & ~umask())  # mkdtemp makes it 0700; the bundle gets what a plain mkdir would give
    except OSError as e:
        raise cannot_write(out, e, kept) from None
    try:
        for name, values in filled.items():
            text = (template / "configs" / name).read_text()
            write_text(build / "configs" / name, fill_yaml(text, values, f"{template}/configs/{name}"), kept)
        for name in copied:
            write_bytes(build / name, (template / name).read_bytes(), kept)
        write_json(build / "configs" / "metadata.json", meta)
        arch.save(build / "models" / "arch.json")
        figure = arch.figure()
        if figure is not None:
            save_figure(figure, build / "docs" / "arch.png")
        write_text(build / "docs" / "README.md",
                   fill_text((template / "docs" / "README.md").read_text(), readme(), f"{template}/docs/README.md"))
        for name, text in (written(build) if written is not None else {}).items():
            write_text(build / name, text)
        swap_into_place(build, out)
    except OSError as e:
        raise cannot_write(out, e, kept) from None
    except DintsError as e:  # a file of the bundle being assembled: name it where it was going
        inside = e.where is not None and Path(e.where).is_relative_to(build)
        raise (DintsError(out / Path(e.where).relative_to(build), e.problem) if inside else e) from None
    finally:
        if build.exists():
            shutil.rmtree(build)
    return out
