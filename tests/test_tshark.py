"""Wireshark's iSCSI dissector (tshark) reads the PDUs our initiator sends as valid iSCSI.

An independent decoder is the cheapest second opinion on our encoder: we capture our own sessions
with tgt's ``tgtd`` on loopback (dumpcap on ``lo``) and check, for every PDU *we* sent (TCP
destination port 3260), what tshark makes of it: the opcode sequence, the login flags, the
key=value pairs, the header digest, and that nothing is malformed. The CHAP response is checked
against MD5 computed here from the challenge as tshark read it, and the CHAP secret must not
appear anywhere in the capture.

Facts about tshark 4.0 (Debian 12) this relies on:

* It has no iSCSI digest preferences; it guesses header digests per TCP connection on the first
  PDU after login (a CRC32C over the BHS that matches) and then labels every
  ``iscsi.headerdigest32`` "(Good CRC32)" or "(Bad CRC32, should be ...)". That label exists
  only in PDML's ``showname``, so PDML is what we read.
* It shows no I bit for Login PDUs and no NSG when T=0; PDML's ``unmaskedvalue`` of the opcode
  and flag fields gives the whole byte tshark decoded, which covers both.

The write and task management PDUs (SCSI Data-Out, R2T, Task Management Function Request and
Response) get two tests at the end: tshark reads the hand-built vectors in
``tests/vectors/task_pdus.pcap``, and a capture of libiscsi's ``iscsi-test-cu`` writing to and
aborting a task on tgtd goes, PDU by PDU and both ways, through our decoder and encoder.

Test code: it runs subprocesses (tgtd, dumpcap, tshark) and talks only to loopback addresses.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from peers import TgtdStarter, iscsi_url, require_tool

from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import DEFAULT_ALGORITHMS, ChapAlgorithm
from pyiscsi_failover.protocol.negotiation import (
    Digest,
    Negotiator,
    OperationalProposal,
    SessionType,
)
from pyiscsi_failover.protocol.pdu import (
    PDU,
    R2T,
    RESERVED_TAG,
    ScsiCommand,
    ScsiDataOut,
    ScsiResponse,
    TaskFunction,
    TaskManagementRequest,
    TaskManagementResponse,
)
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu
from pyiscsi_failover.transport import LoginReport, discover, login

pytestmark = pytest.mark.peer

ISCSI_PORT = 3260  # tshark's default iSCSI target port; also passed explicitly below
DISCARD_PORT = 9  # marker datagrams go here: nothing answers, dumpcap only has to see them
INITIATOR = "iqn.2026-11.test.pyiscsi:tshark-initiator"
OPEN_IQN = "iqn.2026-11.test.pyiscsi:tshark-open"
CHAP_IQN = "iqn.2026-11.test.pyiscsi:tshark-chap"
DIGEST_IQN = "iqn.2026-11.test.pyiscsi:tshark-digest"
#: Test-only CHAP account, created on a throw-away tgtd.
CHAP_USER = "tshark-user"
CHAP_SECRET = "tshark-secret-5f3a9e1c"

SESSIONS_DEADLINE = 10.0
CAPTURE_READY_TIMEOUT = 10.0
TSHARK_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02

LOGIN, TEXT, LOGOUT = 0x03, 0x04, 0x06
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3


# --------------------------------------------------------------------------------------------
# capturing on lo


@contextlib.contextmanager
def capturing(pcap: Path, host: str) -> Iterator[None]:
    """dumpcap on ``lo`` for ``host``'s iSCSI port, proven to capture at the start and the end.

    "Capturing on" is printed before packets flow, and the file is flushed in batches, so the
    proof is a UDP datagram of ours found in the file. Packets reach the file in order: once the
    closing marker is there, so is every PDU sent before it.
    """
    dumpcap = require_tool("dumpcap", "tshark")
    bpf = f"host {host} and (tcp port {ISCSI_PORT} or udp port {DISCARD_PORT})"
    process = subprocess.Popen(
        [dumpcap, "-q", "-i", "lo", "-f", bpf, "-w", str(pcap)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_marker(process, pcap, host, "start")
        yield
        _wait_for_marker(process, pcap, host, "end")
    finally:
        _stop(process)


def _wait_for_marker(process: subprocess.Popen[bytes], pcap: Path, host: str, label: str) -> None:
    marker = f"pyiscsi-tshark-{label}-{secrets.token_hex(8)}".encode()
    deadline = time.monotonic() + CAPTURE_READY_TIMEOUT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        while True:
            if process.poll() is not None:
                _, err = process.communicate()
                pytest.fail(
                    f"dumpcap exited with status {process.returncode} (root needed to capture "
                    f"on lo): {err.decode(errors='replace').strip()}",
                    pytrace=False,
                )
            probe.sendto(marker, (host, DISCARD_PORT))
            if pcap.exists() and marker in pcap.read_bytes():
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"dumpcap did not capture our {label} marker within {CAPTURE_READY_TIMEOUT} s"
                )
            time.sleep(_POLL_INTERVAL)  # polling the file for our marker, bounded above


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # dumpcap finishes the pcapng on SIGTERM
    try:
        process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


# --------------------------------------------------------------------------------------------
# reading the capture with tshark


def tshark(pcap: Path, config_dir: Path, *args: str) -> str:
    """Run tshark on ``pcap`` with an empty profile (no personal preferences leak in)."""
    binary = require_tool("tshark", "tshark")
    config_dir.mkdir(exist_ok=True)
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(config_dir)}
    argv = [binary, "-n", "-r", str(pcap), "-o", f"iscsi.target_ports:{ISCSI_PORT}", *args]
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=TSHARK_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr}"
    return done.stdout


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    show: str
    showname: str
    unmasked: str | None  # the whole byte(s) behind a bitmask field, in hex


@dataclass(frozen=True, slots=True, kw_only=True)
class DissectedPDU:
    """One ``iscsi`` protocol tree of a frame, as tshark read it."""

    frame: int
    size: int
    fields: Mapping[str, Sequence[Field]]

    def all(self, name: str) -> list[str]:
        return [f.show for f in self.fields.get(name, ())]

    def has(self, name: str) -> bool:
        return name in self.fields

    def one(self, name: str) -> Field:
        found = self.fields.get(name, ())
        assert len(found) == 1, f"frame {self.frame}: {len(found)} x {name}, expected one"
        return found[0]

    def number(self, name: str) -> int:
        return int(self.one(name).show, 0)

    def byte(self, name: str) -> int:
        """The whole byte a bit field was decoded from."""
        unmasked = self.one(name).unmasked
        assert unmasked is not None, f"frame {self.frame}: {name} has no unmasked value"
        return int(unmasked, 16)

    def pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for text in self.all("iscsi.keyvalue"):
            key, sep, value = text.partition("=")
            assert sep, f"frame {self.frame}: tshark shows {text!r}, not key=value"
            pairs.append((key, value))
        return pairs


@dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    number: int
    stream: int
    srcport: int
    dstport: int
    tcp_len: int
    pdus: tuple[DissectedPDU, ...]


def _first(proto: ElementTree.Element, name: str) -> str:
    for element in proto.iter("field"):
        if element.get("name") == name:
            return element.get("show", "")
    raise AssertionError(f"no {name} in {proto.get('name')}")


def read_frames(pdml: str) -> list[Frame]:
    frames = []
    for packet in ElementTree.fromstring(pdml).iter("packet"):
        protos = {p.get("name"): p for p in packet.findall("proto")}
        tcp = protos.get("tcp")
        if tcp is None:
            continue  # our UDP markers
        number = int(_first(packet, "frame.number"))
        pdus = []
        for proto in packet.findall("proto"):
            if proto.get("name") != "iscsi":
                continue
            fields: dict[str, list[Field]] = {}
            for element in proto.iter("field"):  # document order, nested ones included
                name = element.get("name", "")
                if name:
                    fields.setdefault(name, []).append(
                        Field(
                            show=element.get("show", ""),
                            showname=element.get("showname", ""),
                            unmasked=element.get("unmaskedvalue"),
                        )
                    )
            pdus.append(DissectedPDU(frame=number, size=int(proto.get("size", "0")), fields=fields))
        frames.append(
            Frame(
                number=number,
                stream=int(_first(tcp, "tcp.stream")),
                srcport=int(_first(tcp, "tcp.srcport")),
                dstport=int(_first(tcp, "tcp.dstport")),
                tcp_len=int(_first(tcp, "tcp.len")),
                pdus=tuple(pdus),
            )
        )
    return frames


def pdus_by_stream(frames: Sequence[Frame], *, to_target: bool) -> list[list[DissectedPDU]]:
    """One direction's PDUs per TCP connection, connections in the order they were opened."""
    streams: dict[int, list[DissectedPDU]] = {}
    for frame in sorted(frames, key=lambda f: f.number):
        if (frame.dstport == ISCSI_PORT) is to_target and frame.pdus:
            streams.setdefault(frame.stream, []).extend(frame.pdus)
    return [streams[s] for s in sorted(streams)]


