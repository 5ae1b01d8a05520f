"""Benchmark 4: how fast the command line starts, next to libiscsi's iscsi-ls in the same run.

Each figure is wall time from ``Popen`` (fork and exec included) to an event, median of 20 runs
(after 2 warm-up runs of each, so the page cache holds every file), the commands interleaved run
by run so that load from other work on the machine hits them alike:

* ``python -c pass`` with the same interpreter: the floor any Python CLI stands on;
* ``pyiscsi-failover --help``: until the process exits;
* ``pyiscsi-failover probe --portal L ...``: until its first SYN reaches L, a listening socket of
  ours on loopback (the kernel completes the handshake at once, so ``accept()`` returns within
  microseconds of the SYN); the process is then killed;
* ``iscsi-ls --usage``: until it exits (process start of a C tool);
* ``iscsi-ls -i IQN iscsi://L/``: until its first SYN reaches L, the same way.

The CLI runs as the venv's console script (``pyiscsi-failover`` next to ``sys.executable``), so
the entry-point wrapper is included. Children's CPU time (user+sys, RUSAGE_CHILDREN) is
recorded next to the wall times, as it is less disturbed by other work.

Goals checked: ``--help`` median <= 100 ms; ``probe``'s first SYN median <= 150 ms.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from benchmarks.common import (
    BENCH_INITIATOR,
    BENCH_IQN_PREFIX,
    BENCH_PORT,
    BenchError,
    Summary,
    children_cpu,
    find_tool,
    loopback,
    machine_facts,
    print_table,
    results_header,
    utc_now,
    warn_if_busy,
    write_json,
)

__all__ = ["GOAL_HELP_S", "GOAL_SYN_S", "run"]

_BLOCK: Final = 50
IQN: Final = f"{BENCH_IQN_PREFIX}:coldstart"
GOAL_HELP_S: Final = 0.100
GOAL_SYN_S: Final = 0.150
#: A child that has not reached its event by then is a harness failure, not a measurement.
_EVENT_DEADLINE_S: Final = 20.0
FULL_RUNS: Final = 20
QUICK_RUNS: Final = 10
WARM_UP_RUNS: Final = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class _Command:
    key: str
    label: str
    argv: tuple[str, ...]
    until: str  # "exit" or "syn"


@dataclass(slots=True)
class _Series:
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "wall_s": Summary.of(self.wall_s).to_json(),
            "cpu_s": Summary.of(self.cpu_s).to_json(),
            "runs_wall_s": [round(x, 5) for x in self.wall_s],
        }


def _console_script() -> Path | None:
    """The venv's ``pyiscsi-failover`` wrapper, run by the venv's own interpreter."""
    script = Path(sys.executable).parent / "pyiscsi-failover"
    return script if script.exists() else None


def _environment() -> dict[str, str]:
    # No secrets or libiscsi settings from the caller's environment leak into the children.
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LIBISCSI_", "PYISCSI_"))
    }


def _until_exit(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    cpu0 = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=_EVENT_DEADLINE_S,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0 and "--usage" not in argv:
        raise BenchError(f"{' '.join(argv)} exited with status {done.returncode}")
    return wall, children_cpu() - cpu0


def _until_syn(argv: Sequence[str], env: dict[str, str], listener: socket.socket) -> float:
    started = time.perf_counter()
    child = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        listener.settimeout(_EVENT_DEADLINE_S)
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            raise BenchError(f"{argv[0]} sent no SYN within {_EVENT_DEADLINE_S:g} s") from None
        wall = time.perf_counter() - started
        connection.close()
    finally:
        child.kill()
        child.wait()
    return wall


def _commands(host: str, iscsi_ls: str | None) -> list[_Command]:
    portal = f"{host}:{BENCH_PORT}"
    commands = [
        _Command(
            key="python", label="python -c pass", argv=(sys.executable, "-c", "pass"), until="exit"
        )
    ]
    script = _console_script()
    cli: tuple[str, ...] = (
        (str(script),) if script is not None else (sys.executable, "-m", "pyiscsi_failover")
    )
    commands += [
        _Command(key="help", label="pyiscsi-failover --help", argv=(*cli, "--help"), until="exit"),
        _Command(
            key="probe",
            label="pyiscsi-failover probe: first SYN",
            argv=(
                *cli,
                "probe",
                "--portal",
                portal,
                "--iqn",
                IQN,
                "--check",
                "login",
                "--initiator-name",
                BENCH_INITIATOR,
                "--connect-timeout",
                "5",
                "--login-timeout",
                "5",
            ),
            until="syn",
        ),
    ]
    if iscsi_ls is not None:
        commands += [
            _Command(
                key="iscsi-ls-usage",
                label="iscsi-ls --usage (exit)",
                argv=(iscsi_ls, "--usage"),
                until="exit",
            ),
            _Command(
                key="iscsi-ls",
                label="iscsi-ls: first SYN",
                argv=(iscsi_ls, "-i", BENCH_INITIATOR, f"iscsi://{portal}/"),
                until="syn",
            ),
        ]
    return commands


def _measure(commands: list[_Command], host: str, runs: int) -> dict[str, _Series]:
    env = _environment()
    series = {c.key: _Series() for c in commands}
    with socket.create_server((host, BENCH_PORT), backlog=16) as listener:
        for index in range(WARM_UP_RUNS + runs):
            for command in commands:
                if command.until == "exit":
                    wall, cpu = _until_exit(command.argv, env)
                else:
                    cpu0 = children_cpu()
                    wall = _until_syn(command.argv, env, listener)
                    cpu = children_cpu() - cpu0  # up to the kill, a little after the SYN
                if index >= WARM_UP_RUNS:
                    series[command.key].wall_s.append(wall)
                    series[command.key].cpu_s.append(cpu)
    return series


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 4, print its table, write coldstart[-quick].json; return the payload."""
    runs = reps if reps is not None else (QUICK_RUNS if quick else FULL_RUNS)
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    host = loopback(_BLOCK, 0)
    iscsi_ls = find_tool("iscsi-ls")
    commands = _commands(host, iscsi_ls)
    series = _measure(commands, host, runs)
    help_s = Summary.of(series["help"].wall_s).median
    syn_s = Summary.of(series["probe"].wall_s).median
    goals: list[dict[str, object]] = [
        {
            "goal": f"pyiscsi-failover --help median <= {GOAL_HELP_S * 1000:g} ms",
            "measured_s": help_s,
            "limit_s": GOAL_HELP_S,
            "verdict": "PASS" if help_s <= GOAL_HELP_S else "FAIL",
        },
        {
            "goal": f"pyiscsi-failover probe: first SYN median <= {GOAL_SYN_S * 1000:g} ms",
            "measured_s": syn_s,
            "limit_s": GOAL_SYN_S,
            "verdict": "PASS" if syn_s <= GOAL_SYN_S else "FAIL",
        },
    ]
    script = _console_script()
    payload: dict[str, object] = {
        **results_header(
            "coldstart", quick=quick, started_at=started_at, started=started, machine=machine
        ),
        "settings": {
            "runs": runs,
            "warm_up_runs": WARM_UP_RUNS,
            "interpreter": sys.executable,
            "cli": str(script) if script is not None else f"{sys.executable} -m pyiscsi_failover",
            "listener": f"{host}:{BENCH_PORT}",
            "statistic": "wall time from Popen to exit, or to accept() of the child's first "
            "connection on our listener; median over runs; commands interleaved run by run",
        },
        "commands": [
            {"key": c.key, "label": c.label, "argv": list(c.argv), "until": c.until}
            for c in commands
        ],
        "results": {key: s.to_json() for key, s in series.items()},
        "goals": goals,
    }
    path = write_json("coldstart", payload, quick=quick)
    print_table(
        f"Cold start, ms (median of {runs}; wall from Popen; CPU = the child's user+sys)",
        ["command", "until", "wall p50", "wall min-max", "CPU p50"],
        [
            [
                c.label,
                c.until,
                f"{Summary.of(series[c.key].wall_s).median * 1000:.1f}",
                f"{min(series[c.key].wall_s) * 1000:.1f}-{max(series[c.key].wall_s) * 1000:.1f}",
                f"{Summary.of(series[c.key].cpu_s).median * 1000:.1f}",
            ]
            for c in commands
        ],
    )
    for goal in goals:
        measured = goal["measured_s"]
        assert isinstance(measured, float)
        print(f"goal: {goal['goal']}: {goal['verdict']} ({measured * 1000:.1f} ms)")
    print(f"written: {path}")
    return payload
