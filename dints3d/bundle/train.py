"""``dints3d train``: retrain a bundle's architecture with its ``configs/train.yaml`` (:mod:`dints3d.bundle.runner`).

The bundle names its data relative to itself (``dataset_dir`` in train.yaml, ``work_dir`` in search.yaml, as
``dints3d export`` found them); ``--work WORK`` points the run at a prepared folder instead (its ``datalist.json``
and the task folder it names). ``dints3d train`` checks before it starts (:func:`preflight_training`): the task folder
exists, the checkpoint and log folders are writable, the disk has room for the checkpoints and the RAM for the data
cache, the patch fits the architecture, and a GPU asked for with ``--device cuda`` exists. It never overwrites a training: without ``--resume``, a bundle that already
holds checkpoints or a ``model.pt`` is refused; ``--resume`` continues one only if its recorded settings are unchanged
(train.yaml's ``resume_mode``, see :class:`dints3d.bundle.handlers.ResumeCheck`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from dints3d.bundle.handlers import refuse_existing_training, training_state_files
from dints3d.bundle.runner import (
    bundle_folder,
    bundle_run,
    check_sets,
    config_file,
    device_env,
    launcher,
    override_args,
    parse_set,
)
from dints3d.cost.memory import meta_network
from dints3d.data.dataset import check_items
from dints3d.data.fingerprint import read_plan
from dints3d.data.patch import check_patch_sides
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json
from dints3d.utils.lock import locked_folder
from dints3d.utils.outputs import check_output_folder
from dints3d.utils.preflight import (
    check_free_disk,
    check_writable,
    estimate_cache_bytes,
)


# ------------------------------------------------------------------------------------------------------------ train
def train(bundle: str | os.PathLike, work: str | os.PathLike | None = None, sets: list[str] | tuple[str, ...] = (),
          log: Path | None = None, nproc: int = 1, resume: bool | str = False, device: str = "auto",
          env: Mapping[str, str] | None = None) -> int:
    """Retrain the bundle's architecture (``configs/train.yaml``, with ``multi_gpu_train.yaml`` on ``nproc`` > 1
    processes) after :func:`preflight_training`.

    ``resume``: ``False`` refuses a bundle that already holds a training (checkpoints or ``model.pt``); ``True``
    continues one from its newest readable checkpoint, refusing changed settings (except
    :data:`dints3d.bundle.handlers.SAFE_TO_CHANGE`); ``"auto"`` does that when there is a checkpoint and starts fresh
    otherwise. ``device``: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda`` (an error without one). ``env``:
    environment variables for the bundle run."""
    bundle = Path(bundle).absolute()
    train_yaml = config_file(bundle, "train.yaml")
    launcher(nproc)
    configs = ["train.yaml", "multi_gpu_train.yaml"] if nproc > 1 else ["train.yaml"]
    check_sets(bundle, configs, sets)
    settings = train_settings(train_yaml, sets, work)
    if work is not None:
        check_task_matches(bundle, settings, Path(work).absolute())
    args = [] if work is None else [item for key in work_settings(settings) for item in (f"--{key}", settings[key])]
    env = {**(env or {}), **preflight_training(bundle, settings, nproc, device, work)}
    ckpt_dir = bundle_folder(settings.get("ckpt_dir"), bundle)
    # one training per checkpoint folder; the bundle run inherits the lock, so the folder stays locked until it ends
    with locked_folder(ckpt_dir or bundle) as lock:
        mode = resume_mode(resume, ckpt_dir)
        return bundle_run(bundle, configs, args + ["--resume_mode", mode] + override_args(sets), log, nproc, env,
                          keep_fds=(lock.fd,))


def work_settings(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The train.yaml settings ``--work`` sets: the datalist and the task folder (MSD bundles), or the prepared folder
    (Cityscapes bundles, whose train.yaml reads ``work_dir``)."""
    return ("datalist_file", "dataset_dir") if "datalist_file" in config else ("work_dir",)


