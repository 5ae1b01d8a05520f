"""Benchmark 3: what one login costs in CPU, against libiscsi doing the same in-process.

* Per operation, against one ``tgtd`` portal on loopback: our process's CPU time (user+sys,
  ``getrusage``) per login+logout (no auth; CHAP), per discovery session (login, SendTargets,
  logout) and per ``probe()`` of one candidate. libiscsi does the same operations in the same
  process through ctypes on its sync API (:mod:`benchmarks.libiscsi`): connect, login(,
  SendTargets), logout, in a loop. Rounds of ours and libiscsi's alternate (the order flips every
  round), so load from other work on the machine hits both alike; the ratio ours / libiscsi is
  taken from the medians of this one run. tgtd's own CPU per operation is read from /proc.
* Per PDU: encode and decode of each PDU type with ``timeit``.
* Per CHAP response: ``chap_response`` for each algorithm.

Goal checked: our CPU per login+logout (no auth) within 3x of libiscsi's.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from benchmarks import libiscsi
from benchmarks.common import (
    BENCH_INITIATOR,
    BENCH_IQN_PREFIX,
    BENCH_PORT,
    BenchError,
    Clock,
    Summary,
    Tgtd,
    find_tool,
    loopback,
    machine_facts,
    print_table,
    process_cpu,
    results_header,
    utc_now,
    warn_if_busy,
    write_json,
)
from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.initiator import (
    NEED_DATA,
    InitiatorConnection,
    LoggedOut,
    LoginConfig,
    LoginSucceeded,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Check, ProbeOptions, probe
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

__all__ = ["GOAL_RATIO", "run"]

_BLOCK: Final = 40
IQN_OPEN: Final = f"{BENCH_IQN_PREFIX}:cost-open"
IQN_CHAP: Final = f"{BENCH_IQN_PREFIX}:cost-chap"
CHAP_USER: Final = "bench-user"
# Benchmark-only secret for a throw-away loopback target.
CHAP_SECRET: Final = "bench-secret-0123456789"
#: Our CPU per login+logout (no auth) may be at most this many times libiscsi's.
GOAL_RATIO: Final = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    ops_per_round: int
    rounds: int
    timeit_repeat: int


FULL: Final = Plan(ops_per_round=200, rounds=7, timeit_repeat=5)
QUICK: Final = Plan(ops_per_round=100, rounds=3, timeit_repeat=3)


# --------------------------------------------------------------------------------------------
# Per operation, against tgtd: ours and libiscsi's in alternating rounds


@dataclass(slots=True)
class _Side:
    """Per-operation figures of one implementation, one entry per round."""

    cpu_us: list[float] = field(default_factory=list)
    wall_us: list[float] = field(default_factory=list)
    tgtd_cpu_us: list[float] = field(default_factory=list)

    def add(self, clock: Clock, tgtd_cpu_s: float, count: int) -> None:
        self.cpu_us.append(clock.cpu_s / count * 1e6)
        self.wall_us.append(clock.wall_s / count * 1e6)
        self.tgtd_cpu_us.append(tgtd_cpu_s / count * 1e6)

    def to_json(self) -> dict[str, object]:
        return {
            "cpu_us_per_op": Summary.of(self.cpu_us).to_json(),
            "wall_us_per_op": Summary.of(self.wall_us).to_json(),
            "tgtd_cpu_us_per_op": Summary.of(self.tgtd_cpu_us).to_json(),
            "rounds_cpu_us": [round(x, 1) for x in self.cpu_us],
        }


@dataclass(slots=True)
class _Case:
    """One operation: ours, and libiscsi's when it has the same one."""

    key: str
    label: str
    ours: _Side = field(default_factory=_Side)
    theirs: _Side | None = None

    @property
    def ratio(self) -> float | None:
        """Our median CPU per operation over libiscsi's, from this run."""
        if self.theirs is None:
            return None
        return Summary.of(self.ours.cpu_us).median / Summary.of(self.theirs.cpu_us).median

    def round_ratios(self) -> list[float]:
        if self.theirs is None:
            return []
        return [o / t for o, t in zip(self.ours.cpu_us, self.theirs.cpu_us, strict=True)]

    def row(self) -> list[object]:
        ours = Summary.of(self.ours.cpu_us)
        cells: list[object] = [self.label, f"{ours.median:.0f}", f"{ours.low:.0f}-{ours.high:.0f}"]
        if self.theirs is None:
            cells += ["n/a", "n/a", "n/a"]
        else:
            theirs = Summary.of(self.theirs.cpu_us)
            ratios = self.round_ratios()
            cells += [
                f"{theirs.median:.0f}",
                f"{self.ratio:.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        cells += [
            f"{Summary.of(self.ours.wall_us).median:.0f}",
            f"{Summary.of(self.ours.tgtd_cpu_us).median:.0f}",
        ]
        return cells

    def to_json(self) -> dict[str, object]:
        ratios = self.round_ratios()
        return {
            "case": self.key,
            "label": self.label,
            "ours": self.ours.to_json(),
            "libiscsi": None if self.theirs is None else self.theirs.to_json(),
            "ratio_ours_over_libiscsi": self.ratio,
            "round_ratios": [round(r, 3) for r in ratios],
        }


