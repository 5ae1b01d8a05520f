"""The sans-IO initiator's full feature phase: SCSI commands, the CmdSN window, Data-In, status.

A scripted target logs the connection in, then answers the SCSI Command PDUs read back off the
wire with :func:`~pyiscsi_failover.protocol.wire.decode_pdu`. No sockets, no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_initiator import agree, config

from pyiscsi_failover.errors import LocalProtocolError, ProtocolError
from pyiscsi_failover.initiator import (
    NEED_DATA,
    Event,
    InitiatorConnection,
    LoggedOut,
    LoginSucceeded,
    ScsiCompleted,
    State,
    TargetRequest,
)
from pyiscsi_failover.protocol.pdu import (
    PDU,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    ScsiCommand,
    ScsiDataIn,
    ScsiResponse,
    ScsiStatus,
    Stage,
    StatusClass,
    TaskAttribute,
    sense_data_segment,
)
from pyiscsi_failover.protocol.scsi import (
    SenseKey,
    cdb_inquiry,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    encode_fixed_sense,
    lun_field,
    parse_sense,
)
from pyiscsi_failover.protocol.text import encode_text
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu, pdu_length

MASK = 0xFFFFFFFF
LUN1 = lun_field(1)
LUN0 = bytes(8)
INQUIRY = cdb_inquiry()
TUR = cdb_test_unit_ready()
RC16 = cdb_read_capacity_16()
#: The StatSN of the final Login Response in :func:`logged_in`; commands then carry +1.
LOGIN_STATSN = 8


# -- the scripted target -------------------------------------------------------------------------


def wire(conn: InitiatorConnection) -> list[PDU]:
    """Split what the initiator sends into PDUs and decode each on its own, as a target would."""
    raw = conn.data_to_send()
    out: list[PDU] = []
    at = 0
    while at < len(raw):
        size = pdu_length(raw[at : at + 48], header_digest=False, data_digest=False)
        out.append(decode_pdu(raw[at : at + size]))
        at += size
    return out


def commands(conn: InitiatorConnection) -> list[ScsiCommand]:
    sent = wire(conn)
    assert all(isinstance(pdu, ScsiCommand) for pdu in sent), sent
    return [pdu for pdu in sent if isinstance(pdu, ScsiCommand)]


def login_answer(
    request: LoginRequest,
    keys: Sequence[tuple[str, str]],
    *,
    nsg: Stage,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    tsih: int = 0,
) -> bytes:
    return encode_pdu(
        LoginResponse(
            transit=True,
            cont=False,
            csg=request.csg,
            nsg=nsg,
            isid=request.isid,
            tsih=tsih,
            itt=request.itt,
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            status_class=StatusClass.SUCCESS,
            status_detail=0,
            data=encode_text(keys),
        )
    )


def logged_in(
    *, initial_cmdsn: int = 1, window: int = 2, maxcmdsn: int | None = None
) -> InitiatorConnection:
    """A connection in the full feature phase. The final Login Response's MaxCmdSN lets
    ``window`` commands in (ExpCmdSN + window - 1) unless ``maxcmdsn`` says otherwise."""
    conn = InitiatorConnection(config(), initial_cmdsn=initial_cmdsn)
    conn.start_login()
    (first,) = wire(conn)
    assert isinstance(first, LoginRequest) and first.cmdsn == initial_cmdsn
    cmdsn = first.cmdsn
    conn.receive_data(
        login_answer(
            first,
            [("AuthMethod", "None")],
            nsg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            statsn=LOGIN_STATSN - 1,
            expcmdsn=cmdsn,
            maxcmdsn=cmdsn,
        )
    )
    assert conn.next_event() is NEED_DATA
    (second,) = wire(conn)
    assert isinstance(second, LoginRequest) and second.cmdsn == cmdsn
    top = (cmdsn + window - 1) & MASK if maxcmdsn is None else maxcmdsn
    conn.receive_data(
        login_answer(
            second,
            agree(second),
            nsg=Stage.FULL_FEATURE_PHASE,
            statsn=LOGIN_STATSN,
            expcmdsn=cmdsn,
            maxcmdsn=top,
            tsih=9,
        )
    )
    assert isinstance(conn.next_event(), LoginSucceeded)
    assert conn.state is State.FULL_FEATURE
    assert conn.data_to_send() == b""
    return conn


def response(
    itt: int,
    *,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    status: ScsiStatus | None = ScsiStatus.GOOD,
    sense: bytes = b"",
    **kw: object,
) -> bytes:
    return encode_pdu(
        ScsiResponse(
            itt=itt,
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            status=status,
            data=sense_data_segment(sense) if sense else b"",
            **kw,  # type: ignore[arg-type]
        )
    )


def data_in(
    itt: int,
    datasn: int,
    offset: int,
    data: bytes,
    *,
    expcmdsn: int = 1,
    maxcmdsn: int = 2,
    status: ScsiStatus | None = None,
    statsn: int = 0,
    **kw: object,
) -> bytes:
    return encode_pdu(
        ScsiDataIn(
            itt=itt,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            datasn=datasn,
            buffer_offset=offset,
            data=data,
            final=status is not None,
            status=status,
            statsn=statsn,
            **kw,  # type: ignore[arg-type]
        )
    )


def events(conn: InitiatorConnection, data: bytes = b"") -> list[Event]:
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        out.append(event)
    return out


def state_of(conn: InitiatorConnection) -> State:
    return conn.state


# -- submit: ITTs and the SCSI Command PDUs -----------------------------------------------------


@pytest.mark.parametrize("initial_cmdsn", [1, 1000, 0x7FFFFFFF])
def test_submit_sends_commands_with_their_fields(initial_cmdsn: int) -> None:
    conn = logged_in(initial_cmdsn=initial_cmdsn, window=8)
    itts = [
        conn.submit(cdb_report_luns().cdb, lun=LUN0, transfer_length=4096),
        conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=255),
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=0),
        conn.submit(RC16.cdb, lun=LUN1, transfer_length=32),
    ]
    assert len(set(itts)) == 4 and RESERVED_TAG not in itts
    assert conn.outstanding == 4
    sent = commands(conn)
    assert [c.itt for c in sent] == itts
    # The first full-feature command reuses the login's CmdSN; then one more each.
    assert [c.cmdsn for c in sent] == [(initial_cmdsn + i) & MASK for i in range(4)]
    assert [c.lun for c in sent] == [LUN0, LUN1, LUN1, LUN1]
    assert [c.edtl for c in sent] == [4096, 255, 0, 32]
    # R only for a command that reads something; TEST UNIT READY moves no data.
    assert [c.read for c in sent] == [True, True, False, True]
    assert not any(c.write for c in sent)
    assert all(c.expstatsn == LOGIN_STATSN + 1 for c in sent)
    assert all(c.final and not c.immediate for c in sent)
    assert all(c.attribute is TaskAttribute.SIMPLE for c in sent)
    assert sent[1].cdb == INQUIRY.cdb + bytes(16 - len(INQUIRY.cdb))
    assert sent[3].cdb == RC16.cdb


def test_submit_outside_the_full_feature_phase_is_a_local_error() -> None:
    conn = InitiatorConnection(config())
    with pytest.raises(LocalProtocolError, match="submit"):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    conn = logged_in()
    with pytest.raises(LocalProtocolError, match="transfer_length"):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=-1)
    with pytest.raises(LocalProtocolError, match="transfer_length"):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=1 << 32)
    assert conn.outstanding == 0 and conn.data_to_send() == b""
    conn.logout()
    with pytest.raises(LocalProtocolError, match="logging out"):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    (bye,) = wire(conn)
    assert isinstance(bye, LogoutRequest)
    done = LogoutResponse(
        response=LogoutResponseCode.CLOSED, itt=bye.itt, statsn=9, expcmdsn=1, maxcmdsn=2
    )
    assert events(conn, encode_pdu(done)) == [LoggedOut(response=LogoutResponseCode.CLOSED)]
    with pytest.raises(LocalProtocolError, match="done"):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)


@pytest.mark.parametrize("window", [1, 2], ids=["window-closed", "window-open"])
@pytest.mark.parametrize(
    ("cdb", "lun"), [(bytes(17), LUN1), (TUR.cdb, bytes(7))], ids=["cdb-17-bytes", "lun-7-bytes"]
)
def test_a_command_the_codec_cannot_carry_is_refused_by_submit_leaving_no_trace(
    window: int, cdb: bytes, lun: bytes
) -> None:
    """Refused at once, by submit(), with nothing left behind: no task that never ends, no
    CmdSN that the target would wait for in vain, no error from a later, unrelated call."""
    conn = logged_in(window=window)
    first = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) if window == 1 else None
    with pytest.raises(LocalProtocolError):
        conn.submit(cdb, lun=lun, transfer_length=0)
    assert conn.outstanding == (1 if first is not None else 0)
    if first is not None:
        (sent,) = commands(conn)
        got = events(conn, response(first, statsn=9, expcmdsn=2, maxcmdsn=3))
        assert got == [ScsiCompleted(itt=first, status=ScsiStatus.GOOD)]
        assert commands(conn) == []
    fine = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    (sent,) = commands(conn)
    assert (sent.itt, sent.cmdsn) == (fine, 2 if first is not None else 1)


# -- the CmdSN window ------------------------------------------------------------------------------


def test_pipelining_stops_at_maxcmdsn_and_resumes_in_order_as_responses_open_it() -> None:
    conn = logged_in(window=2)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(4)]
    first = commands(conn)
    assert [(c.itt, c.cmdsn) for c in first] == [(itts[0], 1), (itts[1], 2)]
    assert conn.outstanding == 4
    # A response that does not widen the window lets nothing more out.
    got = events(conn, response(itts[0], statsn=9, expcmdsn=2, maxcmdsn=2))
    assert got == [ScsiCompleted(itt=itts[0], status=ScsiStatus.GOOD)]
    assert conn.data_to_send() == b""
    # MaxCmdSN 3 admits exactly the third command, which acknowledges StatSN 9.
    events(conn, response(itts[1], statsn=10, expcmdsn=3, maxcmdsn=3))
    (third,) = commands(conn)
    assert (third.itt, third.cmdsn, third.expstatsn) == (itts[2], 3, 11)
    events(conn, response(itts[2], statsn=11, expcmdsn=4, maxcmdsn=10))
    (fourth,) = commands(conn)
    assert (fourth.itt, fourth.cmdsn, fourth.expstatsn) == (itts[3], 4, 12)
    # The window is wide now: a new command leaves at once.
    fifth = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    (sent,) = commands(conn)
    assert (sent.itt, sent.cmdsn) == (fifth, 5)


def test_a_login_that_closes_the_window_holds_commands_back() -> None:
    # MaxCmdSN = ExpCmdSN - 1 is a valid, empty window (RFC 7143 section 4.2.2.1).
    conn = logged_in(maxcmdsn=0)
    itt = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    assert conn.data_to_send() == b"", "a command went out through a closed CmdSN window"
    opening = NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, statsn=9, expcmdsn=1, maxcmdsn=1)
    assert events(conn, encode_pdu(opening)) == []
    (sent,) = commands(conn)
    assert (sent.itt, sent.cmdsn) == (itt, 1)


@pytest.mark.parametrize(
    ("expcmdsn", "maxcmdsn", "opens"),
    [
        (4, 3, True),  # MaxCmdSN = ExpCmdSN - 1: valid (a closed window), and further on
        (5, 3, False),  # MaxCmdSN < ExpCmdSN - 1: invalid, ignored though it is further on
        (0x80000003, 3, False),  # ExpCmdSN half the serial space away: invalid too
    ],
)
def test_an_invalid_window_is_ignored(expcmdsn: int, maxcmdsn: int, opens: bool) -> None:
    conn = logged_in(window=2)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(3)]
    assert len(commands(conn)) == 2
    events(conn, response(itts[0], statsn=9, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn))
    sent = commands(conn)
    assert [c.cmdsn for c in sent] == ([3] if opens else [])


def test_maxcmdsn_never_moves_backwards() -> None:
    conn = logged_in(window=2)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(2)]
    commands(conn)
    events(conn, response(itts[0], statsn=9, expcmdsn=2, maxcmdsn=10))
    # A valid window that ends earlier than the one already granted changes nothing.
    events(conn, response(itts[1], statsn=10, expcmdsn=3, maxcmdsn=3))
    for _ in range(8):
        conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    assert [c.cmdsn for c in commands(conn)] == list(range(3, 11))
    conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    assert conn.data_to_send() == b""  # CmdSN 11 is past MaxCmdSN 10


def test_cmdsn_and_the_window_wrap_at_2_to_the_32() -> None:
    conn = logged_in(initial_cmdsn=0xFFFFFFFE, window=3)  # MaxCmdSN 0
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(4)]
    assert [c.cmdsn for c in commands(conn)] == [0xFFFFFFFE, 0xFFFFFFFF, 0]
    # MaxCmdSN 1 is ahead of 0 in serial arithmetic, though smaller as an integer.
    events(conn, response(itts[0], statsn=9, expcmdsn=0xFFFFFFFF, maxcmdsn=1))
    (last,) = commands(conn)
    assert (last.itt, last.cmdsn) == (itts[3], 1)
    # And 0xFFFFFFF0 is behind 1: not a wider window.
    events(conn, response(itts[1], statsn=10, expcmdsn=0, maxcmdsn=0xFFFFFFF0))
    conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    assert conn.data_to_send() == b""


# -- Data-In and status ------------------------------------------------------------------------


def test_data_in_is_assembled_and_status_on_the_last_one_completes_the_task() -> None:
    conn = logged_in(window=4)
    itt = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=96)
    other = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    commands(conn)
    parts = [bytes([i]) * 32 for i in (1, 2, 3)]
    assert events(conn, data_in(itt, 0, 0, parts[0])) == []
    assert events(conn, data_in(itt, 1, 32, parts[1])) == []
    assert conn.outstanding == 2
    done = events(conn, data_in(itt, 2, 64, parts[2], status=ScsiStatus.GOOD, statsn=9))
    assert done == [ScsiCompleted(itt=itt, status=ScsiStatus.GOOD, data=b"".join(parts))]
    assert conn.outstanding == 1
    # StatSN 9 rode on the Data-In: the next command acknowledges it.
    conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    (next_command,) = commands(conn)
    assert next_command.expstatsn == 10
    # No SCSI Response may follow a Data-In that carried status: the task is gone.
    with pytest.raises(ProtocolError, match=f"0x{itt:08x}"):
        events(conn, response(itt, statsn=10, expcmdsn=4, maxcmdsn=8))
    assert state_of(conn) is State.FAILED
    assert other != itt


def test_data_in_then_a_scsi_response_gives_the_data_with_the_status() -> None:
    conn = logged_in(window=4)
    itt = conn.submit(cdb_report_luns().cdb, lun=LUN0, transfer_length=4096)
    commands(conn)
    assert events(conn, data_in(itt, 0, 0, b"abcd")) == []
    assert events(conn, data_in(itt, 1, 4, b"efgh")) == []
    got = events(
        conn,
        response(itt, statsn=9, expcmdsn=2, maxcmdsn=5, underflow=True, residual=4096 - 8),
    )
    assert got == [
        ScsiCompleted(
            itt=itt, status=ScsiStatus.GOOD, data=b"abcdefgh", underflow=True, residual=4088
        )
    ]


def test_check_condition_carries_its_sense() -> None:
    conn = logged_in(window=4)
    itt = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    commands(conn)
    sense = encode_fixed_sense(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
    (got,) = events(
        conn,
        response(
            itt, statsn=9, expcmdsn=2, maxcmdsn=5, status=ScsiStatus.CHECK_CONDITION, sense=sense
        ),
    )
    assert isinstance(got, ScsiCompleted)
    assert got.status is ScsiStatus.CHECK_CONDITION and got.sense == sense
    parsed = parse_sense(got.sense)
    assert (parsed.key, parsed.asc, parsed.ascq) == (SenseKey.UNIT_ATTENTION, 0x29, 0x00)


def test_tgt_style_data_in_before_a_check_condition_keeps_both() -> None:
    # tgt sends the data it has, then a CHECK CONDITION Response (seen with a missing LUN).
    conn = logged_in(window=4)
    itt = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=255)
    commands(conn)
    events(conn, data_in(itt, 0, 0, b"\x7f" + bytes(35)))
    sense = encode_fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
    (got,) = events(
        conn,
        response(
            itt, statsn=9, expcmdsn=2, maxcmdsn=5, status=ScsiStatus.CHECK_CONDITION, sense=sense
        ),
    )
    assert got == ScsiCompleted(
        itt=itt, status=ScsiStatus.CHECK_CONDITION, data=b"\x7f" + bytes(35), sense=sense
    )


@pytest.mark.parametrize("on_data_in", [True, False])
def test_underflow_and_overflow_residuals_are_reported(on_data_in: bool) -> None:
    conn = logged_in(window=4)
    short = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=255)
    cut = conn.submit(RC16.cdb, lun=LUN1, transfer_length=12)
    commands(conn)
    if on_data_in:
        got = events(
            conn,
            data_in(
                short,
                0,
                0,
                bytes(36),
                status=ScsiStatus.GOOD,
                statsn=9,
                underflow=True,
                residual=219,
            ),
        )
        got += events(
            conn,
            data_in(
                cut, 0, 0, bytes(12), status=ScsiStatus.GOOD, statsn=10, overflow=True, residual=20
            ),
        )
    else:
        events(conn, data_in(short, 0, 0, bytes(36)))
        events(conn, data_in(cut, 0, 0, bytes(12)))
        got = events(
            conn, response(short, statsn=9, expcmdsn=3, maxcmdsn=6, underflow=True, residual=219)
        )
        got += events(
            conn, response(cut, statsn=10, expcmdsn=3, maxcmdsn=6, overflow=True, residual=20)
        )
    assert got == [
        ScsiCompleted(
            itt=short, status=ScsiStatus.GOOD, data=bytes(36), underflow=True, residual=219
        ),
        ScsiCompleted(itt=cut, status=ScsiStatus.GOOD, data=bytes(12), overflow=True, residual=20),
    ]


def test_a_target_failure_response_has_no_status() -> None:
    conn = logged_in(window=4)
    itt = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    commands(conn)
    got = events(conn, response(itt, statsn=9, expcmdsn=2, maxcmdsn=5, status=None, response=1))
    assert got == [ScsiCompleted(itt=itt, status=None, response=1)]


def _two_reads() -> tuple[InitiatorConnection, int, int]:
    conn = logged_in(window=2)
    first = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=64)
    second = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=64)
    commands(conn)
    return conn, first, second


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (lambda a, b: data_in(a, 1, 0, bytes(8)), "DataSN 1, expected 0"),
        (lambda a, b: data_in(a, 0, 0, bytes(8)) + data_in(a, 2, 8, bytes(8)), "out of order"),
        (lambda a, b: data_in(a, 0, 0, bytes(8)) + data_in(a, 0, 8, bytes(8)), "DataSN 0"),
        (lambda a, b: data_in(a, 0, 4, bytes(8)), "buffer offset 4, expected 0"),
        (lambda a, b: data_in(a, 0, 0, bytes(8)) + data_in(a, 1, 16, bytes(8)), "offset 16"),
        (lambda a, b: data_in(a, 0, 0, bytes(64)) + data_in(a, 1, 64, bytes(4)), "expected len"),
        (lambda a, b: data_in(a, 0, 0, bytes(68)), "past the expected length 64"),
        (lambda a, b: data_in(0x1234, 0, 0, bytes(8)), "0x00001234"),
        (lambda a, b: response(0x1234, statsn=9, expcmdsn=3, maxcmdsn=4), "0x00001234"),
        (lambda a, b: data_in(RESERVED_TAG, 0, 0, bytes(8)), "names no command"),
    ],
    ids=[
        "datasn-starts-at-1",
        "datasn-skips",
        "datasn-repeats",
        "offset-not-0",
        "offset-gap",
        "past-edtl-later",
        "past-edtl-at-once",
        "unknown-itt-data-in",
        "unknown-itt-response",
        "reserved-itt",
    ],
)
def test_broken_data_in_is_a_protocol_error(stream: object, match: str) -> None:
    conn, first, second = _two_reads()
    with pytest.raises(ProtocolError, match=match):
        events(conn, stream(first, second))  # type: ignore[operator]
    assert state_of(conn) is State.FAILED


def test_an_answer_for_a_command_not_yet_sent_is_a_protocol_error() -> None:
    conn = logged_in(window=1)
    conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    waiting = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=64)
    assert len(commands(conn)) == 1
    with pytest.raises(ProtocolError, match="names no command"):
        events(conn, data_in(waiting, 0, 0, bytes(8)))


def test_data_ins_of_two_tasks_may_interleave() -> None:
    conn, first, second = _two_reads()
    stream = (
        data_in(first, 0, 0, b"A" * 8)
        + data_in(second, 0, 0, b"B" * 8)
        + data_in(second, 1, 8, b"b" * 8, status=ScsiStatus.GOOD, statsn=9)
        + data_in(first, 1, 8, b"a" * 8, status=ScsiStatus.GOOD, statsn=10)
    )
    assert events(conn, stream) == [
        ScsiCompleted(itt=second, status=ScsiStatus.GOOD, data=b"B" * 8 + b"b" * 8),
        ScsiCompleted(itt=first, status=ScsiStatus.GOOD, data=b"A" * 8 + b"a" * 8),
    ]


# -- NOP-In and logout with tasks outstanding ------------------------------------------------------


def test_a_nop_in_ping_during_outstanding_tasks_is_answered() -> None:
    conn = logged_in(window=2)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(3)]
    assert len(commands(conn)) == 2
    ping = NopIn(itt=RESERVED_TAG, ttt=0x77, statsn=9, expcmdsn=1, maxcmdsn=2, data=b"are you")
    assert events(conn, encode_pdu(ping)) == []
    (echo,) = wire(conn)
    assert isinstance(echo, NopOut)
    assert (echo.itt, echo.ttt, echo.data, echo.immediate) == (RESERVED_TAG, 0x77, b"are you", True)
    assert echo.expstatsn == LOGIN_STATSN + 1  # an unsolicited NOP-In does not advance StatSN
    assert conn.outstanding == 3
    # A NOP-In without a ping is not answered, but the window it opens is used.
    opening = NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, statsn=9, expcmdsn=1, maxcmdsn=3)
    assert events(conn, encode_pdu(opening)) == []
    (third,) = commands(conn)
    assert (third.itt, third.cmdsn) == (itts[2], 3)
    got = events(
        conn,
        b"".join(
            response(itt, statsn=9 + i, expcmdsn=2 + i, maxcmdsn=5) for i, itt in enumerate(itts)
        ),
    )
    assert [e.itt for e in got if isinstance(e, ScsiCompleted)] == itts


def test_logout_with_tasks_outstanding_drops_their_completions() -> None:
    conn = logged_in(window=2)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(2)]
    commands(conn)
    conn.logout()
    (bye,) = wire(conn)
    assert isinstance(bye, LogoutRequest) and bye.itt not in itts
    stream = (
        response(itts[0], statsn=9, expcmdsn=3, maxcmdsn=4)
        + data_in(itts[1], 0, 0, b"", status=ScsiStatus.GOOD, statsn=10)
        + encode_pdu(
            LogoutResponse(
                response=LogoutResponseCode.CLOSED, itt=bye.itt, statsn=11, expcmdsn=3, maxcmdsn=4
            )
        )
    )
    assert events(conn, stream) == [LoggedOut(response=LogoutResponseCode.CLOSED)]
    assert state_of(conn) is State.DONE
    assert conn.data_to_send() == b""


def test_no_command_leaves_after_the_logout_request() -> None:
    conn = logged_in(window=1)
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(2)]
    assert len(commands(conn)) == 1
    conn.logout()
    (bye,) = wire(conn)
    assert isinstance(bye, LogoutRequest)
    # The window opens while the logout is on its way: the queued command must stay queued.
    opening = NopIn(itt=RESERVED_TAG, ttt=RESERVED_TAG, statsn=9, expcmdsn=1, maxcmdsn=5)
    events(conn, encode_pdu(opening))
    events(conn, response(itts[0], statsn=9, expcmdsn=2, maxcmdsn=6))
    assert wire(conn) == [], "a SCSI Command was sent after the Logout Request"


# -- chunking ------------------------------------------------------------------------------------


def _scenario() -> tuple[InitiatorConnection, bytes]:
    """A connection with three reads and a TEST UNIT READY out, and the target's whole answer:
    Data-In with status, a CHECK CONDITION, an underflow, a ping, and a window that lets the
    fourth command go."""
    conn = logged_in(window=3)
    a = conn.submit(INQUIRY.cdb, lun=LUN1, transfer_length=100)
    b = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    c = conn.submit(RC16.cdb, lun=LUN1, transfer_length=32)
    d = conn.submit(TUR.cdb, lun=LUN1, transfer_length=0)
    commands(conn)
    sense = encode_fixed_sense(SenseKey.NOT_READY, 0x04, 0x0B)
    stream = b"".join(
        [
            data_in(a, 0, 0, bytes(range(40))),
            data_in(c, 0, 0, b"\x01" * 13),
            encode_pdu(NopIn(itt=RESERVED_TAG, ttt=5, statsn=9, expcmdsn=1, maxcmdsn=3, data=b"x")),
            data_in(a, 1, 40, bytes(range(60)), status=ScsiStatus.GOOD, statsn=9, maxcmdsn=4),
            response(
                b, statsn=10, expcmdsn=3, maxcmdsn=4, status=ScsiStatus.CHECK_CONDITION, sense=sense
            ),
            response(c, statsn=11, expcmdsn=4, maxcmdsn=6, underflow=True, residual=19),
            response(d, statsn=12, expcmdsn=5, maxcmdsn=6),
        ]
    )
    return conn, stream


def _run_in_chunks(cuts: list[int]) -> tuple[list[Event], bytes]:
    conn, stream = _scenario()
    got: list[Event] = []
    out = b""
    points = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(points):
        conn.receive_data(stream[start:end])
        got += events(conn)
        out += conn.data_to_send()
    return got, out


def test_the_scenario_gives_the_expected_events() -> None:
    got, out = _run_in_chunks([])
    echo, fourth = (decode_pdu(out[: 48 + 4]), decode_pdu(out[52:]))
    assert isinstance(echo, NopOut) and echo.ttt == 5
    assert isinstance(fourth, ScsiCommand) and fourth.cmdsn == 4
    assert [type(e) for e in got] == [ScsiCompleted] * 4
    completed = [e for e in got if isinstance(e, ScsiCompleted)]
    assert completed[0].data == bytes(range(40)) + bytes(range(60))
    assert completed[1].status is ScsiStatus.CHECK_CONDITION
    assert parse_sense(completed[1].sense).ascq == 0x0B
    assert completed[2].underflow and completed[2].residual == 19
    assert completed[2].data == b"\x01" * 13
    assert completed[3].status is ScsiStatus.GOOD


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=40))
def test_any_chunking_of_the_target_stream_gives_the_same_events(cuts: list[int]) -> None:
    assert _run_in_chunks(cuts) == _run_in_chunks([])


def test_byte_by_byte_gives_the_same_events() -> None:
    _, stream = _scenario()
    assert _run_in_chunks(list(range(len(stream)))) == _run_in_chunks([])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(min_value=1, max_value=6),
    order=st.permutations(range(6)),
    grants=st.lists(st.integers(min_value=0, max_value=3), min_size=6, max_size=6),
    base=st.sampled_from([1, 0xFFFFFFFC, 0x7FFFFFFE]),
)
def test_commands_never_pass_maxcmdsn_and_all_complete(
    window: int, order: list[int], grants: list[int], base: int
) -> None:
    """Six commands, answered in any order, each answer widening the window by 0..3: every
    command goes out once, in CmdSN order, never past the MaxCmdSN granted so far."""
    conn = logged_in(initial_cmdsn=base, window=window)
    granted = (base + window - 1) & MASK
    itts = [conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(6)]
    sent = commands(conn)
    answered: list[int] = []
    statsn = 9
    while len(answered) < 6:
        in_flight = [c for c in sent if c.itt not in answered]
        # Answer the in-flight command that comes first in the drawn order.
        pick = min(in_flight, key=lambda c: order.index(itts.index(c.itt)))
        granted = (granted + grants[len(answered)]) & MASK
        following = (base + len(sent)) & MASK
        if len(in_flight) == 1 and 0 < (following - granted) & MASK < 0x80000000:
            granted = following  # the last answer in flight must let the next command go
        got = events(conn, response(pick.itt, statsn=statsn, expcmdsn=granted, maxcmdsn=granted))
        assert got == [ScsiCompleted(itt=pick.itt, status=ScsiStatus.GOOD)]
        statsn += 1
        answered.append(pick.itt)
        for command in commands(conn):
            assert (granted - command.cmdsn) & MASK < 0x80000000, "sent past MaxCmdSN"
            assert command.expstatsn == statsn
            sent.append(command)
    assert [c.itt for c in sent] == itts
    assert [c.cmdsn for c in sent] == [(base + i) & MASK for i in range(6)]
    assert conn.outstanding == 0


@pytest.mark.parametrize(
    ("event", "reported"),
    [
        (AsyncEvent.REQUEST_LOGOUT, True),
        (AsyncEvent.DROP_CONNECTION, True),
        (AsyncEvent.DROP_ALL_CONNECTIONS, True),
        (AsyncEvent.REQUEST_NEGOTIATION, True),
        (AsyncEvent.SCSI_EVENT, False),
        (AsyncEvent.VENDOR_SPECIFIC, False),
    ],
)
def test_an_async_message_is_reported_when_it_asks_us_to_end(
    event: AsyncEvent, reported: bool
) -> None:
    """An Async Message takes a StatSN (unlike an unsolicited NOP-In) and may open the window;
    a logout request, a drop or a renegotiation is reported so that the check ends and we log
    out; a SCSI or vendor event is only noted."""
    conn = logged_in(window=1)
    first, second = (conn.submit(TUR.cdb, lun=LUN1, transfer_length=0) for _ in range(2))
    assert [c.itt for c in commands(conn)] == [first]
    sense = sense_data_segment(encode_fixed_sense(SenseKey.UNIT_ATTENTION, 0x3F, 0x0E))
    message = AsyncMessage(
        async_event=event,
        statsn=LOGIN_STATSN + 1,
        expcmdsn=1,
        maxcmdsn=2,
        parameter3=5 if event is AsyncEvent.REQUEST_LOGOUT else 0,
        data=sense if event is AsyncEvent.SCSI_EVENT else b"",
    )
    got = events(conn, encode_pdu(message))
    if reported:
        assert got == [TargetRequest(event=event, respond_within=message.respond_within)]
        if event is AsyncEvent.REQUEST_LOGOUT:
            assert isinstance(got[0], TargetRequest)
            assert got[0].respond_within == 5
    else:
        assert got == []
        # The window it opened is used at once.
        assert [c.itt for c in commands(conn)] == [second]
    conn.logout()
    (bye,) = wire(conn)
    assert isinstance(bye, LogoutRequest)
    assert bye.expstatsn == LOGIN_STATSN + 2  # the Async Message's StatSN was counted


def test_an_async_message_while_logging_out_is_not_reported() -> None:
    conn = logged_in(window=2)
    conn.logout()
    wire(conn)
    message = AsyncMessage(
        async_event=AsyncEvent.REQUEST_LOGOUT, statsn=LOGIN_STATSN + 1, expcmdsn=1, maxcmdsn=2
    )
    assert events(conn, encode_pdu(message)) == []
