"""Capture golden iSCSI PDUs from real peers: libiscsi's tools talking to tgt's tgtd.

Run as root from the repository root (needs tgt, libiscsi-bin, tshark; dumpcap captures on lo):

    /work/venv/bin/python tests/vectors/capture.py [--out tests/vectors] [--only SCENARIO ...]

``--only`` re-captures the named scenarios and leaves the others' files as they are.

Each scenario starts its own tgtd(s) on fresh loopback addresses (``tests/peers.py``), captures
loopback traffic with dumpcap, then reads the capture twice with tshark: once for the raw TCP
payload of each direction (split into PDUs by their BHS lengths, here without digests), once for
tshark's own decoding of each PDU. Both readings are checked against each other (same count,
opcode and DataSegmentLength per direction) before anything is written. Output: one JSON file and
one pcapng per scenario, and ``provenance.json`` (versions, date, commands).

The ``tgt_probes`` scenario is different: its requests are built by hand below with ``struct``
(independent of the package under test) to learn what tgt answers to CHAP_A offers libiscsi never
makes and to a SendTargets answer larger than a small MaxRecvDataSegmentLength. Only its
responses are a real peer's bytes. Every address used is on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import Tgtd, iscsi_ls, iscsi_url, parse_iscsi_ls, require_tool

BHS = 48
INITIATOR = "iqn.2024-01.test.pyiscsi:golden-initiator"
IQN = "iqn.2024-01.test.pyiscsi:"
#: Test-only CHAP credentials (also stated in README.md). Never used outside these captures.
CHAP_USER = "golden-user"
CHAP_SECRET = "golden-secret-0123"
WRONG_SECRET = "not-the-secret-99"
#: Opcodes pyiscsi-failover models (others would be counted, not stored). Captures made before
#: the SCSI opcodes 0x01/0x21/0x25 joined counted the SCSI traffic of ``iscsi-ls -s`` only.
MODELED = {0x00, 0x01, 0x03, 0x04, 0x06, 0x20, 0x21, 0x23, 0x24, 0x25, 0x26, 0x3F}
SPARSE = "<sparse 1 MiB file>"
PROBE_UDP_PORT = 9  # discard: nothing answers; only used to see that dumpcap is capturing


# --------------------------------------------------------------------------------------------
# capturing


@contextlib.contextmanager
def capturing(pcap: Path, hosts: list[str], port: int) -> Iterator[None]:
    """dumpcap on lo for these hosts' iSCSI port, known to be capturing before and after."""
    dumpcap = require_tool("dumpcap", "tshark")
    host_filter = " or ".join(f"host {host}" for host in hosts)
    bpf = f"({host_filter}) and (tcp port {port} or udp port {PROBE_UDP_PORT})"
    process = subprocess.Popen(
        [dumpcap, "-q", "-i", "lo", "-f", bpf, "-w", str(pcap)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_marker(process, pcap, hosts[0], b"capture-start-" + os.urandom(8).hex().encode())
        yield
        # Packets reach the file in order: once a marker sent after the last PDU is in it, so
        # is every PDU before it.
        _wait_for_marker(process, pcap, hosts[0], b"capture-end-" + os.urandom(8).hex().encode())
    finally:
        if process.poll() is None:
            process.terminate()
        _, err = process.communicate(timeout=10)
        if process.returncode not in (0, -15):
            raise RuntimeError(f"dumpcap failed: {err.decode(errors='replace')}")


def _wait_for_marker(
    process: subprocess.Popen[bytes], pcap: Path, host: str, marker: bytes
) -> None:
    # dumpcap says "Capturing on" before packets really flow and flushes its file about twice
    # a second, so readiness is: a UDP datagram we sent is in the file (pcapng keeps packet
    # bytes verbatim). Nothing listens on the discard port; the datagram only has to be seen.
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("dumpcap exited early (are we root?)")
            probe.sendto(marker, (host, PROBE_UDP_PORT))
            if pcap.exists() and marker in pcap.read_bytes():
                return
            time.sleep(0.05)
    raise RuntimeError(f"dumpcap did not capture {marker!r} within 10 s")


# --------------------------------------------------------------------------------------------
# reading a capture


def _tshark(pcap: Path, *args: str) -> str:
    tshark = require_tool("tshark", "tshark")
    done = subprocess.run(
        [tshark, "-r", str(pcap), *args], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


@dataclass
class _Direction:
    stream: int
    sender: str  # "initiator" or "target"
    data: bytearray = field(default_factory=bytearray)
    next_seq: int | None = None
    # (offset in data where a frame's payload starts, frame number)
    frames: list[tuple[int, int]] = field(default_factory=list)


def _pdu_length(bhs: bytes) -> int:
    ahs = bhs[4] * 4
    data = int.from_bytes(bhs[5:8], "big")
    return BHS + ahs + data + (-data % 4)


def _flatten(node: Any, out: dict[str, Any]) -> None:
    """tshark's JSON tree of one iSCSI PDU to {field: value or [values]} for iscsi/scsi fields."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (dict, list)) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                _flatten(value, out)
            elif key.startswith(("iscsi.", "scsi.lun")) and key not in ("iscsi.time",):
                if key in out:
                    previous = out[key] if isinstance(out[key], list) else [out[key]]
                    out[key] = previous + (value if isinstance(value, list) else [value])
                else:
                    out[key] = value
    elif isinstance(node, list):
        for item in node:
            _flatten(item, out)


def read_capture(pcap: Path, portals: set[tuple[str, int]]) -> dict[str, Any]:
    """Split each TCP direction into PDUs and pair each with tshark's decoding of it."""
    directions: dict[tuple[int, str], _Direction] = {}
    endpoints: dict[int, dict[str, str]] = {}
    fields = ["frame.number", "tcp.stream", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport"]
    fields += ["tcp.seq_raw", "tcp.len", "tcp.payload"]
    table = _tshark(pcap, "-Y", "tcp", "-T", "fields", *[a for f in fields for a in ("-e", f)])
    for line in table.splitlines():
        frame_text, stream, src, sport, _dst, _dport, seq, seg_length, payload = [
            *line.split("\t"),
            "",
        ][:9]
        from_target = (src, int(sport)) in portals
        sender = "target" if from_target else "initiator"
        key = (int(stream), sender)
        direction = directions.setdefault(key, _Direction(stream=int(stream), sender=sender))
        endpoints.setdefault(int(stream), {})[sender] = f"{src}:{sport}"
        if int(seg_length) == 0:
            continue
        if direction.next_seq is not None and int(seq) != direction.next_seq:
            raise RuntimeError(
                f"frame_text {frame_text}: TCP sequence gap or retransmission on loopback"
            )
        direction.next_seq = (int(seq) + int(seg_length)) % 2**32
        direction.frames.append((len(direction.data), int(frame_text)))
        direction.data += bytes.fromhex(payload.replace(":", ""))

    decoded = json.loads(
        _tshark(
            pcap, "-Y", "iscsi", "-T", "json", "--no-duplicate-keys", "-J", "frame ip tcp iscsi"
        )
    )
    by_direction: dict[tuple[int, str], list[tuple[int, dict[str, Any]]]] = {}
    for packet in decoded:
        layers = packet["_source"]["layers"]
        frame_number = int(layers["frame"]["frame.number"])
        stream_number = int(layers["tcp"]["tcp.stream"])
        source = layers["ip"]["ip.src"]
        source_port = int(layers["tcp"]["tcp.srcport"])
        sender = "target" if (source, source_port) in portals else "initiator"
        pdus = layers["iscsi"] if isinstance(layers["iscsi"], list) else [layers["iscsi"]]
        for pdu in pdus:
            flat: dict[str, Any] = {}
            _flatten(pdu, flat)
            if "iscsi.keyvalue" in flat and isinstance(flat["iscsi.keyvalue"], str):
                flat["iscsi.keyvalue"] = [flat["iscsi.keyvalue"]]
            by_direction.setdefault((stream_number, sender), []).append((frame_number, flat))

    records: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for key, direction in sorted(directions.items()):
        raw = bytes(direction.data)
        split: list[tuple[int, bytes]] = []  # (frame the PDU ends in, bytes)
        offset = 0
        while offset < len(raw):
            if len(raw) - offset < BHS:
                raise RuntimeError(f"stream {key}: {len(raw) - offset} stray bytes at the end")
            length = _pdu_length(raw[offset : offset + BHS])
            if len(raw) - offset < length:
                raise RuntimeError(f"stream {key}: truncated PDU at the end of the capture")
            ends_in = max(f for start, f in direction.frames if start <= offset + length - 1)
            split.append((ends_in, raw[offset : offset + length]))
            offset += length
        # tshark shows a PDU in the frame where it ends; pair PDUs and readings frame by frame.
        readings: dict[int, list[dict[str, Any]]] = {}
        for frame_number, one in by_direction.get(key, []):
            readings.setdefault(frame_number, []).append(one)
        ends = {frame_number for frame_number, _ in split}
        if stray := set(readings) - ends:
            raise RuntimeError(
                f"stream {key}: tshark saw PDUs in frames {stray} but none end there"
            )
        for index, (frame_number, pdu) in enumerate(split):
            in_frame = [p for f, p in split if f == frame_number]
            seen = readings.get(frame_number, [])
            reading: dict[str, Any] | None = None
            if seen:
                if len(seen) != len(in_frame):
                    raise RuntimeError(f"stream {key} frame {frame_number}: PDU counts differ")
                reading = seen[in_frame.index(pdu)]
                if int(reading["iscsi.opcode"], 16) != pdu[0] & 0x3F or int(
                    reading["iscsi.datasegmentlength"]
                ) != int.from_bytes(pdu[5:8], "big"):
                    raise RuntimeError(f"stream {key} PDU {index}: tshark and the bytes disagree")
            opcode = pdu[0] & 0x3F
            if opcode not in MODELED:
                skipped[f"0x{opcode:02x}"] = skipped.get(f"0x{opcode:02x}", 0) + 1
                continue
            record: dict[str, Any] = {
                "session": direction.stream,
                "sender": direction.sender,
                "frame": frame_number,
                "index_in_direction": index,
                "hex": pdu.hex(),
                "tshark": reading,
            }
            if reading is None:
                record["tshark_note"] = "tshark did not dissect this PDU as iSCSI"
            records.append(record)
    records.sort(key=lambda r: (r["frame"], r["session"], r["index_in_direction"]))
    # Renumber sessions 0.. in order of appearance, so re-captures diff cleanly.
    renumber: dict[int, int] = {}
    for record in records:
        record["session"] = renumber.setdefault(record["session"], len(renumber))
    sessions = [
        {"session": new, **endpoints[old]}
        for old, new in sorted(renumber.items(), key=lambda item: item[1])
    ]
    return {"sessions": sessions, "pdus": records, "skipped_scsi_pdus_by_opcode": skipped}


# --------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    name: str
    description: str
    commands: list[str] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    #: Who built the initiator's PDUs; the target's are always tgtd's own bytes.
    requests_from: str = "libiscsi's iscsi-ls (a real C initiator)"


def _run_ls(scenario: Scenario, *args: str, shown: list[str] | None = None) -> None:
    rc, out, err = iscsi_ls(*args)
    scenario.commands.append(shlex.join(["iscsi-ls", *(shown or args)]))
    scenario.outputs.append({"exit_status": rc, "stdout": out, "stderr": err})


def _tgtd_setup_commands(daemon: Tgtd, lines: list[str]) -> list[str]:
    prefix = f"tgtadm -C {daemon.control_port} --lld iscsi"
    return [
        f"tgtd -f -C {daemon.control_port} --iscsi portal={daemon.portal}",
        *[f"{prefix} {line}" for line in lines],
    ]


def scenario_discovery(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="discovery",
        description=(
            "Discovery session without authentication: Login Request/Response (libiscsi goes "
            "straight to LoginOperationalNegotiation with T=1, NSG=3), Text Request "
            "SendTargets=All answered with three targets, Logout Request/Response."
        ),
    )
    pcap = workdir / "discovery.pcapng"
    with Tgtd() as daemon:
        setup = []
        for tid, (name, luns) in enumerate((("alpha", 2), ("beta", 1), ("gamma", 0)), start=1):
            daemon.add_target(tid, IQN + name, luns=luns)
            daemon.allow(tid)
            setup.append(f"--op new --mode target --tid {tid} --targetname {IQN}{name}")
            setup += [
                f"--op new --mode logicalunit --tid {tid} --lun {lun} --backing-store {SPARSE}"
                for lun in range(1, luns + 1)
            ]
            setup.append(f"--op bind --mode target --tid {tid} -I ALL")
        scenario.commands += _tgtd_setup_commands(daemon, setup)
        with capturing(pcap, [daemon.host], daemon.port):
            _run_ls(scenario, "-i", INITIATOR, iscsi_url(daemon.host, daemon.port))
        listed = parse_iscsi_ls(scenario.outputs[-1]["stdout"])
        assert {t.name for t in listed} == {IQN + n for n in ("alpha", "beta", "gamma")}, listed
        return scenario, pcap, {(daemon.host, daemon.port)}


def scenario_chap(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="chap_login",
        description=(
            "iscsi-ls -s with CHAP credentials in the URL against a target requiring one-way "
            "CHAP: a discovery session (AuthMethod=CHAP,None offered, tgt picks None), then a "
            "Normal session: SecurityNegotiation with AuthMethod=CHAP, CHAP_A=5, "
            "CHAP_I/CHAP_C from tgt, CHAP_N/CHAP_R, then operational negotiation to full "
            "feature phase, SCSI commands (not stored) and Logout Request/Response."
        ),
    )
    pcap = workdir / "chap_login.pcapng"
    with Tgtd() as daemon:
        daemon.add_target(1, IQN + "secure", luns=1)
        daemon.allow(1)
        daemon.add_account(CHAP_USER, CHAP_SECRET)
        daemon.bind_account(1, CHAP_USER)
        scenario.commands += _tgtd_setup_commands(
            daemon,
            [
                f"--op new --mode target --tid 1 --targetname {IQN}secure",
                "--op new --mode logicalunit --tid 1 --lun 1 --backing-store " + SPARSE,
                "--op bind --mode target --tid 1 -I ALL",
                f"--op new --mode account --user {CHAP_USER} --password {CHAP_SECRET}",
                f"--op bind --mode account --tid 1 --user {CHAP_USER}",
            ],
        )
        url = iscsi_url(daemon.host, daemon.port, user=CHAP_USER, password=CHAP_SECRET)
        with capturing(pcap, [daemon.host], daemon.port):
            _run_ls(scenario, "-i", INITIATOR, "-s", url)
        assert scenario.outputs[-1]["exit_status"] == 0, scenario.outputs[-1]
        return scenario, pcap, {(daemon.host, daemon.port)}


def scenario_auth_failure(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="auth_failure",
        description=(
            "Normal logins to a CHAP target that fail with status 0x0201: first with no "
            "credentials (libiscsi then offers no AuthMethod and starts in "
            "LoginOperationalNegotiation), then with a wrong secret (after a full CHAP "
            "exchange). Each preceded by its discovery session."
        ),
    )
    pcap = workdir / "auth_failure.pcapng"
    with Tgtd() as daemon:
        daemon.add_target(1, IQN + "secure", luns=1)
        daemon.allow(1)
        daemon.add_account(CHAP_USER, CHAP_SECRET)
        daemon.bind_account(1, CHAP_USER)
        scenario.commands += _tgtd_setup_commands(
            daemon,
            [
                f"--op new --mode target --tid 1 --targetname {IQN}secure",
                "--op new --mode logicalunit --tid 1 --lun 1 --backing-store " + SPARSE,
                "--op bind --mode target --tid 1 -I ALL",
                f"--op new --mode account --user {CHAP_USER} --password {CHAP_SECRET}",
                f"--op bind --mode account --tid 1 --user {CHAP_USER}",
            ],
        )
        with capturing(pcap, [daemon.host], daemon.port):
            _run_ls(scenario, "-i", INITIATOR, "-s", iscsi_url(daemon.host, daemon.port))
            wrong = iscsi_url(daemon.host, daemon.port, user=CHAP_USER, password=WRONG_SECRET)
            _run_ls(scenario, "-i", INITIATOR, "-s", wrong)
        assert all(o["exit_status"] != 0 for o in scenario.outputs), scenario.outputs
        return scenario, pcap, {(daemon.host, daemon.port)}


def scenario_redirect(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="redirect",
        description=(
            "Target 'moved' on portal A is redirected by tgt (RedirectAddress/RedirectPort/"
            "RedirectReason) to portal B where a target of the same name lives. With "
            "RedirectReason=Temporary tgt answers the Normal login with status 0x0101 and "
            "TargetAddress=<B>:<port>; iscsi-ls follows it and logs in to B. With Permanent "
            "it answers 0x0102 and iscsi-ls gives up."
        ),
    )
    pcap = workdir / "redirect.pcapng"
    with Tgtd() as front, Tgtd() as back:
        for daemon in (front, back):
            daemon.add_target(1, IQN + "moved", luns=1)
            daemon.allow(1)
        front.redirect(1, back.host, back.port, "Temporary")
        common = [
            f"--op new --mode target --tid 1 --targetname {IQN}moved",
            "--op new --mode logicalunit --tid 1 --lun 1 --backing-store " + SPARSE,
            "--op bind --mode target --tid 1 -I ALL",
        ]
        scenario.commands += _tgtd_setup_commands(back, common)
        scenario.commands += _tgtd_setup_commands(
            front,
            [
                *common,
                f"--op update --mode target --tid 1 -n RedirectAddress -v {back.host}",
                f"--op update --mode target --tid 1 -n RedirectPort -v {back.port}",
                "--op update --mode target --tid 1 -n RedirectReason -v Temporary",
            ],
        )
        portals = {(front.host, front.port), (back.host, back.port)}
        with capturing(pcap, [front.host, back.host], front.port):
            _run_ls(scenario, "-i", INITIATOR, "-s", iscsi_url(front.host, front.port))
            front.set_param(1, "RedirectReason", "Permanent")
            scenario.commands.append(
                f"tgtadm -C {front.control_port} --lld iscsi --op update --mode target "
                "--tid 1 -n RedirectReason -v Permanent"
            )
            _run_ls(scenario, "-i", INITIATOR, "-s", iscsi_url(front.host, front.port))
        assert scenario.outputs[0]["exit_status"] == 0, scenario.outputs
        assert scenario.outputs[1]["exit_status"] != 0, scenario.outputs
        return scenario, pcap, portals


def _run_tool(scenario: Scenario, tool: str, *args: str) -> None:
    """Run one libiscsi tool (iscsi-inq, iscsi-readcapacity16...) and record it."""
    binary = require_tool(tool, "libiscsi-bin")
    done = subprocess.run(
        [binary, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    scenario.commands.append(shlex.join([tool, *args]))
    scenario.outputs.append(
        {"exit_status": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
    )


def scenario_scsi(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="scsi",
        requests_from="libiscsi's iscsi-inq, iscsi-readcapacity16 and iscsi-ls (real C tools)",
        description=(
            "SCSI over Normal sessions, one per tool run, against a target with disk LUNs 1 "
            "and 2 (tgt adds the controller LUN 0): standard INQUIRY and VPD 0x00/0x80/0x83 of "
            "LUN 1, READ CAPACITY(16), iscsi-ls -s (REPORT LUNS and INQUIRY per LUN), and "
            "INQUIRY and READ CAPACITY(16) of LUN 5, which does not exist. libiscsi's connect "
            "sends TEST UNIT READY until the UNIT ATTENTION tgt queues at login is consumed, "
            "so the sessions show CHECK CONDITION with sense (06/29/00), Data-In with status "
            "and underflow residuals, and SCSI Responses."
        ),
    )
    pcap = workdir / "scsi.pcapng"
    with Tgtd() as daemon:
        target = IQN + "disk"
        daemon.add_target(1, target, luns=2)
        daemon.allow(1)
        scenario.commands += _tgtd_setup_commands(
            daemon,
            [
                f"--op new --mode target --tid 1 --targetname {target}",
                f"--op new --mode logicalunit --tid 1 --lun 1 --backing-store {SPARSE}",
                f"--op new --mode logicalunit --tid 1 --lun 2 --backing-store {SPARSE}",
                "--op bind --mode target --tid 1 -I ALL",
            ],
        )
        portal = iscsi_url(daemon.host, daemon.port)
        lun1, lun5 = f"{portal}/{target}/1", f"{portal}/{target}/5"
        with capturing(pcap, [daemon.host], daemon.port):
            _run_tool(scenario, "iscsi-inq", "-i", INITIATOR, lun1)
            for page in ("0x00", "0x80", "0x83"):
                _run_tool(scenario, "iscsi-inq", "-i", INITIATOR, "-e", "1", "-c", page, lun1)
            _run_tool(scenario, "iscsi-readcapacity16", "-i", INITIATOR, lun1)
            _run_ls(scenario, "-i", INITIATOR, "-s", portal)
            _run_tool(scenario, "iscsi-inq", "-i", INITIATOR, lun5)
            _run_tool(scenario, "iscsi-readcapacity16", "-i", INITIATOR, lun5)
        assert all(o["exit_status"] == 0 for o in scenario.outputs[:6]), scenario.outputs
        return scenario, pcap, {(daemon.host, daemon.port)}


# -- hand-built requests for tgt_probes -------------------------------------------------------


def _text(*pairs: str) -> bytes:
    return b"".join(pair.encode() + b"\0" for pair in pairs)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def login_request(
    *,
    transit: bool,
    csg: int,
    nsg: int,
    isid: bytes,
    itt: int,
    cmdsn: int,
    expstatsn: int,
    data: bytes,
) -> bytes:
    flags = (0x80 if transit else 0) | csg << 2 | (nsg if transit else 0)
    header = struct.pack(
        ">BBBBB3s6sHIHHII16x",
        0x40 | 0x03,  # I=1, Login Request
        flags,
        0,  # Version-max
        0,  # Version-min
        0,  # TotalAHSLength
        len(data).to_bytes(3, "big"),
        isid,
        0,  # TSIH
        itt,
        0,  # CID
        0,  # reserved
        cmdsn,
        expstatsn,
    )
    return header + _padded(data)


def text_request(*, itt: int, ttt: int, cmdsn: int, expstatsn: int, data: bytes) -> bytes:
    header = struct.pack(
        ">BBHB3sQIIII16x",
        0x04,  # Text Request, not immediate
        0x80,  # F=1
        0,
        0,
        len(data).to_bytes(3, "big"),
        0,  # LUN
        itt,
        ttt,
        cmdsn,
        expstatsn,
    )
    return header + _padded(data)


def logout_request(*, itt: int, cmdsn: int, expstatsn: int) -> bytes:
    return struct.pack(
        ">BBHB3s8sIHHII16x", 0x46, 0x80, 0, 0, b"\0\0\0", bytes(8), itt, 0, 0, cmdsn, expstatsn
    )


def _receive_pdu(sock: socket.socket) -> bytes:
    def exactly(count: int) -> bytes:
        chunks = b""
        while len(chunks) < count:
            chunk = sock.recv(count - len(chunks))
            if not chunk:
                raise RuntimeError("tgtd closed the connection")
            chunks += chunk
        return chunks

    bhs = exactly(BHS)
    return bhs + exactly(_pdu_length(bhs) - BHS)


def _keys(pdu: bytes) -> list[str]:
    length = int.from_bytes(pdu[5:8], "big")
    data = pdu[BHS : BHS + length]
    return [item.decode() for item in data.split(b"\0") if item]


def _login(
    sock: socket.socket,
    *,
    transit: bool,
    csg: int,
    nsg: int,
    isid: bytes,
    itt: int,
    cmdsn: int,
    expstatsn: int,
    data: bytes,
) -> bytes:
    sock.sendall(
        login_request(
            transit=transit,
            csg=csg,
            nsg=nsg,
            isid=isid,
            itt=itt,
            cmdsn=cmdsn,
            expstatsn=expstatsn,
            data=data,
        )
    )
    return _receive_pdu(sock)


def probe_chap_algorithm(
    host: str, port: int, target: str, offer: str, isid: bytes, answer_with: str | None
) -> dict[str, Any]:
    """Offer ``CHAP_A=<offer>``; if ``answer_with`` names a hashlib digest, answer with it.

    Reports the algorithm tgt chose, its challenge length and, when answered, the status of
    the Login Response to CHAP_N/CHAP_R (0x0000: tgt computed the same digest).
    """
    result: dict[str, Any] = {"offered": offer, "answered_with": answer_with}
    with socket.create_connection((host, port), timeout=5) as sock:
        first = _text(
            f"InitiatorName={INITIATOR}",
            "SessionType=Normal",
            f"TargetName={target}",
            "AuthMethod=CHAP",
        )
        answer = _login(
            sock, transit=True, csg=0, nsg=1, expstatsn=0, data=first, isid=isid, itt=1, cmdsn=1
        )
        statsn = int.from_bytes(answer[24:28], "big")
        try:
            reply = _login(
                sock,
                transit=False,
                csg=0,
                nsg=0,
                expstatsn=statsn + 1,
                data=_text(f"CHAP_A={offer}"),
                isid=isid,
                itt=1,
                cmdsn=1,
            )
        except (RuntimeError, OSError) as exc:
            result["answer"] = f"no Login Response: {exc}"
            return result
        keys = dict(item.split("=", 1) for item in _keys(reply))
        challenge = keys.get("CHAP_C", "")
        result["status"] = f"0x{reply[36]:02x}{reply[37]:02x}"
        result["answer"] = _keys(reply)
        result["challenge_bytes"] = len(bytes.fromhex(challenge[2:])) if challenge else None
        if answer_with is None or not challenge:
            return result
        statsn = int.from_bytes(reply[24:28], "big")
        digest = hashlib.new(
            answer_with,
            bytes([int(keys["CHAP_I"])]) + CHAP_SECRET.encode() + bytes.fromhex(challenge[2:]),
        ).hexdigest()
        final = _login(
            sock,
            transit=True,
            csg=0,
            nsg=1,
            expstatsn=statsn + 1,
            data=_text(f"CHAP_N={CHAP_USER}", f"CHAP_R=0x{digest}"),
            isid=isid,
            itt=1,
            cmdsn=1,
        )
        result["status_after_chap_r"] = f"0x{final[36]:02x}{final[37]:02x}"
    return result


def probe_text_continuation(host: str, port: int, isid: bytes) -> dict[str, Any]:
    """Discovery with MaxRecvDataSegmentLength=512, then SendTargets=All, following TTTs."""
    exchange: list[dict[str, Any]] = []
    with socket.create_connection((host, port), timeout=5) as sock:
        login = _text(
            f"InitiatorName={INITIATOR}",
            "SessionType=Discovery",
            "HeaderDigest=None",
            "DataDigest=None",
            "MaxRecvDataSegmentLength=512",
        )
        sock.sendall(
            login_request(
                transit=True, csg=1, nsg=3, isid=isid, itt=0x10, cmdsn=7, expstatsn=0, data=login
            )
        )
        answer = _receive_pdu(sock)
        if answer[36:38] != b"\0\0" or not answer[1] & 0x80 or answer[1] & 0x03 != 3:
            raise RuntimeError(f"probe discovery login refused: {answer[:48].hex()}")
        statsn = int.from_bytes(answer[24:28], "big")
        ttt, data, itt = 0xFFFFFFFF, _text("SendTargets=All"), 0x11
        for _round in range(32):
            sock.sendall(text_request(itt=itt, ttt=ttt, cmdsn=7, expstatsn=statsn + 1, data=data))
            reply = _receive_pdu(sock)
            statsn = int.from_bytes(reply[24:28], "big")
            final, cont = bool(reply[1] & 0x80), bool(reply[1] & 0x40)
            ttt = int.from_bytes(reply[20:24], "big")
            exchange.append(
                {
                    "F": final,
                    "C": cont,
                    "TTT": f"0x{ttt:08x}",
                    "DataSegmentLength": int.from_bytes(reply[5:8], "big"),
                }
            )
            if final:
                break
            data = b""  # an empty Text Request with the target's TTT asks for more
        sock.sendall(logout_request(itt=0x12, cmdsn=7, expstatsn=statsn + 1))
        _receive_pdu(sock)
    return {"rounds": exchange}


def scenario_tgt_probes(workdir: Path) -> tuple[Scenario, Path, set[tuple[str, int]]]:
    scenario = Scenario(
        name="tgt_probes",
        requests_from="capture.py, hand-built with struct (not a real initiator)",
        description=(
            "Requests hand-built by capture.py (not a real initiator; only the responses are "
            "tgt's bytes): CHAP_A offers libiscsi never makes (6, 7, 8 and the list 7,5), some "
            "answered with a CHAP_R computed with MD5, SHA-1 or SHA-256 to learn which digest "
            "tgt means, and a discovery session declaring "
            "MaxRecvDataSegmentLength=512 whose SendTargets=All answer (eight long target "
            "names) does not fit in one PDU, continued with empty Text Requests that echo "
            "the target's TTT."
        ),
    )
    pcap = workdir / "tgt_probes.pcapng"
    with Tgtd() as daemon:
        setup = []
        for tid in range(1, 9):
            name = f"{IQN}continuation-{tid:02d}-" + "long" * 20
            daemon.add_target(tid, name, luns=0)
            daemon.allow(tid)
            setup += [
                f"--op new --mode target --tid {tid} --targetname {name}",
                f"--op bind --mode target --tid {tid} -I ALL",
            ]
        daemon.add_account(CHAP_USER, CHAP_SECRET)
        daemon.bind_account(1, CHAP_USER)
        setup += [
            f"--op new --mode account --user {CHAP_USER} --password {CHAP_SECRET}",
            f"--op bind --mode account --tid 1 --user {CHAP_USER}",
        ]
        scenario.commands += _tgtd_setup_commands(daemon, setup)
        target = f"{IQN}continuation-01-" + "long" * 20
        results: dict[str, Any] = {"chap_algorithms": []}
        with capturing(pcap, [daemon.host], daemon.port):
            offers = (
                ("5", "md5"),
                ("5", "sha1"),
                ("6", None),
                ("7", "sha1"),
                ("7", "sha256"),
                ("8", None),
                ("7,5", None),
            )
            for number, (offer, answer_with) in enumerate(offers, start=1):
                isid = bytes([0x80, 0x12, 0x34, 0x56, 0x00, number])
                results["chap_algorithms"].append(
                    probe_chap_algorithm(daemon.host, daemon.port, target, offer, isid, answer_with)
                )
            results["text_continuation"] = probe_text_continuation(
                daemon.host, daemon.port, bytes([0x80, 0x12, 0x34, 0x56, 0x01, 0x00])
            )
        scenario.commands.append("capture.py probe_chap_algorithm / probe_text_continuation")
        scenario.outputs.append(results)
        return scenario, pcap, {(daemon.host, daemon.port)}


# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("tgt", "libiscsi-bin", "libiscsi7", "tshark", "libwireshark16"):
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            versions[package] = done.stdout.strip()
    versions["kernel"] = platform.release()
    versions["python"] = platform.python_version()
    return versions


SCENARIOS = (
    scenario_discovery,
    scenario_chap,
    scenario_auth_failure,
    scenario_redirect,
    scenario_tgt_probes,
    scenario_scsi,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    names = [make.__name__.removeprefix("scenario_") for make in SCENARIOS]
    parser.add_argument("--only", nargs="+", choices=names, help="re-capture only these")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("capture.py must run as root (tgtd and dumpcap need it)", file=sys.stderr)
        return 2
    for binary, package in (
        ("tgtd", "tgt"),
        ("iscsi-ls", "libiscsi-bin"),
        ("tshark", "tshark"),
        ("dumpcap", "tshark"),
    ):
        require_tool(binary, package)
    captured_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    versions = _versions()
    provenance: dict[str, Any] = {
        "captured_at": captured_at,
        "versions": versions,
        "capture": "dumpcap -q -i lo -f '<hosts> and (tcp port 3260 or udp port 9)' -w <pcap>",
        "payloads": "tshark -r <pcap> -Y tcp -T fields -e frame.number -e tcp.stream -e ip.src "
        "-e tcp.srcport -e ip.dst -e tcp.dstport -e tcp.seq_raw -e tcp.len -e tcp.payload",
        "decoding": "tshark -r <pcap> -Y iscsi -T json --no-duplicate-keys -J 'frame ip tcp iscsi'",
        "scenarios": {},
    }
    chosen = [m for m in SCENARIOS if not args.only or m.__name__[9:] in args.only]
    previous = args.out / "provenance.json"
    if args.only and previous.is_file():
        # The scenarios not re-captured keep their provenance (top level); each re-captured
        # one says its own date and versions.
        provenance.update(json.loads(previous.read_text()))
    with tempfile.TemporaryDirectory(prefix="pyiscsi-capture-") as tmp:
        for make in chosen:
            scenario, pcap, portals = make(Path(tmp))
            result = read_capture(pcap, portals)
            document = {
                "scenario": scenario.name,
                "description": scenario.description,
                "requests_from": scenario.requests_from,
                "captured_at": captured_at,
                "versions": versions,
                "commands": scenario.commands,
                "tool_output": scenario.outputs,
                "chap_secrets_used": {
                    "user": CHAP_USER,
                    "secret": CHAP_SECRET,
                    "wrong_secret": WRONG_SECRET,
                },
                **result,
            }
            target = args.out / f"{scenario.name}.json"
            target.write_text(json.dumps(document, indent=1) + "\n")
            (args.out / pcap.name).write_bytes(pcap.read_bytes())
            provenance["scenarios"][scenario.name] = {
                **({"captured_at": captured_at, "versions": versions} if args.only else {}),
                "pdus": len(result["pdus"]),
                "sessions": len(result["sessions"]),
                "skipped_scsi_pdus_by_opcode": result["skipped_scsi_pdus_by_opcode"],
            }
            print(f"{target}: {len(result['pdus'])} PDUs in {len(result['sessions'])} sessions")
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
