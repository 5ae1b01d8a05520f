"""Our prober's LUN check (``Check.LUN``) against every SCSI fault of the test target, under
every policy, on real loopback sockets.

Each scenario serves one target (LUNs 0 and 1) on two portals of 127.0.0.1, ``faulty`` and
``good``; the candidates are LUN 1 through ``faulty`` (index 0), then through ``good`` (index 1).
The three policies probe at once, each under its own InitiatorName, so the target's records can
be told apart. A fault the probe must refuse (missing, not ready, standby, an error that stays)
makes candidate 0 fail with its own outcome and the probe go on to candidate 1, in order; a fault
a working volume may show (a unit attention, a reservation conflict, a slow reply within the
deadline, small Data-In PDUs, a residual overflow, faults aimed at open-iscsi's ISID) leaves
candidate 0 the choice. A property test then places faults over portals x LUNs at random and
checks the prober's choice against a model.

Real clock (no ``autojump_clock``: trio would jump past real I/O); the only real waits are the
slow-reply scenarios' own, and every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
)
from pyiscsi_failover.prober import Check, Outcome, Policy, ProbeOptions, ProbeResult, probe
from pyiscsi_failover.testing import (
    CheckCondition,
    Fault,
    FaultKind,
    HideFromIsid,
    IsidMatch,
    LunMissing,
    LunSpec,
    NotReady,
    OtherWwid,
    PortalConfig,
    RefuseIsid,
    ReservationConflict,
    ResidualOverflow,
    RunningTarget,
    ScsiFault,
    SlowScsi,
    SplitDataIn,
    Standby,
    TargetConfig,
    TargetSpec,
    UnitAttention,
    serve_target,
)
from pyiscsi_failover.testing.scsi_session import ScsiAnswered

HOST = "127.0.0.1"
IQN = "iqn.2026-11.test.pyiscsi:scsi-faults"
LUN = 1
CONNECT_TIMEOUT = 2.0
LOGIN_TIMEOUT = 5.0
#: Longer than any fast attempt, so staggered makes sequential's choice when candidate 0 works.
STAGGER = 1.5
DEADLINE = 30.0
ON_LUN = frozenset({LUN})


def initiator_for(policy: Policy) -> str:
    return f"iqn.2026-11.test.pyiscsi:faults-{policy.value}"


def volume_wwid() -> str:
    spec = TargetSpec(name=IQN, luns=(LunSpec(lun=LUN),)).find_lun(LUN)
    assert spec is not None and spec.linux_wwid is not None
    return spec.linux_wwid


def config(
    portal_faults: Sequence[tuple[Fault, ...]],
    target_faults: tuple[Fault, ...] = (),
) -> TargetConfig:
    return TargetConfig(
        portals=tuple(
            PortalConfig(host=HOST, port=0, name=name, faults=faults)
            for name, faults in zip(("faulty", "good"), portal_faults, strict=True)
        ),
        targets=(TargetSpec(name=IQN, luns=(0, 1), faults=target_faults),),
    )


def connection_info(running: RunningTarget, cells: Sequence[tuple[int, int]]) -> ConnectionInfo:
    """Candidates (portal index, LUN), in order."""
    data = build_connection_info(
        [str(running.portals[portal]) for portal, _ in cells], IQN, [lun for _, lun in cells]
    )
    return parse_connection_info(json.dumps(data))


def options(policy: Policy, **extra: object) -> ProbeOptions:
    settings_ = {
        "policy": policy,
        "check": Check.LUN,
        "connect_timeout": CONNECT_TIMEOUT,
        "login_timeout": LOGIN_TIMEOUT,
        "stagger": STAGGER,
        "initiator_name": initiator_for(policy),
        **extra,
    }
    return ProbeOptions(**settings_)  # type: ignore[arg-type]


async def probe_every_policy(
    running: RunningTarget, cells: Sequence[tuple[int, int]], **extra: object
) -> dict[Policy, ProbeResult]:
    info = connection_info(running, cells)
    results: dict[Policy, ProbeResult] = {}

    async def one(policy: Policy) -> None:
        results[policy] = await probe(info, options(policy, **extra))

    async with trio.open_nursery() as nursery:
        for policy in Policy:
            nursery.start_soon(one, policy)
    await running.wait_idle()
    return results


def describe(result: ProbeResult) -> str:
    return "; ".join(
        f"#{a.candidate.index} {a.outcome.value} ({a.detail}) notes={list(a.notes)}"
        for a in result.attempts
    )


def answered(running: RunningTarget, policy: Policy, portal: str) -> list[ScsiAnswered]:
    """What the target answered to ``policy``'s sessions on ``portal``."""
    return [
        event
        for record in running.connections
        if record.portal_name == portal
        and record.login is not None
        and record.login.initiator_name == initiator_for(policy)
        for event in record.events
        if isinstance(event, ScsiAnswered)
    ]


