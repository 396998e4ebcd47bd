"""``dints3d train``: one model (:func:`~dints3d.bundle.train.train`) or, with ``--folds``, a cross-validation
(:mod:`dints3d.bundle.crossval`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dints3d.bundle.crossval import cross_validate, format_summary
from dints3d.bundle.handlers import SAFE_TO_CHANGE
from dints3d.bundle.runner import add_device_argument, add_nproc_argument
from dints3d.bundle.train import train
from dints3d.utils.errors import DintsError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_device_argument(parser)
    add_nproc_argument(parser, "train data-parallel (torchrun + configs/multi_gpu_train.yaml)")
    parser.add_argument("--folds", metavar="all|K,K,...",
                        help="cross-validation: train one model per fold of the prepared task (models/fold<k>/), "
                             "predict each fold's validation cases with its model and score them (cv/cv_metrics.csv, "
                             "cv/summary.json); with --resume, finished folds are skipped and an interrupted one "
                             "continues. Without --folds: one model on the fold the bundle was exported with")
    parser.add_argument("--mirroring", action=argparse.BooleanOptionalAction, default=True,
                        help="with --folds: test-time mirroring (every axis) of the out-of-fold predictions and of "
                             "the fold models' ensemble (default on; 8 passes per model in 3D)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="with --folds: also keep the out-of-fold class probabilities (cv/predictions/"
                             "<case>_prob.nii.gz, float32: classes × the image's voxels × 4 bytes each), which "
                             "`dints3d select` needs to score an ensemble of two candidates")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="with --folds: train N folds at a time, each in its own process (one per GPU when "
                             "there are several); default 1")


def run_train(args: argparse.Namespace) -> int:
    resume = {None: False, "yes": True, "auto": "auto"}[args.resume]
    if args.parallel < 1:
        raise DintsError("--parallel", f"must be ≥ 1, got {args.parallel}")
    if args.folds is not None:
        summary = cross_validate(args.bundle, args.folds, args.work, args.sets, "auto" if resume else False,
                                 args.device, args.nproc, args.parallel, args.mirroring, args.save_probabilities)
        if summary is None:
            return 1
        print(format_summary(summary, Path(args.bundle).absolute()))
        return 0
    status = train(args.bundle, args.work, args.sets, nproc=args.nproc, resume=resume, device=args.device)
    if status == 0:
        print(f"trained: {Path(args.bundle) / 'models' / 'model.pt'} (best validation score)")
    return status
