"""The PDU codec: round trips, exact bit positions, lenient reserved fields, and totality.

One peer test, marked ``peer``, has tshark read the Asynchronous Messages we encode.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from construct import ConstructError
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from peers import require_tool
from strategies import (
    PDU_STRATEGIES,
    data_outs,
    data_segments,
    login_requests,
    pdus,
    r2ts,
    task_management_requests,
    task_management_responses,
    u8,
    u16,
    u32,
)

from pyiscsi_failover.errors import PDUDecodeError, PDUEncodeError
from pyiscsi_failover.protocol import wire
from pyiscsi_failover.protocol.digest import crc32c
from pyiscsi_failover.protocol.pdu import (
    ISID,
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
    sense_data_segment,
)
from pyiscsi_failover.protocol.wire import (
    BHS_LENGTH,
    MAX_DATA_SEGMENT_LENGTH,
    decode_pdu,
    encode_pdu,
    pdu_length,
)

OPEN_ISCSI_ISID = ISID(t=0, a=0, b=0x023D, c=0x01, d=0x0002)


def login_request(**changes: Any) -> LoginRequest:
    pdu = LoginRequest(
        transit=True,
        cont=False,
        csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
        nsg=Stage.FULL_FEATURE_PHASE,
        isid=OPEN_ISCSI_ISID,
        itt=0x01020304,
        cmdsn=0x11121314,
        expstatsn=0x21222324,
        tsih=0x3132,
        cid=0x4142,
        data=b"InitiatorName=iqn.2004-10.com.example:host\x00",
    )
    return dataclasses.replace(pdu, **changes)


def login_response(**changes: Any) -> LoginResponse:
    pdu = LoginResponse(
        transit=True,
        cont=False,
        csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
        nsg=Stage.FULL_FEATURE_PHASE,
        isid=OPEN_ISCSI_ISID,
        itt=0x01020304,
        statsn=0x11121314,
        expcmdsn=0x21222324,
        maxcmdsn=0x31323334,
        status_class=StatusClass.INITIATOR_ERROR,
        status_detail=0x01,
        tsih=0x0A0B,
    )
    return dataclasses.replace(pdu, **changes)


def decode_error(raw: bytes, **kwargs: Any) -> PDUDecodeError:
    """The PDUDecodeError decode_pdu raises for ``raw`` (exactly that class, nothing else)."""
    with pytest.raises(PDUDecodeError) as info:
        decode_pdu(raw, **kwargs)
    assert type(info.value) is PDUDecodeError
    return info.value


def encode_error(pdu: object, **kwargs: Any) -> PDUEncodeError:
    with pytest.raises(PDUEncodeError) as info:
        encode_pdu(pdu, **kwargs)  # type: ignore[arg-type]
    assert type(info.value) is PDUEncodeError
    return info.value


def patched(raw: bytes, offset: int, new: bytes) -> bytes:
    return raw[:offset] + new + raw[offset + len(new) :]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(PDU_STRATEGIES), ids=lambda m: m.__name__)
@given(data=st.data(), header_digest=st.booleans(), data_digest=st.booleans())
@settings(max_examples=60)
def test_round_trip_every_type(
    model: type[PDU], data: st.DataObject, header_digest: bool, data_digest: bool
) -> None:
    pdu = data.draw(PDU_STRATEGIES[model]())
    raw = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(raw) % 4 == 0
    assert pdu_length(raw[:BHS_LENGTH], header_digest=header_digest, data_digest=data_digest) == (
        len(raw)
    )
    decoded = decode_pdu(raw, header_digest=header_digest, data_digest=data_digest)
    assert type(decoded) is model
    assert decoded == pdu


@given(pdu=pdus())
def test_decode_accepts_bytearray_and_memoryview(pdu: PDU) -> None:
    raw = encode_pdu(pdu)
    assert decode_pdu(bytearray(raw)) == decode_pdu(memoryview(raw)) == pdu


@pytest.mark.parametrize("model", list(PDU_STRATEGIES), ids=lambda m: m.__name__)
@given(data=st.data())
@settings(max_examples=10)
def test_empty_data_means_bare_header(model: type[PDU], data: st.DataObject) -> None:
    # No data segment: no padding and no data digest, even when data digests are on.
    pdu = data.draw(PDU_STRATEGIES[model]())
    if hasattr(pdu, "data"):
        no_data: dict[str, Any] = {"data": b""}
        pdu = dataclasses.replace(pdu, **no_data)
    assert len(encode_pdu(pdu)) == BHS_LENGTH
    both = encode_pdu(pdu, header_digest=True, data_digest=True)
    assert len(both) == BHS_LENGTH + 4
    assert both[48:] == crc32c(both[:48])


# ---------------------------------------------------------------------------------------------
# exact bit and byte positions
# ---------------------------------------------------------------------------------------------


def test_login_request_layout() -> None:
    raw = encode_pdu(login_request(version_max=0x00, version_min=0x00))
    # I=1 + opcode 0x03; T=1, C=0, CSG=1, NSG=3.
    assert raw[0:2] == b"\x43\x87"
    assert raw[2:4] == b"\x00\x00"
    assert raw[4] == 0  # TotalAHSLength
    assert int.from_bytes(raw[5:8], "big") == 43  # DataSegmentLength, padding not counted
    assert raw[8:14] == bytes.fromhex("00023d010002")  # ISID: OUI format, 0x00023d
    assert raw[14:16] == b"\x31\x32"  # TSIH
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT
    assert raw[20:22] == b"\x41\x42"  # CID
    assert raw[22:24] == bytes(2)
    assert raw[24:28] == b"\x11\x12\x13\x14"  # CmdSN
    assert raw[28:32] == b"\x21\x22\x23\x24"  # ExpStatSN
    assert raw[32:48] == bytes(16)
    assert raw[48:91] == b"InitiatorName=iqn.2004-10.com.example:host\x00"
    assert raw[91:] == b"\x00"  # one zero byte pads 43 to 44
    assert len(raw) == 92


@pytest.mark.parametrize(
    ("transit", "cont", "csg", "nsg", "byte1"),
    [
        (False, False, Stage.SECURITY_NEGOTIATION, Stage.SECURITY_NEGOTIATION, 0x00),
        (True, False, Stage.SECURITY_NEGOTIATION, Stage.LOGIN_OPERATIONAL_NEGOTIATION, 0x81),
        (True, False, Stage.SECURITY_NEGOTIATION, Stage.FULL_FEATURE_PHASE, 0x83),
        (False, True, Stage.SECURITY_NEGOTIATION, Stage.SECURITY_NEGOTIATION, 0x40),
        (False, False, Stage.FULL_FEATURE_PHASE, Stage.SECURITY_NEGOTIATION, 0x0C),
    ],
)
def test_login_flag_bits(transit: bool, cont: bool, csg: Stage, nsg: Stage, byte1: int) -> None:
    raw = encode_pdu(login_request(transit=transit, cont=cont, csg=csg, nsg=nsg))
    assert raw[1] == byte1
    assert decode_pdu(raw) == login_request(transit=transit, cont=cont, csg=csg, nsg=nsg)


@pytest.mark.parametrize(
    ("isid", "wire"),
    [
        (ISID(t=0, a=0, b=0x023D, c=0, d=0), "00023d000000"),
        (ISID(t=1, a=0x3F, b=0xFFFF, c=0xFF, d=0xFFFF), "7fffffffffff"),
        (ISID(t=2, a=0x15, b=0x1234, c=0x56, d=0x789A), "951234 56789a"),
        (ISID(t=3, a=0, b=0, c=0, d=1), "c00000000001"),
    ],
)
def test_isid_placement(isid: ISID, wire: str) -> None:
    raw = encode_pdu(login_request(isid=isid))
    assert raw[8:14] == bytes.fromhex(wire) == isid.to_bytes()
    decoded = decode_pdu(raw)
    assert isinstance(decoded, LoginRequest)
    assert decoded.isid == isid


def test_login_response_from_hand_built_bytes() -> None:
    raw = bytearray(48)
    raw[0] = 0x23
    raw[1] = 0x87
    raw[3] = 0x00  # Version-active
    raw[8:14] = bytes.fromhex("00023d010002")
    raw[14:16] = b"\x0a\x0b"  # TSIH
    raw[16:20] = b"\x01\x02\x03\x04"
    raw[24:28] = b"\x11\x12\x13\x14"  # StatSN
    raw[28:32] = b"\x21\x22\x23\x24"  # ExpCmdSN
    raw[32:36] = b"\x31\x32\x33\x34"  # MaxCmdSN
    raw[36] = 0x02  # Status-Class
    raw[37] = 0x01  # Status-Detail
    decoded = decode_pdu(bytes(raw))
    assert decoded == login_response()
    assert isinstance(decoded, LoginResponse)
    assert decoded.status is not None
    assert decoded.status.name == "AUTHENTICATION_FAILURE"
    assert encode_pdu(login_response()) == bytes(raw)


def test_text_pdus_layout() -> None:
    request = TextRequest(
        final=True, cont=False, itt=5, cmdsn=6, expstatsn=7, lun=0x0102030405060708
    )
    raw = encode_pdu(request)
    assert raw[0:2] == b"\x04\x80"
    assert raw[8:16] == bytes.fromhex("0102030405060708")  # LUN kept whole, 8 bytes
    assert raw[20:24] == b"\xff\xff\xff\xff"  # a new exchange: TTT all ones
    assert raw[24:28] == b"\x00\x00\x00\x06"
    assert (
        encode_pdu(dataclasses.replace(request, immediate=True, final=False, cont=True))[0:2]
        == b"\x44\x40"
    )
    response = TextResponse(
        final=False, cont=False, itt=5, ttt=0x0000ABCD, statsn=1, expcmdsn=2, maxcmdsn=3
    )
    raw = encode_pdu(response)
    assert raw[0:2] == b"\x24\x00"
    assert raw[20:24] == b"\x00\x00\xab\xcd"
    assert raw[32:36] == b"\x00\x00\x00\x03"


def test_logout_pdus_layout() -> None:
    request = LogoutRequest(
        reason=LogoutReason.CLOSE_CONNECTION,
        itt=9,
        cmdsn=1,
        expstatsn=2,
        cid=0x0102,
        immediate=True,
    )
    raw = encode_pdu(request)
    assert raw[0:2] == b"\x46\x81"
    assert raw[20:22] == b"\x01\x02"
    response = LogoutResponse(
        response=LogoutResponseCode.CID_NOT_FOUND,
        itt=9,
        statsn=1,
        expcmdsn=2,
        maxcmdsn=3,
        time2wait=0x0102,
        time2retain=0x0304,
    )
    raw = encode_pdu(response)
    assert raw[0:4] == b"\x26\x80\x01\x00"
    assert raw[40:44] == b"\x01\x02\x03\x04"


def test_reject_and_nop_layout() -> None:
    rejected = encode_pdu(login_request(data=b""))
    reject = Reject(
        reason=RejectReason.PROTOCOL_ERROR,
        statsn=1,
        expcmdsn=2,
        maxcmdsn=3,
        datasn=0x0A0B0C0D,
        data=rejected,
    )
    raw = encode_pdu(reject)
    assert raw[0:4] == b"\x3f\x80\x04\x00"
    assert raw[16:20] == RESERVED_TAG.to_bytes(4, "big")
    assert raw[36:40] == b"\x0a\x0b\x0c\x0d"
    assert raw[48:] == rejected
    nop_out = encode_pdu(NopOut(itt=1, ttt=RESERVED_TAG, cmdsn=2, expstatsn=3, data=b"ping"))
    assert nop_out[0:2] == b"\x40\x80"  # immediate by default
    assert nop_out[48:] == b"ping"
    nop_in = encode_pdu(NopIn(itt=RESERVED_TAG, ttt=7, statsn=1, expcmdsn=2, maxcmdsn=3))
    assert nop_in[0:2] == b"\x20\x80"
    assert nop_in[16:24] == b"\xff\xff\xff\xff\x00\x00\x00\x07"


def test_digest_placement() -> None:
    pdu = login_request(data=b"abcde")
    raw = encode_pdu(pdu, header_digest=True, data_digest=True)
    assert raw[48:52] == crc32c(raw[:48])
    assert raw[52:57] == b"abcde"
    assert raw[57:60] == bytes(3)
    assert raw[60:64] == crc32c(b"abcde\x00\x00\x00")  # over data and padding
    assert len(raw) == 64
    assert encode_pdu(pdu, data_digest=True)[-4:] == crc32c(b"abcde\x00\x00\x00")


def test_ahs_is_skipped_and_covered_by_header_digest() -> None:
    pdu = login_request(data=b"xyz")
    plain = encode_pdu(pdu)
    ahs = bytes(range(8))
    with_ahs = patched(plain[:48], 4, b"\x02") + ahs + plain[48:]
    assert pdu_length(with_ahs, header_digest=False, data_digest=False) == len(with_ahs)
    assert decode_pdu(with_ahs) == pdu
    header = with_ahs[:56]
    digested = header + crc32c(header) + plain[48:]
    assert decode_pdu(digested, header_digest=True) == pdu
    bad = decode_error(patched(digested, 50, b"\xff"), header_digest=True)
    assert (bad.field, bad.offset) == ("HeaderDigest", 56)


# ---------------------------------------------------------------------------------------------
# leniency: reserved fields and padding
# ---------------------------------------------------------------------------------------------

# Reserved bytes (whole) per opcode, from RFC 7143 section 11; byte 0's reserved bits are
# covered separately.
RESERVED_BYTES: dict[int, list[int]] = {
    Opcode.LOGIN_REQUEST: [22, 23, *range(32, 48)],
    Opcode.LOGIN_RESPONSE: [*range(20, 24), *range(38, 48)],
    Opcode.TEXT_REQUEST: [2, 3, *range(32, 48)],
    Opcode.TEXT_RESPONSE: [2, 3, *range(36, 48)],
    Opcode.LOGOUT_REQUEST: [2, 3, *range(8, 16), 22, 23, *range(32, 48)],
    Opcode.LOGOUT_RESPONSE: [3, *range(8, 16), *range(20, 24), *range(36, 40), *range(44, 48)],
    Opcode.REJECT: [3, *range(8, 16), *range(20, 24), *range(40, 48)],
    Opcode.NOP_OUT: [2, 3, *range(32, 48)],
    Opcode.NOP_IN: [2, 3, *range(36, 48)],
    # RFC 7143 11.7.1 (Data-Out), 11.8 (R2T), 11.5 and 11.6 (Task Management).
    Opcode.SCSI_DATA_OUT: [2, 3, *range(24, 28), *range(32, 36), *range(44, 48)],
    Opcode.R2T: [2, 3],
    Opcode.TASK_MANAGEMENT_REQUEST: [2, 3, *range(40, 48)],
    Opcode.TASK_MANAGEMENT_RESPONSE: [3, *range(8, 16), *range(20, 24), *range(36, 48)],
}
# Reserved bits of byte 0 (bit 7 always; bit 6 in target PDUs) and byte 1.
RESERVED_BITS: dict[int, tuple[int, int]] = {
    Opcode.LOGIN_REQUEST: (0x80, 0x30),
    Opcode.LOGIN_RESPONSE: (0xC0, 0x30),
    Opcode.TEXT_REQUEST: (0x80, 0x3F),
    Opcode.TEXT_RESPONSE: (0xC0, 0x3F),
    Opcode.LOGOUT_REQUEST: (0x80, 0x00),
    Opcode.LOGOUT_RESPONSE: (0xC0, 0x7F),
    Opcode.REJECT: (0xC0, 0x7F),
    Opcode.NOP_OUT: (0x80, 0x7F),
    Opcode.NOP_IN: (0xC0, 0x7F),
    Opcode.SCSI_DATA_OUT: (0xC0, 0x7F),  # no I: a Data-Out is not a command
    Opcode.R2T: (0xC0, 0x7F),
    Opcode.TASK_MANAGEMENT_REQUEST: (0x80, 0x00),  # F and the function fill byte 1
    Opcode.TASK_MANAGEMENT_RESPONSE: (0xC0, 0x7F),
}


@given(pdu=pdus(), junk=st.data(), header_digest=st.booleans())
def test_reserved_fields_are_ignored(pdu: PDU, junk: st.DataObject, header_digest: bool) -> None:
    raw = bytearray(encode_pdu(pdu))
    opcode = raw[0] & 0x3F
    for offset in RESERVED_BYTES[opcode]:
        raw[offset] = junk.draw(st.integers(1, 255))
    bits0, bits1 = RESERVED_BITS[opcode]
    raw[0] |= bits0
    raw[1] |= bits1
    if header_digest:
        raw[48:48] = crc32c(bytes(raw[:48]))
    assert decode_pdu(bytes(raw), header_digest=header_digest) == pdu


@given(pdu=pdus(), pad=st.binary(min_size=3, max_size=3))
def test_padding_content_is_ignored_but_digested(pdu: PDU, pad: bytes) -> None:
    raw = encode_pdu(pdu)
    data_length = int.from_bytes(raw[5:8], "big")
    assume(data_length % 4)
    pad_length = 4 - data_length % 4
    body = raw[48 : 48 + data_length] + pad[:pad_length]
    junk_padded = raw[:48] + body
    assert decode_pdu(junk_padded) == pdu
    # A sender that pads with junk digests what it sent; that digest must verify.
    assert decode_pdu(junk_padded + crc32c(body), data_digest=True) == pdu


# ---------------------------------------------------------------------------------------------
# errors: field, offset, value
# ---------------------------------------------------------------------------------------------


# SNACK Request, reserved codes and vendor-specific ones on either side: none is modelled.
@pytest.mark.parametrize("opcode", [0x07, 0x10, 0x1C, 0x27, 0x30, 0x3E])
def test_unknown_opcode(opcode: int) -> None:
    raw = patched(encode_pdu(login_request()), 0, bytes([0x40 | opcode]))
    error = decode_error(raw)
    assert (error.field, error.offset, error.value) == ("Opcode", 0, opcode)
    with pytest.raises(PDUDecodeError) as info:
        pdu_length(raw[:48], header_digest=False, data_digest=False)
    assert info.value.field == "Opcode"


@pytest.mark.parametrize(
    ("byte1", "field", "value"),
    [
        (0x88, "CSG", 2),  # T=1, CSG=2, NSG=0
        (0x86, "NSG", 2),  # T=1, CSG=1, NSG=2
        (0x8A, "CSG", 2),  # T=1, CSG=2, NSG=2: CSG reported first
        (0x02, "NSG", 2),  # NSG=2 with T=0 is still not a stage
        (0xC3, "C", True),  # T and C together
    ],
)
def test_login_flag_errors(byte1: int, field: str, value: object) -> None:
    for pdu in (login_request(), login_response()):
        error = decode_error(patched(encode_pdu(pdu), 1, bytes([byte1])))
        assert (error.field, error.offset, error.value) == (field, 1, value)


def test_login_request_without_immediate_bit() -> None:
    error = decode_error(patched(encode_pdu(login_request()), 0, b"\x03"))
    assert (error.field, error.offset) == ("I", 0)


@pytest.mark.parametrize("status_class", [4, 5, 0x7F, 0xFF])
def test_unknown_status_class(status_class: int) -> None:
    error = decode_error(patched(encode_pdu(login_response()), 36, bytes([status_class])))
    assert (error.field, error.offset, error.value) == ("StatusClass", 36, status_class)


def test_unknown_status_detail_is_kept() -> None:
    decoded = decode_pdu(patched(encode_pdu(login_response()), 37, b"\xee"))
    assert isinstance(decoded, LoginResponse)
    assert decoded.status_detail == 0xEE
    assert decoded.status is None


@pytest.mark.parametrize("reason", [3, 4, 0x7F])
def test_unknown_logout_reason(reason: int) -> None:
    raw = encode_pdu(LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=1, cmdsn=2, expstatsn=3))
    error = decode_error(patched(raw, 1, bytes([0x80 | reason])))
    assert (error.field, error.offset, error.value) == ("ReasonCode", 1, reason)


@pytest.mark.parametrize("response", [4, 0x80, 0xFF])
def test_unknown_logout_response(response: int) -> None:
    raw = encode_pdu(
        LogoutResponse(response=LogoutResponseCode.CLOSED, itt=1, statsn=2, expcmdsn=3, maxcmdsn=4)
    )
    error = decode_error(patched(raw, 2, bytes([response])))
    assert (error.field, error.offset, error.value) == ("Response", 2, response)


@pytest.mark.parametrize("reason", [0x00, 0x01, 0x0D, 0xFF])
def test_unknown_reject_reason(reason: int) -> None:
    raw = encode_pdu(
        Reject(reason=RejectReason.PROTOCOL_ERROR, statsn=1, expcmdsn=2, maxcmdsn=3, data=bytes(48))
    )
    error = decode_error(patched(raw, 2, bytes([reason])))
    assert (error.field, error.offset, error.value) == ("Reason", 2, reason)


def test_fixed_values_are_checked() -> None:
    nop_in = encode_pdu(NopIn(itt=1, ttt=2, statsn=3, expcmdsn=4, maxcmdsn=5))
    error = decode_error(patched(nop_in, 1, b"\x00"))  # F must be 1
    assert (error.field, error.offset, error.value) == ("F", 1, 0)
    reject = encode_pdu(
        Reject(reason=RejectReason.PROTOCOL_ERROR, statsn=1, expcmdsn=2, maxcmdsn=3)
    )
    error = decode_error(patched(reject, 16, b"\x00\x00\x00\x01"))
    assert (error.field, error.offset, error.value) == ("InitiatorTaskTag", 16, 1)


def test_logout_with_data_segment() -> None:
    raw = encode_pdu(LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=1, cmdsn=2, expstatsn=3))
    raw = patched(raw, 5, b"\x00\x00\x04") + b"data"
    error = decode_error(raw)
    assert (error.field, error.offset, error.value) == ("DataSegmentLength", 5, 4)


@pytest.mark.parametrize(
    ("cut", "field"),
    [(0, "BHS"), (47, "BHS"), (50, "DataSegment"), (91, "Padding")],
)
def test_truncated(cut: int, field: str) -> None:
    raw = encode_pdu(login_request())
    error = decode_error(raw[:cut])
    assert (error.field, error.offset) == (field, cut)


def test_truncated_digests() -> None:
    raw = encode_pdu(login_request(), header_digest=True, data_digest=True)
    assert decode_error(raw[:50], header_digest=True).field == "HeaderDigest"
    assert decode_error(raw[:-1], header_digest=True, data_digest=True).field == "DataDigest"
    assert decode_error(raw[:50], data_digest=True).field == "DataSegment"


def test_trailing_bytes() -> None:
    raw = encode_pdu(login_request())
    error = decode_error(raw + b"\x00\x00\x00\x00")
    assert (error.offset, error.value) == (len(raw), 4)


def test_digest_mismatches() -> None:
    raw = encode_pdu(login_request(), header_digest=True, data_digest=True)
    error = decode_error(patched(raw, 20, b"\x99"), header_digest=True, data_digest=True)
    assert (error.field, error.offset, error.value) == ("HeaderDigest", 48, raw[48:52])
    error = decode_error(patched(raw, 60, b"!"), header_digest=True, data_digest=True)
    assert (error.field, error.offset) == ("DataDigest", len(raw) - 4)
    assert error.value == raw[-4:]
    # A header digest failure wins over a broken field: the field is not to be believed.
    error = decode_error(patched(raw, 1, b"\xc3"), header_digest=True, data_digest=True)
    assert error.field == "HeaderDigest"


def test_data_segment_cap() -> None:
    raw = encode_pdu(login_request(data=bytes(100)))
    assert decode_pdu(raw, max_data_segment_length=100) == login_request(data=bytes(100))
    error = decode_error(raw, max_data_segment_length=99)
    assert (error.field, error.offset, error.value) == ("DataSegmentLength", 5, 100)
    with pytest.raises(PDUDecodeError):
        pdu_length(raw, header_digest=False, data_digest=False, max_data_segment_length=99)


def test_pdu_length() -> None:
    raw = encode_pdu(login_request(data=b"abcde"), header_digest=True, data_digest=True)
    assert pdu_length(raw[:48], header_digest=True, data_digest=True) == 48 + 4 + 8 + 4
    assert pdu_length(raw[:48], header_digest=False, data_digest=False) == 48 + 8
    # Only the first 48 bytes count.
    assert pdu_length(raw, header_digest=False, data_digest=True) == 48 + 8 + 4
    top = patched(raw[:48], 4, b"\xff")
    top = patched(top, 5, b"\xff\xff\xff")
    assert pdu_length(top, header_digest=True, data_digest=True) == (
        48 + 1020 + 4 + MAX_DATA_SEGMENT_LENGTH + 1 + 4
    )
    with pytest.raises(PDUDecodeError) as info:
        pdu_length(raw[:47], header_digest=False, data_digest=False)
    assert (info.value.field, info.value.offset) == ("BHS", 47)


# ---------------------------------------------------------------------------------------------
# encode errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pdu", "field", "value"),
    [
        (login_request(itt=2**32), "InitiatorTaskTag", 2**32),
        (login_request(cmdsn=-1), "CmdSN", -1),
        (login_request(tsih=2**16), "TSIH", 2**16),
        (login_request(version_max=256), "VersionMax", 256),
        (login_request(isid=ISID(t=4, a=0, b=0, c=0, d=0)), "ISID.T", 4),
        (login_request(isid=ISID(t=0, a=64, b=0, c=0, d=0)), "ISID.A", 64),
        (login_request(isid=ISID(t=0, a=0, b=2**16, c=0, d=0)), "ISID.B", 2**16),
        (login_request(csg=2), "CSG", 2),
        (login_request(nsg=7), "NSG", 7),
        (login_request(transit=True, cont=True), "C", True),
        (login_response(status_class=4), "StatusClass", 4),
        (login_response(status_detail=256), "StatusDetail", 256),
        (TextRequest(final=True, cont=False, itt=1, cmdsn=1, expstatsn=1, lun=2**64), "LUN", 2**64),
        (
            LogoutRequest(reason=3, itt=1, cmdsn=1, expstatsn=1),  # type: ignore[arg-type]
            "ReasonCode",
            3,
        ),
        (
            LogoutResponse(response=9, itt=1, statsn=1, expcmdsn=1, maxcmdsn=1),  # type: ignore[arg-type]
            "Response",
            9,
        ),
        (
            Reject(reason=1, statsn=1, expcmdsn=1, maxcmdsn=1),  # type: ignore[arg-type]
            "Reason",
            1,
        ),
        (NopOut(itt=1, ttt=1, cmdsn=1, expstatsn=1, lun=-1), "LUN", -1),
        (login_request(cmdsn="1"), "CmdSN", "1"),
        (login_request(data="text"), "DataSegment", "str"),
        (login_request(isid=b"\x00" * 6), "ISID", "bytes"),
    ],
)
def test_encode_errors(pdu: PDU, field: str, value: object) -> None:
    error = encode_error(pdu)
    assert (error.field, error.value) == (field, value)
    assert field in str(error)


def test_encode_oversized_data_segment() -> None:
    error = encode_error(NopIn(itt=1, ttt=1, statsn=1, expcmdsn=1, maxcmdsn=1, data=bytes(2**24)))
    assert (error.field, error.value) == ("DataSegmentLength", 2**24)
    largest = NopIn(itt=1, ttt=1, statsn=1, expcmdsn=1, maxcmdsn=1, data=bytes(2**24 - 1))
    assert encode_pdu(largest)[5:8] == b"\xff\xff\xff"


@pytest.mark.parametrize("thing", [None, b"\x00" * 48, ISID(t=0, a=0, b=0, c=0, d=0)])
def test_encode_non_pdu(thing: object) -> None:
    assert encode_error(thing).field is None


def test_error_messages_do_not_echo_data() -> None:
    secret_looking = b"CHAP_R=0x" + b"ab" * 16
    pdu = login_request(data=secret_looking, itt=-5)
    error = encode_error(pdu)
    assert "CHAP_R" not in str(error)
    assert "abab" not in repr(error.value)


# ---------------------------------------------------------------------------------------------
# flag bytes bit by bit, and which error wins when several fields are bad
# ---------------------------------------------------------------------------------------------
# The flag bytes are read as whole bytes and split with masks; these pin every bit against the
# RFC 7143 layout, independently of how the codec splits them.


@pytest.mark.parametrize("byte1", range(256))
def test_every_login_byte1(byte1: int) -> None:
    transit, cont, csg, nsg = bool(byte1 & 0x80), bool(byte1 & 0x40), byte1 >> 2 & 3, byte1 & 3
    problem: tuple[str, object] | None = None
    if transit and cont:
        problem = ("C", True)
    elif csg == 2:
        problem = ("CSG", 2)
    elif nsg == 2:
        problem = ("NSG", 2)
    for pdu in (login_request(), login_response()):
        raw = patched(encode_pdu(pdu), 1, bytes([byte1]))
        if problem is not None:
            error = decode_error(raw)
            assert (error.field, error.offset, error.value) == (problem[0], 1, problem[1])
            continue
        decoded = decode_pdu(raw)
        assert isinstance(decoded, (LoginRequest, LoginResponse))
        assert (decoded.transit, decoded.cont, decoded.csg, decoded.nsg) == (
            transit,
            cont,
            Stage(csg),
            Stage(nsg),
        )
        assert encode_pdu(decoded)[1] == byte1 & 0xCF  # reserved bits 5-4 come back zero


@pytest.mark.parametrize("top", [0x00, 0x40, 0x80, 0xC0])
@pytest.mark.parametrize("byte1", [0x00, 0x40, 0x80, 0xC0, 0x3F, 0xFF])
def test_text_request_flag_bytes(top: int, byte1: int) -> None:
    request = TextRequest(final=False, cont=False, itt=1, cmdsn=2, expstatsn=3)
    raw = patched(encode_pdu(request), 0, bytes([top | Opcode.TEXT_REQUEST, byte1]))
    decoded = decode_pdu(raw)
    assert decoded == dataclasses.replace(
        request, immediate=bool(top & 0x40), final=bool(byte1 & 0x80), cont=bool(byte1 & 0x40)
    )
    assert encode_pdu(decoded)[:2] == bytes([(top & 0x40) | Opcode.TEXT_REQUEST, byte1 & 0xC0])


@pytest.mark.parametrize("byte8", range(256))
def test_every_isid_byte0(byte8: int) -> None:
    raw = patched(encode_pdu(login_request()), 8, bytes([byte8]))
    decoded = decode_pdu(raw)
    assert isinstance(decoded, LoginRequest)
    assert (decoded.isid.t, decoded.isid.a) == (byte8 >> 6, byte8 & 0x3F)
    assert encode_pdu(decoded) == raw


def test_logout_request_reason_bits() -> None:
    request = LogoutRequest(reason=LogoutReason.CLOSE_SESSION, itt=1, cmdsn=2, expstatsn=3)
    for reason in LogoutReason:
        raw = patched(encode_pdu(request), 1, bytes([0x80 | reason]))
        assert decode_pdu(raw) == dataclasses.replace(request, reason=reason)
    error = decode_error(patched(encode_pdu(request), 1, bytes([LogoutReason.CLOSE_CONNECTION])))
    assert (error.field, error.offset, error.value) == ("F", 1, 0x01)  # the whole byte


def test_fixed_bit_errors_name_the_flag_and_show_its_byte() -> None:
    error = decode_error(patched(encode_pdu(login_request()), 0, b"\x83"))
    assert (error.field, error.offset, error.value) == ("I", 0, 0x83)
    assert str(error).startswith("I at byte 0: ")


def test_decode_reports_the_first_problem_in_wire_order() -> None:
    reject = Reject(
        reason=RejectReason.PROTOCOL_ERROR, statsn=1, expcmdsn=2, maxcmdsn=3, data=b"abcd"
    )
    raw = encode_pdu(reject, data_digest=True)
    bad_itt = patched(raw, 16, b"\x00")
    bad_digest = patched(raw, len(raw) - 1, b"\x00" if raw[-1] else b"\x01")
    # A fixed flag (byte 1) before a fixed field (byte 16) ...
    assert decode_error(patched(bad_itt, 1, b"\x00"), data_digest=True).field == "F"
    # ... BHS fields before the data digest ...
    both = bad_itt[:-4] + bad_digest[-4:]
    assert decode_error(both, data_digest=True).field == "InitiatorTaskTag"
    # ... and the data digest before the meaning of field values.
    bad_reason = patched(bad_digest, 2, b"\x00")
    error = decode_error(bad_reason, data_digest=True)
    assert (error.field, error.offset) == ("DataDigest", len(raw) - 4)
    assert "wrong checksum" in str(error)
    assert decode_error(patched(raw, 2, b"\x00"), data_digest=True).field == "Reason"


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        # construct reports fields in wire order: VersionMax (byte 2) before ISID (byte 8) ...
        ({"version_max": 256, "isid": ISID(t=4, a=0, b=0, c=0, d=0)}, "VersionMax", 256),
        # ... and ISID (byte 8) before the ITT (byte 16).
        ({"isid": ISID(t=4, a=0, b=0, c=0, d=0), "itt": 2**32}, "ISID.T", 4),
        ({"isid": ISID(t=3, a=64, b=2**16, c=0, d=0)}, "ISID.A", 64),
        # Values the model layer converts, and the data segment, are checked before any field.
        ({"isid": ISID(t=4, a=0, b=0, c=0, d=0), "data": "text"}, "DataSegment", "str"),
        ({"isid": ISID(t=0, a=99, b=0, c=0, d=0), "nsg": 2}, "NSG", 2),
        ({"isid": ISID(t="x", a=0, b=0, c=0, d=0)}, "ISID.T", "x"),  # type: ignore[arg-type]
        ({"isid": ISID(t=0, a=b"x", b=0, c=0, d=0)}, "ISID.A", None),  # type: ignore[arg-type]
    ],
)
def test_encode_reports_the_first_problem(
    changes: dict[str, Any], field: str, value: object
) -> None:
    error = encode_error(login_request(**changes))
    assert (error.field, error.value) == (field, value)


# ---------------------------------------------------------------------------------------------
# totality: garbage and mutations raise PDUDecodeError and nothing else
# ---------------------------------------------------------------------------------------------


def decode_or_reject(raw: bytes, **kwargs: Any) -> PDU | None:
    """decode_pdu that may only succeed or raise exactly PDUDecodeError."""
    try:
        return decode_pdu(raw, **kwargs)
    except Exception as exc:  # anything but PDUDecodeError fails just below
        error = exc
    assert type(error) is PDUDecodeError
    assert isinstance(error.field, (str, type(None)))
    assert error.offset is None or 0 <= error.offset <= len(raw) + 4
    return None


digests = st.fixed_dictionaries({"header_digest": st.booleans(), "data_digest": st.booleans()})


@given(raw=st.binary(max_size=200), options=digests)
@example(raw=b"", options={"header_digest": False, "data_digest": False})
def test_arbitrary_bytes(raw: bytes, options: dict[str, bool]) -> None:
    decode_or_reject(raw, **options)


@st.composite
def plausible_headers(draw: st.DrawFn) -> bytes:
    """Random bytes with a known opcode and small lengths, so parsing gets past the framing."""
    opcode = draw(st.sampled_from(list(Opcode)))
    data_length = draw(st.integers(0, 40))
    raw = bytearray(draw(st.binary(min_size=48, max_size=48)))
    raw[0] = (raw[0] & 0xC0) | opcode
    raw[4] = draw(st.integers(0, 2))
    raw[5:8] = data_length.to_bytes(3, "big")
    body = draw(st.binary(min_size=0, max_size=raw[4] * 4 + 8 + data_length + 3))
    return bytes(raw) + body


@given(raw=plausible_headers(), options=digests)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_plausible_garbage(raw: bytes, options: dict[str, bool]) -> None:
    decode_or_reject(raw, **options)


Mutation = Callable[[bytes], bytes]


@st.composite
def mutations(draw: st.DrawFn, size: int) -> Mutation:
    kind = draw(st.sampled_from(["flip", "truncate", "length", "ahs", "append", "splice"]))
    if kind == "flip":
        bits = draw(st.lists(st.integers(0, size * 8 - 1), min_size=1, max_size=4))

        def flip(raw: bytes) -> bytes:
            out = bytearray(raw)
            for bit in bits:
                out[bit // 8] ^= 0x80 >> (bit % 8)
            return bytes(out)

        return flip
    if kind == "truncate":
        cut = draw(st.integers(0, size - 1))
        return lambda raw: raw[:cut]
    if kind == "length":
        length = draw(st.integers(0, 2**24 - 1) | st.integers(0, size + 8))
        return lambda raw: patched(raw, 5, length.to_bytes(3, "big"))
    if kind == "ahs":
        words = draw(st.integers(0, 255))
        return lambda raw: patched(raw, 4, bytes([words]))
    if kind == "append":
        extra = draw(st.binary(min_size=1, max_size=12))
        return lambda raw: raw + extra
    offset = draw(st.integers(0, size - 1))
    junk = draw(st.binary(min_size=1, max_size=8))
    return lambda raw: patched(raw, offset, junk)[:size]


@given(pdu=pdus(), options=digests, data=st.data())
@settings(max_examples=300)
def test_mutated_encodings(pdu: PDU, options: dict[str, bool], data: st.DataObject) -> None:
    raw = encode_pdu(pdu, **options)
    mutate = data.draw(mutations(len(raw)))
    mutated = mutate(raw)
    decoded = decode_or_reject(mutated, **options)
    if mutated == raw:
        assert decoded == pdu


@given(pdu=login_requests(data=data_segments(16)), bit=st.integers(0, 48 * 8 - 1))
def test_header_bit_flips_caught_by_header_digest(pdu: LoginRequest, bit: int) -> None:
    raw = bytearray(encode_pdu(pdu, header_digest=True))
    raw[bit // 8] ^= 0x80 >> (bit % 8)
    error = decode_error(bytes(raw), header_digest=True)
    # Flips in the opcode or the length fields are caught before the digest can be found.
    if bit // 8 not in (0, 4, 5, 6, 7):
        assert error.field == "HeaderDigest"


# ---------------------------------------------------------------------------------------------
# compiled headers: construct's Struct.compile() must agree with the interpreted definitions
# ---------------------------------------------------------------------------------------------
# wire.py parses and builds each BHS with the compiled form of its construct Struct and falls
# back to the interpreted one whenever compiled code raises. These pin that the two agree: on
# every opcode, for any 48 header bytes (parse) and any PDU the model can hold (build), and that
# the compiled parser is never handed anything but exactly 48 bytes.


def _fields(container: Any) -> dict[str, Any]:
    """A parsed Container as plain nested dicts, without construct's private ``_`` keys."""
    return {
        key: _fields(value) if isinstance(value, dict) else value
        for key, value in container.items()
        if not key.startswith("_")
    }


