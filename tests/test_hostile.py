"""Hostile portals: every fault the test target can inject ends in its own typed outcome, in time.

Each test serves two portals of one target on loopback, ``faulty`` (carrying the fault) and
``good``, both demanding mutual CHAP, and runs three probes of it concurrently under one policy:

* ``alone``: the faulty portal is the only candidate;
* ``first``: the faulty portal is the main candidate and the good one its alternative;
* ``all``: the same, with ``probe_all`` so that every candidate is probed to the end.

The faulty attempt must get the :class:`Outcome` that its fault means (never a generic one, never
an exception out of :func:`probe`), with a detail that says why, and within its deadline: a portal
that hangs costs exactly its deadline (connect 0.3 s, login 0.5 s) plus scheduling slack, and one
that answers wrongly costs next to nothing. The good alternative must then be chosen. Staggered
probing is the one policy that may give up on a slow main portal: when the good alternative,
started after one stagger, wins first, the faulty attempt is reported ``cancelled``; which of the
two finishes first is left to the machine's speed where the race is close, and the checks hold
for either order.

Afterwards the target must have seen no protocol violation from our initiator, and no session may
be left logged in (except where noted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import trio

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.prober import Attempt, Outcome, Policy, ProbeOptions, ProbeResult, probe
from pyiscsi_failover.testing import (
    Blackhole,
    ChapSettings,
    DelayPDUs,
    DigestsRequired,
    DowngradeToNone,
    Fault,
    FaultKind,
    FaultLayer,
    GarbageKeyValues,
    MalformedPDU,
    NonUTF8Text,
    OversizedPDU,
    PortalConfig,
    Redirect,
    RedirectLoop,
    ReflectChallenge,
    Refuse,
    RejectDigests,
    ResetMidLogin,
    RunningTarget,
    ServiceUnavailable,
    Silent,
    SlowDrip,
    SplitStyle,
    SplitText,
    TargetConfig,
    TargetSpec,
    WrongChapResponse,
    WrongITT,
    WrongOpcode,
    format_fault,
    serve_target,
)
from pyiscsi_failover.transport import login

HOST = "127.0.0.1"
IQN = "iqn.2026-11.test.pyiscsi:hostile"
WARM_UP_INITIATOR = "iqn.2026-11.test.pyiscsi:warm-up"
FAULTY = "faulty"
GOOD = "good"
OURS = ChapCredentials("hostile-initiator", Secret(b"initiator-secret-0123"))
THEIRS = ChapCredentials("hostile-target", Secret(b"target-secret-456789"))

CONNECT_TIMEOUT = 0.3
LOGIN_TIMEOUT = 0.5
#: Shorter than both deadlines by a wide margin, and far longer than any fast answer.
STAGGER = 0.15
#: Scheduling allowance on top of the cost model: one loopback login takes a few ms, but up to
#: a few hundred on a loaded machine (coverage tracing, a busy CI host).
SLACK = 0.35
#: trio deadlines never fire early; this only absorbs float rounding.
EPSILON = 1e-3
#: Outer bound of one test: three probes, the slowest 0.5 s, and the target winding down.
TEST_DEADLINE = 10.0


@dataclass(frozen=True)
class Case:
    """A fault, the outcome it must give, a pattern its detail must match, and its cost."""

    fault: Fault
    outcome: Outcome
    detail: str
    #: The deadline the attempt runs into; 0.0 when the portal answers (wrongly) at once.
    cost: float = 0.0

    @property
    def id(self) -> str:
        return format_fault(self.fault)

    @property
    def most(self) -> float:
        """The longest the attempt may take: its cost, or for a portal that lets us in after
        several round trips, anything within the deadlines (it would be a timeout otherwise)."""
        if self.outcome is Outcome.OK:
            return CONNECT_TIMEOUT + LOGIN_TIMEOUT + SLACK
        return self.cost + SLACK


# A garbage value in the *final* Login Response: the target believes the login succeeded and our
# initiator refuses the response; it then logs out of the session the target holds, so nothing
# lingers there either.
CASES = [
    Case(Refuse(), Outcome.REFUSED, r"connection refused"),
    Case(Blackhole(), Outcome.TIMEOUT, r"no TCP connection within 0\.3 s", CONNECT_TIMEOUT),
    Case(Silent(), Outcome.TIMEOUT, r"did not finish within 0\.5 s", LOGIN_TIMEOUT),
    Case(ResetMidLogin(), Outcome.PROTOCOL_ERROR, r"connection lost"),
    Case(SlowDrip(interval=0.01), Outcome.TIMEOUT, r"did not finish within 0\.5 s", LOGIN_TIMEOUT),
    Case(DelayPDUs(seconds=0.6), Outcome.TIMEOUT, r"did not finish within 0\.5 s", LOGIN_TIMEOUT),
    Case(DelayPDUs(seconds=0.005), Outcome.OK, r"login and logout succeeded"),
    Case(MalformedPDU(), Outcome.PROTOCOL_ERROR, r"opcode 0x3e"),
    Case(OversizedPDU(), Outcome.PROTOCOL_ERROR, r"DataSegmentLength: 16777215 exceeds"),
    Case(OversizedPDU(length=8193), Outcome.PROTOCOL_ERROR, r"DataSegmentLength: 8193 exceeds"),
    Case(WrongOpcode(), Outcome.PROTOCOL_ERROR, r"unexpected TextResponse"),
    Case(WrongITT(), Outcome.PROTOCOL_ERROR, r"carries ITT 0x[0-9a-f]{8}, expected"),
    Case(RedirectLoop(), Outcome.REDIRECT_LOOP, r"redirect loop"),
    Case(RedirectLoop(permanent=True), Outcome.REDIRECT_LOOP, r"redirect loop"),
    Case(Redirect(to=GOOD), Outcome.OK, r"login and logout succeeded"),
    Case(ReflectChallenge(), Outcome.AUTH_FAILED, r"reflection"),
    Case(ReflectChallenge(initiator_secret=True), Outcome.AUTH_FAILED, r"initiator's own secret"),
    Case(DowngradeToNone(), Outcome.AUTH_FAILED, r"AuthMethod='None'"),
    Case(WrongChapResponse(), Outcome.AUTH_FAILED, r"wrong CHAP_R"),
    Case(
        GarbageKeyValues(),
        Outcome.NEGOTIATION_FAILED,
        r"invalid MaxRecvDataSegmentLength.*'banana'",
    ),
    Case(
        GarbageKeyValues(keys=("HeaderDigest", "DataDigest"), value="Irrelevant"),
        Outcome.NEGOTIATION_FAILED,
        r"Digest=Irrelevant",
    ),
    Case(
        GarbageKeyValues(keys=("CHAP_A",), value="Reject"),
        Outcome.AUTH_FAILED,
        r"none of the CHAP algorithms",
    ),
    Case(GarbageKeyValues(keys=("CHAP_C",), value="0xZZ"), Outcome.PROTOCOL_ERROR, r"CHAP_C"),
    Case(
        GarbageKeyValues(keys=("CHAP_N",), value="mallory"),
        Outcome.AUTH_FAILED,
        r"mutual CHAP as 'mallory'",
    ),
    Case(
        GarbageKeyValues(keys=("TargetPortalGroupTag",), value="-1"),
        Outcome.PROTOCOL_ERROR,
        r"TargetPortalGroupTag='-1'",
    ),
    Case(NonUTF8Text(), Outcome.PROTOCOL_ERROR, r"not valid UTF-8"),
    Case(ServiceUnavailable(), Outcome.TARGET_ERROR, r"service unavailable \(0x0301\)"),
    # Our default offer (None,CRC32C) lets a target that requires digests choose them.
    Case(DigestsRequired(), Outcome.OK, r"login and logout succeeded"),
    Case(RejectDigests(), Outcome.NEGOTIATION_FAILED, r"rejected HeaderDigest=None,CRC32C"),
    Case(SplitText(chunk=32, login=True), Outcome.OK, r"login and logout succeeded"),
    Case(
        SplitText(chunk=64, style=SplitStyle.TGT, login=True),
        Outcome.OK,
        r"login and logout succeeded",
    ),
]

SCENARIOS = ("alone", "first", "all")


def test_every_fault_kind_is_covered() -> None:
    """A fault added to the test target must get a case here too, or, for the SCSI faults (and
    the ISID refusal) that a LUN check meets, in tests/test_scsi_faults_loopback.py."""
    from test_scsi_faults_loopback import SCENARIOS

    covered = {case.fault.kind for case in CASES}
    covered |= {fault.kind for scenario in SCENARIOS for fault in scenario.faults}
    assert covered == set(FaultKind)


# --------------------------------------------------------------------------------------------
# Setup


def target_config(case: Case) -> TargetConfig:
    return TargetConfig(
        portals=(
            PortalConfig(host=HOST, port=0, name=FAULTY, faults=(case.fault,)),
            PortalConfig(host=HOST, port=0, name=GOOD),
        ),
        targets=(TargetSpec(name=IQN, chap=ChapSettings(accounts=(OURS,), mutual=THEIRS)),),
    )


def connection_info(running: RunningTarget, *, alone: bool) -> ConnectionInfo:
    names = [FAULTY] if alone else [FAULTY, GOOD]
    data = build_connection_info(
        [str(running.portal(name)) for name in names], IQN, 0, auth=OURS, target_auth=THEIRS
    )
    return parse_connection_info(data)


def initiator_for(policy: Policy, scenario: str) -> str:
    return f"iqn.2026-11.test.pyiscsi:{policy.value}-{scenario}"


async def warm_up(running: RunningTarget) -> None:
    """One good mutual-CHAP login, so the target has a challenge of ours to reflect back."""
    config = LoginConfig(
        initiator_name=WARM_UP_INITIATOR, target_name=IQN, chap=OURS, target_chap=THEIRS
    )
    report = await login(running.portal(GOOD), config, connect_timeout=1, login_timeout=1)
    assert isinstance(report.outcome, LoginSucceeded)
    assert running.challenges, "the mutual login left no challenge on the target"


async def probe_scenarios(running: RunningTarget, policy: Policy) -> dict[str, ProbeResult]:
    results: dict[str, ProbeResult] = {}

    async def one(scenario: str) -> None:
        options = ProbeOptions(
            policy=policy,
            connect_timeout=CONNECT_TIMEOUT,
            login_timeout=LOGIN_TIMEOUT,
            stagger=STAGGER,
            probe_all=scenario == "all",
            initiator_name=initiator_for(policy, scenario),
        )
        info = connection_info(running, alone=scenario == "alone")
        results[scenario] = await probe(info, options)

    async with trio.open_nursery() as nursery:
        for scenario in SCENARIOS:
            nursery.start_soon(one, scenario)
    return results


# --------------------------------------------------------------------------------------------
# Checks


def describe(result: ProbeResult) -> str:
    return "; ".join(
        f"#{a.candidate.index} {a.outcome.value} at {a.started_at or 0:.3f}+{a.elapsed_s:.3f}s"
        f" ({a.detail})"
        for a in result.attempts
    )


def assert_within(
    value: float, low: float, what: str, result: ProbeResult, high: float | None = None
) -> None:
    high = low + SLACK if high is None else high
    assert low - EPSILON <= value <= high, (
        f"{what} took {value:.3f} s, expected {low:.3f}..{high:.3f} s: {describe(result)}"
    )


def assert_faulty_attempt(result: ProbeResult, case: Case, running: RunningTarget) -> None:
    attempt = result.attempts[0]
    assert attempt.candidate.portal.address == running.portal(FAULTY).address
    assert attempt.outcome is case.outcome, describe(result)
    assert re.search(case.detail, attempt.detail), describe(result)
    assert_within(attempt.elapsed_s, case.cost, "the faulty attempt", result, case.most)
    if isinstance(case.fault, Redirect):
        assert attempt.redirected_to == running.portal(GOOD)
        assert attempt.handoff_portal == attempt.candidate.portal  # temporary: keep ours
    else:
        assert attempt.redirected_to is None


def finished_at(attempt: Attempt) -> float:
    return (attempt.started_at or 0.0) + attempt.elapsed_s


def first_to_succeed(result: ProbeResult) -> Attempt | None:
    succeeded = [attempt for attempt in result.attempts if attempt.ok]
    return min(succeeded, key=finished_at) if succeeded else None


def check_alone(result: ProbeResult, case: Case, running: RunningTarget) -> None:
    assert len(result.attempts) == 1
    assert_faulty_attempt(result, case, running)
    expected = 0 if case.outcome is Outcome.OK else None
    assert (None if result.candidate is None else result.candidate.index) == expected
    assert_within(result.elapsed_s, case.cost, "the probe", result, case.most)


def check_first(result: ProbeResult, case: Case, running: RunningTarget) -> None:
    faulty, good = result.attempts
    assert good.candidate.portal.address == running.portal(GOOD).address
    if result.policy is Policy.STAGGERED:
        check_first_staggered(result, case, running)
        return
    assert_faulty_attempt(result, case, running)
    if case.outcome is Outcome.OK:
        assert result.chosen is faulty
        # Only ordered runs the alternative alongside; sequential never starts it.
        later = {Outcome.OK, Outcome.CANCELLED, Outcome.NOT_TRIED}
        if result.policy is Policy.SEQUENTIAL:
            later = {Outcome.NOT_TRIED}
        assert good.outcome in later, describe(result)
    else:
        assert result.chosen is good, describe(result)
        assert good.outcome is Outcome.OK
    # The fault's cost, then (at most) the good alternative's login.
    assert_within(result.elapsed_s, case.cost, "the probe", result, case.most + SLACK)


def check_first_staggered(result: ProbeResult, case: Case, running: RunningTarget) -> None:
    """Staggered starts the alternative when the main attempt fails or after one stagger,
    whichever comes first; the first to succeed wins and cuts the other off. Which one that is
    depends on the machine's speed only when both are close, so both orders are checked."""
    faulty, good = result.attempts
    if faulty.outcome is Outcome.CANCELLED:
        # Still going after one stagger (slow by nature, or slowed down), and outrun.
        assert good.outcome is Outcome.OK and result.chosen is good, describe(result)
        assert good.started_at is not None
        assert_within(good.started_at, STAGGER, "starting the alternative", result)
        assert finished_at(good) <= finished_at(faulty) + EPSILON
        return
    assert_faulty_attempt(result, case, running)
    assert result.chosen is first_to_succeed(result), describe(result)
    if good.outcome is Outcome.NOT_TRIED:
        # Only a main attempt that succeeded within one stagger leaves no room for it.
        assert faulty.ok and finished_at(faulty) <= STAGGER + SLACK, describe(result)
        return
    assert good.started_at is not None
    start = STAGGER if faulty.ok else min(finished_at(faulty), STAGGER)
    assert_within(good.started_at, start, "starting the alternative", result)
    assert good.outcome in {Outcome.OK, Outcome.CANCELLED}, describe(result)


