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
    from devid.gateway import errors
    from devid.gateway.app import datadir
    from devid.gateway.store import configuration
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


# The rooms of gateway/, from the ground floor up: a room may import the rooms below it, never one above
# (docs/architecture.md draws the same house).
ROOMS = ("errors", "system", "pkcs11", "dtls", "coap", "store", "service", "factory", "device", "operator", "app", "cli")


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] != ["devid", "gateway"] or len(parts) < 3:
        return None
    return parts[2]


def _gateway_imports(path: Path) -> list[str]:
    """Absolute devid.gateway imports, with `from devid.gateway.X import Y` taken as module X.Y when Y is one."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}: relative import (one import root: devid.)"
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return [n for n in names if n.startswith("devid.gateway.")]


def test_gateway_is_in_rooms():
    on_the_floor = sorted(p.name for p in (ROOT / "gateway").glob("*.py"))
    assert on_the_floor == ["__init__.py", "errors.py"]
    rooms = sorted(p.name for p in (ROOT / "gateway").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert rooms == sorted(r for r in ROOMS if r != "errors")


@pytest.mark.parametrize("path", sorted((ROOT / "gateway").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_rooms_import_only_downward(path):
    rel = path.relative_to(ROOT / "gateway")
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if own == "__init__":
        return
    for name in _gateway_imports(path):
        room = _room(name)
        assert room in ROOMS, f"{rel} imports {name}: not in a room"
        assert ROOMS.index(room) <= ROOMS.index(own), f"{rel} (room {own}) imports {name} from the floor above ({room})"


AIOCOAP_INTERNALS = ("aiocoap.interfaces", "aiocoap.util", "aiocoap.transports", "aiocoap.messagemanager",
                     "aiocoap.tokenmanager", "aiocoap.protocol", "aiocoap.optiontypes", "aiocoap.numbers.types",
                     "aiocoap.numbers.optionnumbers", "aiocoap.blockwise", "aiocoap.pipe")


def test_only_the_coap_room_touches_aiocoap_internals():
    for path in (ROOT / "gateway").rglob("*.py"):
        rel = path.relative_to(ROOT / "gateway")
        if rel.parts[0] == "coap":
            continue
        text = path.read_text()
        named = {n for n in _imports(path) if n.startswith("aiocoap")}
        named |= {m for m in AIOCOAP_INTERNALS if m in text}
        # the transport's internal entry points, called on its objects rather than imported
        named |= {f"aiocoap.{m}" for m in ("determine_remote", "_append_tokenmanaged") if m in text}
        named |= {f"aiocoap.{n}" for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ImportFrom)
                  and node.module == "aiocoap" for n in (a.name for a in node.names)}
        internal = [n for n in named if n.startswith(AIOCOAP_INTERNALS) or n in (
            "aiocoap.interfaces", "aiocoap.util", "aiocoap.determine_remote", "aiocoap._append_tokenmanaged")]
        assert not internal, f"{rel} uses {internal}: aiocoap internals belong in gateway/coap/"
    for path in (ROOT / "gateway" / "dtls").rglob("*.py"):
        assert not [n for n in _imports(path) if n.startswith("aiocoap")], f"{path.name}: dtls/ knows no aiocoap"


def test_architecture_page_draws_the_same_rooms():
    """docs/architecture.md's table of rooms, floor by floor, is ROOMS (the rule this file holds)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1].strip("`").rstrip("/").removesuffix(".py")))
    assert [floor for floor, _ in rows] == list(range(len(ROOMS)))
    assert tuple(room for _, room in rows) == ROOMS
