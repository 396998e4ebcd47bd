"""Atomic writes: every state file (JSON, YAML, checkpoints, images) is written to a temporary file in the same
folder, flushed and fsynced, then renamed over the target, so a killed process leaves either the old or the new file.

Every file dints3d writes is opened by :func:`temporary_file` (tests replace it to simulate a full disk or a
read-only file system), and an ``OSError`` while writing becomes one line naming the target
(:func:`dints3d.utils.outputs.cannot_write`) while the file already there stays as it was."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import yaml

from dints3d.utils.errors import DintsError
from dints3d.utils.outputs import KEPT, cannot_write


def temporary_file(folder: Path, name: str) -> tuple[IO[bytes], Path]:
    """A new hidden file ``folder/.<name>.<random>.tmp`` open for binary writing, and its path: where every file
    dints3d writes starts."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return open(tmp, "wb"), Path(tmp)  # reopened by path: the file's ``name`` is its path (for messages, tests)


def probe_writable(folder: Path) -> None:
    """Write and remove a temporary file in ``folder`` (OSError if that is impossible)."""
    f, tmp = temporary_file(folder, "write-test")
    try:
        f.close()
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_folder(target: Path) -> None:
    if target.is_dir():
        raise DintsError(target, "is a folder where a file should be written; move it away (nothing was written)")


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, before_rename: Callable[[], None] | None = None,
                kept: str = KEPT) -> Iterator[IO[bytes]]:
    """Yield a binary file open on a temporary path next to ``target``; on success flush and fsync it, call
    ``before_rename()`` (the new file is then complete on disk, e.g. to keep the old ``target`` elsewhere) and rename
    it over ``target``. An ``OSError`` on the way becomes :class:`DintsError` naming ``target`` (``kept``: what is still
    intact); ``target`` is then unchanged."""
    target = Path(target)
    _refuse_folder(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f, tmp = temporary_file(target.parent, target.name)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, target, before_rename)
    except OSError as e:
        raise cannot_write(target, e, kept) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, before_rename: Callable[[], None] | None = None,
                kept: str = KEPT) -> Iterator[Path]:
    """:func:`atomic_file` for writers that need a path: yield the temporary path (an empty file) to write."""
    target = Path(target)
    _refuse_folder(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f, tmp = temporary_file(target.parent, target.name)
        f.close()
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        _move_into_place(tmp, target, before_rename)
    except OSError as e:
        raise cannot_write(target, e, kept) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _move_into_place(tmp: Path, target: Path, before_rename: Callable[[], None] | None) -> None:
    # mkstemp creates 0600; the result gets the permissions a plain open() would have given
    os.chmod(tmp, 0o666 & ~umask())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def umask() -> int:
    """The process's umask (read without changing it for more than an instant)."""
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


def write_atomic(target: str | os.PathLike, write: Callable[[Path], None], kept: str = KEPT) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``target``."""
    with atomic_path(target, kept=kept) as tmp:
        write(tmp)
    return Path(target)


def write_stream(target: str | os.PathLike, write: Callable[[IO[bytes]], None], kept: str = KEPT) -> Path:
    """Call ``write(file)`` (a binary file open for writing) and atomically move the result to ``target``."""
    with atomic_file(target, kept=kept) as f:
        write(f)
    return Path(target)


def write_bytes(target: str | os.PathLike, data: bytes, kept: str = KEPT) -> Path:
    """Atomically write ``data``."""
    return write_stream(target, lambda f: f.write(data), kept)


def write_json(target: str | os.PathLike, data: Any, indent: int = 2, kept: str = KEPT) -> Path:
    """Atomically write ``data`` as human-readable JSON."""
    text = json.dumps(data, indent=indent, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes(target, text.encode(), kept)


def write_text(target: str | os.PathLike, text: str, kept: str = KEPT) -> Path:
    """Atomically write a text file (UTF-8)."""
    return write_bytes(target, text.encode(), kept)


def write_yaml(target: str | os.PathLike, data: Any, kept: str = KEPT) -> Path:
    """Atomically write ``data`` as block-style YAML."""
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return write_bytes(target, text.encode(), kept)


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
            _refuse_folder(current)
            f, tmp = temporary_file(folder, name)
            temps[current] = tmp
            with f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask())
        current = folder
        _rename_all(temps)
    except OSError as e:
        raise cannot_write(current, e, "the files already there are unchanged") from None
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
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise DintsError(path, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except DuplicateKey as e:
        raise DintsError(path, f"invalid JSON: {e} (the last would silently win); keep one") from None
    except RecursionError:
        raise DintsError(path, "invalid JSON: nested too deeply to read") from None


class DuplicateKey(ValueError):
    """A JSON object or YAML mapping that names one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(f"key '{key}' appears twice in one object")
        result[key] = value
    return result


def read_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file, raising :class:`DintsError` naming the file when it is missing or malformed."""
    path = Path(path)
    text = read_text(path)
    try:
        return load_yaml_text(text)
    except RecursionError:
        raise DintsError(path, "invalid YAML: nested too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DintsError(path, f"invalid YAML{where}: {getattr(e, 'problem', e)}") from None


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads scientific notation as YAML 1.2 does: ``1e-3``, ``1.0e30``, ``-2E+5`` and ``.5e1``
    are floats (YAML 1.1, which PyYAML follows, wants a dot and a signed exponent, so ``1e-3`` would be the string
    ``'1e-3'``). Every YAML 1.1 float stays a float, and integers stay integers. A mapping that names a key twice is
    an error (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key '{key}'", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


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
