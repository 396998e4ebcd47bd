"""Exported MSD bundles for the bundle tests. A bundle's configs name its folders by absolute path, and training writes
into it, so each module (or test) exports its own (``make_bundle``, tests/conftest.py) instead of copying a shared
one."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bundle(make_bundle, tmp_path_factory) -> Path:
    """The module's exported bundle (``make_bundle``)."""
    return make_bundle(tmp_path_factory.mktemp("bundle"))
