"""Benchmark 1: how long failover takes on loopback, per policy and scenario, next to baselines.

Each scenario is a list of candidates, the bad ones first and the working one (if any) last,
all served by our test target running as separate processes: one process has the working
portal and the refusing, blackholed and silent ones (CHAP required), a second one demands a
different CHAP secret (the "wrong CHAP" portal). For every repetition and scenario we time, in
one run and side by side:

* ``probe()`` under ``sequential``, ``ordered`` and ``staggered`` (wall time until it returns);
* a libiscsi ``iscsi-ls`` loop over the same portals in order, stopping at the first success,
  each try killed after a cap: a real C initiator with no failover and no connect timeout;
* open-iscsi's documented timing for the same list, *stated* from ``/etc/iscsi/iscsid.conf``
  (one ``iscsiadm --login`` per portal in order), not measured.

Goals checked: ``staggered`` with a blackholed main portal within stagger + 100 ms; ``ordered``
with two blackholed portals first within about one connect timeout (under 1.5 of them).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from benchmarks.common import (
    BENCH_INITIATOR,
    BENCH_IQN_PREFIX,
    BENCH_PORT,
    PortalSpec,
    Summary,
    TargetProcess,
    ToolRun,
    find_tool,
    load_average,
    loopback,
    machine_facts,
    print_table,
    run_iscsi_ls,
    utc_now,
    warn_if_busy,
    write_json,
)
from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.prober import Policy, ProbeOptions, ProbeResult, probe

__all__ = ["FULL", "QUICK", "SCENARIOS", "Scenario", "Settings", "open_iscsi_timing", "run"]

IQN: Final = f"{BENCH_IQN_PREFIX}:failover-volume"
CHAP_USER: Final = "bench-user"
# Benchmark-only secrets for throw-away loopback targets.
CHAP_SECRET: Final = "bench-secret-0123456789"
WRONG_SECRET: Final = "other-secret-9876543210"
ISCSID_CONF: Final = Path("/etc/iscsi/iscsid.conf")
_ADDRESS_BLOCK: Final = 10
POLICIES: Final = (Policy.SEQUENTIAL, Policy.ORDERED, Policy.STAGGERED)
#: open-iscsi's compiled-in defaults (usr/iscsi_settings.h, idbm.c), used without iscsid.conf.
_OPEN_ISCSI_DEFAULTS: Final = {
    "node.conn[0].timeo.login_timeout": 15,
    "node.session.initial_login_retry_max": 8,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    connect_timeout: float
    login_timeout: float
    stagger: float
    #: Each iscsi-ls try is killed after this long (libiscsi has no timeout of its own).
    iscsi_ls_cap: float
    reps: int


FULL: Final = Settings(
    connect_timeout=3.0, login_timeout=10.0, stagger=0.25, iscsi_ls_cap=10.0, reps=3
)
QUICK: Final = Settings(
    connect_timeout=1.0, login_timeout=1.0, stagger=0.25, iscsi_ls_cap=1.0, reps=3
)

#: Portal roles: name -> faults of our test target. "wrong-chap" lives in a second process.
_ROLES: Final[dict[str, tuple[str, ...]]] = {
    "ok": (),
    "refuse": ("refuse",),
    "blackhole": ("blackhole",),
    "blackhole2": ("blackhole",),
    "silent": ("silent",),
    "wrong-chap": (),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    key: str
    label: str
    roles: tuple[str, ...]

    @property
    def winner(self) -> int | None:
        """Index of the working candidate, None when every candidate is dead."""
        return self.roles.index("ok") if "ok" in self.roles else None


SCENARIOS: Final = (
    Scenario(key="refused", label="main refused", roles=("refuse", "ok")),
    Scenario(key="blackholed", label="main blackholed", roles=("blackhole", "ok")),
    Scenario(key="silent", label="main silent after accept", roles=("silent", "ok")),
    Scenario(key="wrong-chap", label="main wrong CHAP", roles=("wrong-chap", "ok")),
    Scenario(
        key="two-blackholed", label="first two blackholed", roles=("blackhole", "blackhole2", "ok")
    ),
    Scenario(key="all-dead", label="all dead", roles=("blackhole", "refuse", "silent")),
)


# --------------------------------------------------------------------------------------------
# open-iscsi: a stated figure


def read_iscsid_conf(path: Path = ISCSID_CONF) -> dict[str, object]:
    """The two settings that bound an initial login, from iscsid.conf or open-iscsi's defaults."""
    values: dict[str, int] = dict(_OPEN_ISCSI_DEFAULTS)
    source = "open-iscsi compiled-in defaults (no iscsid.conf)"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    if text is not None:
        source = str(path)
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("#") or "=" not in line:
                continue
            key, _, value = (part.strip() for part in line.partition("="))
            if key in values and re.fullmatch(r"\d+", value):
                values[key] = int(value)
    return {"source": source, **values}


