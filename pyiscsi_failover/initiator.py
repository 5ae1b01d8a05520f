"""The initiator side of one iSCSI connection, sans-IO: login, SendTargets, logout.

Feed the peer's bytes to :meth:`InitiatorConnection.receive_data`, pull events from
:meth:`~InitiatorConnection.next_event` (``NEED_DATA`` when it wants more), and write whatever
:meth:`~InitiatorConnection.data_to_send` returns. No sockets, no clock: the trio layer in
:mod:`pyiscsi_failover.transport` owns those, and the deadlines.

A probe is one connection: login, optionally a SendTargets exchange, then a logout so nothing
lingers on the target. The target's refusals are *events* (a redirect or a status the caller
reports); a peer that breaks the protocol raises :class:`~pyiscsi_failover.errors.ProtocolError`,
and a CHAP problem :class:`~pyiscsi_failover.errors.AuthenticationError`.

Must never import trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import functools
import logging
from dataclasses import dataclass, field, replace
from typing import Final, TypeAlias

from pyiscsi_failover.errors import (
    AuthenticationError,
    ConnectionLost,
    InvalidPortal,
    LocalProtocolError,
    NotAnISCSITarget,
    PDUDecodeError,
    ProtocolError,
)
from pyiscsi_failover.login_config import LoginConfig, probe_isid
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import ChapInitiator
from pyiscsi_failover.protocol.negotiation import (
    Digest,
    Negotiator,
    OperationalParameters,
)
from pyiscsi_failover.protocol.pdu import (
    CDB_LENGTH,
    LUN_LENGTH,
    PDU,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Reject,
    ScsiCommand,
    ScsiDataIn,
    ScsiResponse,
    ScsiStatus,
    Stage,
    StatusClass,
    TextRequest,
    TextResponse,
)
from pyiscsi_failover.protocol.sendtargets import DiscoveredTarget, parse_send_targets
from pyiscsi_failover.protocol.text import TextReassembler, decode_keys, decode_text, encode_text

__all__ = [
    "NEED_DATA",
    "Event",
    "InitiatorConnection",
    "LoggedOut",
    "LoginConfig",
    "LoginRedirected",
    "LoginRejected",
    "LoginSucceeded",
    "NeedData",
    "ScsiCompleted",
    "State",
    "TargetRequest",
    "TargetsDiscovered",
    "probe_isid",
]

logger = logging.getLogger(__name__)

#: The most a login data segment may hold before MaxRecvDataSegmentLength is negotiated.
LOGIN_SEGMENT_LIMIT: Final = 8192
#: Bound on login negotiation rounds (whole answers), so a target that never sets T cannot keep
#: us forever. Continuation PDUs do not count: the reassembly byte limit bounds those.
MAX_LOGIN_ROUNDS: Final = 32
#: Bound on SendTargets answers of no data at all; non-empty ones are bounded by the byte limit.
MAX_EMPTY_CONTINUATIONS: Final = 16
MAX_TEXT_BYTES: Final = 4 * 1024 * 1024
_SERIAL_MASK: Final = 0xFFFFFFFF
_NOT_ISCSI: Final = "not an iSCSI target (its reply is not an iSCSI PDU)"


class State(enum.Enum):
    # Members are singletons compared by identity; Enum's own __hash__ runs Python code, and
    # the state is looked up in a set for every PDU.
    __hash__ = object.__hash__

    IDLE = "idle"
    SECURITY_NEGOTIATION = "security negotiation"
    OPERATIONAL_NEGOTIATION = "operational negotiation"
    FULL_FEATURE = "full feature phase"
    TEXT_EXCHANGE = "text exchange"
    LOGGING_OUT = "logging out"
    DONE = "done"
    FAILED = "failed"


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginSucceeded:
    parameters: OperationalParameters
    tsih: int
    target_portal_group_tag: int | None
    auth_method: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRedirected:
    """Status class 1: log in at ``address`` instead (``permanent`` for 0x0102)."""

    address: Portal
    permanent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRejected:
    """Status class 2 or 3. ``status`` is None for a detail code we do not name."""

    status_class: StatusClass
    status_detail: int
    status: LoginStatus | None

    @property
    def retryable(self) -> bool:
        if self.status is not None:
            return self.status.retryable
        return self.status_class is StatusClass.TARGET_ERROR

    def describe(self) -> str:
        name = self.status.name.lower().replace("_", " ") if self.status else "unknown status"
        return f"{name} (0x{self.status_class:02x}{self.status_detail:02x})"


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetsDiscovered:
    targets: tuple[DiscoveredTarget, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggedOut:
    response: LogoutResponseCode


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiCompleted:
    """A SCSI task ended: its status, what a read returned, and the sense of a CHECK CONDITION.

    ``itt`` is what :meth:`InitiatorConnection.submit` returned. ``status`` is None when the
    target could not complete the command (``response`` non-zero). ``data`` is the Data-In
    payload in buffer order; ``residual`` with ``overflow``/``underflow`` is the target's count
    of bytes it wanted to send beyond, or did not send within, the expected length.
    """

    itt: int
    status: ScsiStatus | None
    response: int = 0
    data: bytes = b""
    sense: bytes = b""
    overflow: bool = False
    underflow: bool = False
    residual: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetRequest:
    """An Asynchronous Message asking us to end the session: log out (within
    ``respond_within`` seconds), or the target drops the connection, or wants to renegotiate
    (which a probe answers by logging out). Other async events are not reported."""

    event: AsyncEvent
    respond_within: int | None = None


Event: TypeAlias = (
    LoginSucceeded
    | LoginRedirected
    | LoginRejected
    | TargetsDiscovered
    | LoggedOut
    | ScsiCompleted
    | TargetRequest
)


@dataclass(slots=True, kw_only=True)
class _Task:
    """One outstanding SCSI command and the Data-In gathered for it so far. The PDU itself is
    built when it leaves, with the ExpStatSN of that moment."""

    cdb: bytes
    lun: bytes
    edtl: int
    cmdsn: int
    read: bool
    data: bytearray = field(default_factory=bytearray)
    next_datasn: int = 0
    sent: bool = False


def _serial_le(a: int, b: int) -> bool:
    """RFC 1982 serial-number a <= b for 32-bit sequence numbers (CmdSN windows)."""
    return a == b or 0 < ((b - a) & _SERIAL_MASK) < 0x80000000


class _ChapStep(enum.Enum):
    """Where the CHAP exchange stands: what we sent last."""

    AUTH_METHOD_SENT = enum.auto()
    ALGORITHMS_SENT = enum.auto()
    RESPONSE_SENT = enum.auto()
    DONE = enum.auto()


_LOGIN_STATES: Final = frozenset({State.SECURITY_NEGOTIATION, State.OPERATIONAL_NEGOTIATION})
#: Where answers to SCSI commands may arrive: a logout may overtake the last of them.
_TASK_STATES: Final = frozenset({State.FULL_FEATURE, State.LOGGING_OUT})


class InitiatorConnection:
    """One connection's initiator protocol state. Not reusable after DONE or FAILED."""

    def __init__(
        self, config: LoginConfig, *, initial_cmdsn: int = 1, initial_itt: int = 1
    ) -> None:
        if not 0 <= initial_cmdsn <= _SERIAL_MASK:
            raise LocalProtocolError(f"initial_cmdsn must be 0..2**32-1, not {initial_cmdsn}")
        if not 0 <= initial_itt < RESERVED_TAG:
            raise LocalProtocolError(
                f"initial_itt must be 0..0xfffffffe (0xffffffff is reserved), not {initial_itt}"
            )
        self.config = config
        self.state = State.IDLE
        # The codec (construct) loads with the first connection, not with this module: a
        # command line builds its LoginConfig before its first SYN and needs no codec for that.
        from pyiscsi_failover.protocol.framing import PDUBuffer
        from pyiscsi_failover.protocol.wire import encode_pdu

        self._encode = encode_pdu  # not an import statement per PDU sent: that was measurable
        self._buffer = PDUBuffer(max_data_segment_length=LOGIN_SEGMENT_LIMIT)
        self._out = bytearray()
        self._events: list[Event] = []
        self._cmdsn = initial_cmdsn
        self._maxcmdsn = initial_cmdsn  # the target's window; widened by every response
        self._expstatsn = 0
        self._tasks: dict[int, _Task] = {}
        self._queued: list[int] = []  # ITTs waiting for the CmdSN window to open
        self._next_itt = initial_itt
        self._itt = initial_itt
        self._tsih = 0
        self._tpgt: int | None = None
        self._chap: ChapInitiator | None = None
        if config.chap is not None:
            self._chap = ChapInitiator(
                config.chap, target_credentials=config.target_chap, policy=config.chap_policy
            )
        self._negotiator = Negotiator(config.proposal, session_type=config.session_type)
        self._auth_method = "None"
        self._chap_step = _ChapStep.AUTH_METHOD_SENT
        self._login_rounds = 0
        self._login_in = TextReassembler(limit=64 * 1024)
        self._login_pending: list[bytes] = []  # our request text still to send (C=1 splitting)
        self._pending_transit = False
        self._pending_csg = Stage.SECURITY_NEGOTIATION
        self._pending_nsg = Stage.SECURITY_NEGOTIATION
        self._text_in = TextReassembler(limit=MAX_TEXT_BYTES)
        self._empty_continuations = 0
        self._target_logged_in = False
        self._parameters: OperationalParameters | None = None
        self._heard_pdu = False  # whether the peer ever sent one valid PDU
        self._first_byte: int | None = None  # of the peer's stream, to tell a non-iSCSI peer

    @property
    def peer_is_not_iscsi(self) -> bool:
        """Whether the peer's bytes so far show it is no iSCSI target (an HTTP or SSH server):
        it sent no valid PDU, and its first byte cannot start a target's PDU."""
        return not self._heard_pdu and _not_from_a_target(self._first_byte)

    def __repr__(self) -> str:
        # The config holds Secrets; they print as *** anyway, but keep the repr short.
        return f"<InitiatorConnection {self.config.session_type.value} state={self.state.value}>"

    # -- output side ---------------------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        """Whether bytes wait for :meth:`data_to_send`."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send(self, pdu: PDU) -> None:
        digests = self._parameters if self.state not in _LOGIN_STATES else None
        self._out += self._encode(
            pdu,
            header_digest=digests is not None and digests.header_digest is Digest.CRC32C,
            data_digest=digests is not None and digests.data_digest is Digest.CRC32C,
        )

    def _new_itt(self) -> int:
        self._itt = self._next_itt
        self._next_itt = (self._next_itt + 1) % RESERVED_TAG  # never the reserved tag
        return self._itt

    # -- commands --------------------------------------------------------------------------------

    def start_login(self) -> None:
        """Queue the first Login Request (always through SecurityNegotiation)."""
        self._require(State.IDLE, "start_login")
        self.state = State.SECURITY_NEGOTIATION
        self._new_itt()
        keys: list[tuple[str, str]] = [("InitiatorName", self.config.initiator_name)]
        if self.config.initiator_alias:
            keys.append(("InitiatorAlias", self.config.initiator_alias))
        keys.append(("SessionType", self.config.session_type.value))
        if self.config.target_name is not None:
            keys.append(("TargetName", self.config.target_name))
        if self._chap is not None:
            keys.append(("AuthMethod", self._chap.auth_method_offer()))
            self._queue_login(
                keys,
                transit=False,
                csg=Stage.SECURITY_NEGOTIATION,
                nsg=Stage.SECURITY_NEGOTIATION,
                static=True,
            )
        else:
            keys.append(("AuthMethod", "None"))
            self._queue_login(
                keys,
                transit=True,
                csg=Stage.SECURITY_NEGOTIATION,
                nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                static=True,
            )

    def send_targets(self, which: str = "All") -> None:
        """Ask for SendTargets=<which> (``All`` only in a Discovery session)."""
        self._require(State.FULL_FEATURE, "send_targets")
        if which == "All" and self.config.target_name is not None:
            raise LocalProtocolError("SendTargets=All is only valid in a Discovery session")
        self.state = State.TEXT_EXCHANGE
        self._send(
            TextRequest(
                final=True,
                cont=False,
                itt=self._new_itt(),
                cmdsn=self._cmdsn,
                expstatsn=self._expstatsn,
                data=encode_text([("SendTargets", which)]),
            )
        )
        self._cmdsn = (self._cmdsn + 1) & _SERIAL_MASK

    def submit(self, cdb: bytes, *, lun: bytes, transfer_length: int, read: bool = True) -> int:
        """Queue one SCSI command for ``lun`` (8 bytes as on the wire); return its ITT.

        Commands are pipelined: each goes out at once while the target's CmdSN window
        (MaxCmdSN) has room, and waits in order otherwise, leaving as answers widen the window.
        ``transfer_length`` is the Expected Data Transfer Length of a read (0 for none).
        """
        if self.state is not State.FULL_FEATURE:
            raise LocalProtocolError(f"submit() is not allowed in state {self.state.value}")
        if not 0 <= transfer_length <= _SERIAL_MASK:
            raise LocalProtocolError(f"transfer_length must be 0..2**32-1, not {transfer_length}")
        # Checked before anything changes: a command the codec cannot carry must not use up
        # an ITT or a CmdSN (the target would wait for that CmdSN in vain).
        if not isinstance(cdb, bytes) or not 1 <= len(cdb) <= CDB_LENGTH:
            raise LocalProtocolError(f"a CDB is 1..{CDB_LENGTH} bytes (longer ones need an AHS)")
        if not isinstance(lun, bytes) or len(lun) != LUN_LENGTH:
            raise LocalProtocolError(f"lun must be the {LUN_LENGTH}-byte LUN field, not {lun!r}")
        itt = self._new_itt()
        while itt in self._tasks:  # 2**32 tags wrapped onto one still outstanding
            itt = self._new_itt()
        self._tasks[itt] = _Task(
            cdb=cdb, lun=lun, edtl=transfer_length, cmdsn=self._cmdsn, read=read
        )
        self._cmdsn = (self._cmdsn + 1) & _SERIAL_MASK
        self._queued.append(itt)
        self._send_window()
        return itt

    @property
    def outstanding(self) -> int:
        """SCSI commands submitted and not yet completed."""
        return len(self._tasks)

    def _send_window(self) -> None:
        if not self._queued or self.state is not State.FULL_FEATURE:
            return  # nothing leaves after a Logout Request (or during a text exchange)
        while self._queued:
            itt = self._queued[0]
            task = self._tasks.get(itt)
            if task is None:
                self._queued.pop(0)
                continue
            if not _serial_le(task.cmdsn, self._maxcmdsn):
                return  # the window is closed: wait for a response to open it
            self._queued.pop(0)
            task.sent = True
            self._send(
                ScsiCommand(
                    itt=itt,
                    edtl=task.edtl,
                    cmdsn=task.cmdsn,
                    expstatsn=self._expstatsn,
                    cdb=task.cdb,
                    lun=task.lun,
                    read=task.read and task.edtl > 0,
                )
            )

    def _next_cmdsn(self) -> int:
        """The CmdSN of the next command to leave: an immediate PDU carries it (RFC 7143
        4.2.2.1), and commands waiting for the window have numbers but have not left."""
        for itt in self._queued:
            task = self._tasks.get(itt)
            if task is not None:
                return task.cmdsn
        return self._cmdsn

    def _update_window(self, expcmdsn: int, maxcmdsn: int) -> None:
        """RFC 7143 4.2.2.1: MaxCmdSN only moves forward, and is ignored when it is below
        ExpCmdSN - 1 (an invalid window)."""
        if not _serial_le((expcmdsn - 1) & _SERIAL_MASK, maxcmdsn):
            return
        if _serial_le(self._maxcmdsn, maxcmdsn):
            self._maxcmdsn = maxcmdsn

    def logout(self) -> None:
        """Close the session, so a probe leaves nothing behind on the target."""
        self._require(State.FULL_FEATURE, "logout")
        cmdsn = self._next_cmdsn()
        # Commands still waiting for the window never leave; their CmdSNs go unused.
        for itt in self._queued:
            self._tasks.pop(itt, None)
        self._queued.clear()
        self.state = State.LOGGING_OUT
        self._send(
            LogoutRequest(
                reason=LogoutReason.CLOSE_SESSION,
                itt=self._new_itt(),
                cmdsn=cmdsn,
                expstatsn=self._expstatsn,
                immediate=True,
            )
        )

    def logout_refused_login(self) -> bool:
        """After we failed a login that the target had completed, queue a Logout for it.

        The target holds a session once it answers with T=1 and NSG=FullFeaturePhase, even when
        we then refuse that answer (a garbage value, a failed mutual CHAP check). Returns whether
        a Logout was queued. It goes without digests: what was agreed could not be read.
        """
        if self.state is not State.FAILED or not self._target_logged_in:
            return False
        self._target_logged_in = False
        self.state = State.LOGGING_OUT
        self._parameters = None
        # The old buffer may hold the refused PDU's remains or be failed for good.
        from pyiscsi_failover.protocol.framing import PDUBuffer

        self._buffer = PDUBuffer(max_data_segment_length=LOGIN_SEGMENT_LIMIT)
        self._send(
            LogoutRequest(
                reason=LogoutReason.CLOSE_SESSION,
                itt=self._new_itt(),
                cmdsn=self._cmdsn,
                expstatsn=self._expstatsn,
                immediate=True,
            )
        )
        return True

    def _require(self, state: State, what: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"{what}() is not allowed in state {self.state.value}")

    # -- input side ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed the connection."""
        if not data:
            if self.state not in (State.DONE, State.FAILED):
                failed_in = self._phase()
                self.state = State.FAILED
                if self.peer_is_not_iscsi:
                    raise NotAnISCSITarget(_NOT_ISCSI)
                raise ConnectionLost(f"target closed the connection during {failed_in}")
            return
        if self._first_byte is None:
            self._first_byte = data[0]
        self._buffer.feed(data)

    def next_event(self) -> Event | NeedData:
        while not self._events:
            try:
                pdu = self._buffer.next_pdu()
            except PDUDecodeError as exc:
                self.state = State.FAILED
                if self.peer_is_not_iscsi:
                    # An HTTP or SSH server on the port: say that, not "opcode 0x08".
                    raise NotAnISCSITarget(_NOT_ISCSI) from exc
                raise
            if pdu is None:
                return NEED_DATA
            self._heard_pdu = True
            try:
                self._handle(pdu)
            except (ProtocolError, AuthenticationError):
                self.state = State.FAILED
                raise
        return self._events.pop(0)

    def _phase(self) -> str:
        return self.state.value

    def _handle(self, pdu: PDU) -> None:
        match pdu:
            case LoginResponse() if self.state in _LOGIN_STATES:
                self._on_login_response(pdu)
            case TextResponse() if self.state is State.TEXT_EXCHANGE:
                self._on_text_response(pdu)
            case LogoutResponse() if self.state is State.LOGGING_OUT:
                self._on_logout_response(pdu)
            case NopIn() if self.state not in _LOGIN_STATES:
                self._on_nop_in(pdu)
            case AsyncMessage() if self.state not in _LOGIN_STATES:
                self._on_async_message(pdu)
            case ScsiDataIn() if self.state in _TASK_STATES:
                self._on_data_in(pdu)
            case ScsiResponse() if self.state in _TASK_STATES:
                self._on_scsi_response(pdu)
            case Reject():
                raise ProtocolError(
                    f"target rejected our PDU during {self._phase()}: {pdu.reason.name.lower()}"
                )
            case _:
                raise ProtocolError(
                    f"unexpected {type(pdu).__name__} from the target during {self._phase()}"
                )

    def _count_continuation(self, data: bytes, what: str) -> None:
        """Empty continuations carry nothing the byte limit could bound; cap their number."""
        if not data:
            self._empty_continuations += 1
            if self._empty_continuations > MAX_EMPTY_CONTINUATIONS:
                raise ProtocolError(
                    f"target sent more than {MAX_EMPTY_CONTINUATIONS} empty continued {what}s"
                )

    def _check_itt(self, itt: int, what: str) -> None:
        if itt != self._itt:
            raise ProtocolError(f"{what} carries ITT 0x{itt:08x}, expected 0x{self._itt:08x}")

    def _advance_statsn(self, statsn: int) -> None:
        self._expstatsn = (statsn + 1) & 0xFFFFFFFF

    # -- login -------------------------------------------------------------------------------------

    def _queue_login(
        self,
        keys: list[tuple[str, str]],
        *,
        transit: bool,
        csg: Stage,
        nsg: Stage,
        static: bool = False,
    ) -> None:
        """``static``: the keys are the same for every login of this configuration (names, the
        operational offer), never CHAP values, so their encoding may be shared."""
        if not keys:
            data = b""
        elif static:
            data = _encode_static(tuple(keys))
        else:
            data = encode_text(keys)
        chunks = [
            data[i : i + LOGIN_SEGMENT_LIMIT] for i in range(0, len(data), LOGIN_SEGMENT_LIMIT)
        ]
        self._login_pending = chunks or [b""]
        self._pending_transit, self._pending_csg, self._pending_nsg = transit, csg, nsg
        self._send_login_chunk()

    def _send_login_chunk(self) -> None:
        data = self._login_pending.pop(0)
        more = bool(self._login_pending)
        transit = self._pending_transit and not more
        self._send(
            LoginRequest(
                transit=transit,
                cont=more,
                csg=self._pending_csg,
                nsg=self._pending_nsg if transit else Stage.SECURITY_NEGOTIATION,
                isid=self.config.isid,
                tsih=self._tsih,
                itt=self._itt,
                cmdsn=self._cmdsn,
                expstatsn=self._expstatsn,
                data=data,
            )
        )

    def _on_login_response(self, pdu: LoginResponse) -> None:
        self._check_itt(pdu.itt, "Login Response")
        if pdu.cont:
            self._count_continuation(pdu.data, "Login Response")
        else:
            self._login_rounds += 1
            if self._login_rounds > MAX_LOGIN_ROUNDS:
                raise ProtocolError(f"login did not finish within {MAX_LOGIN_ROUNDS} rounds")
        self._advance_statsn(pdu.statsn)
        if pdu.status_class is not StatusClass.SUCCESS:
            # Checked before the ISID: tgt zeroes the ISID in its error responses.
            self._on_login_status(pdu)
            return
        if pdu.isid != self.config.isid:
            raise ProtocolError(
                f"Login Response carries ISID 0x{pdu.isid.to_bytes().hex()}, "
                f"ours is 0x{self.config.isid.to_bytes().hex()}"
            )
        if pdu.transit and pdu.nsg is Stage.FULL_FEATURE_PHASE and not pdu.cont and pdu.tsih:
            # From here the target holds a session, even if we go on to refuse its answer.
            self._target_logged_in = True
        if pdu.version_active != 0:
            raise ProtocolError(f"target chose unsupported iSCSI version {pdu.version_active}")
        if pdu.csg is not self._pending_csg:
            raise ProtocolError(
                f"Login Response is for stage {pdu.csg.name}, we are in {self._pending_csg.name}"
            )
        if self._login_pending:
            # We sent C=1; the target acknowledges with an empty response before we go on.
            if pdu.transit or pdu.cont:
                raise ProtocolError("target answered a continued Login Request with T or C set")
            self._send_login_chunk()
            return
        text = self._login_in.feed(pdu.data, more=pdu.cont)
        if text is None:
            # The target's answer continues (C=1): ask for the rest with an empty request,
            # T=0, without forgetting the transition we asked for.
            self._send(
                LoginRequest(
                    transit=False,
                    cont=False,
                    csg=self._pending_csg,
                    nsg=Stage.SECURITY_NEGOTIATION,
                    isid=self.config.isid,
                    tsih=self._tsih,
                    itt=self._itt,
                    cmdsn=self._cmdsn,
                    expstatsn=self._expstatsn,
                )
            )
            return
        keys = decode_keys(text)
        if "TargetPortalGroupTag" in keys and self._tpgt is None:
            self._tpgt = _parse_tpgt(keys["TargetPortalGroupTag"])
        if self._chap is not None and self._chap_step is _ChapStep.AUTH_METHOD_SENT:
            # A downgrade is the finding that matters, whatever else is wrong with the PDU.
            self._chap.check_auth_method(keys.get("AuthMethod", "None"))
        if pdu.transit:
            if not self._pending_transit:
                raise ProtocolError("target set T in answer to a Login Request without T")
            # The target may stop short of the stage we asked for, never go past it or back.
            if not pdu.csg < pdu.nsg <= self._pending_nsg:
                raise ProtocolError(
                    f"target moved to stage {pdu.nsg.name}, we asked for {self._pending_nsg.name}"
                )
        if self.state is State.SECURITY_NEGOTIATION:
            self._security_round(pdu, keys)
        else:
            self._operational_round(pdu, keys)

    def _on_login_status(self, pdu: LoginResponse) -> None:
        self.state = State.DONE
        if pdu.status_class is StatusClass.REDIRECTION:
            keys = decode_keys(pdu.data)
            address = keys.get("TargetAddress")
            if not address:
                raise ProtocolError("redirect (status class 1) without a TargetAddress")
            try:
                portal = Portal.parse(address)
            except InvalidPortal as exc:
                raise ProtocolError(f"redirect to an invalid TargetAddress {address!r}") from exc
            permanent = pdu.status_detail == LoginStatus.TARGET_MOVED_PERMANENTLY & 0xFF
            self._events.append(LoginRedirected(address=portal, permanent=permanent))
            return
        self._events.append(
            LoginRejected(
                status_class=pdu.status_class, status_detail=pdu.status_detail, status=pdu.status
            )
        )

    def _security_round(self, pdu: LoginResponse, keys: dict[str, str]) -> None:
        chap = self._chap
        if chap is None:
            method = keys.get("AuthMethod", "None")
            if method != "None":
                raise ProtocolError(f"target chose AuthMethod={method} but we offered only None")
            if not pdu.transit:
                # Target wants more security negotiation we cannot give: keep asking to move on.
                self._queue_login(
                    [],
                    transit=True,
                    csg=Stage.SECURITY_NEGOTIATION,
                    nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
                )
                return
            self._enter_operational(pdu)
            return
        if self._chap_step is _ChapStep.AUTH_METHOD_SENT:
            chap.check_auth_method(keys.get("AuthMethod", "None"))
            if pdu.transit:
                raise AuthenticationError("target tried to end security negotiation without CHAP")
            self._auth_method = "CHAP"
            self._chap_step = _ChapStep.ALGORITHMS_SENT
            self._queue_login(
                chap.offer(),
                transit=False,
                csg=Stage.SECURITY_NEGOTIATION,
                nsg=Stage.SECURITY_NEGOTIATION,
            )
        elif self._chap_step is _ChapStep.ALGORITHMS_SENT:
            if pdu.transit:
                raise AuthenticationError("target tried to end security negotiation before CHAP")
            answer = chap.answer_challenge(keys)
            self._chap_step = _ChapStep.RESPONSE_SENT
            self._queue_login(
                answer,
                transit=True,
                csg=Stage.SECURITY_NEGOTIATION,
                nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            )
        else:
            if chap.mutual:
                chap.verify_target(keys)
            if not pdu.transit:
                raise ProtocolError("target accepted CHAP but did not let the login move on")
            self._chap_step = _ChapStep.DONE
            self._enter_operational(pdu)

    def _enter_operational(self, pdu: LoginResponse) -> None:
        if pdu.nsg is Stage.FULL_FEATURE_PHASE:
            # The target skipped operational negotiation: every key keeps its default.
            self._finish_login(pdu)
            return
        self.state = State.OPERATIONAL_NEGOTIATION
        self._queue_login(
            self._negotiator.offer(),
            transit=True,
            csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            nsg=Stage.FULL_FEATURE_PHASE,
            static=True,
        )

    def _operational_round(self, pdu: LoginResponse, keys: dict[str, str]) -> None:
        answers = self._negotiator.receive(keys.items())
        if pdu.transit and pdu.nsg is Stage.FULL_FEATURE_PHASE:
            if answers:
                # The target ended the login with offers of its own still open. They keep
                # their defaults; refusing a working portal over this would help nobody.
                logger.debug(
                    "target ended login with unanswered keys: %s", ", ".join(k for k, _ in answers)
                )
            self._finish_login(pdu)
            return
        self._queue_login(
            answers,
            transit=True,
            csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            nsg=Stage.FULL_FEATURE_PHASE,
        )

    def _finish_login(self, pdu: LoginResponse) -> None:
        if pdu.tsih == 0:
            raise ProtocolError("final Login Response of a new session carries TSIH 0")
        self._tsih = pdu.tsih
        # The first full-feature command reuses the login's CmdSN; the window starts here, as
        # the final Login Response sets it (MaxCmdSN = ExpCmdSN - 1 is a valid, closed one).
        valid = _serial_le((pdu.expcmdsn - 1) & _SERIAL_MASK, pdu.maxcmdsn)
        self._maxcmdsn = pdu.maxcmdsn if valid else self._cmdsn
        self._parameters = self._negotiator.result()
        if self._parameters.target_portal_group_tag is None and self._tpgt is not None:
            # TargetPortalGroupTag arrives in the security stage, before the negotiator runs.
            self._parameters = replace(self._parameters, target_portal_group_tag=self._tpgt)
        self.state = State.FULL_FEATURE
        # The first full-feature command reuses the login's CmdSN (RFC 7143 section 4.2).
        digests = self._parameters
        self._buffer.max_data_segment_length = digests.max_recv_data_segment_length
        self._buffer.header_digest = digests.header_digest is Digest.CRC32C
        self._buffer.data_digest = digests.data_digest is Digest.CRC32C
        self._events.append(
            LoginSucceeded(
                parameters=self._parameters,
                tsih=self._tsih,
                target_portal_group_tag=self._tpgt,
                auth_method=self._auth_method,
            )
        )

    # -- full feature phase --------------------------------------------------------------------

    def _on_text_response(self, pdu: TextResponse) -> None:
        self._check_itt(pdu.itt, "Text Response")
        self._advance_statsn(pdu.statsn)
        # tgt sets F=0 with a TTT but not C; open-iscsi also ends on a reserved TTT.
        more = not pdu.final and pdu.ttt != RESERVED_TAG
        if more:
            self._count_continuation(pdu.data, "Text Response")
        if pdu.final and pdu.cont:
            raise ProtocolError("Text Response with both F and C set")
        text = self._text_in.feed(pdu.data, more=more)
        if text is None:
            self._send(
                TextRequest(
                    final=True,
                    cont=False,
                    itt=self._itt,
                    ttt=pdu.ttt,
                    cmdsn=self._cmdsn,
                    expstatsn=self._expstatsn,
                )
            )
            self._cmdsn = (self._cmdsn + 1) & _SERIAL_MASK
            return
        self.state = State.FULL_FEATURE
        targets = parse_send_targets(decode_text(text))
        self._events.append(TargetsDiscovered(targets=tuple(targets)))

    def _task(self, itt: int, what: str) -> _Task:
        task = self._tasks.get(itt)
        if task is None or not task.sent:
            raise ProtocolError(f"{what} for ITT 0x{itt:08x}, which names no command of ours")
        return task

    def _on_data_in(self, pdu: ScsiDataIn) -> None:
        task = self._task(pdu.itt, "SCSI Data-In")
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        self._send_window()
        if pdu.datasn != task.next_datasn:
            raise ProtocolError(
                f"SCSI Data-In for ITT 0x{pdu.itt:08x} has DataSN {pdu.datasn}, expected"
                f" {task.next_datasn} (Data-In out of order)"
            )
        task.next_datasn += 1
        if pdu.buffer_offset != len(task.data):
            raise ProtocolError(
                f"SCSI Data-In for ITT 0x{pdu.itt:08x} is at buffer offset {pdu.buffer_offset},"
                f" expected {len(task.data)} (we negotiated DataPDUInOrder=Yes)"
            )
        if len(task.data) + len(pdu.data) > task.edtl:
            raise ProtocolError(
                f"SCSI Data-In for ITT 0x{pdu.itt:08x} goes past the expected length {task.edtl}"
            )
        task.data += pdu.data
        if pdu.status is not None:
            # S: the status rides on this final Data-In and no SCSI Response follows.
            self._advance_statsn(pdu.statsn)
            self._complete(
                pdu.itt,
                ScsiCompleted(
                    itt=pdu.itt,
                    status=pdu.status,
                    data=bytes(task.data),
                    overflow=pdu.overflow,
                    underflow=pdu.underflow,
                    residual=pdu.residual,
                ),
            )

    def _on_scsi_response(self, pdu: ScsiResponse) -> None:
        task = self._task(pdu.itt, "SCSI Response")
        self._advance_statsn(pdu.statsn)
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        # ExpDataSN is not checked against the Data-In count: tgt sends Data-In before a CHECK
        # CONDITION Response and still reports ExpDataSN 0 (seen with a missing LUN).
        self._complete(
            pdu.itt,
            ScsiCompleted(
                itt=pdu.itt,
                status=pdu.status,
                response=pdu.response,
                data=bytes(task.data),
                sense=pdu.sense,
                overflow=pdu.overflow,
                underflow=pdu.underflow,
                residual=pdu.residual,
            ),
        )

    def _complete(self, itt: int, event: ScsiCompleted) -> None:
        del self._tasks[itt]
        if self.state is State.FULL_FEATURE:
            self._events.append(event)
            self._send_window()

    def _on_logout_response(self, pdu: LogoutResponse) -> None:
        self._check_itt(pdu.itt, "Logout Response")
        self._advance_statsn(pdu.statsn)
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        self.state = State.DONE
        self._events.append(LoggedOut(response=pdu.response))

    def _on_async_message(self, pdu: AsyncMessage) -> None:
        # Unlike an unsolicited NOP-In, an Async Message takes a StatSN.
        self._advance_statsn(pdu.statsn)
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        if pdu.async_event in (AsyncEvent.SCSI_EVENT, AsyncEvent.VENDOR_SPECIFIC):
            logger.debug("target sent async event %s; nothing to do", pdu.async_event.name)
            self._send_window()
            return
        if self.state is State.LOGGING_OUT:
            return  # already on our way out
        self._events.append(TargetRequest(event=pdu.async_event, respond_within=pdu.respond_within))

    def _on_nop_in(self, pdu: NopIn) -> None:
        # An unsolicited NOP-In does not advance StatSN (RFC 7143 section 11.19).
        self._update_window(pdu.expcmdsn, pdu.maxcmdsn)
        self._send_window()
        if pdu.ttt != RESERVED_TAG:
            # A ping from the target: echo its TTT (and its data) back.
            self._send(
                NopOut(
                    itt=RESERVED_TAG,
                    ttt=pdu.ttt,
                    lun=pdu.lun,
                    cmdsn=self._next_cmdsn(),
                    expstatsn=self._expstatsn,
                    immediate=True,
                    data=pdu.data,
                )
            )


@functools.lru_cache(maxsize=64)
def _encode_static(keys: tuple[tuple[str, str], ...]) -> bytes:
    return encode_text(keys)


def _not_from_a_target(first_byte: int | None) -> bool:
    """Whether a stream's first byte cannot start a target's PDU: bits 7 and 6 (reserved and I)
    are always 0 there, and target opcodes are 0x20..0x3f. Text protocols start with a letter
    (bit 6 set), so an HTTP or SSH server is told apart from a target that sent a bad PDU."""
    return first_byte is not None and (first_byte & 0xC0 != 0 or first_byte & 0x3F < 0x20)


def _parse_tpgt(value: str) -> int:
    if not value.isdigit() or int(value) > 0xFFFF:
        raise ProtocolError(f"target sent TargetPortalGroupTag={value!r}, not 0..65535")
    return int(value)
