"""The iSCSI PDU wire format: :mod:`~pyiscsi_failover.protocol.pdu` models to bytes and back.

This is the only module that imports ``construct``. Each opcode has one ``Struct`` for its
48-byte Basic Header Segment with fields named as in RFC 7143; decoding turns its raw integers at
once into the frozen dataclasses and IntEnums of ``pdu``, and encoding goes the other way. What
surrounds the BHS (AHS, header digest, padded data segment, data digest) is placed by
:func:`_layout`, which every PDU needs anyway to be framed, and sliced or joined in plain Python.
Every failure leaves through one choke point per direction as
:class:`~pyiscsi_failover.errors.PDUDecodeError` (naming field, byte offset and value) or
:class:`~pyiscsi_failover.errors.PDUEncodeError`; nothing from construct, ``struct`` or the
builtins escapes.

Decisions (RFC 7143 section 11: senders zero reserved fields, receivers ignore them, and a
reserved *code value* in a defined field is a protocol error):

* Reserved bits and bytes are written as zero and ignored on receipt, everywhere. tgt, the
  reference peer, zeroes them, but nothing is gained by dropping a login over one.
* Fixed values are checked on receipt: the opcode, ``I`` = 1 in a Login Request (RFC 7143
  11.12: "always 1"), ``F`` = 1 in the single-PDU types (Logout, NOP, Reject, Asynchronous
  Message, R2T, Task Management) and the all-ones ITT of a Reject and of an Asynchronous
  Message. Every target we know sets them; a peer that does not is confused.
* Reserved code values are errors: an unknown opcode, stage 2 in CSG or NSG (also when ``T`` = 0,
  since the model must hold a real stage), Status-Class above 3, an unknown logout reason,
  logout response or reject reason, task management function or response, AsyncEvent 5-254.
  ``T`` and ``C`` both set in a Login PDU is an error too.
* Status-Detail may be any byte (the model keeps the raw value). ISID type 3 (reserved) is let
  through: the model carries it and the initiator compares the echoed ISID anyway.
* Padding bytes are ignored on receipt (the data digest still covers them as received).
* A data digest follows the data segment only when the segment is not empty, as in open-iscsi,
  LIO and tgt. The header digest covers BHS and AHS, and is checked before any BHS field.
* The AHS is skipped on decode and never sent; the 8-bit TotalAHSLength bounds it to 1020
  bytes. A SCSI Command with a CDB over 16 bytes (extended CDB AHS) or a bidirectional read
  length (AHS) is therefore refused on encode; the probe's CDBs all fit. Logout PDUs carry no
  data segment, so one is an error.

SCSI PDUs (RFC 7143 11.3, 11.4, 11.7). Rules tying fields together are checked both ways,
encode and decode, so a model that decodes also encodes to the same bytes:

* SCSI Command: ATTR 5-7 (reserved) is an error; so are F = W = 0 and a non-zero Expected Data
  Transfer Length with R = W = 0 (both "MUST NOT" in 11.3.1). The CDB field is kept whole (16
  bytes); the LUN as 8 raw bytes.
* SCSI Response: byte 1 bit 7 is fixed at 1. O with U, or o with u, is an error (11.4.5: a
  protocol error). Response 0x02-0x7f is reserved and an error; 0x80-0xff (vendor) is kept.
  Status is read only when Response is 0 (11.4.3: otherwise it is not valid, and ignored); an
  unknown status is an error. The data segment must be empty or hold a 2-byte SenseLength
  whose sense fits in it (11.4.7), and CHECK CONDITION must carry sense (autosense is
  mandatory in iSCSI): violations are errors on SenseLength, at its byte in the PDU.
* SCSI Data-In: S without F is an error (11.7.3, "F MUST also be set"), as is a status other
  than GOOD, CONDITION MET or INTERMEDIATE(-CONDITION MET) with S: any other needs a Response,
  which alone can carry sense. Without S the Status byte is reserved and ignored. O with U is an
  error. StatSN, O/U and the residual are kept raw whatever S says (meaningful only with S).

Writes and task management (RFC 7143 11.5, 11.6, 11.7, 11.8), checked both ways as well:

* SCSI Data-Out carries no rule between its fields: the TTT is the all-ones tag for
  unsolicited data or an R2T's, and the LUN (raw) means something only with the latter.
* R2T: byte 1 bit 7 is fixed at 1. The TTT must not be the all-ones tag ("MUST NOT be sent by
  a target in an R2T") and the Desired Data Transfer Length must not be 0; both are errors.
* Task Management Function Request: ``F`` is fixed at 1. Function 0 and 9-127 are reserved,
  so errors (RFC 7144 defines 9-12 and the Response 7 that goes with them; this codec does not
  model them). The Referenced Task Tag names a task exactly for ABORT TASK and TASK REASSIGN;
  with any other function it must be the all-ones tag ("MUST be set to the reserved value"),
  and with those two it must not be: either mismatch is an error on ReferencedTaskTag. The
  LUN, RefCmdSN and ExpDataSN are kept raw whatever the function, each being reserved for
  some. TASK REASSIGN's other conditions (ErrorRecoveryLevel 2, a logged-out connection) are
  session state, not the codec's.
* Task Management Function Response: byte 1 bit 7 is fixed at 1; Response 7-254 is reserved,
  so an error.
* R2T and the two Task Management PDUs carry no data segment: one is an error, as for Logout.

Asynchronous Message (RFC 7143 11.9), which a target may send at any time in the Full Feature
Phase:

* AsyncEvent 0-4 and 255 (vendor-specific) are known; 5-254 are reserved, so an error (section
  11: a reserved code value is a protocol error). Refusing an event we cannot name is safe: each
  of them asks the initiator to act (log out, renegotiate, expect a drop), and a probe that does
  not know how must not carry on as if nothing was asked.
* AsyncVCode, the LUN and Parameter1-3 are kept raw whatever the event, as Data-In keeps
  StatSN: each is reserved for some events, and the model names what each means per event.
* The data segment is read like a SCSI Response's: empty, or SenseLength, sense and iSCSI event
  data (11.9.4); a SenseLength that overruns it is an error, and so is a SCSI event (0) without
  sense, since the sense data is the event.

Speed: per PDU, construct parses or builds the 48-byte BHS alone, once, with its Struct
compiled by ``.compile()`` (see ``_COMPILED``: the interpreted Struct stays the definition and
reports every error); what surrounds the BHS is sliced and joined in plain Python from
``_layout``. The flag bytes are plain ``Int8ub`` fields split with named masks rather than
``BitStruct`` s (see ``_FLAG_BITS``). Errors keep their fields, offsets, values and messages,
reported in wire order.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import binascii
import enum
import functools
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, TypeAlias, TypeVar

from construct import (
    Bytes,
    BytesInteger,
    Const,
    Construct,
    ConstructError,
    Container,
    ExprAdapter,
    FormatField,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Padded,
    Padding,
    Pass,
    Renamed,
    Struct,
)

from pyiscsi_failover.errors import PDUDecodeError, PDUEncodeError
from pyiscsi_failover.protocol.digest import DIGEST_LENGTH, crc32c
from pyiscsi_failover.protocol.pdu import (
    CDB_LENGTH,
    ISID,
    LUN_LENGTH,
    PDU,
    R2T,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    LoginRequest,
    LoginResponse,
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
    ScsiDataOut,
    ScsiResponse,
    ScsiResponseCode,
    ScsiStatus,
    Stage,
    StatusClass,
    TaskAttribute,
    TaskFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskResponseCode,
    TextRequest,
    TextResponse,
)

__all__ = [
    "BHS_LENGTH",
    "MAX_AHS_LENGTH",
    "MAX_DATA_SEGMENT_LENGTH",
    "decode_pdu",
    "encode_pdu",
    "next_pdu",
    "pdu_length",
]

#: Length of the Basic Header Segment every PDU starts with.
BHS_LENGTH: Final = 48
#: The largest DataSegmentLength the 24-bit field can express.
MAX_DATA_SEGMENT_LENGTH: Final = 2**24 - 1
#: The largest AHS the 8-bit TotalAHSLength (in 4-byte words) can announce.
MAX_AHS_LENGTH: Final = 255 * 4

# Names of construct levels that only hold bits or group the header; they are left out of the
# field names our errors report ("ISID.A", not "Header.ISID.TA.A").
_GROUPS: Final = frozenset({"Header", "Byte0", "Byte1", "TA"})


# --------------------------------------------------------------------------------------------
# construct definitions
# --------------------------------------------------------------------------------------------

# _FLAG_BITS: bytes 0 and 1 of the BHS and byte 0 of the ISID are bit fields. They are read and
# written as whole bytes (Int8ub) and split with these masks in plain Python: a measured speed
# choice. construct's BitStruct turns each such byte into eight one-byte "bits" and parses those
# one by one; in a profile of a Login Response that was about 37% of decode and 38% of encode
# time (construct 2.10.70, CPython 3.11). BHS bytes 0 and 1 are split in the conversion layer
# below; ISID byte 0 in an ExprAdapter, so that a bad T or A is still reported in field order.
# Bits not named here are reserved.

#: Byte 0, ``I``: immediate delivery (initiator PDUs; reserved in target PDUs).
_IMMEDIATE: Final = 0x40
#: Byte 0: the opcode.
_OPCODE: Final = 0x3F
#: Byte 1, ``F``: final PDU of a sequence (Text, Logout Request, the single-PDU types).
_FINAL: Final = 0x80
#: Byte 1 of Login PDUs, ``T``: transit to the next stage.
_TRANSIT: Final = 0x80
#: Byte 1 of Login and Text PDUs, ``C``: the text continues in the next PDU.
_CONTINUE: Final = 0x40
#: Byte 1 of Login PDUs: ``CSG`` is bits 3-2, ``NSG`` bits 1-0.
_CSG_SHIFT: Final = 2
_STAGE: Final = 0x03
#: Byte 1 of a Logout Request: the reason code below ``F``.
_REASON_CODE: Final = 0x7F
#: Byte 1 of a Task Management Function Request: the function below ``F``.
_FUNCTION: Final = 0x7F
#: Byte 1 of a SCSI Command: ``R`` (read), ``W`` (write) and ``ATTR`` (task attribute).
_READ: Final = 0x40
_WRITE: Final = 0x20
_ATTR: Final = 0x07
#: Byte 1 of a SCSI Response: ``o``/``u`` (bidirectional read residual over/underflow) and
#: ``O``/``U`` (residual over/underflow); the last two mean the same in a SCSI Data-In.
_BIDI_OVERFLOW: Final = 0x10
_BIDI_UNDERFLOW: Final = 0x08
_OVERFLOW: Final = 0x04
_UNDERFLOW: Final = 0x02
#: Byte 1 of a SCSI Data-In: ``A`` (acknowledge) and ``S`` (status rides on this PDU).
_ACKNOWLEDGE: Final = 0x40
_STATUS: Final = 0x01
#: ISID byte 0: ``T`` (format) is bits 7-6, ``A`` bits 5-0.
_ISID_T_SHIFT: Final = 6
_ISID_T_WIDTH: Final = 2
_ISID_A: Final = 0x3F
_ISID_A_WIDTH: Final = 6


#: A parsed BHS: construct's Container, or the plain dict of a flat header (see _flat_parser).
_Fields: TypeAlias = Mapping[str, Any]


def _bhs(
    bytes_2_3: Sequence[Construct[Any, Any]], bytes_8_47: Sequence[Construct[Any, Any]]
) -> Struct:
    """The 48-byte BHS; bytes 0, 1 and 4-7 are laid out the same for every opcode."""
    return Struct(
        "Byte0" / Int8ub,  # reserved bit, I, Opcode
        "Byte1" / Int8ub,  # opcode-specific flags
        *bytes_2_3,
        "TotalAHSLength" / Int8ub,
        "DataSegmentLength" / Int24ub,
        *bytes_8_47,
    )


def _join_ta(ta: dict[str, Any], _context: object) -> int:
    """ISID byte 0 from ``{"T": ..., "A": ...}``, range-checked as a BitsInteger pair would be.

    Runs inside the build, so a bad T or A is reported in field order like any other field.
    """
    t = _bits(ta["T"], _ISID_T_WIDTH, ("ISID", "TA", "T"))
    return t << _ISID_T_SHIFT | _bits(ta["A"], _ISID_A_WIDTH, ("ISID", "TA", "A"))


def _split_ta(byte: int, _context: object) -> dict[str, int]:
    return {"T": byte >> _ISID_T_SHIFT, "A": byte & _ISID_A}


#: Bytes 8-13 of Login PDUs.
_ISID: Final = Struct(
    "TA" / ExprAdapter(Int8ub, _split_ta, _join_ta),  # T and A, see _FLAG_BITS
    "B" / Int16ub,
    "C" / Int8ub,
    "D" / Int16ub,
)

_LOGIN_REQUEST: Final = _bhs(
    ("VersionMax" / Int8ub, "VersionMin" / Int8ub),
    (
        "ISID" / _ISID,
        "TSIH" / Int16ub,
        "InitiatorTaskTag" / Int32ub,
        "CID" / Int16ub,
        Padding(2),
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        Padding(16),
    ),
)
_LOGIN_RESPONSE: Final = _bhs(
    ("VersionMax" / Int8ub, "VersionActive" / Int8ub),
    (
        "ISID" / _ISID,
        "TSIH" / Int16ub,
        "InitiatorTaskTag" / Int32ub,
        Padding(4),
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "StatusClass" / Int8ub,
        "StatusDetail" / Int8ub,
        Padding(10),
    ),
)
_TEXT_REQUEST: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Int64ub,
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        Padding(16),
    ),
)
_TEXT_RESPONSE: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Int64ub,
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        Padding(12),
    ),
)
_LOGOUT_REQUEST: Final = _bhs(
    (Padding(2),),
    (
        Padding(8),
        "InitiatorTaskTag" / Int32ub,
        "CID" / Int16ub,
        Padding(2),
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        Padding(16),
    ),
)
_LOGOUT_RESPONSE: Final = _bhs(
    ("Response" / Int8ub, Padding(1)),
    (
        Padding(8),
        "InitiatorTaskTag" / Int32ub,
        Padding(4),
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        Padding(4),
        "Time2Wait" / Int16ub,
        "Time2Retain" / Int16ub,
        Padding(4),
    ),
)
_REJECT: Final = _bhs(
    ("Reason" / Int8ub, Padding(1)),
    (
        Padding(8),
        "InitiatorTaskTag" / Const(RESERVED_TAG, Int32ub),
        Padding(4),
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "DataSN" / Int32ub,
        Padding(8),
    ),
)
_NOP_OUT: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Int64ub,
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        Padding(16),
    ),
)
_NOP_IN: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Int64ub,
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        Padding(12),
    ),
)
# The SCSI PDUs keep the LUN as its 8 raw bytes: its meaning depends on the addressing method
# in its first byte, which the SCSI layer above decides (SAM, flat, W-LUN...).
_SCSI_COMMAND: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Int32ub,
        "ExpectedDataTransferLength" / Int32ub,
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        "CDB" / Bytes(CDB_LENGTH),
    ),
)
_SCSI_RESPONSE: Final = _bhs(
    ("Response" / Int8ub, "Status" / Int8ub),
    (
        Padding(8),
        "InitiatorTaskTag" / Int32ub,
        "SNACKTag" / Int32ub,
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "ExpDataSN" / Int32ub,
        "BidirectionalReadResidualCount" / Int32ub,
        "ResidualCount" / Int32ub,
    ),
)
_SCSI_DATA_IN: Final = _bhs(
    (Padding(1), "Status" / Int8ub),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "DataSN" / Int32ub,
        "BufferOffset" / Int32ub,
        "ResidualCount" / Int32ub,
    ),
)
_SCSI_DATA_OUT: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        Padding(4),
        "ExpStatSN" / Int32ub,
        Padding(4),
        "DataSN" / Int32ub,
        "BufferOffset" / Int32ub,
        Padding(4),
    ),
)
_R2T: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Int32ub,
        "TargetTransferTag" / Int32ub,
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "R2TSN" / Int32ub,
        "BufferOffset" / Int32ub,
        "DesiredDataTransferLength" / Int32ub,
    ),
)
_TASK_MANAGEMENT_REQUEST: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Int32ub,
        "ReferencedTaskTag" / Int32ub,
        "CmdSN" / Int32ub,
        "ExpStatSN" / Int32ub,
        "RefCmdSN" / Int32ub,
        "ExpDataSN" / Int32ub,
        Padding(8),
    ),
)
_TASK_MANAGEMENT_RESPONSE: Final = _bhs(
    ("Response" / Int8ub, Padding(1)),
    (
        Padding(8),
        "InitiatorTaskTag" / Int32ub,
        Padding(4),
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        Padding(12),
    ),
)

_ASYNC_MESSAGE: Final = _bhs(
    (Padding(2),),
    (
        "LUN" / Bytes(LUN_LENGTH),
        "InitiatorTaskTag" / Const(RESERVED_TAG, Int32ub),
        Padding(4),
        "StatSN" / Int32ub,
        "ExpCmdSN" / Int32ub,
        "MaxCmdSN" / Int32ub,
        "AsyncEvent" / Int8ub,
        "AsyncVCode" / Int8ub,
        "Parameter1" / Int16ub,
        "Parameter2" / Int16ub,
        "Parameter3" / Int16ub,
        Padding(4),
    ),
)


@dataclass(frozen=True, slots=True)
class _FixedBit:
    """A flag RFC 7143 fixes at 1; checked on receipt before any other BHS field."""

    names: tuple[str, str]  # the byte's field and the flag's RFC name
    offset: int
    mask: int


#: ``I`` of a Login Request.
_ALWAYS_IMMEDIATE: Final = _FixedBit(("Byte0", "I"), 0, _IMMEDIATE)
#: ``F`` of a Logout Request, an R2T, the Task Management PDUs and the single-PDU types.
_ALWAYS_FINAL: Final = _FixedBit(("Byte1", "F"), 1, _FINAL)


# --------------------------------------------------------------------------------------------
# model <-> raw fields
# --------------------------------------------------------------------------------------------


class _FieldProblem(Exception):
    """A field value that is out of place; the choke points turn it into our public errors.

    ``names`` is the construct path below the header (e.g. ``("Byte1", "CSG")``), which is
    enough to find the field's byte offset. A field inside the data segment (SenseLength) has
    no such path; ``data_offset`` then gives its offset from the start of the data segment.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        value: object,
        reason: str,
        *,
        data_offset: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.names = names
        self.value = value
        self.reason = reason
        self.data_offset = data_offset


