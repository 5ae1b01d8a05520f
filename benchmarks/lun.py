"""Benchmark 6: what ``--check lun`` costs on top of ``--check login``, against tgtd.

``Check.LUN`` runs REPORT LUNS, INQUIRY, INQUIRY VPD 0x83, TEST UNIT READY and READ CAPACITY
after the login, pipelined (with a second TEST UNIT READY, which takes the UNIT ATTENTION tgtd
queues at every login; tgtd's CmdSN window of 2 after login makes them two round trips), then
logs out. Only tgtd answers SCSI among our peers, so every figure is against one
tgtd on loopback whose targets each have LUN 1 as a disk.

* **Per probe**: ``probe()`` of one candidate (tgtd portal 0, target 1, LUN 1), ``login`` and
  ``lun`` in alternating rounds in this process (the order flips every round, so other work on
  the machine hits both alike). Each probe's wall time (p50/p95 over every probe of the run),
  our CPU time (user+sys) per probe per round, and tgtd's CPU per probe from /proc. The ratio
  lun / login is taken within the one run.
* **1,000 candidates**: ``probe()`` with ``ordered`` and ``probe_all=True`` over 250 portals x 4
  targets (candidate *i*: portal *i* mod 250, target *i* div 250, LUN 1), at concurrency 16 and
  64, each run in a fresh worker process (``python -m benchmarks.lun --worker``), ``login`` and
  ``lun`` alternating run by run. The four targets' LUN 1 share one backing file and one
  ``scsi_id``, so they are one volume with one WWID, as a multipath volume's paths are; else the
  chosen candidate would pin its WWID and every other would be ``wrong_volume``.
* **Where the extra CPU goes**: cProfile (CPU time) of the same per-probe loops, by category
  (construct, trio, the SCSI codec, the LUN check, the initiator...), per probe, lun minus login.

Goal checked: p50 wall time of one ``--check lun`` probe at most 1.5x that of ``--check login``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from benchmarks.common import (
    BENCH_INITIATOR,
    BENCH_IQN_PREFIX,
    BENCH_PORT,
    BenchError,
    Clock,
    Summary,
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
from pyiscsi_failover.prober import Check, Policy, ProbeOptions, probe

__all__ = ["GOAL_RATIO", "run"]

_BLOCK: Final = 60
PORTALS: Final = 250
TARGETS: Final = 4
LUN: Final = 1
#: One scsi_id for every target's LUN 1: one volume, WWID naa.6 + these 31 hex digits.
SCSI_ID: Final = "0123456789abcdef0123456789abcde"
#: p50 wall of one ``--check lun`` probe may be at most this many times ``--check login``'s.
GOAL_RATIO: Final = 1.5
SCALE_CANDIDATES: Final = 1000
CHECKS: Final = (Check.LOGIN, Check.LUN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    probes_per_round: int
    rounds: int
    warmup: int
    concurrency: tuple[int, ...]
    scale_reps: int
    profile_probes: int


FULL: Final = Plan(
    probes_per_round=100,
    rounds=10,
    warmup=30,
    concurrency=(16, 64),
    scale_reps=3,
    profile_probes=300,
)
QUICK: Final = Plan(
    probes_per_round=50, rounds=4, warmup=10, concurrency=(16, 64), scale_reps=1, profile_probes=100
)


def _iqn(t: int) -> str:
    return f"{BENCH_IQN_PREFIX}:lun-{t}"


def _portal(i: int) -> str:
    return f"{loopback(_BLOCK, i)}:{BENCH_PORT}"


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no measurements")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _tgtd() -> Tgtd:
    """One tgtd, 250 portals, 4 targets whose LUN 1 is the same volume (file and scsi_id)."""
    tgtd = Tgtd(loopback(_BLOCK, 0)).start()
    try:
        for i in range(1, PORTALS):
            tgtd.add_portal(loopback(_BLOCK, i))
        backing: Path | None = None
        for t in range(TARGETS):
            tgtd.add_target(t + 1, _iqn(t))
            backing = tgtd.add_disk(t + 1, LUN, size_mib=64, backing=backing)
            tgtd.set_scsi_id(t + 1, LUN, SCSI_ID)
    except BaseException:
        tgtd.stop()
        raise
    return tgtd


def _check_result(check: Check, result: object, n: int) -> Counter[str]:
    """Outcome counts; for ``lun``, also that every ok attempt saw the one volume's WWID."""
    attempts = getattr(result, "attempts", ())
    outcomes = Counter(attempt.outcome.value for attempt in attempts)
    if check is Check.LUN:
        for attempt in attempts:
            info = attempt.lun_info
            if attempt.ok and (info is None or info.wwid != f"naa.6{SCSI_ID}"):
                raise BenchError(f"a lun probe saw {info!r}, not the volume naa.6{SCSI_ID}")
    if len(attempts) != n:
        raise BenchError(f"probe() reported {len(attempts)} attempts for {n} candidates")
    return outcomes