def _interpreted_parse(codec: Any, bhs: bytes) -> dict[str, Any] | type[Exception]:
    try:
        return _fields(codec.header.parse(bhs))
    except Exception as exc:  # the interpreted parser's own error type is the expectation
        return type(exc)


def _compiled_parse(codec: Any, bhs: bytes) -> dict[str, Any] | type[Exception]:
    try:
        return _fields(wire._compiled(codec).parse(bhs))
    except Exception as exc:
        return type(exc)


@given(opcode=st.sampled_from(list(Opcode)), raw=st.binary(min_size=48, max_size=48))
@example(opcode=Opcode.REJECT, raw=bytes(48))  # Reject ITT is a Const: both must refuse it
@example(opcode=Opcode.REJECT, raw=bytes(16) + b"\xff" * 4 + bytes(28))
@example(opcode=Opcode.ASYNC_MESSAGE, raw=bytes(48))  # so is an Asynchronous Message's
@example(opcode=Opcode.ASYNC_MESSAGE, raw=b"\xff" * 48)
def test_compiled_parse_equals_interpreted(opcode: Opcode, raw: bytes) -> None:
    codec = wire._BY_OPCODE[opcode]
    bhs = bytes([(raw[0] & 0xC0) | opcode]) + raw[1:]
    interpreted = _interpreted_parse(codec, bhs)
    compiled = _compiled_parse(codec, bhs)
    if isinstance(interpreted, dict):
        assert compiled == interpreted
        assert _fields(wire._parse_header(codec, bhs)) == interpreted
    else:
        # Compiled code may raise another type; _parse_header must then report the
        # interpreted parser's error, with its field path.
        with pytest.raises(interpreted):
            wire._parse_header(codec, bhs)