# --------------------------------------------------------------------------------------------
# what we meant to send


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    opcode: int
    immediate: bool
    flags: int  # byte 1 of the BHS
    keys: list[tuple[str, str]] | None  # None: checked separately (the CHAP response)
    header_digest: bool = False


def login_request(keys: list[tuple[str, str]] | None, *, transit: bool, csg: int, nsg: int) -> Sent:
    flags = (0x80 if transit else 0) | csg << 2 | (nsg if transit else 0)
    return Sent(opcode=LOGIN, immediate=True, flags=flags, keys=keys)


def offered(proposal: OperationalProposal, session_type: SessionType) -> list[tuple[str, str]]:
    return Negotiator(proposal, session_type=session_type).offer()


def check_pdu(pdu: DissectedPDU, sent: Sent, where: str) -> None:
    at = f"{where}, frame {pdu.frame}"
    assert pdu.number("iscsi.opcode") == sent.opcode, at
    first_byte = pdu.byte("iscsi.opcode")
    assert first_byte == sent.opcode | (0x40 if sent.immediate else 0), f"{at}: {first_byte:#x}"
    if sent.opcode == LOGIN:
        transit = bool(sent.flags & 0x80)
        assert pdu.number("iscsi.login.T") == transit, at
        assert pdu.number("iscsi.login.C") == 0, at
        assert pdu.number("iscsi.login.csg") == sent.flags >> 2 & 3, at
        if transit:
            assert pdu.number("iscsi.login.nsg") == sent.flags & 3, at
        else:
            assert not pdu.has("iscsi.login.nsg"), at  # tshark hides NSG when T=0
        assert pdu.byte("iscsi.login.T") == sent.flags, f"{at}: flags {pdu.byte('iscsi.login.T')}"
        assert pdu.number("iscsi.versionmax") == pdu.number("iscsi.versionmin") == 0, at
        assert pdu.number("iscsi.tsih") == 0, at
    elif sent.opcode == TEXT:
        assert pdu.number("iscsi.I") == 0, at
        assert pdu.number("iscsi.text.F") == 1, at
        assert pdu.number("iscsi.text.C") == 0, at
        assert pdu.byte("iscsi.text.F") == sent.flags, at
    else:
        assert sent.opcode == LOGOUT
        assert pdu.number("iscsi.I") == 1, at
        assert pdu.number("iscsi.logout.reason") == 0, at  # close the session
        assert pdu.byte("iscsi.logout.reason") == sent.flags, at
        assert pdu.number("iscsi.datasegmentlength") == 0, at
    if sent.keys is not None:
        assert pdu.pairs() == sent.keys, at
    if sent.header_digest:
        digest = pdu.one("iscsi.headerdigest32").showname
        assert digest.endswith("(Good CRC32)"), f"{at}: {digest}"
    else:
        assert not pdu.has("iscsi.headerdigest32"), f"{at}: tshark saw a header digest"
    assert not pdu.has("iscsi.datadigest32"), at  # none of our PDUs carries data with digests


