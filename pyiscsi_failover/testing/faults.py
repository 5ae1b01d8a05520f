"""Faults the test target can inject, described as plain data.

A fault is a small frozen dataclass; its class says *what* goes wrong and its fields say *how
much*. Who carries it out depends on the layer the fault lives in (see :data:`FaultLayer`):

* ``SOCKET`` faults (refuse, blackhole) are applied by the server when it binds a portal;
* ``TIMING`` faults (silent, delay, slow drip) and the RST of ``reset-mid-login`` are applied
  by the server to the bytes the state machine produces;
* ``PROTOCOL`` faults are applied by the sans-IO :class:`~pyiscsi_failover.testing.target.
  TargetConnection` to the PDUs it builds; the digest faults (``digests-required``,
  ``reject-digests``) also change what it answers to HeaderDigest/DataDigest and which digests
  it sends and expects after login; ``refuse-isid`` refuses a login by the initiator's ISID;
* ``SCSI`` faults (:class:`LunFault`) change what some LUNs answer in the Normal sessions
  through a portal or with a target: a LUN left out, NOT READY, ALUA standby, a unit
  attention, a reservation conflict, another WWID, a slow reply, Data-In in small pieces, a
  residual overflow (see :mod:`.scsi_faults`). Each names the LUNs it acts on (``@1,2`` on
  the command line), or acts on all of them.

Every fault can be set on a portal; protocol and SCSI faults can also be set on one target
(they then apply to Normal sessions with that target only). One portal or target may carry several
faults of different kinds: ``delay`` with ``redirect`` makes a slow hop of a redirect chain,
and two portals redirecting to each other make a loop. :func:`parse_fault` reads the command-line
spelling (``delay:0.5``, ``redirect:127.0.0.2:3260``...) and ``str(fault)`` gives it back.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar, Final, TypeAlias, TypeVar

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.protocol.isid import ISID
from pyiscsi_failover.protocol.scsi import MAX_FLAT_LUN, SenseKey

__all__ = [
    "OPEN_ISCSI_OUI",
    "Blackhole",
    "CheckCondition",
    "DelayPDUs",
    "DigestsRequired",
    "DowngradeToNone",
    "Fault",
    "FaultKind",
    "FaultLayer",
    "GarbageKeyValues",
    "HideFromIsid",
    "IsidMatch",
    "LunFault",
    "LunMissing",
    "MalformedPDU",
    "NonUTF8Text",
    "NotReady",
    "OtherWwid",
    "OversizedPDU",
    "Redirect",
    "RedirectLoop",
    "ReflectChallenge",
    "Refuse",
    "RefuseIsid",
    "RejectDigests",
    "ReservationConflict",
    "ResetMidLogin",
    "ResidualOverflow",
    "ScsiFault",
    "ServiceUnavailable",
    "Silent",
    "SlowDrip",
    "SlowScsi",
    "SplitDataIn",
    "SplitStyle",
    "SplitText",
    "Standby",
    "UnitAttention",
    "WrongChapResponse",
    "WrongITT",
    "WrongOpcode",
    "find_fault",
    "format_fault",
    "parse_fault",
]


class FaultLayer(enum.IntEnum):
    """Which layer carries a fault out (and so where it may be configured)."""

    SOCKET = 1
    TIMING = 2
    PROTOCOL = 3
    SCSI = 4


class FaultKind(enum.Enum):
    """Every fault the test target knows; the value is its command-line name."""

    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    SILENT = "silent"
    RESET_MID_LOGIN = "reset-mid-login"
    DELAY = "delay"
    SLOW_DRIP = "slow-drip"
    MALFORMED_PDU = "malformed-pdu"
    OVERSIZED_PDU = "oversized-pdu"
    WRONG_OPCODE = "wrong-opcode"
    WRONG_ITT = "wrong-itt"
    REDIRECT = "redirect"
    REDIRECT_LOOP = "redirect-loop"
    WRONG_CHAP_RESPONSE = "wrong-chap-response"
    REFLECT_CHALLENGE = "reflect-challenge"
    DOWNGRADE_TO_NONE = "downgrade-to-none"
    GARBAGE_KEY_VALUES = "garbage-key-values"
    NON_UTF8_TEXT = "non-utf8-text"
    SPLIT_TEXT = "split-text"
    SERVICE_UNAVAILABLE = "service-unavailable"
    DIGESTS_REQUIRED = "digests-required"
    REJECT_DIGESTS = "reject-digests"
    REFUSE_ISID = "refuse-isid"
    LUN_MISSING = "lun-missing"
    HIDE_FROM_ISID = "hide-from-isid"
    NOT_READY = "not-ready"
    STANDBY = "standby"
    CHECK_CONDITION = "check-condition"
    UNIT_ATTENTION = "unit-attention"
    RESERVATION_CONFLICT = "reservation-conflict"
    OTHER_WWID = "other-wwid"
    SLOW_SCSI = "slow-scsi"
    SPLIT_DATA_IN = "split-data-in"
    RESIDUAL_OVERFLOW = "residual-overflow"

    @property
    def layer(self) -> FaultLayer:
        if self in (FaultKind.REFUSE, FaultKind.BLACKHOLE):
            return FaultLayer.SOCKET
        if self in (
            FaultKind.SILENT,
            FaultKind.DELAY,
            FaultKind.SLOW_DRIP,
            FaultKind.RESET_MID_LOGIN,
        ):
            return FaultLayer.TIMING
        if self in _SCSI_KINDS:
            return FaultLayer.SCSI
        return FaultLayer.PROTOCOL

    @property
    def per_target(self) -> bool:
        """Whether the fault may be set on one target (protocol and SCSI faults can)."""
        return self.layer in (FaultLayer.PROTOCOL, FaultLayer.SCSI)


_SCSI_KINDS: Final = frozenset(
    {
        FaultKind.LUN_MISSING,
        FaultKind.HIDE_FROM_ISID,
        FaultKind.NOT_READY,
        FaultKind.STANDBY,
        FaultKind.CHECK_CONDITION,
        FaultKind.UNIT_ATTENTION,
        FaultKind.RESERVATION_CONFLICT,
        FaultKind.OTHER_WWID,
        FaultKind.SLOW_SCSI,
        FaultKind.SPLIT_DATA_IN,
        FaultKind.RESIDUAL_OVERFLOW,
    }
)


class SplitStyle(enum.Enum):
    """How a text answer is cut into several PDUs (all with F=0 and a TTT but the last)."""

    #: RFC 7143: C=1 on every PDU but the last; chunks may end in the middle of a pair.
    CONTINUE = "continue"
    #: What tgt does: F=0 with a TTT but C=0, chunks cut at any byte.
    TGT = "tgt"


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalProtocolError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise LocalProtocolError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """Nothing listens on the portal: the port is bound but not listening, so connect gets RST."""

    kind: ClassVar[FaultKind] = FaultKind.REFUSE


@dataclass(frozen=True, slots=True, kw_only=True)
class Blackhole:
    """SYNs are dropped: a listen(0) socket whose accept queue we fill and never drain."""

    kind: ClassVar[FaultKind] = FaultKind.BLACKHOLE


@dataclass(frozen=True, slots=True, kw_only=True)
class Silent:
    """Connections are accepted and read, but nothing is ever sent back."""

    kind: ClassVar[FaultKind] = FaultKind.SILENT


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetMidLogin:
    """The first Login Request is read, then the connection is reset (SO_LINGER 0, close)."""

    kind: ClassVar[FaultKind] = FaultKind.RESET_MID_LOGIN


@dataclass(frozen=True, slots=True, kw_only=True)
class DelayPDUs:
    """Every PDU the target sends is held back for ``seconds``."""

    kind: ClassVar[FaultKind] = FaultKind.DELAY
    seconds: float

    def __post_init__(self) -> None:
        _check_seconds("delay", self.seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowDrip:
    """Responses go out one byte at a time, ``interval`` seconds apart."""

    kind: ClassVar[FaultKind] = FaultKind.SLOW_DRIP
    interval: float = 0.01

    def __post_init__(self) -> None:
        _check_seconds("slow-drip interval", self.interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class MalformedPDU:
    """The first Login Response is replaced by 48 bytes that are no valid PDU (unknown opcode)."""

    kind: ClassVar[FaultKind] = FaultKind.MALFORMED_PDU


@dataclass(frozen=True, slots=True, kw_only=True)
class OversizedPDU:
    """The first Login Response claims a DataSegmentLength of ``length`` (and sends no data)."""

    kind: ClassVar[FaultKind] = FaultKind.OVERSIZED_PDU
    length: int = 0xFFFFFF

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not 0 < self.length <= 0xFFFFFF:
            raise LocalProtocolError(f"oversized length must be 1..16777215, got {self.length!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongOpcode:
    """A well-formed Text Response is sent where the first Login Response belongs."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_OPCODE


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongITT:
    """The first Login Response carries an Initiator Task Tag the initiator never used."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_ITT


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    """Every login is redirected (status 0x0101, or 0x0102 when ``permanent``) to ``to``.

    ``to`` is the name of a portal in the same :class:`TargetConfig` (resolved to its bound
    address, so ephemeral ports work) or a ``host:port[,tpgt]`` address.
    """

    kind: ClassVar[FaultKind] = FaultKind.REDIRECT
    to: str
    permanent: bool = False

    def __post_init__(self) -> None:
        if not self.to:
            raise LocalProtocolError("redirect needs an address or a portal name")


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectLoop:
    """Every login is redirected to the very portal it arrived on."""

    kind: ClassVar[FaultKind] = FaultKind.REDIRECT_LOOP
    permanent: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongChapResponse:
    """In mutual CHAP, the target's CHAP_R is wrong (one bit flipped)."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_CHAP_RESPONSE


