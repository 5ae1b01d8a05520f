"""Shared pytest setup: the hypothesis profile, and the ``tgtd_factory`` and ``vm_guest`` fixtures.

Kept small on purpose; test modules keep their own fixtures. Helpers for real peers live in
``tests/peers.py`` (importable as ``peers`` because pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from fakes import fake  # noqa: F401 (shared fixture: the fake iscsiadm)
from hypothesis import settings
from peers import Tgtd, TgtdStarter

if TYPE_CHECKING:
    from vm.harness import GuestRun

# Hypothesis already loads its built-in "ci" profile on CI (deterministic, no deadline); we keep
# it and only give local runs a "dev" profile derived from the default one. Loopback peers and
# the first construct parse are slow enough to trip the default 200 ms deadline spuriously.
settings.register_profile("dev", parent=settings.get_profile("default"), deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if "CI" in os.environ else "dev"))


@pytest.fixture
def tgtd_factory() -> Iterator[TgtdStarter]:
    """``start(portal_host=None, port=3260) -> Tgtd``; every tgtd started is stopped afterwards.

    ``portal_host=None`` picks a fresh :func:`peers.unique_loopback` address.
    """
    started: list[Tgtd] = []

    def start(portal_host: str | None = None, port: int = 3260) -> Tgtd:
        daemon = Tgtd(portal_host, port)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        for daemon in reversed(started):
            daemon.stop()


@pytest.fixture(scope="session")
def vm_guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    """One QEMU guest with a real kernel initiator, booted once per session; it runs every
    scenario the collected tests name with ``@uses_scenarios`` (see tests/vm/)."""
    from vm.harness import session_guest

    return session_guest(request, tmp_path_factory)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure: CI must run every real peer, never silently less."""
    if _in_ci() and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _in_ci() and _skipped:
        terminalreporter.write_line(
            f"CI=true: {len(_skipped)} skipped test(s) count as failures: "
            + ", ".join(_skipped[:10]),
            red=True,
        )