def decode_chap_binary(value: str) -> bytes:
    """RFC 7143 binary values: 0x (hex) or 0b (base64)."""
    if value[:2].lower() == "0x":
        return bytes.fromhex(value[2:])
    assert value[:2].lower() == "0b", f"CHAP value {value!r} is neither 0x nor 0b"
    return base64.b64decode(value[2:], validate=True)


# --------------------------------------------------------------------------------------------
# the sessions


@dataclass(frozen=True, slots=True, kw_only=True)
class Sessions:
    discovery: LoginConfig
    plain: LoginConfig
    chap: LoginConfig
    digests: LoginConfig
    reports: dict[str, LoginReport] = field(default_factory=dict)

    async def run(self, portal: Portal) -> None:
        """One after the other, each on its own TCP connection (so one tcp.stream each)."""
        with trio.fail_after(SESSIONS_DEADLINE):
            self.reports["discovery"] = await discover(
                portal, self.discovery, connect_timeout=3, login_timeout=5
            )
            for name in ("plain", "chap", "digests"):
                config: LoginConfig = getattr(self, name)
                self.reports[name] = await login(portal, config, connect_timeout=3, login_timeout=5)


def test_tshark_reads_our_pdus_as_valid_iscsi(tgtd_factory: TgtdStarter, tmp_path: Path) -> None:
    require_tool("tshark", "tshark")
    require_tool("dumpcap", "tshark")
    tgtd = tgtd_factory(port=ISCSI_PORT)
    for tid, iqn in enumerate((OPEN_IQN, CHAP_IQN, DIGEST_IQN), start=1):
        tgtd.add_target(tid, iqn, luns=1)
        tgtd.allow(tid)
    tgtd.add_account(CHAP_USER, CHAP_SECRET)
    tgtd.bind_account(2, CHAP_USER)
    # tgt negotiates digests only in Normal sessions, and only when the target allows them.
    tgtd.set_param(3, "HeaderDigest", "CRC32C,None")
    tgtd.set_param(3, "DataDigest", "CRC32C,None")

    crc = OperationalProposal(header_digest=(Digest.CRC32C,), data_digest=(Digest.CRC32C,))
    chap = ChapCredentials(CHAP_USER, Secret(CHAP_SECRET.encode()))
    sessions = Sessions(
        discovery=LoginConfig(initiator_name=INITIATOR),
        plain=LoginConfig(initiator_name=INITIATOR, target_name=OPEN_IQN),
        chap=LoginConfig(initiator_name=INITIATOR, target_name=CHAP_IQN, chap=chap),
        digests=LoginConfig(initiator_name=INITIATOR, target_name=DIGEST_IQN, proposal=crc),
    )
    pcap = tmp_path / "sessions.pcapng"
    with capturing(pcap, tgtd.host):
        trio.run(sessions.run, Portal.parse(tgtd.portal))

    # The sessions went as the expectations below assume: each logged in and out.
    assert list(sessions.reports) == ["discovery", "plain", "chap", "digests"]
    outcomes: dict[str, LoginSucceeded] = {}
    for name, report in sessions.reports.items():
        assert isinstance(report.outcome, LoginSucceeded), (name, report.outcome)
        assert report.logout is not None, (name, report.notes)
        outcomes[name] = report.outcome
    assert {t.iqn for t in sessions.reports["discovery"].targets} == {
        OPEN_IQN,
        CHAP_IQN,
        DIGEST_IQN,
    }
    assert [o.auth_method for o in outcomes.values()] == ["None", "None", "CHAP", "None"]
    negotiated = outcomes["digests"].parameters
    assert (negotiated.header_digest, negotiated.data_digest) == (Digest.CRC32C, Digest.CRC32C)

    # Only the response hash travels: the secret is nowhere in the capture, in any encoding
    # the text protocol could carry. The CHAP name is there, so the search does see the data.
    raw = pcap.read_bytes()
    secret = CHAP_SECRET.encode()
    for form in (
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
    ):
        assert form not in raw
    assert f"CHAP_N={CHAP_USER}".encode() in raw

    profile = tmp_path / "wireshark-profile"
    frames = read_frames(tshark(pcap, profile, "-T", "pdml"))

    # Every byte we sent is inside an iSCSI PDU as tshark delimits them (none left undissected).
    ours = [f for f in frames if f.dstport == ISCSI_PORT and f.tcp_len > 0]
    assert ours, "no iSCSI traffic captured"
    for frame in ours:
        sizes = [pdu.size for pdu in frame.pdus]
        assert sum(sizes) == frame.tcp_len, (frame.number, sizes, frame.tcp_len)

    ours_by_session = pdus_by_stream(frames, to_target=True)
    theirs_by_session = pdus_by_stream(frames, to_target=False)
    assert len(ours_by_session) == len(theirs_by_session) == 4, [
        [p.frame for p in s] for s in ours_by_session
    ]
    discovery_pdus, plain_pdus, chap_pdus, digest_pdus = ours_by_session

    def first_login(config: LoginConfig, auth: str, *, transit: bool) -> Sent:
        keys = [("InitiatorName", INITIATOR), ("SessionType", config.session_type.value)]
        if config.target_name is not None:
            keys.append(("TargetName", config.target_name))
        keys.append(("AuthMethod", auth))
        return login_request(keys, transit=transit, csg=SECURITY, nsg=OPERATIONAL)

    def operational(config: LoginConfig) -> Sent:
        keys = offered(config.proposal, config.session_type)
        return login_request(keys, transit=True, csg=OPERATIONAL, nsg=FULL_FEATURE)

    def logout(*, digest: bool = False) -> Sent:
        return Sent(opcode=LOGOUT, immediate=True, flags=0x80, keys=[], header_digest=digest)

    expected: dict[str, tuple[list[DissectedPDU], list[Sent]]] = {
        "discovery": (
            discovery_pdus,
            [
                first_login(sessions.discovery, "None", transit=True),
                operational(sessions.discovery),
                Sent(opcode=TEXT, immediate=False, flags=0x80, keys=[("SendTargets", "All")]),
                logout(),
            ],
        ),
        "plain": (
            plain_pdus,
            [
                first_login(sessions.plain, "None", transit=True),
                operational(sessions.plain),
                logout(),
            ],
        ),
        "chap": (
            chap_pdus,
            [
                first_login(sessions.chap, "CHAP", transit=False),
                login_request(
                    [("CHAP_A", ",".join(str(int(a)) for a in DEFAULT_ALGORITHMS))],
                    transit=False,
                    csg=SECURITY,
                    nsg=SECURITY,
                ),
                login_request(None, transit=True, csg=SECURITY, nsg=OPERATIONAL),
                operational(sessions.chap),
                logout(),
            ],
        ),
        "digests": (
            digest_pdus,
            [
                first_login(sessions.digests, "None", transit=True),
                operational(sessions.digests),
                logout(digest=True),
            ],
        ),
    }
    for name, (seen, meant) in expected.items():
        assert len(seen) == len(meant), (name, [p.all("iscsi.opcode") for p in seen])
        isid = getattr(sessions, name).isid.to_bytes().hex()
        for index, (pdu, sent) in enumerate(zip(seen, meant, strict=True)):
            check_pdu(pdu, sent, f"{name} PDU {index}")
            if sent.opcode == LOGIN:
                assert pdu.one("iscsi.isid").show.replace(":", "") == isid, (name, index)

    # The operational keys say what each session asked for, digests included.
    for name, pdus, digest in (
        # The default offer: None preferred, CRC32C for targets that insist on digests.
        ("discovery", discovery_pdus, "None,CRC32C"),
        ("plain", plain_pdus, "None,CRC32C"),
        ("chap", chap_pdus, "None,CRC32C"),
        ("digests", digest_pdus, "CRC32C"),
    ):
        (request,) = [
            p for p in pdus if p.has("iscsi.login.csg") and p.number("iscsi.login.csg") == 1
        ]
        keys = dict(request.pairs())
        assert keys["HeaderDigest"] == keys["DataDigest"] == digest, (name, keys)
        assert keys["MaxRecvDataSegmentLength"] == "262144", (name, keys)

    # The CHAP response is MD5(CHAP_I || secret || CHAP_C) of the challenge as tshark read it.
    assert DEFAULT_ALGORITHMS[0] is ChapAlgorithm.MD5  # tgt looks at the first offer only
    challenge = dict(next(p.pairs() for p in theirs_by_session[2] if ("CHAP_A", "5") in p.pairs()))
    answer = chap_pdus[2].pairs()
    assert [key for key, _ in answer] == ["CHAP_N", "CHAP_R"], answer
    assert answer[0][1] == CHAP_USER
    identifier = int(challenge["CHAP_I"], 0)
    expected_hash = hashlib.md5(
        bytes([identifier]) + secret + decode_chap_binary(challenge["CHAP_C"])
    ).digest()
    assert decode_chap_binary(answer[1][1]) == expected_hash

    # tshark's auto-detection really ran: the target's Logout Response carries a good digest
    # too, and no session without digests shows one.
    assert theirs_by_session[3][-1].one("iscsi.headerdigest32").showname.endswith("(Good CRC32)")
    for session in (*ours_by_session[:3], *theirs_by_session[:3]):
        assert not any(p.has("iscsi.headerdigest32") for p in session)

    # Nothing malformed and no expert finding of warning level or worse, anywhere in the
    # capture; the expert layer itself works (tshark notes each SYN at chat level).
    flagged = tshark(pcap, profile, "-Y", "_ws.malformed || _ws.expert.severity >= warning").strip()
    assert flagged == "", flagged
    chats = tshark(pcap, profile, "-Y", "_ws.expert.severity == chat").strip().splitlines()
    assert len(chats) >= 4, chats


