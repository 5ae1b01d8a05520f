"""Benchmark 2: many candidates, every one a full login and logout.

``probe()`` with ``ordered`` and ``probe_all=True`` logs in to (and out of) every candidate, so
N candidates are N complete logins. The candidates are spread over 250 loopback portals and up to
20 targets (candidate *i*: portal *i* mod 250, target *i* div 250), served either by our test
target as a separate process or by ``tgtd`` with the same portals (``tgtadm --op new --mode
portal``) and targets. Against tgtd, a C daemon, our process is what is measured; against our
own Python test target, the target competes for the same two cores.

Each measurement runs in a fresh worker process (``python -m benchmarks.scale --worker``), so
its peak RSS (``ru_maxrss``) and CPU time (user+sys) are the probe's alone, interpreter and
imports included. The parent raises its soft RLIMIT_NOFILE first when the portals and
connections need more descriptors than it allows; the children inherit it.

Goal checked: 1,000 full login+logout probes in under 2 s on 2 cores and under 150 MiB. When a
configuration misses it, a cProfile run of that configuration says where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from benchmarks.common import (
    BENCH_INITIATOR,
    BENCH_IQN_PREFIX,
    BENCH_PORT,
    BenchError,
    Clock,
    PortalSpec,
    Summary,
    TargetProcess,
    Tgtd,
    WorkerRuns,
    find_tool,
    loopback,
    machine_facts,
    print_table,
    process_cpu,
    raise_nofile,
    results_header,
    run_worker,
    utc_now,
    warn_if_busy,
    write_json,
)
from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.prober import Policy, ProbeOptions, probe

__all__ = ["run"]

PORTALS: Final = 250
TARGETS: Final = 20
_BLOCK_TEST_TARGET: Final = 20
_BLOCK_TGTD: Final = 30
GOAL_CANDIDATES: Final = 1000
GOAL_WALL_S: Final = 2.0
GOAL_RSS_MIB: Final = 150.0
DEFAULT_CONCURRENCY: Final = 16
_ROOT: Final = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    sizes: tuple[int, ...]
    concurrency: tuple[int, ...]
    reps: dict[int, int]
    #: Concurrency settings per size where not all of ``concurrency`` are run (time budget).
    only: dict[int, tuple[int, ...]]

    def settings_for(self, n: int) -> tuple[int, ...]:
        return self.only.get(n, self.concurrency)


FULL: Final = Plan(
    sizes=(100, 1000, 5000),
    concurrency=(16, 64, 256),
    reps={5000: 1},
    only={5000: (16, 256)},
)
QUICK: Final = Plan(sizes=(100, 1000), concurrency=(16, 64), reps={100: 1, 1000: 1}, only={})
_DEFAULT_REPS: Final = 3
#: The test target runs under cProfile when profiled, several times slower: fewer candidates.
_TARGET_PROFILE_CANDIDATES: Final = 500


# --------------------------------------------------------------------------------------------
# The worker: one probe of N candidates, in its own process


def _top(stats: pstats.Stats, key: int, limit: int) -> list[dict[str, object]]:
    """The ``limit`` largest entries by tottime (key 2) or cumtime (key 3)."""
    table = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: item[1][key], reverse=True)[:limit]
    return [
        {
            "function": f"{Path(file).name if file != '~' else ''}:{line}({name})",
            "ncalls": nc,
            "tottime_s": round(tt, 4),
            "cumtime_s": round(ct, 4),
        }
        for (file, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


def _category(file: str, name: str) -> str:
    if "/construct/" in file:
        return "construct (PDU encode/decode)"
    if "/trio/" in file:
        return "trio (scheduler, socket wrappers)"
    if "/pyiscsi_failover/testing/" in file:
        return "pyiscsi_failover.testing (target state machine, server)"
    if "/pyiscsi_failover/protocol/" in file:
        return "pyiscsi_failover.protocol (minus construct)"
    if "/pyiscsi_failover/" in file:
        return "pyiscsi_failover (initiator, transport, prober)"
    if file == "~" and "epoll" in name:
        return "epoll wait (idle or waiting for the target)"
    if file == "~" and "socket" in name:
        return "socket system calls"
    return "other (stdlib, builtins)"


def _by_category(stats: pstats.Stats) -> list[dict[str, object]]:
    table = stats.stats  # type: ignore[attr-defined]
    totals: Counter[str] = Counter()
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in table.items():
        totals[_category(file, name)] += tt
    whole = sum(totals.values()) or 1.0
    return [
        {"category": name, "tottime_s": round(t, 4), "share": round(t / whole, 4)}
        for name, t in totals.most_common()
    ]


def _summarise(stats: pstats.Stats) -> dict[str, object]:
    return {
        "timer": "CPU time (time.process_time)",
        "by_category": _by_category(stats),
        "top_tottime": _top(stats, 2, 15),
        "top_cumtime": _top(stats, 3, 25),
    }


def _profiled_target(out: str, argv: Sequence[str]) -> int:
    """Run the test target's command line under cProfile (CPU time) and dump the stats."""
    from pyiscsi_failover.testing.__main__ import run as run_target

    profiler = cProfile.Profile(time.process_time)
    try:
        return profiler.runcall(run_target, list(argv))
    finally:
        profiler.dump_stats(out)