# --------------------------------------------------------------------------------------------
# One fault at a time


@dataclass(frozen=True)
class Scenario:
    """A fault on the faulty portal (or the target) and what the probe of LUN 1 through it gets."""

    name: str
    faults: tuple[Fault, ...]
    outcome: Outcome
    detail: str = ""
    on_target: bool = False
    acts: bool = True  # False: aimed elsewhere (another ISID, another LUN), never injected
    notes: tuple[str, ...] = ()
    options: dict[str, object] = field(default_factory=dict)

    @property
    def chosen(self) -> int:
        return 0 if self.outcome is Outcome.OK else 1


SCENARIOS = [
    Scenario(
        "lun-missing",
        (LunMissing(luns=ON_LUN),),
        Outcome.LUN_MISSING,
        "LUN 1 is not in REPORT LUNS (it lists 0)",
    ),
    Scenario(
        "not-ready",
        (NotReady(luns=ON_LUN),),
        Outcome.LUN_NOT_READY,
        "TEST UNIT READY: CHECK CONDITION, NOT READY 04/03: logical unit not ready, manual "
        "intervention required",
    ),
    Scenario(
        "not-ready:3a/00",
        (NotReady(asc=0x3A, ascq=0, luns=ON_LUN),),
        Outcome.LUN_NOT_READY,
        "NOT READY 3A/00: medium not present",
    ),
    Scenario(
        "standby",
        (Standby(luns=ON_LUN),),
        Outcome.LUN_STANDBY,
        "NOT READY 04/0B: logical unit not accessible, target port in standby state",
    ),
    Scenario(
        "check-condition",
        (CheckCondition(luns=ON_LUN),),
        Outcome.LUN_ERROR,
        "TEST UNIT READY: CHECK CONDITION, HARDWARE ERROR 44/00",
    ),
    Scenario(
        "unit-attention that never clears",
        (UnitAttention(count=20, luns=ON_LUN),),
        Outcome.LUN_NOT_READY,
        "UNIT ATTENTION 29/00: power on, reset, or bus device reset occurred (still after 3 "
        "retries)",
    ),
    Scenario(
        "hide-from-isid:random",
        (HideFromIsid(isid=IsidMatch(oui=None), luns=ON_LUN),),
        Outcome.LUN_MISSING,
        "LUN 1 is not in REPORT LUNS (it lists 0)",
    ),
    Scenario(
        "refuse-isid:random",
        (RefuseIsid(isid=IsidMatch(oui=None)),),
        Outcome.AUTHORIZATION_FAILED,
        "login refused",
    ),
    Scenario(
        "slow-scsi past the login deadline",
        (SlowScsi(seconds=2.0, luns=ON_LUN),),
        Outcome.TIMEOUT,
        "did not finish within 0.5 s",
        options={"login_timeout": 0.5},
    ),
    Scenario(
        "other-wwid against expect_wwid",
        (OtherWwid(luns=ON_LUN),),
        Outcome.WRONG_VOLUME,
        f"expected {volume_wwid()}",
        options={"expect_wwid": volume_wwid()},
    ),
    Scenario(
        "standby on the target: every portal",
        (Standby(luns=ON_LUN),),
        Outcome.LUN_STANDBY,
        "NOT READY 04/0B",
        on_target=True,
    ),
    # Faults a working volume may show: candidate 0 stays the choice.
    Scenario("unit-attention", (UnitAttention(luns=ON_LUN),), Outcome.OK),
    Scenario(
        "unit-attention:2:2a/09",
        (UnitAttention(count=2, asc=0x2A, ascq=0x09, luns=ON_LUN),),
        Outcome.OK,
    ),
    Scenario(
        "reservation-conflict",
        (ReservationConflict(luns=ON_LUN),),
        Outcome.OK,
        "LUN 1 ready: unknown size",
        notes=(
            "TEST UNIT READY: reservation conflict (another initiator's)",
            "READ CAPACITY(16): reservation conflict (another initiator's)",
        ),
    ),
    Scenario("slow-scsi within the deadline", (SlowScsi(seconds=0.3, luns=ON_LUN),), Outcome.OK),
    Scenario("split-data-in", (SplitDataIn(segment=4, luns=ON_LUN),), Outcome.OK),
    Scenario("residual-overflow", (ResidualOverflow(luns=ON_LUN),), Outcome.OK),
    Scenario("hide-from-isid (open-iscsi's)", (HideFromIsid(luns=ON_LUN),), Outcome.OK, acts=False),
    Scenario("refuse-isid (open-iscsi's)", (RefuseIsid(),), Outcome.OK, acts=False),
    Scenario(
        "faults on the other LUN only", (NotReady(luns=frozenset({0})),), Outcome.OK, acts=False
    ),
]