SCSI_IQN = "iqn.2026-12.test.pyiscsi:tshark-scsi"
SCSI_COMMAND = 0x01


def test_tshark_reads_our_scsi_commands(tgtd_factory: TgtdStarter, tmp_path: Path) -> None:
    """A LUN check's SCSI Commands (REPORT LUNS, INQUIRY, VPD 0x83, TEST UNIT READY and its
    UNIT ATTENTION retry, READ CAPACITY(16)) as tshark reads them: whole PDUs, nothing
    malformed, the CmdSNs consecutive from the login's, each answered under its own ITT."""
    require_tool("tshark", "tshark")
    require_tool("dumpcap", "tshark")
    from pyiscsi_failover.lun_check import LunCheck, LunVerdict

    tgtd = tgtd_factory(port=ISCSI_PORT)
    tgtd.add_target(1, SCSI_IQN, luns=1)
    tgtd.allow(1)
    check = LunCheck(1)
    config = LoginConfig(initiator_name=INITIATOR, target_name=SCSI_IQN)

    async def one() -> LoginReport:
        with trio.fail_after(SESSIONS_DEADLINE):
            return await login(Portal.parse(tgtd.portal), config, lun_check=check)

    pcap = tmp_path / "scsi.pcapng"
    with capturing(pcap, tgtd.host):
        report = trio.run(one)
    assert report.lun is not None and report.lun.verdict is LunVerdict.OK, report.lun
    assert report.logout is not None, report.notes

    profile = tmp_path / "wireshark-profile"
    frames = read_frames(tshark(pcap, profile, "-T", "pdml"))
    ours = [f for f in frames if f.dstport == ISCSI_PORT and f.tcp_len > 0]
    for frame in ours:
        assert sum(pdu.size for pdu in frame.pdus) == frame.tcp_len, frame.number
    flagged = tshark(pcap, profile, "-Y", "_ws.malformed || _ws.expert.severity >= warning")
    assert flagged.strip() == ""

    (sent,) = pdus_by_stream(frames, to_target=True)
    (received,) = pdus_by_stream(frames, to_target=False)
    commands = [p for p in sent if p.number("iscsi.opcode") & 0x3F == SCSI_COMMAND]
    # Five commands, plus the TEST UNIT READY repeated after tgtd's UNIT ATTENTION.
    assert len(commands) == 6, [p.frame for p in commands]
    cmdsns = [p.number("iscsi.cmdsn") for p in commands]
    assert cmdsns == list(range(cmdsns[0], cmdsns[0] + 6))
    expected_lengths = sorted([4096, 255, 255, 0, 32, 0])
    assert (
        sorted(p.number("iscsi.scsicommand.expecteddatatransferlength") for p in commands)
        == expected_lengths
    )
    itts = {p.number("iscsi.initiatortasktag") for p in commands}
    answered = {
        p.number("iscsi.initiatortasktag")
        for p in received
        if p.number("iscsi.opcode") & 0x3F in (0x21, 0x25)
    }
    assert itts <= answered