def _worker(spec: dict[str, object]) -> dict[str, object]:
    portals = spec["portals"]
    iqns = spec["iqns"]
    n = spec["n"]
    concurrency = spec["concurrency"]
    assert isinstance(portals, list)
    assert isinstance(iqns, list)
    assert isinstance(n, int)
    assert isinstance(concurrency, int)
    nofile = raise_nofile(concurrency + 64)
    count = len(portals)
    document = build_connection_info(
        [portals[i % count] for i in range(n)], [iqns[i // count] for i in range(n)], 0
    )
    info = parse_connection_info(document)
    options = ProbeOptions(
        policy=Policy.ORDERED,
        probe_all=True,
        concurrency=concurrency,
        initiator_name=BENCH_INITIATOR,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clock = Clock()

    async def measured() -> Counter[str]:
        with clock:
            result = await probe(info, options)
        return Counter(attempt.outcome.value for attempt in result.attempts)

    profile: dict[str, object] | None = None
    if spec.get("profile"):
        # CPU time, not wall time: waiting for the target must not look like our cost.
        profiler = cProfile.Profile(time.process_time)
        outcomes = profiler.runcall(trio.run, measured)
        profile = _summarise(pstats.Stats(profiler))
    else:
        outcomes = trio.run(measured)
    return {
        "wall_s": clock.wall_s,
        "user_s": clock.user_s,
        "sys_s": clock.sys_s,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "maxrss_before_probe_kib": rss_before,
        "outcomes": dict(outcomes),
        "nofile": nofile,
        "profile": profile,
    }


def _run_worker(spec: dict[str, object]) -> dict[str, object]:
    return run_worker("benchmarks.scale", spec, timeout=900)


# --------------------------------------------------------------------------------------------
# The parent


@dataclass(slots=True)
class _Cell(WorkerRuns):
    """All repetitions of one (target, N, concurrency)."""

    target: str
    n: int
    concurrency: int
    runs: list[dict[str, object]]
    target_cpu_s: list[float]

    @property
    def all_ok(self) -> bool:
        return self.all_succeeded(self.n)

    @property
    def passes(self) -> bool:
        return self.wall.median < GOAL_WALL_S and self.rss_mib < GOAL_RSS_MIB and self.all_ok

    def to_json(self) -> dict[str, object]:
        wall = self.wall
        return {
            "target": self.target,
            "candidates": self.n,
            "concurrency": self.concurrency,
            "wall_s": wall.to_json(),
            "cpu_s": self.cpu.to_json(),
            "logins_per_s": self.n / wall.median,
            "peak_rss_mib": self.rss_mib,
            "all_ok": self.all_ok,
            "target_cpu_s": Summary.of(self.target_cpu_s).to_json(),
            "runs": self.runs,
        }


def _test_target(launcher: Sequence[str] | None = None) -> TargetProcess:
    return TargetProcess(
        portals=[
            PortalSpec(name=f"p{i}", host=loopback(_BLOCK_TEST_TARGET, i), port=BENCH_PORT)
            for i in range(PORTALS)
        ],
        targets=[f"{BENCH_IQN_PREFIX}:scale-{t}" for t in range(TARGETS)],
        launcher=launcher,
        cwd=_ROOT,
    )


def _tgtd() -> Tgtd:
    tgtd = Tgtd(loopback(_BLOCK_TGTD, 0)).start()
    try:
        for i in range(1, PORTALS):
            tgtd.add_portal(loopback(_BLOCK_TGTD, i))
        for t in range(TARGETS):
            tgtd.add_target(t + 1, f"{BENCH_IQN_PREFIX}:scale-{t}")
    except BaseException:
        tgtd.stop()
        raise
    return tgtd


def _measure(
    kind: str, pid: int, portals: Sequence[str], plan: Plan, reps_override: int | None
) -> list[_Cell]:
    iqns = [f"{BENCH_IQN_PREFIX}:scale-{t}" for t in range(TARGETS)]
    cells: list[_Cell] = []
    for n in plan.sizes:
        if n > PORTALS * TARGETS:
            raise BenchError(f"{n} candidates need more than {PORTALS} x {TARGETS}")
        for concurrency in plan.settings_for(n):
            cell = _Cell(target=kind, n=n, concurrency=concurrency, runs=[], target_cpu_s=[])
            reps = reps_override or plan.reps.get(n, _DEFAULT_REPS)
            for _ in range(reps):
                spec = {
                    "portals": list(portals),
                    "iqns": iqns,
                    "n": n,
                    "concurrency": concurrency,
                }
                before = process_cpu(pid)
                cell.runs.append(_run_worker(spec))
                cell.target_cpu_s.append(process_cpu(pid) - before)
            print(
                f"  {kind:11} N={n:5} concurrency={concurrency:3}: "
                f"{cell.wall.median:.3f} s, {cell.n / cell.wall.median:.0f} logins/s",
                flush=True,
            )
            cells.append(cell)
    return cells


def _profile_test_target(concurrency: int) -> dict[str, object]:
    """Both sides of one failing test-target run under cProfile: our worker and the target."""
    workdir = Path(tempfile.mkdtemp(prefix="pyiscsi-bench-profile-"))
    out = workdir / "target.pstats"
    try:
        launcher = [sys.executable, "-m", "benchmarks.scale", "--profiled-target", str(out), "--"]
        with _test_target(launcher=launcher) as target:
            ours = _profile(
                "test-target", target.portal_addresses(), concurrency, _TARGET_PROFILE_CANDIDATES
            )
        stats = pstats.Stats(str(out))
        return {**ours, "target_process": _summarise(stats)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _profile(
    kind: str, portals: Sequence[str], concurrency: int, n: int = GOAL_CANDIDATES
) -> dict[str, object]:
    spec = {
        "portals": list(portals),
        "iqns": [f"{BENCH_IQN_PREFIX}:scale-{t}" for t in range(TARGETS)],
        "n": n,
        "concurrency": concurrency,
        "profile": True,
    }
    result = _run_worker(spec)
    profile = result["profile"]
    assert isinstance(profile, dict)
    return {
        "target": kind,
        "candidates": n,
        "concurrency": concurrency,
        "wall_s_under_profiler": result["wall_s"],
        **profile,
    }


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 2, print its tables, write scale[-quick].json; return the payload."""
    plan = QUICK if quick else FULL
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    # The test target holds every portal plus one socket per connection; so do we, per probe.
    nofile = raise_nofile(PORTALS + 2 * max(plan.concurrency) + 256)
    print(
        f"  RLIMIT_NOFILE soft {nofile['soft_before']} -> {nofile['soft_after']} "
        f"(needed {nofile['needed']}, hard {nofile['hard']})",
        flush=True,
    )
    cells: list[_Cell] = []
    profiles: list[dict[str, object]] = []
    skipped: dict[str, str] = {}

    if find_tool("tgtd") is None or find_tool("tgtadm") is None:
        skipped["tgtd"] = "tgtd/tgtadm not installed (Debian package tgt)"
    else:
        with _tgtd() as tgtd:
            portals = [f"{loopback(_BLOCK_TGTD, i)}:{BENCH_PORT}" for i in range(PORTALS)]
            found = _measure("tgtd", tgtd.pid, portals, plan, reps)
            cells += found
            if GOAL_CANDIDATES in plan.sizes:
                profiles.append(_profile("tgtd", portals, DEFAULT_CONCURRENCY))

    with _test_target() as target:
        found = _measure("test-target", target.pid, target.portal_addresses(), plan, reps)
        cells += found
    failing = [c for c in found if c.n == GOAL_CANDIDATES and not c.passes]
    if failing:
        profiles.append(_profile_test_target(failing[0].concurrency))

    goal_cells = [c for c in cells if c.n == GOAL_CANDIDATES]
    goals: list[dict[str, object]] = [
        {
            "goal": f"{GOAL_CANDIDATES} full login+logout probes in under {GOAL_WALL_S:g} s and "
            f"under {GOAL_RSS_MIB:g} MiB on 2 cores",
            "target": c.target,
            "concurrency": c.concurrency,
            "wall_s": c.wall.median,
            "cpu_s": c.cpu.median,
            "peak_rss_mib": c.rss_mib,
            "all_ok": c.all_ok,
            "verdict": "PASS" if c.passes else "FAIL",
        }
        for c in goal_cells
    ]
    payload: dict[str, object] = {
        **results_header(
            "scale", quick=quick, started_at=started_at, started=started, machine=machine
        ),
        "settings": {
            "policy": "ordered, probe_all=True (every candidate logs in and out)",
            "portals": PORTALS,
            "targets": TARGETS,
            "layout": "candidate i: portal i mod 250, target i div 250, LUN 0, no CHAP",
            "timeouts": "connect 3 s, login 10 s (defaults)",
            "sizes": list(plan.sizes),
            "concurrency": {str(n): list(plan.settings_for(n)) for n in plan.sizes},
            "repetitions": {str(n): reps or plan.reps.get(n, _DEFAULT_REPS) for n in plan.sizes},
            "worker": "each run in a fresh 'python -m benchmarks.scale --worker' process; wall "
            "and CPU (user+sys) around probe() only; peak RSS = the worker's ru_maxrss",
            "rlimit_nofile": nofile,
        },
        "skipped": skipped,
        "results": [c.to_json() for c in cells],
        "goals": goals,
        "profiles": profiles,
    }
    path = write_json("scale", payload, quick=quick)
    _print(cells, goals, profiles)
    print(f"\nwritten: {path}")
    return payload


def _print(
    cells: list[_Cell], goals: list[dict[str, object]], profiles: list[dict[str, object]]
) -> None:
    print_table(
        "Scale: N candidates, each a full login+logout (ordered, probe_all); medians",
        [
            "target",
            "N",
            "concurrency",
            "wall s",
            "CPU s (ours)",
            "logins/s",
            "peak RSS MiB",
            "target CPU s",
            "all ok",
            "runs",
        ],
        [
            [
                c.target,
                c.n,
                c.concurrency,
                f"{c.wall.median:.3f}",
                f"{c.cpu.median:.3f}",
                f"{c.n / c.wall.median:.0f}",
                f"{c.rss_mib:.1f}",
                f"{Summary.of(c.target_cpu_s).median:.3f}",
                "yes" if c.all_ok else "NO",
                len(c.runs),
            ]
            for c in cells
        ],
    )
    print_table(
        f"Scale goal: {GOAL_CANDIDATES} login+logout < {GOAL_WALL_S:g} s and < "
        f"{GOAL_RSS_MIB:g} MiB",
        ["target", "concurrency", "wall s", "CPU s (ours)", "peak RSS MiB", "verdict"],
        [
            [
                g["target"],
                g["concurrency"],
                f"{g['wall_s']:.3f}",
                f"{g['cpu_s']:.3f}",
                f"{g['peak_rss_mib']:.1f}",
                g["verdict"],
            ]
            for g in goals
        ],
    )
    for profile in profiles:
        where = (
            f"{profile['target']}, N={profile['candidates']}, concurrency {profile['concurrency']}"
        )
        _print_profile(f"cProfile (CPU time) of our process, {where}", profile)
        target_side = profile.get("target_process")
        if isinstance(target_side, dict):
            _print_profile(f"cProfile (CPU time) of the test target process, {where}", target_side)


def _print_profile(title: str, summary: dict[str, object]) -> None:
    categories = summary["by_category"]
    top = summary["top_tottime"]
    assert isinstance(categories, list)
    assert isinstance(top, list)
    print_table(
        f"{title}: own time by category",
        ["category", "tottime s", "share"],
        [[c["category"], f"{c['tottime_s']:.3f}", f"{c['share']:.1%}"] for c in categories],
    )
    print_table(
        "  top functions by own time",
        ["function", "ncalls", "tottime s", "cumtime s"],
        [[t["function"], t["ncalls"], t["tottime_s"], t["cumtime_s"]] for t in top[:12]],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--worker", action="store_true", help="internal: one measurement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--profiled-target"]:
        rest = argv[2:]
        return _profiled_target(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(_worker(spec)))
        return 0
    run(quick=args.quick, reps=args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
