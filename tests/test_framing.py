"""PDUBuffer: any chunking yields the same PDUs; hostile lengths are refused early."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import login_responses, nop_ins, pdus
from test_wire import async_messages, scsi_pdus

from pyiscsi_failover.errors import LocalProtocolError, PDUDecodeError
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.pdu import (
    PDU,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    NopIn,
    ScsiDataIn,
    ScsiResponse,
    ScsiStatus,
    TextResponse,
    sense_data_segment,
)
from pyiscsi_failover.protocol.wire import BHS_LENGTH, MAX_DATA_SEGMENT_LENGTH, encode_pdu


def drain(buffer: PDUBuffer) -> list[PDU]:
    """Every PDU the buffer can give now (bounded: each one consumes at least a BHS)."""
    out: list[PDU] = []
    for _ in range(buffer.buffered // BHS_LENGTH + 1):
        pdu = buffer.next_pdu()
        if pdu is None:
            return out
        out.append(pdu)
    assert buffer.next_pdu() is None
    return out


def chunks(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def nop_in(data: bytes = b"") -> NopIn:
    return NopIn(itt=RESERVED_TAG, ttt=7, statsn=1, expcmdsn=2, maxcmdsn=3, data=data)


def bhs_announcing(data_length: int, ahs_words: int = 0) -> bytes:
    raw = bytearray(encode_pdu(nop_in())[:BHS_LENGTH])
    raw[4] = ahs_words
    raw[5:8] = data_length.to_bytes(3, "big")
    return bytes(raw)


# ---------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------


def assert_chunking_keeps(
    sequence: list[PDU], cuts: list[int], *, header_digest: bool, data_digest: bool
) -> None:
    """``sequence`` encoded, cut at ``cuts`` and fed back gives exactly ``sequence``."""
    stream = b"".join(
        encode_pdu(p, header_digest=header_digest, data_digest=data_digest) for p in sequence
    )
    buffer = PDUBuffer(header_digest=header_digest, data_digest=data_digest)
    received: list[PDU] = []
    for chunk in chunks(stream, cuts):
        buffer.feed(chunk)
        received += drain(buffer)
    assert received == sequence
    assert buffer.buffered == 0


@given(
    sequence=st.lists(pdus(), max_size=6),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
)
@settings(max_examples=150)
def test_any_chunking_yields_the_same_pdus(
    sequence: list[PDU], cuts: list[int], header_digest: bool, data_digest: bool
) -> None:
    assert_chunking_keeps(sequence, cuts, header_digest=header_digest, data_digest=data_digest)


@given(sequence=st.lists(pdus(), min_size=1, max_size=3))
@settings(max_examples=20)
def test_byte_by_byte(sequence: list[PDU]) -> None:
    stream = b"".join(encode_pdu(p) for p in sequence)
    buffer = PDUBuffer()
    received: list[PDU] = []
    for i in range(len(stream)):
        buffer.feed(stream[i : i + 1])
        assert buffer.buffered <= len(stream)
        received += drain(buffer)
    assert received == sequence


@given(
    sequence=st.lists(pdus() | scsi_pdus(), max_size=6),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    digests=st.booleans(),
)
@settings(max_examples=100)
def test_scsi_pdus_are_framed_like_the_others(
    sequence: list[PDU], cuts: list[int], digests: bool
) -> None:
    assert_chunking_keeps(sequence, cuts, header_digest=digests, data_digest=digests)


def test_a_read_answer_in_one_stream() -> None:
    # Two Data-In (the last with status and an underflow) then nothing else: S means no SCSI
    # Response follows. Then a CHECK CONDITION Response with sense, data digests on.
    first = ScsiDataIn(itt=7, expcmdsn=2, maxcmdsn=9, datasn=0, data=b"a" * 13)
    last = ScsiDataIn(
        itt=7,
        expcmdsn=2,
        maxcmdsn=9,
        datasn=1,
        buffer_offset=13,
        final=True,
        status=ScsiStatus.GOOD,
        statsn=5,
        underflow=True,
        residual=3,
        data=b"b" * 6,
    )
    failed = ScsiResponse(
        itt=8,
        statsn=6,
        expcmdsn=3,
        maxcmdsn=9,
        status=ScsiStatus.CHECK_CONDITION,
        data=sense_data_segment(bytes.fromhex("7000020000000000000000000401")),
    )
    sequence: list[PDU] = [first, last, failed]
    stream = b"".join(encode_pdu(p, header_digest=True, data_digest=True) for p in sequence)
    buffer = PDUBuffer(header_digest=True, data_digest=True, max_data_segment_length=20)
    for i in range(len(stream)):
        buffer.feed(stream[i : i + 1])
    assert drain(buffer) == sequence


@given(
    sequence=st.lists(pdus() | scsi_pdus() | async_messages(), max_size=6),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
)
@settings(max_examples=100)
def test_async_messages_are_framed_like_the_others(
    sequence: list[PDU], cuts: list[int], header_digest: bool, data_digest: bool
) -> None:
    assert_chunking_keeps(sequence, cuts, header_digest=header_digest, data_digest=data_digest)


def test_async_messages_between_task_replies() -> None:
    # What a target may send unasked in the middle of a task: a SCSI event (sense, then event
    # data, with padding and a data digest) and a logout request (header only), between two
    # Data-In. Digests on both sides, fed byte by byte.
    sense = bytes.fromhex("700006000000000a000000002a0900000000")
    event = AsyncMessage(
        async_event=AsyncEvent.SCSI_EVENT,
        statsn=4,
        expcmdsn=2,
        maxcmdsn=9,
        lun=bytes.fromhex("0001000000000000"),
        data=sense_data_segment(sense, b"event"),
    )
    logout = AsyncMessage(
        async_event=AsyncEvent.REQUEST_LOGOUT, statsn=5, expcmdsn=2, maxcmdsn=9, parameter3=10
    )
    first = ScsiDataIn(itt=7, expcmdsn=2, maxcmdsn=9, datasn=0, data=b"a" * 13)
    last = ScsiDataIn(
        itt=7,
        expcmdsn=2,
        maxcmdsn=9,
        datasn=1,
        buffer_offset=13,
        final=True,
        status=ScsiStatus.GOOD,
        statsn=6,
        data=b"b" * 3,
    )
    sequence: list[PDU] = [first, event, logout, last]
    stream = b"".join(encode_pdu(p, header_digest=True, data_digest=True) for p in sequence)
    # 48 + 4 each, then the padded data and its digest where there is data.
    assert len(stream) == (52 + 16 + 4) + (52 + 28 + 4) + 52 + (52 + 4 + 4)
    buffer = PDUBuffer(header_digest=True, data_digest=True, max_data_segment_length=25)
    received: list[PDU] = []
    for i in range(len(stream)):
        buffer.feed(stream[i : i + 1])
        received += drain(buffer)
    assert received == sequence
    assert isinstance(received[1], AsyncMessage)
    assert (received[1].sense, received[1].event_data) == (sense, b"event")
    assert isinstance(received[2], AsyncMessage)
    assert received[2].respond_within == 10


def test_async_message_with_a_bad_data_digest_is_refused() -> None:
    event = AsyncMessage(
        async_event=AsyncEvent.VENDOR_SPECIFIC,
        statsn=1,
        expcmdsn=1,
        maxcmdsn=1,
        async_vcode=7,
        data=sense_data_segment(b"", b"vendor"),
    )
    stream = bytearray(encode_pdu(event, header_digest=True, data_digest=True))
    stream[-1] ^= 0x01
    buffer = PDUBuffer(header_digest=True, data_digest=True)
    buffer.feed(bytes(stream))
    with pytest.raises(PDUDecodeError) as info:
        buffer.next_pdu()
    assert (info.value.field, info.value.offset) == ("DataDigest", len(stream) - 4)


def test_oversized_data_in_refused_on_its_header() -> None:
    raw = encode_pdu(ScsiDataIn(itt=1, expcmdsn=1, maxcmdsn=1, datasn=0, data=bytes(513)))
    buffer = PDUBuffer(max_data_segment_length=512)
    buffer.feed(raw[:48])
    with pytest.raises(PDUDecodeError) as info:
        buffer.next_pdu()
    assert (info.value.field, info.value.value) == ("DataSegmentLength", 513)


def test_partial_pdu_waits_and_counts() -> None:
    raw = encode_pdu(nop_in(b"ping!"))
    buffer = PDUBuffer()
    assert buffer.next_pdu() is None
    buffer.feed(raw[:47])
    assert (buffer.next_pdu(), buffer.buffered) == (None, 47)
    buffer.feed(raw[47:-1])
    assert (buffer.next_pdu(), buffer.buffered) == (None, len(raw) - 1)
    buffer.feed(raw[-1:] + raw[:10])
    assert buffer.next_pdu() == nop_in(b"ping!")
    assert buffer.buffered == 10
    assert buffer.next_pdu() is None


def test_many_pdus_in_one_feed() -> None:
    sequence = [nop_in(bytes([i % 256]) * (i % 50)) for i in range(3000)]
    buffer = PDUBuffer()
    buffer.feed(b"".join(encode_pdu(p) for p in sequence))
    received = [buffer.next_pdu() for _ in sequence]
    assert received == sequence
    assert buffer.buffered == 0
    assert buffer.next_pdu() is None


def test_digest_settings_apply_from_the_next_pdu() -> None:
    # The final Login Response travels without digests; what follows carries them.
    login = encode_pdu(nop_in(b"before"))
    after = encode_pdu(nop_in(b"after"), header_digest=True, data_digest=True)
    buffer = PDUBuffer()
    buffer.feed(login + after)
    assert buffer.next_pdu() == nop_in(b"before")
    buffer.header_digest = True
    buffer.data_digest = True
    assert buffer.next_pdu() == nop_in(b"after")


def test_raising_the_cap_after_login() -> None:
    big = encode_pdu(nop_in(bytes(10000)))
    buffer = PDUBuffer()
    buffer.max_data_segment_length = 65536
    assert buffer.max_data_segment_length == 65536
    buffer.feed(big)
    assert buffer.next_pdu() == nop_in(bytes(10000))


# ---------------------------------------------------------------------------------------------
# hostile lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0, 512, 8192])
def test_oversized_data_segment_refused_on_the_header(cap: int) -> None:
    buffer = PDUBuffer(max_data_segment_length=cap)
    header = bhs_announcing(cap + 1)
    buffer.feed(header[:-1])
    assert buffer.next_pdu() is None
    buffer.feed(header[-1:])  # the 48th byte: no data has arrived, none is waited for
    with pytest.raises(PDUDecodeError) as info:
        buffer.next_pdu()
    assert type(info.value) is PDUDecodeError
    assert (info.value.field, info.value.offset, info.value.value) == (
        "DataSegmentLength",
        5,
        cap + 1,
    )
    assert buffer.buffered == 0


def test_largest_announced_length_is_refused_at_default_cap() -> None:
    buffer = PDUBuffer()
    buffer.feed(bhs_announcing(MAX_DATA_SEGMENT_LENGTH))
    with pytest.raises(PDUDecodeError):
        buffer.next_pdu()


def test_data_segment_at_the_cap_is_accepted() -> None:
    buffer = PDUBuffer(max_data_segment_length=8192)
    buffer.feed(encode_pdu(nop_in(bytes(8192))))
    assert buffer.next_pdu() == nop_in(bytes(8192))


def test_largest_ahs_is_skipped() -> None:
    raw = encode_pdu(nop_in(b"data"))
    with_ahs = bhs_announcing(4, ahs_words=255) + bytes(1020) + raw[48:]
    buffer = PDUBuffer()
    buffer.feed(with_ahs[:-1])
    assert buffer.next_pdu() is None
    buffer.feed(with_ahs[-1:])
    assert buffer.next_pdu() == nop_in(b"data")


def test_failure_is_sticky() -> None:
    buffer = PDUBuffer()
    buffer.feed(bytes([0x10]) + bytes(47) + encode_pdu(nop_in()))  # SNACK: unmodelled
    with pytest.raises(PDUDecodeError) as first:
        buffer.next_pdu()
    assert first.value.field == "Opcode"
    buffer.feed(encode_pdu(nop_in()))
    assert buffer.buffered == 0
    with pytest.raises(PDUDecodeError) as again:
        buffer.next_pdu()
    assert type(again.value) is PDUDecodeError
    assert (again.value.field, again.value.offset, str(again.value)) == (
        "Opcode",
        0,
        str(first.value),
    )


def test_digest_mismatch_in_stream() -> None:
    raw = bytearray(encode_pdu(nop_in(b"abcd"), header_digest=True, data_digest=True))
    raw[-5] ^= 0xFF
    buffer = PDUBuffer(header_digest=True, data_digest=True)
    buffer.feed(bytes(raw))
    with pytest.raises(PDUDecodeError) as info:
        buffer.next_pdu()
    assert info.value.field == "DataDigest"


@pytest.mark.parametrize("cap", [-1, 2**24, 1.5, True, "8192"])
def test_bad_cap_is_refused(cap: object) -> None:
    with pytest.raises(LocalProtocolError):
        PDUBuffer(max_data_segment_length=cap)  # type: ignore[arg-type]
    buffer = PDUBuffer()
    with pytest.raises(LocalProtocolError):
        buffer.max_data_segment_length = cap  # type: ignore[assignment]
    assert buffer.max_data_segment_length == 8192


# ---------------------------------------------------------------------------------------------
# totality
# ---------------------------------------------------------------------------------------------


def feed_all(buffer: PDUBuffer, pieces: list[bytes]) -> list[PDU]:
    """Feed and drain; only PDUDecodeError may escape, after which the buffer stays failed."""
    received: list[PDU] = []
    try:
        for piece in pieces:
            buffer.feed(piece)
            received += drain(buffer)
    except Exception as exc:  # anything but PDUDecodeError fails just below
        error = exc
    else:
        return received
    assert type(error) is PDUDecodeError
    with pytest.raises(PDUDecodeError):
        buffer.next_pdu()
    return received


@given(
    pieces=st.lists(st.binary(max_size=120), max_size=8),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
    cap=st.sampled_from([0, 16, 8192]),
)
def test_arbitrary_stream(
    pieces: list[bytes], header_digest: bool, data_digest: bool, cap: int
) -> None:
    buffer = PDUBuffer(
        max_data_segment_length=cap, header_digest=header_digest, data_digest=data_digest
    )
    feed_all(buffer, pieces)


@given(
    sequence=st.lists(st.one_of(login_responses(), nop_ins()), min_size=1, max_size=4),
    flips=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
    cut=st.integers(0, 10**6),
    header_digest=st.booleans(),
)
@settings(max_examples=150)
def test_mutated_stream(
    sequence: list[PDU], flips: list[int], cut: int, header_digest: bool
) -> None:
    stream = bytearray(b"".join(encode_pdu(p, header_digest=header_digest) for p in sequence))
    for flip in flips:
        bit = flip % (len(stream) * 8)
        stream[bit // 8] ^= 0x80 >> (bit % 8)
    cut %= len(stream) + 1
    buffer = PDUBuffer(header_digest=header_digest)
    received = feed_all(buffer, [bytes(stream[:cut]), bytes(stream[cut:])])
    assert len(received) <= len(sequence) + len(stream) // BHS_LENGTH


def test_text_response_stream_example() -> None:
    # A discovery answer split mid-key, as a real target's TCP segments may be.
    first = TextResponse(
        final=False, cont=True, itt=1, ttt=5, statsn=1, expcmdsn=2, maxcmdsn=3, data=b"Target"
    )
    second = TextResponse(
        final=True,
        cont=False,
        itt=1,
        ttt=RESERVED_TAG,
        statsn=2,
        expcmdsn=2,
        maxcmdsn=3,
        data=b"Name=iqn.2003-01.org.example:disk\x00",
    )
    stream = encode_pdu(first) + encode_pdu(second)
    buffer = PDUBuffer()
    buffer.feed(stream[:60])
    assert drain(buffer) == [first]
    buffer.feed(stream[60:])
    assert drain(buffer) == [second]