# --------------------------------------------------------------------------------------------
# the hand-built write and task management vectors, read by the installed tshark

TASK_VECTORS = Path(__file__).parent / "vectors" / "task_pdus"


def _expected_fields(pdu: PDU) -> dict[str, int]:
    """What tshark must show for ``pdu``, by field name, for the types the vectors test."""
    match pdu:
        case ScsiDataOut():
            return {
                "iscsi.initiatortasktag": pdu.itt,
                "iscsi.targettransfertag": pdu.ttt,
                "iscsi.expstatsn": pdu.expstatsn,
                "iscsi.datasn": pdu.datasn,
                "iscsi.bufferOffset": pdu.buffer_offset,
                "iscsi.datasegmentlength": len(pdu.data),
            }
        case R2T():
            return {
                "iscsi.initiatortasktag": pdu.itt,
                "iscsi.targettransfertag": pdu.ttt,
                "iscsi.statsn": pdu.statsn,
                "iscsi.expcmdsn": pdu.expcmdsn,
                "iscsi.maxcmdsn": pdu.maxcmdsn,
                "iscsi.r2tsn": pdu.r2tsn,
                "iscsi.bufferOffset": pdu.buffer_offset,
                "iscsi.desireddatalength": pdu.desired_length,
            }
        case TaskManagementRequest():
            return {
                "iscsi.initiatortasktag": pdu.itt,
                "iscsi.I": int(pdu.immediate),
                "iscsi.taskmanfun.function": pdu.function,
                "iscsi.taskmanfun.referencedtasktag": pdu.referenced_task_tag,
                "iscsi.cmdsn": pdu.cmdsn,
                "iscsi.expstatsn": pdu.expstatsn,
                "iscsi.refcmdsn": pdu.refcmdsn,
            }
        case TaskManagementResponse():
            return {
                "iscsi.initiatortasktag": pdu.itt,
                "iscsi.taskmanfun.response": pdu.response,
                "iscsi.statsn": pdu.statsn,
                "iscsi.expcmdsn": pdu.expcmdsn,
                "iscsi.maxcmdsn": pdu.maxcmdsn,
            }
        case ScsiCommand() | ScsiResponse():  # around them: the task they belong to
            return {"iscsi.initiatortasktag": pdu.itt}
    raise AssertionError(f"no {type(pdu).__name__} in the task vectors")


