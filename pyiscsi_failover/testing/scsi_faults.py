"""SCSI faults of the test target: what one session's LUNs answer instead of the truth.

A :class:`~.faults.LunFault` set on a portal acts on the Normal sessions through that portal,
one set on a target on that target's sessions through every portal; either acts on the LUNs it
names (all by default). When a session logs in, :func:`session_luns` builds its
:class:`~.logical_unit.LunTable`:

* ``lun-missing``, and ``hide-from-isid`` when the session's ISID matches, leave the LUN out:
  REPORT LUNS does not list it, INQUIRY shows qualifier 3, everything else 05/25/00;
* ``other-wwid`` serves the same blocks under another WWID and serial;
* any other fault wraps the LU in a :class:`FaultyUnit`, which holds per-session state (how
  many unit attentions are still due) and so is made anew for every session.

A :class:`FaultyUnit` decides each command's status as a real LU would, first match wins (the
order Linux's LIO checks them in): a pending UNIT ATTENTION, then ALUA standby, NOT READY, any
other CHECK CONDITION, and a reservation conflict. INQUIRY and REPORT LUNS always get through
(SPC-4 exempts them); REQUEST SENSE returns the unit attention or the NOT READY state as its
data. The reply that comes out may then be held back (``slow-scsi``), cut into small Data-In
PDUs (``split-data-in``) or claim more data than the initiator expects
(``residual-overflow``): the iSCSI side (:mod:`.scsi_session`) carries those out.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final, TypeVar

from pyiscsi_failover.protocol.pdu import ScsiStatus
from pyiscsi_failover.protocol.scsi import (
    SenseKey,
    encode_descriptor_sense,
    encode_fixed_sense,
)
from pyiscsi_failover.testing.config import TargetSpec, default_wwid
from pyiscsi_failover.testing.faults import (
    CheckCondition,
    Fault,
    FaultKind,
    FaultLayer,
    HideFromIsid,
    LunFault,
    LunMissing,
    NotReady,
    OtherWwid,
    ReservationConflict,
    ResidualOverflow,
    SlowScsi,
    SplitDataIn,
    Standby,
    UnitAttention,
)
from pyiscsi_failover.testing.logical_unit import (
    LogicalUnit,
    LogicalUnits,
    LunTable,
    Nexus,
    ScsiReply,
    ScsiRequest,
    ScsiResponder,
)

__all__ = ["FaultyUnit", "SessionLuns", "lun_faults", "other_wwid", "session_luns"]

_INQUIRY: Final = 0x12
_REQUEST_SENSE: Final = 0x03
_MODE_SENSE_6: Final = 0x1A
_MODE_SENSE_10: Final = 0x5A
_MAINTENANCE_IN: Final = 0xA3  # REPORT TARGET PORT GROUPS is its service action 0x0A
#: What every status fault lets through: INQUIRY (REPORT LUNS never reaches a LU).
_ALWAYS: Final = frozenset({_INQUIRY})
#: What a port in ALUA standby still serves (SPC-4 5.16.2.4.4), of what this LU implements.
_STANDBY_SERVES: Final = frozenset(
    {_INQUIRY, _REQUEST_SENSE, _MODE_SENSE_6, _MODE_SENSE_10, _MAINTENANCE_IN}
)
_STANDBY_SENSE: Final = (SenseKey.NOT_READY, 0x04, 0x0B)
_F = TypeVar("_F", bound=LunFault)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLuns:
    """A session's LUN table, and the faults that took LUNs out of it (one entry per LUN)."""

    table: LunTable
    removed: tuple[tuple[int, FaultKind], ...] = ()


def lun_faults(faults: Sequence[Fault], lun: int) -> tuple[LunFault, ...]:
    """The SCSI faults of ``faults`` that act on ``lun``, in order."""
    return tuple(
        fault
        for fault in faults
        if fault.kind.layer is FaultLayer.SCSI
        and isinstance(fault, LunFault)
        and fault.acts_on(lun)
    )


def other_wwid(unit: LogicalUnit, fault: OtherWwid, target_name: str) -> LogicalUnit:
    """``unit``'s blocks under ``fault``'s WWID, or one derived from the target and LUN that
    is not the unit's own; the serial follows the new WWID."""
    wwid = fault.wwid
    if wwid is None:
        wwid = default_wwid(f"{target_name} other-wwid", unit.spec.lun)
        if wwid == unit.wwid:  # pragma: no cover - a SHA-256 collision
            wwid = default_wwid(f"{target_name} other-wwid again", unit.spec.lun)
    return LogicalUnit(replace(unit.spec, wwid=wwid, serial=wwid[-16:]), unit.store)


def session_luns(
    units: LogicalUnits, target: TargetSpec, nexus: Nexus, faults: Sequence[Fault]
) -> SessionLuns:
    """The LUNs ``nexus`` sees of ``target`` under ``faults`` (the portal's SCSI faults, then
    the target's: where two of one kind act on a LUN, the first counts)."""
    responders: dict[int, ScsiResponder] = {}
    removed: list[tuple[int, FaultKind]] = []
    for spec in target.logical_units:
        unit = units.get(target.name, spec.lun)
        if unit is None:
            continue
        acting = lun_faults(faults, spec.lun)
        gone = next(
            (
                fault.kind
                for fault in acting
                if isinstance(fault, LunMissing)
                or (isinstance(fault, HideFromIsid) and fault.isid.matches(nexus.isid))
            ),
            None,
        )
        if gone is not None:
            removed.append((spec.lun, gone))
            continue
        wwid = _first(acting, OtherWwid)
        if wwid is not None:
            unit = other_wwid(unit, wwid, target.name)
        shaping = [f for f in acting if not isinstance(f, (LunMissing, HideFromIsid))]
        responders[spec.lun] = FaultyUnit(unit, shaping) if shaping else unit
    return SessionLuns(table=LunTable(responders), removed=tuple(removed))


