"""Run ``python -m pyiscsi_failover probe`` as a child process and read its verdict.

The connector runs inside Nova or Cinder, under eventlet, where trio cannot be imported; the
probe therefore runs in a fresh interpreter::

    <python> -m pyiscsi_failover probe -c - --json [--all] [--initiator-name IQN] [extra...]

with the ``connection_properties`` (CHAP secrets included) as JSON on its stdin, never on its
command line, which every local user can read. The child gets a hard deadline: it is killed
when it passes. Under eventlet ``subprocess`` and ``threading`` are the green versions, so a
running probe never blocks the service's other greenthreads; the deadline is a
``threading.Timer`` rather than ``communicate(timeout=)`` because eventlet's green pipes raise
the standard library's ``TimeoutExpired``, which is not the class its green module exports.

Anything that keeps us from a verdict (the interpreter missing, a crash, a usage error, output
that is not the JSON we expect, the deadline) raises :class:`ProbeProcessError`. The connector
then lets os-brick attach on its own: our failure must never block an attach os-brick could make.

Settings come from the service's environment (:meth:`ProbeSettings.from_environ`), so the
systemd drop-in that turns the connector on can also tune it.

Never imports trio, construct or os-brick.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pyiscsi_failover.errors import ISCSIError

__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_ARGS",
    "ENV_PYTHON",
    "ENV_TIMEOUT",
    "Health",
    "ProbeProcessError",
    "ProbeSettings",
    "Verdict",
    "VerdictRow",
    "chosen_first",
    "healthy",
    "parse_verdict",
    "probe_argv",
    "run_probe",
]

#: The interpreter that runs the probe (default: the service's own, ``sys.executable``).
ENV_PYTHON: Final = "PYISCSI_FAILOVER_PYTHON"
#: Seconds before the probe child is killed and os-brick attaches on its own.
ENV_TIMEOUT: Final = "PYISCSI_FAILOVER_PROBE_TIMEOUT"
#: More ``probe`` options, shell-quoted (e.g. ``--connect-timeout 2 --check lun``).
ENV_ARGS: Final = "PYISCSI_FAILOVER_PROBE_ARGS"

#: The probe's own budget per candidate is its connect timeout plus its login timeout (3 + 10 s
#: by default) and it probes up to 16 candidates at once; this leaves room for the interpreter's
#: start and a slow host, and is still far below open-iscsi's 120 s per dead portal.
DEFAULT_TIMEOUT: Final = 30.0

#: The most stdout we read as a verdict: a real one is a few hundred bytes per candidate.
_MAX_OUTPUT: Final = 1 << 20

#: Variables the child must not inherit: the probe reads CHAP secrets from them when the
#: connection_info has none, and the connection_info must be the only source here; the enable
#: switch would make the child's interpreter load the os-brick hook for nothing.
_SCRUBBED: Final = (
    "PYISCSI_CHAP_SECRET",
    "PYISCSI_TARGET_CHAP_SECRET",
    "PYISCSI_FAILOVER_OS_BRICK",
)

#: Options the connector sets itself; in ``PYISCSI_FAILOVER_PROBE_ARGS`` they would contradict it.
_RESERVED_OPTIONS: Final = frozenset(
    {
        "-c",
        "--connection-info",
        "--json",
        "--all",
        "--initiator-name",
        "--portal",
        "--iqn",
        "--lun",
        "--chap-secret-file",
        "--target-chap-secret-file",
        "--chap-user",
        "--target-chap-user",
    }
)


class ProbeProcessError(ISCSIError):
    """The probe child gave no verdict: it could not start, crashed, timed out or said nonsense.

    Never raised for candidates that fail: that is a verdict (see :class:`Verdict`).
    """


class Health(enum.Enum):
    """What a probe row says about its candidate."""

    OK = "ok"  # logged in (and passed the check asked for)
    DEAD = "dead"  # failed: refused, timed out, wrong CHAP, not found...
    UNKNOWN = "unknown"  # not decided: cancelled or never tried once another had won


#: Outcomes that say nothing about the candidate itself (see the prober's Outcome).
_UNDECIDED: Final = frozenset({"cancelled", "not_tried"})


@dataclass(frozen=True, slots=True, kw_only=True)
class VerdictRow:
    """One candidate's row of the probe's JSON ``attempts``."""

    index: int
    portal: str
    iqn: str
    lun: int
    outcome: str
    detail: str
    redirected_to: str | None = None

    @property
    def health(self) -> Health:
        if self.outcome == "ok":
            return Health.OK
        if self.outcome in _UNDECIDED:
            return Health.UNKNOWN
        return Health.DEAD


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The probe's answer: one row per candidate, in candidate order, and the chosen index."""

    rows: tuple[VerdictRow, ...]
    chosen: int | None
    elapsed_s: float

    def summary(self) -> str:
        """``#0 10.0.0.1:3260 timeout, #1 10.0.0.2:3260 ok`` (no details: they can be long)."""
        return ", ".join(f"#{row.index} {row.portal} {row.outcome}" for row in self.rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSettings:
    """How the connector runs the probe: interpreter, hard deadline, extra options."""

    python: str = sys.executable
    timeout: float = DEFAULT_TIMEOUT
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.python, str) or not self.python:
            raise ProbeProcessError(
                f"no interpreter to run the probe with (set {ENV_PYTHON}): "
                f"sys.executable is {self.python!r}"
            )
        timeout: object = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ProbeProcessError(f"the probe timeout must be seconds > 0, got {timeout!r}")
        clash = sorted(
            arg.split("=", 1)[0]
            for arg in self.extra_args
            if arg.split("=", 1)[0] in _RESERVED_OPTIONS
        )
        if clash:
            raise ProbeProcessError(
                f"{ENV_ARGS} may not set {', '.join(clash)}: the connector sets those itself"
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProbeSettings:
        """Settings from ``PYISCSI_FAILOVER_PYTHON`` / ``_PROBE_TIMEOUT`` / ``_PROBE_ARGS``.

        A value that cannot be used raises :class:`ProbeProcessError` naming the variable.
        """
        env = os.environ if environ is None else environ
        python = env.get(ENV_PYTHON) or sys.executable
        raw_timeout = env.get(ENV_TIMEOUT)
        timeout = DEFAULT_TIMEOUT
        if raw_timeout:
            try:
                timeout = float(raw_timeout)
            except ValueError:
                raise ProbeProcessError(
                    f"{ENV_TIMEOUT} must be a number of seconds, got {raw_timeout!r}"
                ) from None
        raw_args = env.get(ENV_ARGS, "")
        try:
            extra = tuple(shlex.split(raw_args))
        except ValueError as exc:
            raise ProbeProcessError(f"{ENV_ARGS} is not shell-quoted text: {exc}") from None
        return cls(python=python, timeout=timeout, extra_args=extra)


def probe_argv(
    settings: ProbeSettings, *, initiator_name: str | None, every_candidate: bool
) -> list[str]:
    """The child's command line. It never holds a secret: those travel on stdin."""
    argv = [settings.python, "-m", "pyiscsi_failover", "probe", "-c", "-", "--json"]
    if every_candidate:
        argv.append("--all")
    if initiator_name:
        argv += ["--initiator-name", initiator_name]
    argv += settings.extra_args
    return argv


def _scrubbed_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _SCRUBBED}


