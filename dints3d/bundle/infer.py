"""``dints3d infer``: segment images with a bundle's ``configs/inference.yaml`` (:mod:`dints3d.bundle.runner`),
after checking every input, with a summary of what was and was not segmented."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from dints3d.bundle.ensemble import ensemble_configs
from dints3d.bundle.input_checks import NIFTI, InputKind, collect_inputs
from dints3d.bundle.runner import (
    InferResult,
    add_device_argument,
    add_nproc_argument,
    bundle_run,
    check_models,
    check_sets,
    config_file,
    device_env,
    inference_setting,
    launcher,
    network_input,
    override_args,
)
from dints3d.data.formats import bundle_format
from dints3d.utils.errors import DintsError
from dints3d.utils.lock import locked_folder
from dints3d.utils.outputs import cannot_write, check_output_folder
from dints3d.utils.preflight import check_writable

#: the hidden folder inside OUT the bundle writes into; finished predictions are moved out of it
PARTIAL_PREFIX = ".partial-"


def infer(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
          sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1,
          device: str = "auto") -> InferResult:
    """Segment the files and folders ``inputs`` into ``out`` with the bundle's ``configs/inference.yaml``, as the
    bundle's format does (:func:`~dints3d.data.formats.bundle_format`): NIfTI volumes (:func:`infer_nifti`), or PNG
    images for a Cityscapes bundle (``data_type: png``, :mod:`dints3d.cityscapes.infer`). ``device``: ``auto``,
    ``cpu`` or ``cuda`` (:func:`~dints3d.bundle.runner.device_env`)."""
    env = device_env(device, nproc)
    return bundle_format(bundle).stage("infer")(bundle, inputs, out, sets, log, nproc, env)


def segment(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike, kind: InputKind,
            configs: list[str], sets: list[str] | tuple[str, ...] = (), log: Path | None = None,
            nproc: int = 1, env: Mapping[str, str] | None = None) -> InferResult:
    """Check every input (a bad one is reported on one line and skipped), then segment the others in one bundle run
    of ``configs`` (split across ``nproc`` processes) into ``out``.

    Before anything runs: the ``--set`` ids and types (:func:`~dints3d.bundle.runner.check_sets`), the weights
    (:func:`~dints3d.bundle.runner.check_models`), ``out`` (writable; locked while this runs). The bundle writes into
    a hidden temporary folder inside ``out``; each prediction is moved into place once it is complete and readable,
    and only those count, so a full disk never leaves an empty mask that looks written. When the run fails on one
    input (an error no check foresaw; one process), that input is reported and the bundle runs again on the rest.
    Each prediction is announced as it is written (``segmented k/N: <input>``); ``env``: environment variables for
    the bundle run (e.g. :func:`~dints3d.bundle.runner.device_env`)."""
    for name in configs:
        config_file(bundle, name)
    launcher(nproc)
    check_sets(bundle, configs, sets)
    network = network_input(bundle, configs)
    check_models(bundle, configs, sets)
    out = Path(out).absolute()
    check_output_folder(out)
    result = InferResult()
    files, result.failures = collect_inputs(inputs, kind)
    for path, problem in result.failures.items():
        print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    good = []
    for path in files:
        problem = kind.check(path, network)
        if problem is None:
            good.append(path.absolute())
        else:
            result.failures[path] = problem
            print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    if not good:
        if len(result.failures) == 1:
            path, problem = next(iter(result.failures.items()))
            raise DintsError(path, f"{problem}; nothing to segment")
        raise DintsError(", ".join(map(str, inputs)), f"none of the {len(result.failures)} inputs can be segmented "
                         "(each is listed above); nothing to segment")
    with locked_folder(out) as lock:  # the bundle run inherits the lock: the folder stays ours until it ends
        check_writable(out)
        with tempfile.TemporaryDirectory(prefix=PARTIAL_PREFIX, dir=out) as partial:
            for stale in out.glob(f"{PARTIAL_PREFIX}*"):  # left by a killed run (the folder is ours while locked)
                if stale != Path(partial):
                    shutil.rmtree(stale, ignore_errors=True)
            _segment_all(bundle, configs, sets, log, nproc, good, Path(partial), out, kind, result, env, (lock.fd,))
    return result


def _segment_all(bundle: str | os.PathLike, configs: list[str], sets: list[str] | tuple[str, ...], log: Path | None,
                 nproc: int, inputs: list[Path], partial: Path, out: Path, kind: InputKind,
                 result: InferResult, env: Mapping[str, str] | None = None, keep_fds: tuple[int, ...] = ()) -> None:
    """Segment ``inputs`` (bundle runs writing into ``partial``, finished predictions moved to ``out``), recording
    each prediction and failure in ``result``. A run that fails (one process) stopped at the first input without a
    prediction, as inputs are processed in order: that input is reported and the rest run again."""
    remaining = list(inputs)
    while remaining:
        with CaseProgress(partial, kind, remaining, len(inputs) - len(remaining), len(inputs)):
            status = _run_once(bundle, configs, sets, log, nproc, remaining, partial, env, keep_fds)
        result.returncode = result.returncode or status
        done = _move_into_place(partial, out, kind, remaining, result)
        remaining = [path for path in remaining if path not in done]
        if not remaining:
            return
        if status == 0 or nproc > 1:
            for path in remaining:
                result.failures[path] = f"no {kind.what} written (the bundle run exited with status {status})"
            return
        failed, remaining = remaining[0], remaining[1:]
        again = f", the {kind.noun}s after it are segmented again" if remaining else ""
        result.failures[failed] = (f"the bundle run failed on this {kind.noun} (exit status {status}; its output "
                                   f"above says why){again}")
        print(f"error: {DintsError(failed, result.failures[failed]).line()}", file=sys.stderr, flush=True)


def _run_once(bundle: str | os.PathLike, configs: list[str], sets: list[str] | tuple[str, ...], log: Path | None,
              nproc: int, inputs: list[Path], partial: Path, env: Mapping[str, str] | None = None,
              keep_fds: tuple[int, ...] = ()) -> int:
    """One bundle run segmenting ``inputs`` into the folder ``partial``; returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="dints3d-infer-") as tmp:
        datalist = Path(tmp) / "datalist.json"
        datalist.write_text(json.dumps([str(p) for p in inputs]))
        args = ["--datalist", f"$json.loads(pathlib.Path({str(datalist)!r}).read_text())", "--output_dir",
                str(partial)]
        return bundle_run(bundle, configs, args + override_args(sets), log, nproc, env, keep_fds)