def _our_round(operation: Callable[[], Awaitable[object]], count: int) -> Clock:
    clock = Clock()

    async def one_round() -> None:
        with clock:
            for _ in range(count):
                await operation()

    trio.run(one_round)
    return clock


def _their_round(operation: Callable[[], None], count: int) -> Clock:
    with Clock() as clock:
        for _ in range(count):
            operation()
    return clock


def _measure(
    case: _Case,
    ours: Callable[[], Awaitable[object]],
    theirs: Callable[[], None] | None,
    tgtd_pid: int,
    plan: Plan,
    round_index: int,
) -> None:
    """One round of each side, ours first in even rounds and libiscsi first in odd ones."""

    def run_ours() -> None:
        before = process_cpu(tgtd_pid)
        clock = _our_round(ours, plan.ops_per_round)
        case.ours.add(clock, process_cpu(tgtd_pid) - before, plan.ops_per_round)

    def run_theirs() -> None:
        assert theirs is not None
        assert case.theirs is not None
        before = process_cpu(tgtd_pid)
        clock = _their_round(theirs, plan.ops_per_round)
        case.theirs.add(clock, process_cpu(tgtd_pid) - before, plan.ops_per_round)

    sides = [run_ours] if theirs is None else [run_ours, run_theirs]
    for side in sides if round_index % 2 == 0 else reversed(sides):
        side()


