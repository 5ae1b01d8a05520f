"""The prober's policies on simulated portals, in virtual time (autojump_clock).

Each simulated candidate succeeds or fails after a fixed delay, or hangs until its connect
deadline. Virtual time makes the latency claims exact: ordered costs the slowest failure before
the winner, sequential the sum, staggered one stagger per blackholed portal.

The second half simulates candidates phase by phase (connect, login, logout, each with the
transport's deadline and shielded cleanup) and holds every attempt, the cancelled ones included,
to its outcome, its start on the stagger schedule, and the per-attempt bound.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.connection_info import Candidate, ConnectionInfo, parse_connection_info
from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.prober import (
    Attempt,
    AttemptFinished,
    AttemptStarted,
    Checker,
    Outcome,
    Policy,
    ProbeOptions,
    ProbeResult,
    ProgressEvent,
    probe,
)
from pyiscsi_failover.transport import DEFAULT_LOGOUT_TIMEOUT

CONNECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Behaviour:
    ok: bool
    delay: float | None  # None: blackholed, hangs until the connect deadline

    def finish_time(self) -> float:
        return CONNECT_TIMEOUT if self.delay is None else self.delay


def info_for(n: int) -> ConnectionInfo:
    portals = [f"127.0.0.{10 + i}:3260" for i in range(n)]
    data: dict[str, object] = {
        "target_portal": portals[0],
        "target_iqn": "iqn.2026-11.test.pyiscsi:vol",
        "target_lun": 0,
    }
    if n > 1:
        data["target_alternative_portals"] = portals[1:]
        data["target_alternative_iqns"] = ["iqn.2026-11.test.pyiscsi:vol"] * (n - 1)
        data["target_alternative_luns"] = list(range(1, n))
    return parse_connection_info(data)


def simulated(behaviours: list[Behaviour]) -> Checker:
    async def checker(candidate: Candidate) -> Attempt:
        b = behaviours[candidate.index]
        start = trio.current_time()
        if b.delay is None:
            await trio.sleep(CONNECT_TIMEOUT)
            outcome = Outcome.TIMEOUT
        else:
            await trio.sleep(b.delay)
            outcome = Outcome.OK if b.ok else Outcome.REFUSED
        return Attempt(candidate=candidate, outcome=outcome, elapsed_s=trio.current_time() - start)

    return checker


async def run(
    behaviours: list[Behaviour], policy: Policy, **options: object
) -> tuple[ProbeResult, list[ProgressEvent]]:
    events: list[ProgressEvent] = []
    result = await probe(
        info_for(len(behaviours)),
        ProbeOptions(policy=policy, connect_timeout=CONNECT_TIMEOUT, **options),  # type: ignore[arg-type]
        on_progress=events.append,
        checker=simulated(behaviours),
    )
    return result, events


def first_ok(behaviours: list[Behaviour]) -> int | None:
    return next((i for i, b in enumerate(behaviours) if b.ok and b.delay is not None), None)


behaviour = st.one_of(
    st.builds(
        Behaviour, ok=st.booleans(), delay=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0, 2.5])
    ),
    st.just(Behaviour(ok=False, delay=None)),
)
behaviour_lists = st.lists(behaviour, min_size=1, max_size=8)


def virtual(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body under a fresh autojump clock (hypothesis cannot use fixtures)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        trio.run(lambda: fn(*args, **kwargs), clock=trio.testing.MockClock(autojump_threshold=0))

    return wrapper


@settings(max_examples=200, deadline=None)
@given(behaviour_lists)
@virtual
async def test_ordered_chooses_what_sequential_chooses(behaviours: list[Behaviour]) -> None:
    sequential, _ = await run(behaviours, Policy.SEQUENTIAL)
    ordered, _ = await run(behaviours, Policy.ORDERED)
    expected = first_ok(behaviours)
    assert (sequential.candidate.index if sequential.candidate else None) == expected
    assert (ordered.candidate.index if ordered.candidate else None) == expected


@settings(max_examples=200, deadline=None)
@given(behaviour_lists)
@virtual
async def test_sequential_costs_the_sum_and_ordered_the_slowest(
    behaviours: list[Behaviour],
) -> None:
    winner = first_ok(behaviours)
    last = len(behaviours) - 1 if winner is None else winner
    sequential, _ = await run(behaviours, Policy.SEQUENTIAL)
    ordered, _ = await run(behaviours, Policy.ORDERED)
    assert sequential.elapsed_s == pytest.approx(
        sum(b.finish_time() for b in behaviours[: last + 1])
    )
    assert ordered.elapsed_s == pytest.approx(max(b.finish_time() for b in behaviours[: last + 1]))


@settings(max_examples=200, deadline=None)
@given(behaviour_lists)
@virtual
async def test_every_candidate_gets_one_attempt_record(behaviours: list[Behaviour]) -> None:
    for policy in Policy:
        result, events = await run(behaviours, policy)
        assert [a.candidate.index for a in result.attempts] == list(range(len(behaviours)))
        started = [e.candidate.index for e in events if isinstance(e, AttemptStarted)]
        finished = [e.attempt.candidate.index for e in events if isinstance(e, AttemptFinished)]
        assert sorted(started) == sorted(finished) == sorted(set(started))
        for attempt in result.attempts:
            if attempt.candidate.index not in started:
                assert attempt.outcome is Outcome.NOT_TRIED
        if result.chosen is None:
            assert first_ok(behaviours) is None
        else:
            assert result.chosen.ok
            assert behaviours[result.chosen.candidate.index].ok


@settings(max_examples=100, deadline=None)
@given(behaviour_lists)
@virtual
async def test_all_probes_every_candidate(behaviours: list[Behaviour]) -> None:
    for policy in Policy:
        result, _ = await run(behaviours, policy, probe_all=True)
        assert all(a.outcome not in (Outcome.NOT_TRIED, Outcome.CANCELLED) for a in result.attempts)
        expected = first_ok(behaviours)
        if policy is not Policy.STAGGERED:
            assert (result.candidate.index if result.candidate else None) == expected


async def test_staggered_blackholed_main_costs_one_stagger(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behaviours = [Behaviour(ok=False, delay=None), Behaviour(ok=True, delay=0.02)]
    result, _ = await run(behaviours, Policy.STAGGERED, stagger=0.25)
    assert result.candidate is not None and result.candidate.index == 1
    assert result.elapsed_s == pytest.approx(0.27)
    first, second = result.attempts
    assert (first.outcome, first.started_at) == (Outcome.CANCELLED, 0.0)
    assert first.elapsed_s == pytest.approx(0.27)  # cancelled the moment the second won
    assert second.started_at == pytest.approx(0.25)
    assert second.elapsed_s == pytest.approx(0.02)


async def test_staggered_starts_next_at_once_when_previous_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behaviours = [
        Behaviour(ok=False, delay=0.01),
        Behaviour(ok=False, delay=0.01),
        Behaviour(ok=True, delay=0.01),
    ]
    result, events = await run(behaviours, Policy.STAGGERED, stagger=0.25)
    starts = [e.at for e in events if isinstance(e, AttemptStarted)]
    assert starts == pytest.approx([0.0, 0.01, 0.02])
    assert result.elapsed_s == pytest.approx(0.03)


async def test_ordered_two_blackholed_cost_one_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behaviours = [
        Behaviour(ok=False, delay=None),
        Behaviour(ok=False, delay=None),
        Behaviour(ok=True, delay=0.01),
    ]
    result, _ = await run(behaviours, Policy.ORDERED)
    assert result.candidate is not None and result.candidate.index == 2
    assert result.elapsed_s == pytest.approx(CONNECT_TIMEOUT)
    sequential, _ = await run(behaviours, Policy.SEQUENTIAL)
    assert sequential.elapsed_s == pytest.approx(2 * CONNECT_TIMEOUT + 0.01)


async def test_ordered_cancels_later_candidates_once_an_earlier_one_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behaviours = [
        Behaviour(ok=True, delay=0.01),
        Behaviour(ok=False, delay=None),
        Behaviour(ok=True, delay=2.0),
    ]
    result, _ = await run(behaviours, Policy.ORDERED)
    assert result.candidate is not None and result.candidate.index == 0
    assert [a.outcome for a in result.attempts] == [
        Outcome.OK,
        Outcome.CANCELLED,
        Outcome.CANCELLED,
    ]
    assert result.elapsed_s == pytest.approx(0.01)


async def test_ordered_respects_the_concurrency_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    behaviours = [Behaviour(ok=False, delay=1.0)] * 5 + [Behaviour(ok=True, delay=1.0)]
    result, events = await run(behaviours, Policy.ORDERED, concurrency=2)
    running = peak = 0
    for event in events:
        running += 1 if isinstance(event, AttemptStarted) else -1
        peak = max(peak, running)
    assert peak == 2
    assert result.elapsed_s == pytest.approx(3.0)


def test_bad_options_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="concurrency"):
        ProbeOptions(concurrency=0)
    with pytest.raises(LocalProtocolError, match="stagger"):
        ProbeOptions(stagger=float("nan"))
    with pytest.raises(LocalProtocolError):
        ProbeOptions(connect_timeout=0)


def test_json_shape() -> None:
    behaviours = [Behaviour(ok=False, delay=0.01), Behaviour(ok=True, delay=0.01)]

    async def main() -> ProbeResult:
        result, _ = await run(behaviours, Policy.SEQUENTIAL)
        return result

    result = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    body = result.to_json()
    assert body["chosen"] == {
        "portal": "127.0.0.11:3260",
        "iqn": "iqn.2026-11.test.pyiscsi:vol",
        "lun": 1,
    }
    assert body["policy"] == "sequential"
    attempts = body["attempts"]
    assert isinstance(attempts, list)
    assert [a["outcome"] for a in attempts] == ["refused", "ok"]
    assert set(attempts[0]) == {
        "index",
        "portal",
        "iqn",
        "lun",
        "outcome",
        "detail",
        "elapsed_ms",
        "redirected_to",
        "redirect_refused",
        "notes",
        "lun_info",
    }
    assert (attempts[0]["redirected_to"], attempts[0]["redirect_refused"]) == (None, None)
    assert attempts[0]["notes"] == []
    assert attempts[0]["lun_info"] is None


# ---------------------------------------------------------------------------------------------
# Every attempt within its own bound, cancelled ones included
#
# A richer simulated candidate whose timing follows transport.login's contract for one hop (no
# redirects): the connect has its own deadline, the login another, and a login abandoned
# (deadline or cancellation) once our request is on the wire waits, shielded and within the
# logout bound, for the target's answer and logs out if it let us in. A successful login's logout
# is shielded and bounded too. So no attempt, cancelled or not, may take longer than the
# candidate's budget (connect + login) plus the logout bound.

LOGIN_TIMEOUT = 10.0
#: The prober leaves the transport's default logout bound in place.
LOGOUT_TIMEOUT = DEFAULT_LOGOUT_TIMEOUT
BUDGET = CONNECT_TIMEOUT + LOGIN_TIMEOUT + LOGOUT_TIMEOUT
STAGGER = 0.25
#: Two virtual instants closer than this are the same instant (trio may order them either way).
TIE = 1e-9


@dataclass(frozen=True)
class Target:
    """What one simulated candidate does, phase by phase (seconds after the phase began)."""

    connect: float | None  # None: blackholed; otherwise accepted (or refused) after this long
    refuse: bool = False
    answer: float | None = 0.01  # the final login answer; None: silent
    verdict: Outcome = Outcome.OK  # OK, or the refusal it answers with
    logout: float | None = 0.01  # the Logout Response; None: never comes


def target_checker(targets: list[Target]) -> Checker:
    async def checker(candidate: Candidate) -> Attempt:
        t = targets[candidate.index]
        started = trio.current_time()

        def done(outcome: Outcome) -> Attempt:
            return Attempt(
                candidate=candidate, outcome=outcome, elapsed_s=trio.current_time() - started
            )

        with trio.move_on_after(CONNECT_TIMEOUT):
            await trio.sleep(math.inf if t.connect is None else t.connect)
        if t.connect is None:
            return done(Outcome.TIMEOUT)
        if t.refuse:
            return done(Outcome.REFUSED)
        answered_at = None if t.answer is None else trio.current_time() + t.answer

        async def abandon() -> None:
            with trio.CancelScope(shield=True), trio.move_on_after(LOGOUT_TIMEOUT):
                await trio.sleep_until(math.inf if answered_at is None else answered_at)
                if t.verdict is Outcome.OK:
                    await trio.sleep(math.inf if t.logout is None else t.logout)

        try:
            with trio.fail_after(LOGIN_TIMEOUT):
                await trio.sleep_until(math.inf if answered_at is None else answered_at)
        except trio.TooSlowError:
            await abandon()
            return done(Outcome.TIMEOUT)
        except trio.Cancelled:
            await abandon()
            raise
        if t.verdict is Outcome.OK:
            with trio.CancelScope(shield=True), trio.move_on_after(LOGOUT_TIMEOUT):
                await trio.sleep(math.inf if t.logout is None else t.logout)
        return done(t.verdict)

    return checker


def natural(t: Target) -> tuple[Outcome, float]:
    """How an attempt at ``t`` ends when nothing cancels it, and after how long."""
    if t.connect is None:
        return Outcome.TIMEOUT, CONNECT_TIMEOUT
    if t.refuse:
        return Outcome.REFUSED, t.connect
    if t.answer is None:
        return Outcome.TIMEOUT, t.connect + LOGIN_TIMEOUT + LOGOUT_TIMEOUT
    if t.verdict is not Outcome.OK:
        return t.verdict, t.connect + t.answer
    return Outcome.OK, t.connect + t.answer + min(LOGOUT_TIMEOUT, _or_inf(t.logout))


def cancelled_at(t: Target, at: float) -> tuple[Outcome, float]:
    """How an attempt at ``t`` ends when its scope is cancelled ``at`` seconds after it began."""
    outcome, took = natural(t)
    if at >= took:
        return outcome, took  # already over
    if t.connect is None or at < t.connect:
        return Outcome.CANCELLED, at  # still connecting: nothing to clean up
    if t.answer is not None and at >= t.connect + t.answer:
        return outcome, took  # logging out, shielded: the login's success stands
    # Cancelled mid-login: wait (shielded, bounded) for the answer; log out if it let us in.
    end = at + LOGOUT_TIMEOUT
    if t.answer is not None:
        answer = t.connect + t.answer
        tail = _or_inf(t.logout) if t.verdict is Outcome.OK else 0.0
        end = min(end, answer + tail)
    return Outcome.CANCELLED, end


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6


def assert_attempt_bounded(attempt: Attempt, t: Target, cancelled_from: float | None) -> None:
    """``attempt`` ended as ``t`` makes it end, cancelled from ``cancelled_from`` (absolute)."""
    assert attempt.started_at is not None
    assert 0 <= attempt.elapsed_s <= BUDGET + TIE, attempt
    seen = (attempt.outcome, attempt.elapsed_s)
    allowed = [natural(t)]
    if cancelled_from is not None:
        at = cancelled_from - attempt.started_at
        allowed += [cancelled_at(t, at - TIE), cancelled_at(t, at + TIE)]
    assert any(o is seen[0] and _near(e, seen[1]) for o, e in allowed), (seen, allowed, t)


def check_staggered(result: ProbeResult, targets: list[Target], stagger: float) -> None:
    """The staggered policy's whole contract, attempt by attempt, in exact virtual time."""
    attempts = result.attempts
    started = [a for a in attempts if a.outcome is not Outcome.NOT_TRIED]
    # Started in list order, with no gap: a prefix.
    assert [a.candidate.index for a in started] == list(range(len(started)))
    assert all(a.started_at is None for a in attempts[len(started) :])
    ends = [a.started_at + a.elapsed_s for a in started if a.started_at is not None]
    chosen = result.chosen
    win_end = None
    if chosen is not None:
        assert chosen.ok and chosen.started_at is not None
        win_end = chosen.started_at + chosen.elapsed_s
        # The first success to finish wins; anything that ended OK did not end before it.
        assert all(end >= win_end - TIE for a, end in zip(started, ends, strict=True) if a.ok), (
            "an earlier success lost"
        )
    else:
        assert len(started) == len(targets)
        assert all(natural(t)[0] is not Outcome.OK for t in targets)
    # The stagger schedule: the next starts when the previous fails, or after one stagger.
    assert started[0].started_at == 0.0
    for previous, current in itertools.pairwise(started):
        assert previous.started_at is not None and current.started_at is not None
        wait = min(stagger, natural(targets[previous.candidate.index])[1])
        assert _near(current.started_at, previous.started_at + wait), (previous, current)
        assert win_end is None or win_end >= current.started_at - TIE, "started after a win"
    if len(started) < len(targets):
        last = started[-1]
        assert win_end is not None and last.started_at is not None
        wait = min(stagger, natural(targets[last.candidate.index])[1])
        assert win_end <= last.started_at + wait + TIE, "stopped starting without a winner"
    for attempt in started:
        assert_attempt_bounded(attempt, targets[attempt.candidate.index], win_end)
    assert _near(result.elapsed_s, max(ends))


