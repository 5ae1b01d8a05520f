"""The sans-IO initiator, driven PDU by PDU by a scripted target (no sockets, no clock)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import pdus

from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import (
    AuthenticationError,
    ConnectionLost,
    ISCSIError,
    LocalProtocolError,
    ProtocolError,
)
from pyiscsi_failover.initiator import (
    NEED_DATA,
    InitiatorConnection,
    LoggedOut,
    LoginConfig,
    LoginRedirected,
    LoginRejected,
    LoginSucceeded,
    State,
    TargetsDiscovered,
    probe_isid,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import ChapAuthenticator
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    LogoutRequest,
    LogoutResponse,
    LogoutResponseCode,
    NopIn,
    NopOut,
    Stage,
    StatusClass,
    TextRequest,
    TextResponse,
)
from pyiscsi_failover.protocol.text import decode_keys, decode_text, encode_text
from pyiscsi_failover.protocol.wire import encode_pdu

INITIATOR = "iqn.2026-11.test.pyiscsi:initiator"
TARGET = "iqn.2026-11.test.pyiscsi:target"
ISID_FIXED = ISID(t=2, a=0, b=0x1234, c=0x56, d=0x789A)
SEC = Stage.SECURITY_NEGOTIATION
OP = Stage.LOGIN_OPERATIONAL_NEGOTIATION
FFP = Stage.FULL_FEATURE_PHASE


def config(**kw: object) -> LoginConfig:
    base: dict[str, object] = {
        "initiator_name": INITIATOR,
        "target_name": TARGET,
        "isid": ISID_FIXED,
    }
    base.update(kw)
    return LoginConfig(**base)  # type: ignore[arg-type]


def sent(conn: InitiatorConnection) -> list[PDU]:
    """Decode everything the initiator wants to send."""
    buffer = PDUBuffer(max_data_segment_length=1 << 20)
    buffer.feed(conn.data_to_send())
    out = []
    while (pdu := buffer.next_pdu()) is not None:
        out.append(pdu)
    return out


def only(conn: InitiatorConnection) -> PDU:
    pdus_out = sent(conn)
    assert len(pdus_out) == 1, pdus_out
    return pdus_out[0]


def response(
    request: LoginRequest,
    keys: Sequence[tuple[str, str]] = (),
    *,
    transit: bool | None = None,
    nsg: Stage | None = None,
    statsn: int = 7,
    tsih: int = 0,
    status: LoginStatus = LoginStatus.SUCCESS,
    cont: bool = False,
    data: bytes | None = None,
) -> bytes:
    transit = request.transit if transit is None else transit
    return encode_pdu(
        LoginResponse(
            transit=transit,
            cont=cont,
            csg=request.csg,
            nsg=(nsg if nsg is not None else request.nsg) if transit else SEC,
            isid=request.isid,
            tsih=tsih,
            itt=request.itt,
            statsn=statsn,
            expcmdsn=request.cmdsn,
            maxcmdsn=request.cmdsn + 1,
            status_class=StatusClass(status >> 8),
            status_detail=status & 0xFF,
            data=encode_text(keys) if data is None else data,
        )
    )


def state_of(conn: InitiatorConnection) -> State:
    """Read the state afresh (keeps mypy from narrowing across calls that change it)."""
    return conn.state


def agree(request: LoginRequest) -> list[tuple[str, str]]:
    """A compliant target's answers: accept each offered value (first of a list)."""
    return [(k, v.split(",")[0]) for k, v in decode_text(request.data)]


def step(conn: InitiatorConnection, data: bytes) -> object:
    conn.receive_data(data)
    return conn.next_event()


def login_plain(conn: InitiatorConnection) -> LoginSucceeded:
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    assert (
        step(conn, response(first, [("AuthMethod", "None"), ("TargetPortalGroupTag", "1")]))
        is NEED_DATA
    )
    second = only(conn)
    assert isinstance(second, LoginRequest)
    event = step(conn, response(second, agree(second), tsih=9, statsn=8))
    assert isinstance(event, LoginSucceeded)
    return event