def open_iscsi_timing(scenario: Scenario, conf: dict[str, object]) -> float:
    """Seconds open-iscsi is documented to spend before it reaches the working candidate.

    iscsid retries an initial login that times out or cannot connect until
    initial_login_retry_max x login_timeout seconds have passed since the first connect (a
    refused connect is retried every 3 s; iscsid.conf's Retry section and usr/initiator.c's
    iscsi_retry_initial_login), so each dead portal costs about that long per
    ``iscsiadm --login``. An authentication failure (status 0x0201) is final at once.
    """
    login_timeout = conf["node.conn[0].timeo.login_timeout"]
    retries = conf["node.session.initial_login_retry_max"]
    assert isinstance(login_timeout, int)
    assert isinstance(retries, int)
    per_dead_portal = float(login_timeout * retries)
    total = 0.0
    for role in scenario.roles:
        if role == "ok":
            break
        if role != "wrong-chap":
            total += per_dead_portal
    return total


# --------------------------------------------------------------------------------------------
# Measuring


def _probe_once(info: ConnectionInfo, options: ProbeOptions) -> tuple[float, ProbeResult]:
    async def timed() -> tuple[float, ProbeResult]:
        started = time.perf_counter()
        result = await probe(info, options)
        return time.perf_counter() - started, result

    return trio.run(timed)


def _iscsi_ls_loop(
    iscsi_ls: str, portals: list[str], settings: Settings
) -> tuple[float, int | None, list[ToolRun]]:
    """Run iscsi-ls on each portal in order until one succeeds; (wall, winner, tries)."""
    tries: list[ToolRun] = []
    winner: int | None = None
    started = time.perf_counter()
    for index, portal in enumerate(portals):
        attempt = run_iscsi_ls(
            iscsi_ls, portal, cap_s=settings.iscsi_ls_cap, chap=(CHAP_USER, CHAP_SECRET)
        )
        tries.append(attempt)
        if attempt.ok:
            winner = index
            break
    return time.perf_counter() - started, winner, tries


def _targets() -> tuple[TargetProcess, TargetProcess]:
    good = TargetProcess(
        portals=[
            PortalSpec(
                name=role, host=loopback(_ADDRESS_BLOCK, index), port=BENCH_PORT, faults=faults
            )
            for index, (role, faults) in enumerate(_ROLES.items())
            if role != "wrong-chap"
        ],
        targets=[IQN],
        chap=(CHAP_USER, CHAP_SECRET),
    )
    wrong = TargetProcess(
        portals=[
            PortalSpec(
                name="wrong-chap",
                host=loopback(_ADDRESS_BLOCK, list(_ROLES).index("wrong-chap")),
                port=BENCH_PORT,
            )
        ],
        targets=[IQN],
        chap=(CHAP_USER, WRONG_SECRET),
    )
    return good, wrong


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@dataclass(slots=True)
class _Series:
    """Every repetition of one method on one scenario."""

    latencies: list[float] = field(default_factory=list)
    chosen: list[int | None] = field(default_factory=list)
    last_run: list[dict[str, object]] = field(default_factory=list)
    last_text: str = ""

    def to_json(self, expected: int | None) -> dict[str, object]:
        return {
            "latency_s": Summary.of(self.latencies).to_json(),
            "runs_s": [round(x, 6) for x in self.latencies],
            "chosen": self.chosen,
            "as_expected": all(c == expected for c in self.chosen),
            "last_run": self.last_run,
        }


