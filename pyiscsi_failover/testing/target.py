"""The target side of iSCSI login, discovery, logout and SCSI, as a sans-IO state machine.

This is what our scriptable test target speaks on each TCP connection. It follows h11's shape:
the caller feeds received bytes to :meth:`TargetConnection.receive_data` (``b""`` for EOF), sends
whatever :meth:`TargetConnection.data_to_send` returns, reads what happened from
:meth:`TargetConnection.next_event`, and closes the socket once :attr:`TargetConnection.closed`
is true (with an RST when :attr:`TargetConnection.abort` is). It knows nothing of sockets or time:
the timing faults (silent, delay, slow drip) and the socket faults (refuse, blackhole) belong to
:mod:`pyiscsi_failover.testing.server`, and so does the waiting a slow SCSI reply asks for:
:meth:`TargetConnection.output` puts a :class:`Hold` before it, which the server honours.

What it implements, deliberately a small and strict subset of RFC 7143:

* Login: SecurityNegotiation with ``AuthMethod=None`` or CHAP (one-way or mutual, any
  algorithm, via :class:`~pyiscsi_failover.protocol.chap.ChapAuthenticator`), then
  LoginOperationalNegotiation answering each operational key by its result function (digests:
  the first of the initiator's list that :attr:`TargetConfig.digests` accepts, unless a digest
  fault decides; CRC32C digests start with the first PDU after the final response), declaring
  MaxRecvDataSegmentLength, answering unknown keys ``NotUnderstood``; TargetPortalGroupTag in
  the first response; TSIH on success; Login Requests and Responses split with C=1 both ways.
* Full feature phase: Text ``SendTargets`` (``All`` in Discovery sessions, ``<iqn>`` or empty in
  Normal ones) listing every portal that serves each target, split over several Text Responses
  with F=0 and a TTT when large or when :class:`~.faults.SplitText` asks; NOP-Out answered with
  NOP-In; Logout answered and the connection closed.
* SCSI, in Normal sessions: SCSI Commands, Data-Out and Task Management requests go, after
  their CmdSN and ExpStatSN are checked here, to the session's
  :class:`~.scsi_session.ScsiSession`, which runs them on the target's logical units
  (:mod:`.logical_unit`) and answers with Data-In, R2T, SCSI Response or Task Management
  Response. The session's LUN table is built at login with the portal's and the target's
  SCSI faults (:mod:`.scsi_faults`). A SCSI Command the codec refuses (a field RFC 7143
  forbids) gets Reject "protocol error" and the session goes on; in a Discovery session so do
  all three.
* Opcodes an initiator may send but this target does not implement (SNACK, vendor-specific
  0x1c-0x1e) get a Reject "command not supported" (0x05) carrying their header, and the
  connection goes on; a Login Request or a target's PDU (NOP-In, Text Response...) gets Reject
  "protocol error"; any other opcode, or bytes that are no PDU, close the connection.
* Operational keys: each gets the RFC 7143 result of the initiator's value and the target's
  (:class:`TargetConfig` chooses InitialR2T, ImmediateData, FirstBurstLength and
  MaxBurstLength; the rest are the RFC defaults, with MaxConnections=1, ErrorRecoveryLevel=0).
* Status codes: 0x0203 unknown target, 0x0201 authentication failure, 0x0202 initiator not in
  the target's ACL or refused by its ISID (``refuse-isid``), 0x0101/0x0102 redirect, 0x0301
  service unavailable, 0x0207 missing parameter, 0x0209 session type, 0x0205 version, 0x020a
  TSIH, 0x020b bad PDU during login.

Mistakes of the initiator that a lenient target would let pass (a changed CmdSN, an ExpStatSN
ahead of what was sent...) are reported as :class:`ProtocolViolation` events, so tests can assert
that none happened.

Configuration (:class:`TargetConfig` and friends) lives in :mod:`.config`; its names are
re-exported here for code that imported them from this module.

Sans-IO: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import contextlib
import enum
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

from pyiscsi_failover.errors import (
    InvalidName,
    ISCSIError,
    LocalProtocolError,
    PDUDecodeError,
    TextError,
)
from pyiscsi_failover.names import Portal, validate_iscsi_name
from pyiscsi_failover.protocol.chap import (
    ChapAuthenticator,
    chap_response,
)
from pyiscsi_failover.protocol.digest import DIGEST_LENGTH, crc32c
from pyiscsi_failover.protocol.negotiation import Digest, SessionType
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Opcode,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiDataIn,
    ScsiResponse,
    Stage,
    StatusClass,
    TextRequest,
    TextResponse,
)
from pyiscsi_failover.protocol.sendtargets import DiscoveredTarget, format_send_targets
from pyiscsi_failover.protocol.text import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    SPECIAL_VALUES,
    TextReassembler,
    decode_keys,
    encode_text,
    format_binary,
    format_boolean,
    parse_binary,
    parse_boolean,
    parse_number,
)
from pyiscsi_failover.protocol.wire import BHS_LENGTH, decode_pdu, encode_pdu, pdu_length
from pyiscsi_failover.testing.config import (
    DEFAULT_TPGT,
    ChapSettings,
    PortalConfig,
    TargetConfig,
    TargetSpec,
)
from pyiscsi_failover.testing.faults import (
    DigestsRequired,
    DowngradeToNone,
    Fault,
    FaultKind,
    FaultLayer,
    GarbageKeyValues,
    MalformedPDU,
    NonUTF8Text,
    OversizedPDU,
    Redirect,
    RedirectLoop,
    ReflectChallenge,
    RefuseIsid,
    SplitStyle,
    SplitText,
    WrongChapResponse,
    WrongITT,
    WrongOpcode,
    find_fault,
)
from pyiscsi_failover.testing.logical_unit import LogicalUnits, Nexus
from pyiscsi_failover.testing.scsi_faults import session_luns
from pyiscsi_failover.testing.scsi_session import (
    ScsiAnswered,
    ScsiSession,
    SessionParams,
    TaskManagementAnswered,
)
from pyiscsi_failover.testing.task_pdus import (
    DATA_OUT,
    TASK_MANAGEMENT_REQUEST,
    DataOut,
    TaskManagementRequest,
)

__all__ = [
    "DEFAULT_TPGT",
    "LOGIN_SEGMENT_LIMIT",
    "ChallengeReceived",
    "ChapSettings",
    "ConnectionState",
    "Event",
    "FaultInjected",
    "Hold",
    "LoginFinished",
    "LogoutReceived",
    "NopAnswered",
    "PeerClosed",
    "PortalConfig",
    "ProtocolViolation",
    "Rejected",
    "ScsiAnswered",
    "SendTargetsAnswered",
    "SessionType",
    "TargetConfig",
    "TargetConnection",
    "TargetSpec",
    "TaskManagementAnswered",
]

#: RFC 7143: until MaxRecvDataSegmentLength is negotiated, no data segment exceeds this.
LOGIN_SEGMENT_LIMIT = 8192
_MAX_24BIT = 0xFFFFFF
_SERIAL_MASK = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# States and events


class ConnectionState(enum.IntEnum):
    """Where one connection stands. Values only grow, except CHAP going back to nothing."""

    #: Nothing received yet.
    FREE = 0
    #: SecurityNegotiation; no AuthMethod agreed yet.
    SECURITY_NEGOTIATION = 1
    #: AuthMethod=CHAP agreed; waiting for CHAP_A.
    CHAP_ALGORITHM = 2
    #: Challenge sent; waiting for CHAP_N/CHAP_R.
    CHAP_RESPONSE = 3
    #: Authentication done (or none needed); waiting for the initiator to leave stage 0.
    AUTHENTICATED = 4
    #: LoginOperationalNegotiation.
    OPERATIONAL_NEGOTIATION = 5
    #: Logged in.
    FULL_FEATURE = 6
    #: Logout answered; close after sending.
    LOGGED_OUT = 7
    #: A failed login's response is queued; close after sending.
    LOGIN_FAILED = 8
    #: A fault made the exchange meaningless; say nothing more, wait for the initiator to close.
    BROKEN = 9
    #: The peer closed, or sent bytes that are not a PDU.
    CLOSED = 10


_LOGIN_STATES = frozenset(
    {
        ConnectionState.FREE,
        ConnectionState.SECURITY_NEGOTIATION,
        ConnectionState.CHAP_ALGORITHM,
        ConnectionState.CHAP_RESPONSE,
        ConnectionState.AUTHENTICATED,
        ConnectionState.OPERATIONAL_NEGOTIATION,
    }
)
_SECURITY_STATES = _LOGIN_STATES - {ConnectionState.FREE, ConnectionState.OPERATIONAL_NEGOTIATION}
_FINISHED_STATES = frozenset(
    {
        ConnectionState.LOGGED_OUT,
        ConnectionState.LOGIN_FAILED,
        ConnectionState.BROKEN,
        ConnectionState.CLOSED,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginFinished:
    """A login ended, successfully or not (``status``); ``tsih`` is 0 unless it succeeded."""

    initiator_name: str | None
    isid: ISID | None
    session_type: SessionType | None
    target_name: str | None
    status: LoginStatus
    tsih: int = 0
    auth_method: str | None = None
    chap_username: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is LoginStatus.SUCCESS


@dataclass(frozen=True, slots=True, kw_only=True)
class ChallengeReceived:
    """The initiator sent its own CHAP_C (mutual CHAP); kept by the server for reflection."""

    challenge: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SendTargetsAnswered:
    """A SendTargets query was answered with ``targets`` in ``pdus`` Text Responses."""

    query: str
    targets: tuple[str, ...]
    pdus: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NopAnswered:
    itt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutReceived:
    reason: LogoutReason


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInjected:
    kind: FaultKind


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolViolation:
    """The initiator did something RFC 7143 forbids; the target carried on or gave up."""

    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A PDU was answered with Reject."""

    reason: RejectReason
    pdu_type: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """In :meth:`TargetConnection.output`: send what follows no earlier than ``seconds`` after
    the bytes that produced it were received (a slow SCSI reply)."""

    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerClosed:
    """The initiator closed the connection; ``session_open`` if it never logged out."""

    session_open: bool


