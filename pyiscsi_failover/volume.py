"""Attach a volume: probe its candidates in order, hand the first that works to open-iscsi, and
go on to the next one that works when the hand-off fails.

The probe proves a candidate in user space; the kernel can still fail it: its login (another
ISID, another ACL, a portal that died in between), its scan (a LUN masked from the kernel's
session), or its disk (another volume behind the same numbers). The spec's failover ends in a
kernel session, so :func:`attach_volume` treats those as one more reason to try the next
candidate. After a failed hand-off it undoes what it did (:func:`~.iscsiadm.attach` does) and
probes again, in the given order, the candidates whose fate the first probe left open (cancelled
or never tried) but not those it found dead, nor those already handed off. Every hand-off is
bounded: its login is one try of ``connect_timeout + login_timeout`` (the probe's own budget),
and the disk must appear within ``device_timeout``.

The first candidate that passes a LUN check pins the volume's WWID: later probes and every
kernel disk must show it (``wrong_volume``), unless ``ProbeOptions.expect_wwid`` pinned it
already.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pyiscsi_failover.connection_info import ConnectionInfo
from pyiscsi_failover.errors import (
    DeviceTimeout,
    IscsiadmError,
    IscsiadmUnavailable,
    WrongVolume,
)
from pyiscsi_failover.iscsiadm import (
    AttachResult,
    Iscsiadm,
    NodeTarget,
    RecordLedger,
    attach,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Attempt, Outcome, ProbeOptions, ProbeResult, probe
from pyiscsi_failover.sysfs import SYS_ROOT

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyiscsi_failover.prober import ProgressEvent

__all__ = [
    "Handoff",
    "HandoffOutcome",
    "VolumeAttachment",
    "attach_volume",
    "node_target",
]

logger = logging.getLogger(__name__)

#: Outcomes after which a candidate's fate is still open: probed again after a failed hand-off.
_OPEN: Final = frozenset({Outcome.NOT_TRIED, Outcome.CANCELLED})


class HandoffOutcome(enum.Enum):
    """How one hand-off to the kernel ended; the values are the JSON words."""

    ATTACHED = "attached"
    LOGIN_FAILED = "login_failed"
    NO_DEVICE = "no_device"
    WRONG_VOLUME = "wrong_volume"


@dataclass(frozen=True, slots=True, kw_only=True)
class Handoff:
    """One candidate handed to open-iscsi, and what came of it."""

    index: int
    portal: Portal
    iqn: str
    lun: int
    outcome: HandoffOutcome
    detail: str
    elapsed_s: float
    result: AttachResult | None = None

    @property
    def attached(self) -> bool:
        return self.outcome is HandoffOutcome.ATTACHED

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "portal": str(self.portal),
            "iqn": self.iqn,
            "lun": self.lun,
            "outcome": self.outcome.value,
            "detail": self.detail,
            "elapsed_ms": round(self.elapsed_s * 1000, 3),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeAttachment:
    """Every probe round and every hand-off of one :func:`attach_volume`, in order."""

    probes: tuple[ProbeResult, ...]
    handoffs: tuple[Handoff, ...]
    elapsed_s: float

    @property
    def attached(self) -> Handoff | None:
        """The hand-off that attached the volume, if one did (always the last)."""
        last = self.handoffs[-1] if self.handoffs else None
        return last if last is not None and last.attached else None

    @property
    def device(self) -> Path | None:
        attached = self.attached
        return None if attached is None or attached.result is None else attached.result.device


def node_target(info: ConnectionInfo, attempt: Attempt, options: ProbeOptions) -> NodeTarget:
    """The hand-off of a probed candidate: where the probe logged in (a redirect's address
    included), with what it negotiated and offered."""
    c = attempt.candidate
    negotiated = attempt.negotiated  # None after a TCP-only check: the record keeps its own
    return NodeTarget(
        portal=attempt.handoff_portal or c.portal,
        iqn=c.iqn,
        lun=c.lun,
        addressing_mode=info.addressing_mode,
        chap=info.chap,
        target_chap=info.target_chap,
        header_digest=None if negotiated is None else negotiated.header_digest,
        data_digest=None if negotiated is None else negotiated.data_digest,
        chap_algorithms=None if info.chap is None else options.chap_policy.algorithms,
    )


def _subset(info: ConnectionInfo, indexes: list[int]) -> ConnectionInfo:
    """``info`` with only the candidates at ``indexes`` (renumbered from 0, order kept)."""
    candidates = tuple(
        replace(info.candidates[original], index=position)
        for position, original in enumerate(indexes)
    )
    return replace(info, candidates=candidates)


def _renumbered(result: ProbeResult, info: ConnectionInfo, indexes: list[int]) -> ProbeResult:
    """A probe of :func:`_subset` told with the candidates' own indexes."""
    attempts = tuple(
        replace(a, candidate=info.candidates[indexes[a.candidate.index]]) for a in result.attempts
    )
    chosen = None
    if result.chosen is not None:
        chosen = next(
            a for a, b in zip(attempts, result.attempts, strict=True) if b is result.chosen
        )
    return replace(result, attempts=attempts, chosen=chosen)