def _json_default(value: object) -> str:
    """connection_properties may carry values JSON cannot hold (a UUID...); the probe ignores
    every key it does not read, so their text is enough."""
    return str(value)


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    if not lines:
        return "nothing on stderr"
    line = lines[-1].strip()
    return line if len(line) <= 300 else line[:300] + "..."


def run_probe(
    connection_properties: Mapping[str, object],
    settings: ProbeSettings,
    *,
    initiator_name: str | None,
    every_candidate: bool,
    expected: int,
) -> Verdict:
    """Probe every candidate of ``connection_properties`` in a child process; its verdict.

    ``every_candidate`` probes them all (``--all``, for multipath); otherwise the probe stops at
    the first that works in order. ``expected`` is how many candidates the caller counted: a
    verdict with another number of rows is refused. Raises :class:`ProbeProcessError` when there
    is no verdict; a verdict in which nothing works is returned (its ``chosen`` is None).
    """
    try:
        document = json.dumps(dict(connection_properties), default=_json_default).encode()
    except (TypeError, ValueError) as exc:  # a circular structure, a non-str key...
        raise ProbeProcessError(f"connection_properties cannot travel as JSON: {exc}") from None
    argv = probe_argv(settings, initiator_name=initiator_name, every_candidate=every_candidate)
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_scrubbed_environ(),
            close_fds=True,
        )
    except OSError as exc:
        raise ProbeProcessError(
            f"cannot start the probe with {settings.python!r}: {exc.strerror or exc}"
        ) from None
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        child.kill()

    timer = threading.Timer(settings.timeout, kill)
    timer.daemon = True
    timer.start()
    try:
        stdout, stderr = child.communicate(document)
    finally:
        timer.cancel()
        if child.poll() is None:  # communicate was interrupted: never leave the child behind
            child.kill()
            child.wait()
    if expired.is_set():
        raise ProbeProcessError(f"the probe did not finish within {settings.timeout:g} s")
    return parse_verdict(stdout, child.returncode, expected=expected, stderr=stderr)