def _login_costs(plan: Plan) -> list[_Case]:
    host = loopback(_BLOCK, 0)
    address = f"{host}:{BENCH_PORT}"
    portal = Portal(host=host, port=BENCH_PORT)
    chap = ChapCredentials(CHAP_USER, Secret(CHAP_SECRET))
    lib = libiscsi.load()
    with Tgtd(host) as tgtd:
        tgtd.add_target(1, IQN_OPEN)
        tgtd.add_target(2, IQN_CHAP)
        tgtd.require_chap(2, CHAP_USER, CHAP_SECRET)
        info = parse_connection_info(build_connection_info(address, IQN_OPEN, 0))
        options = ProbeOptions(initiator_name=BENCH_INITIATOR, check=Check.LOGIN)

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
            if len(report.targets) != 2:
                raise BenchError(f"SendTargets at tgtd found {len(report.targets)} targets, not 2")
            return report

        async def one_probe() -> object:
            result = await probe(info, options)
            if result.chosen is None:
                raise BenchError("probe() of tgtd chose nothing")
            return result

        plans: list[tuple[_Case, Callable[[], Awaitable[object]], Callable[[], None] | None]] = []

        def pair(
            key: str,
            label: str,
            ours: Callable[[], Awaitable[object]],
            theirs: Callable[[], None] | None,
        ) -> None:
            case = _Case(key=key, label=label, theirs=None if theirs is None else _Side())
            plans.append((case, ours, theirs))

        their_login = their_chap = their_discovery = None
        if lib is not None:
            their_login = partial(lib.login_logout, address, BENCH_INITIATOR, IQN_OPEN)
            their_chap = partial(
                lib.login_logout, address, BENCH_INITIATOR, IQN_CHAP, (CHAP_USER, CHAP_SECRET)
            )
            their_discovery = partial(lib.discovery, address, BENCH_INITIATOR)
        pair("login", "login+logout, no auth", open_login, their_login)
        pair("login-chap", "login+logout, CHAP (MD5)", chap_login, their_chap)
        pair("discovery", "discovery (login+SendTargets+logout)", discovery, their_discovery)
        pair("probe", "probe() of 1 candidate (ours only)", one_probe, None)
        # Where our login's CPU goes, measured the same way: the same bytes over trio with no
        # protocol work at all, and the login state machine alone on recorded replies.
        requests, replies = _record_login(host)
        pair(
            "pump-only",
            "reference: the same bytes over trio, no protocol work",
            partial(_pump_only, host, requests),
            None,
        )
        pair(
            "sans-io-only",
            "reference: the login state machine alone, no I/O",
            partial(_sans_io_only, replies),
            None,
        )

        # Warm up: imports, caches, compiled headers, tgtd's first sessions.
        for _case, ours, theirs in plans:
            _our_round(ours, 20)
            if theirs is not None:
                _their_round(theirs, 20)
        for round_index in range(plan.rounds):
            for case, ours, theirs in plans:
                _measure(case, ours, theirs, tgtd.pid, plan, round_index)
    return [case for case, _, _ in plans]


_FIXED_ISID: Final = ISID(t=2, a=0, b=0x1234, c=0x56, d=0x789A)


def _replayable_config() -> LoginConfig:
    return LoginConfig(initiator_name=BENCH_INITIATOR, target_name=IQN_OPEN, isid=_FIXED_ISID)


def _record_login(host: str) -> tuple[list[bytes], list[bytes]]:
    """One real login+logout at tgtd: what we sent, request by request, and what came back."""
    import socket

    requests: list[bytes] = []
    replies: list[bytes] = []
    conn = InitiatorConnection(_replayable_config())
    conn.start_login()
    with socket.create_connection((host, BENCH_PORT), timeout=5) as sock:
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                requests.append(out)
                sock.sendall(out)
            if event is NEED_DATA:
                data = sock.recv(65536)
                replies.append(data)
                conn.receive_data(data)
            elif isinstance(event, LoginSucceeded):
                conn.logout()
            elif isinstance(event, LoggedOut):
                return requests, replies
            else:
                raise BenchError(f"recording a login at tgtd: {event}")


async def _pump_only(host: str, requests: list[bytes]) -> None:
    """Connect, send each recorded request and read one reply to it, close: trio and the
    kernel's share of a login, with no PDU decoded, no key parsed, no state kept."""
    import socket

    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if sock.connect_ex((host, BENCH_PORT)):
            await trio.lowlevel.wait_writable(sock)
        for request in requests:
            sock.send(request)
            while True:
                try:
                    if not sock.recv(65536):
                        raise BenchError("tgtd closed the replayed login")
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def _sans_io_only(replies: list[bytes]) -> None:
    """The same login+logout through InitiatorConnection, fed the recorded replies."""
    conn = InitiatorConnection(_replayable_config())
    conn.start_login()
    pending = iter(replies)
    while True:
        event = conn.next_event()
        conn.data_to_send()
        if event is NEED_DATA:
            conn.receive_data(next(pending))
        elif isinstance(event, LoginSucceeded):
            conn.logout()
        elif isinstance(event, LoggedOut):
            return


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