@dataclass(frozen=True, slots=True, kw_only=True)
class ReflectChallenge:
    """CHAP reflection, as an attacker (or a target sharing one secret both ways) would do it.

    By default the target's CHAP_C is a challenge an initiator sent it before: ``challenge``, or
    (unset) the latest mutual-CHAP challenge any initiator sent the server on an earlier
    connection; until there is one, a fresh challenge goes out. With ``initiator_secret`` the
    target instead answers a mutual challenge with a CHAP_R computed from the *initiator's*
    secret, which is what reflecting the initiator's own challenge back at it yields.
    """

    kind: ClassVar[FaultKind] = FaultKind.REFLECT_CHALLENGE
    challenge: bytes | None = None
    initiator_secret: bool = False

    def __post_init__(self) -> None:
        if self.challenge is not None and not 1 <= len(self.challenge) <= 1024:
            raise LocalProtocolError("a reflected challenge must be 1..1024 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class DowngradeToNone:
    """The target answers ``AuthMethod=None`` even though CHAP is configured, and lets it pass."""

    kind: ClassVar[FaultKind] = FaultKind.DOWNGRADE_TO_NONE


@dataclass(frozen=True, slots=True, kw_only=True)
class GarbageKeyValues:
    """Wherever the target sends one of ``keys``, the value is ``value`` instead."""

    kind: ClassVar[FaultKind] = FaultKind.GARBAGE_KEY_VALUES
    keys: tuple[str, ...] = ("MaxRecvDataSegmentLength",)
    value: str = "banana"

    def __post_init__(self) -> None:
        if not self.keys:
            raise LocalProtocolError("garbage-key-values needs at least one key")
        if "\x00" in self.value or len(self.value.encode("utf-8", "replace")) > 255:
            raise LocalProtocolError("a garbage value must be at most 255 bytes without NUL")


@dataclass(frozen=True, slots=True, kw_only=True)
class NonUTF8Text:
    """The first Login Response and every Text Response carry bytes that are not UTF-8."""

    kind: ClassVar[FaultKind] = FaultKind.NON_UTF8_TEXT


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitText:
    """Text Responses (and Login Responses if ``login``) are cut into ``chunk``-byte segments.

    Login Responses are always cut with C=1, the only way RFC 7143 allows; some initiators
    (libiscsi 1.19) cannot reassemble them, hence the separate switch.
    """

    kind: ClassVar[FaultKind] = FaultKind.SPLIT_TEXT
    chunk: int = 32
    style: SplitStyle = SplitStyle.CONTINUE
    login: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not 1 <= self.chunk <= 0xFFFFFF:
            raise LocalProtocolError(f"split-text chunk must be 1..16777215, got {self.chunk!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceUnavailable:
    """Every login fails with status 0x0301 (service unavailable: retry later or elsewhere)."""

    kind: ClassVar[FaultKind] = FaultKind.SERVICE_UNAVAILABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestsRequired:
    """The target insists on CRC32C digests (``header`` and/or ``data``), as some arrays do.

    It answers ``CRC32C`` to a HeaderDigest/DataDigest offer that contains it, and ``Reject``
    to one that does not (``None`` alone), and then uses the digest on the connection anyway
    from the first PDU after the final Login Response (RFC 7143 starts digests there), also
    when the initiator never sent the key: what it sends is CRC32C-protected, and what it
    receives without the digest is not understood (a 48-byte Logout without its 4 digest
    bytes is waited on, never answered).
    """

    kind: ClassVar[FaultKind] = FaultKind.DIGESTS_REQUIRED
    header: bool = True
    data: bool = True

    def __post_init__(self) -> None:
        if not (self.header or self.data):
            raise LocalProtocolError(
                "digests-required needs the header digest, the data one or both"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """The digest keys required: ``HeaderDigest``, ``DataDigest`` or both."""
        return (("HeaderDigest",) if self.header else ()) + (("DataDigest",) if self.data else ())


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectDigests:
    """HeaderDigest and DataDigest are answered ``Reject`` whatever is offered.

    The login goes on and the connection uses no digest (a rejected key keeps its default,
    None), unless :class:`DigestsRequired` is set too, which then decides what is used.
    """

    kind: ClassVar[FaultKind] = FaultKind.REJECT_DIGESTS


# ---------------------------------------------------------------------------------------------
# Faults chosen by the initiator's ISID, and SCSI faults

#: The IEEE OUI open-iscsi puts in the ISIDs of its sessions (bytes 0-2: ``00 02 3d``, then
#: the session number in byte 3 and zeros), so its ISIDs are OUI-format (T = 00).
OPEN_ISCSI_OUI: Final = 0x00023D
_OUI_LIMIT: Final = 1 << 22  # T=00 leaves 22 bits (A and B) for the OUI


@dataclass(frozen=True, slots=True, kw_only=True)
class IsidMatch:
    """Which sessions an ISID fault picks, by their ISID (RFC 7143 10.12.5).

    ``oui`` picks OUI-format ISIDs (T = 00) whose first three bytes are that OUI: by default
    open-iscsi's, 0x00023d, which the kernel initiator's sessions carry (libiscsi and this
    package's probes use random-format ISIDs, T = 10). ``oui=None`` picks random-format ISIDs
    instead.
    """

    oui: int | None = OPEN_ISCSI_OUI

    def __post_init__(self) -> None:
        oui: object = self.oui
        if oui is not None and (
            isinstance(oui, bool) or not isinstance(oui, int) or not 0 <= oui < _OUI_LIMIT
        ):
            raise LocalProtocolError(
                f"an OUI-format ISID holds an OUI below 0x400000 (T=00 takes the top two "
                f"bits), not {oui!r}"
            )

    def matches(self, isid: ISID) -> bool:
        if self.oui is None:
            return isid.t == 0b10
        return isid.t == 0b00 and (isid.a << 16 | isid.b) == self.oui

    def __str__(self) -> str:
        if self.oui is None:
            return "random"
        return "open-iscsi" if self.oui == OPEN_ISCSI_OUI else f"oui:0x{self.oui:06x}"

    @classmethod
    def parse(cls, text: str) -> IsidMatch:
        """``open-iscsi``, ``oui:0xHHHHHH`` or ``random``."""
        if text == "open-iscsi":
            return cls()
        if text == "random":
            return cls(oui=None)
        name, sep, value = text.partition(":")
        if name == "oui" and sep:
            try:
                return cls(oui=int(value, 16))
            except ValueError:
                pass
        raise LocalProtocolError(
            f"ISID match {text!r}: expected open-iscsi, oui:0xHHHHHH or random"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RefuseIsid:
    """Logins to a target whose ISID matches ``isid`` fail with 0x0202 (initiator not
    authorized): the kernel's login fails while a probe with a random ISID passes. Discovery
    sessions are not refused."""

    kind: ClassVar[FaultKind] = FaultKind.REFUSE_ISID
    isid: IsidMatch = IsidMatch()


def _check_lun_numbers(owner: str, luns: object) -> frozenset[int] | None:
    if luns is None:
        return None
    if not isinstance(luns, Iterable) or isinstance(luns, (str, bytes)):
        raise LocalProtocolError(f"{owner}: luns must be a set of LUN numbers, not {luns!r}")
    chosen = frozenset(luns)
    if not chosen:
        raise LocalProtocolError(f"{owner}: luns is empty; use None for every LUN")
    for lun in chosen:
        if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_FLAT_LUN:
            raise LocalProtocolError(f"{owner}: LUN must be 0..{MAX_FLAT_LUN}, not {lun!r}")
    return chosen


def _check_code(owner: str, name: str, value: object, high: int = 0xFF) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise LocalProtocolError(f"{owner}: {name} must be 0..0x{high:x}, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LunFault:
    """What every SCSI fault has: the LUNs it acts on (``None``: every LUN of the sessions it
    applies to, those through its portal or with its target)."""

    kind: ClassVar[FaultKind]
    luns: frozenset[int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "luns", _check_lun_numbers(self.kind.value, self.luns))

    def acts_on(self, lun: int) -> bool:
        return self.luns is None or lun in self.luns

    def at(self: _L, *luns: int) -> _L:
        """This fault acting on ``luns`` only: ``NotReady().at(1)`` is ``not-ready@1``."""
        return replace(self, luns=frozenset(luns))


_L = TypeVar("_L", bound=LunFault)


@dataclass(frozen=True, slots=True, kw_only=True)
class LunMissing(LunFault):
    """The LUN is not there: REPORT LUNS leaves it out, INQUIRY shows peripheral qualifier 3,
    everything else gets 05/25/00 (what a target with no LUN mapping for this path does)."""

    kind: ClassVar[FaultKind] = FaultKind.LUN_MISSING


@dataclass(frozen=True, slots=True, kw_only=True)
class HideFromIsid(LunFault):
    """:class:`LunMissing` for sessions whose ISID matches ``isid`` only (by default the
    kernel initiator's): the probe sees the LUN, the kernel's scan does not."""

    kind: ClassVar[FaultKind] = FaultKind.HIDE_FROM_ISID
    isid: IsidMatch = IsidMatch()


@dataclass(frozen=True, slots=True, kw_only=True)
class NotReady(LunFault):
    """CHECK CONDITION, NOT READY ``asc``/``ascq`` (default 04/03: manual intervention
    required, which the kernel does not wait out) for every command but INQUIRY, REPORT
    LUNS and REQUEST SENSE (which returns the sense as data)."""

    kind: ClassVar[FaultKind] = FaultKind.NOT_READY
    asc: int = 0x04
    ascq: int = 0x03

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        _check_code(self.kind.value, "ASC", self.asc)
        _check_code(self.kind.value, "ASCQ", self.ascq)


@dataclass(frozen=True, slots=True, kw_only=True)
class Standby(LunFault):
    """The path is in ALUA standby (SPC-4 5.16): NOT READY 04/0B (logical unit not
    accessible, target port in standby state) for everything but the commands a standby port
    serves (INQUIRY, REPORT LUNS, MODE SENSE, REQUEST SENSE, REPORT TARGET PORT GROUPS)."""

    kind: ClassVar[FaultKind] = FaultKind.STANDBY


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckCondition(LunFault):
    """CHECK CONDITION with ``key``/``asc``/``ascq`` (default HARDWARE ERROR 44/00: internal
    target failure) for every command but INQUIRY, REPORT LUNS and REQUEST SENSE: a LU that
    is there and broken."""

    kind: ClassVar[FaultKind] = FaultKind.CHECK_CONDITION
    key: SenseKey = SenseKey.HARDWARE_ERROR
    asc: int = 0x44
    ascq: int = 0x00

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        _check_code(self.kind.value, "sense key", self.key, 0xF)
        object.__setattr__(self, "key", SenseKey(self.key))
        _check_code(self.kind.value, "ASC", self.asc)
        _check_code(self.kind.value, "ASCQ", self.ascq)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitAttention(LunFault):
    """The first ``count`` commands of each session to the LUN, other than INQUIRY and
    REPORT LUNS, get CHECK CONDITION, UNIT ATTENTION ``asc``/``ascq`` (default 29/00: power
    on, reset or bus device reset occurred, what a new I_T nexus sees on many arrays); a
    REQUEST SENSE takes one as its data."""

    kind: ClassVar[FaultKind] = FaultKind.UNIT_ATTENTION
    count: int = 1
    asc: int = 0x29
    ascq: int = 0x00

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        count: object = self.count
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise LocalProtocolError(f"unit-attention count must be at least 1, not {count!r}")
        _check_code(self.kind.value, "ASC", self.asc)
        _check_code(self.kind.value, "ASCQ", self.ascq)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReservationConflict(LunFault):
    """Another initiator holds a reservation (an SPC-2 RESERVE): every command but INQUIRY,
    REPORT LUNS and REQUEST SENSE gets status RESERVATION CONFLICT."""

    kind: ClassVar[FaultKind] = FaultKind.RESERVATION_CONFLICT


@dataclass(frozen=True, slots=True, kw_only=True)
class OtherWwid(LunFault):
    """The LUN shows another identity (VPD 0x83 WWID and VPD 0x80 serial) over the same
    blocks: ``wwid`` (an NAA identifier, any spelling :func:`~.config.normalize_wwid`
    takes), or, unset, one derived from the target and the LUN that differs from its own."""

    kind: ClassVar[FaultKind] = FaultKind.OTHER_WWID
    wwid: str | None = None

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        if self.wwid is not None:
            # Imported here: config imports this module (a fault list is part of a config).
            from pyiscsi_failover.testing.config import normalize_wwid

            object.__setattr__(self, "wwid", normalize_wwid(self.wwid))


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowScsi(LunFault):
    """Each reply of the LUN leaves ``seconds`` after its command arrived (the server holds
    it, and what was queued after it); commands that arrive together are answered together."""

    kind: ClassVar[FaultKind] = FaultKind.SLOW_SCSI
    seconds: float

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        _check_seconds("slow-scsi", self.seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitDataIn(LunFault):
    """The LUN's read data goes out in Data-In PDUs of at most ``segment`` bytes (each
    burst still ends with F, the status still rides on the last)."""

    kind: ClassVar[FaultKind] = FaultKind.SPLIT_DATA_IN
    segment: int = 8

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        if isinstance(self.segment, bool) or not 1 <= self.segment <= 0xFFFFFF:
            raise LocalProtocolError(
                f"split-data-in segment must be 1..16777215 bytes, got {self.segment!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResidualOverflow(LunFault):
    """Every GOOD reply of the LUN claims ``excess`` bytes more than the Expected Data
    Transfer Length: the initiator gets its EDTL bytes (the real data, then zeros), with O set
    and a residual count of ``excess``."""

    kind: ClassVar[FaultKind] = FaultKind.RESIDUAL_OVERFLOW
    excess: int = 512

    def __post_init__(self) -> None:
        LunFault.__post_init__(self)
        if isinstance(self.excess, bool) or not 1 <= self.excess <= 0xFFFFFFFF:
            raise LocalProtocolError(
                f"residual-overflow excess must be 1..4294967295 bytes, got {self.excess!r}"
            )


ScsiFault: TypeAlias = (
    LunMissing
    | HideFromIsid
    | NotReady
    | Standby
    | CheckCondition
    | UnitAttention
    | ReservationConflict
    | OtherWwid
    | SlowScsi
    | SplitDataIn
    | ResidualOverflow
)


Fault: TypeAlias = (
    Refuse
    | Blackhole
    | Silent
    | ResetMidLogin
    | DelayPDUs
    | SlowDrip
    | MalformedPDU
    | OversizedPDU
    | WrongOpcode
    | WrongITT
    | Redirect
    | RedirectLoop
    | WrongChapResponse
    | ReflectChallenge
    | DowngradeToNone
    | GarbageKeyValues
    | NonUTF8Text
    | SplitText
    | ServiceUnavailable
    | DigestsRequired
    | RejectDigests
    | RefuseIsid
    | ScsiFault
)

_SIMPLE: dict[FaultKind, Fault] = {
    FaultKind.REFUSE: Refuse(),
    FaultKind.BLACKHOLE: Blackhole(),
    FaultKind.SILENT: Silent(),
    FaultKind.RESET_MID_LOGIN: ResetMidLogin(),
    FaultKind.MALFORMED_PDU: MalformedPDU(),
    FaultKind.WRONG_OPCODE: WrongOpcode(),
    FaultKind.WRONG_ITT: WrongITT(),
    FaultKind.WRONG_CHAP_RESPONSE: WrongChapResponse(),
    FaultKind.DOWNGRADE_TO_NONE: DowngradeToNone(),
    FaultKind.NON_UTF8_TEXT: NonUTF8Text(),
    FaultKind.SERVICE_UNAVAILABLE: ServiceUnavailable(),
    FaultKind.REJECT_DIGESTS: RejectDigests(),
    FaultKind.LUN_MISSING: LunMissing(),
    FaultKind.STANDBY: Standby(),
    FaultKind.RESERVATION_CONFLICT: ReservationConflict(),
}

_DIGEST_PARTS: dict[str, DigestsRequired] = {
    "both": DigestsRequired(),
    "header": DigestsRequired(data=False),
    "data": DigestsRequired(header=False),
}


def find_fault(faults: tuple[Fault, ...], kind: FaultKind) -> Fault | None:
    """The first fault of ``kind`` in ``faults``, or None."""
    for fault in faults:
        if fault.kind is kind:
            return fault
    return None


def _number(kind: FaultKind, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LocalProtocolError(f"{kind.value} needs a number of seconds, got {text!r}") from None


def _integer(kind: FaultKind, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise LocalProtocolError(f"{kind.value} needs an integer, got {text!r}") from None


def parse_fault(text: str) -> Fault:
    """Read a fault's command-line spelling.

    ``NAME`` for faults without parameters, and: ``delay:SECONDS``, ``slow-drip[:SECONDS]``,
    ``oversized-pdu[:LENGTH]``, ``redirect:ADDRESS`` / ``redirect-permanent:ADDRESS`` (ADDRESS
    is ``host:port[,tpgt]`` or a portal name), ``redirect-loop[:permanent]``,
    ``reflect-challenge[:0xHEX|:initiator-secret]``, ``garbage-key-values[:KEY,KEY...]``,
    ``split-text[:CHUNK[:continue|tgt[:login]]]``, ``digests-required[:header|data|both]``,
    ``refuse-isid[:MATCH]``. SCSI faults end in an optional ``@LUN[,LUN...]`` (default: every
    LUN): ``lun-missing``, ``hide-from-isid[:MATCH]``, ``not-ready[:ASC/ASCQ]``, ``standby``,
    ``check-condition[:KEY/ASC/ASCQ]``, ``unit-attention[:COUNT[:ASC/ASCQ]]``,
    ``reservation-conflict``, ``other-wwid[:WWID]``, ``slow-scsi:SECONDS``,
    ``split-data-in[:BYTES]``, ``residual-overflow[:BYTES]``; codes in hex, MATCH is
    ``open-iscsi`` (the default), ``oui:0xHHHHHH`` or ``random``.
    """
    body, at, luns = text.strip().partition("@")
    fault = _parse_body(body)
    if not at:
        return fault
    if not isinstance(fault, LunFault):
        raise LocalProtocolError(
            f"fault {fault.kind.value} does not act on LUNs: it takes no @LUN[,LUN...]"
        )
    return fault.at(*_parse_luns(fault.kind, luns))


def _parse_luns(kind: FaultKind, text: str) -> frozenset[int]:
    try:
        return frozenset(int(item) for item in text.split(","))
    except ValueError:
        raise LocalProtocolError(
            f"{kind.value}@{text}: expected @LUN[,LUN...] with decimal LUN numbers"
        ) from None


_CODE: Final = re.compile(r"[0-9a-f]{1,2}", re.IGNORECASE)


def _codes(kind: FaultKind, text: str, count: int, spelling: str) -> list[int]:
    """``count`` hex codes separated by ``/`` (sense key, ASC, ASCQ)."""
    parts = text.split("/")
    if len(parts) != count or not all(_CODE.fullmatch(part) for part in parts):
        raise LocalProtocolError(f"{kind.value}:{text}: expected {spelling} in hex")
    return [int(part, 16) for part in parts]


def _parse_scsi(kind: FaultKind, sep: str, arg: str) -> Fault:
    """The SCSI and ISID faults that take parameters (without their @LUNS)."""
    match kind:
        case FaultKind.REFUSE_ISID:
            return RefuseIsid(isid=IsidMatch.parse(arg)) if sep else RefuseIsid()
        case FaultKind.HIDE_FROM_ISID:
            return HideFromIsid(isid=IsidMatch.parse(arg)) if sep else HideFromIsid()
        case FaultKind.NOT_READY:
            if not sep:
                return NotReady()
            asc, ascq = _codes(kind, arg, 2, "ASC/ASCQ")
            return NotReady(asc=asc, ascq=ascq)
        case FaultKind.CHECK_CONDITION:
            if not sep:
                return CheckCondition()
            key, asc, ascq = _codes(kind, arg, 3, "KEY/ASC/ASCQ")
            return CheckCondition(key=SenseKey(key & 0xF), asc=asc, ascq=ascq)
        case FaultKind.UNIT_ATTENTION:
            if not sep:
                return UnitAttention()
            count_text, sep2, codes = arg.partition(":")
            if not sep2:
                return UnitAttention(count=_integer(kind, count_text))
            asc, ascq = _codes(kind, codes, 2, "ASC/ASCQ")
            return UnitAttention(count=_integer(kind, count_text), asc=asc, ascq=ascq)
        case FaultKind.OTHER_WWID:
            return OtherWwid(wwid=arg) if sep else OtherWwid()
        case FaultKind.SLOW_SCSI:
            if not sep:
                raise LocalProtocolError("slow-scsi needs seconds: slow-scsi:SECONDS")
            return SlowScsi(seconds=_number(kind, arg))
        case FaultKind.SPLIT_DATA_IN:
            return SplitDataIn(segment=_integer(kind, arg)) if sep else SplitDataIn()
        case FaultKind.RESIDUAL_OVERFLOW:
            return ResidualOverflow(excess=_integer(kind, arg)) if sep else ResidualOverflow()
    raise LocalProtocolError(f"fault {kind.value} cannot be parsed")  # pragma: no cover


def _parse_body(text: str) -> Fault:
    name, sep, arg = text.strip().partition(":")
    permanent = False
    if name == "redirect-permanent":
        name, permanent = "redirect", True
    try:
        kind = FaultKind(name)
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise LocalProtocolError(f"unknown fault {name!r}; known faults: {known}") from None
    if kind in _SIMPLE:
        if sep:
            raise LocalProtocolError(f"fault {kind.value} takes no parameter")
        return _SIMPLE[kind]
    match kind:
        case FaultKind.DELAY:
            if not sep:
                raise LocalProtocolError("delay needs seconds: delay:SECONDS")
            return DelayPDUs(seconds=_number(kind, arg))
        case FaultKind.SLOW_DRIP:
            return SlowDrip(interval=_number(kind, arg)) if sep else SlowDrip()
        case FaultKind.OVERSIZED_PDU:
            return OversizedPDU(length=_integer(kind, arg)) if sep else OversizedPDU()
        case FaultKind.REDIRECT:
            if not arg:
                raise LocalProtocolError("redirect needs an address: redirect:HOST:PORT[,TPGT]")
            return Redirect(to=arg, permanent=permanent)
        case FaultKind.REDIRECT_LOOP:
            if sep and arg not in ("permanent", "temporary"):
                raise LocalProtocolError("redirect-loop takes 'permanent' or 'temporary'")
            return RedirectLoop(permanent=arg == "permanent")
        case FaultKind.REFLECT_CHALLENGE:
            if not sep:
                return ReflectChallenge()
            if arg == "initiator-secret":
                return ReflectChallenge(initiator_secret=True)
            hex_digits = arg[2:] if arg[:2].lower() == "0x" else arg
            try:
                challenge = bytes.fromhex(hex_digits)
            except ValueError:
                raise LocalProtocolError("reflect-challenge needs 0x followed by hex") from None
            return ReflectChallenge(challenge=challenge)
        case FaultKind.GARBAGE_KEY_VALUES:
            if not sep:
                return GarbageKeyValues()
            return GarbageKeyValues(keys=tuple(k for k in arg.split(",") if k))
        case FaultKind.SPLIT_TEXT:
            if not sep:
                return SplitText()
            chunk_text, sep2, rest = arg.partition(":")
            style_text, sep3, login_text = rest.partition(":")
            try:
                style = SplitStyle(style_text) if sep2 else SplitStyle.CONTINUE
            except ValueError:
                raise LocalProtocolError("split-text style must be 'continue' or 'tgt'") from None
            if sep3 and login_text != "login":
                raise LocalProtocolError("split-text takes ':login' after the style, or nothing")
            return SplitText(chunk=_integer(kind, chunk_text), style=style, login=bool(sep3))
        case FaultKind.DIGESTS_REQUIRED:
            if not sep:
                return DigestsRequired()
            if arg not in _DIGEST_PARTS:
                raise LocalProtocolError("digests-required takes 'header', 'data' or 'both'")
            return _DIGEST_PARTS[arg]
    return _parse_scsi(kind, sep, arg)


def format_fault(fault: Fault) -> str:
    """The command-line spelling of ``fault`` (the inverse of :func:`parse_fault`)."""
    text = _format_body(fault)
    if isinstance(fault, LunFault) and fault.luns is not None:
        text += "@" + ",".join(str(lun) for lun in sorted(fault.luns))
    return text


def _format_body(fault: Fault) -> str:
    match fault:
        case DelayPDUs(seconds=seconds):
            return f"delay:{seconds:g}"
        case SlowDrip(interval=interval):
            return f"slow-drip:{interval:g}"
        case OversizedPDU(length=length):
            return f"oversized-pdu:{length}"
        case Redirect(to=to, permanent=permanent):
            return f"{'redirect-permanent' if permanent else 'redirect'}:{to}"
        case RedirectLoop(permanent=permanent):
            return f"redirect-loop:{'permanent' if permanent else 'temporary'}"
        case ReflectChallenge(initiator_secret=True):
            return "reflect-challenge:initiator-secret"
        case ReflectChallenge(challenge=challenge):
            return "reflect-challenge" + ("" if challenge is None else f":0x{challenge.hex()}")
        case GarbageKeyValues(keys=keys):
            return "garbage-key-values:" + ",".join(keys)
        case SplitText(chunk=chunk, style=style, login=login):
            return f"split-text:{chunk}:{style.value}" + (":login" if login else "")
        case DigestsRequired(header=header, data=data):
            part = "both" if header and data else ("header" if header else "data")
            return f"digests-required:{part}"
        case RefuseIsid(isid=isid) | HideFromIsid(isid=isid):
            return f"{fault.kind.value}:{isid}"
        case NotReady(asc=asc, ascq=ascq):
            return f"not-ready:{asc:02x}/{ascq:02x}"
        case CheckCondition(key=key, asc=asc, ascq=ascq):
            return f"check-condition:{key:x}/{asc:02x}/{ascq:02x}"
        case UnitAttention(count=count, asc=asc, ascq=ascq):
            return f"unit-attention:{count}:{asc:02x}/{ascq:02x}"
        case OtherWwid(wwid=wwid):
            return "other-wwid" + ("" if wwid is None else f":naa.{wwid}")
        case SlowScsi(seconds=seconds):
            return f"slow-scsi:{seconds:g}"
        case SplitDataIn(segment=segment):
            return f"split-data-in:{segment}"
        case ResidualOverflow(excess=excess):
            return f"residual-overflow:{excess}"
    return fault.kind.value
