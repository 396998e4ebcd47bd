"""Atomic writes: every state file (JSON, YAML, checkpoints) is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the target, so a killed process leaves either the old or the new file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from dints3d.utils.errors import DintsError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, before_rename: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it, call ``before_rename()`` (the new file is then
    complete on disk, e.g. to keep the old ``target`` elsewhere) and rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; the result gets the permissions a plain open() would have given
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``target``."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def write_json(target: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Atomically write ``data`` as human-readable JSON."""
    text = json.dumps(data, indent=indent, sort_keys=False, allow_nan=False) + "\n"
    return write_atomic(target, lambda p: p.write_text(text))


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    return write_atomic(target, lambda p: p.write_text(text))


def write_yaml(target: str | os.PathLike, data: Any) -> Path:
    """Atomically write ``data`` as block-style YAML."""
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return write_atomic(target, lambda p: p.write_text(text))


def write_texts_together(folder: str | os.PathLike, texts: Mapping[str, str]) -> list[Path]:
    """Write ``{file name: text}`` into ``folder`` as one group, as far as a file system allows.

    Every file is first written to a temporary file and fsynced; a failure there leaves the old files untouched.
    Then each temporary file is renamed over its target while the file it replaces stays reachable under a
    temporary name (a hard link), so a failing rename puts every old file back. Only a kill in the microseconds
    between two renames can leave old and new files mixed. Any OSError becomes a DintsError naming the file.
    """
    folder = Path(folder)
    current = folder
    temps: dict[Path, Path] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            current = folder / name
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            temps[current] = Path(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        current = folder
        _rename_all(temps)
    except OSError as e:
        raise DintsError(current, f"cannot write ({e.strerror or e}); the files already there are unchanged") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    return list(temps)


def _rename_all(temps: dict[Path, Path]) -> None:
    """Rename each temporary file over its target; on a failure restore every target replaced so far."""
    replaced: list[tuple[Path, Path | None]] = []  # (target, the old file kept aside, or None if there was none)
    try:
        for target, tmp in temps.items():
            old = None
            if target.exists():
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent)
                os.close(fd)
                old = Path(name)
                old.unlink()
                try:
                    os.link(target, old)
                except OSError:  # a file system without hard links
                    shutil.copy2(target, old)
            replaced.append((target, old))
            os.replace(tmp, target)
    except OSError:
        for target, old in reversed(replaced):
            with contextlib.suppress(OSError):
                if old is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(old, target)
        raise
    finally:
        for _, old in replaced:
            if old is not None:
                old.unlink(missing_ok=True)


def read_text(path: Path) -> str:
    """A text file's content, or :class:`DintsError` naming it when it is missing or unreadable."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise DintsError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DintsError(path, f"cannot read: {e}") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`DintsError` naming the file when it is missing or malformed."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DintsError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file, raising :class:`DintsError` naming the file when it is missing or malformed."""
    path = Path(path)
    text = read_text(path)
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DintsError(path, f"invalid YAML{where}: {getattr(e, 'problem', e)}") from None


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads scientific notation as YAML 1.2 does: ``1e-3``, ``1.0e30``, ``-2E+5`` and ``.5e1``
    are floats (YAML 1.1, which PyYAML follows, wants a dot and a signed exponent, so ``1e-3`` would be the string
    ``'1e-3'``). Every YAML 1.1 float stays a float, and integers stay integers."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)
# replace the float rule in place: resolvers are tried in order, and the float rule comes before the int rule
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT if tag == _FLOAT_TAG else regexp) for tag, regexp in rules]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml_text(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, with YAML 1.2 scientific-notation floats (:class:`YamlLoader`).
    Every YAML the project reads from users (config files, ``--set`` values) goes through here."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 — YamlLoader is a SafeLoader
