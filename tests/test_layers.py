"""The architecture, checked: pure and sans-IO modules import no I/O, construct stays in wire.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pyiscsi_failover

PACKAGE = Path(pyiscsi_failover.__file__).parent

PURE_AND_SANS_IO = [
    "pyiscsi_failover.errors",
    "pyiscsi_failover.credentials",
    "pyiscsi_failover.names",
    "pyiscsi_failover.connection_info",
    "pyiscsi_failover.protocol.addressing",
    "pyiscsi_failover.protocol.isid",
    "pyiscsi_failover.protocol.pdu",
    "pyiscsi_failover.protocol.wire",
    "pyiscsi_failover.protocol.digest",
    "pyiscsi_failover.protocol.framing",
    "pyiscsi_failover.protocol.text",
    "pyiscsi_failover.protocol.negotiation",
    "pyiscsi_failover.protocol.chap",
    "pyiscsi_failover.protocol.sendtargets",
    "pyiscsi_failover.protocol.scsi",
    "pyiscsi_failover.login_config",
    "pyiscsi_failover.initiator",
    "pyiscsi_failover.lun_check",
    "pyiscsi_failover.testing.target",
    "pyiscsi_failover.testing.faults",
]
FORBIDDEN = ("trio", "socket", "subprocess", "asyncio", "selectors")


@pytest.mark.parametrize("module", PURE_AND_SANS_IO)
def test_pure_module_imports_no_io(module: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        f"bad = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} pulls in {done.stdout.strip()}"


@pytest.mark.parametrize(
    "modules",
    [
        ("pyiscsi_failover.prober", "pyiscsi_failover.connection_info"),
        ("pyiscsi_failover.transport", "pyiscsi_failover.login_config"),
        ("pyiscsi_failover.protocol.chap",),
    ],
)
def test_the_codec_loads_with_the_first_connection_not_before(modules: tuple[str, ...]) -> None:
    """What a probe needs before its first SYN (options, candidates, a LoginConfig, the
    transport) loads neither construct nor the PDU models: a command line's first SYN should
    not wait for them. They load when the first connection is up; a login still works."""
    heavy = (
        "construct",
        "pyiscsi_failover.protocol.wire",
        "pyiscsi_failover.protocol.pdu",
        "pyiscsi_failover.protocol.framing",
        "pyiscsi_failover.initiator",
        "pyiscsi_failover.lun_check",
    )
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{modules} load {done.stdout.strip()}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_construct_is_confined_to_wire() -> None:
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "construct" in _imports(path)
    )
    assert users == ["protocol/wire.py"]


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None
    ]
    assert missing == []


def _isort_key(name: str) -> tuple[int, str]:
    """RUF022's isort-style order: CONSTANTS, then Classes, then functions."""
    if name.isupper() or (name.upper() == name and "_" in name):
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def _public_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts
        if parts[-1] in ("__main__",) or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


#: Modules that need the optional os-brick extra (pyproject's ``os-brick``) to import fully.
_NEEDS_OS_BRICK = {"pyiscsi_failover.os_brick", "pyiscsi_failover.os_brick.connector"}


@pytest.mark.parametrize("module", _public_modules())
def test_dunder_all_is_sorted_and_complete(module: str) -> None:
    import importlib
    import importlib.util

    without_extra = module in _NEEDS_OS_BRICK and importlib.util.find_spec("os_brick") is None
    if without_extra and module.endswith(".connector"):
        return  # it subclasses os-brick's connector: checked in the os_brick nox session
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    if exported is None:
        pytest.fail(f"{module} has no __all__")
    assert list(exported) == sorted(exported, key=_isort_key), "sort it: ruff check --fix (RUF022)"
    if without_extra:
        return  # its names load lazily from the connector
    for name in exported:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"
    # Every public class/function defined in the module is exported.
    defined = [
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == module
        and (isinstance(value, type) or callable(value))
    ]
    assert sorted(set(defined) - set(exported)) == []