def _failed_handoff(exc: Exception) -> tuple[HandoffOutcome, str]:
    if isinstance(exc, WrongVolume):
        return HandoffOutcome.WRONG_VOLUME, str(exc)
    if isinstance(exc, DeviceTimeout):
        return HandoffOutcome.NO_DEVICE, str(exc)
    return HandoffOutcome.LOGIN_FAILED, str(exc)


async def attach_volume(
    info: ConnectionInfo,
    options: ProbeOptions,
    *,
    iscsiadm: Iscsiadm,
    device_timeout: float = 20.0,
    dev_root: Path = Path("/dev/disk/by-path"),
    ledger: RecordLedger | None = None,
    sys_root: Path = SYS_ROOT,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_handoff: Callable[[Handoff], None] | None = None,
) -> VolumeAttachment:
    """Probe ``info``'s candidates, hand the chosen one to open-iscsi, and go on until one
    attaches or none is left (see the module docstring).

    Never raises for a candidate that fails: :class:`~pyiscsi_failover.errors.LedgerError`
    (our own state), :class:`~pyiscsi_failover.errors.IscsiadmUnavailable` and usage errors
    are raised. ``on_handoff`` hears of each hand-off as it ends.
    """
    started = time.monotonic()
    ledger = RecordLedger() if ledger is None else ledger
    ledger.entries()  # a broken ledger stops us before anything is probed or changed
    pinned = options.expect_wwid
    closed: set[int] = set()  # found dead by a probe, or handed off already
    probes: list[ProbeResult] = []
    handoffs: list[Handoff] = []
    while True:
        indexes = [c.index for c in info.candidates if c.index not in closed]
        if not indexes:
            break
        round_options = options if pinned is None else replace(options, expect_wwid=pinned)
        result = _renumbered(
            await probe(_subset(info, indexes), round_options, on_progress=on_progress),
            info,
            indexes,
        )
        probes.append(result)
        closed.update(
            a.candidate.index for a in result.attempts if not a.ok and a.outcome not in _OPEN
        )
        chosen = result.chosen
        if chosen is None:
            break
        closed.add(chosen.candidate.index)
        wwid = None if chosen.lun_info is None else chosen.lun_info.wwid
        if pinned is None and wwid is not None:
            pinned = wwid
        handoff = await _hand_off(
            info,
            chosen,
            options,
            iscsiadm=iscsiadm,
            device_timeout=device_timeout,
            dev_root=dev_root,
            ledger=ledger,
            sys_root=sys_root,
            expect_wwid=wwid,
        )
        handoffs.append(handoff)
        if on_handoff is not None:
            on_handoff(handoff)
        if handoff.attached:
            break
        # Info, not a warning: the caller hears of it (on_handoff, the result) and says it.
        logger.info(
            "#%d %s: hand-off failed (%s): %s; trying the next candidate",
            handoff.index,
            handoff.portal,
            handoff.outcome.value,
            handoff.detail,
        )
    return VolumeAttachment(
        probes=tuple(probes), handoffs=tuple(handoffs), elapsed_s=time.monotonic() - started
    )


async def _hand_off(
    info: ConnectionInfo,
    chosen: Attempt,
    options: ProbeOptions,
    *,
    iscsiadm: Iscsiadm,
    device_timeout: float,
    dev_root: Path,
    ledger: RecordLedger,
    sys_root: Path,
    expect_wwid: str | None,
) -> Handoff:
    node = node_target(info, chosen, options)
    c = chosen.candidate
    began = time.monotonic()
    try:
        result = await attach(
            node,
            iscsiadm=iscsiadm,
            device_timeout=device_timeout,
            dev_root=dev_root,
            ledger=ledger,
            login_timeout=options.connect_timeout + options.login_timeout,
            expect_wwid=expect_wwid,
            sys_root=sys_root,
        )
    except IscsiadmUnavailable:
        raise  # no candidate could be handed off: not a reason to try the next one
    except (IscsiadmError, DeviceTimeout, WrongVolume) as exc:
        outcome, detail = _failed_handoff(exc)
        return Handoff(
            index=c.index,
            portal=node.portal,
            iqn=c.iqn,
            lun=c.lun,
            outcome=outcome,
            detail=detail,
            elapsed_s=time.monotonic() - began,
        )
    return Handoff(
        index=c.index,
        portal=node.portal,
        iqn=c.iqn,
        lun=c.lun,
        outcome=HandoffOutcome.ATTACHED,
        detail=f"attached as {result.device}",
        elapsed_s=time.monotonic() - began,
        result=result,
    )