@given(pdu=pdus())
@settings(max_examples=300)
def test_compiled_build_equals_interpreted(pdu: PDU) -> None:
    assert_compiled_build_equals_interpreted(pdu)


def assert_compiled_build_equals_interpreted(pdu: PDU) -> None:
    """The compiled header builder (and _build_header) give the interpreted one's bytes."""
    codec = wire._BY_MODEL[type(pdu)]
    fields, data = codec.fields_in(pdu)
    fields["TotalAHSLength"] = 0
    fields["DataSegmentLength"] = len(data)
    interpreted = codec.header.build(fields)
    assert wire._compiled(codec).build(fields) == interpreted
    assert wire._build_header(codec, fields) == interpreted
    assert len(interpreted) == BHS_LENGTH


@pytest.mark.parametrize(
    ("field", "value"),
    [("InitiatorTaskTag", 2**32), ("CmdSN", -1), ("TSIH", 2**16), ("CID", "1"), ("TSIH", 1.5)],
)
def test_compiled_build_errors_come_from_the_interpreted_definition(
    field: str, value: object
) -> None:
    """Out-of-range values make compiled code raise struct.error; the interpreted build must
    then report the field, as it did before compilation."""
    codec = wire._BY_MODEL[LoginRequest]
    fields, _ = codec.fields_in(login_request())
    fields.update({"TotalAHSLength": 0, "DataSegmentLength": 0, field: value})
    with pytest.raises(ConstructError) as raised:
        wire._build_header(codec, fields)
    assert field in str(raised.value)
    error = encode_error(login_request(**{_MODEL_NAMES[field]: value}))
    assert error.field == field


