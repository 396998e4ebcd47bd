"""Running a bundle: ``python -m monai.bundle run`` (``torchrun`` for several processes) in a child process, with
dints3d's ``--set`` overrides, for ``dints3d train`` and ``dints3d infer``.

The bundle runs in a child process rather than calling ``monai.bundle.run`` in this one. Bundle configs evaluate
arbitrary ``$`` expressions, apply ``configs/logging.conf`` to the root logger, seed every RNG and put the bundle on
``sys.path``; a child process keeps all of that out of dints3d (the demo runs several bundles in a row), behaves
exactly like the command the user is shown and can rerun without dints3d, and frees every byte when it ends. The
price is a few seconds of start-up per call.

``--set key=value`` overrides a bundle config id (``#`` separates levels, e.g. ``validate#inferer#overlap=0.25``);
values are YAML, like dints3d's own ``--set`` (``amp=false``, ``patch_size=[64,64,32]``).

``--nproc N`` runs N processes on this machine with ``torchrun --standalone`` and the bundle's ``multi_gpu_*.yaml``
overlay (one process per GPU; gloo processes on a CPU-only machine). Several machines: ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import pydoc
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

import dints3d
from dints3d.bundle.input_checks import NetworkInput
from dints3d.config import suggest_key
from dints3d.utils.errors import DintsError
from dints3d.utils.io import load_yaml_text, read_json
from dints3d.utils.processes import guarded, run_child

#: the module every child process starts through (it dies with its parent)
PROCESS_GUARD = guarded([])[0]

#: a bundle path written as train.yaml writes ckpt_dir and output_dir: ``$@bundle_root + '/models'``
BUNDLE_RELATIVE = re.compile(r"\$@bundle_root\s*\+\s*'/([^']*)'")


def config_file(bundle: str | os.PathLike, name: str) -> Path:
    """``BUNDLE/configs/<name>``, which must exist."""
    path = Path(bundle) / "configs" / name
    if not path.is_file():
        raise DintsError(bundle, f"not a bundle with configs/{name} (create one with `dints3d export`)")
    return path


def parse_set(text: str) -> tuple[str, str, Any]:
    """``"key=value"`` → (key, the value's text, the value as YAML; a value that is not YAML stays a string).

    Scientific notation (``5e-1``) is a float, as ``fire`` reads it when ``monai.bundle run`` gets the text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DintsError("--set", f"expected key=value, got '{text}'")
    try:
        value = load_yaml_text(raw)
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip(), raw, value


def override_args(sets: list[str] | tuple[str, ...]) -> list[str]:
    """``["key=value", …]`` → ``["--key", "value", …]`` for ``monai.bundle run``; YAML values are written as
    Python literals (what ``fire`` parses), strings pass through unchanged."""
    args: list[str] = []
    for text in sets:
        key, raw, value = parse_set(text)
        args += [f"--{key}", raw if isinstance(value, str) else repr(value)]
    return args


def config_values(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The top-level items of ``BUNDLE/configs/<configs>`` merged in order (a later file's item replaces an earlier
    one's, as ``monai.bundle run`` merges them), values as written (``$`` expressions unevaluated)."""
    merged: dict[str, Any] = {}
    for name in configs:
        path = config_file(bundle, name)
        try:
            data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else read_json(path)
        except (OSError, yaml.YAMLError) as e:
            raise DintsError(path, f"cannot read as YAML: {e}") from None
        if not isinstance(data, dict):
            raise DintsError(path, "must be a mapping of config items")
        merged.update(data)
    return merged


def _set_problem(key: str, value: Any, values: dict[str, Any]) -> str | None:
    """Why ``--set key=value`` cannot apply to the config ``values`` (an unknown id, with the nearest known one; a
    value of another type than the current plain number, boolean or list), or ``None``."""
    current: Any = values
    parts = key.split("#")
    for depth, part in enumerate(parts):
        prefix = "#".join(parts[:depth])
        prefix = prefix + "#" if prefix else ""
        if isinstance(current, dict):
            if part not in current:
                known = [str(k) for k in current]
                hint = suggest_key(part, known, prefix)
                if not hint.startswith("; did you mean") and len(known) > 12:
                    hint = "; no id of the bundle's configs is close (see the configs for the ids)"
                return f"unknown setting '{key}'{hint}"
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return f"unknown setting '{key}': '{prefix.rstrip('#')}' has no item '{part}'"
    if isinstance(value, str) and value.startswith("$"):
        return None  # an expression: evaluated by the bundle run

    def plain_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(current, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif plain_int(current):
        ok, what = plain_int(value), "an integer"
    elif isinstance(current, float):
        ok, what = (plain_int(value) or isinstance(value, float)) and _finite(value), "a finite number"
    elif isinstance(current, list):
        ok, what = isinstance(value, list), "a list such as [1, 2, 3]"
    else:
        return None  # strings, references, expressions, mappings: the bundle run checks them
    return None if ok else f"'{key}' must be {what} (it is {current!r}), got {value!r}"


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_sets(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...], sets: list[str] | tuple[str, ...],
               ) -> None:
    """Refuse, before anything runs, a ``--set`` whose id the bundle's ``configs`` do not have (naming the nearest
    one: ``monai.bundle run`` would add it and go on) or whose value has another type than the current plain value
    (``num_iterations=abc``)."""
    values = config_values(bundle, configs)
    for text in sets:
        key, _, value = parse_set(text)
        problem = _set_problem(key, value, values)
        if problem:
            raise DintsError("--set", f"{problem} (configs/{', configs/'.join(configs)} of {bundle})")


def applicable_sets(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...], sets: list[str] | tuple[str, ...]
                    ) -> list[str]:
    """The ``sets`` whose ids ``configs`` have (e.g. the settings of a training that also apply to its inference)."""
    values = config_values(bundle, configs)
    return [text for text in sets if _set_problem(parse_set(text)[0], parse_set(text)[2], values) is None]


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a module: ``python -m``, or ``torchrun`` with ``nproc`` local processes, each
    process started through :mod:`dints3d.utils.processes` so that it dies with its parent (no orphan trains on after
    dints3d is killed)."""
    if nproc < 1:
        raise DintsError("--nproc", f"must be ≥ 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m", *guarded([])]
    return [sys.executable, "-m", *guarded(["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                            "-m", *guarded([])])]


def shown_command(cmd: list[str]) -> list[str]:
    """``cmd`` as the user would type it (``python -m monai.bundle …``, ``torchrun … -m monai.bundle …``), without
    the die-with-parent entry points."""
    words = [word for i, word in enumerate(cmd) if not (word == PROCESS_GUARD and cmd[i - 1] == "-m")]
    if "torch.distributed.run" in words:
        return ["torchrun", *words[words.index("torch.distributed.run") + 1:]]
    return ["python", *words[1:]]


#: a dotted dints3d name in a bundle config (``_target_: dints3d.bundle.handlers.RunSettings``, ``$from dints3d.x import``)
DINTS3D_NAME = re.compile(r"\bdints3d(?:\.[A-Za-z_]\w*)+")


def check_dints3d_names(bundle: str | os.PathLike, configs: list[str]) -> None:
    """Refuse, in one line, a bundle whose configs name dints3d modules or objects this dints3d does not have: it was
    exported by another version (e.g. before the modules moved), and ``monai.bundle run`` would fail with a
    traceback deep in its config parser."""
    for name in configs:
        path = config_file(bundle, name)
        for dotted in sorted(set(DINTS3D_NAME.findall(path.read_text()))):
            if pydoc.locate(dotted) is None:
                raise DintsError(path, f"names {dotted}, which this dints3d ({dints3d.__version__}) does not have: the "
                                 "bundle was exported by another dints3d version; export it again with `dints3d "
                                 "export` (its arch.json and trained models/*.pt stay usable)")


def bundle_run(bundle: str | os.PathLike, configs: list[str], args: list[str], log: Path | None = None,
               nproc: int = 1, env: Mapping[str, str] | None = None, keep_fds: tuple[int, ...] = ()) -> int:
    """Run ``python -m monai.bundle run`` (``torchrun`` with ``nproc`` processes if > 1) on
    ``BUNDLE/configs/<configs>`` with ``args`` and ``env`` added to the environment; print the command; send the
    child's output to ``log`` (appended) if given. The child dies with this process (:mod:`dints3d.utils.processes`);
    it inherits the descriptors ``keep_fds`` (the lock on the folder it writes). Returns its exit status."""
    bundle = Path(bundle).absolute()
    check_dints3d_names(bundle, configs)
    files = [str(config_file(bundle, name)) for name in configs]
    cmd = [*launcher(nproc), "monai.bundle", "run", "--config_file",
           files[0] if len(files) == 1 else repr(files), "--bundle_root", str(bundle), *args]
    prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in (env or {}).items())
    print("running: " + prefix + shlex.join(shown_command(cmd)), flush=True)
    child_env = {**os.environ, **env} if env else None
    if log is None:
        return run_child(cmd, child_env, pass_fds=keep_fds)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return run_child(cmd, child_env, stdout=out, stderr=subprocess.STDOUT, pass_fds=keep_fds)


def bundle_folder(value: Any, bundle: Path) -> Path | None:
    """The folder a config value names: a plain path, or ``$@bundle_root + '/sub'``; ``None`` for other
    expressions (which only the bundle run evaluates)."""
    if not isinstance(value, str):
        return None
    if not value.startswith("$"):
        return Path(value)
    match = BUNDLE_RELATIVE.fullmatch(value.strip())
    return bundle / match.group(1) if match else None


@dataclass
class InferResult:
    """What ``infer`` did: masks written per input, and one problem per input that was not segmented."""

    masks: dict[Path, Path] = field(default_factory=dict)
    failures: dict[Path, str] = field(default_factory=dict)
    returncode: int = 0


def network_channels(bundle: str | os.PathLike) -> int:
    """The input channel count the bundle's network expects (``metadata.json``)."""
    path = config_file(bundle, "metadata.json")
    try:
        return int(read_json(path)["network_data_format"]["inputs"]["image"]["num_channels"])
    except (KeyError, TypeError, ValueError):
        raise DintsError(path, "no network_data_format.inputs.image.num_channels") from None


def network_input(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...] = ("inference.yaml",)
                  ) -> NetworkInput:
    """What the bundle's network takes: its channels (``metadata.json``) and the spacing its inference resamples to
    (``target_spacing`` of ``configs``, when it is a plain list of numbers)."""
    spacing = config_values(bundle, configs).get("target_spacing")
    plain = isinstance(spacing, list) and spacing and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and _finite(v) and v > 0 for v in spacing)
    return NetworkInput(network_channels(bundle), tuple(float(v) for v in spacing) if plain else None)


