"""The iSCSI PDU wire format: :mod:`~pyiscsi_failover.protocol.pdu` models to bytes and back.

This is the only module that imports ``construct``. Each opcode has one ``Struct`` for the whole
PDU (BHS, AHS, header digest, padded data segment, data digest) with fields named as in RFC 7143;
decoding turns its raw integers at once into the frozen dataclasses and IntEnums of ``pdu``, and
encoding goes the other way. Every failure leaves through one choke point per direction as
:class:`~pyiscsi_failover.errors.PDUDecodeError` (naming field, byte offset and value) or
:class:`~pyiscsi_failover.errors.PDUEncodeError`; nothing from construct, ``struct`` or the
builtins escapes.

Decisions (RFC 7143 section 11: senders zero reserved fields, receivers ignore them, and a
reserved *code value* in a defined field is a protocol error):

* Reserved bits and bytes are written as zero and ignored on receipt, everywhere. tgt, the
  reference peer, zeroes them, but nothing is gained by dropping a login over one.
* Fixed values are ``Const`` and checked on receipt: the opcode, ``I`` = 1 in a Login Request
  (RFC 7143 11.12: "always 1"), ``F`` = 1 in the single-PDU types (Logout, NOP, Reject) and the
  all-ones ITT of a Reject. Every target we know sets them; a peer that does not is confused.
* Reserved code values are errors: an unknown opcode, stage 2 in CSG or NSG (also when ``T`` = 0,
  since the model must hold a real stage), Status-Class above 3, an unknown logout reason,
  logout response or reject reason. ``T`` and ``C`` both set in a Login PDU is an error too.
* Status-Detail may be any byte (the model keeps the raw value). ISID type 3 (reserved) is let
  through: the model carries it and the initiator compares the echoed ISID anyway.
* Padding bytes are ignored on receipt (the data digest still covers them as received).
* A data digest follows the data segment only when the segment is not empty, as in open-iscsi,
  LIO and tgt. The header digest covers BHS and AHS, and is checked before any BHS field.
* The AHS is skipped on decode (no AHS type exists for these opcodes); the 8-bit
  TotalAHSLength bounds it to 1020 bytes. Logout PDUs carry no data segment, so one is an error.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Checksum,
    Const,
    Construct,
    ConstructError,
    Container,
    Flag,
    If,
    Int8ub,
    Int16ub,
    Int24ub,
    Int32ub,
    Int64ub,
    Padding,
    RawCopy,
    Rebuild,
    Renamed,
    SizeofError,
    Struct,
    Terminated,
    len_,
    this,
)

from pyiscsi_failover.errors import PDUDecodeError, PDUEncodeError
from pyiscsi_failover.protocol.digest import DIGEST_LENGTH, crc32c
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    RESERVED_TAG,
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
    Stage,
    StatusClass,
    TextRequest,
    TextResponse,
)

__all__ = [
    "BHS_LENGTH",
    "MAX_AHS_LENGTH",
    "MAX_DATA_SEGMENT_LENGTH",
    "decode_pdu",
    "encode_pdu",
    "pdu_length",
]

#: Length of the Basic Header Segment every PDU starts with.
BHS_LENGTH: Final = 48
#: The largest DataSegmentLength the 24-bit field can express.
MAX_DATA_SEGMENT_LENGTH: Final = 2**24 - 1
#: The largest AHS the 8-bit TotalAHSLength (in 4-byte words) can announce.
MAX_AHS_LENGTH: Final = 255 * 4

# Names of construct levels that only group bits or hold the raw copy; they are left out of the
# field names our errors report ("ISID.A", not "Header.ISID.TA.A").
_GROUPS: Final = frozenset({"Header", "Byte0", "Byte1", "TA"})


# --------------------------------------------------------------------------------------------
# construct definitions
# --------------------------------------------------------------------------------------------


def _opcode_byte(opcode: Opcode, *, immediate: Construct[Any, Any] | None) -> Construct[Any, Any]:
    """Byte 0: reserved bit, ``I`` (initiator PDUs only; reserved in target PDUs), opcode."""
    if immediate is None:
        return BitStruct(Padding(2), "Opcode" / Const(int(opcode), BitsInteger(6)))
    return BitStruct(Padding(1), "I" / immediate, "Opcode" / Const(int(opcode), BitsInteger(6)))


#: Byte 1 of PDUs that are always final (Logout Response, Reject, NOP-Out, NOP-In).
_FINAL_ONLY: Final = BitStruct("F" / Const(True, Flag), Padding(7))
#: Byte 1 of Login PDUs.
_LOGIN_FLAGS: Final = BitStruct(
    "T" / Flag, "C" / Flag, Padding(2), "CSG" / BitsInteger(2), "NSG" / BitsInteger(2)
)
#: Byte 1 of Text PDUs.
_TEXT_FLAGS: Final = BitStruct("F" / Flag, "C" / Flag, Padding(6))

#: Bytes 8-13 of Login PDUs.
_ISID: Final = Struct(
    "TA" / BitStruct("T" / BitsInteger(2), "A" / BitsInteger(6)),
    "B" / Int16ub,
    "C" / Int8ub,
    "D" / Int16ub,
)


def _header(
    byte0: Construct[Any, Any],
    byte1: Construct[Any, Any],
    bytes_2_3: Sequence[Construct[Any, Any]],
    bytes_8_47: Sequence[Construct[Any, Any]],
) -> Struct:
    """BHS plus AHS: what the header digest covers."""
    return Struct(
        "Byte0" / byte0,
        "Byte1" / byte1,
        *bytes_2_3,
        "TotalAHSLength" / Rebuild(Int8ub, len_(this.AHS) // 4),
        # `_` is the whole PDU (RawCopy passes its context through), where DataSegment lives.
        "DataSegmentLength" / Rebuild(Int24ub, len_(this._.DataSegment)),
        *bytes_8_47,
        "AHS" / Bytes(this.TotalAHSLength * 4),
    )


def _digest(over: Callable[[Any], bytes]) -> Construct[Any, Any]:
    """A CRC32C digest field over the bytes ``over`` picks from the context."""
    return Checksum(Bytes(DIGEST_LENGTH), crc32c, over)


def _frame(header: Struct) -> Struct:
    """The whole PDU around ``header``; digests are switched by the parse/build keywords."""
    return Struct(
        "Header" / RawCopy(header),
        "HeaderDigest" / If(this._params.header_digest, _digest(this.Header.data)),
        "DataSegment" / Bytes(this.Header.value.DataSegmentLength),
        "Padding" / Bytes((4 - len_(this.DataSegment) % 4) % 4),
        "DataDigest"
        / If(
            this._params.data_digest & (len_(this.DataSegment) > 0),
            _digest(this.DataSegment + this.Padding),
        ),
        Terminated,
    )


_LOGIN_REQUEST: Final = _header(
    _opcode_byte(Opcode.LOGIN_REQUEST, immediate=Const(True, Flag)),
    _LOGIN_FLAGS,
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
_LOGIN_RESPONSE: Final = _header(
    _opcode_byte(Opcode.LOGIN_RESPONSE, immediate=None),
    _LOGIN_FLAGS,
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
_TEXT_REQUEST: Final = _header(
    _opcode_byte(Opcode.TEXT_REQUEST, immediate=Flag),
    _TEXT_FLAGS,
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
_TEXT_RESPONSE: Final = _header(
    _opcode_byte(Opcode.TEXT_RESPONSE, immediate=None),
    _TEXT_FLAGS,
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
_LOGOUT_REQUEST: Final = _header(
    _opcode_byte(Opcode.LOGOUT_REQUEST, immediate=Flag),
    BitStruct("F" / Const(True, Flag), "ReasonCode" / BitsInteger(7)),
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
_LOGOUT_RESPONSE: Final = _header(
    _opcode_byte(Opcode.LOGOUT_RESPONSE, immediate=None),
    _FINAL_ONLY,
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
_REJECT: Final = _header(
    _opcode_byte(Opcode.REJECT, immediate=None),
    _FINAL_ONLY,
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
_NOP_OUT: Final = _header(
    _opcode_byte(Opcode.NOP_OUT, immediate=Flag),
    _FINAL_ONLY,
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
_NOP_IN: Final = _header(
    _opcode_byte(Opcode.NOP_IN, immediate=None),
    _FINAL_ONLY,
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


# --------------------------------------------------------------------------------------------
# model <-> raw fields
# --------------------------------------------------------------------------------------------


class _FieldProblem(Exception):
    """A field value that is out of place; the choke points turn it into our public errors.

    ``names`` is the construct path below the header (e.g. ``("Byte1", "CSG")``), which is
    enough to find the field's byte offset.
    """

    def __init__(self, names: tuple[str, ...], value: object, reason: str) -> None:
        super().__init__(reason)
        self.names = names
        self.value = value
        self.reason = reason


_E = TypeVar("_E", bound=enum.IntEnum)


def _to_enum(cls: type[_E], value: Any, names: tuple[str, ...]) -> _E:
    """``cls(value)``, or a _FieldProblem naming the field (unknown values are errors)."""
    try:
        return cls(value)
    except (ValueError, TypeError):
        raise _FieldProblem(names, value, f"{value!r} is not a valid {cls.__name__}") from None


def _login_flags_in(transit: bool, cont: bool, csg: object, nsg: object) -> dict[str, Any]:
    if transit and cont:
        raise _FieldProblem(("Byte1", "C"), cont, "T and C must not both be set")
    return {
        "T": transit,
        "C": cont,
        "CSG": int(_to_enum(Stage, csg, ("Byte1", "CSG"))),
        "NSG": int(_to_enum(Stage, nsg, ("Byte1", "NSG"))),
    }


def _login_flags_out(flags: Container[Any]) -> tuple[bool, bool, Stage, Stage]:
    if flags.T and flags.C:
        raise _FieldProblem(("Byte1", "C"), True, "T and C must not both be set")
    return (
        flags.T,
        flags.C,
        _to_enum(Stage, flags.CSG, ("Byte1", "CSG")),
        _to_enum(Stage, flags.NSG, ("Byte1", "NSG")),
    )


def _isid_in(isid: ISID) -> dict[str, Any]:
    if not isinstance(isid, ISID):
        raise _FieldProblem(("ISID",), type(isid).__name__, "must be an ISID")
    return {"TA": {"T": isid.t, "A": isid.a}, "B": isid.b, "C": isid.c, "D": isid.d}


def _isid_out(raw: Container[Any]) -> ISID:
    return ISID(t=raw.TA.T, a=raw.TA.A, b=raw.B, c=raw.C, d=raw.D)


def _no_data(data: bytes, what: str) -> None:
    if data:
        raise _FieldProblem(("DataSegmentLength",), len(data), f"a {what} has no data segment")


def _login_request_in(p: LoginRequest) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": _login_flags_in(p.transit, p.cont, p.csg, p.nsg),
        "VersionMax": p.version_max,
        "VersionMin": p.version_min,
        "ISID": _isid_in(p.isid),
        "TSIH": p.tsih,
        "InitiatorTaskTag": p.itt,
        "CID": p.cid,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


def _login_request_out(h: Container[Any], data: bytes) -> LoginRequest:
    transit, cont, csg, nsg = _login_flags_out(h.Byte1)
    return LoginRequest(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        isid=_isid_out(h.ISID),
        itt=h.InitiatorTaskTag,
        cmdsn=h.CmdSN,
        expstatsn=h.ExpStatSN,
        tsih=h.TSIH,
        cid=h.CID,
        version_max=h.VersionMax,
        version_min=h.VersionMin,
        data=data,
    )


def _login_response_in(p: LoginResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": _login_flags_in(p.transit, p.cont, p.csg, p.nsg),
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


def _login_response_out(h: Container[Any], data: bytes) -> LoginResponse:
    transit, cont, csg, nsg = _login_flags_out(h.Byte1)
    return LoginResponse(
        transit=transit,
        cont=cont,
        csg=csg,
        nsg=nsg,
        isid=_isid_out(h.ISID),
        itt=h.InitiatorTaskTag,
        statsn=h.StatSN,
        expcmdsn=h.ExpCmdSN,
        maxcmdsn=h.MaxCmdSN,
        status_class=_to_enum(StatusClass, h.StatusClass, ("StatusClass",)),
        status_detail=h.StatusDetail,
        tsih=h.TSIH,
        version_max=h.VersionMax,
        version_active=h.VersionActive,
        data=data,
    )


def _text_request_in(p: TextRequest) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {"I": p.immediate},
        "Byte1": {"F": p.final, "C": p.cont},
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


def _text_request_out(h: Container[Any], data: bytes) -> TextRequest:
    return TextRequest(
        final=h.Byte1.F,
        cont=h.Byte1.C,
        itt=h.InitiatorTaskTag,
        cmdsn=h.CmdSN,
        expstatsn=h.ExpStatSN,
        ttt=h.TargetTransferTag,
        lun=h.LUN,
        immediate=h.Byte0.I,
        data=data,
    )


def _text_response_in(p: TextResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": {"F": p.final, "C": p.cont},
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
    }, p.data


def _text_response_out(h: Container[Any], data: bytes) -> TextResponse:
    return TextResponse(
        final=h.Byte1.F,
        cont=h.Byte1.C,
        itt=h.InitiatorTaskTag,
        ttt=h.TargetTransferTag,
        statsn=h.StatSN,
        expcmdsn=h.ExpCmdSN,
        maxcmdsn=h.MaxCmdSN,
        lun=h.LUN,
        data=data,
    )


def _logout_request_in(p: LogoutRequest) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {"I": p.immediate},
        "Byte1": {"ReasonCode": int(_to_enum(LogoutReason, p.reason, ("Byte1", "ReasonCode")))},
        "InitiatorTaskTag": p.itt,
        "CID": p.cid,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, b""


def _logout_request_out(h: Container[Any], data: bytes) -> LogoutRequest:
    _no_data(data, "Logout Request")
    return LogoutRequest(
        reason=_to_enum(LogoutReason, h.Byte1.ReasonCode, ("Byte1", "ReasonCode")),
        itt=h.InitiatorTaskTag,
        cmdsn=h.CmdSN,
        expstatsn=h.ExpStatSN,
        cid=h.CID,
        immediate=h.Byte0.I,
    )


def _logout_response_in(p: LogoutResponse) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": {},
        "Response": int(_to_enum(LogoutResponseCode, p.response, ("Response",))),
        "InitiatorTaskTag": p.itt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "Time2Wait": p.time2wait,
        "Time2Retain": p.time2retain,
    }, b""


def _logout_response_out(h: Container[Any], data: bytes) -> LogoutResponse:
    _no_data(data, "Logout Response")
    return LogoutResponse(
        response=_to_enum(LogoutResponseCode, h.Response, ("Response",)),
        itt=h.InitiatorTaskTag,
        statsn=h.StatSN,
        expcmdsn=h.ExpCmdSN,
        maxcmdsn=h.MaxCmdSN,
        time2wait=h.Time2Wait,
        time2retain=h.Time2Retain,
    )


def _reject_in(p: Reject) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": {},
        "Reason": int(_to_enum(RejectReason, p.reason, ("Reason",))),
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
        "DataSN": p.datasn,
    }, p.data


def _reject_out(h: Container[Any], data: bytes) -> Reject:
    return Reject(
        reason=_to_enum(RejectReason, h.Reason, ("Reason",)),
        statsn=h.StatSN,
        expcmdsn=h.ExpCmdSN,
        maxcmdsn=h.MaxCmdSN,
        datasn=h.DataSN,
        data=data,
    )


def _nop_out_in(p: NopOut) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {"I": p.immediate},
        "Byte1": {},
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "CmdSN": p.cmdsn,
        "ExpStatSN": p.expstatsn,
    }, p.data


def _nop_out_out(h: Container[Any], data: bytes) -> NopOut:
    return NopOut(
        itt=h.InitiatorTaskTag,
        ttt=h.TargetTransferTag,
        cmdsn=h.CmdSN,
        expstatsn=h.ExpStatSN,
        lun=h.LUN,
        immediate=h.Byte0.I,
        data=data,
    )


def _nop_in_in(p: NopIn) -> tuple[dict[str, Any], bytes]:
    return {
        "Byte0": {},
        "Byte1": {},
        "LUN": p.lun,
        "InitiatorTaskTag": p.itt,
        "TargetTransferTag": p.ttt,
        "StatSN": p.statsn,
        "ExpCmdSN": p.expcmdsn,
        "MaxCmdSN": p.maxcmdsn,
    }, p.data


def _nop_in_out(h: Container[Any], data: bytes) -> NopIn:
    return NopIn(
        itt=h.InitiatorTaskTag,
        ttt=h.TargetTransferTag,
        statsn=h.StatSN,
        expcmdsn=h.ExpCmdSN,
        maxcmdsn=h.MaxCmdSN,
        lun=h.LUN,
        data=data,
    )


_P = TypeVar("_P")


@dataclass(frozen=True, slots=True)
class _Codec(Generic[_P]):
    """Everything needed to move one PDU type across the wire."""

    model: type[_P]
    header: Struct
    frame: Struct
    fields_in: Callable[[_P], tuple[dict[str, Any], bytes]]
    fields_out: Callable[[Container[Any], bytes], _P]


def _codec(
    model: type[_P],
    header: Struct,
    fields_in: Callable[[_P], tuple[dict[str, Any], bytes]],
    fields_out: Callable[[Container[Any], bytes], _P],
) -> _Codec[_P]:
    return _Codec(model, header, _frame(header), fields_in, fields_out)


_BY_OPCODE: Final[dict[int, _Codec[Any]]] = {
    Opcode.LOGIN_REQUEST: _codec(
        LoginRequest, _LOGIN_REQUEST, _login_request_in, _login_request_out
    ),
    Opcode.LOGIN_RESPONSE: _codec(
        LoginResponse, _LOGIN_RESPONSE, _login_response_in, _login_response_out
    ),
    Opcode.TEXT_REQUEST: _codec(TextRequest, _TEXT_REQUEST, _text_request_in, _text_request_out),
    Opcode.TEXT_RESPONSE: _codec(
        TextResponse, _TEXT_RESPONSE, _text_response_in, _text_response_out
    ),
    Opcode.LOGOUT_REQUEST: _codec(
        LogoutRequest, _LOGOUT_REQUEST, _logout_request_in, _logout_request_out
    ),
    Opcode.LOGOUT_RESPONSE: _codec(
        LogoutResponse, _LOGOUT_RESPONSE, _logout_response_in, _logout_response_out
    ),
    Opcode.REJECT: _codec(Reject, _REJECT, _reject_in, _reject_out),
    Opcode.NOP_OUT: _codec(NopOut, _NOP_OUT, _nop_out_in, _nop_out_out),
    Opcode.NOP_IN: _codec(NopIn, _NOP_IN, _nop_in_in, _nop_in_out),
}
_BY_MODEL: Final[dict[type[Any], _Codec[Any]]] = {c.model: c for c in _BY_OPCODE.values()}


# --------------------------------------------------------------------------------------------
# layout and error reporting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where each part of a PDU lies, as announced by its BHS (offsets from the PDU start)."""

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
    opcode = bhs[0] & 0x3F
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


