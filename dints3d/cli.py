"""The ``dints3d`` command. Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``dints3d --help`` is instant.

User errors (:class:`~dints3d.utils.errors.DintsError`) print one line ``error: <file>: <problem>`` and exit 2; so
does an ``OSError`` no check foresaw (the path and the system's reason, :mod:`dints3d.utils.outputs`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dints3d import __version__
from dints3d.utils.errors import DintsError
from dints3d.utils.outputs import describe_os_error

#: subcommand → (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dints3d.data.synthetic", "write a synthetic MSD-format (or Cityscapes-format) task folder"),
    "prepare": ("dints3d.data.prepare", "validate an MSD task or Cityscapes folder, write fingerprint, plan, datalist"),
    "search": ("dints3d.search.run", "search an architecture (DiNTS or Auto-DeepLab: `space`) on a prepared task"),
    "export": ("dints3d.bundle.export", "export a searched architecture as a MONAI bundle"),
    "train": ("dints3d.bundle.train_command",
              "train a bundle's network, or cross-validate it with --folds (wraps monai.bundle run)"),
    "infer": ("dints3d.bundle.infer", "inference with a bundle on NIfTI files (Cityscapes bundles: PNG images)"),
    "evaluate": ("dints3d.evaluation.metrics",
                 "Dice, HD95, NSD of masks vs labels; --format cityscapes: mean IoU (official)"),
    "import-arch": ("dints3d.spaces.dints.arch_import", "convert a torch-pickled DiNTS arch file to arch.json"),
    "describe": ("dints3d.cost.describe", "parameters, multiply-adds and memory of an architecture or preset"),
    "fit": ("dints3d.cost.fit_command",
            "the settings that fit a GPU of a given size (search and retraining), written as config overlays"),
    "select": ("dints3d.bundle.select", "choose the model or ensemble to ship from cross-validated bundles"),
    "run": ("dints3d.pipeline", "the whole pipeline: prepare → search → baselines → cross-validation → select → predict"),
    "demo": ("dints3d.demo", "`dints3d run` on a small synthetic task, on CPU, in a few minutes"),
    "random-search": ("dints3d.random_search.run", "random search: DPC cells on cached features, or DiNTS baselines"),
}


class DefaultsShown(argparse.HelpFormatter):
    """``--help`` that shows each option's default, unless its help already says it or there is none to show
    (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is argparse.SUPPRESS
                or default is None or default is False or default == [] or default == ()):
            return text
        return f"{text} (default: %(default)s)"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="dints3d",
        description="Neural architecture search for 3D/2D segmentation on MONAI (DiNTS, Auto-DeepLab, DPC).",
    )
    parser.add_argument("--version", action="version", version=f"dints3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {name: sub.add_parser(name, help=text, description=text, formatter_class=DefaultsShown)
                  for name, (_, text) in COMMANDS.items()}
    return parser, subparsers


def _command_module(name: str):
    module_name = COMMANDS[name][0]
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = _parser()
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen in COMMANDS:
        module = _command_module(chosen)
        adder = getattr(module, f"add_{chosen.replace('-', '_')}_arguments", None) or module.add_arguments
        adder(subparsers[chosen])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = _command_module(args.command)
    runner = getattr(module, f"run_{args.command.replace('-', '_')}", None) or module.run
    try:
        return int(runner(args) or 0)
    except DintsError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system failure no check foresaw: still one line naming the path
        where = e.filename if e.filename is not None else args.command
        print(f"error: {DintsError(where, describe_os_error(e)).line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (completed work is saved; rerun with --resume where supported)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