# --------------------------------------------------------------------------------------------
# Per probe, in this process


def _options(check: Check, **extra: object) -> ProbeOptions:
    return ProbeOptions(initiator_name=BENCH_INITIATOR, check=check, **extra)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Side:
    """Every probe's wall time and each round's CPU of one check."""

    check: Check
    wall_us: list[float] = field(default_factory=list)
    cpu_us_rounds: list[float] = field(default_factory=list)
    wall_us_rounds: list[float] = field(default_factory=list)
    tgtd_cpu_us_rounds: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def p50(self) -> float:
        return _percentile(self.wall_us, 0.5)

    @property
    def p95(self) -> float:
        return _percentile(self.wall_us, 0.95)

    @property
    def cpu(self) -> Summary:
        return Summary.of(self.cpu_us_rounds)

    def to_json(self) -> dict[str, object]:
        return {
            "check": self.check.value,
            "probes": len(self.wall_us),
            "wall_us_p50": self.p50,
            "wall_us_p95": self.p95,
            "wall_us_max": max(self.wall_us),
            "cpu_us_per_probe": self.cpu.to_json(),
            "cpu_us_per_probe_rounds": self.cpu_us_rounds,
            "wall_us_per_probe_rounds": self.wall_us_rounds,
            "tgtd_cpu_us_per_probe": Summary.of(self.tgtd_cpu_us_rounds).to_json(),
            "outcomes": dict(self.outcomes),
        }


def _round(check: Check, count: int) -> tuple[Clock, list[float], Counter[str]]:
    info = parse_connection_info(build_connection_info(_portal(0), _iqn(0), LUN))
    options = _options(check)
    walls: list[float] = []
    outcomes: Counter[str] = Counter()

    async def loop() -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            result = await probe(info, options)
            walls.append((time.perf_counter() - t0) * 1e6)
            outcomes.update(_check_result(check, result, 1))

    clock = Clock()
    with clock:
        trio.run(loop)
    return clock, walls, outcomes


def _per_probe(tgtd_pid: int, plan: Plan) -> dict[Check, _Side]:
    sides = {check: _Side(check) for check in CHECKS}
    for check in CHECKS:  # imports, compiled headers, tgtd's first sessions
        _round(check, plan.warmup)
    for index in range(plan.rounds):
        for check in CHECKS if index % 2 == 0 else reversed(CHECKS):
            side = sides[check]
            before = process_cpu(tgtd_pid)
            clock, walls, outcomes = _round(check, plan.probes_per_round)
            side.tgtd_cpu_us_rounds.append(
                (process_cpu(tgtd_pid) - before) / plan.probes_per_round * 1e6
            )
            side.cpu_us_rounds.append(clock.cpu_s / plan.probes_per_round * 1e6)
            side.wall_us_rounds.append(clock.wall_s / plan.probes_per_round * 1e6)
            side.wall_us += walls
            side.outcomes += outcomes
    return sides


# --------------------------------------------------------------------------------------------
# Where the CPU goes: cProfile of the same loops


