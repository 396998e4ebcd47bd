"""Test-wide settings (one CPU thread: tiny tensors run fastest single-threaded, and CI machines are shared) and the
fixtures tests in several folders share: synthetic MSD and Cityscapes tasks, raw or prepared, each built once per
session for each distinct set of options, the tiny config overrides, and exported bundles. Helpers and constants tests import are in
support.py."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import inspect  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from support import PreparedTask, TinyConfig, tiny_arch  # noqa: E402

from dints3d.bundle.export import export_bundle  # noqa: E402
from dints3d.cityscapes.synthetic import make_cityscapes_task  # noqa: E402
from dints3d.config import config_path, load_config  # noqa: E402
from dints3d.data.prepare import prepare  # noqa: E402
from dints3d.data.synthetic import make_msd_task  # noqa: E402

torch.set_num_threads(1)


def _built_once(tmp_path_factory, name: str, make: Callable[..., Path]) -> Callable[..., Path]:
    """``make(folder, **options)`` that writes each distinct set of options (defaults filled in) once per session,
    into a folder of its own; later calls with the same options return the same folder."""
    signature, built = inspect.signature(make), {}

    def build(**options) -> Path:
        bound = signature.bind(None, **options)
        bound.apply_defaults()
        key = repr(sorted((k, v) for k, v in bound.arguments.items() if k != "out"))
        if key not in built:
            built[key] = make(tmp_path_factory.mktemp(name) / "task", **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def msd_task(tmp_path_factory) -> Callable[..., Path]:
    """``msd_task(**options)``: the folder ``make_msd_task(folder, **options)`` wrote, once per session for each set of
    options. Tests read it; a test that changes the task works on a copy."""
    return _built_once(tmp_path_factory, "msd", make_msd_task)


@pytest.fixture(scope="session")
def prepared_task(msd_task, tmp_path_factory) -> Callable[..., PreparedTask]:
    """``prepared_task(folds=K, **options)``: ``msd_task(**options)`` prepared with K folds (seed 0, default config),
    once per session for each set of options."""
    built = {}

    def build(*, folds: int, **options) -> PreparedTask:
        task = msd_task(**options)
        if (task, folds) not in built:
            work = tmp_path_factory.mktemp("msd_work") / "work"
            built[task, folds] = PreparedTask(task, work, prepare(task, work, folds=folds, progress=False))
        return built[task, folds]

    return build


@pytest.fixture(scope="session")
def search_work(prepared_task) -> Path:
    """The work folder the search tests run on: 6 training + 1 test CT-like cases of ~36 voxels a side, 3 folds
    (2 validation cases per fold)."""
    return prepared_task(folds=3, cases=6, test_cases=1, size=36, seed=3).work


@pytest.fixture(scope="session")
def small_task(prepared_task) -> PreparedTask:
    """A small prepared task for tests of the files themselves (parsers, corrupted copies): 4 training + 1 test
    cases of ~20 voxels a side, 2 folds."""
    return prepared_task(folds=2, cases=4, test_cases=1, size=20, seed=0)


@pytest.fixture(scope="session")
def cityscapes_task(tmp_path_factory) -> Callable[..., Path]:
    """``cityscapes_task(**options)``: the folder ``make_cityscapes_task(folder, **options)`` wrote, once per session
    for each set of options."""
    return _built_once(tmp_path_factory, "cityscapes", make_cityscapes_task)


@pytest.fixture(scope="session")
def prepared_cityscapes(cityscapes_task, tmp_path_factory) -> Callable[..., PreparedTask]:
    """``prepared_cityscapes(config=NAME, overrides=[...], **options)``: ``cityscapes_task(**options)`` prepared as
    ``dints3d prepare --config NAME --set …`` does (seed 0; no config: the defaults), once per session for each set of
    options."""
    built = {}

    def build(*, config: str | None = None, overrides: tuple[str, ...] | list[str] = (), **options) -> PreparedTask:
        task, overrides = cityscapes_task(**options), tuple(overrides)
        if (task, config, overrides) not in built:
            cfg = load_config(config_path(config) if config else None, list(overrides))
            work = tmp_path_factory.mktemp("cityscapes_work") / "work"
            built[task, config, overrides] = PreparedTask(task, work, prepare(task, work, config=cfg, progress=False))
        return built[task, config, overrides]

    return build


@pytest.fixture(scope="session")
def tiny() -> TinyConfig:
    """Config overrides under which a stage runs in seconds on a CPU (support.TinyConfig)."""
    return TinyConfig()


@pytest.fixture(scope="session")
def make_bundle(tiny):
    """``make_bundle(root)``: synthetic CT task (LPS affine, shapes not multiples of 32) → prepare → export
    :func:`support.tiny_arch` as ``root/bundle`` (the task in ``root/task``, the work folder in ``root/work``), with
    the demo config and ``tiny.bundle``."""

    def make(root: Path) -> Path:
        make_msd_task(root / "task", cases=4, test_cases=2, size=24, seed=3)
        cfg = load_config(config_path("demo"), tiny.bundle)
        prepare(root / "task", root / "work", folds=2, config=cfg, progress=False)
        return export_bundle(tiny_arch().save(root / "arch.json"), root / "work", root / "bundle", cfg)

    return make
