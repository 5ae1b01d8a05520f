"""What one login needs to know: who logs in, where, and how (:class:`LoginConfig`).

Apart from the login state machine so that a caller (the prober, the command line) can build one
without loading the PDU models and the codec: those load with the first connection, after its
SYN is on the wire. Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from pyiscsi_failover.credentials import ChapCredentials
from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.protocol.chap import DEFAULT_POLICY, ChapPolicy
from pyiscsi_failover.protocol.isid import ISID
from pyiscsi_failover.protocol.negotiation import (
    DEFAULT_PROPOSAL,
    OperationalProposal,
    SessionType,
)

__all__ = ["LoginConfig", "probe_isid"]


def probe_isid(token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> ISID:
    """A random-format ISID (T=0b10) for a probe.

    open-iscsi's sessions use the OUI format (T=0b00, 0x00023d). A probe that reused the kernel's
    InitiatorName + ISID for the same target would make the target reinstate, i.e. kill, the
    live kernel session; a random-format ISID can never collide with one of those.
    """
    raw = token_bytes(5)
    return ISID(
        t=0b10, a=0, b=int.from_bytes(raw[0:2], "big"), c=raw[2], d=int.from_bytes(raw[3:5], "big")
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginConfig:
    """Who logs in where and how. ``target_name=None`` means a Discovery session."""

    initiator_name: str
    target_name: str | None = None
    isid: ISID = field(default_factory=probe_isid)
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    # Frozen, so one shared default each: validating them anew cost half a LoginConfig.
    chap_policy: ChapPolicy = DEFAULT_POLICY
    proposal: OperationalProposal = DEFAULT_PROPOSAL
    initiator_alias: str | None = None

    def __post_init__(self) -> None:
        if self.target_chap is not None and self.chap is None:
            raise LocalProtocolError("mutual CHAP (target_chap) needs the initiator's chap too")

    @property
    def session_type(self) -> SessionType:
        return SessionType.DISCOVERY if self.target_name is None else SessionType.NORMAL
