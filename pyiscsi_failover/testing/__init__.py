"""A scriptable userspace iSCSI test target, for multi-portal tests without a storage array.

It speaks enough of RFC 7143 for login (no auth, one-way or mutual CHAP), discovery
(SendTargets) and logout, and serves disk LUNs over SCSI (REPORT LUNS, INQUIRY with the WWID,
READ CAPACITY, MODE SENSE, READ and WRITE from a sparse in-memory image or a backing file, task
management: see :mod:`.logical_unit` and :mod:`.scsi_session`), so that libiscsi and the
kernel can use them. It can misbehave on purpose, per portal or per target: refuse or
blackhole connections, stay silent, reset, stall, redirect, send garbage, weaken CHAP, demand
or reject digests, and refuse a login by its ISID; and its LUNs can go missing on one portal
or for one ISID, be not ready or in ALUA standby, raise a unit attention or a reservation
conflict, show another WWID, answer slowly, split their Data-In or overflow the residual
(see :mod:`~pyiscsi_failover.testing.faults` and :mod:`.scsi_faults`).

::

    config = TargetConfig(
        portals=(
            PortalConfig(host="127.0.0.1", port=0, faults=(Blackhole(),)),
            PortalConfig(host="127.0.0.2", port=0),
        ),
        targets=(
            TargetSpec(
                name="iqn.2024-01.com.example:disk", luns=(LunSpec(lun=0, size=1 << 30),)
            ),
        ),
    )
    async with serve_target(config) as running:
        ...  # connect an initiator to running.portals
        await running.wait_idle()
        assert not running.lingering_sessions

Layers: :mod:`.faults` and :mod:`.config` (pure data), :mod:`.logical_unit` (the LUs, pure),
:mod:`.target` and :mod:`.scsi_session` (the sans-IO state machine), :mod:`.server` (trio)
and ``python -m pyiscsi_failover.testing`` (a process).
Importing this package imports no I/O module: the trio server is loaded the first time one of
its names (``serve_target``, ``RunningTarget``, ``ConnectionRecord``, ``LoginRecord``) is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyiscsi_failover.testing.config import (
    ChapSettings,
    LunSpec,
    PortalConfig,
    TargetConfig,
    TargetSpec,
)
from pyiscsi_failover.testing.faults import (
    Blackhole,
    CheckCondition,
    DelayPDUs,
    DigestsRequired,
    DowngradeToNone,
    Fault,
    FaultKind,
    FaultLayer,
    GarbageKeyValues,
    HideFromIsid,
    IsidMatch,
    LunFault,
    LunMissing,
    MalformedPDU,
    NonUTF8Text,
    NotReady,
    OtherWwid,
    OversizedPDU,
    Redirect,
    RedirectLoop,
    ReflectChallenge,
    Refuse,
    RefuseIsid,
    RejectDigests,
    ReservationConflict,
    ResetMidLogin,
    ResidualOverflow,
    ScsiFault,
    ServiceUnavailable,
    Silent,
    SlowDrip,
    SlowScsi,
    SplitDataIn,
    SplitStyle,
    SplitText,
    Standby,
    UnitAttention,
    WrongChapResponse,
    WrongITT,
    WrongOpcode,
    format_fault,
    parse_fault,
)
from pyiscsi_failover.testing.target import ConnectionState, TargetConnection

if TYPE_CHECKING:
    from pyiscsi_failover.testing.server import (
        ConnectionRecord,
        LoginRecord,
        RunningTarget,
        serve_target,
    )

__all__ = [
    "Blackhole",
    "ChapSettings",
    "CheckCondition",
    "ConnectionRecord",
    "ConnectionState",
    "DelayPDUs",
    "DigestsRequired",
    "DowngradeToNone",
    "Fault",
    "FaultKind",
    "FaultLayer",
    "GarbageKeyValues",
    "HideFromIsid",
    "IsidMatch",
    "LoginRecord",
    "LunFault",
    "LunMissing",
    "LunSpec",
    "MalformedPDU",
    "NonUTF8Text",
    "NotReady",
    "OtherWwid",
    "OversizedPDU",
    "PortalConfig",
    "Redirect",
    "RedirectLoop",
    "ReflectChallenge",
    "Refuse",
    "RefuseIsid",
    "RejectDigests",
    "ReservationConflict",
    "ResetMidLogin",
    "ResidualOverflow",
    "RunningTarget",
    "ScsiFault",
    "ServiceUnavailable",
    "Silent",
    "SlowDrip",
    "SlowScsi",
    "SplitDataIn",
    "SplitStyle",
    "SplitText",
    "Standby",
    "TargetConfig",
    "TargetConnection",
    "TargetSpec",
    "UnitAttention",
    "WrongChapResponse",
    "WrongITT",
    "WrongOpcode",
    "format_fault",
    "parse_fault",
    "serve_target",
]

_SERVER_NAMES = frozenset({"ConnectionRecord", "LoginRecord", "RunningTarget", "serve_target"})


def __getattr__(name: str) -> Any:
    # The server imports trio; load it only when asked for, so the sans-IO parts stay light.
    if name in _SERVER_NAMES:
        from pyiscsi_failover.testing import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