_MODEL_NAMES = {"InitiatorTaskTag": "itt", "CmdSN": "cmdsn", "TSIH": "tsih", "CID": "cid"}


@pytest.mark.parametrize("size", [0, 1, 47, 49, 96])
def test_compiled_parser_never_sees_short_or_long_input(size: int) -> None:
    codec = wire._BY_OPCODE[Opcode.LOGIN_RESPONSE]
    with pytest.raises(wire._FieldProblem, match="a BHS is 48 bytes"):
        wire._parse_header(codec, bytes(size))


# ---------------------------------------------------------------------------------------------
# SCSI PDUs: SCSI Command (0x01), SCSI Response (0x21), SCSI Data-In (0x25)
# ---------------------------------------------------------------------------------------------
# Their strategies live here rather than in the shared strategies.py; each yields only PDUs the
# RFC 7143 rules allow (see wire.py's docstring), so decode(encode(x)) == x must hold.

luns = st.binary(min_size=8, max_size=8)
residual_flags = st.sampled_from([(False, False), (True, False), (False, True)])
DATA_IN_STATUSES = [
    ScsiStatus.GOOD,
    ScsiStatus.CONDITION_MET,
    ScsiStatus.INTERMEDIATE,
    ScsiStatus.INTERMEDIATE_CONDITION_MET,
]


@st.composite
def scsi_commands(draw: st.DrawFn) -> ScsiCommand:
    read, write = draw(st.booleans()), draw(st.booleans())
    return ScsiCommand(
        itt=draw(u32),
        edtl=draw(u32) if read or write else 0,
        cmdsn=draw(u32),
        expstatsn=draw(u32),
        cdb=draw(st.binary(max_size=16)),
        lun=draw(luns),
        read=read,
        write=write,
        final=draw(st.booleans()) if write else True,
        attribute=draw(st.sampled_from(TaskAttribute)),
        immediate=draw(st.booleans()),
        data=draw(data_segments()),
    )


@st.composite
def scsi_responses(draw: st.DrawFn) -> ScsiResponse:
    response = draw(st.sampled_from(list(ScsiResponseCode)) | st.integers(0x80, 0xFF))
    status = draw(st.sampled_from(ScsiStatus)) if response == 0 else None
    overflow, underflow = draw(residual_flags)
    bidi_overflow, bidi_underflow = draw(residual_flags)
    if status is not ScsiStatus.CHECK_CONDITION and draw(st.booleans()):
        data = b""
    else:
        minimum = 1 if status is ScsiStatus.CHECK_CONDITION else 0
        sense = draw(st.binary(min_size=minimum, max_size=40))
        data = sense_data_segment(sense, draw(st.binary(max_size=8)))
    return ScsiResponse(
        itt=draw(u32),
        statsn=draw(u32),
        expcmdsn=draw(u32),
        maxcmdsn=draw(u32),
        response=response,
        status=status,
        expdatasn=draw(u32),
        overflow=overflow,
        underflow=underflow,
        residual=draw(u32),
        bidi_overflow=bidi_overflow,
        bidi_underflow=bidi_underflow,
        bidi_residual=draw(u32),
        snack_tag=draw(u32),
        data=data,
    )


@st.composite
def scsi_data_ins(draw: st.DrawFn) -> ScsiDataIn:
    status = draw(st.none() | st.sampled_from(DATA_IN_STATUSES))
    overflow, underflow = draw(residual_flags)
    return ScsiDataIn(
        itt=draw(u32),
        expcmdsn=draw(u32),
        maxcmdsn=draw(u32),
        datasn=draw(u32),
        buffer_offset=draw(u32),
        final=True if status is not None else draw(st.booleans()),
        acknowledge=draw(st.booleans()),
        status=status,
        statsn=draw(u32),
        overflow=overflow,
        underflow=underflow,
        residual=draw(u32),
        ttt=draw(u32),
        lun=draw(luns),
        data=draw(data_segments()),
    )


SCSI_STRATEGIES: dict[type[PDU], Callable[[], st.SearchStrategy[Any]]] = {
    ScsiCommand: scsi_commands,
    ScsiResponse: scsi_responses,
    ScsiDataIn: scsi_data_ins,
}


def scsi_pdus() -> st.SearchStrategy[PDU]:
    return st.one_of(scsi_commands(), scsi_responses(), scsi_data_ins())


def inquiry(**changes: Any) -> ScsiCommand:
    pdu = ScsiCommand(
        itt=0x01020304,
        edtl=0x60,
        cmdsn=0x11121314,
        expstatsn=0x21222324,
        cdb=bytes.fromhex("120000006000"),
        lun=bytes.fromhex("0001000000000000"),
        read=True,
    )
    return dataclasses.replace(pdu, **changes)


def check_condition(**changes: Any) -> ScsiResponse:
    # 18-byte fixed-format sense, as tgt builds it: UNIT ATTENTION 29/00.
    sense = bytes.fromhex("700006000000000a00000000290000000000")
    pdu = ScsiResponse(
        itt=0x01020304,
        statsn=0x11121314,
        expcmdsn=0x21222324,
        maxcmdsn=0x31323334,
        status=ScsiStatus.CHECK_CONDITION,
        expdatasn=0x41424344,
        data=sense_data_segment(sense),
    )
    return dataclasses.replace(pdu, **changes)


def data_in(**changes: Any) -> ScsiDataIn:
    pdu = ScsiDataIn(
        itt=0x01020304,
        expcmdsn=0x21222324,
        maxcmdsn=0x31323334,
        datasn=0x41424344,
        buffer_offset=0x51525354,
        final=True,
        status=ScsiStatus.GOOD,
        statsn=0x11121314,
        underflow=True,
        residual=0x61626364,
        data=b"\x00\x00\x05\x02\x1f",
    )
    return dataclasses.replace(pdu, **changes)


@pytest.mark.parametrize("model", list(SCSI_STRATEGIES), ids=lambda m: m.__name__)
@given(data=st.data(), header_digest=st.booleans(), data_digest=st.booleans())
@settings(max_examples=150)
def test_scsi_round_trip(
    model: type[PDU], data: st.DataObject, header_digest: bool, data_digest: bool
) -> None:
    pdu = data.draw(SCSI_STRATEGIES[model]())
    raw = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(raw) % 4 == 0
    assert pdu_length(raw[:48], header_digest=header_digest, data_digest=data_digest) == len(raw)
    decoded = decode_pdu(raw, header_digest=header_digest, data_digest=data_digest)
    assert type(decoded) is model
    assert decoded == pdu
    assert encode_pdu(decoded, header_digest=header_digest, data_digest=data_digest) == raw


def test_scsi_command_layout() -> None:
    raw = encode_pdu(inquiry())
    assert raw[0:4] == b"\x01\xc1\x00\x00"  # not immediate; F=1, R=1, ATTR=1 (simple)
    assert raw[4:8] == bytes(4)  # no AHS, no data
    assert raw[8:16] == bytes.fromhex("0001000000000000")  # LUN, raw
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT
    assert raw[20:24] == b"\x00\x00\x00\x60"  # ExpectedDataTransferLength
    assert raw[24:28] == b"\x11\x12\x13\x14"  # CmdSN
    assert raw[28:32] == b"\x21\x22\x23\x24"  # ExpStatSN
    assert raw[32:48] == bytes.fromhex("120000006000") + bytes(10)  # CDB, zero-padded
    assert len(raw) == 48
    tur = ScsiCommand(itt=1, edtl=0, cmdsn=2, expstatsn=3, cdb=bytes(6), immediate=True)
    assert encode_pdu(tur)[0:2] == b"\x41\x81"  # TEST UNIT READY: F=1, simple, EDTL 0
    write = inquiry(read=False, write=True, final=False, attribute=TaskAttribute.ACA, data=b"w")
    raw = encode_pdu(write)
    assert raw[1] == 0x24  # F=0, W=1, ATTR=4
    assert raw[5:8] == b"\x00\x00\x01"
    assert raw[48:] == b"w\x00\x00\x00"


def _interpreted_bhs(command: ScsiCommand) -> bytes:
    """The BHS as the construct definition itself builds it, no template, no compiled code."""
    codec = wire._BY_MODEL[ScsiCommand]
    fields, _ = codec.fields_in(command)
    fields["TotalAHSLength"] = 0
    fields["DataSegmentLength"] = 0
    built: bytes = codec.header.build(fields)
    return built


@settings(max_examples=300)
@given(
    itt=u32,
    edtl=u32,
    cmdsn=u32,
    expstatsn=u32,
    cdb=st.binary(min_size=1, max_size=16),
    lun=st.binary(min_size=8, max_size=8),
    write=st.booleans(),
    attribute=st.sampled_from(TaskAttribute),
    immediate=st.booleans(),
    header_digest=st.booleans(),
)
def test_a_data_less_scsi_command_from_its_template_is_the_full_build(
    itt: int,
    edtl: int,
    cmdsn: int,
    expstatsn: int,
    cdb: bytes,
    lun: bytes,
    write: bool,
    attribute: TaskAttribute,
    immediate: bool,
    header_digest: bool,
) -> None:
    """The same command with other tags must not come out of the cache with stale ones."""
    command = ScsiCommand(
        itt=itt,
        edtl=edtl,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        cdb=cdb,
        lun=lun,
        read=not write,
        write=write,
        attribute=attribute,
        immediate=immediate,
    )
    bhs = _interpreted_bhs(command)
    expected = bhs + crc32c(bhs) if header_digest else bhs
    assert encode_pdu(command, header_digest=header_digest) == expected
    again = dataclasses.replace(command, itt=itt ^ 1, cmdsn=cmdsn ^ 1, expstatsn=expstatsn ^ 1)
    assert encode_pdu(again) == _interpreted_bhs(again)
    assert decode_pdu(encode_pdu(again)) == again


