"""Build the golden vectors of the write and task management PDUs from the RFC 7143 layouts.

Run from the repository root (needs tshark; nothing is sent on any network):

    /work/venv/bin/python tests/vectors/task_pdus.py [--out tests/vectors]

Unlike ``capture.py``'s scenarios, no real peer produced these: tgt answers task management
with only some of the response codes and libiscsi sends only some of the functions, so a
capture could not cover them all. Every PDU here is written byte by byte with ``struct`` at the
offsets of RFC 7143 11.3 (SCSI Command), 11.4 (SCSI Response), 11.5 (Task Management Function
Request), 11.6 (its Response), 11.7 (SCSI Data-Out) and 11.8 (R2T), independently of the
package under test, and listed with the model fields it must decode to. Two TCP connections
hold them as a target would see them: a WRITE(10) that sends unsolicited Data-Out and then
answers an R2T, and a session that sends every task management function, answered with every
response code. The PDUs go into a pcap (Ethernet/IPv4/TCP frames, one PDU each, from 127.0.0.2
to the target at 127.0.0.1:3260 and back), and each is paired with tshark's own decoding of its
frame, flattened as ``capture.py`` flattens the captured scenarios'.

Output: ``task_pdus.json`` (the scenario's PDUs with ``tshark`` readings, plus ``model`` and
``fields`` per PDU) and ``task_pdus.pcap``. ``tests/test_golden.py`` decodes each PDU to its
fields, re-encodes it byte for byte and checks tshark's fields against ours;
``tests/test_tshark.py`` has the installed tshark read the pcap again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capture

TARGET = ("127.0.0.1", 3260)
INITIATOR_HOST = "127.0.0.2"
RESERVED_TAG = 0xFFFFFFFF
LUN_1 = bytes.fromhex("0001000000000000")
LUN_9 = bytes.fromhex("0009000000000000")
NO_LUN = bytes(8)


@dataclass(frozen=True)
class Built:
    sender: str  # "initiator" or "target"
    model: str  # the name of the pdu.py dataclass it must decode to
    fields: dict[str, Any]  # that model's fields; bytes as hex
    raw: bytes


def _header(
    byte0: int, byte1: int, byte2: int = 0, byte3: int = 0, data_length: int = 0
) -> bytearray:
    """Bytes 0-7, common to every BHS: opcode byte, flags, two opcode-specific bytes, no AHS."""
    header = bytearray(48)
    header[0:4] = bytes([byte0, byte1, byte2, byte3])
    header[5:8] = data_length.to_bytes(3, "big")
    return header


def _u32(header: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">I", header, offset, value)


def _with_data(header: bytearray, data: bytes) -> bytes:
    return bytes(header) + data + bytes(-len(data) % 4)


def _fields(**values: Any) -> dict[str, Any]:
    return {
        key: value.hex() if isinstance(value, bytes) else value for key, value in values.items()
    }


def scsi_command(
    *, itt: int, cmdsn: int, expstatsn: int, edtl: int, cdb: bytes, final: bool
) -> Built:
    """11.3: a write (W=1, ATTR simple) of ``edtl`` bytes to LUN 1, no immediate data."""
    header = _header(0x01, (0x80 if final else 0) | 0x20 | 0x01)
    header[8:16] = LUN_1
    _u32(header, 16, itt)
    _u32(header, 20, edtl)
    _u32(header, 24, cmdsn)
    _u32(header, 28, expstatsn)
    header[32:48] = cdb + bytes(16 - len(cdb))
    fields = _fields(
        itt=itt,
        edtl=edtl,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        cdb=cdb + bytes(16 - len(cdb)),
        lun=LUN_1,
        read=False,
        write=True,
        final=final,
        attribute=1,
        immediate=False,
        data=b"",
    )
    return Built("initiator", "ScsiCommand", fields, bytes(header))


def data_out(
    *,
    itt: int,
    ttt: int,
    lun: bytes,
    expstatsn: int,
    datasn: int,
    buffer_offset: int,
    final: bool,
    data: bytes,
) -> Built:
    """11.7: bytes 24-27, 32-35 and 44-47 reserved; F alone in byte 1."""
    header = _header(0x05, 0x80 if final else 0x00, data_length=len(data))
    header[8:16] = lun
    _u32(header, 16, itt)
    _u32(header, 20, ttt)
    _u32(header, 28, expstatsn)
    _u32(header, 36, datasn)
    _u32(header, 40, buffer_offset)
    fields = _fields(
        itt=itt,
        expstatsn=expstatsn,
        datasn=datasn,
        buffer_offset=buffer_offset,
        final=final,
        ttt=ttt,
        lun=lun,
        data=data,
    )
    return Built("initiator", "ScsiDataOut", fields, _with_data(header, data))


def r2t(
    *,
    itt: int,
    ttt: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    r2tsn: int,
    buffer_offset: int,
    desired_length: int,
) -> Built:
    """11.8: byte 1 is 0x80; no data segment."""
    header = _header(0x31, 0x80)
    header[8:16] = LUN_1
    for offset, value in (
        (16, itt),
        (20, ttt),
        (24, statsn),
        (28, expcmdsn),
        (32, maxcmdsn),
        (36, r2tsn),
        (40, buffer_offset),
        (44, desired_length),
    ):
        _u32(header, offset, value)
    fields = _fields(
        itt=itt,
        ttt=ttt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        r2tsn=r2tsn,
        desired_length=desired_length,
        buffer_offset=buffer_offset,
        lun=LUN_1,
    )
    return Built("target", "R2T", fields, bytes(header))


def scsi_response(*, itt: int, statsn: int, expcmdsn: int, maxcmdsn: int) -> Built:
    """11.4: fixed bit 7, Response 0 (completed), status GOOD, no sense."""
    header = _header(0x21, 0x80)
    for offset, value in ((16, itt), (24, statsn), (28, expcmdsn), (32, maxcmdsn)):
        _u32(header, offset, value)
    fields = _fields(
        itt=itt,
        statsn=statsn,
        expcmdsn=expcmdsn,
        maxcmdsn=maxcmdsn,
        response=0,
        status=0,
        expdatasn=0,
        overflow=False,
        underflow=False,
        residual=0,
        bidi_overflow=False,
        bidi_underflow=False,
        bidi_residual=0,
        snack_tag=0,
        data=b"",
    )
    return Built("target", "ScsiResponse", fields, bytes(header))


def task_request(
    *,
    function: int,
    itt: int,
    cmdsn: int,
    expstatsn: int,
    lun: bytes = NO_LUN,
    referenced_task_tag: int = RESERVED_TAG,
    refcmdsn: int = 0,
    expdatasn: int = 0,
    immediate: bool = True,
) -> Built:
    """11.5: byte 1 is F (always 1) and the function; bytes 40-47 reserved."""
    header = _header((0x40 if immediate else 0) | 0x02, 0x80 | function)
    header[8:16] = lun
    for offset, value in (
        (16, itt),
        (20, referenced_task_tag),
        (24, cmdsn),
        (28, expstatsn),
        (32, refcmdsn),
        (36, expdatasn),
    ):
        _u32(header, offset, value)
    fields = _fields(
        function=function,
        itt=itt,
        cmdsn=cmdsn,
        expstatsn=expstatsn,
        referenced_task_tag=referenced_task_tag,
        lun=lun,
        refcmdsn=refcmdsn,
        expdatasn=expdatasn,
        immediate=immediate,
    )
    return Built("initiator", "TaskManagementRequest", fields, bytes(header))


def task_response(*, response: int, itt: int, statsn: int, expcmdsn: int, maxcmdsn: int) -> Built:
    """11.6: byte 1 is 0x80, byte 2 the response; 8-15, 20-23 and 36-47 reserved."""
    header = _header(0x22, 0x80, response)
    for offset, value in ((16, itt), (24, statsn), (28, expcmdsn), (32, maxcmdsn)):
        _u32(header, offset, value)
    fields = _fields(
        response=response, itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn
    )
    return Built("target", "TaskManagementResponse", fields, bytes(header))


WRITE_10_ONE_BLOCK = bytes.fromhex("2a000000000000000100")  # WRITE(10), LBA 0, 1 block
PATTERN = bytes(range(256))


def write_session() -> list[Built]:
    """A 512-byte write: 256 bytes unsolicited in two Data-Outs (FirstBurstLength 256), the
    rest asked for by one R2T and sent in one Data-Out; GOOD."""
    return [
        scsi_command(
            itt=0x10, cmdsn=0x20, expstatsn=0x30, edtl=512, cdb=WRITE_10_ONE_BLOCK, final=False
        ),
        data_out(
            itt=0x10,
            ttt=RESERVED_TAG,
            lun=NO_LUN,
            expstatsn=0x30,
            datasn=0,
            buffer_offset=0,
            final=False,
            data=PATTERN[:128],
        ),
        data_out(
            itt=0x10,
            ttt=RESERVED_TAG,
            lun=NO_LUN,
            expstatsn=0x30,
            datasn=1,
            buffer_offset=128,
            final=True,
            data=PATTERN[128:],
        ),
        r2t(
            itt=0x10,
            ttt=0x00000007,
            statsn=0x30,  # the next StatSN, not taken
            expcmdsn=0x21,
            maxcmdsn=0x40,
            r2tsn=0,
            buffer_offset=256,
            desired_length=256,
        ),
        data_out(
            itt=0x10,
            ttt=0x00000007,
            lun=LUN_1,
            expstatsn=0x30,
            datasn=0,
            buffer_offset=256,
            final=True,
            data=PATTERN[::-1],
        ),
        scsi_response(itt=0x10, statsn=0x30, expcmdsn=0x21, maxcmdsn=0x40),
    ]


def task_session() -> list[Built]:
    """Every function and every response code at least once, after a write left waiting for
    its data (the task ABORT TASK names). The answers are chosen so that every code appears;
    a real target picks them by its own state."""
    pdus = [
        scsi_command(
            itt=0x20, cmdsn=0x50, expstatsn=0x60, edtl=512, cdb=WRITE_10_ONE_BLOCK, final=True
        ),
        r2t(
            itt=0x20,
            ttt=0x00000009,
            statsn=0x60,
            expcmdsn=0x51,
            maxcmdsn=0x70,
            r2tsn=0,
            buffer_offset=0,
            desired_length=512,
        ),
    ]
    # (function, request fields, response): immediate requests leave CmdSN where it is.
    exchanges: list[tuple[int, dict[str, Any], int]] = [
        (1, {"lun": LUN_1, "referenced_task_tag": 0x20, "refcmdsn": 0x50}, 0),  # ABORT TASK
        (1, {"lun": LUN_1, "referenced_task_tag": 0x1234, "refcmdsn": 0x40}, 1),  # no task
        (2, {"lun": LUN_9}, 2),  # ABORT TASK SET on a LUN that is not there
        (8, {"referenced_task_tag": 0x20, "expdatasn": 1}, 3),  # TASK REASSIGN: still allegiant
        (8, {"referenced_task_tag": 0x20, "expdatasn": 0}, 4),  # reassignment not supported
        (3, {"lun": LUN_1}, 5),  # CLEAR ACA: not supported
        (6, {}, 6),  # TARGET WARM RESET: authorization failed
        (4, {"lun": LUN_1}, 255),  # CLEAR TASK SET: rejected
        (5, {"lun": LUN_1, "immediate": False}, 0),  # LOGICAL UNIT RESET, in CmdSN order
        (7, {}, 0),  # TARGET COLD RESET last: the target drops every connection after it
    ]
    cmdsn, statsn = 0x51, 0x60
    for number, (function, request, response) in enumerate(exchanges):
        itt = 0x21 + number
        immediate = request.get("immediate", True)
        pdus.append(
            task_request(function=function, itt=itt, cmdsn=cmdsn, expstatsn=statsn, **request)
        )
        if not immediate:
            cmdsn += 1
        pdus.append(
            task_response(
                response=response, itt=itt, statsn=statsn, expcmdsn=cmdsn, maxcmdsn=cmdsn + 0x1F
            )
        )
        statsn += 1
    return pdus


# --------------------------------------------------------------------------------------------
# the pcap


def _checksum(words: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _frame(
    source: tuple[str, int], dest: tuple[str, int], seq: int, ack: int, data: bytes
) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", source[1], dest[1], seq, ack, 5 << 4, 0x18, 65535, 0, 0)
    ip = bytearray(
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp) + len(data), 1, 0x4000, 64, 6, 0)
    )
    ip += bytes(int(part) for part in source[0].split("."))
    ip += bytes(int(part) for part in dest[0].split("."))
    ip[10:12] = _checksum(bytes(ip)).to_bytes(2, "big")
    # TCP checksum over the IPv4 pseudo-header, so tshark has nothing to flag.
    pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, 6, len(tcp) + len(data))
    segment = bytearray(tcp + data + bytes(len(data) % 2))
    tcp_sum = _checksum(pseudo + bytes(segment))
    tcp = tcp[:16] + tcp_sum.to_bytes(2, "big") + tcp[18:]
    return bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + bytes(ip) + tcp + data


def pcap(sessions: list[list[Built]]) -> bytes:
    """A classic pcap (LINKTYPE_ETHERNET), one PDU per frame, one TCP connection per session."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    number = 0
    for index, session in enumerate(sessions):
        initiator = (INITIATOR_HOST, 40000 + index)
        seq = {"initiator": 1000, "target": 5000}
        for built in session:
            source, dest = (
                (initiator, TARGET) if built.sender == "initiator" else (TARGET, initiator)
            )
            other = "target" if built.sender == "initiator" else "initiator"
            frame = _frame(source, dest, seq[built.sender], seq[other], built.raw)
            seq[built.sender] += len(built.raw)
            out.append(struct.pack("<IIII", 1_700_000_000 + number, 0, len(frame), len(frame)))
            out.append(frame)
            number += 1
    return b"".join(out)