def _move_into_place(partial: Path, out: Path, kind: InputKind, inputs: list[Path], result: InferResult) -> set[Path]:
    """Move every complete file the bundle wrote into ``partial`` to ``out`` (a rename: no space needed, never half a
    file) and delete incomplete ones (a full disk); record the predictions of ``inputs`` that arrived in ``result``
    and return those inputs."""
    moved = set()
    for written in sorted(p for p in partial.iterdir() if p.is_file()):
        if not kind.readable(written):
            written.unlink(missing_ok=True)
            continue
        try:
            os.replace(written, out / written.name)
        except OSError as e:
            raise cannot_write(out / written.name, e, "the predictions already moved there are complete") from None
        moved.add(written.name)
    done = set()
    for path in inputs:
        mask = kind.output(out, kind.name(path))
        if mask.name in moved:
            result.masks[path] = mask
            done.add(path)
    return done


def infer_nifti(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
                sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1,
                env: Mapping[str, str] | None = None) -> InferResult:
    """Segment the NIfTI files and folders ``inputs`` into ``out/<case>_seg.nii.gz`` (``<case>.nii.gz`` with
    ``--set output_postfix=''``, MSD / nnU-Net naming) with the bundle's model, or its ensemble when it has one
    (``configs/ensemble.yaml``, :mod:`dints3d.bundle.ensemble`); every input is read completely first
    (:mod:`dints3d.bundle.input_checks`), the cases are split across ``nproc`` processes by
    ``multi_gpu_inference.yaml``."""
    configs = ensemble_configs(bundle) + (["multi_gpu_inference.yaml"] if nproc > 1 else [])
    return segment(bundle, inputs, out, nifti_kind(bundle, sets), configs, sets, log, nproc, env)


def nifti_kind(bundle: str | os.PathLike, sets: list[str] | tuple[str, ...] = ()) -> InputKind:
    """:data:`NIFTI` with the mask name the run will write: ``<case>_<output_postfix>.nii.gz``, or ``<case>.nii.gz``
    when the postfix (inference.yaml's, or a ``--set output_postfix=...``) is empty."""
    postfix = inference_setting(bundle, "output_postfix", sets, default="seg")
    if not isinstance(postfix, str) or postfix.startswith("$"):
        return NIFTI
    suffix = f"_{postfix}" if postfix else ""
    return replace(NIFTI, output=lambda out, name: out / f"{name}{suffix}.nii.gz")


class CaseProgress:
    """While a bundle run writes predictions into ``partial``, print ``segmented k/N: <input>`` for each one that
    appears (a watcher thread polling the folder: the bundle run is another process). ``done``: inputs already
    segmented before this run; ``total``: all inputs."""

    def __init__(self, partial: Path, kind: InputKind, inputs: list[Path], done: int, total: int,
                 interval: float = 0.5):
        self.partial, self.kind, self.done, self.total, self.interval = partial, kind, done, total, interval
        self.waiting = {kind.output(partial, kind.name(path)).name: path for path in inputs}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> CaseProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._report()

    def _watch(self) -> None:
        while not self.stop.wait(self.interval):
            self._report()

    def _report(self) -> None:
        present = {p.name for p in self.partial.iterdir()} if self.partial.is_dir() else set()
        for name in sorted(n for n in self.waiting if n in present):
            self.done += 1
            print(f"segmented {self.done}/{self.total}: {self.waiting.pop(name)}", flush=True)


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (written by `dints3d export`)")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help="NIfTI files and/or folders of NIfTI files to segment (Cityscapes bundles: PNG files "
                             "and/or folders searched recursively)")
    parser.add_argument("--out", required=True,
                        help="folder for the masks <case>_seg.nii.gz (<case>.nii.gz with --set output_postfix=''; "
                             "Cityscapes: <image>_pred_labelIds.png)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, e.g. sw_overlap=0.25 or ckpt_path=other.pt (repeatable)")
    add_device_argument(parser)
    add_nproc_argument(parser, "split the cases (configs/multi_gpu_inference.yaml)")


def run_infer(args: argparse.Namespace) -> int:
    result = infer(args.bundle, args.input, args.out, args.sets, nproc=args.nproc, device=args.device)
    print(f"wrote {len(result.masks)} mask(s) to {args.out}")
    if result.failures:
        print(f"{len(result.failures)} input(s) not segmented:", file=sys.stderr)
        for path, problem in result.failures.items():
            print(f"  {path}: {problem}", file=sys.stderr)
        return 1
    return 1 if result.returncode else 0