def test_tshark_reads_the_task_pdu_vectors(tmp_path: Path) -> None:
    """The pcap next to task_pdus.json holds exactly its PDUs, one per frame; the installed
    tshark finds nothing malformed or worth a warning in it and reads every field we decode
    (tests/test_golden.py compares the reading stored at build time)."""
    require_tool("tshark", "tshark")
    document = json.loads(TASK_VECTORS.with_suffix(".json").read_text())
    records = document["pdus"]
    pcap = TASK_VECTORS.with_suffix(".pcap")
    profile = tmp_path / "wireshark-profile"

    payloads = tshark(pcap, profile, "-T", "fields", "-e", "frame.number", "-e", "tcp.payload")
    rows = [line.split("\t") for line in payloads.strip().splitlines()]
    assert [(int(n), p.replace(":", "")) for n, p in rows] == [
        (record["frame"], record["hex"]) for record in records
    ]
    flagged = tshark(pcap, profile, "-Y", "_ws.malformed || _ws.expert.severity >= warning")
    assert flagged.strip() == ""

    frames = {frame.number: frame for frame in read_frames(tshark(pcap, profile, "-T", "pdml"))}
    finals = dict(
        line.split("\t")
        for line in tshark(
            pcap,
            profile,
            "-Y",
            "iscsi.opcode == 0x05",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "iscsi.scsidata.F",
        ).split("\n")
        if line
    )
    checked: set[type[PDU]] = set()
    for record in records:
        raw = bytes.fromhex(record["hex"])
        pdu = decode_pdu(raw)
        (seen,) = frames[record["frame"]].pdus
        assert seen.number("iscsi.opcode") == raw[0] & 0x3F
        for name, value in _expected_fields(pdu).items():
            assert seen.number(name) == value, (record["frame"], name)
        if isinstance(pdu, TaskManagementRequest):
            assert seen.byte("iscsi.taskmanfun.function") == 0x80 | pdu.function
        if isinstance(pdu, ScsiDataOut):
            assert finals[str(record["frame"])] == str(int(pdu.final))
        checked.add(type(pdu))
    assert {ScsiDataOut, R2T, TaskManagementRequest, TaskManagementResponse} <= checked