def work_datalist(work: str | os.PathLike) -> Path:
    """A prepared folder's ``datalist.json`` (absolute), which must exist."""
    datalist = Path(work).absolute() / "datalist.json"
    if not datalist.is_file():
        raise DintsError(work, "no datalist.json here; give the folder written by `dints3d prepare`")
    return datalist


def work_data(work: str | os.PathLike) -> tuple[Path, Path]:
    """A prepared folder's ``datalist.json`` and the task folder it names (``task_dir``), both absolute."""
    datalist = work_datalist(work)
    task_dir = read_json(datalist).get("task_dir")
    if not isinstance(task_dir, str):
        raise DintsError(datalist, "names no task_dir; rerun `dints3d prepare`")
    return datalist, Path(task_dir)


def recorded_work(bundle: Path) -> Path | None:
    """The prepared folder ``dints3d export`` recorded (search.yaml's ``work_dir``, relative to the bundle), if a
    ``datalist.json`` is there."""
    path = bundle / "configs" / "search.yaml"
    try:
        value = yaml.safe_load(path.read_text()).get("work_dir")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    folder = bundle_folder(value, bundle)
    return folder if folder is not None and (folder / "datalist.json").is_file() else None


def train_settings(train_yaml: Path, sets: list[str] | tuple[str, ...] = (),
                   work: str | os.PathLike | None = None) -> dict[str, Any]:
    """train.yaml's top-level values as written (``$`` expressions unevaluated) with the ``--set`` overrides of
    top-level ids and ``--work`` (its datalist and task folder) applied."""
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
    if work is not None and "datalist_file" in config:
        datalist, task_dir = work_data(work)
        config["datalist_file"] = str(datalist)
        if not any(parse_set(text)[0] == "dataset_dir" for text in sets):  # the images of WORK's task
            config["dataset_dir"] = str(task_dir)
    elif work is not None:
        config["work_dir"] = str(work_datalist(work).parent)
    return config


def check_task_matches(bundle: Path, settings: Mapping[str, Any], work: Path) -> None:
    """Refuse a ``--work`` prepared for a task the bundle's network cannot take (other channel or class counts); say
    so when it is another task whose preprocessing differs (the bundle's own is used)."""
    plan = read_plan(work)
    wanted = {key: settings.get(key) for key in ("in_channels", "out_channels")}
    got = {key: plan.get(key) for key in wanted}
    if all(_plain_number(v) for v in wanted.values()) and got != wanted:
        raise DintsError(work, f"is prepared for {got['in_channels']} channel(s) and {got['out_channels']} classes "
                         f"({plan.get('name')}), but the bundle's network takes {wanted['in_channels']} and "
                         f"{wanted['out_channels']}: export a bundle for this task (dints3d export --work {work})")
    spacing = settings.get("target_spacing")
    if isinstance(spacing, list) and [float(v) for v in plan.get("target_spacing", [])] != [float(v) for v in spacing]:
        print(f"warning: {work} ({plan.get('name')}) has target spacing {plan.get('target_spacing')}; the bundle "
              f"resamples to {spacing} and normalizes as it was exported", file=sys.stderr, flush=True)


def resume_mode(resume: bool | str, ckpt_dir: Path | None) -> str:
    """train.yaml's ``resume_mode`` for ``--resume`` (``True``, ``False`` or ``"auto"``), after checking ``ckpt_dir``
    (when the parent can name it; the bundle run checks again)."""
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