@pytest.mark.parametrize("field", ["itt", "cmdsn", "expstatsn"])
def test_a_scsi_command_tag_out_of_range_is_refused_by_name(field: str) -> None:
    good = inquiry()
    encode_pdu(good)  # its template is cached now
    changes: dict[str, Any] = {field: 1 << 32}
    with pytest.raises(PDUEncodeError) as caught:
        encode_pdu(dataclasses.replace(good, **changes))
    names = {"itt": "InitiatorTaskTag", "cmdsn": "CmdSN", "expstatsn": "ExpStatSN"}
    assert caught.value.field == names[field]


def test_cdb_is_padded_to_16_bytes_and_a_longer_one_is_refused() -> None:
    short = inquiry(cdb=b"\x00")
    assert short.cdb == bytes(16)  # padded by the model, so a decoded copy compares equal
    assert decode_pdu(encode_pdu(short)) == short
    whole = inquiry(cdb=bytes(range(1, 17)))
    assert encode_pdu(whole)[32:48] == bytes(range(1, 17))
    error = encode_error(inquiry(cdb=bytes(range(1, 18))))
    assert (error.field, error.value) == ("CDB", 17)
    assert "AHS" in str(error)
    assert encode_error(inquiry(cdb="12")).field == "CDB"


@pytest.mark.parametrize("lun", [b"", bytes(7), bytes(9), 1, "00" * 8])
def test_lun_must_be_eight_raw_bytes(lun: object) -> None:
    assert encode_error(inquiry(lun=lun)).field == "LUN"
    assert encode_error(data_in(lun=lun)).field == "LUN"


def test_scsi_response_layout() -> None:
    pdu = check_condition(overflow=True, residual=0x51525354, snack_tag=0x0A0B0C0D)
    raw = encode_pdu(pdu)
    assert raw[0:4] == b"\x21\x84\x00\x02"  # fixed bit 7, O; Response 0; CHECK CONDITION
    assert raw[4:8] == b"\x00\x00\x00\x14"  # SenseLength (2) + 18 bytes of sense
    assert raw[8:16] == bytes(8)
    assert raw[16:20] == b"\x01\x02\x03\x04"
    assert raw[20:24] == b"\x0a\x0b\x0c\x0d"  # SNACK Tag
    assert raw[24:36] == bytes.fromhex("111213142122232431323334")
    assert raw[36:40] == b"\x41\x42\x43\x44"  # ExpDataSN
    assert raw[40:44] == bytes(4)  # bidirectional read residual
    assert raw[44:48] == b"\x51\x52\x53\x54"  # residual
    assert raw[48:50] == b"\x00\x12"
    assert pdu.sense == raw[50:68]
    assert pdu.sense[12:14] == b"\x29\x00"
    assert pdu.response_data == b""
    bidi = encode_pdu(check_condition(bidi_underflow=True, underflow=True, bidi_residual=7))
    assert bidi[1] == 0x8A and bidi[40:44] == b"\x00\x00\x00\x07"
    assert encode_pdu(check_condition(bidi_overflow=True))[1] == 0x90


def test_sense_and_response_data_properties() -> None:
    pdu = check_condition(data=sense_data_segment(b"\x70abc", b"rest"))
    assert (pdu.sense, pdu.response_data) == (b"\x70abc", b"rest")
    good = check_condition(status=ScsiStatus.GOOD, data=b"")
    assert (good.sense, good.response_data) == (b"", b"")
    assert decode_pdu(encode_pdu(good)) == good


def test_scsi_data_in_layout() -> None:
    raw = encode_pdu(data_in())
    assert raw[0:4] == b"\x25\x83\x00\x00"  # F, U, S; status GOOD
    assert raw[5:8] == b"\x00\x00\x05"
    assert raw[8:16] == bytes(8)
    assert raw[16:24] == b"\x01\x02\x03\x04\xff\xff\xff\xff"  # ITT, TTT all ones
    assert raw[24:48] == bytes.fromhex("111213142122232431323334414243445152535461626364")
    assert raw[48:] == b"\x00\x00\x05\x02\x1f\x00\x00\x00"
    middle = encode_pdu(data_in(final=False, status=None, underflow=False, residual=0))
    assert middle[0:4] == b"\x25\x00\x00\x00"
    met = data_in(status=ScsiStatus.CONDITION_MET, acknowledge=True, underflow=False, overflow=True)
    assert encode_pdu(met)[1:4] == b"\xc5\x00\x04"  # F, A, O, S; CONDITION MET


# SCSI reserved bytes and bits, from RFC 7143 11.3, 11.4 and 11.7 (byte 0's reserved bits as in
# RESERVED_BITS above).
SCSI_RESERVED: dict[type[PDU], tuple[list[int], int, int]] = {
    ScsiCommand: ([2, 3], 0x80, 0x18),
    ScsiResponse: (list(range(8, 16)), 0xC0, 0x61),
    ScsiDataIn: ([2], 0xC0, 0x38),
}


@given(pdu=scsi_pdus(), junk=st.data(), header_digest=st.booleans())
def test_scsi_reserved_fields_are_ignored(
    pdu: PDU, junk: st.DataObject, header_digest: bool
) -> None:
    raw = bytearray(encode_pdu(pdu))
    offsets, bits0, bits1 = SCSI_RESERVED[type(pdu)]
    for offset in offsets:
        raw[offset] = junk.draw(st.integers(1, 255))
    # The Status byte is meaningless, so ignored, in a Response with Response != 0 and in a
    # Data-In without S.
    if isinstance(pdu, ScsiResponse) and pdu.status is None:
        raw[3] = junk.draw(st.integers(1, 255))
    if isinstance(pdu, ScsiDataIn) and pdu.status is None:
        raw[3] = junk.draw(st.integers(1, 255))
    raw[0] |= bits0
    raw[1] |= bits1
    if header_digest:
        raw[48:48] = crc32c(bytes(raw[:48]))
    assert decode_pdu(bytes(raw), header_digest=header_digest) == pdu


@pytest.mark.parametrize("byte1", range(256))
def test_every_scsi_command_byte1(byte1: int) -> None:
    final, read, write, attr = bool(byte1 & 0x80), bool(byte1 & 0x40), bool(byte1 & 0x20), byte1 & 7
    for edtl in (0, 512):
        raw = patched(encode_pdu(inquiry(edtl=edtl)), 1, bytes([byte1]))
        problem: tuple[str, int, object] | None = None
        if attr > 4:
            problem = ("ATTR", 1, attr)
        elif not final and not write:
            problem = ("F", 1, False)
        elif edtl and not read and not write:
            problem = ("ExpectedDataTransferLength", 20, edtl)
        if problem is not None:
            error = decode_error(raw)
            assert (error.field, error.offset, error.value) == problem
            continue
        decoded = decode_pdu(raw)
        assert isinstance(decoded, ScsiCommand)
        assert (decoded.final, decoded.read, decoded.write, decoded.attribute) == (
            final,
            read,
            write,
            TaskAttribute(attr),
        )
        assert encode_pdu(decoded)[1] == byte1 & 0xE7  # reserved bits 4-3 come back zero


@pytest.mark.parametrize("byte1", range(256))
def test_every_scsi_response_byte1(byte1: int) -> None:
    raw = patched(encode_pdu(check_condition()), 1, bytes([byte1]))
    problem: tuple[str, object] | None = None
    if not byte1 & 0x80:
        problem = ("F", byte1)
    elif byte1 & 0x18 == 0x18:
        problem = ("u", True)
    elif byte1 & 0x06 == 0x06:
        problem = ("U", True)
    if problem is not None:
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == (problem[0], 1, problem[1])
        return
    decoded = decode_pdu(raw)
    assert isinstance(decoded, ScsiResponse)
    assert (
        decoded.bidi_overflow,
        decoded.bidi_underflow,
        decoded.overflow,
        decoded.underflow,
    ) == (bool(byte1 & 0x10), bool(byte1 & 0x08), bool(byte1 & 0x04), bool(byte1 & 0x02))
    assert encode_pdu(decoded)[1] == byte1 & 0x9E


@pytest.mark.parametrize("byte1", range(256))
def test_every_scsi_data_in_byte1(byte1: int) -> None:
    raw = patched(encode_pdu(data_in()), 1, bytes([byte1]))
    problem: str | None = None
    if byte1 & 0x06 == 0x06:
        problem = "U"
    elif byte1 & 0x01 and not byte1 & 0x80:
        problem = "S"
    if problem is not None:
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == (problem, 1, True)
        return
    decoded = decode_pdu(raw)
    assert isinstance(decoded, ScsiDataIn)
    assert (decoded.final, decoded.acknowledge, decoded.overflow, decoded.underflow) == (
        bool(byte1 & 0x80),
        bool(byte1 & 0x40),
        bool(byte1 & 0x04),
        bool(byte1 & 0x02),
    )
    assert decoded.status == (ScsiStatus.GOOD if byte1 & 0x01 else None)
    assert encode_pdu(decoded)[1] == byte1 & 0xC7


@pytest.mark.parametrize("code", [0x02, 0x03, 0x7F])
def test_reserved_response_codes(code: int) -> None:
    error = decode_error(patched(encode_pdu(check_condition()), 2, bytes([code])))
    assert (error.field, error.offset, error.value) == ("Response", 2, code)
    assert encode_error(check_condition(response=code, status=None)).field == "Response"


@pytest.mark.parametrize("code", [0x01, 0x80, 0xFF])
def test_a_command_not_completed_has_no_status(code: int) -> None:
    # The Status byte then has no meaning: whatever it holds (here CHECK CONDITION) is ignored,
    # and so is the sense rule that goes with it.
    raw = patched(encode_pdu(check_condition(status=ScsiStatus.GOOD, data=b"")), 2, bytes([code]))
    for status in (b"\x02", b"\xee"):
        decoded = decode_pdu(patched(raw, 3, status))
        assert isinstance(decoded, ScsiResponse)
        assert decoded.status is None
    raw = patched(raw, 3, b"\xee")
    decoded = decode_pdu(raw)
    assert isinstance(decoded, ScsiResponse)
    assert (decoded.response, decoded.status) == (code, None)
    assert isinstance(decoded.response, int)
    if code == 0x01:
        assert decoded.response is ScsiResponseCode.TARGET_FAILURE
    assert encode_pdu(decoded)[2:4] == bytes([code, 0])


@pytest.mark.parametrize("status", [0x01, 0x03, 0x20, 0x41, 0xFF])
def test_unknown_scsi_status(status: int) -> None:
    error = decode_error(patched(encode_pdu(check_condition()), 3, bytes([status])))
    assert (error.field, error.offset, error.value) == ("Status", 3, status)
    error = decode_error(patched(encode_pdu(data_in()), 3, bytes([status])))
    assert (error.field, error.offset, error.value) == ("Status", 3, status)


@pytest.mark.parametrize(
    "status", [s for s in ScsiStatus if s not in DATA_IN_STATUSES], ids=lambda s: s.name
)
def test_only_statuses_without_exception_ride_on_data_in(status: ScsiStatus) -> None:
    error = decode_error(patched(encode_pdu(data_in()), 3, bytes([status])))
    assert (error.field, error.offset, error.value) == ("Status", 3, status)
    assert encode_error(data_in(status=status)).field == "Status"


@pytest.mark.parametrize(
    ("data", "value", "reason"),
    [
        (b"", 0, "CHECK CONDITION without sense"),
        (b"\x00\x00", 0, "CHECK CONDITION without sense"),
        (b"\x00\x00rsp", 0, "CHECK CONDITION without sense"),
        (b"\x00", 1, "cannot hold SenseLength"),
        (b"\x00\x05abcd", 5, "overrun"),
        (b"\xff\xff", 0xFFFF, "overrun"),
    ],
)
def test_sense_segment_errors(data: bytes, value: int, reason: str) -> None:
    # Built by hand: the encoder refuses the same segments.
    raw = encode_pdu(check_condition(status=ScsiStatus.GOOD, data=b""), header_digest=True)
    header = patched(raw[:48], 3, b"\x02")
    header = patched(header, 5, len(data).to_bytes(3, "big"))
    stream = header + crc32c(header) + data + bytes(-len(data) % 4)
    error = decode_error(stream, header_digest=True)
    assert (error.field, error.offset, error.value) == ("SenseLength", 52, value)
    assert reason in str(error)
    refused = encode_error(check_condition(data=data))
    assert (refused.field, refused.value) == ("SenseLength", value)


