"""Time-boxed hypothesis fuzzing of everything that reads untrusted input (``nox -s fuzz``).

Run from the repository root as ``python -m tests.fuzz [--seconds N] [--target NAME ...]`` (the
``tests`` folder has no ``__init__.py`` and is then a namespace package) or as
``python tests/fuzz.py``. The time budget (default 60 s) is shared evenly by the targets:

=================== ============================================ ===========================
target              input                                        may raise only
=================== ============================================ ===========================
decode_pdu          random bytes and mutated valid PDUs          PDUDecodeError
PDUBuffer           valid PDUs in random chunks, garbage, caps   PDUDecodeError
decode_text         random and key=value-shaped bytes            TextError
TextReassembler     segments with C bits, random limits          TextError
Negotiator.receive  rounds of known, unknown and garbage keys     ProtocolError
InitiatorConnection Login Responses and bytes after start_login  ProtocolError, Authentication-
                                                                 Error, ConnectionLost
parse_connection_   JSON-like documents, their JSON text, bytes  ConnectionInfoError
info
parse_provider_     random and provider_location-shaped text     ConnectionInfoError
location
Portal.parse        random and portal-shaped text                InvalidPortal
validate_iscsi_name random and name-shaped text                  InvalidName
=================== ============================================ ===========================

Besides "nothing else is raised" each target checks what must hold when the input is accepted
(re-encoding round trips, chunking invariance, candidate indexes, no planted password in an
error), and a watchdog fails any example that runs for more than a few seconds (a hang). A
failure is shrunk and printed by hypothesis with a ``@reproduce_failure`` blob; the run goes on
with the other targets and exits with status 1. Not part of CI; the name does not start with
``test_`` so pytest never collects it.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

# tests/ is not a package: make its helper modules importable however this file is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from strategies import data_segments, login_responses, pdus

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    format_provider_location,
    parse_connection_info,
    parse_provider_location,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import (
    AuthenticationError,
    ConnectionInfoError,
    ConnectionLost,
    InvalidName,
    InvalidPortal,
    PDUDecodeError,
    ProtocolError,
    TextError,
)
from pyiscsi_failover.initiator import (
    NEED_DATA,
    InitiatorConnection,
    LoginConfig,
    LoginSucceeded,
)
from pyiscsi_failover.names import Portal, validate_iscsi_name
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.negotiation import (
    LOGIN_KEYS,
    OFFERABLE_KEYS,
    Negotiator,
    OperationalProposal,
    SessionType,
)
from pyiscsi_failover.protocol.pdu import PDU, LoginResponse, Stage, StatusClass
from pyiscsi_failover.protocol.text import (
    TextReassembler,
    decode_keys,
    decode_text,
    encode_text,
)
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu

DEFAULT_SECONDS = 60.0
#: Examples in the first hypothesis call of a target; later calls are sized from the measured
#: rate so that the budget is not overshot by much (it is checked between calls).
FIRST_BATCH = 20
#: One example running longer than this is a hang.
HANG_SECONDS = 5.0


class Hang(Exception):
    """An example ran past the watchdog."""


class Broken(Exception):
    """A property that must hold for accepted input did not."""


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"one example ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Broken(message)


# --------------------------------------------------------------------------------------------
# Input strategies

_FLIP = st.tuples(st.integers(0, 2**16), st.integers(1, 255))


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with a few bytes changed, cut short or extended, or its length fields rewritten."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 4))):
        match draw(st.sampled_from(["flip", "set", "truncate", "extend", "lengths"])):
            case "flip" if data:
                at, bits = draw(_FLIP)
                data[at % len(data)] ^= bits
            case "set" if data:
                at, value = draw(_FLIP)
                data[at % len(data)] = value % 256
            case "truncate" if data:
                del data[draw(st.integers(0, len(data) - 1)) :]
            case "extend":
                data += draw(st.binary(max_size=64))
            case "lengths" if len(data) >= 8:
                data[4] = draw(st.integers(0, 255))  # TotalAHSLength
                data[5:8] = draw(st.integers(0, 2**24 - 1)).to_bytes(3, "big")
    return bytes(data)


@st.composite
def wire_bytes(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    """(bytes, header_digest, data_digest): garbage, or a valid PDU, maybe mutated."""
    header_digest, data_digest = draw(st.booleans()), draw(st.booleans())
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=400))
    else:
        raw = encode_pdu(draw(pdus()), header_digest=header_digest, data_digest=data_digest)
        raw = draw(mutated(raw))
    return raw, header_digest, data_digest


KEY_NAMES = sorted(
    {*OFFERABLE_KEYS, *LOGIN_KEYS, "MaxRecvDataSegmentLength", "TargetPortalGroupTag"}
    | {"TargetAlias", "InitiatorAlias", "TaskReporting", "iSCSIProtocolLevel", "IFMarker"}
    | {"OFMarkInt", "SendTargets", "X-com.example.private", "X#vendor", "Unknown.Key"}
)
keys = st.one_of(
    st.sampled_from(KEY_NAMES),
    st.sampled_from(KEY_NAMES),
    st.sampled_from(KEY_NAMES),
    st.text(max_size=70),
)
values: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(["Yes", "No", "None", "CRC32C", "CRC32C,None", "None,CRC32C", "RFC3720"]),
    st.sampled_from(["Reject", "NotUnderstood", "Irrelevant", "", "0x", "0b", "0xZZ"]),
    st.integers(-1, 2**25).map(str),
    st.integers(0, 2**70).map(lambda n: f"0x{n:x}"),
    st.binary(min_size=1, max_size=40).map(lambda b: "0b" + base64.b64encode(b).decode()),
    st.text(max_size=300),
)


@st.composite
def text_bytes(draw: st.DrawFn) -> bytes:
    """Bytes shaped like key=value text (often valid), or anything at all."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=300))
    out = bytearray()
    for _ in range(draw(st.integers(0, 8))):
        key = draw(keys).encode("utf-8", "surrogatepass")
        value = draw(values).encode("utf-8", "surrogatepass")
        out += key + draw(st.sampled_from([b"=", b"==", b""])) + value
        out += draw(st.sampled_from([b"\x00", b"\x00", b"\x00\x00", b""]))
    if draw(st.booleans()):
        out += draw(st.binary(max_size=8))
    return bytes(out)