def _shown(value: object) -> object:
    """``value`` for an error, unless it is bulk: never echo what could be a data segment."""
    return None if isinstance(value, (dict, bytes, bytearray, memoryview)) else value


def _bits(value: object, width: int, names: tuple[str, ...]) -> int:
    """``value`` as an unsigned ``width``-bit field (messages as construct's BitsInteger)."""
    if not isinstance(value, int):
        raise _FieldProblem(names, _shown(value), f"value {value} is not an integer")
    if not 0 <= value < 1 << width:
        raise _FieldProblem(
            names, value, f"number {value} is out of range (min=0, max={(1 << width) - 1})"
        )
    return value


_E = TypeVar("_E", bound=enum.IntEnum)


def _to_enum(cls: type[_E], value: Any, names: tuple[str, ...]) -> _E:
    """``cls(value)``, or a _FieldProblem naming the field (unknown values are errors)."""
    try:
        member = cls._value2member_map_.get(value)  # calling the class costs several times more
        return cls(value) if member is None else member  # type: ignore[return-value]
    except (ValueError, TypeError):
        raise _FieldProblem(names, value, f"{value!r} is not a valid {cls.__name__}") from None


def _byte0(opcode: Opcode, *, immediate: object = False) -> int:
    return (_IMMEDIATE if immediate else 0) | opcode


