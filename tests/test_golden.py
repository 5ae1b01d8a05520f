"""Golden vectors: PDUs captured from tgt and libiscsi decode as tshark read them, byte for byte.

The SCSI PDUs (SCSI Command, SCSI Response, SCSI Data-In) come from the ``scsi`` scenario:
libiscsi's iscsi-inq, iscsi-readcapacity16 and iscsi-ls -s against tgtd.

The vectors in ``tests/vectors/*.json`` were captured on loopback by ``tests/vectors/capture.py``
(provenance in ``tests/vectors/README.md``). Each stored PDU carries the raw bytes and tshark's
own decoding of it. Here every PDU must

* decode, with every field tshark reported equal to ours (a field tshark shows that this file
  neither checks nor lists as ignored fails the test, so a re-capture cannot hide a new field);
* re-encode to exactly the captured bytes. That holds for every vector: tgt and libiscsi zero
  all reserved bits and bytes and pad with zeros, which is what our encoder writes, so no byte
  that RFC 7143 lets differ (reserved fields, padding) actually differs here.

Scenario tests pin what the real target does at the points the failover logic depends on.

The write and task management PDUs (SCSI Data-Out, R2T, Task Management Function Request and
Response) are in ``task_pdus.json``: built by hand from the RFC 7143 layouts by
``tests/vectors/task_pdus.py``, not captured, each with the model fields it must decode to and
tshark's reading of it; the same checks apply, and every function and response code is there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pyiscsi_failover.errors import TextError
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    R2T,
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
    ScsiCommand,
    ScsiDataIn,
    ScsiDataOut,
    ScsiResponse,
    ScsiResponseCode,
    ScsiStatus,
    Stage,
    TaskAttribute,
    TaskFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TaskResponseCode,
    TextRequest,
    TextResponse,
)
from pyiscsi_failover.protocol.text import TextReassembler, decode_text
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu

VECTORS = Path(__file__).parent / "vectors"
SCENARIOS = ("discovery", "chap_login", "auth_failure", "redirect", "tgt_probes", "scsi")

OPCODE_OF: dict[type[Any], Opcode] = {
    LoginRequest: Opcode.LOGIN_REQUEST,
    LoginResponse: Opcode.LOGIN_RESPONSE,
    TextRequest: Opcode.TEXT_REQUEST,
    TextResponse: Opcode.TEXT_RESPONSE,
    LogoutRequest: Opcode.LOGOUT_REQUEST,
    LogoutResponse: Opcode.LOGOUT_RESPONSE,
    Reject: Opcode.REJECT,
    NopOut: Opcode.NOP_OUT,
    NopIn: Opcode.NOP_IN,
    ScsiCommand: Opcode.SCSI_COMMAND,
    ScsiResponse: Opcode.SCSI_RESPONSE,
    ScsiDataIn: Opcode.SCSI_DATA_IN,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Vector:
    scenario: str
    session: int
    sender: str
    frame: int
    raw: bytes
    tshark: dict[str, Any] | None

    @property
    def id(self) -> str:
        return f"{self.scenario}-s{self.session}-f{self.frame}-{self.sender}"


def _document(scenario: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((VECTORS / f"{scenario}.json").read_text())
    return loaded


def _vectors(scenario: str) -> list[Vector]:
    return [
        Vector(
            scenario=scenario,
            session=record["session"],
            sender=record["sender"],
            frame=record["frame"],
            raw=bytes.fromhex(record["hex"]),
            tshark=record["tshark"],
        )
        for record in _document(scenario)["pdus"]
    ]


ALL = [vector for scenario in SCENARIOS for vector in _vectors(scenario)]
DISSECTED = [vector for vector in ALL if vector.tshark is not None]


def _fragments() -> set[str]:
    """Ids of Text Responses that carry part of a text tgt split over several PDUs.

    tgt continues a long answer with F=0 and cuts it anywhere, mid-pair, without setting C
    (see test_tgt_continues_sendtargets_with_f0_and_a_ttt_but_never_c), so these segments
    only parse once joined; tshark splits each at NULs (and gives up at the first piece
    without "=").
    """
    fragments: set[str] = set()
    continuing: dict[tuple[str, int], bool] = {}
    for vector in ALL:
        pdu = decode_pdu(vector.raw)
        if isinstance(pdu, TextResponse):
            key = (vector.scenario, vector.session)
            if not pdu.final or continuing.get(key, False):
                fragments.add(vector.id)
            continuing[key] = not pdu.final
    return fragments


FRAGMENTS = _fragments()


def _decoded(vectors: list[Vector]) -> list[tuple[Vector, PDU]]:
    return [(vector, decode_pdu(vector.raw)) for vector in vectors]


# --------------------------------------------------------------------------------------------
# every vector


def test_vectors_are_present_with_provenance() -> None:
    assert (VECTORS / "README.md").is_file()
    for scenario in SCENARIOS:
        document = _document(scenario)
        assert document["versions"]["tgt"], scenario
        assert document["versions"]["libiscsi-bin"], scenario
        assert document["commands"], scenario
        assert document["pdus"], scenario
    # Both directions and every PDU type the login path meets are covered.
    kinds = {type(decode_pdu(vector.raw)) for vector in ALL}
    assert {LoginRequest, LoginResponse, TextRequest, TextResponse} <= kinds
    assert {LogoutRequest, LogoutResponse} <= kinds
    assert {ScsiCommand, ScsiResponse, ScsiDataIn} <= kinds


@pytest.mark.parametrize("vector", ALL, ids=lambda vector: vector.id)
def test_reencodes_byte_for_byte(vector: Vector) -> None:
    assert encode_pdu(decode_pdu(vector.raw)) == vector.raw


def _number(text: str) -> int:
    return int(text, 16) if text.startswith("0x") else int(text)


def _flag(text: str) -> bool:
    assert text in ("0", "1"), text
    return text == "1"


def _lun(pdu: PDU) -> int:
    # tshark shows a single-level LUN's 14-bit number from the first two bytes of the field.
    # The SCSI PDUs keep the LUN as its 8 raw bytes, the others as an integer.
    lun: int | bytes = getattr(pdu, "lun", 0)
    if isinstance(lun, bytes):
        lun = int.from_bytes(lun, "big")
    return (lun >> 48) & 0x3FFF


def _isid(pdu: PDU) -> ISID:
    assert isinstance(pdu, (LoginRequest, LoginResponse))
    return pdu.isid


_T = TypeVar("_T")


def _only(pdu: PDU, model: type[_T]) -> _T:
    """``pdu`` as ``model``: a field tshark shows only for that PDU type."""
    assert isinstance(pdu, model), type(pdu).__name__
    return pdu


# tshark field -> what our model says it should be, read from (pdu, raw bytes).
CHECKS: dict[str, tuple[Callable[[str], object], Callable[[PDU, bytes], object]]] = {
    "iscsi.opcode": (_number, lambda pdu, raw: OPCODE_OF[type(pdu)]),
    "iscsi.I": (_flag, lambda pdu, raw: getattr(pdu, "immediate", None)),
    "iscsi.login.T": (_flag, lambda pdu, raw: getattr(pdu, "transit", None)),
    "iscsi.login.C": (_flag, lambda pdu, raw: getattr(pdu, "cont", None)),
    "iscsi.login.csg": (_number, lambda pdu, raw: getattr(pdu, "csg", None)),
    "iscsi.login.nsg": (_number, lambda pdu, raw: getattr(pdu, "nsg", None)),
    "iscsi.login.status": (
        _number,
        lambda pdu, raw: getattr(pdu, "status_class", -1) << 8 | getattr(pdu, "status_detail", 0),
    ),
    "iscsi.text.F": (_flag, lambda pdu, raw: getattr(pdu, "final", None)),
    "iscsi.text.C": (_flag, lambda pdu, raw: getattr(pdu, "cont", None)),
    "iscsi.versionmax": (_number, lambda pdu, raw: getattr(pdu, "version_max", None)),
    "iscsi.versionmin": (_number, lambda pdu, raw: getattr(pdu, "version_min", None)),
    "iscsi.versionactive": (_number, lambda pdu, raw: getattr(pdu, "version_active", None)),
    "iscsi.totalahslength": (_number, lambda pdu, raw: 0),  # none of these PDUs has an AHS
    "iscsi.datasegmentlength": (_number, lambda pdu, raw: len(getattr(pdu, "data", b""))),
    "iscsi.isid": (
        lambda text: bytes.fromhex(text.replace(":", "")),
        lambda pdu, raw: _isid(pdu).to_bytes(),
    ),
    "iscsi.isid.t": (_number, lambda pdu, raw: _isid(pdu).t),
    "iscsi.isid.a": (_number, lambda pdu, raw: _isid(pdu).a),
    "iscsi.isid.b": (_number, lambda pdu, raw: _isid(pdu).b),
    "iscsi.isid.c": (_number, lambda pdu, raw: _isid(pdu).c),
    "iscsi.isid.d": (_number, lambda pdu, raw: _isid(pdu).d),
    "iscsi.tsih": (_number, lambda pdu, raw: getattr(pdu, "tsih", None)),
    "iscsi.cid": (_number, lambda pdu, raw: getattr(pdu, "cid", None)),
    "iscsi.initiatortasktag": (_number, lambda pdu, raw: getattr(pdu, "itt", None)),
    "iscsi.targettransfertag": (_number, lambda pdu, raw: getattr(pdu, "ttt", None)),
    "iscsi.cmdsn": (_number, lambda pdu, raw: getattr(pdu, "cmdsn", None)),
    "iscsi.expstatsn": (_number, lambda pdu, raw: getattr(pdu, "expstatsn", None)),
    "iscsi.statsn": (_number, lambda pdu, raw: getattr(pdu, "statsn", None)),
    "iscsi.expcmdsn": (_number, lambda pdu, raw: getattr(pdu, "expcmdsn", None)),
    "iscsi.maxcmdsn": (_number, lambda pdu, raw: getattr(pdu, "maxcmdsn", None)),
    "iscsi.logout.reason": (_number, lambda pdu, raw: getattr(pdu, "reason", None)),
    "iscsi.logout.response": (_number, lambda pdu, raw: getattr(pdu, "response", None)),
    "iscsi.time2wait": (_number, lambda pdu, raw: getattr(pdu, "time2wait", None)),
    "iscsi.time2retain": (_number, lambda pdu, raw: getattr(pdu, "time2retain", None)),
    "iscsi.flags": (_number, lambda pdu, raw: raw[1]),
    "iscsi.scsicommand.expecteddatatransferlength": (
        _number,
        lambda pdu, raw: getattr(pdu, "edtl", None),
    ),
    # tshark reads a Data-In's status under the SCSI Response's field name.
    "iscsi.scsiresponse.status": (_number, lambda pdu, raw: getattr(pdu, "status", None)),
    "iscsi.scsiresponse.response": (_number, lambda pdu, raw: getattr(pdu, "response", None)),
    "iscsi.scsiresponse.residualcount": (
        _number,
        lambda pdu, raw: _only(pdu, ScsiResponse).residual,
    ),
    "iscsi.scsiresponse.bidireadresidualcount": (
        _number,
        lambda pdu, raw: _only(pdu, ScsiResponse).bidi_residual,
    ),
    "iscsi.scsiresponse.senselength": (
        _number,
        lambda pdu, raw: len(_only(pdu, ScsiResponse).sense),
    ),
    "iscsi.expdatasn": (_number, lambda pdu, raw: _only(pdu, ScsiResponse).expdatasn),
    "iscsi.scsidata.F": (_flag, lambda pdu, raw: _only(pdu, ScsiDataIn).final),
    "iscsi.scsidata.A": (_flag, lambda pdu, raw: _only(pdu, ScsiDataIn).acknowledge),
    "iscsi.scsidata.O": (_flag, lambda pdu, raw: _only(pdu, ScsiDataIn).overflow),
    "iscsi.scsidata.U": (_flag, lambda pdu, raw: _only(pdu, ScsiDataIn).underflow),
    "iscsi.scsidata.S": (_flag, lambda pdu, raw: _only(pdu, ScsiDataIn).status is not None),
    "iscsi.scsidata.readresidualcount": (
        _number,
        lambda pdu, raw: _only(pdu, ScsiDataIn).residual,
    ),
    "iscsi.datasn": (_number, lambda pdu, raw: _only(pdu, ScsiDataIn).datasn),
    "iscsi.bufferOffset": (_number, lambda pdu, raw: _only(pdu, ScsiDataIn).buffer_offset),
    "scsi.lun": (_number, lambda pdu, raw: _lun(pdu)),
    "iscsi.keyvalue": (
        list,
        lambda pdu, raw: [f"{k}={v}" for k, v in decode_text(getattr(pdu, "data", b""))],
    ),
    "iscsi.padding": (
        lambda text: bytes.fromhex(text.replace(":", "")),
        lambda pdu, raw: bytes(-len(getattr(pdu, "data", b"")) % 4),
    ),
}
# Fields tshark adds that are about the capture, not the PDU, or restate a checked field.
IGNORED = frozenset(
    {
        "iscsi.request_frame",  # frame numbers linking requests and responses
        "iscsi.response_frame",
        "scsi.lun.address_mode",  # part of the LUN checked as scsi.lun
    }
)


@pytest.mark.parametrize("vector", DISSECTED, ids=lambda vector: vector.id)
def test_fields_match_tshark(vector: Vector) -> None:
    assert vector.tshark is not None
    pdu = decode_pdu(vector.raw)
    unknown = set(vector.tshark) - set(CHECKS) - IGNORED
    assert not unknown, f"tshark reported fields this test does not check: {sorted(unknown)}"
    for name, value in vector.tshark.items():
        if name in IGNORED:
            continue
        if name == "iscsi.keyvalue" and vector.id in FRAGMENTS:
            data = getattr(pdu, "data", b"")
            pieces = [piece.decode() for piece in data.split(b"\0") if piece]
            # tshark stops listing at the first piece without "=" (a cut pair), so its list is
            # a prefix of the NUL-separated pieces.
            assert pieces[: len(value)] == value
            with pytest.raises(TextError):
                decode_text(data)
            continue
        parse, ours = CHECKS[name]
        assert ours(pdu, vector.raw) == parse(value), name


# --------------------------------------------------------------------------------------------
# what tgt and libiscsi did, read through our decoder


def _login_responses(scenario: str) -> list[LoginResponse]:
    return [pdu for _, pdu in _decoded(_vectors(scenario)) if isinstance(pdu, LoginResponse)]


def _text_keys(pdu: PDU) -> list[tuple[str, str]]:
    return decode_text(getattr(pdu, "data", b""))


def test_discovery_lists_every_target_with_tgt_portal_group_1() -> None:
    pdus = [pdu for _, pdu in _decoded(_vectors("discovery"))]
    login_request, login_response, text_request, text_response, logout, logout_response = pdus
    assert isinstance(login_request, LoginRequest)
    assert (login_request.csg, login_request.nsg, login_request.transit) == (
        Stage.LOGIN_OPERATIONAL_NEGOTIATION,
        Stage.FULL_FEATURE_PHASE,
        True,
    )
    assert ("SessionType", "Discovery") in _text_keys(login_request)
    assert isinstance(login_response, LoginResponse)
    assert login_response.status is LoginStatus.SUCCESS
    assert login_response.tsih != 0
    assert ("TargetPortalGroupTag", "1") in _text_keys(login_response)
    assert isinstance(text_request, TextRequest)
    assert _text_keys(text_request) == [("SendTargets", "All")]
    assert text_request.ttt == RESERVED_TAG
    assert isinstance(text_response, TextResponse)
    assert (text_response.final, text_response.cont, text_response.ttt) == (
        True,
        False,
        RESERVED_TAG,
    )
    names = [value for key, value in _text_keys(text_response) if key == "TargetName"]
    assert sorted(name.rsplit(":", 1)[1] for name in names) == ["alpha", "beta", "gamma"]
    addresses = {value for key, value in _text_keys(text_response) if key == "TargetAddress"}
    assert len(addresses) == 1
    assert addresses.pop().endswith(":3260,1")  # only the portal we connected to
    assert isinstance(logout, LogoutRequest)
    assert logout.reason is LogoutReason.CLOSE_SESSION
    assert isinstance(logout_response, LogoutResponse)
    assert logout_response.response is LogoutResponseCode.CLOSED
    assert logout_response.itt == logout.itt


def test_chap_login_uses_md5_with_a_50_byte_challenge_then_logs_out() -> None:
    pdus = [pdu for _, pdu in _decoded(_vectors("chap_login"))]
    responses = [pdu for pdu in pdus if isinstance(pdu, LoginResponse)]
    keys = [dict(_text_keys(pdu)) for pdu in responses]
    assert keys[0] == {"TargetPortalGroupTag": "1", "AuthMethod": "None"}  # discovery: no CHAP
    normal = next(index for index, found in enumerate(keys) if found.get("AuthMethod") == "CHAP")
    assert keys[normal]["TargetPortalGroupTag"] == "1"
    assert responses[normal].transit is False  # tgt waits for CHAP_A before moving on
    challenge = keys[normal + 1]
    assert challenge["CHAP_A"] == "5"
    assert len(bytes.fromhex(challenge["CHAP_C"].removeprefix("0x"))) == 50
    assert all(r.status is LoginStatus.SUCCESS for r in responses)
    assert responses[-1].transit
    assert responses[-1].nsg is Stage.FULL_FEATURE_PHASE
    assert any(isinstance(pdu, LogoutResponse) for pdu in pdus)


def test_auth_failures_are_status_0201_with_a_zeroed_isid() -> None:
    failures = [r for r in _login_responses("auth_failure") if r.status is not LoginStatus.SUCCESS]
    assert [r.status for r in failures] == [LoginStatus.AUTHENTICATION_FAILURE] * 2
    assert not any(LoginStatus.AUTHENTICATION_FAILURE.retryable for _ in failures)
    # tgt does not echo the ISID in a failed Login Response.
    assert {r.isid.to_bytes() for r in failures} == {bytes(6)}


def test_redirects_carry_target_address_without_portal_group_tag() -> None:
    vectors = _vectors("redirect")
    sessions = {v.session: v for v in vectors}
    redirects = [r for r in _login_responses("redirect") if r.status_class == 1]
    assert [r.status for r in redirects] == [
        LoginStatus.TARGET_MOVED_TEMPORARILY,
        LoginStatus.TARGET_MOVED_PERMANENTLY,
    ]
    document = _document("redirect")
    back = document["sessions"][2]["target"]  # the session iscsi-ls opened after the 0x0101
    for response in redirects:
        assert response.transit is False
        assert response.isid.to_bytes() == bytes(6)
        # No sequence numbers either: an initiator must not check StatSN on such an answer.
        assert (response.statsn, response.expcmdsn, response.maxcmdsn) == (0, 0, 0)
        assert _text_keys(response) == [("TargetAddress", back)]
    assert len(sessions) == 5


def test_tgt_continues_sendtargets_with_f0_and_a_ttt_but_never_c() -> None:
    document = _document("tgt_probes")
    session = next(
        record["session"]
        for record in document["pdus"]
        if record["sender"] == "initiator" and record["hex"].startswith("04")
    )
    vectors = [v for v in _vectors("tgt_probes") if v.session == session]
    responses = [pdu for _, pdu in _decoded(vectors) if isinstance(pdu, TextResponse)]
    assert [(r.final, r.cont) for r in responses] == [(False, False)] * (len(responses) - 1) + [
        (True, False)
    ]
    assert all(r.ttt != RESERVED_TAG for r in responses[:-1])
    assert responses[-1].ttt == RESERVED_TAG
    # The pieces are cut at 512 bytes (the MaxRecvDataSegmentLength we declared), mid-pair
    # although C=0, so only the joined text parses.
    assert all(len(r.data) == 512 for r in responses[:-1])
    assert not responses[0].data.endswith(b"\0")
    joined = TextReassembler()
    whole = None
    for response in responses:
        whole = joined.feed(response.data, more=not response.final)
    assert whole is not None
    pairs = decode_text(whole)
    assert [key for key, _ in pairs] == ["TargetName", "TargetAddress"] * 8


def test_tgt_chap_algorithms() -> None:
    """What tgt 1.0.85 does with CHAP_A offers libiscsi never makes (capture.py's probes).

    Each probe session offers CHAP_A, and some answer the challenge with a digest whose
    length shows the hash used (16 MD5, 20 SHA-1, 32 SHA-256).
    """
    outcomes: list[tuple[str, str | None, int | None, str, int | None]] = []
    vectors = _vectors("tgt_probes")
    for session in sorted({v.session for v in vectors}):
        pdus = [pdu for _, pdu in _decoded([v for v in vectors if v.session == session])]
        requests = [dict(_text_keys(p)) for p in pdus if isinstance(p, LoginRequest)]
        responses = [p for p in pdus if isinstance(p, LoginResponse)]
        if len(requests) < 2 or "CHAP_A" not in requests[1]:
            continue  # the discovery probe
        chosen = dict(_text_keys(responses[1])).get("CHAP_A")
        digest = None
        status_after = None
        if len(requests) > 2:
            digest = len(bytes.fromhex(requests[2]["CHAP_R"].removeprefix("0x")))
            status_after = responses[2].status_class << 8 | responses[2].status_detail
        status = responses[1].status_class << 8 | responses[1].status_detail
        outcomes.append((requests[1]["CHAP_A"], chosen, digest, f"{status:#06x}", status_after))
    assert outcomes == [
        ("5", "5", 16, "0x0000", 0x0000),  # MD5 answered with MD5: accepted
        ("5", "5", 20, "0x0000", 0x0200),  # a 20-byte answer to MD5: initiator error, not 0x0201
        ("6", None, None, "0x0200", None),  # 6 is not known to tgt
        ("7", "7", 20, "0x0000", 0x0000),  # tgt's 7 is SHA-1 ...
        ("7", "7", 32, "0x0000", 0x0200),  # ... not SHA-256
        ("8", None, None, "0x0200", None),  # no SHA3-256
        ("7,5", "7", None, "0x0000", None),  # the first of our list that it knows
    ]


# --------------------------------------------------------------------------------------------
# SCSI: what tgt and libiscsi did (scenario "scsi")


def _scsi_sessions() -> dict[int, list[tuple[Vector, PDU]]]:
    sessions: dict[int, list[tuple[Vector, PDU]]] = {}
    for vector, pdu in _decoded(_vectors("scsi")):
        sessions.setdefault(vector.session, []).append((vector, pdu))
    return sessions


def _tasks() -> list[tuple[ScsiCommand, list[ScsiDataIn], ScsiResponse | None]]:
    """Each SCSI Command with the Data-In and SCSI Response that answered its ITT."""
    tasks = []
    for pdus in _scsi_sessions().values():
        for _, command in pdus:
            if not isinstance(command, ScsiCommand):
                continue
            data_ins = [p for _, p in pdus if isinstance(p, ScsiDataIn) and p.itt == command.itt]
            responses = [p for _, p in pdus if isinstance(p, ScsiResponse) and p.itt == command.itt]
            assert len(responses) <= 1
            tasks.append((command, data_ins, responses[0] if responses else None))
    return tasks


def _fixed_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, ASC, ASCQ) of fixed-format sense, read here by hand (protocol/scsi.py parses it
    for the package)."""
    assert sense[0] & 0x7F in (0x70, 0x71), sense.hex()
    return sense[2] & 0x0F, sense[12], sense[13]


def test_every_scsi_command_is_answered_once() -> None:
    tasks = _tasks()
    assert len(tasks) >= 20
    for command, data_ins, response in tasks:
        # One way to end: a Data-In with status (S), or a SCSI Response, never both.
        with_status = [d for d in data_ins if d.status is not None]
        assert (len(with_status), response is None) in ((1, True), (0, False)), command
        if with_status:
            assert data_ins[-1] is with_status[0] and with_status[0].final
        assert [d.datasn for d in data_ins] == list(range(len(data_ins)))
        offsets = [d.buffer_offset for d in data_ins]
        assert offsets == [sum(len(d.data) for d in data_ins[:i]) for i in range(len(offsets))]


def test_libiscsi_commands() -> None:
    for command, _, _ in _tasks():
        assert command.attribute is TaskAttribute.SIMPLE
        assert command.final and not command.write and not command.immediate
        assert command.read == (command.edtl > 0)
        assert command.data == b""
        # Single-level peripheral addressing: 00 LL then six zero bytes.
        assert command.lun[0] == 0 and command.lun[2:] == bytes(6)
    opcodes = {command.cdb[0] for command, _, _ in _tasks()}
    # TEST UNIT READY, INQUIRY, READ CAPACITY(10), SERVICE ACTION IN (16), REPORT LUNS
    assert opcodes == {0x00, 0x12, 0x25, 0x9E, 0xA0}
    report_luns = [c for c, _, _ in _tasks() if c.cdb[0] == 0xA0]
    assert report_luns and all(c.lun == bytes(8) for c in report_luns)


def test_tgt_queues_a_unit_attention_at_login_and_reports_missing_luns() -> None:
    """libiscsi sends TEST UNIT READY to each LUN until it passes: tgt answers the first with
    the UNIT ATTENTION it queued at login (or, for LUN 5, which does not exist, ILLEGAL
    REQUEST), the next with GOOD. REPORT LUNS and INQUIRY before it do not consume it."""
    seen: dict[tuple[int, bytes], list[ScsiResponse]] = {}
    for session, pdus in _scsi_sessions().items():
        responses = {p.itt: p for _, p in pdus if isinstance(p, ScsiResponse)}
        for _, command in pdus:
            if isinstance(command, ScsiCommand) and command.cdb == bytes(16):
                seen.setdefault((session, command.lun), []).append(responses[command.itt])
    assert len(seen) >= 8
    for (_, lun), answers in seen.items():
        first, *later = answers
        assert first.response is ScsiResponseCode.COMMAND_COMPLETED
        assert first.status is ScsiStatus.CHECK_CONDITION
        assert len(first.sense) == 18  # tgt's fixed format
        assert first.response_data == b""
        if lun[1] == 5:
            assert _fixed_sense(first.sense) == (0x05, 0x25, 0x00)
            assert later == []  # libiscsi gives up
        else:
            assert _fixed_sense(first.sense) == (0x06, 0x29, 0x00)
            assert [(r.status, r.data) for r in later] == [(ScsiStatus.GOOD, b"")]


def test_tgt_puts_good_status_on_the_last_data_in_with_the_underflow() -> None:
    reads = [(c, d) for c, d, r in _tasks() if c.read]
    assert reads
    for command, data_ins in reads:
        last = data_ins[-1]
        assert last.status is ScsiStatus.GOOD
        assert last.ttt == RESERVED_TAG
        assert not last.overflow  # a reply cut to the allocation length is not an overflow
        sent = sum(len(d.data) for d in data_ins)
        assert sent <= command.edtl
        assert last.underflow == (sent < command.edtl)
        assert last.residual == command.edtl - sent
    # VPD page 0x00 of tgt's disk is 10 bytes, asked for with 64: U and a residual of 54.
    vpd0 = [d[-1] for c, d in reads if c.cdb[:3] == b"\x12\x01\x00"]
    assert vpd0 and all((d.underflow, d.residual, len(d.data)) == (True, 54, 10) for d in vpd0)


def test_tshark_read_the_scsi_fields_we_check() -> None:
    seen: set[str] = set()
    for vector in DISSECTED:
        if vector.scenario == "scsi" and vector.tshark is not None:
            seen |= set(vector.tshark)
    scsi_checks = {name for name in CHECKS if "scsi" in name or name.endswith(("datasn", "Offset"))}
    assert scsi_checks <= seen, sorted(scsi_checks - seen)


# --------------------------------------------------------------------------------------------
# writes and task management: hand-built vectors (task_pdus.json, from tests/vectors/task_pdus.py)

HAND_BUILT = "task_pdus"
BUILT_MODELS: dict[str, type[Any]] = {
    model.__name__: model
    for model in (
        ScsiCommand,
        ScsiResponse,
        ScsiDataOut,
        R2T,
        TaskManagementRequest,
        TaskManagementResponse,
    )
}
_RAW_FIELDS = frozenset({"lun", "cdb", "data"})  # stored as hex


def _built_as(record: dict[str, Any]) -> PDU:
    """The model the builder says a record's bytes are, from the fields it wrote them from."""
    fields = {
        name: bytes.fromhex(value) if name in _RAW_FIELDS else value
        for name, value in record["fields"].items()
    }
    built: PDU = BUILT_MODELS[record["model"]](**fields)
    return built


TASK_VECTORS = [
    (vector, _built_as(record))
    for vector, record in zip(_vectors(HAND_BUILT), _document(HAND_BUILT)["pdus"], strict=True)
]


def test_task_vectors_are_hand_built_with_provenance_and_cover_every_code() -> None:
    document = _document(HAND_BUILT)
    assert document["versions"]["tshark"]
    assert "hand-built" in document["requests_from"]
    assert all(vector.tshark is not None for vector, _ in TASK_VECTORS)
    built = [decode_pdu(vector.raw) for vector, _ in TASK_VECTORS]
    assert {ScsiDataOut, R2T, TaskManagementRequest, TaskManagementResponse} <= {
        type(pdu) for pdu in built
    }
    functions = {pdu.function for pdu in built if isinstance(pdu, TaskManagementRequest)}
    assert functions == set(TaskFunction)
    responses = {pdu.response for pdu in built if isinstance(pdu, TaskManagementResponse)}
    assert responses == set(TaskResponseCode)
    # Both kinds of Data-Out: unsolicited (reserved TTT) and answering an R2T.
    ttts = {pdu.ttt for pdu in built if isinstance(pdu, ScsiDataOut)}
    assert RESERVED_TAG in ttts and len(ttts) > 1


@pytest.mark.parametrize(
    ("vector", "built"), TASK_VECTORS, ids=[vector.id for vector, _ in TASK_VECTORS]
)
def test_task_vector_decodes_to_what_it_was_built_from(vector: Vector, built: PDU) -> None:
    decoded = decode_pdu(vector.raw)
    assert type(decoded) is type(built)
    assert decoded == built
    assert encode_pdu(built) == vector.raw


def test_task_vectors_are_one_consistent_write_and_one_task_session() -> None:
    """What the builder meant, read back through our decoder: the write's data adds up to its
    EDTL and the R2T asks for the rest; each TMF Response answers its request's ITT."""
    decoded = [(vector, decode_pdu(vector.raw)) for vector, _ in TASK_VECTORS]
    write = [pdu for vector, pdu in decoded if vector.session == 0]
    command = write[0]
    assert isinstance(command, ScsiCommand) and command.write and not command.final
    data_outs = [pdu for pdu in write if isinstance(pdu, ScsiDataOut)]
    assert sum(len(pdu.data) for pdu in data_outs) == command.edtl
    assert [pdu.buffer_offset for pdu in data_outs] == [0, 128, 256]
    (r2t,) = [pdu for pdu in write if isinstance(pdu, R2T)]
    assert (r2t.buffer_offset, r2t.desired_length) == (256, command.edtl - 256)
    assert [pdu.ttt for pdu in data_outs] == [RESERVED_TAG, RESERVED_TAG, r2t.ttt]
    tasks = [pdu for vector, pdu in decoded if vector.session == 1]
    requests = [pdu for pdu in tasks if isinstance(pdu, TaskManagementRequest)]
    answers = [pdu for pdu in tasks if isinstance(pdu, TaskManagementResponse)]
    assert [pdu.itt for pdu in requests] == [pdu.itt for pdu in answers]
    assert all(
        (pdu.referenced_task_tag != RESERVED_TAG) is pdu.function.references_task
        for pdu in requests
    )


TASK_OPCODE_OF: dict[type[Any], Opcode] = {
    **OPCODE_OF,
    ScsiDataOut: Opcode.SCSI_DATA_OUT,
    R2T: Opcode.R2T,
    TaskManagementRequest: Opcode.TASK_MANAGEMENT_REQUEST,
    TaskManagementResponse: Opcode.TASK_MANAGEMENT_RESPONSE,
}
# tshark field -> ours, for the write and task PDUs; the rest as in CHECKS.
TASK_CHECKS: dict[str, tuple[Callable[[str], object], Callable[[PDU, bytes], object]]] = {
    **CHECKS,
    "iscsi.opcode": (_number, lambda pdu, raw: TASK_OPCODE_OF[type(pdu)]),
    "iscsi.datasn": (_number, lambda pdu, raw: _only(pdu, ScsiDataOut).datasn),
    "iscsi.bufferOffset": (_number, lambda pdu, raw: getattr(pdu, "buffer_offset", None)),
    "iscsi.r2tsn": (_number, lambda pdu, raw: _only(pdu, R2T).r2tsn),
    "iscsi.desireddatalength": (_number, lambda pdu, raw: _only(pdu, R2T).desired_length),
    "iscsi.taskmanfun.function": (
        _number,
        lambda pdu, raw: _only(pdu, TaskManagementRequest).function,
    ),
    "iscsi.taskmanfun.referencedtasktag": (
        _number,
        lambda pdu, raw: _only(pdu, TaskManagementRequest).referenced_task_tag,
    ),
    "iscsi.refcmdsn": (_number, lambda pdu, raw: _only(pdu, TaskManagementRequest).refcmdsn),
    "iscsi.taskmanfun.response": (
        _number,
        lambda pdu, raw: _only(pdu, TaskManagementResponse).response,
    ),
}
TASK_IGNORED = IGNORED | {"iscsi.data_out_frame"}  # a frame number, like request_frame


@pytest.mark.parametrize("vector", [v for v, _ in TASK_VECTORS], ids=lambda vector: vector.id)
def test_task_vector_fields_match_tshark(vector: Vector) -> None:
    assert vector.tshark is not None
    pdu = decode_pdu(vector.raw)
    unknown = set(vector.tshark) - set(TASK_CHECKS) - TASK_IGNORED
    assert not unknown, f"tshark reported fields this test does not check: {sorted(unknown)}"
    for name, value in vector.tshark.items():
        if name in TASK_IGNORED:
            continue
        parse, ours = TASK_CHECKS[name]
        assert ours(pdu, vector.raw) == parse(value), name


def test_tshark_read_the_task_fields_we_check() -> None:
    seen: set[str] = set()
    for vector, _ in TASK_VECTORS:
        assert vector.tshark is not None
        seen |= set(vector.tshark)
    added = {name for name in TASK_CHECKS if TASK_CHECKS[name] is not CHECKS.get(name)}
    assert added - {"iscsi.opcode"} <= seen, sorted(added - seen)