def test_sense_length_is_checked_for_any_status() -> None:
    error = encode_error(check_condition(status=ScsiStatus.GOOD, data=b"\x00\x09short"))
    assert (error.field, error.value) == ("SenseLength", 9)


@pytest.mark.parametrize(
    ("pdu", "field", "value"),
    [
        (inquiry(attribute=5), "ATTR", 5),
        (inquiry(read=False, edtl=1), "ExpectedDataTransferLength", 1),
        (inquiry(final=False), "F", False),
        (inquiry(itt=2**32), "InitiatorTaskTag", 2**32),
        (inquiry(edtl=-1), "ExpectedDataTransferLength", -1),
        (check_condition(response=1), "Status", ScsiStatus.CHECK_CONDITION),
        (check_condition(status=None), "Status", None),
        (check_condition(status=0x41), "Status", 0x41),
        (check_condition(response=256, status=None), "Response", 256),
        (check_condition(response=True, status=None), "Response", True),
        (check_condition(overflow=True, underflow=True), "U", True),
        (check_condition(bidi_overflow=True, bidi_underflow=True), "u", True),
        (check_condition(expdatasn=2**32), "ExpDataSN", 2**32),
        (data_in(final=False), "S", True),
        (data_in(overflow=True), "U", True),
        (data_in(datasn=-1), "DataSN", -1),
        (data_in(buffer_offset=2**32), "BufferOffset", 2**32),
    ],
)
def test_scsi_encode_errors(pdu: PDU, field: str, value: object) -> None:
    error = encode_error(pdu)
    assert (error.field, error.value) == (field, value)
    assert field in str(error)


@given(pdu=scsi_pdus(), options=digests, data=st.data())
@settings(max_examples=300)
def test_mutated_scsi_encodings(pdu: PDU, options: dict[str, bool], data: st.DataObject) -> None:
    raw = encode_pdu(pdu, **options)
    mutate = data.draw(mutations(len(raw)))
    mutated = mutate(raw)
    decoded = decode_or_reject(mutated, **options)
    if mutated == raw:
        assert decoded == pdu


@given(pdu=scsi_pdus())
@settings(max_examples=200)
def test_compiled_scsi_build_equals_interpreted(pdu: PDU) -> None:
    assert_compiled_build_equals_interpreted(pdu)


@pytest.mark.parametrize("opcode", [Opcode.SCSI_COMMAND, Opcode.SCSI_RESPONSE, Opcode.SCSI_DATA_IN])
@pytest.mark.parametrize("size", [0, 7, 9])
def test_compiled_scsi_build_errors_come_from_the_interpreted_definition(
    opcode: Opcode, size: int
) -> None:
    # A LUN or CDB of the wrong size never reaches construct (the model layer refuses it), but
    # if it did, the interpreted Bytes field would report it rather than write it short.
    codec = wire._BY_OPCODE[opcode]
    pdu = {Opcode.SCSI_COMMAND: inquiry(), Opcode.SCSI_RESPONSE: check_condition()}.get(
        opcode, data_in()
    )
    fields, _ = codec.fields_in(pdu)
    fields.update({"TotalAHSLength": 0, "DataSegmentLength": 0})
    name = {Opcode.SCSI_COMMAND: "CDB", Opcode.SCSI_DATA_IN: "LUN"}.get(opcode, "ResidualCount")
    fields[name] = 2**32 + size if name == "ResidualCount" else bytes(size)
    with pytest.raises(ConstructError) as raised:
        wire._build_header(codec, fields)
    assert name in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Asynchronous Message (0x32)
# ---------------------------------------------------------------------------------------------

# 18-byte fixed-format sense of a SCSI event: UNIT ATTENTION 2A/09 (capacity data has changed).
CAPACITY_CHANGED = bytes.fromhex("700006000000000a000000002a0900000000")


@st.composite
def async_messages(draw: st.DrawFn) -> AsyncMessage:
    """Asynchronous Messages the codec accepts: a SCSI event always carries sense."""
    event = draw(st.sampled_from(AsyncEvent))
    if event is not AsyncEvent.SCSI_EVENT and draw(st.booleans()):
        data = b""
    else:
        minimum = 1 if event is AsyncEvent.SCSI_EVENT else 0
        sense = draw(st.binary(min_size=minimum, max_size=40))
        data = sense_data_segment(sense, draw(st.binary(max_size=12)))
    return AsyncMessage(
        async_event=event,
        statsn=draw(u32),
        expcmdsn=draw(u32),
        maxcmdsn=draw(u32),
        lun=draw(luns),
        async_vcode=draw(u8),
        parameter1=draw(u16),
        parameter2=draw(u16),
        parameter3=draw(u16),
        data=data,
    )


def async_message(**changes: Any) -> AsyncMessage:
    pdu = AsyncMessage(
        async_event=AsyncEvent.DROP_CONNECTION,
        statsn=0x11121314,
        expcmdsn=0x21222324,
        maxcmdsn=0x31323334,
        lun=bytes.fromhex("0102030405060708"),
        async_vcode=0x5A,
        parameter1=0x4142,
        parameter2=0x4344,
        parameter3=0x4546,
    )
    return dataclasses.replace(pdu, **changes)


def scsi_event(**changes: Any) -> AsyncMessage:
    return async_message(
        async_event=AsyncEvent.SCSI_EVENT,
        lun=bytes.fromhex("0001000000000000"),
        async_vcode=0,
        parameter1=0,
        parameter2=0,
        parameter3=0,
        data=sense_data_segment(CAPACITY_CHANGED, b"event"),
        **changes,
    )


@given(pdu=async_messages(), header_digest=st.booleans(), data_digest=st.booleans())
@settings(max_examples=200)
def test_async_message_round_trip(
    pdu: AsyncMessage, header_digest: bool, data_digest: bool
) -> None:
    raw = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(raw) % 4 == 0
    assert pdu_length(raw[:48], header_digest=header_digest, data_digest=data_digest) == len(raw)
    decoded = decode_pdu(raw, header_digest=header_digest, data_digest=data_digest)
    assert type(decoded) is AsyncMessage
    assert decoded == pdu
    assert encode_pdu(decoded, header_digest=header_digest, data_digest=data_digest) == raw


def test_async_message_layout() -> None:
    raw = encode_pdu(async_message(data=sense_data_segment(b"", b"vendor")))
    assert raw[0:4] == b"\x32\x80\x00\x00"  # opcode, F=1; bytes 2-3 reserved
    assert raw[4:8] == b"\x00\x00\x00\x08"  # no AHS; SenseLength (2) + 6 bytes of event data
    assert raw[8:16] == bytes.fromhex("0102030405060708")  # LUN, raw
    assert raw[16:20] == b"\xff\xff\xff\xff"  # ITT: always the reserved tag
    assert raw[20:24] == bytes(4)
    assert raw[24:28] == b"\x11\x12\x13\x14"  # StatSN
    assert raw[28:32] == b"\x21\x22\x23\x24"  # ExpCmdSN
    assert raw[32:36] == b"\x31\x32\x33\x34"  # MaxCmdSN
    assert raw[36] == 2  # AsyncEvent: the target will drop a connection
    assert raw[37] == 0x5A  # AsyncVCode
    assert raw[38:40] == b"\x41\x42"  # Parameter1: the CID
    assert raw[40:42] == b"\x43\x44"  # Parameter2: Time2Wait
    assert raw[42:44] == b"\x45\x46"  # Parameter3: Time2Retain
    assert raw[44:48] == bytes(4)
    assert raw[48:] == b"\x00\x00vendor"  # SenseLength 0, then the event data; no padding
    assert len(raw) == 56
    event = encode_pdu(scsi_event())
    assert event[36] == 0
    assert event[48:50] == b"\x00\x12"  # SenseLength 18
    assert event[50:68] == CAPACITY_CHANGED
    assert event[68:] == b"event\x00\x00\x00"


def test_async_message_from_hand_built_bytes() -> None:
    # A logout request as a target sends it: log out within 10 seconds.
    raw = bytearray(48)
    raw[0:2] = b"\x32\x80"
    raw[16:20] = b"\xff\xff\xff\xff"
    raw[24:28] = (7).to_bytes(4, "big")  # StatSN
    raw[28:32] = (3).to_bytes(4, "big")  # ExpCmdSN
    raw[32:36] = (10).to_bytes(4, "big")  # MaxCmdSN
    raw[36] = 1
    raw[42:44] = (10).to_bytes(2, "big")  # Parameter3
    decoded = decode_pdu(bytes(raw))
    expected = AsyncMessage(
        async_event=AsyncEvent.REQUEST_LOGOUT, statsn=7, expcmdsn=3, maxcmdsn=10, parameter3=10
    )
    assert decoded == expected
    assert encode_pdu(expected) == bytes(raw)


@pytest.mark.parametrize(
    ("event", "respond_within", "dropped_cid", "time2wait", "time2retain"),
    [
        (AsyncEvent.SCSI_EVENT, None, None, None, None),
        (AsyncEvent.REQUEST_LOGOUT, 0x4546, None, None, None),
        (AsyncEvent.DROP_CONNECTION, None, 0x4142, 0x4344, 0x4546),
        (AsyncEvent.DROP_ALL_CONNECTIONS, None, None, 0x4344, 0x4546),
        (AsyncEvent.REQUEST_NEGOTIATION, 0x4546, None, None, None),
        (AsyncEvent.VENDOR_SPECIFIC, None, None, None, None),
    ],
    ids=lambda v: v.name if isinstance(v, AsyncEvent) else None,
)
def test_async_parameters_are_named_per_event(
    event: AsyncEvent,
    respond_within: int | None,
    dropped_cid: int | None,
    time2wait: int | None,
    time2retain: int | None,
) -> None:
    data = sense_data_segment(CAPACITY_CHANGED) if event is AsyncEvent.SCSI_EVENT else b""
    decoded = decode_pdu(encode_pdu(async_message(async_event=event, data=data)))
    assert isinstance(decoded, AsyncMessage)
    assert decoded.async_event is event
    assert (decoded.respond_within, decoded.dropped_cid) == (respond_within, dropped_cid)
    assert (decoded.time2wait, decoded.time2retain) == (time2wait, time2retain)
    # The raw parameters stay whatever the event.
    assert (decoded.parameter1, decoded.parameter2, decoded.parameter3) == (0x4142, 0x4344, 0x4546)


def test_async_sense_and_event_data() -> None:
    decoded = decode_pdu(encode_pdu(scsi_event()))
    assert isinstance(decoded, AsyncMessage)
    assert (decoded.sense, decoded.event_data) == (CAPACITY_CHANGED, b"event")
    assert decoded.sense[12:14] == b"\x2a\x09"
    bare = async_message()
    assert (bare.sense, bare.event_data) == (b"", b"")
    vendor = async_message(async_event=AsyncEvent.VENDOR_SPECIFIC, data=b"\x00\x00abc")
    assert (vendor.sense, vendor.event_data) == (b"", b"abc")


# RFC 7143 11.9: bytes 2-3, 20-23 and 44-47, byte 0's bits 7-6 and byte 1's bits 6-0.
ASYNC_RESERVED_BYTES = [2, 3, *range(20, 24), *range(44, 48)]


@given(pdu=async_messages(), junk=st.data(), header_digest=st.booleans())
def test_async_reserved_fields_are_ignored(
    pdu: AsyncMessage, junk: st.DataObject, header_digest: bool
) -> None:
    raw = bytearray(encode_pdu(pdu))
    for offset in ASYNC_RESERVED_BYTES:
        raw[offset] = junk.draw(st.integers(1, 255))
    raw[0] |= 0xC0
    raw[1] |= 0x7F
    if header_digest:
        raw[48:48] = crc32c(bytes(raw[:48]))
    assert decode_pdu(bytes(raw), header_digest=header_digest) == pdu


@pytest.mark.parametrize("byte1", range(256))
def test_every_async_message_byte1(byte1: int) -> None:
    raw = patched(encode_pdu(scsi_event()), 1, bytes([byte1]))
    if not byte1 & 0x80:
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == ("F", 1, byte1)
        return
    assert decode_pdu(raw) == scsi_event()


@pytest.mark.parametrize("event", [5, 6, 0x80, 0xFE])
def test_reserved_async_events(event: int) -> None:
    error = decode_error(patched(encode_pdu(async_message()), 36, bytes([event])))
    assert (error.field, error.offset, error.value) == ("AsyncEvent", 36, event)
    assert "AsyncEvent" in str(error)
    refused = encode_error(async_message(async_event=event))
    assert (refused.field, refused.value) == ("AsyncEvent", event)


