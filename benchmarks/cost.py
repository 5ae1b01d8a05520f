"""Benchmark 3: what one login costs in CPU, and what its parts cost.

* Per login: our process's CPU time (user+sys) per login+logout against ``tgtd`` on loopback,
  sequential, in rounds of many logins (no auth, CHAP, a discovery session, and a whole
  ``probe()`` of one candidate), next to libiscsi's ``iscsi-ls`` against the same target (its
  CPU per run from RUSAGE_CHILDREN, which includes starting the process; ``iscsi-ls --usage``
  shows that start-up part alone). tgtd's own CPU per login is read from /proc.
* Per PDU: encode and decode of each PDU type with ``timeit`` (the codec is interpreted
  construct: ``wire.py`` never calls ``.compile()``).
* Per CHAP response: ``chap_response`` for each algorithm.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
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
    ToolRun,
    find_tool,
    load_average,
    loopback,
    machine_facts,
    print_table,
    process_cpu,
    run_iscsi_ls,
    utc_now,
    warn_if_busy,
    write_json,
)
from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.initiator import InitiatorConnection, LoginConfig
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import ProbeOptions, probe
from pyiscsi_failover.protocol import ChapAlgorithm, chap_response, decode_pdu, encode_pdu
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Reject,
    RejectReason,
    Stage,
    StatusClass,
    TextRequest,
    TextResponse,
)
from pyiscsi_failover.protocol.text import encode_text
from pyiscsi_failover.transport import discover, login

__all__ = ["run"]

_BLOCK: Final = 40
IQN_OPEN: Final = f"{BENCH_IQN_PREFIX}:cost-open"
IQN_CHAP: Final = f"{BENCH_IQN_PREFIX}:cost-chap"
CHAP_USER: Final = "bench-user"
# Benchmark-only secret for a throw-away loopback target.
CHAP_SECRET: Final = "bench-secret-0123456789"


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    logins_per_round: int
    rounds: int
    iscsi_ls_runs: int
    timeit_repeat: int


FULL: Final = Plan(logins_per_round=200, rounds=5, iscsi_ls_runs=100, timeit_repeat=5)
QUICK: Final = Plan(logins_per_round=100, rounds=3, iscsi_ls_runs=30, timeit_repeat=3)


# --------------------------------------------------------------------------------------------
# Per login, against tgtd


@dataclass(slots=True)
class _Case:
    name: str
    cpu_us: list[float]
    wall_us: list[float]
    target_cpu_us: list[float]
    start_up_included: bool = False

    def row(self) -> list[object]:
        cpu, wall, target = (Summary.of(x) for x in (self.cpu_us, self.wall_us, self.target_cpu_us))
        return [
            self.name,
            f"{cpu.median:.0f}",
            f"{cpu.low:.0f}-{cpu.high:.0f}",
            f"{wall.median:.0f}",
            f"{target.median:.0f}",
            cpu.n,
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "case": self.name,
            "cpu_us_per_op": Summary.of(self.cpu_us).to_json(),
            "wall_us_per_op": Summary.of(self.wall_us).to_json(),
            "tgtd_cpu_us_per_op": Summary.of(self.target_cpu_us).to_json(),
            "process_start_included": self.start_up_included,
        }


def _ours(
    name: str, operation: Callable[[], Awaitable[object]], tgtd_pid: int, plan: Plan
) -> _Case:
    """Rounds of ``logins_per_round`` sequential operations; CPU and wall per operation."""
    case = _Case(name=name, cpu_us=[], wall_us=[], target_cpu_us=[])

    async def warm_up() -> None:
        for _ in range(20):
            await operation()

    trio.run(warm_up)
    for _ in range(plan.rounds):
        clock = Clock()

        async def one_round(clock: Clock = clock) -> None:
            with clock:
                for _ in range(plan.logins_per_round):
                    await operation()

        before = process_cpu(tgtd_pid)
        trio.run(one_round)
        target_cpu = process_cpu(tgtd_pid) - before
        case.cpu_us.append(clock.cpu_s / plan.logins_per_round * 1e6)
        case.wall_us.append(clock.wall_s / plan.logins_per_round * 1e6)
        case.target_cpu_us.append(target_cpu / plan.logins_per_round * 1e6)
    return case


def _theirs(
    name: str, run_once: Callable[[], ToolRun], tgtd_pid: int, runs: int, *, network: bool
) -> _Case:
    case = _Case(name=name, cpu_us=[], wall_us=[], target_cpu_us=[], start_up_included=True)
    # tgtd's CPU comes from /proc in clock ticks (10 ms): read it over the whole batch.
    before = process_cpu(tgtd_pid)
    for _ in range(runs):
        result = run_once()
        if network and not result.ok:
            raise BenchError(f"iscsi-ls failed against tgtd (exit status {result.returncode})")
        case.cpu_us.append(result.cpu_s * 1e6)
        case.wall_us.append(result.wall_s * 1e6)
    case.target_cpu_us.append((process_cpu(tgtd_pid) - before) / runs * 1e6)
    return case


def _login_costs(plan: Plan) -> list[_Case]:
    host = loopback(_BLOCK, 0)
    portal = Portal(host=host, port=BENCH_PORT)
    chap = ChapCredentials(CHAP_USER, Secret(CHAP_SECRET))
    cases: list[_Case] = []
    with Tgtd(host) as tgtd:
        tgtd.add_target(1, IQN_OPEN)
        tgtd.add_target(2, IQN_CHAP)
        tgtd.require_chap(2, CHAP_USER, CHAP_SECRET)
        info = parse_connection_info(build_connection_info(f"{host}:{BENCH_PORT}", IQN_OPEN, 0))
        options = ProbeOptions(initiator_name=BENCH_INITIATOR)

        async def open_login() -> object:
            config = LoginConfig(initiator_name=BENCH_INITIATOR, target_name=IQN_OPEN)
            report = await login(portal, config)
            if not report.ok or report.logout is None:
                raise BenchError(f"login to tgtd failed: {report.outcome}")
            return report

        async def chap_login() -> object:
            config = LoginConfig(initiator_name=BENCH_INITIATOR, target_name=IQN_CHAP, chap=chap)
            report = await login(portal, config)
            if not report.ok or report.logout is None:
                raise BenchError(f"CHAP login to tgtd failed: {report.outcome}")
            return report

        async def discovery() -> object:
            report = await discover(portal, LoginConfig(initiator_name=BENCH_INITIATOR))
            if not report.targets:
                raise BenchError("SendTargets at tgtd found nothing")
            return report

        async def one_probe() -> object:
            result = await probe(info, options)
            if result.chosen is None:
                raise BenchError("probe() of tgtd chose nothing")
            return result

        cases.append(_ours("ours: login+logout, no auth", open_login, tgtd.pid, plan))
        cases.append(_ours("ours: login+logout, CHAP (MD5)", chap_login, tgtd.pid, plan))
        cases.append(_ours("ours: discovery (login+SendTargets+logout)", discovery, tgtd.pid, plan))
        cases.append(_ours("ours: probe() of 1 candidate", one_probe, tgtd.pid, plan))
        iscsi_ls = find_tool("iscsi-ls")
        if iscsi_ls is not None:
            address = f"{host}:{BENCH_PORT}"
            cases.append(
                _theirs(
                    "iscsi-ls: discovery (process incl.)",
                    lambda: run_iscsi_ls(iscsi_ls, address, cap_s=10.0),
                    tgtd.pid,
                    plan.iscsi_ls_runs,
                    network=True,
                )
            )
            cases.append(
                _theirs(
                    "iscsi-ls --usage: process start only",
                    lambda: run_iscsi_ls(iscsi_ls, address, cap_s=10.0, extra=["--usage"]),
                    tgtd.pid,
                    plan.iscsi_ls_runs,
                    network=False,
                )
            )
    return cases


# --------------------------------------------------------------------------------------------
# Per PDU and per CHAP response


def sample_pdus() -> dict[str, PDU]:
    """One realistic PDU of each type; the Login Request is the one our initiator sends."""
    conn = InitiatorConnection(
        LoginConfig(initiator_name=BENCH_INITIATOR, target_name=IQN_CHAP),
    )
    conn.start_login()
    login_request = decode_pdu(conn.data_to_send())
    isid = ISID(t=2, a=0, b=0x1234, c=0x56, d=0x789A)
    operational = encode_text(
        [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxConnections", "1"),
            ("TargetPortalGroupTag", "1"),
        ]
    )
    targets = encode_text(
        [
            ("TargetName", f"{BENCH_IQN_PREFIX}:volume-{i}")
            if k == 0
            else ("TargetAddress", f"127.255.{i}.1:3260,1")
            for i in range(4)
            for k in range(2)
        ]
    )
    return {
        "LoginRequest": login_request,
        "LoginResponse": LoginResponse(
            transit=True,
            cont=False,
            csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            nsg=Stage.FULL_FEATURE_PHASE,
            isid=isid,
            tsih=0x0600,
            itt=1,
            statsn=1,
            expcmdsn=1,
            maxcmdsn=32,
            status_class=StatusClass.SUCCESS,
            status_detail=0,
            data=operational,
        ),
        "TextRequest": TextRequest(
            final=True, cont=False, itt=2, cmdsn=1, expstatsn=2, data=b"SendTargets=All\0"
        ),
        "TextResponse": TextResponse(
            final=True,
            cont=False,
            itt=2,
            ttt=0xFFFFFFFF,
            statsn=2,
            expcmdsn=2,
            maxcmdsn=33,
            data=targets,
        ),
        "LogoutRequest": LogoutRequest(
            reason=LogoutReason.CLOSE_SESSION, itt=3, cmdsn=2, expstatsn=3, immediate=True
        ),
        "LogoutResponse": LogoutResponse(
            response=LogoutResponseCode.CLOSED, itt=3, statsn=3, expcmdsn=3, maxcmdsn=34
        ),
        "Reject": Reject(
            reason=RejectReason.PROTOCOL_ERROR, statsn=4, expcmdsn=3, maxcmdsn=34, data=bytes(48)
        ),
        "NopOut": NopOut(itt=5, ttt=0xFFFFFFFF, cmdsn=3, expstatsn=4),
        "NopIn": NopIn(itt=5, ttt=0xFFFFFFFF, statsn=4, expcmdsn=3, maxcmdsn=34),
    }


def _per_call_us(function: Callable[[], object], repeat: int) -> Summary:
    # CPU time rather than wall time, so that other work on the machine does not count.
    timer = timeit.Timer(function, timer=time.process_time)
    number, _ = timer.autorange()
    return Summary.of([t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)])


def _codec_costs(plan: Plan) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    variants = [(name, pdu, False) for name, pdu in sample_pdus().items()]
    variants.append(("LoginRequest + CRC32C digests", sample_pdus()["LoginRequest"], True))
    for name, pdu, digests in variants:
        raw = encode_pdu(pdu, header_digest=digests, data_digest=digests)
        if decode_pdu(raw, header_digest=digests, data_digest=digests) != pdu:
            raise BenchError(f"{name} does not survive a round trip")
        encode = _per_call_us(
            partial(encode_pdu, pdu, header_digest=digests, data_digest=digests),
            plan.timeit_repeat,
        )
        decode = _per_call_us(
            partial(decode_pdu, raw, header_digest=digests, data_digest=digests),
            plan.timeit_repeat,
        )
        rows.append(
            {
                "pdu": name,
                "bytes": len(raw),
                "encode_us": encode.to_json(),
                "decode_us": decode.to_json(),
            }
        )
    return rows


def _chap_costs(plan: Plan) -> list[dict[str, object]]:
    secret = Secret(CHAP_SECRET)
    rows: list[dict[str, object]] = []
    for algorithm in ChapAlgorithm:
        challenge = bytes(range(max(algorithm.digest_size, 16)))
        cost = _per_call_us(
            partial(chap_response, algorithm, 7, secret, challenge), plan.timeit_repeat
        )
        rows.append(
            {
                "algorithm": f"{algorithm.name} ({int(algorithm)})",
                "challenge_bytes": len(challenge),
                "us": cost.to_json(),
            }
        )
    return rows


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 3, print its tables, write cost[-quick].json; return the payload."""
    plan = QUICK if quick else FULL
    if reps is not None:
        plan = Plan(
            logins_per_round=plan.logins_per_round,
            rounds=reps,
            iscsi_ls_runs=plan.iscsi_ls_runs,
            timeit_repeat=max(reps, 3),
        )
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    skipped: dict[str, str] = {}
    cases: list[_Case] = []
    if find_tool("tgtd") is None or find_tool("tgtadm") is None:
        skipped["per_login"] = "tgtd/tgtadm not installed (Debian package tgt)"
    else:
        cases = _login_costs(plan)
    codec = _codec_costs(plan)
    chap = _chap_costs(plan)
    payload: dict[str, object] = {
        "benchmark": "cost",
        "mode": "quick" if quick else "full",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "load_average_at_end": load_average(),
        "settings": {
            "logins_per_round": plan.logins_per_round,
            "rounds": plan.rounds,
            "iscsi_ls_runs": plan.iscsi_ls_runs,
            "timeit_repeat": plan.timeit_repeat,
            "per_login": "our process's user+sys CPU over a round of sequential operations, "
            "divided by the count; median over rounds. iscsi-ls: RUSAGE_CHILDREN per run, "
            "process start included; median over runs",
            "tgtd_cpu": "from /proc/PID/stat in clock ticks (10 ms): the resolution is 10 ms "
            "divided by the operations in a round (ours) or in the whole batch (iscsi-ls)",
            "codec": "interpreted construct (no .compile()); timeit autorange with a CPU-time "
            "timer (time.process_time), median of repeats",
            "chap": "chap_response with a Secret, identifier 7, challenge as long as the digest "
            "(at least 16 bytes); same timer",
        },
        "skipped": skipped,
        "per_login": [c.to_json() for c in cases],
        "codec": codec,
        "chap": chap,
    }
    path = write_json("cost", payload, quick=quick)
    if cases:
        print_table(
            "Per-operation cost against tgtd on loopback, microseconds (median)",
            ["operation", "CPU us (ours or iscsi-ls)", "range", "wall us", "tgtd CPU us", "n"],
            [c.row() for c in cases],
        )
    print_table(
        "PDU codec, microseconds per call (interpreted construct; median)",
        ["PDU", "bytes", "encode us", "decode us"],
        [
            [
                r["pdu"],
                r["bytes"],
                f"{_median(r['encode_us']):.1f}",
                f"{_median(r['decode_us']):.1f}",
            ]
            for r in codec
        ],
    )
    print_table(
        "CHAP response, microseconds per call (median)",
        ["algorithm", "challenge bytes", "us"],
        [[r["algorithm"], r["challenge_bytes"], f"{_median(r['us']):.2f}"] for r in chap],
    )
    print(f"\nwritten: {path}")
    return payload


def _median(summary: object) -> float:
    assert isinstance(summary, dict)
    value = summary["median"]
    assert isinstance(value, float)
    return value
