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
import os
import pydoc
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

import dints3d
from dints3d.utils.errors import DintsError
from dints3d.utils.io import load_yaml_text, read_json

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
    except yaml.YAMLError:
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


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a module: ``python -m``, or ``torchrun`` with ``nproc`` local processes."""
    if nproc < 1:
        raise DintsError("--nproc", f"must be ≥ 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]


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
               nproc: int = 1, env: Mapping[str, str] | None = None) -> int:
    """Run ``python -m monai.bundle run`` (``torchrun`` with ``nproc`` processes if > 1) on
    ``BUNDLE/configs/<configs>`` with ``args`` and ``env`` added to the environment; print the command; send the
    child's output to ``log`` (appended) if given. Returns its exit status."""
    bundle = Path(bundle).absolute()
    check_dints3d_names(bundle, configs)
    files = [str(config_file(bundle, name)) for name in configs]
    cmd = [*launcher(nproc), "monai.bundle", "run", "--config_file",
           files[0] if len(files) == 1 else repr(files), "--bundle_root", str(bundle), *args]
    shown = ["torchrun", *cmd[3:]] if nproc > 1 else ["python", *cmd[1:]]
    prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in (env or {}).items())
    print("running: " + prefix + shlex.join(shown), flush=True)
    child_env = {**os.environ, **env} if env else None
    if log is None:
        return subprocess.run(cmd, check=False, env=child_env).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, env=child_env).returncode


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


def add_nproc_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help=f"{what} with N processes on this machine: one per GPU, or gloo processes on CPU "
                             "(default 1)")