async def run_targets(targets: list[Target], policy: Policy, **options: object) -> ProbeResult:
    return await probe(
        info_for(len(targets)),
        ProbeOptions(
            policy=policy,
            connect_timeout=CONNECT_TIMEOUT,
            login_timeout=LOGIN_TIMEOUT,
            **options,  # type: ignore[arg-type]
        ),
        checker=target_checker(targets),
    )


async def test_staggered_cancels_a_blackholed_main_at_the_win(
    autojump_clock: trio.testing.MockClock,
) -> None:
    targets = [Target(connect=None), Target(connect=0.01, answer=0.01, logout=0.005)]
    result = await run_targets(targets, Policy.STAGGERED, stagger=STAGGER)
    first, second = result.attempts
    assert (second.outcome, second.started_at) == (Outcome.OK, STAGGER)
    assert second.elapsed_s == pytest.approx(0.025)
    assert (first.outcome, first.started_at) == (Outcome.CANCELLED, 0.0)
    assert first.elapsed_s == pytest.approx(STAGGER + 0.025)
    assert result.elapsed_s == pytest.approx(STAGGER + 0.025)


async def test_staggered_cancelled_mid_login_cleans_up_within_the_logout_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A silent main portal, cancelled mid-login, waits one logout bound for an answer (it might
    have logged us in) and no longer; the probe returns once that cleanup ended."""
    targets = [Target(connect=0.01, answer=None), Target(connect=0.01, logout=0.005)]
    result = await run_targets(targets, Policy.STAGGERED, stagger=STAGGER)
    first, second = result.attempts
    win = STAGGER + 0.025
    assert second.ok and second.started_at == STAGGER
    assert first.outcome is Outcome.CANCELLED
    assert first.elapsed_s == pytest.approx(win + LOGOUT_TIMEOUT)
    assert first.elapsed_s <= BUDGET
    assert result.elapsed_s == pytest.approx(win + LOGOUT_TIMEOUT)


async def test_staggered_main_that_answers_during_cleanup_logs_out_and_stays_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    targets = [Target(connect=0.01, answer=0.5, logout=0.1), Target(connect=0.01, logout=0.005)]
    result = await run_targets(targets, Policy.STAGGERED, stagger=STAGGER)
    first, second = result.attempts
    assert second.ok
    assert first.outcome is Outcome.CANCELLED
    assert first.elapsed_s == pytest.approx(0.01 + 0.5 + 0.1)  # its answer, then its logout


async def test_staggered_main_already_logging_out_keeps_its_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled while its shielded logout runs, a successful login is reported as such."""
    targets = [Target(connect=0.01, answer=0.2, logout=1.5), Target(connect=0.01, logout=0.005)]
    result = await run_targets(targets, Policy.STAGGERED, stagger=STAGGER)
    first, second = result.attempts
    assert result.chosen == second
    assert first.outcome is Outcome.OK
    assert first.elapsed_s == pytest.approx(0.01 + 0.2 + 1.5)


