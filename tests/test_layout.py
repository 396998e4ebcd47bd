"""The layout's rules that import-linter cannot check: in-function imports only for commented optional
dependencies, and registries (task formats, CLI commands) whose names all resolve."""

import ast
import importlib
from pathlib import Path

import pytest

import dints3d
from dints3d.cli import COMMANDS
from dints3d.data.formats import FORMATS, format_named, load_object

PACKAGE = Path(dints3d.__file__).parent


def _function_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, the import, the comment on its line or the line above) of every import inside a function."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    here, above = lines[sub.lineno - 1], lines[sub.lineno - 2].strip()
                    comment = here.partition("#")[2] or (above[1:] if above.startswith("#") else "")
                    comment = comment or (above.partition("#")[2] if above.startswith("try:") else "")
                    found.append((sub.lineno, here.strip(), comment.strip()))
    return found


def test_imports_inside_functions_are_commented_optional_dependencies():
    found = {f"{path.relative_to(PACKAGE)}:{line}": (code, comment)
             for path in sorted(PACKAGE.rglob("*.py")) for line, code, comment in _function_imports(path)}
    assert found, "the check found nothing: it would pass vacuously"
    uncommented = {where: code for where, (code, comment) in found.items() if not comment}
    assert not uncommented, f"imports inside functions need a comment saying why: {uncommented}"
    internal = {where: code for where, (code, _) in found.items() if "dints3d" in code}
    assert not internal, f"dints3d modules are imported at module level (layers, not lazy imports): {internal}"


def test_the_checker_sees_an_uncommented_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import json\n\n\ndef g():\n    import csv  # optional: why\n")
    assert _function_imports(module) == [(2, "import json", ""), (6, "import csv  # optional: why", "optional: why")]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_and_its_stages_resolve(name):
    fmt = format_named(name)
    assert fmt.name == name
    assert set(fmt.stages) == {"export", "infer", "evaluate", "synthesize"}
    for stage in fmt.stages.values():
        assert callable(load_object(stage)), stage


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_module_has_its_entry_points(command):
    module = importlib.import_module(COMMANDS[command][0])
    suffix = command.replace("-", "_")
    assert hasattr(module, f"add_{suffix}_arguments") or hasattr(module, "add_arguments")
    assert hasattr(module, f"run_{suffix}") or hasattr(module, "run")