def _login_byte1(transit: object, cont: object, csg: object, nsg: object) -> int:
    if transit and cont:
        raise _FieldProblem(("Byte1", "C"), cont, "T and C must not both be set")
    return (
        (_TRANSIT if transit else 0)
        | (_CONTINUE if cont else 0)
        | _to_enum(Stage, csg, ("Byte1", "CSG")) << _CSG_SHIFT
        | _to_enum(Stage, nsg, ("Byte1", "NSG"))
    )


def _login_flags_out(byte1: int) -> tuple[bool, bool, Stage, Stage]:
    transit, cont = bool(byte1 & _TRANSIT), bool(byte1 & _CONTINUE)
    if transit and cont:
        raise _FieldProblem(("Byte1", "C"), True, "T and C must not both be set")
    return (
        transit,
        cont,
        _to_enum(Stage, byte1 >> _CSG_SHIFT & _STAGE, ("Byte1", "CSG")),
        _to_enum(Stage, byte1 & _STAGE, ("Byte1", "NSG")),
    )


def _text_byte1(final: object, cont: object) -> int:
    return (_FINAL if final else 0) | (_CONTINUE if cont else 0)


def _isid_in(isid: ISID) -> dict[str, Any]:
    if not isinstance(isid, ISID):
        raise _FieldProblem(("ISID",), type(isid).__name__, "must be an ISID")
    return {"TA": {"T": isid.t, "A": isid.a}, "B": isid.b, "C": isid.c, "D": isid.d}


def _isid_out(raw: Container[Any]) -> ISID:
    return ISID(t=raw["TA"]["T"], a=raw["TA"]["A"], b=raw["B"], c=raw["C"], d=raw["D"])


def _no_data(data: bytes, what: str) -> None:
    if data:
        raise _FieldProblem(("DataSegmentLength",), len(data), f"a {what} has no data segment")


def _login_request_in(p: LoginRequest) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.LOGIN_REQUEST, immediate=True),
        "Byte1": _login_byte1(p.transit, p.cont, p.csg, p.nsg),
        "VersionMax": p.version_max,
        "VersionMin": p.version_min,
        "ISID": _isid_in(p.isid),
        "TSIH": p.tsih,
        "InitiatorTaskTag": p.itt,
        "CID": p.cid,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


# The *_out functions read parsed fields as h["Name"], not h.Name: Container's attribute access
# runs a Python-level __getattr__, which cost about 15% of a decode.


def _login_request_out(h: _Fields, data: bytes) -> LoginRequest:
    transit, cont, csg, nsg = _login_flags_out(h["Byte1"])
    return LoginRequest(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        isid=_isid_out(h["ISID"]),
        itt=h["InitiatorTaskTag"],
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        tsih=h["TSIH"],
        cid=h["CID"],
        version_max=h["VersionMax"],
        version_min=h["VersionMin"],
        data=data,
    )


def _login_response_in(p: LoginResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.LOGIN_RESPONSE),
        "Byte1": _login_byte1(p.transit, p.cont, p.csg, p.nsg),
        "VersionMax": p.version_max,
        "VersionActive": p.version_active,
        "ISID": _isid_in(p.isid),
        "TSIH": p.tsih,
        "InitiatorTaskTag": p.itt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "StatusClass": int(_to_enum(StatusClass, p.status_class, ("StatusClass",))),
        "StatusDetail": p.status_detail,
    }, p.data


def _login_response_out(h: _Fields, data: bytes) -> LoginResponse:
    transit, cont, csg, nsg = _login_flags_out(h["Byte1"])
    return LoginResponse(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        isid=_isid_out(h["ISID"]),
        itt=h["InitiatorTaskTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        status_class=_to_enum(StatusClass, h["StatusClass"], ("StatusClass",)),
        status_detail=h["StatusDetail"],
        tsih=h["TSIH"],
        version_max=h["VersionMax"],
        version_active=h["VersionActive"],
        data=data,
    )


def _text_request_in(p: TextRequest) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.TEXT_REQUEST, immediate=p.immediate),
        "Byte1": _text_byte1(p.final, p.cont),
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


def _text_request_out(h: _Fields, data: bytes) -> TextRequest:
    return TextRequest(
        final=bool(h["Byte1"] & _FINAL),
        cont=bool(h["Byte1"] & _CONTINUE),
        itt=h["InitiatorTaskTag"],
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        ttt=h["TargetTransferTag"],
        lun=h["LUN"],
        immediate=bool(h["Byte0"] & _IMMEDIATE),
        data=data,
    )


def _text_response_in(p: TextResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.TEXT_RESPONSE),
        "Byte1": _text_byte1(p.final, p.cont),
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
    }, p.data


def _text_response_out(h: _Fields, data: bytes) -> TextResponse:
    return TextResponse(
        final=bool(h["Byte1"] & _FINAL),
        cont=bool(h["Byte1"] & _CONTINUE),
        itt=h["InitiatorTaskTag"],
        ttt=h["TargetTransferTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        lun=h["LUN"],
        data=data,
    )


def _logout_request_in(p: LogoutRequest) -> tuple[dict[str, Any], bytes]:
    reason = _to_enum(LogoutReason, p.reason, ("Byte1", "ReasonCode"))
    return {
        "Byte0": _byte0(Opcode.LOGOUT_REQUEST, immediate=p.immediate),
        "Byte1": _FINAL | reason,
        "InitiatorTaskTag": p.itt,
        "CID": p.cid,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, b""


def _logout_request_out(h: _Fields, data: bytes) -> LogoutRequest:
    _no_data(data, "Logout Request")
    return LogoutRequest(
        reason=_to_enum(LogoutReason, h["Byte1"] & _REASON_CODE, ("Byte1", "ReasonCode")),
        itt=h["InitiatorTaskTag"],
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        cid=h["CID"],
        immediate=bool(h["Byte0"] & _IMMEDIATE),
    )


def _logout_response_in(p: LogoutResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.LOGOUT_RESPONSE),
        "Byte1": _FINAL,
        "Response": int(_to_enum(LogoutResponseCode, p.response, ("Response",))),
        "InitiatorTaskTag": p.itt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "Time2Wait": p.time2wait,
        "Time2Retain": p.time2retain,
    }, b""


def _logout_response_out(h: _Fields, data: bytes) -> LogoutResponse:
    _no_data(data, "Logout Response")
    return LogoutResponse(
        response=_to_enum(LogoutResponseCode, h["Response"], ("Response",)),
        itt=h["InitiatorTaskTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        time2wait=h["Time2Wait"],
        time2retain=h["Time2Retain"],
    )


def _reject_in(p: Reject) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.REJECT),
        "Byte1": _FINAL,
        "Reason": int(_to_enum(RejectReason, p.reason, ("Reason",))),
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "DataSN": p.datasn,
    }, p.data