def _measure(
    settings: Settings, repetitions: int, iscsi_ls: str | None
) -> dict[tuple[str, str], _Series]:
    credentials = ChapCredentials(CHAP_USER, Secret(CHAP_SECRET))
    options = {
        policy: ProbeOptions(
            policy=policy,
            connect_timeout=settings.connect_timeout,
            login_timeout=settings.login_timeout,
            stagger=settings.stagger,
            initiator_name=BENCH_INITIATOR,
        )
        for policy in POLICIES
    }
    series: dict[tuple[str, str], _Series] = {}
    good, wrong = _targets()
    with good, wrong:
        address = {role: (wrong if role == "wrong-chap" else good).address(role) for role in _ROLES}
        infos = {
            s.key: parse_connection_info(
                build_connection_info([address[r] for r in s.roles], IQN, 0, auth=credentials)
            )
            for s in SCENARIOS
        }
        for rep in range(repetitions):
            print(f"  repetition {rep + 1}/{repetitions}", flush=True)
            for scenario in SCENARIOS:
                for policy in POLICIES:
                    wall, result = _probe_once(infos[scenario.key], options[policy])
                    entry = series.setdefault((scenario.key, policy.value), _Series())
                    entry.latencies.append(wall)
                    entry.chosen.append(
                        None if result.candidate is None else result.candidate.index
                    )
                    entry.last_run = [a.to_json() for a in result.attempts]
                    entry.last_text = ", ".join(
                        f"{a.outcome.value} {a.elapsed_s * 1000:.0f}ms" for a in result.attempts
                    )
                if iscsi_ls is None:
                    continue
                portals = [address[r] for r in scenario.roles]
                wall, winner, tries = _iscsi_ls_loop(iscsi_ls, portals, settings)
                entry = series.setdefault((scenario.key, "iscsi-ls"), _Series())
                entry.latencies.append(wall)
                entry.chosen.append(winner)
                entry.last_run = [
                    {"portal": p, "returncode": t.returncode, "wall_ms": round(t.wall_s * 1e3, 3)}
                    for p, t in zip(portals, tries, strict=False)
                ]
                entry.last_text = ", ".join(
                    f"{'killed' if t.returncode is None else f'rc {t.returncode}'} "
                    f"{t.wall_s * 1000:.0f}ms"
                    for t in tries
                )
    return series


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 1, print its tables, write failover[-quick].json; return the payload."""
    settings = QUICK if quick else FULL
    repetitions = reps if reps is not None else settings.reps
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    conf = read_iscsid_conf()
    iscsi_ls = find_tool("iscsi-ls")
    series = _measure(settings, repetitions, iscsi_ls)
    methods = [p.value for p in POLICIES] + (["iscsi-ls"] if iscsi_ls is not None else [])

    def median(scenario_key: str, method: str) -> float:
        return Summary.of(series[(scenario_key, method)].latencies).median

    rows: list[list[object]] = []
    detail_rows: list[list[object]] = []
    scenarios_json: list[dict[str, object]] = []
    for scenario in SCENARIOS:
        stated = open_iscsi_timing(scenario, conf)
        scenarios_json.append(
            {
                "key": scenario.key,
                "label": scenario.label,
                "roles": list(scenario.roles),
                "expected_winner": scenario.winner,
                "methods": {m: series[(scenario.key, m)].to_json(scenario.winner) for m in methods},
                "open_iscsi_stated_s": stated,
            }
        )
        as_expected = all(
            c == scenario.winner for m in methods for c in series[(scenario.key, m)].chosen
        )
        rows.append(
            [
                scenario.label,
                *(_ms(median(scenario.key, m)) for m in methods),
                f"{stated * 1000:.0f}",
                "none" if scenario.winner is None else f"#{scenario.winner}",
                "yes" if as_expected else "NO",
            ]
        )
        detail_rows.extend([scenario.key, m, series[(scenario.key, m)].last_text] for m in methods)

    staggered_bh = median("blackholed", "staggered")
    limit_staggered = settings.stagger + 0.100
    ordered_two = median("two-blackholed", "ordered")
    limit_ordered = 1.5 * settings.connect_timeout
    goals: list[dict[str, object]] = [
        {
            "goal": "staggered: a blackholed main portal costs at most stagger + 100 ms",
            "measured_s": staggered_bh,
            "limit_s": limit_staggered,
            "verdict": "PASS" if staggered_bh <= limit_staggered else "FAIL",
        },
        {
            "goal": "ordered: two blackholed portals before the winner cost about one connect "
            "timeout, not two (measured < 1.5 x connect timeout)",
            "measured_s": ordered_two,
            "limit_s": limit_ordered,
            "sequential_s": median("two-blackholed", "sequential"),
            "ratio_to_connect_timeout": ordered_two / settings.connect_timeout,
            "verdict": "PASS" if ordered_two < limit_ordered else "FAIL",
        },
    ]
    payload: dict[str, object] = {
        "benchmark": "failover",
        "mode": "quick" if quick else "full",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "load_average_at_end": load_average(),
        "settings": {
            "connect_timeout_s": settings.connect_timeout,
            "login_timeout_s": settings.login_timeout,
            "stagger_s": settings.stagger,
            "iscsi_ls_cap_s": settings.iscsi_ls_cap,
            "repetitions": repetitions,
            "statistic": "median wall time from calling probe() (or starting the iscsi-ls "
            "loop) until it returns",
            "chap": "every candidate logs in with CHAP; the wrong-CHAP portal is a second "
            "test target process with another secret",
            "iscsi_ls": iscsi_ls or "not found: baseline skipped",
        },
        "open_iscsi": {
            **conf,
            "note": "stated, not measured: initial_login_retry_max x login_timeout per dead "
            "portal (one iscsiadm --login per portal, in order); an authentication failure "
            "is not retried",
        },
        "scenarios": scenarios_json,
        "goals": goals,
    }
    path = write_json("failover", payload, quick=quick)

    print_table(
        f"Failover latency, ms (median of {repetitions}; connect {settings.connect_timeout:g} s, "
        f"login {settings.login_timeout:g} s, stagger {settings.stagger:g} s, iscsi-ls cap "
        f"{settings.iscsi_ls_cap:g} s; open-iscsi stated from {conf['source']}, not measured)",
        ["scenario", *methods, "open-iscsi (stated)", "winner", "chosen as expected"],
        rows,
    )
    print_table(
        "Per-candidate outcomes, last repetition", ["scenario", "method", "attempts"], detail_rows
    )
    print_table(
        "Failover goals",
        ["goal", "measured ms", "limit ms", "verdict"],
        [
            [
                "staggered, main blackholed <= stagger + 100 ms",
                _ms(staggered_bh),
                _ms(limit_staggered),
                goals[0]["verdict"],
            ],
            [
                "ordered, two blackholed ~ one connect timeout",
                _ms(ordered_two),
                _ms(limit_ordered),
                goals[1]["verdict"],
            ],
        ],
    )
    print(f"\nwritten: {path}")
    return payload
