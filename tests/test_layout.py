"""The house's layout: one import root (`devid`), every package installed, and the layering
(ca/ and attestation/ import neither gateway/, aiocoap, nor each other)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FOLDERS = ("gateway", "ca", "attestation")


def _packages_on_disk() -> set[str]:
    return {"devid." + ".".join(init.parent.relative_to(ROOT).parts)
            for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}


def test_every_package_is_installed_under_devid():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"devid.{f}": f for f in FOLDERS}
    assert set(config["packages"]) == _packages_on_disk()


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


SOURCES = sorted(p for d in (*FOLDERS, "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_generic_top_level_import(path):
    bad = [n for n in _imports(path) if n.split(".")[0] in FOLDERS]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: use devid.{bad[0]}"


@pytest.mark.parametrize("folder, forbidden", [("ca", ("devid.gateway", "devid.attestation", "aiocoap")),
                                               ("attestation", ("devid.gateway", "devid.ca", "aiocoap"))])
def test_ca_and_attestation_stay_below_the_gateway(folder, forbidden):
    for path in (ROOT / folder).rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{path.relative_to(ROOT)} imports {name}"


def test_one_exception_hierarchy_per_package():
    """The gateway's errors derive from GatewayError, never from the CA's; one ConfigError."""
    import inspect
    from devid.ca.errors import CAError
    from devid.gateway import configuration, datadir, errors
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 6
    for cls in classes:
        assert issubclass(cls, errors.GatewayError) and not issubclass(cls, CAError), cls
    assert datadir.ConfigError is configuration.ConfigError is errors.ConfigError


def test_no_test_module_imports_another():
    """Shared fixtures live in conftest.py, shared helpers in *_helpers.py modules."""
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and (node.module or "").startswith("test_"):
                pytest.fail(f"{path.name} imports .{node.module}")