def _category(file: str, name: str) -> str:
    if "/construct/" in file:
        return "construct (PDU and CDB encode/decode)"
    if "/trio/" in file:
        return "trio (scheduler, cancel scopes)"
    if file.endswith("pyiscsi_failover/lun_check.py"):
        return "pyiscsi_failover.lun_check"
    if file.endswith("pyiscsi_failover/protocol/scsi.py"):
        return "pyiscsi_failover.protocol.scsi (CDBs, replies)"
    if "/pyiscsi_failover/protocol/" in file:
        return "pyiscsi_failover.protocol (other, minus construct)"
    if file.endswith("pyiscsi_failover/initiator.py"):
        return "pyiscsi_failover.initiator (state machine)"
    if file.endswith("pyiscsi_failover/transport.py"):
        return "pyiscsi_failover.transport"
    if "/pyiscsi_failover/" in file:
        return "pyiscsi_failover (prober, other)"
    if file == "~" and "socket" in name:
        return "socket system calls"
    if file == "~" and "epoll" in name:
        return "epoll"
    return "other (stdlib, builtins)"


def _profile(check: Check, count: int) -> pstats.Stats:
    info = parse_connection_info(build_connection_info(_portal(0), _iqn(0), LUN))
    options = _options(check)

    async def loop() -> None:
        for _ in range(count):
            _check_result(check, await probe(info, options), 1)

    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(trio.run, loop)
    return pstats.Stats(profiler)


def _by_category(stats: pstats.Stats, count: int) -> Counter[str]:
    totals: Counter[str] = Counter()
    table = stats.stats  # type: ignore[attr-defined]
    for (file, _line, name), (_cc, _nc, tt, _ct, _callers) in table.items():
        totals[_category(file, name)] += tt / count * 1e6
    return totals


def _top(stats: pstats.Stats, count: int, limit: int) -> list[dict[str, object]]:
    table = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:limit]
    return [
        {
            "function": f"{Path(file).name if file != '~' else ''}:{line}({name})",
            "calls_per_probe": round(nc / count, 2),
            "tottime_us_per_probe": round(tt / count * 1e6, 1),
            "cumtime_us_per_probe": round(ct / count * 1e6, 1),
        }
        for (file, line, name), (_cc, nc, tt, ct, _callers) in rows
    ]


#: Functions whose cumulative time per probe says where a LUN check's extra time goes:
#: (label, file suffix or "~" for builtins, function name).
_WATCHED: Final = (
    ("transport._check_lun (the whole SCSI phase)", "pyiscsi_failover/transport.py", "_check_lun"),
    ("LunCheck.start (plan the CDBs)", "pyiscsi_failover/lun_check.py", "start"),
    ("LunCheck.completed (status and sense)", "pyiscsi_failover/lun_check.py", "completed"),
    ("LunCheck.digest (read the answers' data)", "pyiscsi_failover/lun_check.py", "digest"),
    ("LunCheck.judge (the verdict)", "pyiscsi_failover/lun_check.py", "judge"),
    (
        "  parse_vpd_device_identification",
        "pyiscsi_failover/protocol/scsi.py",
        "parse_vpd_device_identification",
    ),
    ("  DeviceIdentification.wwid", "pyiscsi_failover/protocol/scsi.py", "wwid"),
    ("InitiatorConnection.submit", "pyiscsi_failover/initiator.py", "submit"),
    ("InitiatorConnection._send_window", "pyiscsi_failover/initiator.py", "_send_window"),
    ("InitiatorConnection._on_data_in", "pyiscsi_failover/initiator.py", "_on_data_in"),
    ("encode_pdu", "pyiscsi_failover/protocol/wire.py", "encode_pdu"),
    ("wire.next_pdu (cut and decode)", "pyiscsi_failover/protocol/wire.py", "next_pdu"),
    ("socket.send", "~", "<method 'send' of '_socket.socket' objects>"),
    ("socket.recv", "~", "<method 'recv' of '_socket.socket' objects>"),
)


def _watched(stats: pstats.Stats, count: int) -> dict[str, dict[str, float]]:
    table = stats.stats  # type: ignore[attr-defined]
    out: dict[str, dict[str, float]] = {}
    for label, suffix, function in _WATCHED:
        calls = cum = 0.0
        for (file, _line, name), (_cc, nc, _tt, ct, _callers) in table.items():
            if name == function and (file == suffix if suffix == "~" else file.endswith(suffix)):
                calls += nc
                cum += ct
        out[label] = {"calls": round(calls / count, 2), "cumtime_us": round(cum / count * 1e6, 1)}
    return out