Event: TypeAlias = (
    LoginFinished
    | ChallengeReceived
    | SendTargetsAnswered
    | NopAnswered
    | LogoutReceived
    | FaultInjected
    | ProtocolViolation
    | Rejected
    | PeerClosed
    | ScsiAnswered
    | TaskManagementAnswered
)

# ---------------------------------------------------------------------------------------------
# Operational keys, target side: (function, default target value, low, high, irrelevant in
# discovery). The target's own preferences are the RFC defaults, except MaxConnections=1 and
# ErrorRecoveryLevel=0, which is all this target does.

_MIN, _MAX, _OR, _AND = "min", "max", "or", "and"
_NUMERIC_KEYS: dict[str, tuple[str, int, int, int, bool]] = {
    "MaxConnections": (_MIN, 1, 1, 65535, True),
    "MaxBurstLength": (_MIN, 262144, 512, _MAX_24BIT, True),
    "FirstBurstLength": (_MIN, 65536, 512, _MAX_24BIT, True),
    "DefaultTime2Wait": (_MAX, 2, 0, 3600, False),
    "DefaultTime2Retain": (_MIN, 20, 0, 3600, False),
    "MaxOutstandingR2T": (_MIN, 1, 1, 65535, True),
    "ErrorRecoveryLevel": (_MIN, 0, 0, 2, False),
}
_BOOLEAN_KEYS: dict[str, tuple[str, bool, bool]] = {
    "InitialR2T": (_OR, True, True),
    "ImmediateData": (_AND, True, True),
    "DataPDUInOrder": (_OR, True, True),
    "DataSequenceInOrder": (_OR, True, True),
}
# RFC 7143 section 13.25: the marker keys are obsolete and answered with Reject.
_OBSOLETE_KEYS = frozenset({"IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"})
_IDENTITY_KEYS = frozenset({"InitiatorName", "InitiatorAlias", "SessionType", "TargetName"})
_SECURITY_KEYS = frozenset({"AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})
# Keys that may be renegotiated in full feature phase (RFC 7143 "Use: ALL").
_FFP_KEYS = frozenset({"MaxRecvDataSegmentLength"})
_DIGEST_KEYS = frozenset({"HeaderDigest", "DataDigest"})

# A byte string that is not UTF-8 (0xff never occurs in UTF-8), for NON_UTF8_TEXT.
_NON_UTF8_PAIR = b"TargetAlias=\xff\xfe\xfd\x00"


def _serial_ahead(value: int, reference: int) -> bool:
    """RFC 1982 serial arithmetic: ``value`` is after ``reference``."""
    distance = (value - reference) & _SERIAL_MASK
    return 0 < distance < 0x80000000


def _chunks(data: bytes, size: int) -> list[bytes]:
    if not data:
        return [b""]
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass(slots=True)
class _PendingText:
    """The rest of a Text answer waiting for the initiator's empty continuation requests."""

    itt: int
    ttt: int
    chunks: deque[bytes]
    continued: bool  # C=1 on the non-final PDUs
    query: str | None
    targets: tuple[str, ...]
    pdus: int


@dataclass(slots=True)
class _PendingLogin:
    """The rest of a Login Response sent with C=1."""

    chunks: deque[bytes]
    transit: bool
    csg: Stage
    nsg: Stage
    tsih: int


@dataclass(slots=True)
class _Identity:
    initiator_name: str | None = None
    session_type: SessionType | None = None
    target_name: str | None = None
    isid: ISID | None = None
    auth_method: str | None = None
    chap_username: str | None = None


#: Opcodes an initiator may send (RFC 7143 section 11.1) that this target does not implement,
#: by name. In full feature phase they are answered with Reject "command not supported" and the
#: connection goes on; the codec does not know them, so :class:`_Inbox` frames them itself.
_UNSUPPORTED_OPCODES: dict[int, str] = {
    0x10: "SNACK Request",
    0x1C: "vendor-specific request 0x1c",
    0x1D: "vendor-specific request 0x1d",
    0x1E: "vendor-specific request 0x1e",
}
#: The SCSI task opcodes, also framed by :class:`_Inbox`: the codec knows no Data-Out or Task
#: Management Request yet (see :mod:`.task_pdus`), and a SCSI Command whose fields the codec
#: refuses must still be answered (with a Reject), never end the connection.
_TASK_OPCODES: dict[int, str] = {
    0x01: "SCSI Command",
    TASK_MANAGEMENT_REQUEST: "SCSI Task Management Function Request",
    DATA_OUT: "SCSI Data-Out",
}
_FRAMED_OPCODES: dict[int, str] = {**_TASK_OPCODES, **_UNSUPPORTED_OPCODES}
#: Those that carry CmdSN (bytes 24-27) and may be immediate; all carry ExpStatSN (28-31).
_COMMAND_OPCODES = frozenset({0x01, TASK_MANAGEMENT_REQUEST})
_KNOWN_OPCODES = frozenset(int(opcode) for opcode in Opcode)
_OPCODE_MASK = 0x3F
_IMMEDIATE_BIT = 0x40


@dataclass(frozen=True, slots=True)
class _Framed:
    """A whole PDU framed by the target itself (digests checked), of :data:`_FRAMED_OPCODES`."""

    raw: bytes  # the whole PDU, digests included
    data_at: int
    data_length: int

    @property
    def header(self) -> bytes:
        """The 48-byte BHS, as received."""
        return self.raw[:BHS_LENGTH]

    @property
    def data(self) -> bytes:
        return self.raw[self.data_at : self.data_at + self.data_length]

    @property
    def opcode(self) -> int:
        return self.raw[0] & _OPCODE_MASK

    @property
    def name(self) -> str:
        return _FRAMED_OPCODES[self.opcode]

    @property
    def immediate(self) -> bool:
        return bool(self.raw[0] & _IMMEDIATE_BIT)

    def field(self, offset: int) -> int:
        return int.from_bytes(self.raw[offset : offset + 4], "big")


class _Inbox:
    """The target's receive buffer: bytes in, whole PDUs out, like :class:`PDUBuffer`.

    It differs in one way: a PDU with an opcode of :data:`_FRAMED_OPCODES` comes out as a
    :class:`_Framed` (framed from its BHS lengths, digests checked) for the target to read or
    reject, so that a field the codec would refuse never fails the stream. Any other decode
    error is final, as there: PDU boundaries are lost.
    """

    __slots__ = ("_buffer", "_start", "data_digest", "header_digest", "max_data_segment_length")

    def __init__(self, *, max_data_segment_length: int) -> None:
        self._buffer = bytearray()
        self._start = 0
        self.max_data_segment_length = max_data_segment_length
        self.header_digest = False
        self.data_digest = False

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_pdu(self) -> PDU | _Framed | None:
        """The next whole PDU, or None until more bytes arrive; PDUDecodeError for garbage."""
        start = self._start
        if len(self._buffer) - start < BHS_LENGTH:
            return None
        bhs = bytes(self._buffer[start : start + BHS_LENGTH])
        framed = bhs[0] & _OPCODE_MASK in _FRAMED_OPCODES
        if framed:
            total, data_at, data_length = self._layout(bhs)
        else:
            total = pdu_length(
                bhs,
                header_digest=self.header_digest,
                data_digest=self.data_digest,
                max_data_segment_length=self.max_data_segment_length,
            )
        if len(self._buffer) - start < total:
            return None
        raw = bytes(self._buffer[start : start + total])
        self._start += total
        if self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
        if framed:
            self._check_digests(raw, data_at, data_length)
            return _Framed(raw=raw, data_at=data_at, data_length=data_length)
        return decode_pdu(
            raw,
            header_digest=self.header_digest,
            data_digest=self.data_digest,
            max_data_segment_length=self.max_data_segment_length,
        )

    def _layout(self, bhs: bytes) -> tuple[int, int, int]:
        """(total length, where the data starts, DataSegmentLength) of a PDU the codec lacks."""
        data_length = int.from_bytes(bhs[5:8], "big")
        if data_length > self.max_data_segment_length:
            raise PDUDecodeError(
                f"DataSegmentLength: {data_length} exceeds the limit of "
                f"{self.max_data_segment_length} bytes",
                field="DataSegmentLength",
                offset=5,
                value=data_length,
            )
        data_at = BHS_LENGTH + bhs[4] * 4 + (DIGEST_LENGTH if self.header_digest else 0)
        total = data_at + data_length + -data_length % 4
        if self.data_digest and data_length:
            total += DIGEST_LENGTH
        return total, data_at, data_length

    def _check_digests(self, raw: bytes, data_at: int, data_length: int) -> None:
        if self.header_digest:
            at = data_at - DIGEST_LENGTH
            if raw[at:data_at] != crc32c(raw[:at]):
                raise PDUDecodeError(
                    f"HeaderDigest at byte {at}: wrong CRC32C",
                    field="HeaderDigest",
                    offset=at,
                    value=raw[at:data_at],
                )
        if self.data_digest and data_length:
            at = len(raw) - DIGEST_LENGTH
            if raw[at:] != crc32c(raw[data_at:at]):
                raise PDUDecodeError(
                    f"DataDigest at byte {at}: wrong CRC32C",
                    field="DataDigest",
                    offset=at,
                    value=raw[at:],
                )


class TargetConnection:
    """One connection of the test target: bytes in, bytes and events out.

    ``portal`` is the address the connection arrived at (it picks the portal's faults and
    tpgt). ``tsih`` is the session handle to assign if the login succeeds. ``seen_challenges``
    is a live sequence of mutual-CHAP challenges initiators sent on earlier connections, which
    :class:`~.faults.ReflectChallenge` replays. ``token_bytes`` is the random source for CHAP.
    ``logical_units`` holds the LUs every connection of the target shares (the server passes
    one for all); without it, the connection makes in-memory LUs of its own when a Normal
    session logs in, and refuses at once a configuration with backing files.
    """

    def __init__(
        self,
        config: TargetConfig,
        *,
        portal: Portal,
        tsih: int = 1,
        initial_statsn: int = 0x1000,
        seen_challenges: Sequence[bytes] = (),
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        logical_units: LogicalUnits | None = None,
    ) -> None:
        if not 1 <= tsih <= 0xFFFF:
            raise LocalProtocolError(f"tsih must be 1..65535, not {tsih}")
        if logical_units is None and any(
            spec.backing is not None for target in config.targets for spec in target.logical_units
        ):
            raise LocalProtocolError(
                "LUNs with backing files need the LogicalUnits the server opens"
            )
        self._logical_units = logical_units
        self._config = config
        self._portal_config = config.portal_at(portal)
        self._portal = self._portal_config.portal
        self._tsih = tsih
        self._seen_challenges = seen_challenges
        self._token_bytes = token_bytes
        self._faults: tuple[Fault, ...] = tuple(
            fault for fault in self._portal_config.faults if fault.kind.layer is FaultLayer.PROTOCOL
        )
        self._buffer = _Inbox(max_data_segment_length=LOGIN_SEGMENT_LIMIT)
        self._outgoing: deque[bytes | Hold] = deque()
        self._events: deque[Event] = deque()
        self._state = ConnectionState.FREE
        self._abort = False
        self._identity = _Identity()
        self._target: TargetSpec | None = None
        self._chap: ChapSettings = config.discovery_chap
        self._authenticator: ChapAuthenticator | None = None
        # Sequence numbers (RFC 1982 serial arithmetic, 32 bits).
        self._statsn = initial_statsn & _SERIAL_MASK
        self._expcmdsn = 0
        self._login_cmdsn: int | None = None
        self._login_itt = RESERVED_TAG
        self._responses_sent = 0
        self._login_text = TextReassembler()
        self._pending_login: _PendingLogin | None = None
        self._identified = False
        self._declared_mrdsl = False
        # Negotiated results.
        self._digest_choice: dict[str, str] = {}
        self._injected_once: set[FaultKind] = set()
        self._header_digest = False
        self._data_digest = False
        self._peer_mrdsl = LOGIN_SEGMENT_LIMIT
        self._negotiated: dict[str, int | bool] = {}
        # SCSI, once a Normal session is logged in.
        self._scsi: ScsiSession | None = None
        # Text exchanges in full feature phase.
        self._text_in = TextReassembler()
        self._text_in_tag: tuple[int, int] | None = None  # (itt, ttt) of a C=1 request
        self._pending_text: _PendingText | None = None
        self._next_ttt = 0x100

    # -- public surface --------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"TargetConnection(portal={self._portal}, state={self._state.name})"

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def closed(self) -> bool:
        """True once the connection should be closed (after sending :meth:`data_to_send`)."""
        return self._abort or self._state in (
            ConnectionState.LOGGED_OUT,
            ConnectionState.LOGIN_FAILED,
            ConnectionState.CLOSED,
        )

    @property
    def abort(self) -> bool:
        """True when the connection must be reset (SO_LINGER 0) rather than closed."""
        return self._abort

    @property
    def portal(self) -> Portal:
        return self._portal

    @property
    def portal_name(self) -> str:
        return self._portal_config.name

    @property
    def initiator_name(self) -> str | None:
        return self._identity.initiator_name

    @property
    def target_name(self) -> str | None:
        return self._identity.target_name

    @property
    def session_type(self) -> SessionType | None:
        return self._identity.session_type

    @property
    def isid(self) -> ISID | None:
        return self._identity.isid

    @property
    def peer_max_recv_data_segment_length(self) -> int:
        """What the initiator declared it can receive (8192 until it declares)."""
        return self._peer_mrdsl

    @property
    def scsi(self) -> ScsiSession | None:
        """The SCSI side of a logged-in Normal session (None before login and in Discovery)."""
        return self._scsi

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet a whole PDU (e.g. one still waiting for its digest)."""
        return self._buffer.buffered

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the initiator; ``b""`` means it closed its side."""
        if self._state is ConnectionState.CLOSED:
            return
        if not data:
            self._events.append(
                PeerClosed(session_open=self._state is ConnectionState.FULL_FEATURE)
            )
            self._state = ConnectionState.CLOSED
            return
        if self._abort or self._state in _FINISHED_STATES:
            return  # closing, or a fault made us deaf: input no longer matters
        self._buffer.feed(data)
        while not self._abort and self._state not in _FINISHED_STATES:
            try:
                pdu = self._buffer.next_pdu()
            except PDUDecodeError as exc:
                self._violation(f"bytes that are not a PDU: {exc}")
                self._state = ConnectionState.CLOSED
                return
            if pdu is None:
                return
            if isinstance(pdu, _Framed):
                self._on_framed(pdu)
            else:
                self._dispatch(pdu)

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Every byte queued for the initiator, in order (and forget them)."""
        return b"".join(self.pdus_to_send())

    def pdus_to_send(self) -> list[bytes]:
        """The queued bytes one PDU per item, for a server that paces PDUs (DELAY), without
        the holds of :meth:`output` (sent at once)."""
        return [item for item in self.output() if not isinstance(item, Hold)]

    def output(self) -> list[bytes | Hold]:
        """The queued PDUs, with a :class:`Hold` where a slow SCSI reply must wait (and
        forget them): what the server sends."""
        items = list(self._outgoing)
        self._outgoing.clear()
        return items

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, pdu: PDU) -> None:
        state = self._state
        if state in _LOGIN_STATES:
            if isinstance(pdu, LoginRequest):
                self._on_login(pdu)
            else:
                self._on_unexpected_during_login(type(pdu).__name__)
            return
        assert state is ConnectionState.FULL_FEATURE
        match pdu:
            case TextRequest():
                self._on_text(pdu)
            case NopOut():
                self._on_nop(pdu)
            case LogoutRequest():
                self._on_logout(pdu)
            case _:
                self._reject(pdu, RejectReason.PROTOCOL_ERROR)

    # -- helpers ---------------------------------------------------------------------------

    def _violation(self, description: str) -> None:
        self._events.append(ProtocolViolation(description=description))

    def _inject(self, kind: FaultKind) -> None:
        self._events.append(FaultInjected(kind=kind))

    def _inject_once(self, kind: FaultKind) -> None:
        """For faults that shape the whole connection: one FaultInjected however often used."""
        if kind not in self._injected_once:
            self._injected_once.add(kind)
            self._inject(kind)

    def _fault(self, kind: FaultKind) -> Fault | None:
        return find_fault(self._faults, kind)

    def _take_statsn(self) -> int:
        statsn = self._statsn
        self._statsn = (statsn + 1) & _SERIAL_MASK
        return statsn

    @property
    def _maxcmdsn(self) -> int:
        return (self._expcmdsn + self._config.cmd_window - 1) & _SERIAL_MASK

    def _queue(self, pdu: PDU, *, digests: bool = True) -> None:
        self._outgoing.append(
            encode_pdu(
                pdu,
                header_digest=digests and self._header_digest,
                data_digest=digests and self._data_digest,
            )
        )

    def _text_bytes(self, pairs: list[tuple[str, str]]) -> bytes:
        garbage = self._fault(FaultKind.GARBAGE_KEY_VALUES)
        if isinstance(garbage, GarbageKeyValues):
            hit = [key for key, _ in pairs if key in garbage.keys]
            if hit:
                self._inject(FaultKind.GARBAGE_KEY_VALUES)
                pairs = [(k, garbage.value if k in garbage.keys else v) for k, v in pairs]
        return encode_text(pairs)

    def _check_cmdsn(self, cmdsn: int, *, immediate: bool, what: str) -> None:
        if cmdsn != self._expcmdsn:
            self._violation(f"{what} carries CmdSN {cmdsn}, expected {self._expcmdsn}")
        if not immediate:
            self._expcmdsn = (cmdsn + 1) & _SERIAL_MASK

    def _check_expstatsn(self, expstatsn: int, what: str) -> None:
        if _serial_ahead(expstatsn, self._statsn):
            self._violation(
                f"{what} acknowledges StatSN {expstatsn}, but only up to {self._statsn} was due"
            )

    # -- login -----------------------------------------------------------------------------

    def _on_login(self, req: LoginRequest) -> None:
        if self._state is ConnectionState.FREE:
            if find_fault(self._portal_config.faults, FaultKind.RESET_MID_LOGIN) is not None:
                self._inject(FaultKind.RESET_MID_LOGIN)
                self._abort = True
                return
            self._identity.isid = req.isid
            self._login_cmdsn = req.cmdsn
            self._expcmdsn = req.cmdsn
            if req.version_min > 0:
                self._fail(req, LoginStatus.UNSUPPORTED_VERSION)
                return
            if req.tsih != 0:
                self._fail(req, LoginStatus.SESSION_DOES_NOT_EXIST)
                return
            self._state = (
                ConnectionState.SECURITY_NEGOTIATION
                if req.csg is Stage.SECURITY_NEGOTIATION
                else ConnectionState.OPERATIONAL_NEGOTIATION
            )
        else:
            if req.isid != self._identity.isid:
                self._violation("the ISID changed during login")
            if req.cmdsn != self._login_cmdsn:
                self._violation(f"CmdSN changed during login ({self._login_cmdsn} -> {req.cmdsn})")
            if req.expstatsn != self._statsn:
                self._violation(
                    f"Login Request acknowledges StatSN {req.expstatsn}, expected {self._statsn}"
                )
        self._login_itt = req.itt
        if self._pending_login is not None:
            if req.data or req.transit or req.cont:
                self._violation("a Login Request answering C=1 carried data, T=1 or C=1")
            self._send_login_chunk(req)
            return
        if req.transit and req.cont:
            self._fail(req, LoginStatus.INITIATOR_ERROR, why="T and C both set")
            return
        if req.csg is Stage.FULL_FEATURE_PHASE or (req.transit and req.nsg <= req.csg):
            self._fail(req, LoginStatus.INITIATOR_ERROR, why="impossible stage transition")
            return
        in_security = self._state in _SECURITY_STATES
        if req.csg is Stage.SECURITY_NEGOTIATION and not in_security:
            self._fail(req, LoginStatus.INITIATOR_ERROR, why="went back to SecurityNegotiation")
            return
        if req.csg is Stage.LOGIN_OPERATIONAL_NEGOTIATION and in_security:
            if self._state is not ConnectionState.AUTHENTICATED:
                self._fail(req, LoginStatus.INITIATOR_ERROR, why="left stage 0 unauthenticated")
                return
            # Authenticated, but the target never answered T=1: tolerated, and reported.
            self._violation("moved to LoginOperationalNegotiation without the target's T=1")
            self._state = ConnectionState.OPERATIONAL_NEGOTIATION

        try:
            text = self._login_text.feed(req.data, more=req.cont)
        except TextError:
            self._fail(req, LoginStatus.INITIATOR_ERROR, why="login text too long")
            return
        if text is None:
            # The initiator continues its text: acknowledge with an empty response (RFC 7143).
            self._respond_login(req, pairs=[], transit=False, nsg=Stage.SECURITY_NEGOTIATION)
            return
        try:
            keys = decode_keys(text)
        except TextError as exc:
            self._fail(req, LoginStatus.INITIATOR_ERROR, why=f"bad login text: {exc}")
            return

        answers: list[tuple[str, str]] = []
        if not self._identified:
            if not self._identify(req, keys):
                return
            answers.append(("TargetPortalGroupTag", str(self._portal_config.tpgt)))
            if self._state is ConnectionState.OPERATIONAL_NEGOTIATION and self._chap.required:
                downgrade = self._fault(FaultKind.DOWNGRADE_TO_NONE)
                if downgrade is None:
                    self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="skipped stage 0")
                    return
                self._inject(FaultKind.DOWNGRADE_TO_NONE)
        else:
            repeated = sorted(set(keys) & {"InitiatorName", "SessionType", "TargetName"})
            if repeated:
                self._violation(f"{', '.join(repeated)} sent again after the first request")

        if self._state in _SECURITY_STATES:
            if not self._security(req, keys, answers):
                return
        else:
            self._operational(keys, answers, login=True)
            if not self._declared_mrdsl:
                answers.append(
                    ("MaxRecvDataSegmentLength", str(self._config.max_recv_data_segment_length))
                )
                self._declared_mrdsl = True

        transit, nsg = self._decide_transit(req)
        if transit is None:
            return  # _decide_transit failed the login
        self._respond_login(req, pairs=answers, transit=transit, nsg=nsg)

    def _identify(self, req: LoginRequest, keys: Mapping[str, str]) -> bool:
        """Check the first request's names and pick the target; False once the login failed."""
        self._identified = True
        ident = self._identity
        name = keys.get("InitiatorName")
        if name is None:
            self._fail(req, LoginStatus.MISSING_PARAMETER, why="no InitiatorName")
            return False
        try:
            ident.initiator_name = validate_iscsi_name(name)
        except InvalidName:
            ident.initiator_name = name
            self._fail(req, LoginStatus.INITIATOR_ERROR, why="invalid InitiatorName")
            return False
        try:
            ident.session_type = SessionType(keys.get("SessionType", "Normal"))
        except ValueError:
            self._fail(req, LoginStatus.SESSION_TYPE_NOT_SUPPORTED)
            return False
        if ident.session_type is SessionType.NORMAL:
            target_name = keys.get("TargetName")
            if target_name is None:
                self._fail(req, LoginStatus.MISSING_PARAMETER, why="no TargetName")
                return False
            ident.target_name = target_name
            target = self._config.find_target(target_name)
            if target is None or self._portal_config not in self._config.portals_of(target):
                self._fail(req, LoginStatus.TARGET_NOT_FOUND)
                return False
            ident.target_name = target.name
            self._target = target
            self._chap = target.chap
            self._faults = (*self._faults, *target.faults)
        if self._fault(FaultKind.SERVICE_UNAVAILABLE) is not None:
            self._inject(FaultKind.SERVICE_UNAVAILABLE)
            self._fail(req, LoginStatus.SERVICE_UNAVAILABLE)
            return False
        redirect = self._fault(FaultKind.REDIRECT) or self._fault(FaultKind.REDIRECT_LOOP)
        if isinstance(redirect, (Redirect, RedirectLoop)):
            self._inject(redirect.kind)
            status = (
                LoginStatus.TARGET_MOVED_PERMANENTLY
                if redirect.permanent
                else LoginStatus.TARGET_MOVED_TEMPORARILY
            )
            address = self._redirect_address(redirect)
            self._fail(req, status, data=encode_text([("TargetAddress", address)]))
            return False
        if self._target is not None and not self._target.admits(ident.initiator_name):
            self._fail(req, LoginStatus.AUTHORIZATION_FAILURE)
            return False
        refuse = self._fault(FaultKind.REFUSE_ISID)
        refused = isinstance(refuse, RefuseIsid) and refuse.isid.matches(req.isid)
        if self._target is not None and refused:
            self._inject(FaultKind.REFUSE_ISID)
            self._fail(req, LoginStatus.AUTHORIZATION_FAILURE)
            return False
        return True

    def _redirect_address(self, redirect: Redirect | RedirectLoop) -> str:
        if isinstance(redirect, RedirectLoop):
            return f"{self._portal},{self._portal_config.tpgt}"
        named = self._config.find_portal(redirect.to)
        if named is not None:
            return f"{named.portal},{named.tpgt}"
        portal = Portal.parse(redirect.to)
        return portal.with_tpgt()

    # -- stage 0 ---------------------------------------------------------------------------

    def _security(
        self, req: LoginRequest, keys: Mapping[str, str], answers: list[tuple[str, str]]
    ) -> bool:
        """Handle AuthMethod and CHAP keys; False once the login failed."""
        chap = self._chap
        if "AuthMethod" in keys:
            if self._state is not ConnectionState.SECURITY_NEGOTIATION:
                self._violation("AuthMethod sent again after it was agreed")
            else:
                offered = keys["AuthMethod"].split(",")
                downgrade = self._fault(FaultKind.DOWNGRADE_TO_NONE)
                if chap.required and isinstance(downgrade, DowngradeToNone):
                    self._inject(FaultKind.DOWNGRADE_TO_NONE)
                    answers.append(("AuthMethod", "None"))
                    self._identity.auth_method = "None"
                    self._state = ConnectionState.AUTHENTICATED
                elif chap.required:
                    if "CHAP" not in offered:
                        self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="CHAP not offered")
                        return False
                    answers.append(("AuthMethod", "CHAP"))
                    self._identity.auth_method = "CHAP"
                    self._state = ConnectionState.CHAP_ALGORITHM
                elif "None" in offered:
                    answers.append(("AuthMethod", "None"))
                    self._identity.auth_method = "None"
                    self._state = ConnectionState.AUTHENTICATED
                else:
                    self._fail(
                        req,
                        LoginStatus.AUTHENTICATION_FAILURE,
                        why="only authentication offered, none configured",
                    )
                    return False
        if "CHAP_A" in keys:
            if self._state is not ConnectionState.CHAP_ALGORITHM:
                self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="CHAP_A out of order")
                return False
            try:
                answers.extend(self._start_chap(keys["CHAP_A"]))
            except ISCSIError:
                self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="no common CHAP_A")
                return False
            self._state = ConnectionState.CHAP_RESPONSE
        if "CHAP_N" in keys or "CHAP_R" in keys:
            if self._state is not ConnectionState.CHAP_RESPONSE or self._authenticator is None:
                self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="CHAP_R out of order")
                return False
            if "CHAP_C" in keys:
                with contextlib.suppress(TextError):  # check_response below refuses it
                    self._events.append(
                        ChallengeReceived(challenge=parse_binary("CHAP_C", keys["CHAP_C"]))
                    )
            try:
                pairs = self._authenticator.check_response(keys)
            except ISCSIError:
                self._fail(req, LoginStatus.AUTHENTICATION_FAILURE)
                return False
            self._identity.chap_username = self._authenticator.authenticated_username
            answers.extend(self._maybe_corrupt_chap(self._maybe_reflect_response(keys, pairs)))
            self._state = ConnectionState.AUTHENTICATED
        elif "CHAP_I" in keys or "CHAP_C" in keys:
            self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="CHAP_C without CHAP_R")
            return False
        others = {k: v for k, v in keys.items() if k not in _SECURITY_KEYS}
        if others:
            self._operational(others, answers, login=True)
        return True

    def _start_chap(self, offer: str) -> list[tuple[str, str]]:
        chap = self._chap
        reflect = self._fault(FaultKind.REFLECT_CHALLENGE)
        reflected: bytes | None = None
        if isinstance(reflect, ReflectChallenge) and not reflect.initiator_secret:
            reflected = reflect.challenge
            if reflected is None and self._seen_challenges:
                reflected = self._seen_challenges[-1]
        token_bytes = self._token_bytes
        length: int | None = None
        if reflected:
            self._inject(FaultKind.REFLECT_CHALLENGE)
            challenge = reflected

            def token_bytes(n: int) -> bytes:
                return challenge

            length = len(challenge)
        random_source = self._token_bytes
        self._authenticator = ChapAuthenticator(
            {account.username: account.secret for account in chap.accounts},
            mutual=chap.mutual,
            algorithms=chap.algorithms,
            token_bytes=token_bytes,
            challenge_length=length,
            identifier=lambda: random_source(1)[0],
        )
        return self._authenticator.select_algorithm(offer)

    def _maybe_reflect_response(
        self, keys: Mapping[str, str], pairs: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        reflect = self._fault(FaultKind.REFLECT_CHALLENGE)
        authenticator = self._authenticator
        if not (isinstance(reflect, ReflectChallenge) and reflect.initiator_secret and pairs):
            return pairs
        assert authenticator is not None
        assert authenticator.algorithm is not None
        username = authenticator.authenticated_username
        secret = next(a.secret for a in self._chap.accounts if a.username == username)
        # check_response accepted CHAP_I/CHAP_C, so they parse.
        identifier = parse_number("CHAP_I", keys["CHAP_I"], low=0, high=255)
        challenge = parse_binary("CHAP_C", keys["CHAP_C"])
        self._inject(FaultKind.REFLECT_CHALLENGE)
        answer = chap_response(authenticator.algorithm, identifier, secret, challenge)
        return [(k, format_binary(answer) if k == "CHAP_R" else v) for k, v in pairs]

    def _maybe_corrupt_chap(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not isinstance(self._fault(FaultKind.WRONG_CHAP_RESPONSE), WrongChapResponse):
            return pairs
        corrupted: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "CHAP_R":
                self._inject(FaultKind.WRONG_CHAP_RESPONSE)
                raw = bytearray(parse_binary(key, value))
                raw[0] ^= 0x01
                corrupted.append((key, format_binary(bytes(raw))))
            else:
                corrupted.append((key, value))
        return corrupted

    def _decide_transit(self, req: LoginRequest) -> tuple[bool | None, Stage]:
        """Whether to agree to the initiator's T=1 (None when that failed the login)."""
        if not req.transit:
            return False, Stage.SECURITY_NEGOTIATION
        if self._state is ConnectionState.SECURITY_NEGOTIATION:
            # No AuthMethod was offered at all.
            if self._chap.required:
                self._fail(req, LoginStatus.AUTHENTICATION_FAILURE, why="no AuthMethod offered")
                return None, Stage.SECURITY_NEGOTIATION
            self._identity.auth_method = None
            self._state = ConnectionState.AUTHENTICATED
        if self._state in (ConnectionState.CHAP_ALGORITHM, ConnectionState.CHAP_RESPONSE):
            return False, Stage.SECURITY_NEGOTIATION  # CHAP is not done: stay
        return True, req.nsg

    # -- operational keys ------------------------------------------------------------------

    def _operational(
        self, keys: Mapping[str, str], answers: list[tuple[str, str]], *, login: bool
    ) -> None:
        for key, value in keys.items():
            if key in _IDENTITY_KEYS:
                continue
            if key in _SECURITY_KEYS:
                answers.append((key, IRRELEVANT))
                self._violation(f"{key} sent outside SecurityNegotiation")
                continue
            answer = self._answer_key(key, value, login=login)
            if answer is not None:
                answers.append((key, answer))

    def _answer_key(self, key: str, value: str, *, login: bool) -> str | None:
        """The target's answer to one proposed key (None for declarations)."""
        if value in SPECIAL_VALUES:
            self._violation(f"{key}={value} proposed (only an answer may say that)")
            return REJECT
        if key in _OBSOLETE_KEYS:
            return REJECT
        if key == "MaxRecvDataSegmentLength":
            try:
                self._peer_mrdsl = parse_number(key, value, low=512, high=_MAX_24BIT)
            except TextError:
                self._violation(f"invalid MaxRecvDataSegmentLength {value[:32]!r}")
                return REJECT
            return None
        if key == "SendTargets":
            return IRRELEVANT  # only meaningful in a Text Request (handled there)
        if not login:
            # Everything else is LeadingOnly / login-only: renegotiating it now is an error.
            return REJECT if key in _NUMERIC_KEYS or key in _BOOLEAN_KEYS else NOT_UNDERSTOOD
        discovery = self._identity.session_type is SessionType.DISCOVERY
        if key in _DIGEST_KEYS:
            return self._answer_digest(key, value)
        if key in _NUMERIC_KEYS:
            function, ours, low, high, irrelevant = _NUMERIC_KEYS[key]
            if discovery and irrelevant:
                return IRRELEVANT
            ours = self._preferences.get(key, ours)
            try:
                theirs = parse_number(key, value, low=low, high=high)
            except TextError:
                return REJECT
            result = min(theirs, ours) if function == _MIN else max(theirs, ours)
            self._negotiated[key] = result
            return str(result)
        if key in _BOOLEAN_KEYS:
            function, flag, irrelevant = _BOOLEAN_KEYS[key]
            if discovery and irrelevant:
                return IRRELEVANT
            flag = bool(self._preferences.get(key, flag))
            try:
                theirs_flag = parse_boolean(key, value)
            except TextError:
                return REJECT
            agreed = theirs_flag or flag if function == _OR else theirs_flag and flag
            self._negotiated[key] = agreed
            return format_boolean(agreed)
        if key == "TaskReporting":
            return (
                IRRELEVANT
                if discovery
                else ("RFC3720" if "RFC3720" in value.split(",") else REJECT)
            )
        return NOT_UNDERSTOOD

    @property
    def _preferences(self) -> dict[str, int | bool]:
        """The target's own values for the keys :class:`TargetConfig` lets one choose."""
        config = self._config
        return {
            "InitialR2T": config.initial_r2t,
            "ImmediateData": config.immediate_data,
            "FirstBurstLength": config.first_burst_length,
            "MaxBurstLength": config.max_burst_length,
        }

    def _session_params(self) -> SessionParams:
        """The keys that shape SCSI traffic; RFC 7143 defaults for those never negotiated."""
        agreed = self._negotiated
        max_burst = int(agreed.get("MaxBurstLength", 262144))
        return SessionParams(
            immediate_data=bool(agreed.get("ImmediateData", True)),
            initial_r2t=bool(agreed.get("InitialR2T", True)),
            first_burst_length=min(int(agreed.get("FirstBurstLength", 65536)), max_burst),
            max_burst_length=max_burst,
        )

    def _required_digests(self) -> tuple[str, ...]:
        """The digest keys a DigestsRequired fault imposes (none without one)."""
        required = self._fault(FaultKind.DIGESTS_REQUIRED)
        return required.keys if isinstance(required, DigestsRequired) else ()

    def _answer_digest(self, key: str, value: str) -> str:
        """HeaderDigest/DataDigest: the first acceptable value in the initiator's list."""
        if self._fault(FaultKind.REJECT_DIGESTS) is not None:
            self._inject_once(FaultKind.REJECT_DIGESTS)
            return REJECT
        if key in self._required_digests():
            self._inject_once(FaultKind.DIGESTS_REQUIRED)
            accepted = {Digest.CRC32C.value}
        else:
            accepted = {digest.value for digest in self._config.digests}
        choice = next((item for item in value.split(",") if item in accepted), None)
        if choice is None:
            return REJECT
        self._digest_choice[key] = choice
        return choice

    # -- login responses -------------------------------------------------------------------

    def _respond_login(
        self, req: LoginRequest, *, pairs: list[tuple[str, str]], transit: bool, nsg: Stage
    ) -> None:
        data = self._text_bytes(pairs)
        if self._responses_sent == 0 and isinstance(
            self._fault(FaultKind.NON_UTF8_TEXT), NonUTF8Text
        ):
            self._inject(FaultKind.NON_UTF8_TEXT)
            data += _NON_UTF8_PAIR
        limit = LOGIN_SEGMENT_LIMIT
        split = self._fault(FaultKind.SPLIT_TEXT)
        if isinstance(split, SplitText) and split.login and len(data) > split.chunk:
            self._inject(FaultKind.SPLIT_TEXT)
            limit = split.chunk
        success = transit and nsg is Stage.FULL_FEATURE_PHASE
        self._pending_login = _PendingLogin(
            chunks=deque(_chunks(data, limit)),
            transit=transit,
            csg=req.csg,
            nsg=nsg if transit else Stage.SECURITY_NEGOTIATION,
            tsih=self._tsih if success else 0,
        )
        self._send_login_chunk(req)

    def _send_login_chunk(self, req: LoginRequest) -> None:
        pending = self._pending_login
        assert pending is not None
        chunk = pending.chunks.popleft()
        last = not pending.chunks
        if last:
            self._pending_login = None
        response = LoginResponse(
            transit=pending.transit and last,
            cont=not last,
            csg=pending.csg,
            nsg=pending.nsg if pending.transit and last else Stage.SECURITY_NEGOTIATION,
            isid=req.isid,
            itt=req.itt,
            statsn=self._take_statsn(),
            expcmdsn=self._expcmdsn,
            maxcmdsn=self._maxcmdsn,
            status_class=StatusClass.SUCCESS,
            status_detail=0,
            tsih=pending.tsih if last else 0,
            data=chunk,
        )
        self._queue_login_response(response)
        if last and pending.transit and self._state is not ConnectionState.BROKEN:
            if pending.nsg is Stage.FULL_FEATURE_PHASE:
                self._login_succeeded()
            else:
                self._state = ConnectionState.OPERATIONAL_NEGOTIATION

    def _queue_login_response(self, response: LoginResponse) -> None:
        """Queue a Login Response, mangling the connection's first one if a fault says so."""
        first = self._responses_sent == 0
        self._responses_sent += 1
        if first:
            if isinstance(self._fault(FaultKind.MALFORMED_PDU), MalformedPDU):
                self._inject(FaultKind.MALFORMED_PDU)
                # Opcode 0x3e is assigned to nothing; the lengths are 0 so it is one whole header.
                self._outgoing.append(bytes([0x3E, 0x80]) + bytes(2) + bytes(4) + b"\xa5" * 40)
                self._state = ConnectionState.BROKEN
                return
            oversized = self._fault(FaultKind.OVERSIZED_PDU)
            if isinstance(oversized, OversizedPDU):
                self._inject(FaultKind.OVERSIZED_PDU)
                header = bytearray(encode_pdu(response)[:48])
                header[5:8] = oversized.length.to_bytes(3, "big")
                self._outgoing.append(bytes(header))
                self._state = ConnectionState.BROKEN
                return
            if isinstance(self._fault(FaultKind.WRONG_OPCODE), WrongOpcode):
                self._inject(FaultKind.WRONG_OPCODE)
                self._queue(
                    TextResponse(
                        final=True,
                        cont=False,
                        itt=response.itt,
                        ttt=RESERVED_TAG,
                        statsn=response.statsn,
                        expcmdsn=response.expcmdsn,
                        maxcmdsn=response.maxcmdsn,
                        data=response.data,
                    ),
                    digests=False,
                )
                self._state = ConnectionState.BROKEN
                return
            if isinstance(self._fault(FaultKind.WRONG_ITT), WrongITT):
                self._inject(FaultKind.WRONG_ITT)
                wrong = (response.itt + 0x01010101) & _SERIAL_MASK
                if wrong == RESERVED_TAG:
                    wrong = 0x01010101
                response = replace(response, itt=wrong)
        self._queue(response, digests=False)

    def _fail(
        self, req: LoginRequest, status: LoginStatus, *, data: bytes = b"", why: str | None = None
    ) -> None:
        """Answer with a non-success status; the connection closes after it is sent."""
        if why is not None and status.value >> 8 == StatusClass.INITIATOR_ERROR:
            self._violation(why)
        self._pending_login = None
        self._state = ConnectionState.LOGIN_FAILED
        response = LoginResponse(
            transit=False,
            cont=False,
            csg=req.csg if req.csg is not Stage.FULL_FEATURE_PHASE else Stage.SECURITY_NEGOTIATION,
            nsg=Stage.SECURITY_NEGOTIATION,
            isid=req.isid,
            itt=req.itt,
            statsn=self._take_statsn(),
            expcmdsn=self._expcmdsn,
            maxcmdsn=self._maxcmdsn,
            status_class=StatusClass(status.value >> 8),
            status_detail=status.value & 0xFF,
            data=data,
        )
        self._queue_login_response(response)
        self._events.append(self._finished(status, tsih=0))

    def _finished(self, status: LoginStatus, *, tsih: int) -> LoginFinished:
        ident = self._identity
        return LoginFinished(
            initiator_name=ident.initiator_name,
            isid=ident.isid,
            session_type=ident.session_type,
            target_name=ident.target_name,
            status=status,
            tsih=tsih,
            auth_method=ident.auth_method,
            chap_username=ident.chap_username,
        )

    def _login_succeeded(self) -> None:
        self._state = ConnectionState.FULL_FEATURE
        # DigestsRequired turns its digests on whatever was agreed (or rejected, or not said).
        required = self._required_digests()
        if required:
            self._inject_once(FaultKind.DIGESTS_REQUIRED)
        crc32c = Digest.CRC32C.value
        self._header_digest = (
            "HeaderDigest" in required or self._digest_choice.get("HeaderDigest") == crc32c
        )
        self._data_digest = (
            "DataDigest" in required or self._digest_choice.get("DataDigest") == crc32c
        )
        # Digests and our declared limit apply from the first PDU after the final response.
        self._buffer.max_data_segment_length = self._config.max_recv_data_segment_length
        self._buffer.header_digest = self._header_digest
        self._buffer.data_digest = self._data_digest
        if self._target is not None:
            self._start_scsi(self._target)
        self._events.append(self._finished(LoginStatus.SUCCESS, tsih=self._tsih))

    def _start_scsi(self, target: TargetSpec) -> None:
        ident = self._identity
        assert ident.initiator_name is not None
        assert ident.isid is not None
        nexus = Nexus(
            initiator_name=ident.initiator_name,
            isid=ident.isid,
            target_name=target.name,
            portal_name=self._portal_config.name,
            tpgt=self._portal_config.tpgt,
        )
        units = self._logical_units
        if units is None:
            units = self._logical_units = LogicalUnits((target,))
        scsi_faults = [
            fault
            for fault in (*self._portal_config.faults, *target.faults)
            if fault.kind.layer is FaultLayer.SCSI
        ]
        luns = session_luns(units, target, nexus, scsi_faults)
        for _, kind in luns.removed:
            self._inject_once(kind)
        self._scsi = ScsiSession(
            table=luns.table,
            nexus=nexus,
            params=self._session_params(),
            port=_Port(self),
        )

    def _on_unexpected_during_login(self, name: str) -> None:
        if self._state is ConnectionState.FREE:
            self._violation(f"{name} before any Login Request")
            self._state = ConnectionState.CLOSED
            return
        self._violation(f"{name} during login")
        isid = self._identity.isid
        assert isid is not None
        fake = LoginRequest(
            transit=False,
            cont=False,
            csg=Stage.SECURITY_NEGOTIATION
            if self._state in _SECURITY_STATES
            else Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            nsg=Stage.SECURITY_NEGOTIATION,
            isid=isid,
            itt=self._login_itt,
            cmdsn=self._expcmdsn,
            expstatsn=self._statsn,
        )
        self._fail(fake, LoginStatus.INVALID_DURING_LOGIN)

    # -- full feature phase ----------------------------------------------------------------

    def _on_text(self, req: TextRequest) -> None:
        self._check_cmdsn(req.cmdsn, immediate=req.immediate, what="Text Request")
        self._check_expstatsn(req.expstatsn, "Text Request")
        pending = self._pending_text
        if req.ttt != RESERVED_TAG:
            if pending is not None and (req.itt, req.ttt) == (pending.itt, pending.ttt):
                if req.data:
                    self._violation("a Text Request continuing our answer carried data")
                self._send_text_chunk()
                return
            if self._text_in_tag is None or (req.itt, req.ttt) != self._text_in_tag:
                self._reject(req, RejectReason.INVALID_PDU_FIELD)
                return
        elif pending is not None or self._text_in_tag is not None:
            # A new exchange abandons whatever was in progress (RFC 7143 section 11.10).
            self._pending_text = None
            self._text_in_tag = None
            self._text_in.reset()
        try:
            text = self._text_in.feed(req.data, more=req.cont)
        except TextError as exc:
            self._violation(str(exc))
            self._reject(req, RejectReason.PROTOCOL_ERROR)
            return
        if text is None:
            # The initiator continues its text: ask for the rest with an empty response.
            ttt = self._new_ttt()
            self._text_in_tag = (req.itt, ttt)
            self._queue(
                TextResponse(
                    final=False,
                    cont=False,
                    itt=req.itt,
                    ttt=ttt,
                    statsn=self._take_statsn(),
                    expcmdsn=self._expcmdsn,
                    maxcmdsn=self._maxcmdsn,
                    lun=req.lun,
                )
            )
            return
        self._text_in_tag = None
        try:
            keys = decode_keys(text)
        except TextError as exc:
            self._violation(f"bad text data: {exc}")
            self._reject(req, RejectReason.PROTOCOL_ERROR)
            return
        answers: list[tuple[str, str]] = []
        query: str | None = None
        listed: tuple[str, ...] = ()
        for key, value in keys.items():
            if key == "SendTargets":
                query = value
                pairs, listed = self._send_targets(value)
                answers.extend(pairs)
            else:
                answer = self._answer_key(key, value, login=False)
                if answer is not None:
                    answers.append((key, answer))
        data = self._text_bytes(answers)
        if isinstance(self._fault(FaultKind.NON_UTF8_TEXT), NonUTF8Text):
            self._inject(FaultKind.NON_UTF8_TEXT)
            data += _NON_UTF8_PAIR
        size, continued = self._peer_mrdsl, True
        split = self._fault(FaultKind.SPLIT_TEXT)
        if isinstance(split, SplitText):
            size, continued = min(size, split.chunk), split.style is SplitStyle.CONTINUE
        chunks = deque(_chunks(data, size))
        if len(chunks) > 1 and isinstance(split, SplitText):
            self._inject(FaultKind.SPLIT_TEXT)
        self._pending_text = _PendingText(
            itt=req.itt,
            ttt=self._new_ttt() if len(chunks) > 1 else RESERVED_TAG,
            chunks=chunks,
            continued=continued,
            query=query,
            targets=listed,
            pdus=0,
        )
        self._send_text_chunk(lun=req.lun)

    def _send_text_chunk(self, *, lun: int = 0) -> None:
        pending = self._pending_text
        assert pending is not None
        chunk = pending.chunks.popleft()
        last = not pending.chunks
        pending.pdus += 1
        self._queue(
            TextResponse(
                final=last,
                cont=pending.continued and not last,
                itt=pending.itt,
                ttt=RESERVED_TAG if last else pending.ttt,
                statsn=self._take_statsn(),
                expcmdsn=self._expcmdsn,
                maxcmdsn=self._maxcmdsn,
                lun=lun,
                data=chunk,
            )
        )
        if last:
            self._pending_text = None
            if pending.query is not None:
                self._events.append(
                    SendTargetsAnswered(
                        query=pending.query, targets=pending.targets, pdus=pending.pdus
                    )
                )

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 0x100
        return ttt

    def _send_targets(self, value: str) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
        """SendTargets: the pairs to answer and the names of the targets listed."""
        initiator = self._identity.initiator_name or ""
        discovery = self._identity.session_type is SessionType.DISCOVERY
        chosen: list[TargetSpec]
        if value == "All":
            if not discovery:
                self._violation("SendTargets=All in a Normal session")
                return [("SendTargets", REJECT)], ()
            chosen = [t for t in self._config.targets if t.admits(initiator)]
        elif value == "":
            if discovery or self._target is None:
                self._violation("SendTargets= (empty) in a Discovery session")
                return [("SendTargets", REJECT)], ()
            chosen = [self._target]
        else:
            target = self._config.find_target(value)
            chosen = [] if target is None or not target.admits(initiator) else [target]
        listing = [
            DiscoveredTarget(
                iqn=target.name,
                portals=tuple(
                    Portal(host=p.host, port=p.port, tpgt=p.tpgt)
                    for p in self._config.portals_of(target)
                    if p.port != 0
                ),
            )
            for target in chosen
        ]
        return format_send_targets(listing), tuple(target.name for target in chosen)

    def _on_nop(self, req: NopOut) -> None:
        self._check_cmdsn(req.cmdsn, immediate=req.immediate, what="NOP-Out")
        self._check_expstatsn(req.expstatsn, "NOP-Out")
        if req.itt == RESERVED_TAG:
            # A reply to a NOP-In of ours (we send none) or a ping wanting no answer.
            if req.ttt == RESERVED_TAG:
                self._violation("NOP-Out with both ITT and TTT reserved")
            return
        self._queue(
            NopIn(
                itt=req.itt,
                ttt=RESERVED_TAG,
                statsn=self._take_statsn(),
                expcmdsn=self._expcmdsn,
                maxcmdsn=self._maxcmdsn,
                lun=req.lun,
                data=req.data,
            )
        )
        self._events.append(NopAnswered(itt=req.itt))

    def _on_logout(self, req: LogoutRequest) -> None:
        self._check_cmdsn(req.cmdsn, immediate=req.immediate, what="Logout Request")
        self._check_expstatsn(req.expstatsn, "Logout Request")
        self._events.append(LogoutReceived(reason=req.reason))
        if req.reason is LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            code = LogoutResponseCode.RECOVERY_NOT_SUPPORTED  # ErrorRecoveryLevel is 0
        else:
            code = LogoutResponseCode.CLOSED
        self._queue(
            LogoutResponse(
                response=code,
                itt=req.itt,
                statsn=self._take_statsn(),
                expcmdsn=self._expcmdsn,
                maxcmdsn=self._maxcmdsn,
            )
        )
        if code is LogoutResponseCode.CLOSED:
            self._state = ConnectionState.LOGGED_OUT

    def _on_framed(self, pdu: _Framed) -> None:
        if pdu.opcode in _UNSUPPORTED_OPCODES:
            self._on_unsupported(pdu)
            return
        if self._state in _LOGIN_STATES:
            self._on_unexpected_during_login(pdu.name)
            return
        if pdu.opcode in _COMMAND_OPCODES:
            # Taken even by a command refused below, so the initiator's next one fits.
            self._check_cmdsn(pdu.field(24), immediate=pdu.immediate, what=pdu.name)
            # Not checked on Data-Out: libiscsi counts an R2T's StatSN (the next one, not
            # taken, RFC 7143 11.8) as received, and with ErrorRecoveryLevel 0 nothing here
            # depends on a Data-Out's ExpStatSN.
            self._check_expstatsn(pdu.field(28), pdu.name)
        scsi = self._scsi
        if scsi is None:
            self._violation(f"{pdu.name} in a Discovery session")
            self._reject_header(pdu.header, RejectReason.PROTOCOL_ERROR, pdu.name)
            return
        if pdu.opcode == DATA_OUT:
            scsi.data_out(DataOut.from_pdu(pdu.header, pdu.data))
        elif pdu.opcode == TASK_MANAGEMENT_REQUEST:
            scsi.task_management(TaskManagementRequest.from_pdu(pdu.header))
        else:
            try:
                command = decode_pdu(
                    pdu.raw, header_digest=self._header_digest, data_digest=self._data_digest
                )
            except PDUDecodeError as exc:
                # A field RFC 7143 forbids (F=W=0, data expected without R or W...): refused
                # alone, and the session goes on.
                self._violation(f"SCSI Command refused: {exc}")
                self._reject_header(pdu.header, RejectReason.PROTOCOL_ERROR, pdu.name)
                return
            assert isinstance(command, ScsiCommand)
            scsi.command(command)

    def _on_unsupported(self, pdu: _Framed) -> None:
        """A valid opcode we do not implement: Reject "command not supported", keep serving."""
        if self._state in _LOGIN_STATES:
            self._on_unexpected_during_login(pdu.name)
            return
        if pdu.opcode in _COMMAND_OPCODES:
            # The rejected command still takes its CmdSN, so the initiator's next one fits.
            self._check_cmdsn(pdu.field(24), immediate=pdu.immediate, what=pdu.name)
            self._check_expstatsn(pdu.field(28), pdu.name)
        self._reject_header(pdu.header, RejectReason.COMMAND_NOT_SUPPORTED, pdu.name)

    def _reject(self, pdu: PDU, reason: RejectReason) -> None:
        try:
            header = encode_pdu(pdu)[:48]
        except ISCSIError:
            header = bytes(48)
        self._reject_header(header, reason, type(pdu).__name__)

    def _reject_header(self, header: bytes, reason: RejectReason, pdu_type: str) -> None:
        self._events.append(Rejected(reason=reason, pdu_type=pdu_type))
        self._queue(
            Reject(
                reason=reason,
                statsn=self._take_statsn(),
                expcmdsn=self._expcmdsn,
                maxcmdsn=self._maxcmdsn,
                data=header,
            )
        )


class _Port:
    """The connection as :class:`~.scsi_session.ScsiSession` sees it."""

    __slots__ = ("_conn",)

    def __init__(self, conn: TargetConnection) -> None:
        self._conn = conn

    @property
    def statsn(self) -> int:
        return self._conn._statsn

    @property
    def expcmdsn(self) -> int:
        return self._conn._expcmdsn

    @property
    def maxcmdsn(self) -> int:
        return self._conn._maxcmdsn

    @property
    def data_segment_limit(self) -> int:
        return self._conn._peer_mrdsl

    def take_statsn(self) -> int:
        return self._conn._take_statsn()

    def send(self, pdu: ScsiDataIn | ScsiResponse) -> None:
        self._conn._queue(pdu)

    def send_header(self, header: bytes) -> None:
        conn = self._conn
        conn._outgoing.append(header + crc32c(header) if conn._header_digest else header)

    def hold(self, seconds: float) -> None:
        self._conn._outgoing.append(Hold(seconds=seconds))

    def violation(self, description: str) -> None:
        self._conn._violation(description)

    def answered(self, event: ScsiAnswered | TaskManagementAnswered) -> None:
        conn = self._conn
        if isinstance(event, ScsiAnswered):
            for kind in event.faults:
                conn._inject_once(kind)
        conn._events.append(event)