def test_plain_login_follows_the_rfc() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    assert (first.transit, first.cont, first.csg, first.nsg) == (True, False, SEC, OP)
    assert first.isid == ISID_FIXED and first.tsih == 0
    keys = decode_keys(first.data)
    assert keys == {
        "InitiatorName": INITIATOR,
        "SessionType": "Normal",
        "TargetName": TARGET,
        "AuthMethod": "None",
    }
    assert (
        step(conn, response(first, [("AuthMethod", "None"), ("TargetPortalGroupTag", "3")]))
        is NEED_DATA
    )
    assert conn.state is State.OPERATIONAL_NEGOTIATION
    second = only(conn)
    assert isinstance(second, LoginRequest)
    assert (second.transit, second.csg, second.nsg) == (True, OP, FFP)
    # Login PDUs keep the ITT and CmdSN; ExpStatSN follows the target's StatSN.
    assert second.itt == first.itt and second.cmdsn == first.cmdsn
    assert second.expstatsn == 8
    assert "MaxRecvDataSegmentLength" in decode_keys(second.data)
    answers = [kv for kv in agree(second) if kv[0] != "MaxRecvDataSegmentLength"]
    answers.append(("MaxRecvDataSegmentLength", "65536"))
    event = step(conn, response(second, answers, tsih=9, statsn=8))
    assert isinstance(event, LoginSucceeded)
    assert event.tsih == 9 and event.target_portal_group_tag == 3 and event.auth_method == "None"
    assert event.parameters.target_max_recv_data_segment_length == 65536
    assert state_of(conn) is State.FULL_FEATURE


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    for byte in response(first, [("AuthMethod", "None")]):
        conn.receive_data(bytes([byte]))
    assert conn.next_event() is NEED_DATA
    second = only(conn)
    assert isinstance(second, LoginRequest)
    data = response(second, agree(second), tsih=1)
    for byte in data[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(data[-1:])
    assert isinstance(conn.next_event(), LoginSucceeded)


def test_discovery_session_and_tgt_style_continuation() -> None:
    conn = InitiatorConnection(config(target_name=None))
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    keys = decode_keys(first.data)
    assert keys["SessionType"] == "Discovery" and "TargetName" not in keys
    step(conn, response(first, [("AuthMethod", "None")]))
    second = only(conn)
    assert isinstance(second, LoginRequest)
    assert isinstance(step(conn, response(second, agree(second), tsih=1, statsn=3)), LoginSucceeded)
    conn.send_targets("All")
    ask = only(conn)
    assert isinstance(ask, TextRequest)
    assert decode_text(ask.data) == [("SendTargets", "All")]
    assert ask.ttt == RESERVED_TAG and ask.final and ask.cmdsn == first.cmdsn
    part1 = encode_text(
        [("TargetName", "iqn.2026-11.test:a"), ("TargetAddress", "10.0.0.1:3260,1")]
    )
    # tgt's style: F=0 with a TTT, no C bit, whole pairs in each PDU.
    reply = TextResponse(
        final=False, cont=False, itt=ask.itt, ttt=0x55, statsn=4, expcmdsn=2, maxcmdsn=3, data=part1
    )
    assert step(conn, encode_pdu(reply)) is NEED_DATA
    more = only(conn)
    assert isinstance(more, TextRequest)
    assert more.ttt == 0x55 and more.itt == ask.itt and more.data == b""
    assert more.cmdsn == ask.cmdsn + 1 and more.expstatsn == 5
    part2 = encode_text(
        [("TargetAddress", "[fd00::1]:3261,2"), ("TargetName", "iqn.2026-11.test:b")]
    )
    last = TextResponse(
        final=True,
        cont=False,
        itt=ask.itt,
        ttt=RESERVED_TAG,
        statsn=5,
        expcmdsn=3,
        maxcmdsn=4,
        data=part2,
    )
    event = step(conn, encode_pdu(last))
    assert isinstance(event, TargetsDiscovered)
    assert [t.iqn for t in event.targets] == ["iqn.2026-11.test:a", "iqn.2026-11.test:b"]
    assert event.targets[0].portals == (
        Portal(host="10.0.0.1", port=3260, tpgt=1),
        Portal(host="fd00::1", port=3261, tpgt=2),
    )
    conn.logout()
    bye = only(conn)
    assert isinstance(bye, LogoutRequest)
    assert bye.reason == 0 and bye.cmdsn == more.cmdsn + 1 and bye.expstatsn == 6
    done = LogoutResponse(
        response=LogoutResponseCode.CLOSED, itt=bye.itt, statsn=6, expcmdsn=5, maxcmdsn=6
    )
    assert step(conn, encode_pdu(done)) == LoggedOut(response=LogoutResponseCode.CLOSED)
    assert conn.state is State.DONE


def test_text_split_mid_pair_with_c_bit_reassembles() -> None:
    conn = InitiatorConnection(config(target_name=None))
    login_plain(conn)
    conn.send_targets("All")
    ask = only(conn)
    assert isinstance(ask, TextRequest)
    whole = encode_text(
        [("TargetName", "iqn.2026-11.test:split"), ("TargetAddress", "127.0.0.9:3260,1")]
    )
    cut = len(whole) // 2
    first = TextResponse(
        final=False,
        cont=True,
        itt=ask.itt,
        ttt=9,
        statsn=9,
        expcmdsn=2,
        maxcmdsn=3,
        data=whole[:cut],
    )
    assert step(conn, encode_pdu(first)) is NEED_DATA
    only(conn)
    second = TextResponse(
        final=True,
        cont=False,
        itt=ask.itt,
        ttt=RESERVED_TAG,
        statsn=10,
        expcmdsn=3,
        maxcmdsn=4,
        data=whole[cut:],
    )
    event = step(conn, encode_pdu(second))
    assert isinstance(event, TargetsDiscovered)
    assert event.targets[0].iqn == "iqn.2026-11.test:split"


@pytest.mark.parametrize("permanent", [False, True])
def test_redirect_is_an_event_with_the_address(permanent: bool) -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    status = (
        LoginStatus.TARGET_MOVED_PERMANENTLY if permanent else LoginStatus.TARGET_MOVED_TEMPORARILY
    )
    event = step(
        conn, response(first, [("TargetAddress", "127.0.0.5:3261,1")], status=status, transit=True)
    )
    assert event == LoginRedirected(
        address=Portal(host="127.0.0.5", port=3261, tpgt=1), permanent=permanent
    )


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (LoginStatus.AUTHENTICATION_FAILURE, False),
        (LoginStatus.AUTHORIZATION_FAILURE, False),
        (LoginStatus.TARGET_NOT_FOUND, False),
        (LoginStatus.TOO_MANY_CONNECTIONS, True),
        (LoginStatus.SERVICE_UNAVAILABLE, True),
        (LoginStatus.OUT_OF_RESOURCES, True),
    ],
)
def test_refusals_say_whether_retry_helps(status: LoginStatus, retryable: bool) -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    event = step(conn, response(first, status=status, transit=False))
    assert isinstance(event, LoginRejected)
    assert event.status is status and event.retryable is retryable