def _where(plan: Plan) -> dict[str, object]:
    login = _profile(Check.LOGIN, plan.profile_probes)
    lun = _profile(Check.LUN, plan.profile_probes)
    by_login = _by_category(login, plan.profile_probes)
    by_lun = _by_category(lun, plan.profile_probes)
    rows = [
        {
            "category": name,
            "login_us": round(by_login[name], 1),
            "lun_us": round(by_lun[name], 1),
            "extra_us": round(by_lun[name] - by_login[name], 1),
        }
        for name in sorted(set(by_login) | set(by_lun), key=lambda k: by_login[k] - by_lun[k])
    ]
    return {
        "timer": "CPU time (time.process_time), per probe, under cProfile (inflated by it)",
        "probes": plan.profile_probes,
        "by_category": rows,
        "total_us": {"login": sum(by_login.values()), "lun": sum(by_lun.values())},
        "functions": {
            "login": _watched(login, plan.profile_probes),
            "lun": _watched(lun, plan.profile_probes),
        },
        "top_tottime_lun": _top(lun, plan.profile_probes, 20),
        "top_tottime_login": _top(login, plan.profile_probes, 10),
    }


# --------------------------------------------------------------------------------------------
# 1,000 candidates: one fresh worker process per run


def _worker(spec: dict[str, object]) -> dict[str, object]:
    n, concurrency, check = spec["n"], spec["concurrency"], Check(spec["check"])
    assert isinstance(n, int)
    assert isinstance(concurrency, int)
    raise_nofile(concurrency + 64)
    portals = [_portal(i % PORTALS) for i in range(n)]
    iqns = [_iqn(i // PORTALS) for i in range(n)]
    info = parse_connection_info(build_connection_info(portals, iqns, LUN))
    options = _options(check, policy=Policy.ORDERED, probe_all=True, concurrency=concurrency)
    clock = Clock()

    async def measured() -> Counter[str]:
        with clock:
            result = await probe(info, options)
        return _check_result(check, result, n)

    outcomes = trio.run(measured)
    return {
        "wall_s": clock.wall_s,
        "user_s": clock.user_s,
        "sys_s": clock.sys_s,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "outcomes": dict(outcomes),
    }


def _run_worker(spec: dict[str, object]) -> dict[str, object]:
    return run_worker("benchmarks.lun", spec, timeout=600)


@dataclass(slots=True)
class _Cell(WorkerRuns):
    check: Check
    concurrency: int
    runs: list[dict[str, object]] = field(default_factory=list)
    tgtd_cpu_s: list[float] = field(default_factory=list)

    @property
    def all_ok(self) -> bool:
        return self.all_succeeded(SCALE_CANDIDATES)

    def to_json(self) -> dict[str, object]:
        return {
            "check": self.check.value,
            "candidates": SCALE_CANDIDATES,
            "concurrency": self.concurrency,
            "wall_s": self.wall.to_json(),
            "cpu_s": self.cpu.to_json(),
            "probes_per_s": SCALE_CANDIDATES / self.wall.median,
            "peak_rss_mib": self.rss_mib,
            "tgtd_cpu_s": Summary.of(self.tgtd_cpu_s).to_json(),
            "all_ok": self.all_ok,
            "runs": self.runs,
        }


def _scale(tgtd_pid: int, plan: Plan, reps: int) -> list[_Cell]:
    cells: list[_Cell] = []
    for concurrency in plan.concurrency:
        pair = {check: _Cell(check, concurrency) for check in CHECKS}
        for index in range(reps):
            for check in CHECKS if index % 2 == 0 else reversed(CHECKS):
                spec = {"n": SCALE_CANDIDATES, "concurrency": concurrency, "check": check.value}
                before = process_cpu(tgtd_pid)
                pair[check].runs.append(_run_worker(spec))
                pair[check].tgtd_cpu_s.append(process_cpu(tgtd_pid) - before)
        for check in CHECKS:
            cell = pair[check]
            print(
                f"  N={SCALE_CANDIDATES} concurrency={concurrency:3} {check.value:5}: "
                f"wall {cell.wall.median:.3f} s, CPU {cell.cpu.median:.3f} s",
                flush=True,
            )
            cells.append(cell)
    return cells


# --------------------------------------------------------------------------------------------
# The run


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 6, print its tables, write lun[-quick].json; return the payload."""
    plan = QUICK if quick else FULL
    rounds = reps or plan.rounds
    plan = Plan(
        probes_per_round=plan.probes_per_round,
        rounds=rounds,
        warmup=plan.warmup,
        concurrency=plan.concurrency,
        scale_reps=reps or plan.scale_reps,
        profile_probes=plan.profile_probes,
    )
    if find_tool("tgtd") is None or find_tool("tgtadm") is None:
        raise BenchError("tgtd/tgtadm not installed (Debian package tgt): the only SCSI peer")
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    nofile = raise_nofile(PORTALS + 2 * max(plan.concurrency) + 256)
    with _tgtd() as tgtd:
        sides = _per_probe(tgtd.pid, plan)
        login, lun = sides[Check.LOGIN], sides[Check.LUN]
        print(
            f"  per probe: login p50 {login.p50:.0f} us, lun p50 {lun.p50:.0f} us "
            f"({lun.p50 / login.p50:.2f}x)",
            flush=True,
        )
        where = _where(plan)
        cells = _scale(tgtd.pid, plan, plan.scale_reps)

    ratio_p50 = lun.p50 / login.p50
    round_ratios = [b / a for a, b in zip(login.wall_us_rounds, lun.wall_us_rounds, strict=True)]
    all_ok = all(side.outcomes.get("ok", 0) == len(side.wall_us) for side in sides.values())
    verdict = "PASS" if ratio_p50 <= GOAL_RATIO and all_ok else "FAIL"
    goals: list[dict[str, object]] = [
        {
            "goal": f"p50 wall of one --check lun probe <= {GOAL_RATIO:g}x --check login's "
            "(tgtd, loopback)",
            "login_p50_us": login.p50,
            "lun_p50_us": lun.p50,
            "ratio": ratio_p50,
            "all_ok": all_ok,
            "verdict": verdict,
        }
    ]
    scale_ratios: list[dict[str, object]] = []
    for concurrency in plan.concurrency:
        by = {c.check: c for c in cells if c.concurrency == concurrency}
        scale_ratios.append(
            {
                "concurrency": concurrency,
                "wall_ratio": by[Check.LUN].wall.median / by[Check.LOGIN].wall.median,
                "cpu_ratio": by[Check.LUN].cpu.median / by[Check.LOGIN].cpu.median,
            }
        )
    payload: dict[str, object] = {
        **results_header(
            "lun", quick=quick, started_at=started_at, started=started, machine=machine
        ),
        "settings": {
            "peer": "tgtd: 250 loopback portals, 4 targets, LUN 1 of each a disk on one shared "
            f"64 MiB sparse file with scsi_id={SCSI_ID} (one volume); LUN 0 is tgt's controller",
            "per_probe": f"probe() of 1 candidate (portal 0, target 1, LUN {LUN}), "
            f"{plan.rounds} rounds x {plan.probes_per_round} probes per check, login and lun "
            f"alternating (order flipped every round) after {plan.warmup} warm-up probes each, "
            "in this process; wall per probe (p50/p95 nearest rank over all probes), CPU "
            "(user+sys) per probe per round, tgtd CPU from /proc (10 ms ticks)",
            "scale": f"{SCALE_CANDIDATES} candidates (candidate i: portal i mod {PORTALS}, target "
            f"i div {PORTALS}, LUN {LUN}), ordered, probe_all=True, concurrency "
            f"{list(plan.concurrency)}, {plan.scale_reps} runs per check, login and lun "
            "alternating run by run, each run a fresh 'python -m benchmarks.lun --worker'",
            "timeouts": "connect 3 s, login 10 s (defaults)",
            "rlimit_nofile": nofile,
        },
        "per_probe": {
            "login": login.to_json(),
            "lun": lun.to_json(),
            "ratio_wall_p50": ratio_p50,
            "ratio_wall_p95": lun.p95 / login.p95,
            "ratio_cpu": lun.cpu.median / login.cpu.median,
            "ratio_wall_per_round": round_ratios,
        },
        "scale": [c.to_json() for c in cells],
        "scale_ratios": scale_ratios,
        "profile": where,
        "goals": goals,
    }
    path = write_json("lun", payload, quick=quick)
    _print(sides, round_ratios, cells, scale_ratios, where, goals[0])
    print(f"\nwritten: {path}")
    return payload


def _print(
    sides: dict[Check, _Side],
    round_ratios: list[float],
    cells: list[_Cell],
    scale_ratios: list[dict[str, object]],
    where: dict[str, object],
    goal: dict[str, object],
) -> None:
    login, lun = sides[Check.LOGIN], sides[Check.LUN]
    print_table(
        "LUN check cost per probe (probe() of 1 tgtd candidate; wall over all probes, CPU "
        "median of rounds)",
        ["check", "probes", "wall p50 us", "wall p95 us", "CPU us", "tgtd CPU us", "all ok"],
        [
            [
                side.check.value,
                len(side.wall_us),
                f"{side.p50:.0f}",
                f"{side.p95:.0f}",
                f"{side.cpu.median:.0f}",
                f"{Summary.of(side.tgtd_cpu_us_rounds).median:.0f}",
                "yes" if side.outcomes.get("ok", 0) == len(side.wall_us) else "NO",
            ]
            for side in (login, lun)
        ]
        + [
            [
                "lun/login",
                "",
                f"{lun.p50 / login.p50:.2f}x",
                f"{lun.p95 / login.p95:.2f}x",
                f"{lun.cpu.median / login.cpu.median:.2f}x",
                "",
                "",
            ]
        ],
    )
    print(
        f"  per-round wall ratios lun/login: {min(round_ratios):.2f}-{max(round_ratios):.2f}x",
        flush=True,
    )
    print_table(
        f"{SCALE_CANDIDATES} candidates (ordered, probe_all), medians",
        ["concurrency", "check", "wall s", "CPU s (ours)", "probes/s", "tgtd CPU s", "all ok"],
        [
            [
                c.concurrency,
                c.check.value,
                f"{c.wall.median:.3f}",
                f"{c.cpu.median:.3f}",
                f"{SCALE_CANDIDATES / c.wall.median:.0f}",
                f"{Summary.of(c.tgtd_cpu_s).median:.3f}",
                "yes" if c.all_ok else "NO",
            ]
            for c in cells
        ],
    )
    print_table(
        "  lun/login at 1,000",
        ["concurrency", "wall", "CPU"],
        [
            [r["concurrency"], f"{r['wall_ratio']:.2f}x", f"{r['cpu_ratio']:.2f}x"]
            for r in scale_ratios
        ],
    )
    categories = where["by_category"]
    assert isinstance(categories, list)
    print_table(
        "Where the CPU goes: cProfile (CPU time) per probe, us (inflated by the profiler)",
        ["category", "login", "lun", "lun - login"],
        [[r["category"], r["login_us"], r["lun_us"], r["extra_us"]] for r in categories],
    )
    functions = where["functions"]
    assert isinstance(functions, dict)
    print_table(
        "  per probe, calls and cumulative us (cProfile)",
        ["function", "login calls", "login us", "lun calls", "lun us"],
        [
            [
                label,
                functions["login"][label]["calls"],
                functions["login"][label]["cumtime_us"],
                functions["lun"][label]["calls"],
                functions["lun"][label]["cumtime_us"],
            ]
            for label, _suffix, _name in _WATCHED
        ],
    )
    top = where["top_tottime_lun"]
    assert isinstance(top, list)
    print_table(
        "  top functions of a lun probe by own time",
        ["function", "calls", "tottime us", "cumtime us"],
        [
            [
                t["function"],
                t["calls_per_probe"],
                t["tottime_us_per_probe"],
                t["cumtime_us_per_probe"],
            ]
            for t in top[:15]
        ],
    )
    print(
        f"\nGoal: p50 wall lun <= {GOAL_RATIO:g}x login: {goal['ratio']:.2f}x -> {goal['verdict']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lun")
    parser.add_argument("--worker", action="store_true", help="internal: one measurement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(_worker(spec)))
        return 0
    run(quick=args.quick, reps=args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
