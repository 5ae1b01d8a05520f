"""A thousand probes of faulty portals leave nothing behind: no file descriptor, task or socket.

One trio run serves a test target whose portals refuse, reset mid-login, send a malformed PDU,
stay silent (under a tiny login deadline), or answer mutual CHAP wrongly; a target with another
CHAP secret stands for wrong credentials, and a working portal now and then makes the prober cancel
the attempts that can no longer win. After a warm-up round (so that whatever trio creates lazily
exists before we count) we count, before and after 1,000 probes under every policy:

* the process's open file descriptors (``/proc/self/fd``);
* the tasks under trio's root task;
* the socket objects still alive and open (a leak that something still references).

The counts must be equal once the target has seen every connection close.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.prober import Outcome, Policy, ProbeOptions, ProbeResult, probe
from pyiscsi_failover.testing import (
    ChapSettings,
    Fault,
    MalformedPDU,
    PortalConfig,
    Refuse,
    ResetMidLogin,
    RunningTarget,
    Silent,
    TargetConfig,
    TargetSpec,
    WrongChapResponse,
    serve_target,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd"
)

HOST = "127.0.0.1"
IQN = "iqn.2026-11.test.pyiscsi:leaks"
OTHER_IQN = "iqn.2026-11.test.pyiscsi:leaks-other-secret"
INITIATOR = "iqn.2026-11.test.pyiscsi:leaks-initiator"
OURS = ChapCredentials("leaks-initiator", Secret(b"initiator-secret-0123"))
THEIRS = ChapCredentials("leaks-target", Secret(b"target-secret-456789"))
SOMEONE_ELSE = ChapCredentials("leaks-initiator", Secret(b"not-our-secret-0123"))

PROBES = 1000
CONCURRENCY = 10
#: Only a guard against a hang: the run takes about 5 s.
RUN_DEADLINE = 90.0
GOOD = "good"


@dataclass(frozen=True)
class Faulty:
    name: str
    faults: tuple[Fault, ...]
    iqn: str
    outcome: Outcome


FAULTY = (
    Faulty("refuse", (Refuse(),), IQN, Outcome.REFUSED),
    Faulty("reset", (ResetMidLogin(),), IQN, Outcome.PROTOCOL_ERROR),
    Faulty("malformed", (MalformedPDU(),), IQN, Outcome.PROTOCOL_ERROR),
    Faulty("silent", (Silent(),), IQN, Outcome.TIMEOUT),
    Faulty("wrong-mutual", (WrongChapResponse(),), IQN, Outcome.AUTH_FAILED),
    Faulty("wrong-chap", (), OTHER_IQN, Outcome.AUTH_FAILED),
)
#: Where the working portal goes: nowhere, after the faulty one, or before it (so that the
#: prober cancels, or never starts, an attempt that can no longer win).
LAYOUTS = ("alone", "after", "before")


@dataclass(frozen=True)
class Plan:
    faulty: Faulty
    policy: Policy
    layout: str

    @classmethod
    def of(cls, number: int) -> Plan:
        """Probe ``number``'s plan; every combination comes round every 54 probes."""
        n_faulty, n_policy = len(FAULTY), len(Policy)
        return cls(
            faulty=FAULTY[number % n_faulty],
            policy=list(Policy)[number // n_faulty % n_policy],
            layout=LAYOUTS[number // (n_faulty * n_policy) % len(LAYOUTS)],
        )

    def names(self) -> list[tuple[str, str]]:
        faulty = (self.faulty.name, self.faulty.iqn)
        return {
            "alone": [faulty],
            "after": [faulty, (GOOD, IQN)],
            "before": [(GOOD, IQN), faulty],
        }[self.layout]

    def allowed(self, index: int) -> set[Outcome]:
        """What candidate ``index`` may come to: its own outcome, or a timeout when the busy
        loop makes even a good login miss the tiny deadline, or cut off by a winner."""
        name, _ = self.names()[index]
        own = Outcome.OK if name == GOOD else self.faulty.outcome
        return {own, Outcome.TIMEOUT, Outcome.CANCELLED, Outcome.NOT_TRIED}


def target_config() -> TargetConfig:
    portals = [PortalConfig(host=HOST, port=0, name=f.name, faults=f.faults) for f in FAULTY]
    portals.append(PortalConfig(host=HOST, port=0, name=GOOD))
    return TargetConfig(
        portals=tuple(portals),
        targets=(
            TargetSpec(name=IQN, chap=ChapSettings(accounts=(OURS,), mutual=THEIRS)),
            TargetSpec(name=OTHER_IQN, chap=ChapSettings(accounts=(SOMEONE_ELSE,), mutual=THEIRS)),
        ),
    )


def info_for(running: RunningTarget, plan: Plan) -> ConnectionInfo:
    names = plan.names()
    portals = [str(running.portal(name)) for name, _ in names]
    data = build_connection_info(
        portals, [iqn for _, iqn in names], 0, auth=OURS, target_auth=THEIRS
    )
    return parse_connection_info(json.dumps(data))


def options_for(plan: Plan) -> ProbeOptions:
    return ProbeOptions(
        policy=plan.policy,
        connect_timeout=0.5,
        login_timeout=0.1,  # what a silent portal costs
        stagger=0.005,
        initiator_name=INITIATOR,
    )


def count_tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(count_tasks(child) for n in task.child_nurseries for child in n.child_tasks)


def open_fds() -> Counter[str]:
    """What each open descriptor points at (``socket:[inode]``, ``anon_inode:[eventpoll]``...)."""
    found: Counter[str] = Counter()
    for entry in os.scandir("/proc/self/fd"):
        try:
            found[os.readlink(entry.path).split("[")[0]] += 1
        except FileNotFoundError:
            continue  # the descriptor scandir itself used, already closed
    return found


def open_socket_objects() -> int:
    gc.collect()
    return sum(
        1 for obj in gc.get_objects() if isinstance(obj, socket.socket) and obj.fileno() != -1
    )


async def settle(running: RunningTarget) -> None:
    """Wait until the target has seen every connection close and every task is idle."""
    await running.wait_idle()
    await trio.testing.wait_all_tasks_blocked(cushion=0.01)


async def run_probes(running: RunningTarget, numbers: range) -> list[ProbeResult]:
    limiter = trio.CapacityLimiter(CONCURRENCY)
    results: list[ProbeResult] = []

    async def one(number: int) -> None:
        plan = Plan.of(number)
        async with limiter:
            result = await probe(info_for(running, plan), options_for(plan))
        for attempt in result.attempts:
            assert attempt.outcome in plan.allowed(attempt.candidate.index), (plan, attempt)
        results.append(result)

    async with trio.open_nursery() as nursery:
        for number in numbers:
            nursery.start_soon(one, number)
    return results


async def test_a_thousand_failing_probes_leak_nothing() -> None:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    with trio.fail_after(RUN_DEADLINE):
        async with serve_target(target_config()) as running:
            await run_probes(running, range(len(FAULTY) * len(Policy) * len(LAYOUTS)))  # warm-up
            await settle(running)
            fds, tasks, sockets = open_fds(), count_tasks(root), open_socket_objects()
            connections = len(running.connections)

            results = await run_probes(running, range(PROBES))
            await settle(running)

            assert len(results) == PROBES
            outcomes = Counter(a.outcome for r in results for a in r.attempts)
            # The mix really happened: every kind of failure, and cancellations too.
            for expected in (
                Outcome.REFUSED,
                Outcome.PROTOCOL_ERROR,
                Outcome.TIMEOUT,
                Outcome.AUTH_FAILED,
                Outcome.OK,
            ):
                assert outcomes[expected] > 0, outcomes
            assert outcomes[Outcome.CANCELLED] + outcomes[Outcome.NOT_TRIED] > 0, outcomes
            # Well over one connection per probe reached the target (refused ones cannot).
            assert len(running.connections) - connections > PROBES, "too few connections made"
            assert not running.lingering_sessions, running.lingering_sessions[:3]

            assert open_fds() == fds, f"descriptors before {fds}, after {open_fds()}"
            assert count_tasks(root) == tasks
            assert open_socket_objects() == sockets
    # And the target itself gave back every descriptor it took.
    assert sum(open_fds().values()) < sum(fds.values())
