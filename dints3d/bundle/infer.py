"""``dints3d infer``: segment images with a bundle's ``configs/inference.yaml`` (:mod:`dints3d.bundle.runner`),
after checking every input, with a summary of what was and was not segmented."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from dints3d.bundle.ensemble import ensemble_configs
from dints3d.bundle.input_checks import NIFTI, InputKind, collect_inputs
from dints3d.bundle.runner import (
    InferResult,
    add_nproc_argument,
    bundle_run,
    config_file,
    launcher,
    network_channels,
    override_args,
)
from dints3d.data.formats import bundle_format
from dints3d.utils.errors import DintsError


def infer(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
          sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1) -> InferResult:
    """Segment the files and folders ``inputs`` into ``out`` with the bundle's ``configs/inference.yaml``, as the
    bundle's format does (:func:`~dints3d.data.formats.bundle_format`): NIfTI volumes (:func:`infer_nifti`), or PNG
    images for a Cityscapes bundle (``data_type: png``, :mod:`dints3d.cityscapes.infer`)."""
    return bundle_format(bundle).stage("infer")(bundle, inputs, out, sets, log, nproc)


def segment(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike, kind: InputKind,
            configs: list[str], sets: list[str] | tuple[str, ...] = (), log: Path | None = None,
            nproc: int = 1) -> InferResult:
    """Check every input (a bad one is reported on one line and skipped), then segment the others in one bundle run
    of ``configs`` (split across ``nproc`` processes) into ``out``."""
    channels = network_channels(bundle)
    for name in configs:
        config_file(bundle, name)
    launcher(nproc)
    result = InferResult()
    files, result.failures = collect_inputs(inputs, kind)
    for path, problem in result.failures.items():
        print(f"error: {DintsError(path, problem).line()}", file=sys.stderr)
    good = []
    for path in files:
        problem = kind.check(path, channels)
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
        mask = kind.output(out, kind.name(path))
        if mask.is_file():
            result.masks[path] = mask
        else:
            result.failures[path] = f"no {kind.what} written (the bundle run exited with status {result.returncode})"
    return result


def infer_nifti(bundle: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
                sets: list[str] | tuple[str, ...] = (), log: Path | None = None, nproc: int = 1) -> InferResult:
    """Segment the NIfTI files and folders ``inputs`` into ``out/<case>_seg.nii.gz`` with the bundle's model, or its
    ensemble when it has one (``configs/ensemble.yaml``, :mod:`dints3d.bundle.ensemble`); every input is read
    completely first (:mod:`dints3d.bundle.input_checks`), the cases are split across ``nproc`` processes by
    ``multi_gpu_inference.yaml``."""
    configs = ensemble_configs(bundle) + (["multi_gpu_inference.yaml"] if nproc > 1 else [])
    return segment(bundle, inputs, out, NIFTI, configs, sets, log, nproc)


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (written by `dints3d export`)")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                        help="NIfTI files and/or folders of NIfTI files to segment (Cityscapes bundles: PNG files "
                             "and/or folders searched recursively)")
    parser.add_argument("--out", required=True,
                        help="folder for the masks <case>_seg.nii.gz (Cityscapes: <image>_pred_labelIds.png)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="bundle config override, e.g. sw_overlap=0.25 or ckpt_path=other.pt (repeatable)")
    add_nproc_argument(parser, "split the cases (configs/multi_gpu_inference.yaml)")


def run_infer(args: argparse.Namespace) -> int:
    result = infer(args.bundle, args.input, args.out, args.sets, nproc=args.nproc)
    print(f"wrote {len(result.masks)} mask(s) to {args.out}")
    if result.failures:
        print(f"{len(result.failures)} input(s) not segmented:", file=sys.stderr)
        for path, problem in result.failures.items():
            print(f"  {path}: {problem}", file=sys.stderr)
        return 1
    return 1 if result.returncode else 0
