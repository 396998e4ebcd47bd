"""What a resumed search continues from and what it may change: the loop's own state (:class:`LoopState`), the
config check against the checkpoint's, and the random generators."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from dints3d.config import Config, config_from_dict, config_to_dict
from dints3d.search.schedule import warmup_iterations
from dints3d.utils.errors import DintsError
from dints3d.utils.resume_settings import changed_settings, split_changes
from dints3d.utils.runtime import set_rng_states

#: Settings a resumed search may change (with a warning): what the non-finite stop and the out-of-memory report
#: advise, the length of the run, how often it validates, checkpoints and checks itself, and how the same function
#: is computed (checkpointing, CPU kernels). Anything else (the space, the data, the losses, the seed …) would make
#: the checkpoint describe another search and is refused.
RESUME_MAY_CHANGE = (
    "search.lr", "search.arch_lr", "search.amp", "search.max_nonfinite_steps", "search.iterations",
    "search.val_interval", "search.checkpoint_interval", "search.val_sw_batch_size", "search.val_overlap",
    "search.check_replicas", "search.checkpoint_cells", "search.checkpoint_fraction", "search.cpu_conv_routing",
    "search.hard_budget",
    "data.num_workers",
)


@dataclasses.dataclass
class LoopState:
    """Everything besides tensors that a resumed run must continue from."""

    iteration: int = 0  #: iterations completed
    best_dice: float = -1.0
    nonfinite_total: int = 0
    #: consecutive non-finite losses per step kind ("weight", "architecture")
    nonfinite_streak: dict = dataclasses.field(default_factory=lambda: {"weight": 0, "architecture": 0})
    stopped_nonfinite: bool = False  #: the checkpoint was written by a non-finite stop
    #: samples of each stream consumed by all processes together: where a resumed run, under any number of
    #: processes, continues reading
    consumed: dict = dataclasses.field(default_factory=lambda: {"weights": 0, "arch": 0})
    last_dice: list = dataclasses.field(default_factory=list)


def loop_state(saved: dict, cfg: Config, world_size: int) -> LoopState:
    """A checkpoint's loop state; fields older checkpoints lack get what the run must have done."""
    known = {f.name for f in dataclasses.fields(LoopState)}
    state = LoopState(**{k: v for k, v in saved.items() if k in known})
    if "consumed" not in saved:  # written before the counts were kept: assume the same number of processes
        s, per_step = cfg.search, cfg.data.batch_size * world_size
        arch_steps = max(0, state.iteration - warmup_iterations(s.iterations, s.warmup_fraction))
        state.consumed = {"weights": state.iteration * per_step, "arch": arch_steps * per_step}
    return state


#: DiNTS network options added after searches were first saved, with the value those searches ran with (the paper's
#: network); today's defaults differ, so a checkpoint without them must not resume under the new network silently
NETWORK_OPTIONS_BEFORE = {"stem_skip": False, "anisotropic_stem": False}


def before_network_options(config: dict) -> dict:
    """``config`` (a checkpoint's) with the DiNTS options it predates set to what it ran with (a DiNTS search's only:
    other spaces never read them)."""
    if not isinstance(config, dict) or not isinstance(config.get("dints"), dict) or config.get("space") != "dints":
        return config
    return {**config, "dints": {**NETWORK_OPTIONS_BEFORE, **config["dints"]}}


def check_resumable_config(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's outside :data:`RESUME_MAY_CHANGE`; warn
    about the changes allowed."""
    then = config_to_dict(config_from_dict(before_network_options(saved["config"]), str(path)))
    changes = changed_settings(then, config_to_dict(cfg))
    _, refused = split_changes(changes, RESUME_MAY_CHANGE)
    if refused:
        key, (old, new) = next(iter(refused.items()))
        raise DintsError(path, f"was written with a different config ({key}: {old!r} then, {new!r} now); resume "
                         f"with the same settings (only {', '.join(RESUME_MAY_CHANGE)} may change)")
    done = int(saved["loop"].get("iteration", 0)) if isinstance(saved.get("loop"), dict) else 0
    if cfg.search.iterations < done:
        raise DintsError(path, f"holds {done} completed iterations, more than search.iterations="
                         f"{cfg.search.iterations}")
    if changes:
        warnings.warn("resuming with changed settings: " + ", ".join(
            f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items()), stacklevel=2)


def check_same_data(saved: dict, digest: dict[str, str], path: Path, work: Path) -> None:
    """Refuse a resume whose prepared data differ from the checkpoint's: a WORK folder prepared again (other
    ``--folds`` or seed: another split) or another task would continue the search on other cases and quietly give
    another ``arch.json``. Checkpoints written before the digest was recorded are not checked."""
    then = saved.get("data")
    if not isinstance(then, dict):
        return
    for key, why in (("datalist", "its cases or their split changed"), ("plan", "the preprocessing changed")):
        if then.get(key) != digest.get(key):
            raise DintsError(path, f"was written on other prepared data: {work / (key + '.json')} differs from the one "
                             f"this search began with ({why}: prepared again, e.g. with other --folds, or another "
                             "task); resume with the WORK folder it began with, or start a new search with another "
                             "--out")


def restore_rng(saved: dict, device: torch.device, path: Path) -> None:
    """Python, numpy, torch and CUDA generators as they were when ``saved`` was written."""
    states = saved.get("rng")
    if states is None:  # older checkpoints kept the torch CPU generator only
        states = {"torch": saved.get("torch_rng")}
    try:
        if set(states) == {"torch"} and torch.is_tensor(states["torch"]) and states["torch"].dtype == torch.uint8:
            torch.set_rng_state(states["torch"])
        else:
            set_rng_states(states, device)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DintsError(path, f"holds an unusable random generator state ({e})") from None