def _reject_out(h: _Fields, data: bytes) -> Reject:
    return Reject(
        reason=_to_enum(RejectReason, h["Reason"], ("Reason",)),
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        datasn=h["DataSN"],
        data=data,
    )


def _nop_out_in(p: NopOut) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.NOP_OUT, immediate=p.immediate),
        "Byte1": _FINAL,
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


def _nop_out_out(h: _Fields, data: bytes) -> NopOut:
    return NopOut(
        itt=h["InitiatorTaskTag"],
        ttt=h["TargetTransferTag"],
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        lun=h["LUN"],
        immediate=bool(h["Byte0"] & _IMMEDIATE),
        data=data,
    )


def _nop_in_in(p: NopIn) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.NOP_IN),
        "Byte1": _FINAL,
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
    }, p.data


def _nop_in_out(h: _Fields, data: bytes) -> NopIn:
    return NopIn(
        itt=h["InitiatorTaskTag"],
        ttt=h["TargetTransferTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        lun=h["LUN"],
        data=data,
    )


def _raw_lun(lun: object) -> bytes:
    if not isinstance(lun, (bytes, bytearray)) or len(lun) != LUN_LENGTH:
        shown = len(lun) if isinstance(lun, (bytes, bytearray)) else type(lun).__name__
        raise _FieldProblem(("LUN",), shown, f"a LUN is {LUN_LENGTH} raw bytes")
    return bytes(lun)


def _raw_cdb(cdb: object) -> bytes:
    if not isinstance(cdb, (bytes, bytearray)):
        raise _FieldProblem(("CDB",), type(cdb).__name__, "a CDB is bytes")
    if len(cdb) > CDB_LENGTH:
        raise _FieldProblem(
            ("CDB",),
            len(cdb),
            f"a CDB longer than {CDB_LENGTH} bytes needs an AHS, which this codec never sends",
        )
    return bytes(cdb) + bytes(CDB_LENGTH - len(cdb))


def _scsi_command_checks(final: bool, read: bool, write: bool, edtl: object) -> None:
    """RFC 7143 11.3.1: F and W not both 0; R or W set when data is expected."""
    if not final and not write:
        raise _FieldProblem(("Byte1", "F"), False, "F and W must not both be 0")
    if not read and not write and edtl:
        raise _FieldProblem(
            ("ExpectedDataTransferLength",),
            edtl,
            "a non-zero ExpectedDataTransferLength needs R or W",
        )


def _scsi_command_in(p: ScsiCommand) -> tuple[dict[str, Any], bytes]:
    attribute = _to_enum(TaskAttribute, p.attribute, ("Byte1", "ATTR"))
    _scsi_command_checks(bool(p.final), bool(p.read), bool(p.write), p.edtl)
    return {
        "Byte0": _byte0(Opcode.SCSI_COMMAND, immediate=p.immediate),
        "Byte1": (_FINAL if p.final else 0)
        | (_READ if p.read else 0)
        | (_WRITE if p.write else 0)
        | attribute,
        "LUN": _raw_lun(p.lun),
        "InitiatorTaskTag": p.itt,
        "ExpectedDataTransferLength": p.edtl,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
        "CDB": _raw_cdb(p.cdb),
    }, p.data


def _scsi_command_out(h: _Fields, data: bytes) -> ScsiCommand:
    byte1 = h["Byte1"]
    attribute = _to_enum(TaskAttribute, byte1 & _ATTR, ("Byte1", "ATTR"))
    final, read, write = bool(byte1 & _FINAL), bool(byte1 & _READ), bool(byte1 & _WRITE)
    edtl = h["ExpectedDataTransferLength"]
    _scsi_command_checks(final, read, write, edtl)
    return ScsiCommand(
        itt=h["InitiatorTaskTag"],
        edtl=edtl,
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        cdb=h["CDB"],
        lun=h["LUN"],
        read=read,
        write=write,
        final=final,
        attribute=attribute,
        immediate=bool(h["Byte0"] & _IMMEDIATE),
        data=data,
    )


def _residual_flags(overflow: object, underflow: object, *, bidi: bool = False) -> int:
    """O/U bits (o/u when ``bidi``, two bits higher): RFC 7143 11.4.5 makes each pair exclusive."""
    over, under = ("o", "u") if bidi else ("O", "U")
    if overflow and underflow:
        raise _FieldProblem(("Byte1", under), True, f"{over} and {under} must not both be set")
    bits = (_OVERFLOW if overflow else 0) | (_UNDERFLOW if underflow else 0)
    return bits << 2 if bidi else bits


#: Response codes RFC 7143 11.4.3 reserves (0x80-0xff are the vendors').
_RESERVED_RESPONSES: Final = range(0x02, 0x80)


def _response_code(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
        raise _FieldProblem(("Response",), _shown(value), f"{value!r} is not a response code")
    if value in _RESERVED_RESPONSES:
        raise _FieldProblem(("Response",), value, f"response code 0x{value:02x} is reserved")
    try:
        return ScsiResponseCode(value)
    except ValueError:
        return value  # vendor-specific


def _response_status(response: int, status: object) -> ScsiStatus | None:
    """RFC 7143 11.4.3: Status is valid only when the command completed (Response 0)."""
    if response != ScsiResponseCode.COMMAND_COMPLETED:
        if status is not None:
            raise _FieldProblem(
                ("Status",), _shown(status), "a status needs Response 0 (command completed)"
            )
        return None
    if status is None:
        raise _FieldProblem(("Status",), None, "a completed command (Response 0) has a status")
    return _to_enum(ScsiStatus, status, ("Status",))


def _check_sense(data: object, needs_sense: str | None) -> None:
    """The data segment is empty or SenseLength + sense + the rest (RFC 7143 11.4.7, 11.9.4);
    ``needs_sense`` names what must carry sense, if anything does."""
    if not isinstance(data, (bytes, bytearray)):
        return  # reported as DataSegment by the encoder
    sense_length = 0
    if data:
        if len(data) < 2:
            raise _FieldProblem(
                ("SenseLength",),
                len(data),
                "a 1-byte data segment cannot hold SenseLength",
                data_offset=0,
            )
        sense_length = int.from_bytes(data[:2], "big")
        if 2 + sense_length > len(data):
            raise _FieldProblem(
                ("SenseLength",),
                sense_length,
                f"{sense_length} bytes of sense overrun a {len(data)}-byte data segment",
                data_offset=0,
            )
    if needs_sense is not None and not sense_length:
        raise _FieldProblem(
            ("SenseLength",), sense_length, f"{needs_sense} without sense data", data_offset=0
        )


def _response_needs_sense(status: ScsiStatus | None) -> str | None:
    """A CHECK CONDITION must carry sense: autosense is mandatory in iSCSI."""
    return "CHECK CONDITION" if status is ScsiStatus.CHECK_CONDITION else None


def _scsi_response_in(p: ScsiResponse) -> tuple[dict[str, Any], bytes]:
    response = _response_code(p.response)
    status = _response_status(response, p.status)
    _check_sense(p.data, _response_needs_sense(status))
    return {
        "Byte0": _byte0(Opcode.SCSI_RESPONSE),
        "Byte1": _FINAL
        | _residual_flags(p.bidi_overflow, p.bidi_underflow, bidi=True)
        | _residual_flags(p.overflow, p.underflow),
        "Response": response,
        "Status": 0 if status is None else status,
        "InitiatorTaskTag": p.itt,
        "SNACKTag": p.snack_tag,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "ExpDataSN": p.expdatasn,
        "BidirectionalReadResidualCount": p.bidi_residual,
        "ResidualCount": p.residual,
    }, p.data


def _scsi_response_out(h: _Fields, data: bytes) -> ScsiResponse:
    byte1 = h["Byte1"]
    bidi_overflow, bidi_underflow = bool(byte1 & _BIDI_OVERFLOW), bool(byte1 & _BIDI_UNDERFLOW)
    overflow, underflow = bool(byte1 & _OVERFLOW), bool(byte1 & _UNDERFLOW)
    _residual_flags(bidi_overflow, bidi_underflow, bidi=True)
    _residual_flags(overflow, underflow)
    response = _response_code(h["Response"])
    # The Status byte is read only for a completed command; otherwise it has no meaning.
    status = (
        _to_enum(ScsiStatus, h["Status"], ("Status",))
        if response == ScsiResponseCode.COMMAND_COMPLETED
        else None
    )
    _check_sense(data, _response_needs_sense(status))
    return ScsiResponse(
        itt=h["InitiatorTaskTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        response=response,
        status=status,
        expdatasn=h["ExpDataSN"],
        overflow=overflow,
        underflow=underflow,
        residual=h["ResidualCount"],
        bidi_overflow=bidi_overflow,
        bidi_underflow=bidi_underflow,
        bidi_residual=h["BidirectionalReadResidualCount"],
        snack_tag=h["SNACKTag"],
        data=data,
    )


#: Statuses that may ride on a final Data-In: those of a task that ended without an exception
#: (RFC 7143 11.7.3); any other needs a SCSI Response, which can carry sense.
_DATA_IN_STATUSES: Final = frozenset(
    {
        ScsiStatus.GOOD,
        ScsiStatus.CONDITION_MET,
        ScsiStatus.INTERMEDIATE,
        ScsiStatus.INTERMEDIATE_CONDITION_MET,
    }
)


def _data_in_status(final: bool, status: object) -> ScsiStatus | None:
    if status is None:
        return None
    if not final:
        raise _FieldProblem(("Byte1", "S"), True, "S (status) is set without F (final)")
    found = _to_enum(ScsiStatus, status, ("Status",))
    if found not in _DATA_IN_STATUSES:
        raise _FieldProblem(
            ("Status",), int(found), f"{found.name} cannot ride on a Data-In, only on a Response"
        )
    return found


def _scsi_data_in_in(p: ScsiDataIn) -> tuple[dict[str, Any], bytes]:
    status = _data_in_status(bool(p.final), p.status)
    return {
        "Byte0": _byte0(Opcode.SCSI_DATA_IN),
        "Byte1": (_FINAL if p.final else 0)
        | (_ACKNOWLEDGE if p.acknowledge else 0)
        | _residual_flags(p.overflow, p.underflow)
        | (0 if status is None else _STATUS),
        "Status": 0 if status is None else status,
        "LUN": _raw_lun(p.lun),
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "DataSN": p.datasn,
        "BufferOffset": p.buffer_offset,
        "ResidualCount": p.residual,
    }, p.data


def _scsi_data_in_out(h: _Fields, data: bytes) -> ScsiDataIn:
    byte1 = h["Byte1"]
    final, overflow, underflow = (
        bool(byte1 & _FINAL),
        bool(byte1 & _OVERFLOW),
        bool(byte1 & _UNDERFLOW),
    )
    _residual_flags(overflow, underflow)
    # Without S the Status byte is reserved: ignored, like every reserved field.
    status = _data_in_status(final, h["Status"] if byte1 & _STATUS else None)
    return ScsiDataIn(
        itt=h["InitiatorTaskTag"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        datasn=h["DataSN"],
        buffer_offset=h["BufferOffset"],
        final=final,
        acknowledge=bool(byte1 & _ACKNOWLEDGE),
        status=status,
        statsn=h["StatSN"],
        overflow=overflow,
        underflow=underflow,
        residual=h["ResidualCount"],
        ttt=h["TargetTransferTag"],
        lun=h["LUN"],
        data=data,
    )


def _scsi_data_out_in(p: ScsiDataOut) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.SCSI_DATA_OUT),
        "Byte1": _FINAL if p.final else 0,
        "LUN": _raw_lun(p.lun),
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "ExpStatSN": p.expstatsn,
        "DataSN": p.datasn,
        "BufferOffset": p.buffer_offset,
    }, p.data


def _scsi_data_out_out(h: _Fields, data: bytes) -> ScsiDataOut:
    return ScsiDataOut(
        itt=h["InitiatorTaskTag"],
        expstatsn=h["ExpStatSN"],
        datasn=h["DataSN"],
        buffer_offset=h["BufferOffset"],
        final=bool(h["Byte1"] & _FINAL),
        ttt=h["TargetTransferTag"],
        lun=h["LUN"],
        data=data,
    )


def _r2t_checks(ttt: object, desired_length: object) -> None:
    """RFC 7143 11.8: an R2T carries a TTT of its own and asks for at least one byte."""
    if ttt == RESERVED_TAG:
        raise _FieldProblem(
            ("TargetTransferTag",), ttt, "an R2T never carries the reserved tag 0xffffffff"
        )
    if desired_length == 0:
        raise _FieldProblem(
            ("DesiredDataTransferLength",), desired_length, "an R2T asks for at least one byte"
        )


def _r2t_in(p: R2T) -> tuple[dict[str, Any], bytes]:
    _r2t_checks(p.ttt, p.desired_length)
    return {
        "Byte0": _byte0(Opcode.R2T),
        "Byte1": _FINAL,
        "LUN": _raw_lun(p.lun),
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "R2TSN": p.r2tsn,
        "BufferOffset": p.buffer_offset,
        "DesiredDataTransferLength": p.desired_length,
    }, b""


def _r2t_out(h: _Fields, data: bytes) -> R2T:
    _no_data(data, "R2T")
    _r2t_checks(h["TargetTransferTag"], h["DesiredDataTransferLength"])
    return R2T(
        itt=h["InitiatorTaskTag"],
        ttt=h["TargetTransferTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        r2tsn=h["R2TSN"],
        desired_length=h["DesiredDataTransferLength"],
        buffer_offset=h["BufferOffset"],
        lun=h["LUN"],
    )


def _referenced_task_check(function: TaskFunction, tag: object) -> None:
    """RFC 7143 11.5.2: ABORT TASK and TASK REASSIGN name a task (a real ITT), every other
    function the all-ones reserved tag."""
    if function.references_task:
        if tag == RESERVED_TAG:
            raise _FieldProblem(
                ("ReferencedTaskTag",),
                tag,
                f"{function.name} needs the tag of a task, not the reserved 0xffffffff",
            )
    elif tag != RESERVED_TAG:
        raise _FieldProblem(
            ("ReferencedTaskTag",),
            _shown(tag),
            f"{function.name} names no task: ReferencedTaskTag must be 0xffffffff",
        )


def _task_management_request_in(p: TaskManagementRequest) -> tuple[dict[str, Any], bytes]:
    function = _to_enum(TaskFunction, p.function, ("Byte1", "Function"))
    _referenced_task_check(function, p.referenced_task_tag)
    return {
        "Byte0": _byte0(Opcode.TASK_MANAGEMENT_REQUEST, immediate=p.immediate),
        "Byte1": _FINAL | function,
        "LUN": _raw_lun(p.lun),
        "InitiatorTaskTag": p.itt,
        "ReferencedTaskTag": p.referenced_task_tag,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
        "RefCmdSN": p.refcmdsn,
        "ExpDataSN": p.expdatasn,
    }, b""


def _task_management_request_out(h: _Fields, data: bytes) -> TaskManagementRequest:
    function = _to_enum(TaskFunction, h["Byte1"] & _FUNCTION, ("Byte1", "Function"))
    _no_data(data, "Task Management Function Request")
    _referenced_task_check(function, h["ReferencedTaskTag"])
    return TaskManagementRequest(
        function=function,
        itt=h["InitiatorTaskTag"],
        cmdsn=h["CmdSN"],
        expstatsn=h["ExpStatSN"],
        referenced_task_tag=h["ReferencedTaskTag"],
        lun=h["LUN"],
        refcmdsn=h["RefCmdSN"],
        expdatasn=h["ExpDataSN"],
        immediate=bool(h["Byte0"] & _IMMEDIATE),
    )


def _task_management_response_in(p: TaskManagementResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": _byte0(Opcode.TASK_MANAGEMENT_RESPONSE),
        "Byte1": _FINAL,
        "Response": int(_to_enum(TaskResponseCode, p.response, ("Response",))),
        "InitiatorTaskTag": p.itt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
    }, b""


def _task_management_response_out(h: _Fields, data: bytes) -> TaskManagementResponse:
    response = _to_enum(TaskResponseCode, h["Response"], ("Response",))
    _no_data(data, "Task Management Function Response")
    return TaskManagementResponse(
        response=response,
        itt=h["InitiatorTaskTag"],
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
    )


def _async_needs_sense(event: AsyncEvent) -> str | None:
    return "a SCSI event (AsyncEvent 0)" if event is AsyncEvent.SCSI_EVENT else None


def _async_message_in(p: AsyncMessage) -> tuple[dict[str, Any], bytes]:
    event = _to_enum(AsyncEvent, p.async_event, ("AsyncEvent",))
    _check_sense(p.data, _async_needs_sense(event))
    return {
        "Byte0": _byte0(Opcode.ASYNC_MESSAGE),
        "Byte1": _FINAL,
        "LUN": _raw_lun(p.lun),
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "AsyncEvent": int(event),
        "AsyncVCode": p.async_vcode,
        "Parameter1": p.parameter1,
        "Parameter2": p.parameter2,
        "Parameter3": p.parameter3,
    }, p.data


def _async_message_out(h: _Fields, data: bytes) -> AsyncMessage:
    event = _to_enum(AsyncEvent, h["AsyncEvent"], ("AsyncEvent",))
    _check_sense(data, _async_needs_sense(event))
    return AsyncMessage(
        async_event=event,
        statsn=h["StatSN"],
        expcmdsn=h["ExpCmdSN"],
        maxcmdsn=h["MaxCmdSN"],
        lun=h["LUN"],
        async_vcode=h["AsyncVCode"],
        parameter1=h["Parameter1"],
        parameter2=h["Parameter2"],
        parameter3=h["Parameter3"],
        data=data,
    )


_P = TypeVar("_P")


@dataclass(frozen=True, slots=True)
class _Codec(Generic[_P]):
    """Everything needed to move one PDU type across the wire."""

    model: type[_P]
    header: Struct
    fixed_bits: tuple[_FixedBit, ...]
    fields_in: Callable[[_P], tuple[dict[str, Any], bytes]]
    fields_out: Callable[[_Fields, bytes], _P]


_BY_OPCODE: Final[dict[int, _Codec[Any]]] = {
    Opcode.LOGIN_REQUEST: _Codec(
        LoginRequest,
        _LOGIN_REQUEST,
        (_ALWAYS_IMMEDIATE,),
        _login_request_in,
        _login_request_out,
    ),
    Opcode.LOGIN_RESPONSE: _Codec(
        LoginResponse, _LOGIN_RESPONSE, (), _login_response_in, _login_response_out
    ),
    Opcode.TEXT_REQUEST: _Codec(
        TextRequest, _TEXT_REQUEST, (), _text_request_in, _text_request_out
    ),
    Opcode.TEXT_RESPONSE: _Codec(
        TextResponse, _TEXT_RESPONSE, (), _text_response_in, _text_response_out
    ),
    Opcode.LOGOUT_REQUEST: _Codec(
        LogoutRequest,
        _LOGOUT_REQUEST,
        (_ALWAYS_FINAL,),
        _logout_request_in,
        _logout_request_out,
    ),
    Opcode.LOGOUT_RESPONSE: _Codec(
        LogoutResponse,
        _LOGOUT_RESPONSE,
        (_ALWAYS_FINAL,),
        _logout_response_in,
        _logout_response_out,
    ),
    Opcode.REJECT: _Codec(Reject, _REJECT, (_ALWAYS_FINAL,), _reject_in, _reject_out),
    Opcode.NOP_OUT: _Codec(NopOut, _NOP_OUT, (_ALWAYS_FINAL,), _nop_out_in, _nop_out_out),
    Opcode.NOP_IN: _Codec(NopIn, _NOP_IN, (_ALWAYS_FINAL,), _nop_in_in, _nop_in_out),
    Opcode.SCSI_COMMAND: _Codec(
        ScsiCommand, _SCSI_COMMAND, (), _scsi_command_in, _scsi_command_out
    ),
    Opcode.SCSI_RESPONSE: _Codec(
        ScsiResponse, _SCSI_RESPONSE, (_ALWAYS_FINAL,), _scsi_response_in, _scsi_response_out
    ),
    Opcode.SCSI_DATA_IN: _Codec(ScsiDataIn, _SCSI_DATA_IN, (), _scsi_data_in_in, _scsi_data_in_out),
    Opcode.SCSI_DATA_OUT: _Codec(
        ScsiDataOut, _SCSI_DATA_OUT, (), _scsi_data_out_in, _scsi_data_out_out
    ),
    Opcode.R2T: _Codec(R2T, _R2T, (_ALWAYS_FINAL,), _r2t_in, _r2t_out),
    Opcode.TASK_MANAGEMENT_REQUEST: _Codec(
        TaskManagementRequest,
        _TASK_MANAGEMENT_REQUEST,
        (_ALWAYS_FINAL,),
        _task_management_request_in,
        _task_management_request_out,
    ),
    Opcode.TASK_MANAGEMENT_RESPONSE: _Codec(
        TaskManagementResponse,
        _TASK_MANAGEMENT_RESPONSE,
        (_ALWAYS_FINAL,),
        _task_management_response_in,
        _task_management_response_out,
    ),
    Opcode.ASYNC_MESSAGE: _Codec(
        AsyncMessage, _ASYNC_MESSAGE, (_ALWAYS_FINAL,), _async_message_in, _async_message_out
    ),
}
_BY_MODEL: Final[dict[type[Any], _Codec[Any]]] = {c.model: c for c in _BY_OPCODE.values()}

# Compiled headers: construct's ``Struct.compile()`` turns each BHS definition above into
# generated Python that parses and builds with ``struct`` directly, about four times faster
# than interpreting the definition field by field. The definitions stay the single source of
# truth; the compiled form is a cache of them, and tests/test_wire.py checks that both agree on
# every opcode. Two rules keep it safe (compiled parsers have been seen to accept short input):
# a compiled parser only ever sees exactly BHS_LENGTH bytes, and whenever compiled code raises,
# the interpreted definition runs again on the same input, so every error is reported by it,
# with its field path. Each header is compiled on first use (about 1 ms each), not at import.
#
# Parsing goes one step further for the flat headers (every field a big-endian integer, raw
# bytes, a Const or padding: all but the Login PDUs, whose ISID is a nested Struct): their
# definition is read once into a single struct format, and a header is one unpack into a dict.
# construct's compiled code reads field by field into a Container, which cost half of the
# decoding of each SCSI Data-In. The same tests hold this parser to the interpreted one.
_COMPILED: Final[dict[type[Any], Construct[Any, Any]]] = {}
_FLAT: Final[dict[type[Any], Callable[[bytes], _Fields] | None]] = {}


def _compiled(codec: _Codec[Any]) -> Construct[Any, Any]:
    compiled = _COMPILED.get(codec.model)
    if compiled is None:
        compiled = _COMPILED[codec.model] = codec.header.compile()
    return compiled


def _flat_parser(header: Struct) -> Callable[[bytes], _Fields] | None:
    """One ``struct`` unpack that parses ``header`` as its definition does; None when a field
    is not flat (a nested Struct, an adapter)."""
    formats = [">"]
    names: list[str] = []
    wide: list[str] = []  # integers of a width struct has no code for (DataSegmentLength's 3)
    consts: list[tuple[str, object]] = []
    for sub in header.subcons:
        inner = sub.subcon if isinstance(sub, Renamed) else sub
        if isinstance(inner, Padded) and inner.subcon is Pass:
            formats.append(f"{inner.length}x")  # read and ignored, as Padding does
            continue
        if sub.name is None:
            return None
        if isinstance(inner, Const) and isinstance(inner.subcon, FormatField):
            consts.append((sub.name, inner.value))
            inner = inner.subcon
        if isinstance(inner, FormatField) and inner.fmtstr[:1] == ">":
            formats.append(inner.fmtstr[1:])
        elif (
            isinstance(inner, BytesInteger)
            and isinstance(inner.length, int)
            and not inner.signed
            and not inner.swapped
        ):
            formats.append(f"{inner.length}s")
            wide.append(sub.name)
        elif type(inner) is Bytes and isinstance(inner.length, int):
            formats.append(f"{inner.length}s")
        else:
            return None
        names.append(sub.name)
    layout = struct.Struct("".join(formats))
    if layout.size != BHS_LENGTH:
        return None
    unpack = layout.unpack

    def parse(bhs: bytes) -> _Fields:
        fields = dict(zip(names, unpack(bhs), strict=True))
        for name in wide:
            fields[name] = int.from_bytes(fields[name], "big")
        for name, value in consts:
            if fields[name] != value:
                raise ValueError(f"{name} is not {value!r}")  # the definition reports it
        return fields

    return parse


def _parse_header(codec: _Codec[Any], bhs: bytes) -> _Fields:
    """The BHS fields of ``bhs`` (exactly BHS_LENGTH bytes, already framed)."""
    if len(bhs) != BHS_LENGTH:
        # Unreachable from decode_pdu, which slices a checked PDU; never hand short input to
        # compiled code.
        raise _FieldProblem(("BHS",), len(bhs), f"a BHS is {BHS_LENGTH} bytes, not {len(bhs)}")
    model = codec.model
    if model not in _FLAT:
        _FLAT[model] = _flat_parser(codec.header)
    flat = _FLAT[model]
    try:
        if flat is not None:
            return flat(bhs)
        header: Container[Any] = _compiled(codec).parse(bhs)
    except (ConstructError, struct.error, ValueError, TypeError, KeyError):
        header = codec.header.parse(bhs)  # raises the error, with its field
    return header


def _build_header(codec: _Codec[Any], fields: dict[str, Any]) -> bytes:
    """The BHS bytes of ``fields``; a bad field is reported by the interpreted definition."""
    try:
        bhs: bytes = _compiled(codec).build(fields)
    except (ConstructError, struct.error, ValueError, TypeError, KeyError, OverflowError):
        bhs = codec.header.build(fields)  # raises the error, with its field
    if len(bhs) != BHS_LENGTH:
        # Compiled Bytes fields (LUN, CDB) write whatever they are given; the model layer
        # sizes them first, and the interpreted definition reports a wrong size if it did not.
        bhs = codec.header.build(fields)
    return bhs


# --------------------------------------------------------------------------------------------
# layout and error reporting
# --------------------------------------------------------------------------------------------


class _Layout(NamedTuple):
    """Where each part of a PDU lies, as announced by its BHS (offsets from the PDU start).

    A named tuple: one is made for every PDU a stream delivers, twice, and a frozen dataclass
    costs several times as much to make."""

    data_length: int
    header_digest_at: int  # end of the AHS
    data_at: int
    padding_at: int
    data_digest_at: int  # end of the padding
    total: int


def _layout(bhs: bytes, *, header_digest: bool, data_digest: bool) -> _Layout:
    """Read the opcode and the two length fields; raise PDUDecodeError for a bad header.

    Three fixed positions are read directly rather than through construct: this runs for every
    PDU a stream delivers, before its body has arrived.
    """
    if len(bhs) < BHS_LENGTH:
        raise PDUDecodeError(
            f"truncated BHS: {len(bhs)} of {BHS_LENGTH} bytes",
            field="BHS",
            offset=len(bhs),
            value=len(bhs),
        )
    opcode = bhs[0] & _OPCODE
    if opcode not in _BY_OPCODE:
        raise PDUDecodeError(
            f"Opcode: unknown or unsupported opcode 0x{opcode:02x}",
            field="Opcode",
            offset=0,
            value=opcode,
        )
    ahs_length = bhs[4] * 4
    data_length = int.from_bytes(bhs[5:8], "big")
    header_digest_at = BHS_LENGTH + ahs_length
    data_at = header_digest_at + (DIGEST_LENGTH if header_digest else 0)
    padding_at = data_at + data_length
    data_digest_at = padding_at + (-data_length % 4)
    total = data_digest_at + (DIGEST_LENGTH if data_digest and data_length else 0)
    return _Layout(data_length, header_digest_at, data_at, padding_at, data_digest_at, total)


def _check_data_cap(layout: _Layout, max_data_segment_length: int | None) -> None:
    if max_data_segment_length is not None and layout.data_length > max_data_segment_length:
        raise PDUDecodeError(
            f"DataSegmentLength: {layout.data_length} exceeds the limit of "
            f"{max_data_segment_length} bytes",
            field="DataSegmentLength",
            offset=5,
            value=layout.data_length,
        )


def _locate(header: Struct, names: Sequence[str]) -> tuple[int, int] | None:
    """Byte offset and size of the header field at ``names``; flags give their byte."""
    offset = 0
    size = 0
    con: Construct[Any, Any] = header
    for name in names:
        if not isinstance(con, Struct):
            break  # a flag inside a flag byte: the byte found so far holds it
        for sub in con.subcons:
            if sub.name == name:
                size = sub.sizeof()
                con = sub.subcon if isinstance(sub, Renamed) else sub
                break
            offset += sub.sizeof()
        else:
            return None
    return offset, size


def _display(names: Sequence[str]) -> str | None:
    shown = [n for n in names if n not in _GROUPS]
    return ".".join(shown) if shown else None


def _construct_path(exc: ConstructError) -> list[str]:
    """``"(building) -> ISID -> B"`` -> ``["Header", "ISID", "B"]``.

    construct only ever works on the BHS, so its paths start below ``Header``.
    """
    parts = (exc.path or "").split(" -> ")
    return ["Header", *(p for p in parts if p and not p.startswith("("))]


def _construct_reason(exc: ConstructError) -> str:
    # construct's message is "Error in path ...\n<reason>"; the path is reported as `field`.
    return str(exc).rsplit("\n", 1)[-1]


def _decode_error(exc: Exception, raw: bytes) -> Exception:
    """The one place decode failures of BHS fields become PDUDecodeError."""
    codec = _BY_OPCODE.get(raw[0] & _OPCODE) if raw else None
    names: list[str]
    if isinstance(exc, _FieldProblem):
        names, reason, value = ["Header", *exc.names], exc.reason, exc.value
    elif isinstance(exc, ConstructError):
        names, reason, value = _construct_path(exc), _construct_reason(exc), None
    else:
        names, reason, value = [], f"{type(exc).__name__}: {exc}", None
    field = _display(names)
    offset: int | None = None
    if names[:1] == ["Header"] and codec is not None:
        where = _locate(codec.header, names[1:])
        if where is not None:
            offset, size = where
            if value is None:
                value = int.from_bytes(raw[offset : offset + size], "big")
    where_text = f" at byte {offset}" if offset is not None else ""
    return PDUDecodeError(
        f"{field or 'PDU'}{where_text}: {reason}", field=field, offset=offset, value=value
    )


def _encode_error(exc: Exception, fields: dict[str, Any] | None) -> Exception:
    """The one place encode failures become PDUEncodeError."""
    names: list[str]
    value: object = None
    if isinstance(exc, _FieldProblem):
        names, reason, value = ["Header", *exc.names], exc.reason, exc.value
    elif isinstance(exc, ConstructError):
        names, reason = _construct_path(exc), _construct_reason(exc)
        value = _lookup(fields, names[1:])
    else:
        names, reason = [], f"{type(exc).__name__}: {exc}"
    field = _display(names)
    return PDUEncodeError(f"{field or 'PDU'}: {reason}", field=field, value=value)


def _lookup(fields: dict[str, Any] | None, names: Sequence[str]) -> object:
    """The value we tried to build at ``names`` in the BHS, if it is a plain field value."""
    node: Any = fields
    try:
        for name in names:
            node = node[name]
    except (KeyError, TypeError, IndexError):
        return None
    return _shown(node)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def pdu_length(
    bhs: bytes | bytearray | memoryview,
    *,
    header_digest: bool,
    data_digest: bool,
    max_data_segment_length: int | None = None,
) -> int:
    """Total on-the-wire length of the PDU that starts with ``bhs``, its 48 BHS bytes included.

    That is 48 + AHS + header digest + padded data segment + data digest (the latter only for a
    non-empty segment). Only the first 48 bytes of ``bhs`` are read. Raises PDUDecodeError for a
    short or unknown header, or a DataSegmentLength above ``max_data_segment_length``, so a
    reader can refuse a hostile length before buffering the body.
    """
    layout = _layout(bytes(bhs[:BHS_LENGTH]), header_digest=header_digest, data_digest=data_digest)
    _check_data_cap(layout, max_data_segment_length)
    return layout.total


def encode_pdu(pdu: PDU, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
    """The on-the-wire bytes of ``pdu``; PDUEncodeError if a field is out of range."""
    if type(pdu) is ScsiCommand and not pdu.data:
        bhs = _scsi_command_bhs(pdu)
        if bhs is not None:
            return bhs + crc32c(bhs) if header_digest else bhs
    codec = _BY_MODEL.get(type(pdu))
    if codec is None:
        raise PDUEncodeError(
            f"cannot encode a {type(pdu).__name__}: not a PDU", value=type(pdu).__name__
        )
    fields: dict[str, Any] | None = None
    try:
        fields, data = codec.fields_in(pdu)
        data = _checked_data(data)
        fields["TotalAHSLength"] = 0  # never sent: no PDU we build needs one
        fields["DataSegmentLength"] = len(data)  # padding not counted
        bhs = _build_header(codec, fields)
    except (
        _FieldProblem,
        ConstructError,
        struct.error,
        KeyError,
        IndexError,
        ValueError,
        TypeError,
        OverflowError,
        AttributeError,
    ) as exc:
        raise _encode_error(exc, fields) from exc
    parts = [bhs]
    if header_digest:
        parts.append(crc32c(bhs))
    if data:
        padded = data + bytes(-len(data) % 4)
        parts.append(padded)
        if data_digest:
            parts.append(crc32c(padded))
    return b"".join(parts)


# A SCSI Command without data is the one PDU sent many times with only its tags changed: the
# LUN check sends the same few CDBs on every probe. Its BHS is built by the definition above
# once per distinct command, with the three counters zero, then copied with them written in at
# the offsets that same definition gives. tests/test_wire.py checks it against a full build.
def _offset_of(name: str) -> int:
    where = _locate(_SCSI_COMMAND, [name])
    if where is None or where[1] != 4:
        raise RuntimeError(f"the SCSI Command definition has no 4-byte {name}")
    return where[0]


_ITT_AT: Final = _offset_of("InitiatorTaskTag")
_CMDSN_AT: Final = _offset_of("CmdSN")  # ExpStatSN follows it
_U32_AT: Final = struct.Struct(">I")
_TWO_U32_AT: Final = struct.Struct(">II")
if _offset_of("ExpStatSN") != _CMDSN_AT + 4:
    raise RuntimeError("ExpStatSN must follow CmdSN in the SCSI Command definition")
#: A SCSI Command but for its tags: lun, cdb, edtl, read, write, final, attribute, immediate.
_CommandKey: TypeAlias = tuple[bytes, bytes, int, bool, bool, bool, int, bool]


@functools.lru_cache(maxsize=64)
def _scsi_command_template(key: _CommandKey) -> bytes:
    lun, cdb, edtl, read, write, final, attribute, immediate = key
    command = ScsiCommand(
        itt=0,
        edtl=edtl,
        cmdsn=0,
        expstatsn=0,
        cdb=cdb,
        lun=lun,
        read=read,
        write=write,
        final=final,
        attribute=_to_enum(TaskAttribute, attribute, ("Byte1", "ATTR")),
        immediate=immediate,
    )
    codec = _BY_MODEL[ScsiCommand]
    fields, _ = codec.fields_in(command)
    fields["TotalAHSLength"] = 0
    fields["DataSegmentLength"] = 0
    return _build_header(codec, fields)


def _scsi_command_bhs(pdu: ScsiCommand) -> bytes | None:
    """The BHS of a data-less SCSI Command from its template; None sends it through the full
    build, which then reports whatever is wrong with it."""
    try:
        template = _scsi_command_template(
            (
                pdu.lun,
                pdu.cdb,
                pdu.edtl,
                pdu.read,
                pdu.write,
                pdu.final,
                int(pdu.attribute),  # an IntEnum's hash runs Python code, an int's does not
                pdu.immediate,
            )
        )
        bhs = bytearray(template)
        _U32_AT.pack_into(bhs, _ITT_AT, pdu.itt)
        _TWO_U32_AT.pack_into(bhs, _CMDSN_AT, pdu.cmdsn, pdu.expstatsn)
    except (_FieldProblem, ConstructError, struct.error, ValueError, TypeError, OverflowError):
        return None
    return bytes(bhs)


def _checked_data(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise _FieldProblem(("DataSegment",), type(data).__name__, "data must be bytes")
    if len(data) > MAX_DATA_SEGMENT_LENGTH:
        raise _FieldProblem(
            ("DataSegmentLength",),
            len(data),
            f"a data segment holds at most {MAX_DATA_SEGMENT_LENGTH} bytes",
        )
    return bytes(data)


def decode_pdu(
    data: bytes | bytearray | memoryview,
    *,
    header_digest: bool = False,
    data_digest: bool = False,
    max_data_segment_length: int | None = None,
) -> PDU:
    """The PDU in ``data``, which must hold exactly one whole PDU; PDUDecodeError otherwise."""
    raw = data if isinstance(data, bytes) else bytes(data)
    try:
        return _decode(raw, header_digest, data_digest, max_data_segment_length)
    except PDUDecodeError:
        raise
    except _DECODE_FAILURES as exc:
        raise _decode_error(exc, raw) from exc


#: What a BHS field or a model's check may raise while decoding: made a PDUDecodeError.
_DECODE_FAILURES: Final = (
    _FieldProblem,
    ConstructError,
    struct.error,
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    OverflowError,
    AttributeError,
)


def next_pdu(
    buffer: bytearray,
    start: int,
    *,
    header_digest: bool,
    data_digest: bool,
    max_data_segment_length: int | None = None,
) -> tuple[PDU, int] | None:
    """The PDU that starts at ``start`` in ``buffer`` and its length, or None while it is not
    all there; PDUDecodeError as :func:`decode_pdu` raises it, a hostile DataSegmentLength as
    soon as the BHS is in. For stream readers: the header is read once, the PDU copied once."""
    if len(buffer) - start < BHS_LENGTH:
        return None
    with memoryview(buffer) as view:
        with view[start : start + BHS_LENGTH] as part:
            layout = _layout(part.tobytes(), header_digest=header_digest, data_digest=data_digest)
        _check_data_cap(layout, max_data_segment_length)
        if len(buffer) - start < layout.total:
            return None
        with view[start : start + layout.total] as part:
            raw = part.tobytes()
    try:
        return _decode_laid_out(raw, layout, header_digest, data_digest), layout.total
    except PDUDecodeError:
        raise
    except _DECODE_FAILURES as exc:
        raise _decode_error(exc, raw) from exc


def _decode(
    raw: bytes, header_digest: bool, data_digest: bool, max_data_segment_length: int | None
) -> PDU:
    """Checks in wire order: framing, header digest, BHS fields, data digest, field values."""
    layout = _layout(raw, header_digest=header_digest, data_digest=data_digest)
    _check_data_cap(layout, max_data_segment_length)
    if len(raw) != layout.total:
        raise _length_error(raw, layout)
    return _decode_laid_out(raw, layout, header_digest, data_digest)


def _decode_laid_out(raw: bytes, layout: _Layout, header_digest: bool, data_digest: bool) -> PDU:
    if header_digest:
        # Before any field is believed: a header that fails its digest is noise, whatever its
        # fields say.
        at = layout.header_digest_at
        received, computed = raw[at : at + DIGEST_LENGTH], crc32c(raw[:at])
        if received != computed:
            raise PDUDecodeError(
                f"HeaderDigest at byte {at}: received {received.hex()}, computed {computed.hex()}",
                field="HeaderDigest",
                offset=at,
                value=received,
            )
    codec = _BY_OPCODE[raw[0] & _OPCODE]
    for bit in codec.fixed_bits:
        byte = raw[bit.offset]
        if not byte & bit.mask:
            # Reason worded as construct's Const put it when these bits were BitStruct fields.
            raise _FieldProblem(bit.names, byte, "parsing expected True but parsed False")
    header = _parse_header(codec, raw[:BHS_LENGTH])  # the AHS, if any, is skipped
    if data_digest and layout.data_length:
        at = layout.data_digest_at
        received, computed = raw[at:], crc32c(raw[layout.data_at : at])
        if received != computed:
            # Worded as construct's Checksum put it when it checked this digest.
            raise PDUDecodeError(
                f"DataDigest at byte {at}: wrong checksum, read {binascii.hexlify(received)!r}, "
                f"computed {binascii.hexlify(computed)!r}",
                field="DataDigest",
                offset=at,
                value=received,
            )
    try:
        pdu: PDU = codec.fields_out(header, raw[layout.data_at : layout.padding_at])
    except _FieldProblem as exc:
        if exc.data_offset is None:
            raise
        at = layout.data_at + exc.data_offset
        field = _display(exc.names)
        raise PDUDecodeError(
            f"{field} at byte {at}: {exc.reason}", field=field, offset=at, value=exc.value
        ) from exc
    return pdu


def _length_error(raw: bytes, layout: _Layout) -> PDUDecodeError:
    if len(raw) > layout.total:
        return PDUDecodeError(
            f"{len(raw) - layout.total} bytes after the end of a {layout.total}-byte PDU",
            field=None,
            offset=layout.total,
            value=len(raw) - layout.total,
        )
    parts = (
        ("AHS", layout.header_digest_at),
        ("HeaderDigest", layout.data_at),
        ("DataSegment", layout.padding_at),
        ("Padding", layout.data_digest_at),
        ("DataDigest", layout.total),
    )
    field = next(name for name, end in parts if len(raw) < end)
    return PDUDecodeError(
        f"{field}: truncated PDU, {len(raw)} of {layout.total} bytes",
        field=field,
        offset=len(raw),
        value=len(raw),
    )
