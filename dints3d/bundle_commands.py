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

``dints3d train`` checks before it starts (:func:`preflight_training`): the checkpoint and log folders are writable,
the disk has room for the checkpoints and the RAM for the data cache, the patch fits the architecture, and a GPU
asked for with ``--device cuda`` exists. It never overwrites a training: without ``--resume``, a bundle that already
holds checkpoints or a ``model.pt`` is refused; ``--resume`` continues one only if its recorded settings are unchanged
(train.yaml's ``resume_mode``, see :class:`dints3d.training.ResumeCheck`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from dints3d.errors import DintsError
from dints3d.infer_checks import case_name, check_image, collect_inputs
from dints3d.io import load_yaml_text, read_json
from dints3d.preflight import check_free_disk, check_writable, estimate_cache_bytes

#: a bundle path written as train.yaml writes ckpt_dir and output_dir: ``$@bundle_root + '/models'``
BUNDLE_RELATIVE = re.compile(r"\$@bundle_root\s*\+\s*'/([^']*)'")
#: ``dints3d train --device`` choices
TRAIN_DEVICES = ("auto", "cpu", "cuda")


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


def bundle_run(bundle: str | os.PathLike, configs: list[str], args: list[str], log: Path | None = None,
               nproc: int = 1, env: Mapping[str, str] | None = None) -> int:
    """Run ``python -m monai.bundle run`` (``torchrun`` with ``nproc`` processes if > 1) on
    ``BUNDLE/configs/<configs>`` with ``args`` and ``env`` added to the environment; print the command; send the
    child's output to ``log`` (appended) if given. Returns its exit status."""
    bundle = Path(bundle).absolute()
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


# ------------------------------------------------------------------------------------------------------------ train
def train(bundle: str | os.PathLike, work: str | os.PathLike | None = None, sets: list[str] | tuple[str, ...] = (),
          log: Path | None = None, nproc: int = 1, resume: bool | str = False, device: str = "auto") -> int:
    """Retrain the bundle's architecture (``configs/train.yaml``, with ``multi_gpu_train.yaml`` on ``nproc`` > 1
    processes) after :func:`preflight_training`.

    ``resume``: ``False`` refuses a bundle that already holds a training (checkpoints or ``model.pt``); ``True``
    continues one from its newest readable checkpoint, refusing changed settings (except
    :data:`dints3d.training.SAFE_TO_CHANGE`); ``"auto"`` does that when there is a checkpoint and starts fresh
    otherwise. ``device``: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda`` (an error without one)."""
    bundle = Path(bundle).absolute()
    train_yaml = config_file(bundle, "train.yaml")
    launcher(nproc)
    if device not in TRAIN_DEVICES:
        raise DintsError("--device", f"must be one of {', '.join(TRAIN_DEVICES)}, got '{device}'")
    args = []
    if work is not None:
        if not (Path(work) / "datalist.json").is_file():
            raise DintsError(work, "no datalist.json here; give the folder written by `dints3d prepare`")
        args += ["--work_dir", str(Path(work).absolute())]
    settings = train_settings(train_yaml, sets, work)
    env = preflight_training(bundle, settings, nproc, device)
    mode = resume_mode(resume, bundle_folder(settings.get("ckpt_dir"), bundle))
    configs = ["train.yaml", "multi_gpu_train.yaml"] if nproc > 1 else ["train.yaml"]
    return bundle_run(bundle, configs, args + ["--resume_mode", mode] + override_args(sets), log, nproc, env)


def train_settings(train_yaml: Path, sets: list[str] | tuple[str, ...] = (),
                   work: str | os.PathLike | None = None) -> dict[str, Any]:
    """train.yaml's top-level values as written (``$`` expressions unevaluated) with the ``--set`` overrides of
    top-level ids and ``--work`` applied."""
    try:
        config = yaml.safe_load(train_yaml.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DintsError(train_yaml, f"cannot read as YAML: {e}") from None
    if not isinstance(config, dict) or "resume_mode" not in config:
        raise DintsError(train_yaml, "has no resume_mode (a bundle exported by an older dints3d): export it again, or "
                         "run it with `python -m monai.bundle run`")
    for text in sets:
        key, _, value = parse_set(text)
        if key == "resume_mode":
            raise DintsError("--set", "resume_mode is set by dints3d train (use --resume)")
        if "#" not in key:
            config[key] = value
    if work is not None:
        config["work_dir"] = str(Path(work).absolute())
    return config


def bundle_folder(value: Any, bundle: Path) -> Path | None:
    """The folder a config value names: a plain path, or ``$@bundle_root + '/sub'``; ``None`` for other
    expressions (which only the bundle run evaluates)."""
    if not isinstance(value, str):
        return None
    if not value.startswith("$"):
        return Path(value)
    match = BUNDLE_RELATIVE.fullmatch(value.strip())
    return bundle / match.group(1) if match else None


def resume_mode(resume: bool | str, ckpt_dir: Path | None) -> str:
    """train.yaml's ``resume_mode`` for ``--resume`` (``True``, ``False`` or ``"auto"``), after checking ``ckpt_dir``
    (when the parent can name it; the bundle run checks again)."""
    from dints3d.training import refuse_existing_training, training_state_files

    if resume not in (True, False, "auto"):
        raise DintsError("--resume", f"expected no value or 'auto', got '{resume}'")
    checkpoints = [p for p in training_state_files(ckpt_dir) if p.name != "model.pt"] if ckpt_dir else None
    if resume == "auto":  # an unknown checkpoint folder: the bundle run resumes from whatever it holds
        return "newest" if checkpoints is None else "same_settings" if checkpoints else "never"
    if resume:
        if checkpoints == []:
            raise DintsError(ckpt_dir, "no checkpoint_epoch=N.pt to resume from (start without --resume)")
        return "same_settings"
    if ckpt_dir is not None:
        refuse_existing_training(ckpt_dir, "continue it with --resume")
    return "never"


#: bytes per parameter of a checkpoint_epoch=N.pt (fp32 weights and SGD momentum) and of model.pt (weights)
CHECKPOINT_BYTES_PER_PARAMETER, MODEL_BYTES_PER_PARAMETER = 8, 4
#: checkpoints on disk at once: the two kept (n_saved) and the one being written; model.pt and its temporary copy
CHECKPOINTS_AT_ONCE, MODELS_AT_ONCE = 3, 2


def preflight_training(bundle: Path, settings: Mapping[str, Any], nproc: int = 1, device: str = "auto"
                       ) -> dict[str, str]:
    """Checks before a bundle training starts, each failing with one line (:class:`DintsError`): the device, writable
    ``ckpt_dir`` and ``output_dir``, the patch against the architecture, free disk for the checkpoints and free RAM
    for the data cache. Values that are ``$`` expressions are left to the bundle run. Returns environment variables
    for the run (``CUDA_VISIBLE_DEVICES=""`` hides the GPUs from a ``--device cpu`` run)."""
    env = _check_device(device, nproc)
    for key in ("ckpt_dir", "output_dir"):
        folder = bundle_folder(settings.get(key), bundle)
        if folder is not None:
            check_writable(folder)
    parameters = _parameter_count(bundle, settings)
    ckpt_dir = bundle_folder(settings.get("ckpt_dir"), bundle)
    if ckpt_dir is not None and parameters is not None:
        from dints3d.training import training_state_files

        needed = (CHECKPOINTS_AT_ONCE * CHECKPOINT_BYTES_PER_PARAMETER + MODELS_AT_ONCE * MODEL_BYTES_PER_PARAMETER) \
            * parameters - sum(p.stat().st_size for p in training_state_files(ckpt_dir))
        check_free_disk(ckpt_dir, needed, purpose=f"the checkpoints of a {parameters / 1e6:.1f} M-parameter network",
                        advice="free space, or --set ckpt_dir=FOLDER on another disk")
    _check_cache_memory(settings)
    return env


def _check_device(device: str, nproc: int) -> dict[str, str]:
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus == 0:
        raise DintsError("--device", "'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if 0 < gpus < nproc:
        raise DintsError("--nproc", f"{nproc} processes need {nproc} GPUs (one each), {gpus} visible; use --nproc "
                         f"{gpus}, or --device cpu for CPU processes")
    return {}


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parameter_count(bundle: Path, settings: Mapping[str, Any]) -> int | None:
    """Parameters of the network train.yaml builds (on the meta device), after checking ``patch_size`` against the
    architecture; ``None`` when a setting it needs is a ``$`` expression."""
    from dints3d.spaces.base import load_architecture

    arch = load_architecture(bundle / "models" / "arch.json")
    patch = settings.get("patch_size")
    if arch.space == "dints" and isinstance(patch, list):
        from dints3d.spaces.dints import patch_divisor

        divisor = patch_divisor(arch.num_depths, arch.use_downsample)
        if len(patch) != arch.spatial_dims or not all(_plain_number(p) and p > 0 and p % divisor == 0 for p in patch):
            raise DintsError("patch_size", f"{patch} must be {arch.spatial_dims} positive multiples of {divisor} for "
                             f"this architecture ({arch.num_depths} depths); set it with --set patch_size=[..]")
    channels = [settings.get(key) for key in ("in_channels", "out_channels", "channel_mul")]
    options = settings.get("build_options", {})
    if not all(_plain_number(v) for v in channels) or not isinstance(options, dict):
        return None
    from dints3d.memory import meta_network

    try:
        model = meta_network(arch, int(channels[0]), int(channels[1]), channel_mul=float(channels[2]), **options)
    except (TypeError, ValueError, RuntimeError):  # an impossible width: the bundle run reports it
        return None
    return sum(p.numel() for p in model.parameters())


def available_memory() -> int | None:
    """Bytes of RAM available to new allocations (``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_cache_memory(settings: Mapping[str, Any]) -> None:
    """The bundle caches the preprocessed training and validation cases in RAM (``CacheDataset``, ``cache_rate`` of
    them): refuse a cache that cannot fit, suggesting a ``cache_rate`` that does."""
    rate, fold, work = settings.get("cache_rate"), settings.get("fold"), settings.get("work_dir")
    if not _plain_number(rate) or rate <= 0 or not _plain_number(fold) or not isinstance(work, str) \
            or work.startswith("$"):
        return
    try:
        plan, datalist = read_json(Path(work) / "plan.json"), read_json(Path(work) / "datalist.json")
        cases = sum(len(datalist[f"fold{int(fold)}_{part}"]) for part in ("train", "validation"))
        full = estimate_cache_bytes(plan, cases)
    except (DintsError, KeyError, TypeError, ValueError):
        return  # a broken WORK folder is reported by the bundle run, naming the file
    needed, available = full * min(float(rate), 1.0), available_memory()
    if available is not None and needed > available:
        fitting = math.floor(10 * 0.8 * available / max(full, 1)) / 10
        raise DintsError("cache_rate", f"caching {min(float(rate), 1.0):g} of {cases} cases needs about "
                         f"{needed / 2**30:.1f} GiB of RAM, {available / 2**30:.1f} GiB available; lower it, e.g. "
                         f"--set cache_rate={fitting:g}")


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
    from dints3d.training import SAFE_TO_CHANGE

    safe = ", ".join(key for key in SAFE_TO_CHANGE if key != "world_size")
    parser.add_argument("bundle", help="bundle folder (written by `dints3d export`)")
    parser.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"), default=None,
                        help="continue the bundle's training from its newest readable checkpoint, refusing changed "
                             f"settings except {safe} and the number of processes; `--resume auto` continues when "
                             "there is a checkpoint and starts fresh otherwise. Without --resume a bundle that "
                             "already holds a training (checkpoints or model.pt) is refused")
    parser.add_argument("--work", help="prepared folder (datalist.json) instead of the one recorded in the bundle")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, e.g. num_iterations=2000 or amp=false (repeatable)")
    parser.add_argument("--device", choices=TRAIN_DEVICES, default="auto",
                        help="auto (a GPU if there is one), cpu, or cuda (an error without a GPU); default auto")
    _add_nproc(parser, "train data-parallel (torchrun + configs/multi_gpu_train.yaml)")


def _add_nproc(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help=f"{what} with N processes on this machine: one per GPU, or gloo processes on CPU "
                             "(default 1)")


def run_train(args: argparse.Namespace) -> int:
    resume = {None: False, "yes": True, "auto": "auto"}[args.resume]
    status = train(args.bundle, args.work, args.sets, nproc=args.nproc, resume=resume, device=args.device)
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