def placeholders(policy: Policy, index: int, chosen: int) -> set[Outcome]:
    """What candidate ``index`` may get instead of its own outcome once ``chosen`` won."""
    if index <= chosen:
        return set()
    if policy is Policy.ORDERED:
        return {Outcome.OK, Outcome.CANCELLED, Outcome.NOT_TRIED}
    return {Outcome.NOT_TRIED}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_the_lun_check_judges_each_fault_and_fails_over_in_order(scenario: Scenario) -> None:
    portal_faults: list[tuple[Fault, ...]] = [() if scenario.on_target else scenario.faults, ()]
    target_faults = scenario.faults if scenario.on_target else ()
    with trio.fail_after(DEADLINE):
        async with serve_target(config(portal_faults, target_faults)) as running:
            results = await probe_every_policy(running, [(0, LUN), (1, LUN)], **scenario.options)
    expected = [scenario.outcome, Outcome.OK]
    if scenario.on_target:
        expected = [scenario.outcome, scenario.outcome]
    chosen = None if Outcome.OK not in expected else expected.index(Outcome.OK)
    for policy, result in results.items():
        text = f"{policy.value}: {describe(result)}"
        assert (result.candidate.index if result.candidate else None) == chosen, text
        for index, attempt in enumerate(result.attempts):
            allowed = {expected[index]} | (
                placeholders(policy, index, chosen) if chosen is not None else set()
            )
            assert attempt.outcome in allowed, text
        first = result.attempts[0]
        assert first.outcome is scenario.outcome, text
        assert scenario.detail in first.detail, text
        for note in scenario.notes:
            assert note in first.notes, text
        if chosen is not None:
            winner = result.attempts[chosen]
            assert winner.lun_info is not None and winner.lun_info.wwid == volume_wwid(), text
    assert not running.violations, running.violations
    if scenario.outcome is not Outcome.TIMEOUT:
        # (A probe that gave up on a held reply may close before the target answers its logout.)
        assert not running.lingering_sessions, running.lingering_sessions
    # The fault acted on the faulty portal, and only there (unless it sits on the target).
    kinds = {fault.kind for fault in scenario.faults}
    faulty = {kind for r in running.connections if r.portal_name == "faulty" for kind in r.faults}
    good = {kind for r in running.connections if r.portal_name == "good" for kind in r.faults}
    if scenario.acts:
        assert kinds <= faulty, faulty
    else:
        assert not kinds & faulty, faulty
    assert not (kinds & good) or scenario.on_target, good


async def test_a_unit_attention_is_taken_by_the_spare_test_unit_ready() -> None:
    """The LUN check's second TEST UNIT READY (sent ahead) is the retry of the first: the
    volume is judged ready with no extra round trip."""
    faults = (UnitAttention(luns=ON_LUN),)
    with trio.fail_after(DEADLINE):
        async with serve_target(config([faults, ()])) as running:
            results = await probe_every_policy(running, [(0, LUN), (1, LUN)])
    for policy, result in results.items():
        assert result.attempts[0].ok, describe(result)
        replies = answered(running, policy, "faulty")
        turs = [e for e in replies if e.opcode == 0x00]
        assert [(e.status, e.sense) for e in turs] == [(2, (6, 0x29, 0)), (0, None)]
        assert len(replies) == 6, replies  # REPORT LUNS, INQUIRY x2, TUR x2, READ CAPACITY(16)