@pytest.mark.parametrize("itt", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xfe"])
def test_async_message_itt_is_fixed(itt: bytes) -> None:
    error = decode_error(patched(encode_pdu(async_message()), 16, itt))
    assert (error.field, error.offset, error.value) == (
        "InitiatorTaskTag",
        16,
        int.from_bytes(itt, "big"),
    )


@pytest.mark.parametrize(
    ("event", "data", "value", "reason"),
    [
        (AsyncEvent.SCSI_EVENT, b"", 0, "SCSI event (AsyncEvent 0) without sense"),
        (AsyncEvent.SCSI_EVENT, b"\x00\x00data", 0, "without sense"),
        (AsyncEvent.REQUEST_LOGOUT, b"\x00", 1, "cannot hold SenseLength"),
        (AsyncEvent.VENDOR_SPECIFIC, b"\x00\x05abcd", 5, "overrun"),
        (AsyncEvent.SCSI_EVENT, b"\xff\xff", 0xFFFF, "overrun"),
    ],
)
def test_async_sense_segment_errors(
    event: AsyncEvent, data: bytes, value: int, reason: str
) -> None:
    # Built by hand: the encoder refuses the same segments.
    header = patched(encode_pdu(async_message())[:48], 36, bytes([event]))
    header = patched(header, 5, len(data).to_bytes(3, "big"))
    stream = header + crc32c(header) + data + bytes(-len(data) % 4)
    error = decode_error(stream, header_digest=True)
    assert (error.field, error.offset, error.value) == ("SenseLength", 52, value)
    assert reason in str(error)
    refused = encode_error(async_message(async_event=event, data=data))
    assert (refused.field, refused.value) == ("SenseLength", value)


def test_non_scsi_events_may_carry_sense() -> None:
    # SenseLength is 0 "e.g., the event is not a SCSI event": an example, not a rule.
    pdu = async_message(data=sense_data_segment(CAPACITY_CHANGED))
    assert decode_pdu(encode_pdu(pdu)) == pdu


@pytest.mark.parametrize(
    ("pdu", "field", "value"),
    [
        (async_message(async_event=None), "AsyncEvent", None),
        (async_message(lun=bytes(7)), "LUN", 7),
        (async_message(lun=0), "LUN", "int"),
        (async_message(statsn=2**32), "StatSN", 2**32),
        (async_message(expcmdsn=-1), "ExpCmdSN", -1),
        (async_message(maxcmdsn="1"), "MaxCmdSN", "1"),
        (async_message(async_vcode=256), "AsyncVCode", 256),
        (async_message(parameter1=2**16), "Parameter1", 2**16),
        (async_message(parameter2=-1), "Parameter2", -1),
        (async_message(parameter3=2**16), "Parameter3", 2**16),
        (async_message(data="sense"), "DataSegment", "str"),
    ],
)
def test_async_encode_errors(pdu: AsyncMessage, field: str, value: object) -> None:
    error = encode_error(pdu)
    assert (error.field, error.value) == (field, value)
    assert field in str(error)


@given(pdu=async_messages(), options=digests, data=st.data())
@settings(max_examples=300)
def test_mutated_async_messages(
    pdu: AsyncMessage, options: dict[str, bool], data: st.DataObject
) -> None:
    raw = encode_pdu(pdu, **options)
    mutated = data.draw(mutations(len(raw)))(raw)
    decoded = decode_or_reject(mutated, **options)
    if mutated == raw:
        assert decoded == pdu


@given(pdu=async_messages())
@settings(max_examples=200)
def test_compiled_async_build_equals_interpreted(pdu: AsyncMessage) -> None:
    assert_compiled_build_equals_interpreted(pdu)


# ---------------------------------------------------------------------------------------------
# Writes and task management: SCSI Data-Out (0x05), R2T (0x31), Task Management Function
# Request (0x02) and Response (0x22)
# ---------------------------------------------------------------------------------------------
# Their strategies are in strategies.py (so every test over PDU_STRATEGIES, pdus() and Opcode
# above covers them too); these pin the RFC 7143 layouts and the rules tying fields together.

TASK_STRATEGIES: dict[type[PDU], Callable[[], st.SearchStrategy[Any]]] = {
    ScsiDataOut: data_outs,
    R2T: r2ts,
    TaskManagementRequest: task_management_requests,
    TaskManagementResponse: task_management_responses,
}
LUN_1 = bytes.fromhex("0001000000000000")


def data_out(**changes: Any) -> ScsiDataOut:
    pdu = ScsiDataOut(
        itt=0x01020304,
        expstatsn=0x21222324,
        datasn=0x41424344,
        buffer_offset=0x51525354,
        final=True,
        ttt=0x11121314,
        lun=LUN_1,
        data=b"write",
    )
    return dataclasses.replace(pdu, **changes)


def r2t(**changes: Any) -> R2T:
    pdu = R2T(
        itt=0x01020304,
        ttt=0x11121314,
        statsn=0x21222324,
        expcmdsn=0x31323334,
        maxcmdsn=0x41424344,
        r2tsn=0x51525354,
        desired_length=0x61626364,
        buffer_offset=0x71727374,
        lun=LUN_1,
    )
    return dataclasses.replace(pdu, **changes)


def abort_task(**changes: Any) -> TaskManagementRequest:
    pdu = TaskManagementRequest(
        function=TaskFunction.ABORT_TASK,
        itt=0x01020304,
        cmdsn=0x21222324,
        expstatsn=0x31323334,
        referenced_task_tag=0x11121314,
        lun=LUN_1,
        refcmdsn=0x41424344,
        expdatasn=0x51525354,
    )
    return dataclasses.replace(pdu, **changes)


def lun_reset(**changes: Any) -> TaskManagementRequest:
    reset: dict[str, Any] = {
        "function": TaskFunction.LOGICAL_UNIT_RESET,
        "referenced_task_tag": RESERVED_TAG,
        "refcmdsn": 0,
        "expdatasn": 0,
    }
    return abort_task(**{**reset, **changes})


def task_response(**changes: Any) -> TaskManagementResponse:
    pdu = TaskManagementResponse(
        response=TaskResponseCode.TASK_DOES_NOT_EXIST,
        itt=0x01020304,
        statsn=0x21222324,
        expcmdsn=0x31323334,
        maxcmdsn=0x41424344,
    )
    return dataclasses.replace(pdu, **changes)


@pytest.mark.parametrize("model", list(TASK_STRATEGIES), ids=lambda m: m.__name__)
@given(data=st.data(), header_digest=st.booleans(), data_digest=st.booleans())
@settings(max_examples=150)
def test_task_pdus_round_trip(
    model: type[PDU], data: st.DataObject, header_digest: bool, data_digest: bool
) -> None:
    pdu = data.draw(TASK_STRATEGIES[model]())
    raw = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    assert pdu_length(raw[:48], header_digest=header_digest, data_digest=data_digest) == len(raw)
    decoded = decode_pdu(raw, header_digest=header_digest, data_digest=data_digest)
    assert type(decoded) is model
    assert decoded == pdu
    assert encode_pdu(decoded, header_digest=header_digest, data_digest=data_digest) == raw


def test_scsi_data_out_layout() -> None:
    raw = encode_pdu(data_out())
    assert raw[0:4] == b"\x05\x80\x00\x00"  # opcode (no I: not a command), F; 2-3 reserved
    assert raw[4:8] == b"\x00\x00\x00\x05"  # no AHS; 5 bytes of data
    assert raw[8:16] == LUN_1  # LUN, raw
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT
    assert raw[20:24] == b"\x11\x12\x13\x14"  # TTT, copied from the R2T
    assert raw[24:28] == bytes(4)  # reserved
    assert raw[28:32] == b"\x21\x22\x23\x24"  # ExpStatSN
    assert raw[32:36] == bytes(4)  # reserved
    assert raw[36:40] == b"\x41\x42\x43\x44"  # DataSN
    assert raw[40:44] == b"\x51\x52\x53\x54"  # Buffer Offset
    assert raw[44:48] == bytes(4)  # reserved
    assert raw[48:] == b"write\x00\x00\x00"
    unsolicited = encode_pdu(ScsiDataOut(itt=7, expstatsn=8, datasn=0, data=b"abcd"))
    assert unsolicited[1] == 0x00  # F=0: more of the burst follows
    assert unsolicited[8:24] == bytes(8) + b"\x00\x00\x00\x07\xff\xff\xff\xff"


def test_r2t_layout() -> None:
    raw = encode_pdu(r2t())
    assert raw[0:4] == b"\x31\x80\x00\x00"  # opcode, fixed bit 7; 2-3 reserved
    assert raw[4:8] == bytes(4)  # no AHS, no data segment
    assert raw[8:16] == LUN_1
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT of the write
    assert raw[20:24] == b"\x11\x12\x13\x14"  # TTT
    assert raw[24:36] == bytes.fromhex("212223243132333441424344")  # StatSN, Exp/MaxCmdSN
    assert raw[36:40] == b"\x51\x52\x53\x54"  # R2TSN
    assert raw[40:44] == b"\x71\x72\x73\x74"  # Buffer Offset
    assert raw[44:48] == b"\x61\x62\x63\x64"  # Desired Data Transfer Length
    assert len(raw) == 48


def test_task_management_request_layout() -> None:
    raw = encode_pdu(abort_task())
    assert raw[0:4] == b"\x42\x81\x00\x00"  # I + opcode; F + ABORT TASK; 2-3 reserved
    assert raw[4:8] == bytes(4)  # no AHS, no data segment
    assert raw[8:16] == LUN_1
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT of the request itself
    assert raw[20:24] == b"\x11\x12\x13\x14"  # Referenced Task Tag
    assert raw[24:28] == b"\x21\x22\x23\x24"  # CmdSN
    assert raw[28:32] == b"\x31\x32\x33\x34"  # ExpStatSN
    assert raw[32:36] == b"\x41\x42\x43\x44"  # RefCmdSN
    assert raw[36:40] == b"\x51\x52\x53\x54"  # ExpDataSN
    assert raw[40:48] == bytes(8)  # reserved
    reset = encode_pdu(lun_reset(immediate=False))
    assert reset[0:2] == b"\x02\x85"  # not immediate; F + LOGICAL UNIT RESET
    assert reset[20:24] == b"\xff\xff\xff\xff"
    assert encode_pdu(lun_reset(function=TaskFunction.TARGET_COLD_RESET))[1] == 0x87


def test_task_management_response_layout() -> None:
    raw = encode_pdu(task_response())
    assert raw[0:4] == b"\x22\x80\x01\x00"  # opcode; fixed bit 7; Response 1; 3 reserved
    assert raw[4:16] == bytes(12)  # no AHS or data; bytes 8-15 reserved
    assert raw[16:20] == b"\x01\x02\x03\x04"  # ITT of the request
    assert raw[20:24] == bytes(4)  # reserved (RFC 3720's Referenced Task Tag)
    assert raw[24:36] == bytes.fromhex("212223243132333441424344")  # StatSN, Exp/MaxCmdSN
    assert raw[36:48] == bytes(12)
    rejected = encode_pdu(task_response(response=TaskResponseCode.REJECTED))
    assert rejected[2] == 0xFF


def test_task_pdus_from_hand_built_bytes() -> None:
    # A LUN reset as libiscsi sends it, and the answer tgt gives: RFC 7143 byte by byte.
    request = bytearray(48)
    request[0:2] = b"\x42\x85"  # immediate; F + LOGICAL UNIT RESET
    request[8:16] = LUN_1
    request[16:20] = (9).to_bytes(4, "big")  # ITT
    request[20:24] = b"\xff\xff\xff\xff"  # no referenced task
    request[24:28] = (3).to_bytes(4, "big")  # CmdSN
    request[28:32] = (5).to_bytes(4, "big")  # ExpStatSN
    expected_request = TaskManagementRequest(
        function=TaskFunction.LOGICAL_UNIT_RESET, itt=9, cmdsn=3, expstatsn=5, lun=LUN_1
    )
    assert decode_pdu(bytes(request)) == expected_request
    assert encode_pdu(expected_request) == bytes(request)
    response = bytearray(48)
    response[0:3] = b"\x22\x80\x00"
    response[16:20] = (9).to_bytes(4, "big")
    response[24:36] = bytes.fromhex("000000050000000300000012")
    expected_response = TaskManagementResponse(
        response=TaskResponseCode.FUNCTION_COMPLETE, itt=9, statsn=5, expcmdsn=3, maxcmdsn=0x12
    )
    assert decode_pdu(bytes(response)) == expected_response
    assert encode_pdu(expected_response) == bytes(response)


@pytest.mark.parametrize("function", list(TaskFunction), ids=lambda f: f.name)
def test_only_abort_task_and_task_reassign_reference_a_task(function: TaskFunction) -> None:
    assert function.references_task is (function.value in (1, 8))
    own = 0x11121314 if function.references_task else RESERVED_TAG
    other = RESERVED_TAG if function.references_task else 0x11121314
    pdu = abort_task(function=function, referenced_task_tag=own)
    raw = encode_pdu(pdu)
    assert raw[1] == 0x80 | function
    assert decode_pdu(raw) == pdu
    # The other pairing is refused both ways, by name.
    wrong = patched(raw, 20, other.to_bytes(4, "big"))
    error = decode_error(wrong)
    assert (error.field, error.offset, error.value) == ("ReferencedTaskTag", 20, other)
    assert function.name in str(error)
    refused = encode_error(abort_task(function=function, referenced_task_tag=other))
    assert (refused.field, refused.value) == ("ReferencedTaskTag", other)


@pytest.mark.parametrize("byte1", range(256))
def test_every_task_management_request_byte1(byte1: int) -> None:
    raw = patched(encode_pdu(lun_reset()), 1, bytes([byte1]))
    function = byte1 & 0x7F
    if not byte1 & 0x80:
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == ("F", 1, byte1)
        return
    if function not in range(1, 9):
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == ("Function", 1, function)
        assert "TaskFunction" in str(error)
        return
    if function in (1, 8):  # these need a task: the reserved tag is refused
        assert decode_error(raw).field == "ReferencedTaskTag"
        return
    decoded = decode_pdu(raw)
    assert decoded == lun_reset(function=TaskFunction(function))
    assert encode_pdu(decoded) == raw


@pytest.mark.parametrize(
    "make", [data_out, r2t, task_response], ids=["ScsiDataOut", "R2T", "TaskManagementResponse"]
)
@pytest.mark.parametrize("byte1", range(256))
def test_every_byte1_of_the_other_task_pdus(make: Callable[[], PDU], byte1: int) -> None:
    pdu = make()
    raw = patched(encode_pdu(pdu), 1, bytes([byte1]))
    if isinstance(pdu, ScsiDataOut):
        decoded = decode_pdu(raw)
        assert decoded == dataclasses.replace(pdu, final=bool(byte1 & 0x80))
        assert encode_pdu(decoded)[1] == byte1 & 0x80  # the rest is reserved
        return
    if not byte1 & 0x80:  # R2T and the Response: bit 7 is fixed at 1
        error = decode_error(raw)
        assert (error.field, error.offset, error.value) == ("F", 1, byte1)
        return
    assert decode_pdu(raw) == pdu


@pytest.mark.parametrize("code", [7, 8, 0x80, 0xFE])
def test_reserved_task_response_codes(code: int) -> None:
    error = decode_error(patched(encode_pdu(task_response()), 2, bytes([code])))
    assert (error.field, error.offset, error.value) == ("Response", 2, code)
    refused = encode_error(task_response(response=code))
    assert (refused.field, refused.value) == ("Response", code)


@pytest.mark.parametrize("code", list(TaskResponseCode), ids=lambda c: c.name)
def test_every_task_response_code(code: TaskResponseCode) -> None:
    raw = patched(encode_pdu(task_response()), 2, bytes([code]))
    decoded = decode_pdu(raw)
    assert isinstance(decoded, TaskManagementResponse)
    assert decoded.response is code


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (20, RESERVED_TAG, "TargetTransferTag"),  # "MUST NOT be sent by a target in an R2T"
        (44, 0, "DesiredDataTransferLength"),  # "MUST NOT be 0"
    ],
)
def test_r2t_rules(offset: int, value: int, field: str) -> None:
    error = decode_error(patched(encode_pdu(r2t()), offset, value.to_bytes(4, "big")))
    assert (error.field, error.offset, error.value) == (field, offset, value)
    names = {"TargetTransferTag": "ttt", "DesiredDataTransferLength": "desired_length"}
    changes: dict[str, Any] = {names[field]: value}
    refused = encode_error(r2t(**changes))
    assert (refused.field, refused.value) == (field, value)
    # Any other value goes through: a TTT of 0 and a length of 1 are as good as any.
    edge: dict[str, Any] = {names[field]: 0 if field == "TargetTransferTag" else 1}
    assert decode_pdu(encode_pdu(r2t(**edge))) == r2t(**edge)