def test_unknown_status_detail_is_still_typed() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    event = step(conn, response(first, status=0x03F0, transit=False))  # type: ignore[arg-type]
    assert isinstance(event, LoginRejected)
    assert event.status is None and event.retryable and "0x03f0" in event.describe()


def test_redirect_without_address_is_a_protocol_error() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    with pytest.raises(ProtocolError, match="TargetAddress"):
        step(conn, response(first, status=LoginStatus.TARGET_MOVED_TEMPORARILY))


def test_target_continued_login_response_is_requested_and_joined() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    whole = encode_text([("AuthMethod", "None"), ("TargetAlias", "x" * 100)])
    assert step(conn, response(first, data=whole[:20], cont=True, transit=False)) is NEED_DATA
    ask = only(conn)
    assert isinstance(ask, LoginRequest)
    assert (ask.transit, ask.cont, ask.data) == (False, False, b"")
    assert step(conn, response(first, data=whole[20:])) is NEED_DATA
    assert conn.state is State.OPERATIONAL_NEGOTIATION


def test_long_request_is_sent_with_c_bit_and_waits_for_acknowledgement() -> None:
    conn = InitiatorConnection(config(initiator_alias="a" * 200))
    # Force a split by making the first request exceed one login segment.
    conn._queue_login([(f"X-key{i}", "v" * 200) for i in range(60)], transit=True, csg=SEC, nsg=OP)
    first = only(conn)
    assert isinstance(first, LoginRequest)
    assert first.cont and not first.transit and len(first.data) == 8192
    conn.state = State.SECURITY_NEGOTIATION
    ack = response(first, transit=False)
    assert step(conn, ack) is NEED_DATA
    second = only(conn)
    assert isinstance(second, LoginRequest)
    assert not second.cont and second.transit and second.nsg is OP


def test_chap_one_way_and_mutual_against_the_authenticator() -> None:
    ours = ChapCredentials("alice", Secret(b"alice-secret-123"))
    theirs = ChapCredentials("target", Secret(b"target-secret-99"))
    conn = InitiatorConnection(config(chap=ours, target_chap=theirs))
    auth = ChapAuthenticator({"alice": ours.secret}, mutual=theirs)
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    assert decode_keys(first.data)["AuthMethod"] == "CHAP" and not first.transit
    step(conn, response(first, [("AuthMethod", "CHAP")]))
    offer = only(conn)
    assert isinstance(offer, LoginRequest)
    offered = decode_keys(offer.data)
    assert offered["CHAP_A"].split(",")[0] == "5"
    step(conn, response(offer, auth.select_algorithm(offered["CHAP_A"])))
    answer = only(conn)
    assert isinstance(answer, LoginRequest)
    assert answer.transit and answer.nsg is OP
    mutual = auth.check_response(decode_keys(answer.data))
    assert step(conn, response(answer, mutual, transit=True, nsg=OP)) is NEED_DATA
    final = only(conn)
    assert isinstance(final, LoginRequest)
    event = step(conn, response(final, agree(final), tsih=4))
    assert isinstance(event, LoginSucceeded) and event.auth_method == "CHAP"


