"""The test target's SCSI over iSCSI, sans-IO: reads in Data-In, writes with immediate data,
unsolicited Data-Out and R2T, residuals, sense, task management, refused commands, digests
and any chunking. A small initiator here builds SCSI Commands with the codec and the PDUs
the codec lacks (Data-Out, Task Management) by hand, as RFC 7143 lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyiscsi_failover.protocol.digest import crc32c
from pyiscsi_failover.protocol.pdu import (
    ISID,
    PDU,
    LoginRequest,
    LoginResponse,
    Reject,
    RejectReason,
    ScsiCommand,
    ScsiDataIn,
    ScsiResponse,
    ScsiStatus,
    Stage,
)
from pyiscsi_failover.protocol.scsi import (
    SenseKey,
    cdb_inquiry,
    cdb_report_luns,
    cdb_test_unit_ready,
    encode_sam_lun,
    parse_report_luns,
    parse_sense_segment,
    parse_standard_inquiry,
)
from pyiscsi_failover.protocol.text import decode_keys, encode_text
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu
from pyiscsi_failover.testing import LunSpec, PortalConfig, TargetConfig, TargetSpec
from pyiscsi_failover.testing.logical_unit import LogicalUnits
from pyiscsi_failover.testing.scsi_session import ScsiAnswered, TaskManagementAnswered
from pyiscsi_failover.testing.target import (
    ConnectionState,
    ProtocolViolation,
    TargetConnection,
)
from pyiscsi_failover.testing.task_pdus import TaskFunction, TaskResponse

IQN = "iqn.2024-01.com.example:scsi"
INITIATOR = "iqn.2024-01.com.example:host"
PORTAL = PortalConfig(host="127.0.0.1", port=3260)
LUN0 = encode_sam_lun(0)
#: A random-format ISID (T=10), as libiscsi and our probes send.
RANDOM_ISID = ISID(t=2, a=0, b=1, c=2, d=3)
BLOCK = 512


def config(*, luns: tuple[LunSpec | int, ...] = (0,), **options: object) -> TargetConfig:
    return TargetConfig(
        portals=(PORTAL,),
        targets=(TargetSpec(name=IQN, luns=luns),),
        **options,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class R2T:
    itt: int
    ttt: int
    statsn: int
    r2tsn: int
    offset: int
    length: int


@dataclass(frozen=True)
class TaskReply:
    itt: int
    response: int
    statsn: int


Answer = PDU | R2T | TaskReply


def field(raw: bytes, offset: int) -> int:
    return int.from_bytes(raw[offset : offset + 4], "big")


class Initiator:
    """One logged-in Normal session over a TargetConnection, bytes in and out."""

    def __init__(self, conn: TargetConnection) -> None:
        self.conn = conn
        self.cmdsn = 1
        self.expstatsn = 0
        self._itt = 0x100
        self.digests = False

    def next_itt(self) -> int:
        self._itt += 1
        return self._itt

    def feed(self, raw: bytes, *, chunk: int | None = None) -> list[Answer]:
        if chunk is None:
            self.conn.receive_data(raw)
        else:
            for start in range(0, len(raw), chunk):
                self.conn.receive_data(raw[start : start + chunk])
        answers = [self._parse(pdu) for pdu in self.conn.pdus_to_send()]
        for answer in answers:
            statsn = getattr(answer, "statsn", None)
            if isinstance(answer, (ScsiResponse, TaskReply, Reject)) or (
                isinstance(answer, ScsiDataIn) and answer.status is not None
            ):
                assert statsn == self.expstatsn, "StatSN skipped or repeated"
                self.expstatsn = (self.expstatsn + 1) & 0xFFFFFFFF
        return answers

    def _parse(self, raw: bytes) -> Answer:
        opcode = raw[0] & 0x3F
        if self.digests and opcode in (0x31, 0x22):
            assert raw[48:52] == crc32c(raw[:48])
        if opcode == 0x31:
            assert len(raw) == 48 + (4 if self.digests else 0)
            return R2T(
                itt=field(raw, 16),
                ttt=field(raw, 20),
                statsn=field(raw, 24),
                r2tsn=field(raw, 36),
                offset=field(raw, 40),
                length=field(raw, 44),
            )
        if opcode == 0x22:
            return TaskReply(itt=field(raw, 16), response=raw[2], statsn=field(raw, 24))
        return decode_pdu(raw, header_digest=self.digests, data_digest=self.digests)

    def login(
        self,
        keys: list[tuple[str, str]] = (),  # type: ignore[assignment]
        *,
        digests: bool = False,
        isid: ISID = RANDOM_ISID,
    ) -> dict[str, str]:
        pairs = [
            ("InitiatorName", INITIATOR),
            ("SessionType", "Normal"),
            ("TargetName", IQN),
            ("HeaderDigest", "CRC32C" if digests else "None"),
            ("DataDigest", "CRC32C" if digests else "None"),
            *keys,
        ]
        request = LoginRequest(
            transit=True,
            cont=False,
            csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
            nsg=Stage.FULL_FEATURE_PHASE,
            isid=isid,
            itt=1,
            cmdsn=self.cmdsn,
            expstatsn=0,
            data=encode_text(pairs),
        )
        self.conn.receive_data(encode_pdu(request))
        [raw] = self.conn.pdus_to_send()
        response = decode_pdu(raw)
        assert isinstance(response, LoginResponse)
        assert response.transit and response.nsg is Stage.FULL_FEATURE_PHASE, response
        self.expstatsn = response.statsn + 1
        self.digests = digests
        assert self.conn.state is ConnectionState.FULL_FEATURE
        return decode_keys(response.data)

    def command(
        self,
        cdb: bytes,
        *,
        edtl: int,
        read: bool = False,
        write: bool = False,
        data: bytes = b"",
        final: bool = True,
        lun: bytes = LUN0,
        immediate: bool = False,
    ) -> tuple[int, bytes]:
        itt = self.next_itt()
        pdu = ScsiCommand(
            itt=itt,
            edtl=edtl,
            cmdsn=self.cmdsn,
            expstatsn=self.expstatsn,
            cdb=cdb,
            lun=lun,
            read=read,
            write=write,
            final=final,
            data=data,
            immediate=immediate,
        )
        if not immediate:
            self.cmdsn += 1
        return itt, encode_pdu(pdu, header_digest=self.digests, data_digest=self.digests)

    def data_out(
        self,
        itt: int,
        *,
        offset: int,
        data: bytes,
        ttt: int = 0xFFFFFFFF,
        datasn: int = 0,
        final: bool = True,
    ) -> bytes:
        header = bytearray(48)
        header[0] = 0x05
        header[1] = 0x80 if final else 0
        header[5:8] = len(data).to_bytes(3, "big")
        header[16:20] = itt.to_bytes(4, "big")
        header[20:24] = ttt.to_bytes(4, "big")
        header[28:32] = self.expstatsn.to_bytes(4, "big")
        header[36:40] = datasn.to_bytes(4, "big")
        header[40:44] = offset.to_bytes(4, "big")
        return self._framed(bytes(header), data)

    def task(
        self, function: int, *, referenced: int = 0xFFFFFFFF, refcmdsn: int = 0, lun: bytes = LUN0
    ) -> bytes:
        header = bytearray(48)
        header[0] = 0x40 | 0x02  # immediate
        header[1] = 0x80 | function
        header[8:16] = lun
        header[16:20] = self.next_itt().to_bytes(4, "big")
        header[20:24] = referenced.to_bytes(4, "big")
        header[24:28] = self.cmdsn.to_bytes(4, "big")
        header[28:32] = self.expstatsn.to_bytes(4, "big")
        header[32:36] = refcmdsn.to_bytes(4, "big")
        return self._framed(bytes(header), b"")

    def _framed(self, header: bytes, data: bytes) -> bytes:
        parts = [header, crc32c(header) if self.digests else b""]
        if data:
            padded = data + bytes(-len(data) % 4)
            parts += [padded, crc32c(padded) if self.digests else b""]
        return b"".join(parts)

    def events(self) -> list[object]:
        found: list[object] = []
        while (event := self.conn.next_event()) is not None:
            found.append(event)
        return found


def session(
    target: TargetConfig | None = None,
    keys: list[tuple[str, str]] = (),  # type: ignore[assignment]
    *,
    digests: bool = False,
    units: LogicalUnits | None = None,
) -> Initiator:
    target = target or config()
    ini = Initiator(TargetConnection(target, portal=PORTAL.portal, logical_units=units))
    ini.login(keys, digests=digests)
    ini.events()
    return ini


def read10(lba: int, blocks: int) -> bytes:
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def write10(lba: int, blocks: int) -> bytes:
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def data_ins(answers: list[Answer]) -> list[ScsiDataIn]:
    return [a for a in answers if isinstance(a, ScsiDataIn)]


def violations(ini: Initiator) -> list[str]:
    return [e.description for e in ini.events() if isinstance(e, ProtocolViolation)]


def pattern(length: int, seed: int = 7) -> bytes:
    return bytes((seed + i * 31) & 0xFF for i in range(length))


# --------------------------------------------------------------------------------------------
# Reads


def test_read_is_split_by_the_initiators_segment_length_and_burst() -> None:
    units = LogicalUnits(config().targets)
    lu = units.get(IQN, 0)
    assert lu is not None
    image = pattern(8 * BLOCK)
    lu.store.write(0, image)
    ini = session(
        keys=[("MaxRecvDataSegmentLength", "1024"), ("MaxBurstLength", "1536")], units=units
    )
    itt, raw = ini.command(read10(0, 8), edtl=8 * BLOCK, read=True)
    answers = ini.feed(raw)
    pdus = data_ins(answers)
    assert len(answers) == len(pdus)  # GOOD rides on the last Data-In: no SCSI Response
    assert b"".join(p.data for p in pdus) == image
    assert [p.datasn for p in pdus] == list(range(len(pdus)))
    assert all(len(p.data) <= 1024 for p in pdus)
    assert all(p.itt == itt for p in pdus)
    # Sequences of at most MaxBurstLength, each ending with F.
    sequence = 0
    for pdu in pdus:
        assert pdu.buffer_offset == sum(len(p.data) for p in pdus[: pdus.index(pdu)])
        sequence += len(pdu.data)
        assert sequence <= 1536
        if pdu.final:
            sequence = 0
    assert pdus[-1].final and pdus[-1].status is ScsiStatus.GOOD
    assert not (pdus[-1].overflow or pdus[-1].underflow)
    assert all(p.status is None for p in pdus[:-1])
    [event] = [e for e in ini.events() if isinstance(e, ScsiAnswered)]
    assert (event.opcode, event.status, event.data_in) == (0x28, 0, 8 * BLOCK)


@pytest.mark.parametrize(
    ("edtl", "sent", "overflow", "underflow", "residual"),
    [(100, 100, True, False, 412), (512, 512, False, False, 0), (2048, 512, False, True, 1536)],
    ids=["overflow", "exact", "underflow"],
)
def test_read_residuals(
    edtl: int, sent: int, overflow: bool, underflow: bool, residual: int
) -> None:
    ini = session()
    _, raw = ini.command(read10(0, 1), edtl=edtl, read=True)
    [last] = data_ins(ini.feed(raw))
    assert len(last.data) == sent
    assert (last.overflow, last.underflow, last.residual) == (overflow, underflow, residual)


def test_allocation_length_beyond_the_data_is_an_underflow() -> None:
    ini = session()
    _, raw = ini.command(cdb_inquiry(allocation_length=255).cdb, edtl=255, read=True)
    [data_in] = data_ins(ini.feed(raw))
    assert parse_standard_inquiry(data_in.data).vendor == "PYISCSI"
    assert (data_in.underflow, data_in.residual) == (True, 255 - 74)


def test_check_condition_comes_as_a_response_with_sense() -> None:
    ini = session()
    _, raw = ini.command(read10(1 << 20, 1), edtl=BLOCK, read=True)
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse)
    assert response.status is ScsiStatus.CHECK_CONDITION
    sense = parse_sense_segment(response.data)
    assert sense is not None and (sense.key, sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x21)
    assert (response.underflow, response.residual) == (True, BLOCK)
    [event] = [e for e in ini.events() if isinstance(e, ScsiAnswered)]
    assert event.sense == (5, 0x21, 0)


def test_missing_lun_and_report_luns_through_the_session() -> None:
    ini = session(config(luns=(3, 300)))
    _, raw = ini.command(cdb_report_luns().cdb, edtl=4096, read=True)
    [data_in] = data_ins(ini.feed(raw))
    assert [lun.number for lun in parse_report_luns(data_in.data).luns] == [3, 300]
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)  # LUN 0 does not exist
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse)
    sense = parse_sense_segment(response.data)
    assert sense is not None and (sense.key, sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x25)
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0, lun=encode_sam_lun(300))
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    assert not response.data


# --------------------------------------------------------------------------------------------
# Writes


def read_back(ini: Initiator, lba: int, blocks: int) -> bytes:
    _, raw = ini.command(read10(lba, blocks), edtl=blocks * BLOCK, read=True)
    return b"".join(p.data for p in data_ins(ini.feed(raw)))


def test_write_with_immediate_data_only() -> None:
    ini = session(keys=[("ImmediateData", "Yes"), ("InitialR2T", "No")])
    data = pattern(2 * BLOCK)
    itt, raw = ini.command(write10(4, 2), edtl=len(data), write=True, data=data)
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    assert (response.itt, response.expdatasn, response.residual) == (itt, 0, 0)
    assert read_back(ini, 4, 2) == data
    assert violations(ini) == []


def test_write_with_immediate_unsolicited_and_solicited_data() -> None:
    """Linux's way: ImmediateData=Yes, InitialR2T=No: immediate data, unsolicited Data-Out up
    to FirstBurstLength, then R2Ts of at most MaxBurstLength each."""
    ini = session(
        keys=[
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("FirstBurstLength", "2048"),
            ("MaxBurstLength", "4096"),
        ]
    )
    data = pattern(20 * BLOCK)  # 10 KiB: 2 KiB unsolicited, then 4 + 4 KiB solicited
    itt, raw = ini.command(
        write10(0, 20), edtl=len(data), write=True, data=data[:1024], final=False
    )
    assert ini.feed(raw) == []
    answers = ini.feed(ini.data_out(itt, offset=1024, data=data[1024:2048], final=True))
    [r2t] = answers
    assert isinstance(r2t, R2T)
    assert (r2t.itt, r2t.r2tsn, r2t.offset, r2t.length) == (itt, 0, 2048, 4096)
    assert r2t.statsn == ini.expstatsn  # the next StatSN, not taken
    first = ini.data_out(itt, ttt=r2t.ttt, offset=2048, data=data[2048:4096], final=False)
    second = ini.data_out(itt, ttt=r2t.ttt, offset=4096, data=data[4096:6144], datasn=1)
    [r2t2] = ini.feed(first + second)
    assert isinstance(r2t2, R2T)
    assert (r2t2.r2tsn, r2t2.offset, r2t2.length) == (1, 6144, 4096)
    assert r2t2.ttt != r2t.ttt
    [response] = ini.feed(ini.data_out(itt, ttt=r2t2.ttt, offset=6144, data=data[6144:]))
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    assert response.expdatasn == 2  # two R2Ts
    assert read_back(ini, 0, 20) == data
    assert violations(ini) == []


def test_write_with_initial_r2t_yes_waits_for_an_r2t() -> None:
    ini = session(config(initial_r2t=True), keys=[("InitialR2T", "No")])
    data = pattern(BLOCK * 3)
    itt, raw = ini.command(write10(1, 3), edtl=len(data), write=True, data=data[:BLOCK])
    [r2t] = ini.feed(raw)
    assert isinstance(r2t, R2T) and (r2t.offset, r2t.length) == (BLOCK, 2 * BLOCK)
    [response] = ini.feed(ini.data_out(itt, ttt=r2t.ttt, offset=BLOCK, data=data[BLOCK:]))
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    assert read_back(ini, 1, 3) == data
    assert violations(ini) == []


def test_write_without_immediate_data() -> None:
    ini = session(config(immediate_data=False), keys=[("ImmediateData", "Yes")])
    data = pattern(BLOCK)
    itt, raw = ini.command(write10(0, 1), edtl=BLOCK, write=True)
    [r2t] = ini.feed(raw)
    assert isinstance(r2t, R2T)
    [response] = ini.feed(ini.data_out(itt, ttt=r2t.ttt, offset=0, data=data))
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    # Immediate data although ImmediateData=No: used, and reported.
    itt, raw = ini.command(write10(1, 1), edtl=BLOCK, write=True, data=data)
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse)
    assert any("ImmediateData=No" in v for v in violations(ini))


def test_write_edtl_shorter_than_the_cdb_is_refused_with_an_overflow() -> None:
    ini = session()
    _, raw = ini.command(write10(0, 2), edtl=BLOCK, write=True, data=pattern(BLOCK))
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse)
    assert response.status is ScsiStatus.CHECK_CONDITION
    assert (response.overflow, response.residual) == (True, BLOCK)
    assert read_back(ini, 0, 1) == bytes(BLOCK)


def test_initiator_mistakes_in_data_out_are_reported_not_fatal() -> None:
    ini = session(keys=[("InitialR2T", "No")])
    ini.feed(ini.data_out(0x9999, offset=0, data=b"x" * 4))  # no such write
    data = pattern(2 * BLOCK)
    itt, raw = ini.command(write10(0, 2), edtl=len(data), write=True, final=False)
    assert ini.feed(raw) == []
    ini.feed(ini.data_out(itt, ttt=0x77, offset=0, data=data))  # a TTT no R2T gave
    [response] = ini.feed(ini.data_out(itt, offset=0, data=data + b"extra!!!", datasn=0))
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    found = violations(ini)
    assert any("has no write" in v for v in found)
    assert any("no R2T gave" in v for v in found)
    assert any("beyond EDTL" in v for v in found)
    assert read_back(ini, 0, 2) == data


# --------------------------------------------------------------------------------------------
# Task management


def test_abort_task_of_a_pending_write_then_its_late_data_is_dropped() -> None:
    ini = session(keys=[("InitialR2T", "No")])
    itt, raw = ini.command(write10(0, 2), edtl=2 * BLOCK, write=True, final=False)
    assert ini.feed(raw) == []
    [reply] = ini.feed(ini.task(TaskFunction.ABORT_TASK, referenced=itt))
    assert isinstance(reply, TaskReply)
    assert reply.response == TaskResponse.FUNCTION_COMPLETE
    assert ini.feed(ini.data_out(itt, offset=0, data=pattern(2 * BLOCK))) == []
    events = ini.events()
    assert (
        TaskManagementAnswered(
            function=1, referenced_task_tag=itt, response=TaskResponse.FUNCTION_COMPLETE
        )
        in events
    )
    assert not [e for e in events if isinstance(e, ProtocolViolation)]
    assert read_back(ini, 0, 2) == bytes(2 * BLOCK)


@pytest.mark.parametrize(
    ("function", "lun", "expected"),
    [
        (TaskFunction.ABORT_TASK, LUN0, TaskResponse.TASK_DOES_NOT_EXIST),
        (TaskFunction.LOGICAL_UNIT_RESET, LUN0, TaskResponse.FUNCTION_COMPLETE),
        (TaskFunction.LOGICAL_UNIT_RESET, encode_sam_lun(9), TaskResponse.LUN_DOES_NOT_EXIST),
        (TaskFunction.TARGET_WARM_RESET, LUN0, TaskResponse.FUNCTION_COMPLETE),
        (TaskFunction.CLEAR_ACA, LUN0, TaskResponse.NOT_SUPPORTED),
        (TaskFunction.TARGET_COLD_RESET, LUN0, TaskResponse.NOT_SUPPORTED),
        (0x55, LUN0, TaskResponse.NOT_SUPPORTED),
    ],
)
def test_task_management_functions(function: int, lun: bytes, expected: TaskResponse) -> None:
    ini = session()
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)
    ini.feed(raw)  # a finished task: ABORT TASK no longer finds it
    [reply] = ini.feed(ini.task(function, referenced=0x101, refcmdsn=1, lun=lun))
    assert isinstance(reply, TaskReply) and reply.response == expected
    assert ini.conn.state is ConnectionState.FULL_FEATURE


def test_abort_task_of_a_command_not_yet_received_is_complete() -> None:
    # RFC 7143 11.5.1: RefCmdSN inside the window and before the TMF's CmdSN.
    ini = session()
    ini.cmdsn += 1  # the command with CmdSN 1 "was lost"
    [reply] = ini.feed(ini.task(TaskFunction.ABORT_TASK, referenced=0x500, refcmdsn=1))
    assert isinstance(reply, TaskReply)
    assert reply.response == TaskResponse.FUNCTION_COMPLETE


def test_lun_reset_and_target_reset_end_pending_writes() -> None:
    ini = session(keys=[("InitialR2T", "No")])
    first, raw = ini.command(write10(0, 1), edtl=BLOCK, write=True, final=False)
    ini.feed(raw)
    second, raw = ini.command(write10(1, 1), edtl=BLOCK, write=True, final=False)
    ini.feed(raw)
    assert pending(ini) == (first, second)
    ini.feed(ini.task(TaskFunction.LOGICAL_UNIT_RESET))
    assert pending(ini) == ()
    _, raw = ini.command(write10(1, 1), edtl=BLOCK, write=True, final=False)
    ini.feed(raw)
    assert len(pending(ini)) == 1
    ini.feed(ini.task(TaskFunction.TARGET_WARM_RESET))
    assert pending(ini) == ()


def pending(ini: Initiator) -> tuple[int, ...]:
    scsi = ini.conn.scsi
    assert scsi is not None
    return scsi.pending_writes


# --------------------------------------------------------------------------------------------
# Refused commands, discovery, digests, chunking


def test_scsi_command_with_forbidden_flags_is_rejected_and_the_session_goes_on() -> None:
    ini = session()
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)
    bad = bytearray(raw)
    bad[1] = 0x01  # F = W = 0: RFC 7143 11.3.1 forbids it
    [reject] = ini.feed(bytes(bad))
    assert isinstance(reject, Reject) and reject.reason is RejectReason.PROTOCOL_ERROR
    assert reject.data == bytes(bad[:48])
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)  # the next CmdSN still fits
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    found = violations(ini)
    assert len(found) == 1 and "SCSI Command refused" in found[0]


def test_scsi_pdus_in_a_discovery_session_are_rejected() -> None:
    conn = TargetConnection(config(), portal=PORTAL.portal)
    login = LoginRequest(
        transit=True,
        cont=False,
        csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
        nsg=Stage.FULL_FEATURE_PHASE,
        isid=ISID(t=2, a=0, b=1, c=2, d=3),
        itt=1,
        cmdsn=1,
        expstatsn=0,
        data=encode_text([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
    )
    conn.receive_data(encode_pdu(login))
    [raw_login] = conn.pdus_to_send()
    ini = Initiator(conn)
    ini.expstatsn = decode_pdu(raw_login).statsn + 1  # type: ignore[union-attr]
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)
    for pdu in (
        raw,
        ini.task(TaskFunction.TARGET_WARM_RESET),
        ini.data_out(1, offset=0, data=b"abcd"),
    ):
        [reject] = ini.feed(pdu)
        assert isinstance(reject, Reject) and reject.reason is RejectReason.PROTOCOL_ERROR
    assert conn.state is ConnectionState.FULL_FEATURE


def test_scsi_with_digests_fed_byte_by_byte() -> None:
    ini = session(keys=[("InitialR2T", "No"), ("FirstBurstLength", "512")], digests=True)
    data = pattern(3 * BLOCK)
    itt, raw = ini.command(write10(2, 3), edtl=len(data), write=True, data=data[:256], final=False)
    stream = raw + ini.data_out(itt, offset=256, data=data[256:512])
    [r2t] = ini.feed(stream, chunk=1)
    assert isinstance(r2t, R2T) and (r2t.offset, r2t.length) == (512, 1024)
    [response] = ini.feed(ini.data_out(itt, ttt=r2t.ttt, offset=512, data=data[512:]), chunk=1)
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    _, raw = ini.command(read10(2, 3), edtl=len(data), read=True)
    assert b"".join(p.data for p in data_ins(ini.feed(raw, chunk=7))) == data
    [reply] = ini.feed(ini.task(TaskFunction.CLEAR_ACA), chunk=1)
    assert isinstance(reply, TaskReply)
    assert violations(ini) == []


def test_one_volume_for_every_connection_sharing_the_units() -> None:
    target = config(luns=(LunSpec(lun=0, size=1 << 20),))
    units = LogicalUnits(target.targets)
    writer, reader = session(target, units=units), session(target, units=units)
    data = pattern(BLOCK, seed=3)
    _, raw = writer.command(write10(9, 1), edtl=BLOCK, write=True, data=data)
    writer.feed(raw)
    assert read_back(reader, 9, 1) == data
    alone = session(target)  # its own units: a different, empty volume
    assert read_back(alone, 9, 1) == bytes(BLOCK)


def test_backing_files_need_the_servers_units(tmp_path: object) -> None:
    from pathlib import Path

    from pyiscsi_failover.errors import LocalProtocolError

    assert isinstance(tmp_path, Path)
    target = config(luns=(LunSpec(lun=0, backing=tmp_path / "disk.img"),))
    with pytest.raises(LocalProtocolError, match="backing files"):
        TargetConnection(target, portal=PORTAL.portal)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    commands=st.lists(
        st.tuples(
            st.binary(min_size=16, max_size=16),
            st.integers(0, 70000),
            st.sampled_from(
                [
                    (True, False, True),
                    (False, True, True),
                    (False, True, False),
                    (False, False, True),
                ]
            ),
            st.binary(max_size=600),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    ),
    chunk=st.integers(1, 4096),
)
def test_any_scsi_command_is_answered_or_awaits_its_data(
    commands: list[tuple[bytes, int, tuple[bool, bool, bool], bytes, bool]], chunk: int
) -> None:
    """Random CDBs, lengths, flags and data: the target answers every command that is complete
    (Data-In with status or a Response, in order), asks for the data of the others, never
    raises, and keeps the session."""
    ini = session(keys=[("InitialR2T", "No"), ("MaxRecvDataSegmentLength", "4096")])
    for cdb, length, (read, write, final), payload, with_data_out in commands:
        edtl = length if read or write else 0
        data = payload[:edtl] if write else b""
        itt, raw = ini.command(cdb, edtl=edtl, read=read, write=write, final=final, data=data)
        stream = raw
        if write and not final and with_data_out:
            stream += ini.data_out(itt, offset=len(data), data=payload, final=True)
        answers = ini.feed(stream, chunk=chunk)
        for answer in answers:
            assert isinstance(answer, (ScsiDataIn, ScsiResponse, R2T)), answer
            assert answer.itt == itt
        ended = [
            a
            for a in answers
            if isinstance(a, ScsiResponse) or (isinstance(a, ScsiDataIn) and a.status is not None)
        ]
        assert len(ended) <= 1
        assert ini.conn.state is ConnectionState.FULL_FEATURE
    # Whatever is still pending, a warm reset clears it and the session still answers.
    ini.feed(ini.task(TaskFunction.TARGET_WARM_RESET))
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD


def test_every_write_mistake_is_named() -> None:
    """Each slip an initiator can make around write data is reported once and the session
    answers on: the data is used where it fits."""
    ini = session(
        config(initial_r2t=True, first_burst_length=1024),
        keys=[("InitialR2T", "Yes"), ("FirstBurstLength", "1024"), ("MaxBurstLength", "1024")],
    )
    data = pattern(4 * BLOCK)
    # Immediate data beyond FirstBurstLength, and F=0 although InitialR2T=Yes.
    itt, raw = ini.command(write10(0, 4), edtl=len(data), write=True, data=data[:1536], final=False)
    assert ini.feed(raw) == []
    # Unsolicited data beyond FirstBurstLength ends the burst; then the same again.
    [r2t] = ini.feed(ini.data_out(itt, offset=1536, data=data[1536:1600]))
    assert isinstance(r2t, R2T) and (r2t.offset, r2t.length) == (1600, 448)
    ini.feed(ini.data_out(itt, offset=1600, data=data[1600:1700]))
    # Out of order, a wrong DataSN, more than the R2T asked for and past EDTL, in one PDU.
    [response] = ini.feed(
        ini.data_out(itt, ttt=r2t.ttt, offset=1600, data=data[1600:] + bytes(8), datasn=3)
    )
    assert isinstance(response, ScsiResponse) and response.status is ScsiStatus.GOOD
    assert read_back(ini, 0, 4) == data
    # A command without W that carries data; a write reusing the ITT of a pending one.
    _, raw = ini.command(cdb_test_unit_ready().cdb, edtl=0)
    bad = bytearray(raw)
    bad[5:8] = (4).to_bytes(3, "big")
    [response] = ini.feed(bytes(bad) + b"abcd")
    assert isinstance(response, ScsiResponse)
    itt, raw = ini.command(write10(0, 1), edtl=BLOCK, write=True)
    [r2t] = ini.feed(raw)
    assert isinstance(r2t, R2T)
    again = bytearray(raw)
    again[24:28] = ini.cmdsn.to_bytes(4, "big")
    ini.cmdsn += 1
    [r2t_again] = ini.feed(bytes(again))
    assert isinstance(r2t_again, R2T) and r2t_again.ttt != r2t.ttt  # the new one replaced it
    found = " | ".join(violations(ini))
    for text in (
        "exceed FirstBurstLength",
        "F=0 (unsolicited Data-Out to follow) with InitialR2T=Yes",
        "unsolicited data beyond FirstBurstLength",
        "unsolicited Data-Out after the unsolicited burst ended",
        "Data-Out beyond what the R2T asked for",
        "DataSN 3, expected 0",
        "at offset 1600, expected 1700",
        "without W carries data",
        "reuses ITT",
    ):
        assert text in found, text