async def test_a_slow_lun_costs_its_latency_and_no_more_than_one_wait() -> None:
    """The probe's commands arrive together and are answered together: one latency, not one per
    command (the hold counts from each command's arrival)."""
    latency = 0.4
    faults = (SlowScsi(seconds=latency, luns=ON_LUN),)
    with trio.fail_after(DEADLINE):
        async with serve_target(config([faults, ()])) as running:
            results = await probe_every_policy(running, [(0, LUN), (1, LUN)])
    for result in results.values():
        first = result.attempts[0]
        assert first.ok, describe(result)
        assert first.elapsed_s >= latency  # trio never wakes early
        assert first.report is not None and first.report.login_s >= latency


async def test_split_data_in_and_overflow_still_give_the_volumes_identity() -> None:
    faults = (SplitDataIn(segment=1, luns=ON_LUN), ResidualOverflow(excess=4096, luns=ON_LUN))
    with trio.fail_after(DEADLINE):
        async with serve_target(config([faults, ()])) as running:
            results = await probe_every_policy(running, [(0, LUN), (1, LUN)])
    for policy, result in results.items():
        first = result.attempts[0]
        assert first.ok and first.lun_info is not None, describe(result)
        assert (first.lun_info.wwid, first.lun_info.size_bytes) == (volume_wwid(), 64 << 20)
        replies = answered(running, policy, "faulty")
        inquiry = next(e for e in replies if e.opcode == 0x12)
        assert inquiry.data_in == 255  # EDTL bytes: the data, then zeros
        assert set(inquiry.faults) == {FaultKind.SPLIT_DATA_IN, FaultKind.RESIDUAL_OVERFLOW}


async def test_another_wwid_behind_a_later_candidate_is_wrong_volume() -> None:
    """With probe_all, the chosen candidate pins the WWID: a later one showing another is
    ``wrong_volume``, under every policy; placed first, it is the one chosen and pins the rest."""
    for faulty_first in (False, True):
        portal_faults = (
            [(OtherWwid(luns=ON_LUN),), ()] if faulty_first else [(), (OtherWwid(luns=ON_LUN),)]
        )
        with trio.fail_after(DEADLINE):
            async with serve_target(config(portal_faults)) as running:
                results = await probe_every_policy(running, [(0, LUN), (1, LUN)], probe_all=True)
        for result in results.values():
            chosen, other = result.attempts
            assert result.chosen is chosen and chosen.ok, describe(result)
            assert other.outcome is Outcome.WRONG_VOLUME, describe(result)
            assert chosen.lun_info is not None and other.lun_info is not None
            assert f"not {chosen.lun_info.wwid} of the chosen candidate" in other.detail
            assert (chosen.lun_info.wwid == volume_wwid()) is not faulty_first


# --------------------------------------------------------------------------------------------
# Faults placed at random over portals x LUNs


@dataclass(frozen=True)
class Cell:
    """A fault for one (portal, LUN), with what it does to our probe."""

    fault: ScsiFault | None
    outcome: Outcome  # what our probe of that cell gets with this fault alone


CELL_FAULTS = [
    Cell(None, Outcome.OK),
    Cell(LunMissing(), Outcome.LUN_MISSING),
    Cell(HideFromIsid(), Outcome.OK),
    Cell(HideFromIsid(isid=IsidMatch(oui=None)), Outcome.LUN_MISSING),
    Cell(Standby(), Outcome.LUN_STANDBY),
    Cell(NotReady(), Outcome.LUN_NOT_READY),
    Cell(CheckCondition(), Outcome.LUN_ERROR),
    Cell(UnitAttention(), Outcome.OK),
    Cell(ReservationConflict(), Outcome.OK),
    Cell(SplitDataIn(segment=16), Outcome.OK),
    Cell(ResidualOverflow(), Outcome.OK),
]
#: Which outcome wins when several faults act on one LUN: a missing LUN is never asked
#: anything, and the LU reports standby before not ready before any other error.
SEVERITY = [Outcome.LUN_MISSING, Outcome.LUN_STANDBY, Outcome.LUN_NOT_READY, Outcome.LUN_ERROR]