def test_chap_downgrade_to_none_is_refused() -> None:
    ours = ChapCredentials("alice", Secret(b"alice-secret-123"))
    conn = InitiatorConnection(config(chap=ours))
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    with pytest.raises(AuthenticationError):
        step(conn, response(first, [("AuthMethod", "None")], transit=True, nsg=OP))
    assert conn.state is State.FAILED


def test_nop_in_ping_is_echoed() -> None:
    conn = InitiatorConnection(config())
    login_plain(conn)
    ping = NopIn(itt=RESERVED_TAG, ttt=0x42, statsn=9, expcmdsn=1, maxcmdsn=2, data=b"ping")
    assert step(conn, encode_pdu(ping)) is NEED_DATA
    echo = only(conn)
    assert isinstance(echo, NopOut)
    assert (echo.itt, echo.ttt, echo.data) == (RESERVED_TAG, 0x42, b"ping")


def test_eof_mid_login_is_connection_lost() -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    with pytest.raises(ConnectionLost, match="security negotiation"):
        conn.receive_data(b"")
    assert conn.state is State.FAILED


@pytest.mark.parametrize(
    "bad",
    [
        lambda req: encode_pdu(
            TextResponse(
                final=True,
                cont=False,
                itt=req.itt,
                ttt=RESERVED_TAG,
                statsn=1,
                expcmdsn=1,
                maxcmdsn=1,
            )
        ),
        lambda req: response(req, [("AuthMethod", "None")]).replace(
            req.itt.to_bytes(4, "big"), (req.itt + 1).to_bytes(4, "big"), 1
        ),
        lambda req: response(req, [("AuthMethod", "CHAP")]),
        lambda req: (
            response(req, [("AuthMethod", "None")], nsg=FFP, transit=True)[:-4] + b"\0\0\0\0"
        ),
    ],
    ids=["text-during-login", "wrong-itt", "chap-not-offered", "zero-tsih-final"],
)
def test_protocol_violations_during_login(bad: object) -> None:
    conn = InitiatorConnection(config())
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    with pytest.raises(ProtocolError):
        step(conn, bad(first))  # type: ignore[operator]


def test_local_misuse_raises_local_errors() -> None:
    conn = InitiatorConnection(config())
    with pytest.raises(LocalProtocolError):
        conn.send_targets()
    with pytest.raises(LocalProtocolError):
        conn.logout()
    login_plain(conn)
    with pytest.raises(LocalProtocolError, match="Discovery"):
        conn.send_targets("All")
    with pytest.raises(LocalProtocolError):
        LoginConfig(initiator_name=INITIATOR, target_chap=ChapCredentials("t", Secret(b"x" * 12)))


def test_probe_isid_is_random_format_and_never_open_iscsi_oui() -> None:
    seen = {probe_isid() for _ in range(50)}
    assert all(isid.t == 0b10 for isid in seen)
    assert len(seen) > 40
    fixed = probe_isid(lambda n: bytes(range(1, n + 1)))
    assert fixed.to_bytes()[0] >> 6 == 0b10 and fixed.to_bytes()[1:3] != b"\x02\x3d"


def test_repr_shows_no_secret() -> None:
    conn = InitiatorConnection(
        config(chap=ChapCredentials("alice", Secret(b"VERY-RECOGNISABLE-42")))
    )
    assert "VERY-RECOGNISABLE-42" not in repr(conn)
    assert "VERY-RECOGNISABLE-42" not in repr(conn.config)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    stage=st.sampled_from(["login", "operational", "full", "text", "logout"]),
    junk=st.lists(pdus(), min_size=1, max_size=3),
)
def test_any_pdu_in_any_state_is_an_event_or_our_error(stage: str, junk: list[PDU]) -> None:
    conn = InitiatorConnection(config(target_name=None))
    conn.start_login()
    first = only(conn)
    assert isinstance(first, LoginRequest)
    if stage != "login":
        step(conn, response(first, [("AuthMethod", "None")]))
        second = only(conn)
        assert isinstance(second, LoginRequest)
        if stage != "operational":
            step(conn, response(second, agree(second), tsih=1))
            if stage == "text":
                conn.send_targets("All")
            elif stage == "logout":
                conn.logout()
            conn.data_to_send()
    try:
        for pdu in junk:
            conn.receive_data(encode_pdu(pdu))
            while conn.next_event() is not NEED_DATA:
                pass
    except ISCSIError:
        assert conn.state is State.FAILED or conn.state is State.DONE
