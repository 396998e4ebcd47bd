"""`python -m dints3d ...` (also what `torchrun -m dints3d` runs)."""

from dints3d.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
