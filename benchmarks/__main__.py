"""``python -m benchmarks [--quick] [--only NAME]``: run benchmarks, print tables, write results.

Results go to ``benchmarks/results/`` (gitignored): one JSON per benchmark and the failover plot;
``--quick`` (connect and login timeouts of 1 s, fewer repetitions and sizes) writes
``*-quick.*`` files so it never overwrites a full run. Goals are reported as PASS/FAIL but never
change the exit status, which is 1 only when a benchmark could not run at all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Final

from benchmarks import coldstart, cost, failover, lun, plot, scale
from benchmarks.common import BenchError, machine_facts, print_table, section

Runner = Callable[..., dict[str, object]]

BENCHMARKS: Final[dict[str, Runner]] = {
    "failover": failover.run,
    "scale": scale.run,
    "cost": cost.run,
    "coldstart": coldstart.run,
    "lun": lun.run,
    "plot": plot.run,
}


def _goal_rows(name: str, payload: dict[str, object]) -> list[list[object]]:
    goals = payload.get("goals")
    if not isinstance(goals, list):
        return []
    rows: list[list[object]] = []
    for goal in goals:
        where = ""
        if "target" in goal:
            where = f" [{goal['target']}, concurrency {goal['concurrency']}]"
        rows.append([name, f"{goal['goal']}{where}", goal["verdict"]])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="pyiscsi-failover benchmarks: failover overhead, scale, per-login cost against "
        "libiscsi, CLI cold start, --check lun against --check login, plot.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="connect/login timeouts of 1 s, fewer sizes and runs; writes *-quick.* files",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--reps", type=int, metavar="N", help="override the number of repetitions (for trials)"
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]

    facts = machine_facts()
    print(
        f"machine: {facts['cpu_model']}, {facts['usable_cpus']} usable CPUs, {facts['python']}, "
        f"{facts['kernel']}; load average {facts['load_average_at_start']}"
    )
    print(f"packages: {facts['packages']}; Debian: {facts['debian_packages']}")
    started = time.monotonic()
    failures: list[str] = []
    goal_rows: list[list[object]] = []
    for name in selected:
        with section(f"{name}{' (quick)' if args.quick else ''}"):
            try:
                payload = BENCHMARKS[name](quick=args.quick, reps=args.reps)
            except BenchError as exc:
                print(f"  {name} could not run: {exc}")
                failures.append(name)
                continue
            except ImportError as exc:
                print(f"  {name} needs {exc.name} (nox -s bench installs it): {exc}")
                failures.append(name)
                continue
            goal_rows += _goal_rows(name, payload)
    if goal_rows:
        print_table("Goals", ["benchmark", "goal", "verdict"], goal_rows)
    print(f"\ntotal: {time.monotonic() - started:.0f} s")
    if failures:
        print(f"could not run: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
