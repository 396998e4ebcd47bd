"""``dints3d train`` and ``dints3d infer``: a bundle's ``python -m monai.bundle run``, with checks and a summary.

Both run the bundle in a child process rather than calling ``monai.bundle.run`` in this one. Bundle configs evaluate
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
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dints3d.errors import DintsError
from dints3d.infer_checks import case_name, check_image, collect_inputs
from dints3d.io import read_json


def config_file(bundle: str | os.PathLike, name: str) -> Path:
    """``BUNDLE/configs/<name>``, which must exist."""
    path = Path(bundle) / "configs" / name
    if not path.is_file():
        raise DintsError(bundle, f"not a bundle with configs/{name} (create one with `dints3d export`)")
    return path


def override_args(sets: list[str] | tuple[str, ...]) -> list[str]:
    """``["key=value", …]`` → ``["--key", "value", …]`` for ``monai.bundle run``; YAML values are written as
    Python literals (what ``fire`` parses), strings pass through unchanged."""
    args: list[str] = []
    for text in sets:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise DintsError("--set", f"expected key=value, got '{text}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        args += [f"--{key.strip()}", raw if isinstance(value, str) else repr(value)]
    return args


def launcher(nproc: int) -> list[str]:
    """The command prefix that runs a module: ``python -m``, or ``torchrun`` with ``nproc`` local processes."""
    if nproc < 1:
        raise DintsError("--nproc", f"must be ≥ 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]


def bundle_run(bundle: str | os.PathLike, configs: list[str], args: list[str], log: Path | None = None,
               nproc: int = 1) -> int:
    """Run ``python -m monai.bundle run`` (``torchrun`` with ``nproc`` processes if > 1) on
    ``BUNDLE/configs/<configs>`` with ``args``; print the command; send the child's output to ``log`` (appended) if
    given. Returns its exit status."""
    bundle = Path(bundle).absolute()
    files = [str(config_file(bundle, name)) for name in configs]
    cmd = [*launcher(nproc), "monai.bundle", "run", "--config_file",
           files[0] if len(files) == 1 else repr(files), "--bundle_root", str(bundle), *args]
    shown = ["torchrun", *cmd[3:]] if nproc > 1 else ["python", *cmd[1:]]
    print("running: " + shlex.join(shown), flush=True)
    if log is None:
        return subprocess.run(cmd, check=False).returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def train(bundle: str | os.PathLike, work: str | os.PathLike | None = None, sets: list[str] | tuple[str, ...] = (),
          log: Path | None = None, nproc: int = 1) -> int:
    """Retrain the bundle's architecture (``configs/train.yaml``, with ``multi_gpu_train.yaml`` on ``nproc`` > 1
    processes; resumes from its newest readable checkpoint)."""
    args = []
    if work is not None:
        if not (Path(work) / "datalist.json").is_file():
            raise DintsError(work, "no datalist.json here; give the folder written by `dints3d prepare`")
        args += ["--work_dir", str(Path(work).absolute())]
    configs = ["train.yaml", "multi_gpu_train.yaml"] if nproc > 1 else ["train.yaml"]
    return bundle_run(bundle, configs, args + override_args(sets), log, nproc)


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


def infer(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
          sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1) -> InferResult:
    """Segment the NIfTI files and folders ``inputs`` into ``out/<case>_seg.nii.gz`` with ``configs/inference.yaml``.

    Every input is checked first (:mod:`dints3d.infer_checks`); a bad one is reported on one line and skipped, the
    others are segmented in one bundle run (split across ``nproc`` processes by ``multi_gpu_inference.yaml``).
    A Cityscapes bundle (``data_type: png``) takes PNG images instead (:mod:`dints3d.cityscapes_infer`)."""
    from dints3d.cityscapes_infer import infer_png, is_png_bundle

    if is_png_bundle(bundle):
        return infer_png(bundle, inputs, out, sets, log, nproc)
    channels = network_channels(bundle)
    configs = ["inference.yaml", "multi_gpu_inference.yaml"] if nproc > 1 else ["inference.yaml"]
    for name in configs:
        config_file(bundle, name)
    launcher(nproc)
    result = InferResult()
    files, result.failures = collect_inputs(inputs)
    for path, problem in result.failures.items():
        print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    good = []
    for path in files:
        problem = check_image(path, channels)
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
        result.returncode = bundle_run(bundle, configs, args + override_args(sets), log, nproc)
    for path in good:
        mask = out / f"{case_name(path)}_seg.nii.gz"
        if mask.is_file():
            result.masks[path] = mask
        else:
            result.failures[path] = f"no mask written (the bundle run exited with status {result.returncode})"
    return result


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (written by `dints3d export`)")
    parser.add_argument("--work", help="prepared folder (datalist.json) instead of the one recorded in the bundle")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, e.g. num_iterations=2000 or amp=false (repeatable)")
    _add_nproc(parser, "train data-parallel (torchrun + configs/multi_gpu_train.yaml)")


def _add_nproc(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help=f"{what} with N processes on this machine: one per GPU, or gloo processes on CPU "
                             "(default 1)")


def run_train(args: argparse.Namespace) -> int:
    status = train(args.bundle, args.work, args.sets, nproc=args.nproc)
    if status == 0:
        print(f"trained: {Path(args.bundle) / 'models' / 'model.pt'} (best validation score)")
    return status


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (written by `dints3d export`)")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help="NIfTI files and/or folders of NIfTI files to segment (Cityscapes bundles: PNG files "
                             "and/or folders searched recursively)")
    parser.add_argument("--out", required=True,
                        help="folder for the masks <case>_seg.nii.gz (Cityscapes: <image>_pred_labelIds.png)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, e.g. sw_overlap=0.25 or ckpt_path=other.pt (repeatable)")
    _add_nproc(parser, "split the cases (configs/multi_gpu_inference.yaml)")


def run_infer(args: argparse.Namespace) -> int:
    result = infer(args.bundle, args.input, args.out, args.sets, nproc=args.nproc)
    print(f"wrote {len(result.masks)} mask(s) to {args.out}")
    if result.failures:
        print(f"{len(result.failures)} input(s) not segmented:", file=sys.stderr)
        for path, problem in result.failures.items():
            print(f"  {path}: {problem}", file=sys.stderr)
        return 1
    return 1 if result.returncode else 0