def _locate(header: Struct, names: Sequence[str]) -> tuple[int, int | None] | None:
    """Byte offset and size of the header field at ``names``; bits give their byte."""
    offset = 0
    size: int | None = None
    con: Construct[Any, Any] = header
    for name in names:
        if not isinstance(con, Struct):
            break  # a bit inside a BitStruct: the byte found so far holds it
        for sub in con.subcons:
            if sub.name == name:
                try:
                    size = sub.sizeof()
                except SizeofError:  # the AHS: its length depends on the PDU
                    size = None
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
    """``"(parsing) -> Header -> ISID -> TA -> A"`` -> ``["Header", "ISID", "TA", "A"]``."""
    parts = (exc.path or "").split(" -> ")
    return [p for p in parts if p and not p.startswith("(")]


def _construct_reason(exc: ConstructError) -> str:
    # construct's message is "Error in path ...\n<reason>"; the path is reported as `field`.
    return str(exc).rsplit("\n", 1)[-1]


def _decode_error(exc: Exception, raw: bytes, header_digest: bool, data_digest: bool) -> Exception:
    """The one place decode failures become PDUDecodeError."""
    codec = _BY_OPCODE.get(raw[0] & 0x3F) if raw else None
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
            if value is None and size is not None:
                value = int.from_bytes(raw[offset : offset + size], "big")
    elif names and len(raw) >= BHS_LENGTH and codec is not None:
        layout = _layout(raw, header_digest=header_digest, data_digest=data_digest)
        offset = {
            "HeaderDigest": layout.header_digest_at,
            "DataSegment": layout.data_at,
            "Padding": layout.padding_at,
            "DataDigest": layout.data_digest_at,
        }.get(names[0])
        if offset is not None and names[0] != "DataSegment":
            value = raw[offset : offset + DIGEST_LENGTH]
    where_text = f" at byte {offset}" if offset is not None else ""
    return PDUDecodeError(
        f"{field or 'PDU'}{where_text}: {reason}", field=field, offset=offset, value=value
    )