# --------------------------------------------------------------------------------------------
# real peers' writes and task management, through our codec

WRITE_IQN = "iqn.2026-12.test.pyiscsi:tshark-writes"
TASK_IQN = "iqn.2026-12.test.pyiscsi:tshark-tasks"
TEST_CU_TIMEOUT = 60.0


def split_pdus(pcap: Path, config_dir: Path) -> dict[tuple[int, bool], list[bytes]]:
    """Each TCP direction's payload cut into PDUs by their BHS lengths (no digests in use),
    keyed by (tcp.stream, sent to the target)."""
    rows = tshark(
        pcap,
        config_dir,
        "-Y",
        "tcp.len > 0",
        "-T",
        "fields",
        *("-e", "tcp.stream", "-e", "tcp.dstport", "-e", "tcp.seq_raw", "-e", "tcp.len"),
        *("-e", "tcp.payload"),
    )
    streams: dict[tuple[int, bool], bytearray] = {}
    next_seq: dict[tuple[int, bool], int] = {}
    for row in rows.splitlines():
        stream, dstport, seq, segment, payload = row.split("\t")
        key = (int(stream), int(dstport) == ISCSI_PORT)
        assert next_seq.get(key, int(seq)) == int(seq), f"stream {key}: a gap or a retransmission"
        next_seq[key] = (int(seq) + int(segment)) % 2**32
        streams.setdefault(key, bytearray()).extend(bytes.fromhex(payload.replace(":", "")))
    out: dict[tuple[int, bool], list[bytes]] = {}
    for key, data in streams.items():
        pdus = out[key] = []
        offset = 0
        while offset < len(data):
            data_length = int.from_bytes(data[offset + 5 : offset + 8], "big")
            length = 48 + data[offset + 4] * 4 + data_length + -data_length % 4
            pdus.append(bytes(data[offset : offset + length]))
            offset += length
        assert offset == len(data), f"stream {key}: the last PDU is cut short"
    return out