def _first(faults: Sequence[LunFault], kind: type[_F]) -> _F | None:
    return next((fault for fault in faults if isinstance(fault, kind)), None)


def _sense(key: SenseKey, asc: int, ascq: int, cdb: bytes) -> ScsiReply:
    """REQUEST SENSE's answer carrying ``key``/``asc``/``ascq`` as its data (GOOD)."""
    descriptor = bool(cdb[1] & 0x01)
    data = (encode_descriptor_sense if descriptor else encode_fixed_sense)(key, asc, ascq)
    return ScsiReply(data=data[: cdb[4]])


class FaultyUnit:
    """One LU of one session with its SCSI faults (see the module docstring)."""

    __slots__ = (
        "_attention",
        "_attentions_due",
        "_condition",
        "_conflict",
        "_not_ready",
        "_overflow",
        "_slow",
        "_split",
        "_standby",
        "_wwid",
        "unit",
    )

    def __init__(self, unit: LogicalUnit, faults: Sequence[LunFault]) -> None:
        self.unit = unit
        self._attention = _first(faults, UnitAttention)
        self._attentions_due = 0 if self._attention is None else self._attention.count
        self._standby = _first(faults, Standby) is not None
        self._not_ready = _first(faults, NotReady)
        self._condition = _first(faults, CheckCondition)
        self._conflict = _first(faults, ReservationConflict) is not None
        slow = _first(faults, SlowScsi)
        self._slow = 0.0 if slow is None else slow.seconds
        split = _first(faults, SplitDataIn)
        self._split = None if split is None else split.segment
        overflow = _first(faults, ResidualOverflow)
        self._overflow = 0 if overflow is None else overflow.excess
        self._wwid = _first(faults, OtherWwid) is not None

    def __repr__(self) -> str:
        return f"FaultyUnit({self.unit!r})"

    @property
    def attentions_due(self) -> int:
        """Unit attentions this session has still to report."""
        return self._attentions_due

    def execute(self, request: ScsiRequest) -> ScsiReply:
        reply, kind = self._status(request)
        shaped: list[FaultKind] = [] if kind is None else [kind]
        if kind is None and self._wwid and request.opcode == _INQUIRY and request.cdb[1] & 0x01:
            shaped.append(FaultKind.OTHER_WWID)
        changes: dict[str, object] = {}
        if self._overflow and reply.status is ScsiStatus.GOOD:
            shaped.append(FaultKind.RESIDUAL_OVERFLOW)
            if reply.write_length:
                changes["write_length"] = max(reply.write_length, request.edtl) + self._overflow
            else:
                size = max(len(reply.data), request.edtl) + self._overflow
                changes["data"] = reply.data.ljust(size, b"\x00")
        if self._split is not None and reply.data:
            shaped.append(FaultKind.SPLIT_DATA_IN)
            changes["data_segment_limit"] = self._split
        if self._slow:
            shaped.append(FaultKind.SLOW_SCSI)
            changes["latency"] = self._slow
        if not shaped:
            return reply
        return replace(reply, faults=(*reply.faults, *shaped), **changes)  # type: ignore[arg-type]

    def _status(self, request: ScsiRequest) -> tuple[ScsiReply, FaultKind | None]:
        """The reply a status fault gives instead of the LU's, first match wins; else the
        LU's own."""
        opcode, cdb = request.opcode, request.cdb
        attention = self._attention
        if attention is not None and self._attentions_due and opcode not in _ALWAYS:
            self._attentions_due -= 1
            key, asc, ascq = SenseKey.UNIT_ATTENTION, attention.asc, attention.ascq
            if opcode == _REQUEST_SENSE:
                return _sense(key, asc, ascq, cdb), FaultKind.UNIT_ATTENTION
            return ScsiReply.check_condition(key, asc, ascq), FaultKind.UNIT_ATTENTION
        if self._standby and opcode not in _STANDBY_SERVES:
            return ScsiReply.check_condition(*_STANDBY_SENSE), FaultKind.STANDBY
        for fault in (self._not_ready, self._condition):
            if fault is None or opcode in _ALWAYS:
                continue
            key = SenseKey.NOT_READY if isinstance(fault, NotReady) else fault.key
            if opcode == _REQUEST_SENSE:
                return _sense(key, fault.asc, fault.ascq, cdb), fault.kind
            return ScsiReply.check_condition(key, fault.asc, fault.ascq), fault.kind
        if self._conflict and opcode not in _ALWAYS and opcode != _REQUEST_SENSE:
            conflict = ScsiReply(status=ScsiStatus.RESERVATION_CONFLICT)
            return conflict, FaultKind.RESERVATION_CONFLICT
        return self.unit.execute(request), None