def check_all(result: ProbeResult, case: Case, running: RunningTarget) -> None:
    faulty, good = result.attempts
    assert_faulty_attempt(result, case, running)
    assert good.outcome is Outcome.OK, describe(result)
    if result.policy is Policy.STAGGERED:
        assert result.chosen is first_to_succeed(result), describe(result)
    else:
        assert result.chosen is (faulty if case.outcome is Outcome.OK else good)
    assert_within(result.elapsed_s, case.cost, "the probe", result, case.most + SLACK)


def check_target(running: RunningTarget, case: Case) -> None:
    assert not running.violations, running.violations
    assert not running.lingering_sessions, running.lingering_sessions
    faulty = [c for c in running.connections if c.portal_name == FAULTY]
    kind = case.fault.kind
    if kind.layer is FaultLayer.SOCKET:
        assert not faulty, "a refused or blackholed portal accepted a connection"
    elif kind.layer is FaultLayer.PROTOCOL or kind is FaultKind.RESET_MID_LOGIN:
        # The fault really happened, on every connection to the faulty portal.
        assert faulty
        assert all(kind in record.faults for record in faulty), faulty


# --------------------------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("policy", list(Policy), ids=[p.value for p in Policy])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_fault_gives_its_typed_outcome_in_time(case: Case, policy: Policy) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(target_config(case)) as running:
            await warm_up(running)
            results = await probe_scenarios(running, policy)
            await running.wait_idle()
    for scenario, result in results.items():
        assert result.policy is policy
        assert all(attempt.detail for attempt in result.attempts), scenario
    check_alone(results["alone"], case, running)
    check_first(results["first"], case, running)
    check_all(results["all"], case, running)
    check_target(running, case)