def preflight_training(bundle: Path, settings: Mapping[str, Any], nproc: int = 1, device: str = "auto",
                       work: str | os.PathLike | None = None) -> dict[str, str]:
    """Checks before a bundle training starts, each failing with one line (:class:`DintsError`): the device, the task
    folder (``dataset_dir``), writable ``ckpt_dir`` and ``output_dir``, the patch against the architecture, free disk
    for the checkpoints and free RAM for the data cache (sized from ``work``'s plan, else the recorded prepared
    folder's). Values that are other ``$`` expressions are left to the bundle run. Returns environment variables for
    the run (``CUDA_VISIBLE_DEVICES=""`` hides the GPUs from a ``--device cpu`` run)."""
    env = device_env(device, nproc)
    task = bundle_folder(settings.get("dataset_dir"), bundle)
    if task is not None and not task.is_dir():
        raise DintsError(task, "dataset_dir: no such folder (the bundle names the task relative to itself); give "
                         "--work WORK, the folder written by `dints3d prepare`, or --set dataset_dir=TASK")
    for key in ("ckpt_dir", "output_dir"):
        folder = bundle_folder(settings.get(key), bundle)
        if folder is not None:
            check_output_folder(folder)
            check_writable(folder)
    _check_cases(bundle, settings)
    parameters = _parameter_count(bundle, settings)
    ckpt_dir = bundle_folder(settings.get("ckpt_dir"), bundle)
    if ckpt_dir is not None and parameters is not None:
        needed = (CHECKPOINTS_AT_ONCE * CHECKPOINT_BYTES_PER_PARAMETER + MODELS_AT_ONCE * MODEL_BYTES_PER_PARAMETER) \
            * parameters - sum(p.stat().st_size for p in training_state_files(ckpt_dir))
        check_free_disk(ckpt_dir, needed, purpose=f"the checkpoints of a {parameters / 1e6:.1f} M-parameter network",
                        advice="free space, or --set ckpt_dir=FOLDER on another disk")
    _check_cache_memory(settings, Path(work) if work is not None else recorded_work(bundle))
    return env


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parameter_count(bundle: Path, settings: Mapping[str, Any]) -> int | None:
    """Parameters of the network train.yaml builds (on the meta device), after checking ``patch_size`` against the
    architecture; ``None`` when a setting it needs is a ``$`` expression."""
    arch = load_architecture(bundle / "models" / "arch.json")
    patch = settings.get("patch_size")
    if isinstance(patch, list):
        check_patch_sides(patch, arch.spatial_dims, arch.patch_divisor, "patch_size", arch.patch_requirement)
    channels = [settings.get(key) for key in ("in_channels", "out_channels", "channel_mul")]
    options = settings.get("build_options", {})
    if not all(_plain_number(v) for v in channels) or not isinstance(options, dict):
        return None
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


def _check_cases(bundle: Path, settings: Mapping[str, Any]) -> None:
    """The cases the training reads (``fold``'s training and validation lists of ``datalist_file``, relative to
    ``dataset_dir``) exist and have the channels the network takes (:func:`~dints3d.data.dataset.check_items`)."""
    datalist = bundle_folder(settings.get("datalist_file"), bundle)
    base = bundle_folder(settings.get("dataset_dir"), bundle)
    fold, channels = settings.get("fold"), settings.get("in_channels")
    if datalist is None or base is None or not _plain_number(fold) or not _plain_number(channels) \
            or not datalist.is_file():
        return  # expressions (the bundle run evaluates them), or a Cityscapes bundle
    data = read_json(datalist)
    items = [{k: str(base / v) if k in ("image", "label") else v for k, v in item.items()}
             for part in ("train", "validation") for item in data.get(f"fold{int(fold)}_{part}", [])
             if isinstance(item, dict)]
    check_items(items, int(channels), bundle / "configs" / "train.yaml",
                "the task folder moved; pass its location with --set dataset_dir=FOLDER or --work WORK")


def _check_cache_memory(settings: Mapping[str, Any], work: Path | None) -> None:
    """The bundle caches the preprocessed training and validation cases in RAM (``CacheDataset``, ``cache_rate`` of
    them): refuse a cache that cannot fit, suggesting a ``cache_rate`` that does (the case size from ``work``'s
    plan)."""
    rate, fold = settings.get("cache_rate"), settings.get("fold")
    if not _plain_number(rate) or rate <= 0 or not _plain_number(fold) or work is None:
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