@dataclass(frozen=True)
class Placement:
    portals: int
    cells: dict[tuple[int, int], Cell]  # (portal, LUN) -> fault on that portal for that LUN
    target: dict[int, Cell]  # LUN -> fault on the target (every portal)
    refused: frozenset[int]  # portals refusing random-format ISIDs (ours)
    candidates: tuple[tuple[int, int], ...]

    def outcome(self, portal: int, lun: int) -> Outcome:
        if portal in self.refused:
            return Outcome.AUTHORIZATION_FAILED
        found = {
            cell.outcome for cell in (self.cells.get((portal, lun)), self.target.get(lun)) if cell
        }
        return next((outcome for outcome in SEVERITY if outcome in found), Outcome.OK)

    def portal_faults(self, portal: int) -> tuple[Fault, ...]:
        faults: list[Fault] = [
            cell.fault.at(lun)
            for (where, lun), cell in sorted(self.cells.items())
            if where == portal and cell.fault is not None
        ]
        if portal in self.refused:
            faults.append(RefuseIsid(isid=IsidMatch(oui=None)))
        return tuple(faults)

    def target_faults(self) -> tuple[Fault, ...]:
        return tuple(
            cell.fault.at(lun)
            for lun, cell in sorted(self.target.items())
            if cell.fault is not None
        )


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    portals = draw(st.integers(min_value=2, max_value=3))
    every = [(portal, lun) for portal in range(portals) for lun in (0, 1)]
    cell = st.sampled_from(CELL_FAULTS)
    cells = draw(st.dictionaries(st.sampled_from(every), cell, max_size=len(every)))
    target = draw(st.dictionaries(st.sampled_from([0, 1]), cell, max_size=1))
    refused = draw(st.frozensets(st.integers(min_value=0, max_value=portals - 1), max_size=1))
    candidates = draw(st.lists(st.sampled_from(every), min_size=1, max_size=4, unique=True))
    return Placement(portals, cells, target, refused, tuple(candidates))


def real_time(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """A fresh trio run per hypothesis example (hypothesis needs a sync test function)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(placement=placements())
@real_time
async def test_the_prober_chooses_the_first_candidate_whose_lun_works(placement: Placement) -> None:
    config_ = TargetConfig(
        portals=tuple(
            PortalConfig(host=HOST, port=0, name=f"p{i}", faults=placement.portal_faults(i))
            for i in range(placement.portals)
        ),
        targets=(TargetSpec(name=IQN, luns=(0, 1), faults=placement.target_faults()),),
    )
    with trio.fail_after(DEADLINE):
        async with serve_target(config_) as running:
            results = await probe_every_policy(running, placement.candidates)
    expected = [placement.outcome(portal, lun) for portal, lun in placement.candidates]
    chosen = next((i for i, outcome in enumerate(expected) if outcome is Outcome.OK), None)
    for policy, result in results.items():
        text = f"{policy.value}: {describe(result)}; expected {[o.value for o in expected]}"
        assert (None if result.candidate is None else result.candidate.index) == chosen, text
        for index, attempt in enumerate(result.attempts):
            allowed = {expected[index]}
            if chosen is not None:
                allowed |= placeholders(policy, index, chosen)
                if attempt.candidate.lun != placement.candidates[chosen][1]:
                    # Another LUN is another volume: one that finished before the winner was
                    # chosen is pinned as such.
                    allowed.add(Outcome.WRONG_VOLUME)
            assert attempt.outcome in allowed, text
            if attempt.outcome is Outcome.WRONG_VOLUME:
                assert policy is Policy.ORDERED and chosen is not None and index > chosen, text
        if result.chosen is not None:
            assert result.chosen.lun_info is not None
            spec = running.config.targets[0].find_lun(result.chosen.candidate.lun)
            assert spec is not None and result.chosen.lun_info.wwid == spec.linux_wwid
    assert not running.violations, running.violations
    assert not running.lingering_sessions


def test_placements_cover_every_outcome_of_the_model() -> None:
    """The property's model can say each outcome it claims to check (so none is dead code)."""
    outcomes = {cell.outcome for cell in CELL_FAULTS} | {Outcome.AUTHORIZATION_FAILED}
    assert outcomes == {Outcome.OK, *SEVERITY, Outcome.AUTHORIZATION_FAILED}
    placement = Placement(
        portals=2,
        cells={(0, 1): CELL_FAULTS[5], (1, 1): CELL_FAULTS[1]},
        target={1: CELL_FAULTS[4]},
        refused=frozenset({1}),
        candidates=((0, 1), (1, 1), (0, 0)),
    )
    assert [placement.outcome(p, lun) for p, lun in placement.candidates] == [
        Outcome.LUN_STANDBY,
        Outcome.AUTHORIZATION_FAILED,
        Outcome.OK,
    ]
