"""Prepare an MSD task: ``python preprocess/prepare_msd.py --task TASK --out WORK [options]``.

The same as ``dints3d prepare`` (see ``--help``): validates the task folder and writes ``WORK/fingerprint.json``,
``WORK/plan.json`` and ``WORK/datalist.json``.
"""

import sys

from dints3d.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