def inference_setting(bundle: str | os.PathLike, key: str, sets: list[str] | tuple[str, ...] = (),
                      default: Any = None, configs: list[str] | tuple[str, ...] = ("inference.yaml",)) -> Any:
    """The top-level value ``key`` an inference run will use: the last ``--set key=...`` of ``sets``, else the
    value written in ``configs`` (``$`` expressions unevaluated), else ``default``."""
    overrides = [parse_set(text) for text in sets]
    given = [value for name, _, value in overrides if name == key]
    return given[-1] if given else config_values(bundle, configs).get(key, default)


def inference_models(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...],
                     sets: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The weight files an inference with ``configs`` and ``sets`` loads: the ensemble's checkpoints
    (``ensemble.yaml``), else ``ckpt_path`` (a ``--set`` or the config's, relative to the bundle); none where it is
    an expression only the bundle run can evaluate."""
    bundle = Path(bundle).absolute()
    values = config_values(bundle, configs)
    overrides = {parse_set(text)[0]: parse_set(text)[2] for text in sets}
    if "members" in values and isinstance(values["members"], list):
        return [bundle / str(name) for member in values["members"] if isinstance(member, dict)
                for name in member.get("checkpoints", [])]
    path = bundle_folder(overrides.get("ckpt_path", values.get("ckpt_path")), bundle)
    return [] if path is None else [path if path.is_absolute() else Path.cwd() / path]


def check_models(bundle: str | os.PathLike, configs: list[str] | tuple[str, ...],
                 sets: list[str] | tuple[str, ...] = ()) -> None:
    """Refuse, before any input is read, an inference whose weights are missing, empty or unreadable (truncated,
    not a state dict): ``monai.bundle run`` would stop with a long traceback."""
    for path in inference_models(bundle, configs, sets):
        if not path.is_file():
            raise DintsError(path, "no trained model here: train the bundle first (dints3d train BUNDLE), or give "
                             "the weights with --set ckpt_path=FILE")
        if path.stat().st_size == 0:
            raise DintsError(path, "is empty (0 bytes; a copy or a write that did not finish?): train again or "
                             "restore the file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means "unreadable"
            raise DintsError(path, f"cannot be read as trained weights (truncated or corrupt? {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else ''}): train again or restore the file") \
                from None
        if not isinstance(state, dict) or not state:
            raise DintsError(path, "holds no weights (not a state dict)")


#: ``--device`` choices of ``dints3d train`` and ``dints3d infer``
DEVICES = ("auto", "cpu", "cuda")


def device_env(device: str, nproc: int = 1) -> dict[str, str]:
    """Environment variables that make a bundle run use ``device``: ``auto`` (a GPU if there is one), ``cpu`` (the
    GPUs hidden: ``CUDA_VISIBLE_DEVICES=""``) or ``cuda`` (an error without a GPU); ``nproc`` processes need a GPU
    each when GPUs are used."""
    if device not in DEVICES:
        raise DintsError("--device", f"must be one of {', '.join(DEVICES)}, got '{device}'")
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus == 0:
        raise DintsError("--device", "'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if 0 < gpus < nproc:
        raise DintsError("--nproc", f"{nproc} processes need {nproc} GPUs (one each), {gpus} visible; use --nproc "
                         f"{gpus}, or --device cpu for CPU processes")
    return {}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto (a GPU if there is one), cpu, or cuda (an error without a GPU)")


def add_nproc_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help=f"{what} with N processes on this machine: one per GPU, or gloo processes on CPU "
                             "(default 1)")