DECODING = ("-Y", "iscsi", "-T", "json", "--no-duplicate-keys", "-J", "frame ip tcp iscsi")


def readings(path: Path) -> dict[int, dict[str, Any]]:
    """tshark's decoding of each frame's one PDU, flattened as ``capture.py`` flattens it.

    ``capture.read_capture`` is not used: it wants a DataSegmentLength from tshark, which
    tshark 4.0 does not show for a Task Management Function Response.
    """
    out: dict[int, dict[str, Any]] = {}
    for packet in json.loads(capture._tshark(path, *DECODING)):
        layers = packet["_source"]["layers"]
        pdus = layers["iscsi"] if isinstance(layers["iscsi"], list) else [layers["iscsi"]]
        if len(pdus) != 1:
            raise RuntimeError(f"{len(pdus)} iSCSI PDUs in one frame")
        flat: dict[str, Any] = {}
        capture._flatten(pdus[0], flat)
        out[int(layers["frame"]["frame.number"])] = flat
    return out


def records(sessions: list[list[Built]], path: Path) -> list[dict[str, Any]]:
    """One record per PDU, shaped like ``capture.py``'s, plus the model and its fields."""
    seen = readings(path)
    out: list[dict[str, Any]] = []
    frame = 0
    for session, pdus in enumerate(sessions):
        sent: dict[str, int] = {"initiator": 0, "target": 0}
        for built in pdus:
            frame += 1
            reading = seen.get(frame)
            if reading is None or int(reading["iscsi.opcode"], 16) != built.raw[0] & 0x3F:
                raise RuntimeError(f"frame {frame}: tshark did not read the PDU built there")
            out.append(
                {
                    "session": session,
                    "sender": built.sender,
                    "frame": frame,
                    "index_in_direction": sent[built.sender],
                    "hex": built.raw.hex(),
                    "tshark": reading,
                    "model": built.model,
                    "fields": built.fields,
                }
            )
            sent[built.sender] += 1
    if set(seen) != set(range(1, frame + 1)):
        raise RuntimeError(f"tshark read frames {sorted(seen)}, {frame} were written")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    sessions = [write_session(), task_session()]
    with tempfile.TemporaryDirectory(prefix="pyiscsi-task-pdus-") as tmp:
        path = Path(tmp) / "task_pdus.pcap"
        path.write_bytes(pcap(sessions))
        pdus = records(sessions, path)
        versions = capture._versions()
        document = {
            "scenario": "task_pdus",
            "description": (
                "SCSI Data-Out, R2T and Task Management Function Request/Response built by "
                "hand from the RFC 7143 layouts (with the SCSI Command and Response around "
                "them): a WRITE(10) of 512 bytes, half unsolicited in two Data-Outs, half "
                "after an R2T; then every task management function, answered with every "
                "response code."
            ),
            "requests_from": "hand-built by task_pdus.py (struct, RFC 7143 11.3-11.8); no peer",
            "built_at": datetime.datetime.now(datetime.timezone.utc)
            .replace(microsecond=0)
            .isoformat(),
            "versions": {k: v for k, v in versions.items() if k in ("tshark", "libwireshark16")},
            "commands": [
                "/work/venv/bin/python tests/vectors/task_pdus.py",
                "tshark -r task_pdus.pcap "
                + " ".join(f"'{a}'" if " " in a else a for a in DECODING),
            ],
            "sessions": [
                {"initiator": f"{INITIATOR_HOST}:{40000 + n}", "target": f"{TARGET[0]}:{TARGET[1]}"}
                for n in range(len(sessions))
            ],
            "pdus": pdus,
        }
        (args.out / "task_pdus.json").write_text(json.dumps(document, indent=1) + "\n")
        (args.out / "task_pdus.pcap").write_bytes(path.read_bytes())
    print(f"{args.out / 'task_pdus.json'}: {len(pdus)} PDUs in {len(sessions)} sessions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