@pytest.mark.parametrize(
    "pdu",
    [r2t(), lun_reset(), task_response()],
    ids=lambda p: type(p).__name__,
)
def test_task_pdus_without_data_segment(pdu: PDU) -> None:
    raw = patched(encode_pdu(pdu), 5, b"\x00\x00\x04") + b"data"
    error = decode_error(raw)
    assert (error.field, error.offset, error.value) == ("DataSegmentLength", 5, 4)
    assert "no data segment" in str(error)


def test_data_out_may_be_empty_or_unsolicited() -> None:
    # "The sending of 0-length data segments should be avoided, but initiators and targets
    # MUST be able to properly receive 0-length data segments."
    empty = data_out(data=b"")
    assert decode_pdu(encode_pdu(empty)) == empty
    unsolicited = data_out(ttt=RESERVED_TAG, lun=bytes(8), final=False)
    assert decode_pdu(encode_pdu(unsolicited)) == unsolicited


@pytest.mark.parametrize(
    ("pdu", "field", "value"),
    [
        (data_out(lun=bytes(7)), "LUN", 7),
        (data_out(itt=2**32), "InitiatorTaskTag", 2**32),
        (data_out(ttt=-1), "TargetTransferTag", -1),
        (data_out(expstatsn="1"), "ExpStatSN", "1"),
        (data_out(datasn=2**32), "DataSN", 2**32),
        (data_out(buffer_offset=-1), "BufferOffset", -1),
        (data_out(data="write"), "DataSegment", "str"),
        (r2t(lun=0), "LUN", "int"),
        (r2t(statsn=2**32), "StatSN", 2**32),
        (r2t(r2tsn=-1), "R2TSN", -1),
        (r2t(desired_length=2**32), "DesiredDataTransferLength", 2**32),
        (r2t(buffer_offset=2**32), "BufferOffset", 2**32),
        (abort_task(function=0), "Function", 0),
        (abort_task(function=None), "Function", None),
        (abort_task(referenced_task_tag=2**32), "ReferencedTaskTag", 2**32),
        (abort_task(lun=bytes(9)), "LUN", 9),
        (abort_task(refcmdsn=-1), "RefCmdSN", -1),
        (abort_task(expdatasn=2**32), "ExpDataSN", 2**32),
        (lun_reset(referenced_task_tag="x"), "ReferencedTaskTag", "x"),
        (task_response(response=None), "Response", None),
        (task_response(maxcmdsn=2**32), "MaxCmdSN", 2**32),
    ],
)
def test_task_pdu_encode_errors(pdu: PDU, field: str, value: object) -> None:
    error = encode_error(pdu)
    assert (error.field, error.value) == (field, value)
    assert field in str(error)


# pdus() mixes these with nine other types; the tests below give them examples of their own.
@given(
    pdu=st.one_of(data_outs(), r2ts(), task_management_requests(), task_management_responses()),
    junk=st.data(),
    header_digest=st.booleans(),
)
def test_task_pdus_reserved_fields_are_ignored(
    pdu: PDU, junk: st.DataObject, header_digest: bool
) -> None:
    raw = bytearray(encode_pdu(pdu))
    opcode = raw[0] & 0x3F
    for offset in RESERVED_BYTES[opcode]:
        raw[offset] = junk.draw(st.integers(1, 255))
    bits0, bits1 = RESERVED_BITS[opcode]
    raw[0] |= bits0
    raw[1] |= bits1
    if header_digest:
        raw[48:48] = crc32c(bytes(raw[:48]))
    assert decode_pdu(bytes(raw), header_digest=header_digest) == pdu


@given(
    pdu=st.one_of(data_outs(), r2ts(), task_management_requests(), task_management_responses()),
    options=digests,
    data=st.data(),
)
@settings(max_examples=300)
def test_mutated_task_pdus(pdu: PDU, options: dict[str, bool], data: st.DataObject) -> None:
    raw = encode_pdu(pdu, **options)
    mutated = data.draw(mutations(len(raw)))(raw)
    decoded = decode_or_reject(mutated, **options)
    if mutated == raw:
        assert decoded == pdu


@given(pdu=st.one_of(data_outs(), r2ts(), task_management_requests(), task_management_responses()))
@settings(max_examples=200)
def test_compiled_task_pdu_build_equals_interpreted(pdu: PDU) -> None:
    assert_compiled_build_equals_interpreted(pdu)


@pytest.mark.parametrize(
    "opcode",
    [Opcode.SCSI_DATA_OUT, Opcode.R2T, Opcode.TASK_MANAGEMENT_REQUEST],
    ids=lambda o: o.name,
)
@pytest.mark.parametrize("size", [0, 7, 9])
def test_compiled_task_pdu_build_errors_come_from_the_interpreted_definition(
    opcode: Opcode, size: int
) -> None:
    # As for the SCSI PDUs: a LUN of the wrong size never gets past the model layer, but the
    # interpreted Bytes field would report it rather than have compiled code write it short.
    codec = wire._BY_OPCODE[opcode]
    pdu = {Opcode.SCSI_DATA_OUT: data_out(), Opcode.R2T: r2t()}.get(opcode, abort_task())
    fields, _ = codec.fields_in(pdu)
    fields.update({"TotalAHSLength": 0, "DataSegmentLength": 0, "LUN": bytes(size)})
    with pytest.raises(ConstructError) as raised:
        wire._build_header(codec, fields)
    assert "LUN" in str(raised.value)


@pytest.mark.parametrize(
    "opcode",
    [
        Opcode.SCSI_DATA_OUT,
        Opcode.R2T,
        Opcode.TASK_MANAGEMENT_REQUEST,
        Opcode.TASK_MANAGEMENT_RESPONSE,
    ],
    ids=lambda o: o.name,
)
def test_task_pdu_headers_are_flat(opcode: Opcode) -> None:
    # Every new header is flat (integers, raw bytes, padding), so it takes the one-unpack path
    # rather than compiled construct code; test_compiled_parse_equals_interpreted holds that
    # path to the definition on random bytes.
    assert wire._flat_parser(wire._BY_OPCODE[opcode].header) is not None


# Wireshark's dissector as a second opinion on the encoder (the target side sends these). The
# bytes go into a pcap written here, as TCP segments from port 3260, each holding one PDU.


def _pcap(payloads: list[bytes]) -> bytes:
    """A classic pcap of Ethernet/IPv4/TCP frames 127.0.0.1:3260 -> 127.0.0.1:40000."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # LINKTYPE_ETHERNET
    seq = 1
    for number, payload in enumerate(payloads):
        tcp = struct.pack("!HHIIBBHHH", 3260, 40000, seq, 1, 5 << 4, 0x18, 65535, 0, 0)
        seq += len(payload)
        ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0))
        ip += bytes([127, 0, 0, 1, 127, 0, 0, 1])
        total = sum(struct.unpack("!10H", ip))
        total = (total & 0xFFFF) + (total >> 16)
        ip[10:12] = (~(total + (total >> 16)) & 0xFFFF).to_bytes(2, "big")
        frame = bytes(12) + b"\x08\x00" + bytes(ip) + tcp + payload
        out.append(struct.pack("<IIII", number, 0, len(frame), len(frame)) + frame)
    return b"".join(out)


@pytest.mark.peer
@pytest.mark.parametrize("digests", [False, True])
def test_tshark_reads_our_async_messages(tmp_path: Path, digests: bool) -> None:
    tshark = require_tool("tshark", "tshark")
    sent = [
        AsyncMessage(
            async_event=AsyncEvent.REQUEST_LOGOUT, statsn=5, expcmdsn=6, maxcmdsn=7, parameter3=10
        ),
        scsi_event(),
        async_message(),
        async_message(async_event=AsyncEvent.VENDOR_SPECIFIC, data=sense_data_segment(b"", b"v")),
    ]
    pcap = tmp_path / "async.pcap"
    pcap.write_bytes(
        _pcap([encode_pdu(p, header_digest=digests, data_digest=digests) for p in sent])
    )
    pdml = subprocess.run(
        [tshark, "-n", "-r", str(pcap), "-T", "pdml", "-d", "tcp.port==3260,iscsi"],
        capture_output=True,
        check=True,
        timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},  # no user profile
    ).stdout
    packets = ElementTree.fromstring(pdml).findall("packet")
    assert len(packets) == len(sent)
    for packet, pdu in zip(packets, sent, strict=True):
        fields = {f.get("name"): f for f in packet.iter() if f.tag in ("field", "proto")}
        assert "_ws.malformed" not in fields and "_ws.expert" not in fields
        shown = {
            name: int(fields[name].get("show", ""), 0)
            for name in (
                "iscsi.opcode",
                "iscsi.statsn",
                "iscsi.asyncevent",
                "iscsi.eventvendorcode",
                "iscsi.parameter1",
                "iscsi.parameter2",
                "iscsi.parameter3",
            )
        }
        assert shown == {
            "iscsi.opcode": 0x32,
            "iscsi.statsn": pdu.statsn,
            "iscsi.asyncevent": pdu.async_event,
            "iscsi.eventvendorcode": pdu.async_vcode,
            "iscsi.parameter1": pdu.parameter1,
            "iscsi.parameter2": pdu.parameter2,
            "iscsi.parameter3": pdu.parameter3,
        }
        if digests:
            assert "Good CRC32" in fields["iscsi.headerdigest32"].get("showname", "")
        if pdu.sense:
            assert int(fields["scsi.sns.asc"].get("show", ""), 0) == pdu.sense[12]
