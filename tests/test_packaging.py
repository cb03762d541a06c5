"""A fresh install has what wm imports: every third-party module that the code or the tests import
comes from a distribution that pyproject.toml declares (as a dependency or an extra)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"wm", "callbacks", "datamodules", "tests"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> the files that import it (at any depth of the code, lazy imports too)."""
    found: dict[str, set[str]] = {}
    for folder in ("wm", "callbacks", "datamodules", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    declared |= {requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = packages_distributions()
    undeclared = {
        module: sorted(files)
        for module, files in imported_modules().items()
        if module not in FIRST_PARTY and module not in sys.stdlib_module_names and module != "__future__"
        and not {normalized(d) for d in distributions.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_ci_installs_the_extras_so_no_suite_is_skipped():
    """CI runs every suite's tests: their simulators (the optional extras) must be there, not skipped."""
    import importlib.util
    import os

    import pytest

    if os.environ.get("CI") != "true":
        pytest.skip("a user may leave the extras out; CI may not")
    missing = [module for module in ("crafter", "memory_maze", "gym") if importlib.util.find_spec(module) is None]
    assert not missing, f"CI lacks {missing}: .ci/run must install the crafter and memory-maze extras"