def parse_verdict(stdout: bytes, returncode: int, *, expected: int, stderr: bytes = b"") -> Verdict:
    """Read ``probe --json``'s output. Exit 0 (one works) and 1 (none works) carry a verdict;
    anything else, or output of another shape, raises :class:`ProbeProcessError`."""
    if returncode not in (0, 1):
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        raise ProbeProcessError(f"the probe {how}: {_last_line(stderr)}")
    if len(stdout) > _MAX_OUTPUT:
        raise ProbeProcessError(f"the probe wrote more than {_MAX_OUTPUT} bytes")
    try:
        body: object = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProbeProcessError(
            f"the probe (exit {returncode}) printed no JSON verdict: {_last_line(stderr)}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("attempts"), list):
        raise ProbeProcessError("the probe's JSON has no 'attempts' list")
    rows = tuple(_row(raw, position) for position, raw in enumerate(body["attempts"]))
    if sorted(row.index for row in rows) != list(range(expected)):
        raise ProbeProcessError(
            f"the probe reported candidates {sorted(row.index for row in rows)}, "
            f"expected 0..{expected - 1}"
        )
    rows = tuple(sorted(rows, key=lambda row: row.index))
    chosen = _chosen(body.get("chosen"), rows)
    if chosen is None and any(row.health is Health.OK for row in rows):
        raise ProbeProcessError("the probe chose none but a candidate passed")
    if (returncode == 0) != (chosen is not None):
        raise ProbeProcessError(
            f"the probe exited {returncode} but chose "
            f"{'a candidate' if chosen is not None else 'none'}"
        )
    elapsed = body.get("elapsed_ms")
    elapsed_s = (
        float(elapsed) / 1000
        if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
        else 0.0
    )
    return Verdict(rows=rows, chosen=chosen, elapsed_s=elapsed_s)


def _chosen(raw: object, rows: Sequence[VerdictRow]) -> int | None:
    """The index of the probe's ``chosen`` candidate: the winner of its policy, which under
    ``--policy staggered`` need not be the first that works in order."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProbeProcessError("the probe's 'chosen' is not an object")
    # The chosen portal is where the login ended: a permanent redirect's target, if any.
    for row in rows:
        if (
            row.health is Health.OK
            and (row.iqn, row.lun) == (raw.get("iqn"), raw.get("lun"))
            and raw.get("portal") in (row.portal, row.redirected_to)
        ):
            return row.index
    raise ProbeProcessError("the probe chose a candidate that has no 'ok' row")


def _row(raw: object, position: int) -> VerdictRow:
    where = f"the probe's attempts[{position}]"
    if not isinstance(raw, dict):
        raise ProbeProcessError(f"{where} is not an object")
    index, portal, iqn, lun = raw.get("index"), raw.get("portal"), raw.get("iqn"), raw.get("lun")
    outcome, detail = raw.get("outcome"), raw.get("detail", "")
    redirected_to = raw.get("redirected_to")
    if not (
        isinstance(index, int)
        and not isinstance(index, bool)
        and isinstance(lun, int)
        and not isinstance(lun, bool)
        and isinstance(portal, str)
        and isinstance(iqn, str)
        and isinstance(outcome, str)
        and isinstance(detail, str)
        and (redirected_to is None or isinstance(redirected_to, str))
    ):
        raise ProbeProcessError(f"{where} lacks index, portal, iqn, lun or outcome")
    return VerdictRow(
        index=index,
        portal=portal,
        iqn=iqn,
        lun=lun,
        outcome=outcome,
        detail=detail,
        redirected_to=redirected_to,
    )


def chosen_first(verdict: Verdict) -> Sequence[int]:
    """Single path: the chosen candidate, then every other one not known dead, in order."""
    if verdict.chosen is None:
        return []
    rest = [
        row.index
        for row in verdict.rows
        if row.index != verdict.chosen and row.health is not Health.DEAD
    ]
    return [verdict.chosen, *rest]


def healthy(verdict: Verdict) -> Sequence[int]:
    """Multipath: every candidate that passed, in order."""
    return [row.index for row in verdict.rows if row.health is Health.OK]
