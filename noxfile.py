"""The single entry point for every job: tests, lint, typecheck, bench, fuzz.

Versions and dependency lists are read from pyproject.toml's extras, so there is one source.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "os_brick"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PYTHON = os.environ.get("PYISCSI_PYTHON", "3")
#: The pure (layer 1) and sans-IO (layer 2) modules, whose coverage is reported on its own.
PURE = ",".join(
    f"pyiscsi_failover/{path}"
    for path in (
        "protocol/*",
        "errors.py",
        "credentials.py",
        "names.py",
        "connection_info.py",
        "login_config.py",
        "initiator.py",
        "lun_check.py",
        "testing/target.py",
        "testing/faults.py",
        "testing/config.py",
        "testing/logical_unit.py",
        "testing/scsi_session.py",
        "testing/scsi_faults.py",
        "testing/task_pdus.py",
    )
)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, with branch coverage of the package."""
    session.install("-e", ".[test]")
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.log("branch coverage of the pure and sans-IO modules:")
    session.run("coverage", "report", f"--include={PURE}", "--fail-under=90")
    session.log("branch coverage of the whole package:")
    session.run("coverage", "report", "--skip-covered", "--fail-under=80")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[typecheck]", "nox")
    session.run("mypy", "--strict")


@nox.session(python=PYTHON)
def os_brick(session: nox.Session) -> None:
    """The os-brick connector against os-brick's real code (the ``os-brick`` extra's release)
    under eventlet, as Nova and Cinder run it. Needs root and open-iscsi's iscsiadm: os-brick's
    node records go to the real node database (only the test's own IQN, removed afterwards)."""
    session.install("-e", ".[os-brick,test]", "eventlet")
    session.run(
        "pytest",
        "tests/test_os_brick.py",
        "tests/test_os_brick_real.py",
        *session.posargs,
        env={"PYISCSI_OS_BRICK_TESTS": "1"},
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: tables, JSON and a plot under benchmarks/results/. Never gates CI.

    The package is installed as a user installs it (not editable): an editable install adds
    its own import hook to every interpreter start, which the cold-start benchmark would count.
    """
    session.install("--force-reinstall", "--no-deps", ".")
    session.install(".[test]", "matplotlib")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """Time-boxed hypothesis fuzzing of the decoders and parsers (not part of CI)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.fuzz", *session.posargs)
