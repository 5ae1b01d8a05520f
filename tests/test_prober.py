"""The prober's policies on simulated portals, in virtual time (autojump_clock).

Each simulated candidate succeeds or fails after a fixed delay, or hangs until its connect
deadline. Virtual time makes the latency claims exact: ordered costs the slowest failure before
the winner, sequential the sum, staggered one stagger per blackholed portal.
"""

from __future__ import annotations

import functools
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
    assert result.attempts[0].outcome is Outcome.CANCELLED


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
    }