def _encode_error(exc: Exception, build: dict[str, Any] | None) -> Exception:
    """The one place encode failures become PDUEncodeError."""
    names: list[str]
    value: object = None
    if isinstance(exc, _FieldProblem):
        names, reason, value = ["Header", *exc.names], exc.reason, exc.value
    elif isinstance(exc, ConstructError):
        names, reason = _construct_path(exc), _construct_reason(exc)
        value = _lookup(build, names)
    else:
        names, reason = [], f"{type(exc).__name__}: {exc}"
    field = _display(names)
    return PDUEncodeError(f"{field or 'PDU'}: {reason}", field=field, value=value)


def _lookup(build: dict[str, Any] | None, names: Sequence[str]) -> object:
    """The value we tried to build at ``names``, if it is a plain field value."""
    if names[:1] != ["Header"]:
        return None  # never echo a data segment: it can hold CHAP material
    node: Any = build
    try:
        for name in names:
            node = node[name]
            if name == "Header":
                node = node["value"]
    except (KeyError, TypeError, IndexError):
        return None
    return None if isinstance(node, (dict, bytes, bytearray, memoryview)) else node


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
    codec = _BY_MODEL.get(type(pdu))
    if codec is None:
        raise PDUEncodeError(
            f"cannot encode a {type(pdu).__name__}: not a PDU", value=type(pdu).__name__
        )
    build: dict[str, Any] | None = None
    try:
        header, data = codec.fields_in(pdu)
        data = _checked_data(data)
        header["AHS"] = b""
        build = {
            "Header": {"value": header},
            "DataSegment": data,
            "Padding": bytes(-len(data) % 4),
        }
        return codec.frame.build(
            build, header_digest=bool(header_digest), data_digest=bool(data_digest)
        )
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
        raise _encode_error(exc, build) from exc


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
        raise _decode_error(exc, raw, header_digest, data_digest) from exc


def _decode(
    raw: bytes, header_digest: bool, data_digest: bool, max_data_segment_length: int | None
) -> PDU:
    layout = _layout(raw, header_digest=header_digest, data_digest=data_digest)
    _check_data_cap(layout, max_data_segment_length)
    if len(raw) != layout.total:
        raise _length_error(raw, layout)
    if header_digest:
        # Before any field is believed: a header that fails its digest is noise, whatever its
        # fields say. (The frame checks it again; that costs a microsecond.)
        at = layout.header_digest_at
        received, computed = raw[at : at + DIGEST_LENGTH], crc32c(raw[:at])
        if received != computed:
            raise PDUDecodeError(
                f"HeaderDigest at byte {at}: received {received.hex()}, computed {computed.hex()}",
                field="HeaderDigest",
                offset=at,
                value=received,
            )
    codec = _BY_OPCODE[raw[0] & 0x3F]
    parsed = codec.frame.parse(raw, header_digest=header_digest, data_digest=data_digest)
    pdu: PDU = codec.fields_out(parsed.Header.value, parsed.DataSegment)
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
