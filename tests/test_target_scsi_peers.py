"""The test target's LUNs judged by initiators we did not write: libiscsi's tools (iscsi-ls,
iscsi-inq, iscsi-readcapacity16, iscsi-test-cu), libiscsi itself in-process for reads, writes
and a LUN reset, Wireshark's dissector on the target's SCSI PDUs, and our own prober's LUN
check.

The target is served by the test's trio loop; each tool runs as a trio subprocess, and the
in-process libiscsi calls run in a worker thread, so the loop keeps serving. libiscsi has no
login timeout of its own: every step here has a deadline.

Facts about libiscsi 1.19 (Debian 12) this relies on:

* ``iscsi-ls -s`` prints ``Lun:N Type:... (Size:S)`` where N is the REPORT LUNS entry's first
  two bytes as a number (flat LUN 300, ``41 2c``, prints as 16684) and S is the last LBA times
  the block length (one block short: 64 MiB prints ``63M``).
* ``iscsi-inq -c`` takes a decimal page code (``0x83`` reads as 0); ``-e 1 -c 131`` lists the
  designators last first, a binary one as its raw bytes.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from peers import iscsi_url, parse_iscsi_ls, require_tool, unique_loopback
from test_tshark import ISCSI_PORT, capturing, pdus_by_stream, read_frames, tshark

from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Check, Outcome, ProbeOptions, probe
from pyiscsi_failover.testing import LunSpec, PortalConfig, TargetConfig, TargetSpec, serve_target
from pyiscsi_failover.testing.scsi_session import ScsiAnswered, TaskManagementAnswered
from pyiscsi_failover.testing.task_pdus import TaskResponse

pytestmark = pytest.mark.peer

IQN = "iqn.2024-01.com.example:scsi-peers"
INITIATOR = "iqn.2024-01.com.example:scsi-peers-host"
#: A WWID whose bytes hold no NUL, so iscsi-inq prints all of it.
WWID = "6" + "1a2b3c4d5e6f7182" + "93a4b5c6d7e8f91"
DEADLINE = 30
TOOL_DEADLINE = 20

LUNS = (
    LunSpec(lun=0),
    LunSpec(
        lun=1,
        size=1 << 30,
        block_size=4096,
        wwid=f"naa.{WWID}",
        serial="SER123",
        vendor="ACME",
        product="VOLUME",
        revision="2.5",
    ),
    LunSpec(lun=300, size=2 << 20),
)


def config(*, port: int = 0, luns: tuple[LunSpec, ...] = LUNS) -> TargetConfig:
    return TargetConfig(
        portals=(PortalConfig(host=unique_loopback(), port=port),),
        targets=(TargetSpec(name=IQN, luns=luns),),
    )


def lun_url(where: Portal, lun: int) -> str:
    return f"{iscsi_url(where.host, where.port)}/{IQN}/{lun}"


async def run_tool(binary: str, package: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    path = require_tool(binary, package)
    with trio.fail_after(TOOL_DEADLINE):
        return await trio.run_process(
            [path, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )


# --------------------------------------------------------------------------------------------
# libiscsi's command-line tools


async def test_iscsi_ls_s_lists_every_lun_with_its_size() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config()) as running:
            where = running.portals[0]
            done = await run_tool(
                "iscsi-ls", "libiscsi-bin", "-s", "-i", INITIATOR, iscsi_url(where.host, where.port)
            )
            await running.wait_idle()
    assert done.returncode == 0, done.stderr
    [target] = parse_iscsi_ls(done.stdout.decode())
    assert target.name == IQN
    assert target.luns == {
        0: "DIRECT_ACCESS (Size:63M)",
        1: "DIRECT_ACCESS (Size:1023M)",
        0x4000 | 300: "DIRECT_ACCESS (Size:1M)",
    }
    assert running.violations == []  # (iscsi-ls closes its Normal session without a Logout)


async def test_iscsi_inq_shows_the_configured_identity() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config()) as running:
            url = lun_url(running.portals[0], 1)
            standard = await run_tool("iscsi-inq", "libiscsi-bin", "-i", INITIATOR, url)
            pages = await run_tool("iscsi-inq", "libiscsi-bin", "-i", INITIATOR, "-e", "1", url)
            ident = await run_tool(
                "iscsi-inq", "libiscsi-bin", "-i", INITIATOR, "-e", "1", "-c", "131", url
            )
            serial = await run_tool(
                "iscsi-inq", "libiscsi-bin", "-i", INITIATOR, "-e", "1", "-c", "128", url
            )
            await running.wait_idle()
    for done in (standard, pages, ident, serial):
        assert done.returncode == 0, done.stderr
    text = standard.stdout.decode()
    assert "Peripheral Qualifier:CONNECTED" in text
    assert "Peripheral Device Type:DIRECT_ACCESS" in text
    assert re.search(r"^Vendor:ACME\s*$", text, re.MULTILINE), text
    assert re.search(r"^Product:VOLUME\s*$", text, re.MULTILINE), text
    assert re.search(r"^Revision:2\.5\s*$", text, re.MULTILINE), text
    listed = re.findall(r"^Page:0x([0-9a-f]{2})", pages.stdout.decode(), re.MULTILINE)
    assert listed == ["00", "80", "83", "b0", "b1"]
    raw = ident.stdout
    assert b"Page Code:(0x83) DEVICE_IDENTIFICATION" in raw
    assert b"Association:(0) LOGICAL_UNIT\nDesignator Type:(3) NAA" in raw
    assert b"Designator:[" + bytes.fromhex(WWID) + b"]" in raw
    assert b"Designator:[ACME    SER123]" in raw
    assert "Unit Serial Number:[SER123]" in serial.stdout.decode()


async def test_iscsi_readcapacity16_shows_the_configured_size() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config()) as running:
            done = await run_tool(
                "iscsi-readcapacity16",
                "libiscsi-bin",
                "-i",
                INITIATOR,
                lun_url(running.portals[0], 1),
            )
            await running.wait_idle()
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    assert "RETURNED LOGICAL BLOCK ADDRESS:262143" in text
    assert "LOGICAL BLOCK LENGTH IN BYTES:4096" in text
    assert "Total size:1073741824" in text


async def test_iscsi_test_cu_read_write_and_identity_suites_pass() -> None:
    """libiscsi's conformance suite, on the commands the LU implements (writes included:
    --dataloss); what it skips (PERSISTENT RESERVE, COMPARE AND WRITE...) we do not claim."""
    suites = [
        "SCSI.TestUnitReady",
        "SCSI.Inquiry",
        "SCSI.ReportLuns",
        "SCSI.ReadCapacity10",
        "SCSI.ReadCapacity16",
        "SCSI.ModeSense6",
        "SCSI.Read10",
        "SCSI.Read16",
        "SCSI.Write10",
        "SCSI.Write16",
    ]
    with trio.fail_after(DEADLINE * 2):
        async with serve_target(config(luns=(LunSpec(lun=0, size=8 << 20),))) as running:
            done = await run_tool(
                "iscsi-test-cu",
                "libiscsi-bin",
                "--dataloss",
                "-i",
                INITIATOR,
                "-t",
                ",".join(suites),
                lun_url(running.portals[0], 0),
            )
            await running.wait_idle()
    text = done.stdout.decode(errors="replace")
    assert done.returncode == 0, text[-3000:]
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert summary is not None, text[-3000:]
    total, ran, passed, failed = map(int, summary.groups())
    assert (failed, ran, passed) == (0, total, total), text[-3000:]
    for name in ("Read10", "Write10", "Read16", "Write16"):
        # The simple case ran for real: not skipped.
        assert re.search(rf"Suite: {name}\n  Test: Simple \.\.\.passed", text), name


# --------------------------------------------------------------------------------------------
# libiscsi in-process (ctypes): reads, writes, a LUN reset

_T = TypeVar("_T")


class LibiscsiError(Exception):
    """libiscsi could not log in (its own message)."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Libiscsi:
    """libiscsi 1.19's sync API on one logged-in session (iscsi/iscsi.h prototypes).

    ``isid_oui`` = (OUI, qualifier) logs in with an OUI-format ISID (libiscsi writes the OUI
    in bytes 0-2, the qualifier in 3-5): (0x00023d, 0x010000) is what open-iscsi sends for its
    session 1. Without it libiscsi picks a random-format one. A failed login raises
    :class:`LibiscsiError` with libiscsi's message.
    """

    def __init__(
        self, portal: Portal, lun: int, *, isid_oui: tuple[int, int] | None = None
    ) -> None:
        lib = ctypes.CDLL("libiscsi.so.7")
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        for name, restype, argtypes in (
            ("iscsi_create_context", vp, [cp]),
            ("iscsi_destroy_context", i, [vp]),
            ("iscsi_set_targetname", i, [vp, cp]),
            ("iscsi_set_session_type", i, [vp, i]),
            ("iscsi_set_timeout", i, [vp, i]),
            ("iscsi_full_connect_sync", i, [vp, cp, i]),
            ("iscsi_logout_sync", i, [vp]),
            ("iscsi_disconnect", i, [vp]),
            ("iscsi_get_error", cp, [vp]),
            ("iscsi_read10_iov_sync", vp, [vp, i, u32, u32, i, i, i, i, i, i, vp, i]),
            ("iscsi_write10_sync", vp, [vp, i, u32, vp, u32, i, i, i, i, i, i]),
            ("iscsi_task_mgmt_lun_reset_sync", i, [vp, u32]),
            ("iscsi_set_isid_oui", i, [vp, u32, u32]),
            ("iscsi_reportluns_sync", vp, [vp, i, i]),
            ("iscsi_testunitready_sync", vp, [vp, i]),
            ("scsi_datain_unmarshall", vp, [vp]),
            ("scsi_task_get_status", i, [vp, vp]),
            ("scsi_free_scsi_task", None, [vp]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self._lib = lib
        self._lun = lun
        self._context = lib.iscsi_create_context(INITIATOR.encode())
        assert self._context
        lib.iscsi_set_targetname(self._context, IQN.encode())
        lib.iscsi_set_session_type(self._context, 2)  # ISCSI_SESSION_NORMAL
        lib.iscsi_set_timeout(self._context, 10)
        if isid_oui is not None:
            assert lib.iscsi_set_isid_oui(self._context, *isid_oui) == 0
        status = lib.iscsi_full_connect_sync(
            self._context, f"{portal.host}:{portal.port}".encode(), lun
        )
        if status != 0:
            message = self.error()
            lib.iscsi_destroy_context(self._context)
            raise LibiscsiError(message)

    def error(self) -> str:
        message = self._lib.iscsi_get_error(self._context)
        return message.decode(errors="replace") if message else "?"

    def _status(self, task: int | None) -> int:
        assert task, self.error()
        try:
            return int(self._lib.scsi_task_get_status(task, None))
        finally:
            self._lib.scsi_free_scsi_task(task)

    def read10(self, lba: int, length: int, block_size: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        iov = _Iovec(ctypes.cast(buffer, ctypes.c_void_p), length)
        task = self._lib.iscsi_read10_iov_sync(
            self._context, self._lun, lba, length, block_size, 0, 0, 0, 0, 0,
            ctypes.byref(iov), 1,
        )  # fmt: skip
        assert self._status(task) == 0, self.error()
        return buffer.raw

    def write10(self, lba: int, data: bytes, block_size: int) -> None:
        buffer = ctypes.create_string_buffer(data, len(data))
        task = self._lib.iscsi_write10_sync(
            self._context, self._lun, lba, buffer, len(data), block_size, 0, 0, 0, 0, 0
        )
        assert self._status(task) == 0, self.error()

    def lun_reset(self) -> int:
        return int(self._lib.iscsi_task_mgmt_lun_reset_sync(self._context, self._lun))

    def test_unit_ready(self, lun: int) -> int:
        """The SCSI status of a TEST UNIT READY to ``lun``."""
        return self._status(self._lib.iscsi_testunitready_sync(self._context, lun))

    def report_luns(self) -> list[int]:
        """REPORT LUNS as libiscsi reads it (struct scsi_reportluns_list: a count, then each
        entry's first two bytes)."""
        task = self._lib.iscsi_reportluns_sync(self._context, 0, 4096)
        assert task, self.error()
        try:
            assert self._lib.scsi_task_get_status(task, None) == 0, self.error()
            found = self._lib.scsi_datain_unmarshall(task)
            assert found, "libiscsi could not read the REPORT LUNS data"
            count = ctypes.c_uint32.from_address(found).value
            entries = (ctypes.c_uint16 * count).from_address(found + 4)
            return list(entries)
        finally:
            self._lib.scsi_free_scsi_task(task)

    def close(self) -> None:
        self._lib.iscsi_logout_sync(self._context)
        self._lib.iscsi_disconnect(self._context)
        self._lib.iscsi_destroy_context(self._context)


async def in_thread(function: Callable[[], _T]) -> _T:
    """Run blocking libiscsi calls off the loop that serves the target (abandoned, never left
    hanging, if the deadline passes: libiscsi's own timeout then ends it)."""
    return await trio.to_thread.run_sync(function, abandon_on_cancel=True)


def pattern(length: int, seed: int) -> bytes:
    return bytes((seed * 7 + i * 13 + i // 4096) & 0xFF for i in range(length))


async def test_libiscsi_reads_the_image_and_its_writes_land_in_it() -> None:
    """Reads return what the image holds; a 300 KiB write (more than FirstBurstLength, so
    unsolicited Data-Out then R2Ts) lands where it was meant to; a LUN reset is answered."""
    block = 4096
    before = pattern(64 * block, seed=1)
    written = pattern(75 * block, seed=2)
    with trio.fail_after(DEADLINE):
        async with serve_target(config()) as running:
            unit = running.logical_unit(IQN, 1)
            unit.store.write(100 * block, before)

            def session() -> tuple[bytes, bytes, int]:
                libiscsi = Libiscsi(running.portals[0], 1)
                try:
                    seen = libiscsi.read10(100, len(before), block)
                    libiscsi.write10(1000, written, block)
                    again = libiscsi.read10(1000, len(written), block)
                    return seen, again, libiscsi.lun_reset()
                finally:
                    libiscsi.close()

            seen, again, reset = await in_thread(session)
            await running.wait_idle()
    assert seen == before
    assert again == written
    assert unit.store.read(1000 * block, len(written)) == written
    assert unit.store.read(999 * block, block) == bytes(block)  # nothing spilled over
    assert reset == 0
    [record] = running.connections
    answered = [e for e in record.events if isinstance(e, ScsiAnswered)]
    writes = [e for e in answered if e.opcode == 0x2A]
    assert [(e.status, e.data_out) for e in writes] == [(0, len(written))]
    assert (
        TaskManagementAnswered(
            function=5, referenced_task_tag=0xFFFFFFFF, response=TaskResponse.FUNCTION_COMPLETE
        )
        in record.events
    )
    assert record.violations == []


async def test_libiscsi_writes_reach_the_backing_file(tmp_path: Path) -> None:
    backing = tmp_path / "volume.img"
    backing.write_bytes(pattern(1 << 20, seed=5))
    data = pattern(8 * 512, seed=9)
    luns = (LunSpec(lun=0, backing=backing),)
    with trio.fail_after(DEADLINE):
        async with serve_target(config(luns=luns)) as running:

            def session() -> bytes:
                libiscsi = Libiscsi(running.portals[0], 0)
                try:
                    first = libiscsi.read10(0, 4096, 512)
                    libiscsi.write10(16, data, 512)
                    return first
                finally:
                    libiscsi.close()

            first = await in_thread(session)
            await running.wait_idle()
    content = backing.read_bytes()
    assert first == pattern(1 << 20, seed=5)[:4096]
    assert content[16 * 512 : 24 * 512] == data
    assert len(content) == 1 << 20


# --------------------------------------------------------------------------------------------
# Wireshark reads the target's SCSI PDUs


def test_tshark_decodes_the_targets_scsi_pdus(tmp_path: Path) -> None:
    """Data-In, SCSI Response, R2T and Task Management Response as the target sends them to
    libiscsi: nothing malformed, no expert warning, every PDU the target sent decoded."""
    require_tool("tshark", "tshark")
    require_tool("dumpcap", "tshark")
    target = config(port=ISCSI_PORT)
    host = target.portals[0].host

    async def traffic() -> None:
        with trio.fail_after(DEADLINE):
            async with serve_target(target) as running:
                where = running.portals[0]
                done = await run_tool(
                    "iscsi-ls", "libiscsi-bin", "-s", "-i", INITIATOR,
                    iscsi_url(where.host, where.port),
                )  # fmt: skip
                assert done.returncode == 0, done.stderr

                def session() -> None:
                    libiscsi = Libiscsi(where, 1)
                    try:
                        libiscsi.write10(8, pattern(100 * 4096, seed=3), 4096)
                        assert libiscsi.read10(8, 100 * 4096, 4096) == pattern(100 * 4096, 3)
                        assert libiscsi.lun_reset() == 0
                    finally:
                        libiscsi.close()

                await in_thread(session)
                await running.wait_idle()
                assert running.violations == []

    pcap = tmp_path / "target.pcapng"
    with capturing(pcap, host):
        trio.run(traffic)
    profile = tmp_path / "wireshark-profile"
    frames = read_frames(tshark(pcap, profile, "-T", "pdml"))
    theirs = [f for f in frames if f.srcport == ISCSI_PORT and f.tcp_len > 0]
    assert theirs
    # TCP's own expert notes (a full receive window while libiscsi reads a burst) are not
    # the target's doing; everything else must be clean.
    flagged = tshark(
        pcap,
        profile,
        "-Y",
        "_ws.malformed || (_ws.expert.severity >= warning && !tcp.analysis.flags)",
    )
    assert flagged.strip() == ""
    received = [pdu for stream in pdus_by_stream(frames, to_target=False) for pdu in stream]
    opcodes = {pdu.number("iscsi.opcode") & 0x3F for pdu in received}
    # Login and Logout Responses, Text (discovery), SCSI Response, Data-In, R2T, TMF Response.
    assert {0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31} <= opcodes, sorted(opcodes)
    r2ts = [pdu for pdu in received if pdu.number("iscsi.opcode") & 0x3F == 0x31]
    assert r2ts and all(pdu.has("iscsi.r2tsn") for pdu in r2ts)
    statuses = [
        pdu.number("iscsi.scsiresponse.status")
        for pdu in received
        if pdu.has("iscsi.scsiresponse.status")
    ]
    assert 0 in statuses


# --------------------------------------------------------------------------------------------
# Our own LUN check


async def test_our_lun_check_sees_the_configured_wwid_and_size() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config()) as running:
            where = running.portals[0]
            portal = f"{where.host}:{where.port}"
            options = ProbeOptions(check=Check.LUN, initiator_name=INITIATOR, probe_all=True)
            sam = parse_connection_info(build_connection_info([portal] * 3, [IQN] * 3, [5, 300, 1]))
            result = await probe(sam, options)
            # LUN 300 is listed flat-addressed (41 2c), as tgtd lists it: os-brick's SAM2.
            sam2 = parse_connection_info(
                build_connection_info([portal], IQN, 300, addressing_mode="SAM2")
            )
            flat = await probe(sam2, options)
            await running.wait_idle()
    missing, unaddressed, volume = result.attempts
    assert missing.outcome is Outcome.LUN_MISSING, missing.detail
    assert "LUN 5 is not in REPORT LUNS (it lists 0, 1, 16684)" in missing.detail
    assert unaddressed.outcome is Outcome.LUN_MISSING, unaddressed.detail
    assert "SAM2" in unaddressed.detail
    assert volume.outcome is Outcome.OK, volume.detail
    assert result.chosen is volume
    assert volume.lun_info is not None
    assert (volume.lun_info.wwid, volume.lun_info.wwid_udev) == (f"naa.{WWID}", f"3{WWID}")
    assert (volume.lun_info.size_bytes, volume.lun_info.block_size) == (1 << 30, 4096)
    assert (volume.lun_info.vendor, volume.lun_info.product) == ("ACME", "VOLUME")
    [small] = flat.attempts
    assert small.outcome is Outcome.OK, small.detail
    assert small.lun_info is not None and small.lun_info.size_bytes == 2 << 20
    assert small.lun_info.wwid == f"naa.{running.config.targets[0].find_lun(300).wwid}"  # type: ignore[union-attr]
    assert running.violations == []
    assert not running.lingering_sessions