def run_test_cu(suite: str, url: str) -> None:
    """One libiscsi conformance test, which must run and pass (CUnit exits 0 either way)."""
    binary = require_tool("iscsi-test-cu", "libiscsi-bin")
    done = subprocess.run(
        [binary, "--dataloss", "-i", INITIATOR, "-t", suite, url],
        capture_output=True,
        text=True,
        timeout=TEST_CU_TIMEOUT,
        check=False,
    )
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", done.stdout)
    assert done.returncode == 0 and summary is not None, done.stdout[-2000:]
    assert summary.groups() == ("1", "1", "1", "0"), done.stdout[-2000:]


def test_real_writes_and_task_management_go_through_our_codec(
    tgtd_factory: TgtdStarter, tmp_path: Path
) -> None:
    """libiscsi's iscsi-test-cu against tgtd: writes with unsolicited Data-Out (InitialR2T=No,
    no immediate data, a 4 KiB FirstBurstLength) and the rest asked for by R2T, and an ABORT
    TASK. Every PDU either side sent decodes with our codec and re-encodes to the same bytes;
    the R2Ts are answered as RFC 7143 11.8 says; tshark finds nothing malformed."""
    require_tool("tshark", "tshark")
    require_tool("dumpcap", "tshark")
    tgtd = tgtd_factory(port=ISCSI_PORT)
    tgtd.add_target(1, WRITE_IQN, luns=1, size_mb=8)
    tgtd.allow(1)
    for name, value in (
        ("InitialR2T", "No"),
        ("ImmediateData", "No"),
        ("FirstBurstLength", "4096"),
    ):
        tgtd.set_param(1, name, value)
    tgtd.add_target(2, TASK_IQN, luns=1, size_mb=8)
    tgtd.allow(2)
    portal = iscsi_url(tgtd.host, tgtd.port)
    pcap = tmp_path / "tasks.pcapng"
    with capturing(pcap, tgtd.host):
        run_test_cu("iSCSI.iSCSIResiduals.Write10Residuals", f"{portal}/{WRITE_IQN}/1")
        run_test_cu("iSCSI.iSCSITMF.AbortTaskSimpleAsync", f"{portal}/{TASK_IQN}/1")

    profile = tmp_path / "wireshark-profile"
    pdus: list[PDU] = []
    for (stream, to_target), raws in sorted(split_pdus(pcap, profile).items()):
        for index, raw in enumerate(raws):
            pdu = decode_pdu(raw)
            assert encode_pdu(pdu) == raw, (stream, to_target, index, type(pdu).__name__)
            pdus.append(pdu)
    data_outs = [p for p in pdus if isinstance(p, ScsiDataOut)]
    r2ts = [p for p in pdus if isinstance(p, R2T)]
    assert any(d.ttt == RESERVED_TAG for d in data_outs)  # unsolicited
    assert r2ts
    for r2t in r2ts:
        # The Data-Outs that answer carry the R2T's TTT and LUN and bring exactly what it
        # asked for, from its offset on, the last one with F.
        answer = [d for d in data_outs if (d.itt, d.ttt) == (r2t.itt, r2t.ttt)]
        assert answer and all(d.lun == r2t.lun for d in answer)
        assert answer[0].buffer_offset == r2t.buffer_offset and answer[-1].final
        assert sum(len(d.data) for d in answer) == r2t.desired_length
    requests = [p for p in pdus if isinstance(p, TaskManagementRequest)]
    responses = [p for p in pdus if isinstance(p, TaskManagementResponse)]
    assert [r.function for r in requests] == [TaskFunction.ABORT_TASK]
    assert [r.itt for r in responses] == [r.itt for r in requests]
    (abort,) = requests
    assert abort.immediate and abort.referenced_task_tag != RESERVED_TAG
    # TCP's notes are not the peers' doing, and tshark's SCSI layer does not know one of the
    # mode pages tgt returns to MODE SENSE ("Unknown Page"): SCSI data, not an iSCSI field.
    flagged = tshark(
        pcap,
        profile,
        "-Y",
        "_ws.malformed || (_ws.expert.severity >= warning && !tcp.analysis.flags"
        ' && !(_ws.expert.message == "Unknown Page"))',
    )
    assert flagged.strip() == ""
