"""Typed models of the PDUs an initiator meets: login, discovery, logout, the SCSI task (reads,
writes through R2T and Data-Out, task management), and the events a target reports unasked
(Asynchronous Message).

These are what the rest of the package sees: frozen dataclasses and IntEnums. The wire format
lives in :mod:`pyiscsi_failover.protocol.wire` alone (the only module that imports construct),
which also enforces the RFC 7143 rules that tie fields together (status only on a final Data-In,
sense with CHECK CONDITION...). Fields are named after RFC 7143. Pure: never imports trio,
socket or subprocess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from pyiscsi_failover.protocol.isid import ISID

__all__ = [
    "CDB_LENGTH",
    "ISID",
    "LUN_LENGTH",
    "PDU",
    "R2T",
    "RESERVED_TAG",
    "AsyncEvent",
    "AsyncMessage",
    "LoginRequest",
    "LoginResponse",
    "LoginStatus",
    "LogoutReason",
    "LogoutRequest",
    "LogoutResponse",
    "LogoutResponseCode",
    "NopIn",
    "NopOut",
    "Opcode",
    "Reject",
    "RejectReason",
    "ScsiCommand",
    "ScsiDataIn",
    "ScsiDataOut",
    "ScsiResponse",
    "ScsiResponseCode",
    "ScsiStatus",
    "Stage",
    "StatusClass",
    "TaskAttribute",
    "TaskFunction",
    "TaskManagementRequest",
    "TaskManagementResponse",
    "TaskResponseCode",
    "TextRequest",
    "TextResponse",
    "sense_data_segment",
]

#: The "no tag" value of ITT and TTT fields.
RESERVED_TAG = 0xFFFFFFFF
#: Length of the CDB field of a SCSI Command BHS; a longer CDB needs an AHS.
CDB_LENGTH = 16
#: Length of a SAM LUN field, kept as raw bytes in the SCSI PDUs.
LUN_LENGTH = 8


class Opcode(enum.IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MANAGEMENT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    SCSI_DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MANAGEMENT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    SCSI_DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class Stage(enum.IntEnum):
    """Login stages (CSG/NSG). 2 is reserved by the RFC and never valid."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class StatusClass(enum.IntEnum):
    SUCCESS = 0
    REDIRECTION = 1
    INITIATOR_ERROR = 2
    TARGET_ERROR = 3


class LoginStatus(enum.IntEnum):
    """Known (Status-Class << 8 | Status-Detail) codes of a Login Response."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    TARGET_NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANNOT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def retryable(self) -> bool:
        """Whether trying again, later or on another portal, can help."""
        return (
            self.value >> 8 == StatusClass.TARGET_ERROR or self is LoginStatus.TOO_MANY_CONNECTIONS
        )


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(enum.IntEnum):
    CLOSED = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRequest:
    transit: bool
    cont: bool
    csg: Stage
    nsg: Stage
    isid: ISID
    itt: int
    cmdsn: int
    expstatsn: int
    tsih: int = 0
    cid: int = 0
    version_max: int = 0
    version_min: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResponse:
    transit: bool
    cont: bool
    csg: Stage
    nsg: Stage
    isid: ISID
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    status_class: StatusClass
    status_detail: int
    tsih: int = 0
    version_max: int = 0
    version_active: int = 0
    data: bytes = b""

    @property
    def status(self) -> LoginStatus | None:
        """The known status code, or None for a detail this package does not name."""
        try:
            return LoginStatus(self.status_class << 8 | self.status_detail)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TextRequest:
    final: bool
    cont: bool
    itt: int
    cmdsn: int
    expstatsn: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    immediate: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class TextResponse:
    final: bool
    cont: bool
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutRequest:
    reason: LogoutReason
    itt: int
    cmdsn: int
    expstatsn: int
    cid: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutResponse:
    response: LogoutResponseCode
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    time2wait: int = 0
    time2retain: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """A target's refusal of one PDU; ``data`` holds the rejected PDU's header (48 bytes)."""

    reason: RejectReason
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    datasn: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class NopOut:
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    lun: int = 0
    immediate: bool = True
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class NopIn:
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: int = 0
    data: bytes = b""


class TaskAttribute(enum.IntEnum):
    """ATTR of a SCSI Command (SAM task attributes); 5-7 are reserved."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


