"""The patch a stage trains or searches on: the user's (the first setting given, in priority order), else the
plan's; every side a positive multiple of the network's divisor."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

#: what every side must be a multiple of: one number, or one per axis (a U-Net that downsamples some axes less)
Divisor = int | Sequence[int]

from dints3d.utils.errors import DintsError


def per_axis(divisor: Divisor, dims: int) -> list[int]:
    """``divisor`` as one number per axis."""
    return [int(divisor)] * dims if isinstance(divisor, int) else [int(d) for d in divisor]


def shown(divisor: Divisor) -> str:
    """``16``, or ``16 × 16 × 8`` for per-axis divisors."""
    return str(divisor) if isinstance(divisor, int) else " × ".join(map(str, divisor))


def check_patch_sides(patch: Any, dims: int, divisor: Divisor, key: str, what: str) -> list[int]:
    """``patch`` as ints if it has ``dims`` sides, each a positive multiple of ``divisor``; else one line naming
    ``key``, the setting to change, and ``what`` needs the divisor: an architecture (``"this architecture (4
    depths)"``) or, while searching, a space (``"the dints space"``)."""
    divisors = per_axis(divisor, dims)
    valid = isinstance(patch, (list, tuple)) and len(patch) == dims and all(
        isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0 and p % d == 0
        for p, d in zip(patch, divisors))
    if not valid:
        value = list(patch) if isinstance(patch, tuple) else patch
        if what.endswith("space"):
            problem = f"must have {dims} sides, each a positive multiple of {shown(divisor)} (what {what} needs)"
        else:
            problem = f"must be {dims} positive multiples of {shown(divisor)} for {what}"
        raise DintsError(key, f"{value} {problem}; set it with --set {key}=[..]")
    return [int(p) for p in patch]


def resolve_patch(plan: Mapping, divisor: Divisor, what: str, *requested: tuple[str, Sequence[int] | None],
                  dims: int | None = None, note: Callable[[str], Any] | None = print) -> list[int]:
    """The first of the ``requested`` ``(key, patch)`` settings that is set (e.g. ``("train.patch_size", …)``,
    ``("data.patch_size", …)``), else the plan's patch when it has ``dims`` sides (default: the plan's own), checked
    by :func:`check_patch_sides`. A setting that differs from the plan's patch is said in one line to ``note``
    (``None``: silently, e.g. on all but one process)."""
    dims = dims or len(plan["patch_size"])
    planned = [int(p) for p in plan["patch_size"]] if len(plan["patch_size"]) == dims else None
    for key, patch in requested:
        if patch:
            chosen = check_patch_sides(patch, dims, divisor, key, what)
            if note is not None and planned is not None and chosen != planned:
                note(f"note: patch {chosen} from {key}, not the plan's {planned} (plan.json: what `dints3d prepare` "
                     "chose for the task)")
            return chosen
    key = requested[-1][0] if requested else "plan.patch_size"
    return check_patch_sides(planned, dims, divisor, key, what)
