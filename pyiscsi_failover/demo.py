"""``pyiscsi-failover demo``: the failover story on loopback, with no root and no array.

Our own test target serves one volume on three portals: the main one is blackholed (SYNs are
dropped, as behind a dead switch), the first alternative refuses connections (nothing listens),
and the second alternative works but demands CHAP. The prober must end on the second
alternative, and say why it passed over the others.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
    redacted,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.prober import Outcome, Policy, ProbeResult
from pyiscsi_failover.testing import (
    Blackhole,
    ChapSettings,
    PortalConfig,
    Refuse,
    RunningTarget,
    TargetConfig,
    TargetSpec,
    serve_target,
)

__all__ = [
    "DEMO_IQN",
    "DEMO_USER",
    "demo_connection_info",
    "demo_target",
    "explain",
    "shown_connection_info",
]

DEMO_IQN: Final = "iqn.2026-11.org.pyiscsi-failover.demo:volume-1"
DEMO_USER: Final = "demo-initiator"
_ROLES: Final = ("main portal (blackholed)", "alternative 1 (refuses)", "alternative 2 (CHAP)")

_WHY: Final = {
    Outcome.TIMEOUT: "no answer to our SYN within the connect deadline: a blackholed portal",
    Outcome.REFUSED: "the host answered with a reset: nothing listens on that port",
    Outcome.OK: "TCP connected, CHAP login succeeded, logged out cleanly",
    Outcome.CANCELLED: "abandoned: another candidate was chosen before it finished",
    Outcome.NOT_TRIED: "not needed: an earlier candidate already won",
}


@asynccontextmanager
async def demo_target() -> AsyncIterator[tuple[RunningTarget, ConnectionInfo]]:
    """Serve the demo volume and yield it with the connection_info a backend would return."""
    credentials = ChapCredentials(DEMO_USER, Secret(secrets.token_hex(16)))
    config = TargetConfig(
        portals=(
            PortalConfig(host="127.0.0.1", port=0, name="main", faults=(Blackhole(),)),
            PortalConfig(host="127.0.0.1", port=0, name="alt1", faults=(Refuse(),)),
            PortalConfig(host="127.0.0.1", port=0, name="alt2"),
        ),
        targets=(TargetSpec(name=DEMO_IQN, luns=(1,), chap=ChapSettings(accounts=(credentials,))),),
    )
    async with serve_target(config) as running:
        yield running, demo_connection_info(running, credentials)


def demo_connection_info(running: RunningTarget, credentials: ChapCredentials) -> ConnectionInfo:
    document = build_connection_info(
        [str(portal) for portal in running.portals], DEMO_IQN, 1, auth=credentials
    )
    return parse_connection_info(document)


def shown_connection_info(running: RunningTarget) -> object:
    """The demo's connection_info as a backend would send it, with the password masked."""
    document = build_connection_info(
        [str(portal) for portal in running.portals],
        DEMO_IQN,
        1,
        auth=ChapCredentials(DEMO_USER, Secret(b"hidden")),
    )
    return redacted(document)


def explain(result: ProbeResult) -> list[str]:
    """One line per candidate saying what happened and what it means."""
    lines = []
    for attempt in result.attempts:
        index = attempt.candidate.index
        role = _ROLES[index] if index < len(_ROLES) else f"candidate {index}"
        why = _WHY.get(attempt.outcome, attempt.detail)
        if attempt.outcome is Outcome.CANCELLED and result.policy is Policy.STAGGERED:
            why = "abandoned: a later candidate succeeded first (staggered: first success wins)"
        lines.append(f"#{index} {role}: {attempt.outcome.value} - {why}")
    if result.chosen is not None:
        c = result.chosen.candidate
        rule = (
            "the first candidate to succeed, each started one stagger after the previous"
            if result.policy is Policy.STAGGERED
            else "the first candidate in the given order that works"
        )
        lines.append(
            f"=> chosen #{c.index} {c.portal} {c.iqn} lun {c.lun}: {rule}, "
            f"found in {result.elapsed_s * 1000:.0f} ms"
        )
    else:
        lines.append("=> no candidate works")
    return lines