def _goal(cases: list[_Case], skipped: dict[str, str]) -> dict[str, object]:
    text = f"CPU per login+logout (no auth) within {GOAL_RATIO:g}x of libiscsi in-process"
    login_case = next((c for c in cases if c.key == "login"), None)
    ratio = None if login_case is None else login_case.ratio
    if ratio is None:
        why = skipped.get("libiscsi") or skipped.get("per_login") or "not measured"
        return {"goal": text, "verdict": f"NOT MEASURED ({why})", "limit": GOAL_RATIO}
    return {
        "goal": text,
        "measured_ratio": round(ratio, 3),
        "limit": GOAL_RATIO,
        "verdict": "PASS" if ratio <= GOAL_RATIO else "FAIL",
    }


def run(*, quick: bool, reps: int | None = None) -> dict[str, object]:
    """Run benchmark 3, print its tables, write cost[-quick].json; return the payload."""
    plan = QUICK if quick else FULL
    if reps is not None:
        plan = Plan(ops_per_round=plan.ops_per_round, rounds=reps, timeit_repeat=max(reps, 3))
    started_at, started = utc_now(), time.monotonic()
    machine = machine_facts()
    warn_if_busy()
    skipped: dict[str, str] = {}
    cases: list[_Case] = []
    if libiscsi.load() is None:
        skipped["libiscsi"] = f"{libiscsi.LIBRARY} not found (Debian package libiscsi7)"
    if find_tool("tgtd") is None or find_tool("tgtadm") is None:
        skipped["per_login"] = "tgtd/tgtadm not installed (Debian package tgt)"
    else:
        cases = _login_costs(plan)
    codec = _codec_costs(plan)
    chap = _chap_costs(plan)
    goals = [_goal(cases, skipped)]
    payload: dict[str, object] = {
        **results_header(
            "cost", quick=quick, started_at=started_at, started=started, machine=machine
        ),
        "settings": {
            "ops_per_round": plan.ops_per_round,
            "rounds": plan.rounds,
            "timeit_repeat": plan.timeit_repeat,
            "per_operation": "this process's user+sys CPU (getrusage) over a round of "
            "sequential operations, divided by the count; median over rounds. Ours: trio.run of "
            "transport.login/discover (a fresh connection, InitiatorConnection and logout each "
            "time). libiscsi: the same steps in the same process via ctypes on libiscsi.so.7's "
            "sync API (create context, connect, login, [SendTargets,] logout, disconnect, "
            "destroy context), HeaderDigest offered as None,CRC32C like ours. Rounds alternate; "
            "the ratio is median(ours) / median(libiscsi) from this run",
            "tgtd_cpu": "from /proc/PID/stat in clock ticks (10 ms): the resolution is 10 ms "
            "divided by the operations in a round",
            "codec": "construct Structs compiled with .compile() (the interpreted ones report "
            "errors); timeit autorange with a CPU-time timer (time.process_time), median of "
            "repeats",
            "chap": "chap_response with a Secret, identifier 7, challenge as long as the digest "
            "(at least 16 bytes); same timer",
        },
        "skipped": skipped,
        "per_operation": [c.to_json() for c in cases],
        "codec": codec,
        "chap": chap,
        "goals": goals,
    }
    path = write_json("cost", payload, quick=quick)
    if cases:
        print_table(
            f"CPU per operation against one tgtd portal on loopback, microseconds (median of "
            f"{plan.rounds} rounds of {plan.ops_per_round}; ours and libiscsi in-process, "
            "alternating rounds)",
            [
                "operation",
                "ours CPU us",
                "range",
                "libiscsi CPU us",
                "ours/libiscsi",
                "per-round ratios",
                "ours wall us",
                "tgtd CPU us",
            ],
            [c.row() for c in cases],
        )
    print_table(
        "PDU codec, microseconds per call (compiled construct; median)",
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
    goal = goals[0]
    print(f"\ngoal: {goal['goal']}: {goal['verdict']}", end="")
    print(f" (measured {goal['measured_ratio']}x)" if "measured_ratio" in goal else "")
    print(f"written: {path}")
    return payload


def _median(summary: object) -> float:
    assert isinstance(summary, dict)
    value = summary["median"]
    assert isinstance(value, float)
    return value
