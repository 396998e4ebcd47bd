"""The template bundles (``bundles/<name>``) dints3d ships, and the code in their ``scripts/``.

A template's ``scripts/`` is what every exported bundle carries so that it runs with MONAI alone; dints3d imports the
same files (:func:`template_module`) instead of keeping copies, from any layer (the DiNTS space builds the network
class its bundles name, the bundle layer the training handlers).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import dints3d
from dints3d.utils.errors import DintsError


def template_dir(name: str) -> Path:
    """The template bundle ``name``: packaged as ``dints3d/bundles`` or, in a source checkout, the top-level
    ``bundles/``."""
    for root in (Path(dints3d.__file__).parent / "bundles", Path(dints3d.__file__).parent.parent / "bundles"):
        if (root / name / "configs" / "metadata.json").exists():
            return root / name
    raise DintsError(name, "template bundle not found in the dints3d installation")


def template_module(name: str, module: str) -> ModuleType:
    """``scripts/<module>.py`` of the template bundle ``name``: the code its exported bundles carry in their own
    ``scripts/`` (torch, MONAI and ignite only), imported once as ``dints3d.bundles.<name>.scripts.<module>`` so that
    dints3d runs the very code it ships."""
    package = f"dints3d.bundles.{name}.scripts"
    if package not in sys.modules:
        folder = template_dir(name) / "scripts"
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None or spec.loader is None:
            raise DintsError(folder, "not a Python package (no __init__.py)")
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{module}")