async def test_every_phase_times_out_within_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    targets = [
        Target(connect=None),
        Target(connect=0.5, answer=None),
        Target(connect=0.5, logout=None),
        Target(connect=2.9, refuse=True),
    ]
    result = await run_targets(targets, Policy.SEQUENTIAL, probe_all=True)
    assert [a.outcome for a in result.attempts] == [
        Outcome.TIMEOUT,
        Outcome.TIMEOUT,
        Outcome.OK,
        Outcome.REFUSED,
    ]
    assert [a.elapsed_s for a in result.attempts] == pytest.approx(
        [CONNECT_TIMEOUT, 0.5 + LOGIN_TIMEOUT + LOGOUT_TIMEOUT, 0.5 + 0.01 + LOGOUT_TIMEOUT, 2.9]
    )
    assert all(a.elapsed_s <= BUDGET for a in result.attempts)


delays = st.sampled_from([0.004, 0.013, 0.03, 0.11, 0.26, 0.7, 1.9])
targets_strategy = st.builds(
    Target,
    connect=st.one_of(st.none(), delays),
    refuse=st.booleans(),
    answer=st.one_of(st.none(), delays, st.sampled_from([4.0, 9.5])),
    verdict=st.sampled_from([Outcome.OK, Outcome.OK, Outcome.AUTH_FAILED, Outcome.NOT_FOUND]),
    logout=st.one_of(st.none(), delays),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(targets_strategy, min_size=1, max_size=6), st.sampled_from([0.05, STAGGER, 1.0]))
@virtual
async def test_staggered_attempts_keep_schedule_outcome_and_bound(
    targets: list[Target], stagger: float
) -> None:
    result = await run_targets(targets, Policy.STAGGERED, stagger=stagger)
    check_staggered(result, targets, stagger)


@settings(max_examples=100, deadline=None)
@given(st.lists(targets_strategy, min_size=1, max_size=6))
@virtual
async def test_every_policy_keeps_each_attempt_within_its_bound(targets: list[Target]) -> None:
    for policy in (Policy.SEQUENTIAL, Policy.ORDERED):
        result = await run_targets(targets, policy)
        for attempt in result.attempts:
            if attempt.outcome is Outcome.NOT_TRIED:
                continue
            # An attempt is cut off when an earlier candidate's success finishes (ordered): the
            # first such finish, which need not be the chosen one's (a later-listed success
            # may finish first and still cancel the candidates after it).
            earlier_ok_ends = [
                a.started_at + a.elapsed_s
                for a in result.attempts[: attempt.candidate.index]
                if a.ok and a.started_at is not None
            ]
            cut = min(earlier_ok_ends, default=None)
            assert_attempt_bounded(attempt, targets[attempt.candidate.index], cut)