def _answer_to(draw: st.DrawFn, offered: str) -> str:
    """Mostly the offered value itself (a valid answer for every key we offer), else a
    refusal, a neighbouring value (valid or not, depending on the key) or garbage."""
    choice = draw(st.integers(0, 99))
    if choice < 80:
        return offered
    if choice < 90:
        return draw(st.sampled_from(["Reject", "NotUnderstood"]))
    if choice < 97:
        if offered.isdigit():
            number = int(offered)
            return draw(st.sampled_from([str(number // 2), str(number * 2), str(number + 1)]))
        return draw(st.sampled_from(["Yes", "No", "None", "CRC32C", "None,CRC32C"]))
    garbage: str = draw(values)
    return garbage


@st.composite
def negotiation_rounds(draw: st.DrawFn) -> tuple[SessionType, list[list[tuple[str, str]]]]:
    """The target's rounds: usually a fitting answer to every key we offer, shuffled, with
    extra keys of its own; sometimes anything at all."""
    session_type = draw(st.sampled_from(SessionType))
    offered = Negotiator(OperationalProposal(), session_type=session_type).offer()
    pair = st.tuples(keys, values)
    rounds: list[list[tuple[str, str]]] = []
    if draw(st.integers(0, 3)):
        answers = [
            (key, _answer_to(draw, value))
            for key, value in offered
            if draw(st.integers(0, 29))  # now and then a key goes unanswered
        ]
        extra = draw(st.lists(pair, max_size=2))
        rounds.append(draw(st.permutations(answers + extra)))
    rounds += draw(st.lists(st.lists(pair, max_size=4), max_size=2))
    return session_type, rounds


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
)
json_like = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=20,
)
#: Passwords carry this mark so a check can tell them from any other text in the document.
PASSWORD_MARK = "PW~"
passwords = st.text(min_size=4, max_size=20).map(lambda text: PASSWORD_MARK + text)
portal_texts = st.one_of(
    st.sampled_from(["10.0.1.2:3260", "10.0.2.2", "[fd00::2]:3260", "host.example:860,2"]),
    st.sampled_from(["[fd00::1", "1.2.3.4:0", "1.2.3.4:99999", "fd00::1:3260", ":", ""]),
    st.text(alphabet="0123456789abcdef.:[],", max_size=30),
)
iqn_texts = st.one_of(
    st.sampled_from(["iqn.2010-10.org.openstack:volume-1", "eui.0123456789abcdef", "naa.1"]),
    st.text(max_size=40),
)
CONNECTION_KEYS = {
    "target_portal": portal_texts,
    "target_iqn": iqn_texts,
    "target_lun": st.one_of(st.integers(-2, 20000), st.sampled_from(["1", "x", "01"])),
    "target_alternative_portals": st.lists(portal_texts, max_size=4),
    "target_alternative_iqns": st.lists(iqn_texts, max_size=4),
    "target_alternative_luns": st.lists(st.integers(-1, 20000), max_size=4),
    "target_portals": st.lists(portal_texts, max_size=4),
    "target_iqns": st.lists(iqn_texts, max_size=4),
    "target_luns": st.lists(st.integers(0, 3), max_size=4),
    "auth_method": st.sampled_from(["CHAP", "chap", "None", "", "kerberos"]),
    "auth_username": st.text(max_size=10),
    "auth_password": passwords,
    "auth_username_in": st.text(max_size=10),
    "auth_password_in": passwords,
    "target_auth_password": passwords,
    "discovery_auth_method": st.sampled_from(["CHAP", "None"]),
    "discovery_auth_username": st.text(max_size=10),
    "discovery_auth_password": passwords,
    "discovery_auth_password_in": passwords,
}


VALID_CONNECTION_DATA: dict[str, object] = {
    "target_portal": "10.0.1.2:3260",
    "target_iqn": "iqn.2010-10.org.openstack:volume-1",
    "target_lun": 1,
    "target_alternative_portals": ["10.0.2.2:3260", "[fd00::2]:3260"],
    "target_alternative_iqns": ["iqn.2010-10.org.openstack:volume-1", "eui.0123456789abcdef"],
    "target_alternative_luns": [1, 2],
    "target_portals": ["10.0.1.2:3260", "10.0.3.2"],
    "target_iqns": ["iqn.2010-10.org.openstack:volume-1"] * 2,
    "target_luns": [1, 1],
    "auth_method": "CHAP",
    "auth_username": "alice",
    "auth_password": PASSWORD_MARK + "ours",
    "auth_username_in": "array",
    "auth_password_in": PASSWORD_MARK + "theirs",
    "discovery_auth_method": "CHAP",
    "discovery_auth_username": "disco",
    "discovery_auth_password": PASSWORD_MARK + "disco",
}


@st.composite
def connection_documents(draw: st.DrawFn) -> object:
    """A valid connection_info with some keys dropped or spoiled, or any JSON-like value."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_like)
    data: dict[str, object] = {}
    for key, value in VALID_CONNECTION_DATA.items():
        choice = draw(st.integers(0, 39))
        if choice < 34:
            data[key] = value
        elif choice < 37:
            data[key] = draw(CONNECTION_KEYS[key])
        elif choice == 37:
            data[key] = draw(json_like)
        # else: the key is left out
    if draw(st.booleans()):
        return data
    return {"driver_volume_type": draw(st.sampled_from(["iscsi", "ISCSI", "rbd"])), "data": data}


@st.composite
def provider_locations(draw: st.DrawFn) -> tuple[str, int | None]:
    default_lun = draw(st.one_of(st.none(), st.integers(-1, 20000)))
    if draw(st.integers(0, 3)) == 0:
        return draw(st.text(max_size=80)), default_lun
    portals = ";".join(draw(st.lists(portal_texts, min_size=1, max_size=3)))
    tpgt = draw(st.sampled_from(["", ",1", ",0", ",65536", ",x", ",1,2"]))
    lun = draw(st.sampled_from(["", " 0", " 1", " None", " -1", " 16384", " 1 2"]))
    return f"{portals}{tpgt} {draw(iqn_texts)}{lun}", default_lun


portal_like = st.one_of(
    portal_texts,
    st.text(max_size=60),
    st.builds(
        lambda host, port, tpgt: f"{host}{port}{tpgt}",
        st.sampled_from(["[::1]", "::1", "127.0.0.1", "Host.Example", "h_st", "-x", "a" * 64]),
        st.sampled_from(["", ":3260", ":0", ":65535", ":65536", ":", ":+1", ": 1"]),
        st.sampled_from(["", ",1", ",65535", ",65536", ",", ",-1"]),
    ),
)
name_like = st.one_of(
    iqn_texts,
    st.builds(
        lambda date, authority, rest: f"iqn.{date}.{authority}{rest}",
        st.sampled_from(["2010-10", "1999-13", "2010-1", "abcd-10"]),
        st.sampled_from(["org.openstack", "com.EXAMPLE", "-bad", "a..b", ""]),
        st.sampled_from(["", ":volume-1", ":", ":x" * 120, ":ü"]),
    ),
    st.text(alphabet="abcdefiqnu.-:0123456789", max_size=40),
)

INITIATOR = "iqn.2026-11.test.pyiscsi:fuzz"
TARGET = "iqn.2026-11.test.pyiscsi:fuzz-target"
LOGIN_TEXT_KEYS = sorted(
    {*KEY_NAMES, "AuthMethod", "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}
)
login_values = st.one_of(
    values,
    st.sampled_from(["CHAP", "5", "7", "0x" + "ab" * 16, "fuzz-target", "None"]),
)


@st.composite
def login_conversations(draw: st.DrawFn) -> tuple[bool, list[bytes]]:
    """(mutual CHAP?, chunks): Login Responses that fit the conversation, and noise."""
    mutual = draw(st.booleans())
    chunks: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 4)) == 0:
            chunks.append(draw(st.binary(max_size=100)))
            continue
        pairs = draw(
            st.lists(st.tuples(st.sampled_from(LOGIN_TEXT_KEYS), login_values), max_size=6)
        )
        try:
            text = encode_text(pairs)
        except TextError:
            text = draw(data_segments())
        response: LoginResponse = draw(login_responses(data=st.just(text)))
        status = draw(st.sampled_from([StatusClass.SUCCESS] * 4 + list(StatusClass)))
        response = LoginResponse(
            transit=response.transit,
            cont=response.cont,
            csg=draw(st.sampled_from([Stage.SECURITY_NEGOTIATION, response.csg])),
            nsg=response.nsg,
            isid=response.isid,
            itt=draw(st.sampled_from([1, response.itt])),
            statsn=response.statsn,
            expcmdsn=response.expcmdsn,
            maxcmdsn=response.maxcmdsn,
            status_class=status,
            status_detail=response.status_detail % 12,
            tsih=response.tsih,
            data=text,
        )
        raw = encode_pdu(response)
        if draw(st.integers(0, 5)) == 0:
            raw = draw(mutated(raw))
        cut = draw(st.integers(0, len(raw)))
        chunks += [raw[:cut], raw[cut:]]
    return mutual, chunks


# --------------------------------------------------------------------------------------------
# The checks: each returns normally for accepted input and raises for refused input.


def check_decode_pdu(case: tuple[bytes, bool, bool]) -> None:
    raw, header_digest, data_digest = case
    pdu = decode_pdu(raw, header_digest=header_digest, data_digest=data_digest)
    # Whatever we accept we can write back, and it reads back the same.
    again = encode_pdu(pdu, header_digest=header_digest, data_digest=data_digest)
    require(decode_pdu(again, header_digest=header_digest, data_digest=data_digest) == pdu, "!=")


@st.composite
def buffer_cases(draw: st.DrawFn) -> tuple[list[PDU], bytes, bool, bool, int, list[int], int]:
    items = draw(st.lists(pdus(), max_size=6))
    header_digest, data_digest = draw(st.booleans()), draw(st.booleans())
    garbage = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=60)))
    cap = draw(st.one_of(st.just(8192), st.integers(0, 120)))
    sizes = draw(st.lists(st.integers(1, 80), min_size=1, max_size=20))
    garbage_at = draw(st.integers(0, len(items)))
    return items, garbage, header_digest, data_digest, cap, sizes, garbage_at


def check_pdu_buffer(case: tuple[list[PDU], bytes, bool, bool, int, list[int], int]) -> None:
    items, garbage, header_digest, data_digest, cap, sizes, garbage_at = case
    encoded = [encode_pdu(p, header_digest=header_digest, data_digest=data_digest) for p in items]
    stream = b"".join(encoded[:garbage_at]) + garbage + b"".join(encoded[garbage_at:])
    buffer = PDUBuffer(
        max_data_segment_length=cap, header_digest=header_digest, data_digest=data_digest
    )
    received: list[PDU] = []
    position, turn = 0, 0
    try:
        while position < len(stream):
            size = sizes[turn % len(sizes)]
            buffer.feed(stream[position : position + size])
            position, turn = position + size, turn + 1
            while (pdu := buffer.next_pdu()) is not None:
                received.append(pdu)
    except PDUDecodeError:
        # A failed stream stays failed: the same error again, fed bytes dropped.
        try:
            buffer.next_pdu()
        except PDUDecodeError:
            pass
        else:
            raise Broken("next_pdu() after a decode error did not fail again") from None
        # Everything before the first bad PDU was delivered whole and in order.
        require(received == items[: len(received)], "PDUs before the error differ")
        raise
    # Success: garbage can hide only when it happens to decode; otherwise every PDU came out.
    if not garbage:
        require(received == items, "chunking changed the PDUs")
        require(
            all(len(getattr(p, "data", b"")) <= cap for p in items), "a PDU over the cap passed"
        )


def check_decode_text(data: bytes) -> None:
    pairs = decode_text(data)
    require(decode_text(encode_text(pairs)) == pairs, "text does not round-trip")
    try:
        keys_ = decode_keys(data)
    except TextError:
        require(len({k for k, _ in pairs}) < len(pairs), "decode_keys refused unique keys")
    else:
        require(list(keys_.items()) == pairs, "decode_keys differs from decode_text")


@st.composite
def reassembly_cases(draw: st.DrawFn) -> tuple[int, list[tuple[bytes, bool]]]:
    limit = draw(st.integers(1, 300))
    segments = draw(st.lists(st.tuples(st.binary(max_size=120), st.booleans()), max_size=8))
    return limit, segments


def check_reassembler(case: tuple[int, list[tuple[bytes, bool]]]) -> None:
    limit, segments = case
    reassembler = TextReassembler(limit=limit)
    pending = b""
    for segment, more in segments:
        whole = reassembler.feed(segment, more=more)
        pending += segment
        require(len(pending) <= limit, "the reassembler went past its limit")
        if more:
            require(whole is None and reassembler.in_progress, "returned text too early")
        else:
            require(whole == pending, "the reassembled text differs")
            require(not reassembler.in_progress, "still in progress after the last segment")
            pending = b""


def check_negotiator(case: tuple[SessionType, list[list[tuple[str, str]]]]) -> None:
    session_type, rounds = case
    negotiator = Negotiator(OperationalProposal(), session_type=session_type)
    negotiator.offer()
    for pairs in rounds:
        answers = negotiator.receive(pairs)
        require({k for k, _ in answers} <= {k for k, _ in pairs}, "answered a key not sent")
    result = negotiator.result()
    require(result.first_burst_length <= result.max_burst_length, "FirstBurstLength > Max")
    require(1 <= result.max_connections <= 65535, "MaxConnections out of range")
    require(0 <= result.error_recovery_level <= 2, "ErrorRecoveryLevel out of range")


_CHAP = ChapCredentials("fuzz-user", Secret(b"fuzz-initiator-secret"))
_TARGET_CHAP = ChapCredentials("fuzz-target", Secret(b"fuzz-target-secret-0"))


def check_initiator(case: tuple[bool, list[bytes]]) -> None:
    mutual, chunks = case
    config = LoginConfig(
        initiator_name=INITIATOR,
        target_name=TARGET,
        chap=_CHAP,
        target_chap=_TARGET_CHAP if mutual else None,
    )
    connection = InitiatorConnection(config)
    connection.start_login()
    connection.data_to_send()
    for chunk in chunks:
        if not chunk:
            continue
        connection.receive_data(chunk)
        while (event := connection.next_event()) is not NEED_DATA:
            # A login without CHAP done would be a silent downgrade.
            require(not isinstance(event, LoginSucceeded), "logged in without CHAP")
        connection.data_to_send()


def _shows_password(exc: BaseException) -> bool:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts = [str(current), repr(current), *map(repr, vars(current).values())]
        if any(PASSWORD_MARK in text for text in texts):
            return True
        todo += [current.__cause__, current.__context__]
    return False


def check_connection_info(case: tuple[object, str]) -> None:
    document, form = case
    payload: Any = document
    if form == "json":
        payload = json.dumps(document)
    elif form == "bytes":
        payload = json.dumps(document).encode()
    try:
        info = parse_connection_info(payload)
    except ConnectionInfoError as exc:
        # The planted password may sit under a key that is not a password key: then showing
        # it is fair. Only check documents that keep it where it belongs.
        if PASSWORD_MARK not in json.dumps(_without_password_keys(document)):
            require(not _shows_password(exc), f"an error shows a password: {exc!r}")
        raise
    require(isinstance(info, ConnectionInfo), "not a ConnectionInfo")
    require([c.index for c in info.candidates] == list(range(len(info.candidates))), "indexes")


def _without_password_keys(document: object) -> object:
    if isinstance(document, dict):
        return {k: _without_password_keys(v) for k, v in document.items() if "password" not in k}
    if isinstance(document, list):
        return [_without_password_keys(v) for v in document]
    if isinstance(document, float) and not math.isfinite(document):
        return None  # json.dumps would write NaN; it holds no password anyway
    return document


def check_provider_location(case: tuple[str, int | None]) -> None:
    text, default_lun = case
    info = parse_provider_location(text, default_lun=default_lun)
    again = parse_provider_location(format_provider_location(info))
    require(again.candidates == info.candidates, "provider_location does not round-trip")


def check_portal(case: tuple[str, int]) -> None:
    text, default_port = case
    portal = Portal.parse(text, default_port=default_port)
    require(Portal.parse(portal.with_tpgt()) == portal, "portal does not round-trip")
    require(Portal.parse(str(portal)).address == portal.address, "str() does not round-trip")


def check_name(text: str) -> None:
    name = validate_iscsi_name(text)
    require(validate_iscsi_name(name) == name, "normalising twice changes the name")


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    allowed: tuple[type[BaseException], ...]
    stats: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    failure: str | None = None


TARGETS = [
    Target("decode_pdu", wire_bytes(), check_decode_pdu, (PDUDecodeError,)),
    Target("PDUBuffer", buffer_cases(), check_pdu_buffer, (PDUDecodeError,)),
    Target("decode_text", text_bytes(), check_decode_text, (TextError,)),
    Target("TextReassembler", reassembly_cases(), check_reassembler, (TextError,)),
    Target("Negotiator.receive", negotiation_rounds(), check_negotiator, (ProtocolError,)),
    Target(
        "InitiatorConnection",
        login_conversations(),
        check_initiator,
        (ProtocolError, AuthenticationError, ConnectionLost),
    ),
    Target(
        "parse_connection_info",
        st.tuples(connection_documents(), st.sampled_from(["mapping", "json", "bytes"])),
        check_connection_info,
        (ConnectionInfoError,),
    ),
    Target(
        "parse_provider_location",
        provider_locations(),
        check_provider_location,
        (ConnectionInfoError,),
    ),
    Target(
        "Portal.parse",
        st.tuples(portal_like, st.one_of(st.just(3260), st.integers(-1, 70000))),
        check_portal,
        (InvalidPortal,),
    ),
    Target("validate_iscsi_name", name_like, check_name, (InvalidName,)),
]


def run_target(target: Target, budget: float, base_seed: int | None) -> None:
    started = time.monotonic()
    deadline = started + budget
    batch, size = 0, FIRST_BATCH

    def body(value: Any) -> None:
        target.stats["examples"] += 1
        with watchdog(HANG_SECONDS):
            try:
                target.check(value)
            except target.allowed as exc:
                target.stats["refused"] += 1
                target.stats[type(exc).__name__] += 1
            else:
                target.stats["accepted"] += 1

    while (remaining := deadline - time.monotonic()) > 0:
        if batch:
            rate = target.stats["examples"] / max(time.monotonic() - started, 1e-3)
            size = max(5, min(2000, int(rate * remaining / 2)))
        test = settings(
            max_examples=size,
            deadline=None,
            database=None,
            derandomize=False,
            print_blob=True,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )(given(target.strategy)(body))
        if base_seed is not None:
            test = seed(base_seed + batch)(test)
        batch += 1
        try:
            test()
        except Exception as exc:
            target.failure = f"{type(exc).__name__}: {exc}"
            print(f"\n*** {target.name}: FAILED", file=sys.stderr)
            traceback.print_exc()
            break
    target.seconds = time.monotonic() - started


def summary(targets: list[Target]) -> list[str]:
    rows = [("target", "examples", "accepted", "refused", "seconds", "result")]
    for t in targets:
        rows.append(
            (
                t.name,
                str(t.stats["examples"]),
                str(t.stats["accepted"]),
                str(t.stats["refused"]),
                f"{t.seconds:.1f}",
                "FAILED" if t.failure else "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for t in targets:
        if t.failure:
            lines.append(f"{t.name}: {t.failure.splitlines()[0]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help="total time budget (default 60)"
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=[t.name for t in TARGETS],
        help="fuzz only this target (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="make the run repeatable")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error("--seconds must be positive")
    # Warnings about odd target answers are the package doing its job; keep the output readable.
    logging.getLogger("pyiscsi_failover").setLevel(logging.ERROR)
    chosen = [t for t in TARGETS if args.target is None or t.name in args.target]
    share = args.seconds / len(chosen)
    print(f"fuzzing {len(chosen)} target(s) for {args.seconds:g} s ({share:.1f} s each)")
    for target in chosen:
        run_target(target, share, args.seed)
        print(
            f"  {target.name}: {target.stats['examples']} examples in {target.seconds:.1f} s"
            + (" FAILED" if target.failure else ""),
            flush=True,
        )
    print()
    for line in summary(chosen):
        print(line)
    return 1 if any(t.failure for t in chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
