"""Exported MSD bundles for the bundle tests. A bundle's configs name its folders by absolute path, and training writes
into it, so each module (or test) exports its own instead of copying a shared one."""

from pathlib import Path

import pytest
from support import tiny_arch

from dints3d.bundle.export import export_bundle
from dints3d.config import config_path, load_config
from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task


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


@pytest.fixture(scope="module")
def bundle(make_bundle, tmp_path_factory) -> Path:
    """The module's exported bundle (``make_bundle``)."""
    return make_bundle(tmp_path_factory.mktemp("bundle"))