class ScsiStatus(enum.IntEnum):
    """SAM status codes a SCSI Response or a final Data-In carries; any other is reserved."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    INTERMEDIATE = 0x10  # obsolete in SAM-4, still a defined code
    INTERMEDIATE_CONDITION_MET = 0x14  # obsolete in SAM-4, still a defined code
    RESERVATION_CONFLICT = 0x18
    COMMAND_TERMINATED = 0x22  # obsolete in SAM-4, still a defined code
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class ScsiResponseCode(enum.IntEnum):
    """The Response byte of a SCSI Response. 0x80-0xff are vendor-specific, the rest reserved."""

    COMMAND_COMPLETED = 0x00
    TARGET_FAILURE = 0x01


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiCommand:
    """A SCSI Command (opcode 0x01): one CDB for the logical unit at ``lun``.

    ``cdb`` is the command itself; one shorter than the 16-byte BHS field is zero-padded to 16
    bytes here, so a decoded command equals the one encoded (the CDB's own length follows from
    its operation code). A CDB longer than 16 bytes needs an Additional Header Segment, which
    this package never sends: encoding one raises PDUEncodeError. ``lun`` is the 8-byte SAM LUN
    as it goes on the wire (addressing method included). ``edtl`` is the Expected Data Transfer
    Length; ``read``/``write`` are R/W; ``final`` (F) says no unsolicited Data-Out follows.
    ``data`` is immediate data of a write.
    """

    itt: int
    edtl: int
    cmdsn: int
    expstatsn: int
    cdb: bytes
    lun: bytes = bytes(LUN_LENGTH)
    read: bool = False
    write: bool = False
    final: bool = True
    attribute: TaskAttribute = TaskAttribute.SIMPLE
    immediate: bool = False
    data: bytes = b""

    def __post_init__(self) -> None:
        cdb = self.cdb
        if isinstance(cdb, (bytes, bytearray)) and len(cdb) < CDB_LENGTH:
            object.__setattr__(self, "cdb", bytes(cdb) + bytes(CDB_LENGTH - len(cdb)))


def sense_data_segment(sense: bytes, response_data: bytes = b"") -> bytes:
    """The data segment of a SCSI Response or an Asynchronous Message: SenseLength (2 bytes),
    sense, then response data (a Response) or iSCSI event data (an Asynchronous Message)."""
    return len(sense).to_bytes(2, "big") + sense + response_data


def _split_sense(data: bytes) -> tuple[bytes, bytes]:
    """(sense, what follows it) of a SenseLength-prefixed data segment; the codec checks the
    length, so a model built by hand with a short segment just yields short parts."""
    if len(data) < 2:
        return b"", b""
    end = 2 + int.from_bytes(data[:2], "big")
    return data[2:end], data[end:]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiResponse:
    """A SCSI Response (opcode 0x21): how a task ended.

    ``response`` is the iSCSI Response byte (:class:`ScsiResponseCode`, or a vendor's
    0x80-0xff); ``status`` is the SCSI status, present exactly when the command completed at
    the target (``response`` 0), the only case in which RFC 7143 gives the byte a meaning.
    ``overflow``/``underflow`` (O/U) qualify ``residual``; ``bidi_overflow``/
    ``bidi_underflow`` (o/u) qualify ``bidi_residual``. ``data`` is the whole data segment:
    SenseLength, sense and response data (see :func:`sense_data_segment`, :attr:`sense`).
    """

    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    response: int = ScsiResponseCode.COMMAND_COMPLETED
    status: ScsiStatus | None = ScsiStatus.GOOD
    expdatasn: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    bidi_residual: int = 0
    snack_tag: int = 0
    data: bytes = b""

    @property
    def sense(self) -> bytes:
        """The sense data (empty when the segment has none); the codec checks its length."""
        return _split_sense(self.data)[0]

    @property
    def response_data(self) -> bytes:
        """What follows the sense data in the segment (iSCSI defines none; kept for SPC)."""
        return _split_sense(self.data)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiDataIn:
    """A SCSI Data-In (opcode 0x25): ``data`` at ``buffer_offset`` of a read's result.

    ``status`` is set (S = 1) only on the final PDU of a task that ended without an exception
    (GOOD, CONDITION MET or INTERMEDIATE); no SCSI Response follows such a PDU. ``statsn``,
    ``overflow``/``underflow`` and ``residual`` count only with a status. ``acknowledge`` is A
    (a DataACK request, used with ErrorRecoveryLevel > 0); ``lun`` is raw and meaningful only
    with a TTT.
    """

    itt: int
    expcmdsn: int
    maxcmdsn: int
    datasn: int
    buffer_offset: int = 0
    final: bool = False
    acknowledge: bool = False
    status: ScsiStatus | None = None
    statsn: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    ttt: int = RESERVED_TAG
    lun: bytes = bytes(LUN_LENGTH)
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiDataOut:
    """A SCSI Data-Out (opcode 0x05): ``data`` at ``buffer_offset`` of a write's data.

    ``ttt`` is the all-ones reserved tag for unsolicited data (sent without waiting for an
    R2T), else a copy of the Target Transfer Tag of the R2T it answers; ``lun`` (raw) is then
    a copy of the R2T's too, and has no meaning with unsolicited data. ``final`` (F) ends a
    sequence: the unsolicited burst, or the data one R2T asked for; ``datasn`` numbers the
    PDUs of that sequence from 0.
    """

    itt: int
    expstatsn: int
    datasn: int
    buffer_offset: int = 0
    final: bool = False
    ttt: int = RESERVED_TAG
    lun: bytes = bytes(LUN_LENGTH)
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class R2T:
    """A Ready To Transfer (opcode 0x31): the target asks for ``desired_length`` bytes (never
    0) of the write tagged ``itt``, from ``buffer_offset`` on.

    The Data-Outs that answer carry ``ttt``, which is never the all-ones reserved tag, and
    ``lun`` (raw). ``r2tsn`` numbers the task's R2Ts from 0. ``statsn`` is the next StatSN,
    not taken: an R2T does not advance it.
    """

    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    r2tsn: int
    desired_length: int
    buffer_offset: int = 0
    lun: bytes = bytes(LUN_LENGTH)


class TaskFunction(enum.IntEnum):
    """Function of a Task Management Function Request (RFC 7143 11.5.1); 0 and 9-127 are
    reserved here (RFC 7144's QUERY TASK and friends are not modelled)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8

    @property
    def references_task(self) -> bool:
        """Whether the function acts on the one task its Referenced Task Tag names; every
        other function carries the all-ones reserved tag there (RFC 7143 11.5.2)."""
        return self is TaskFunction.ABORT_TASK or self is TaskFunction.TASK_REASSIGN


class TaskResponseCode(enum.IntEnum):
    """Response of a Task Management Function Response (RFC 7143 11.6.1); 7-254 are
    reserved here."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskManagementRequest:
    """A SCSI Task Management Function Request (opcode 0x02).

    ``referenced_task_tag`` is the ITT of the task that ABORT TASK or TASK REASSIGN acts on,
    and the all-ones reserved tag with every other function (see
    :attr:`TaskFunction.references_task`; the codec refuses any other pairing). ``lun``,
    ``refcmdsn`` and ``expdatasn`` are kept raw whatever the function: the LUN means something
    for the functions on one logical unit (ABORT TASK, ABORT TASK SET, CLEAR ACA, CLEAR TASK
    SET, LOGICAL UNIT RESET), RefCmdSN for ABORT TASK (the CmdSN of the task to abort),
    ExpDataSN for TASK REASSIGN. Initiators send these as immediate commands, hence the
    default ``immediate``.
    """

    function: TaskFunction
    itt: int
    cmdsn: int
    expstatsn: int
    referenced_task_tag: int = RESERVED_TAG
    lun: bytes = bytes(LUN_LENGTH)
    refcmdsn: int = 0
    expdatasn: int = 0
    immediate: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskManagementResponse:
    """A SCSI Task Management Function Response (opcode 0x22): how the request tagged ``itt``
    ended. It advances StatSN."""

    response: TaskResponseCode
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int


class AsyncEvent(enum.IntEnum):
    """AsyncEvent of an Asynchronous Message (RFC 7143 11.9.1); 5-254 are reserved."""

    SCSI_EVENT = 0  # a SCSI asynchronous event, told by the sense data
    REQUEST_LOGOUT = 1  # log out (this connection or the session) within Parameter3 seconds
    DROP_CONNECTION = 2  # the target will drop the connection whose CID is Parameter1
    DROP_ALL_CONNECTIONS = 3  # the target will drop every connection of the session
    REQUEST_NEGOTIATION = 4  # send a Text Request (even an empty one) within Parameter3 seconds
    VENDOR_SPECIFIC = 255  # AsyncVCode says what


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncMessage:
    """An Asynchronous Message (opcode 0x32): an event the target reports without being asked.

    It carries no task (its ITT is the all-ones reserved tag) but it does advance StatSN. The
    three parameters are kept raw whatever the event; what they mean depends on it (RFC 7143
    11.9.1), and the properties below read them only where the RFC defines them:

    ======================== ================= ================= ==========================
    ``async_event``          ``parameter1``    ``parameter2``    ``parameter3``
    ======================== ================= ================= ==========================
    REQUEST_LOGOUT           reserved          reserved          seconds to log out within
    DROP_CONNECTION          CID being dropped Time2Wait         Time2Retain
    DROP_ALL_CONNECTIONS     reserved          Time2Wait         Time2Retain
    REQUEST_NEGOTIATION      reserved          reserved          seconds to send Text within
    ======================== ================= ================= ==========================

    ``async_vcode`` is the vendor's detail code, meaningful only with VENDOR_SPECIFIC; ``lun``
    (8 raw bytes) only with SCSI_EVENT. ``data`` is the whole data segment: SenseLength, sense,
    then iSCSI event data (see :func:`sense_data_segment`, :attr:`sense`, :attr:`event_data`);
    a SCSI_EVENT must carry sense, since the sense data is the event.
    """

    async_event: AsyncEvent
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: bytes = bytes(LUN_LENGTH)
    async_vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data: bytes = b""

    @property
    def sense(self) -> bytes:
        """The sense data (empty when the segment has none); the codec checks its length."""
        return _split_sense(self.data)[0]

    @property
    def event_data(self) -> bytes:
        """The iSCSI event data after the sense (vendor-defined; an initiator may ignore it)."""
        return _split_sense(self.data)[1]

    @property
    def respond_within(self) -> int | None:
        """Seconds the target allows for the Logout (REQUEST_LOGOUT) or the Text Request
        (REQUEST_NEGOTIATION) it asks for: Parameter3. None for other events."""
        if self.async_event in (AsyncEvent.REQUEST_LOGOUT, AsyncEvent.REQUEST_NEGOTIATION):
            return self.parameter3
        return None

    @property
    def dropped_cid(self) -> int | None:
        """The CID of the connection a DROP_CONNECTION is about: Parameter1."""
        return self.parameter1 if self.async_event is AsyncEvent.DROP_CONNECTION else None

    @property
    def time2wait(self) -> int | None:
        """Seconds to wait before reconnecting, for the DROP events (Parameter2; 0: at once)."""
        return self.parameter2 if self.async_event in _DROP_EVENTS else None

    @property
    def time2retain(self) -> int | None:
        """Seconds, after Time2Wait, within which tasks can be reassigned, for the DROP events
        (Parameter3; 0: the target ends them at once)."""
        return self.parameter3 if self.async_event in _DROP_EVENTS else None


_DROP_EVENTS = frozenset({AsyncEvent.DROP_CONNECTION, AsyncEvent.DROP_ALL_CONNECTIONS})


PDU: TypeAlias = (
    LoginRequest
    | LoginResponse
    | TextRequest
    | TextResponse
    | LogoutRequest
    | LogoutResponse
    | Reject
    | NopOut
    | NopIn
    | ScsiCommand
    | ScsiResponse
    | ScsiDataIn
    | ScsiDataOut
    | R2T
    | TaskManagementRequest
    | TaskManagementResponse
    | AsyncMessage
)
