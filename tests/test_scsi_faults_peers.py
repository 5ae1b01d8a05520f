"""The test target's SCSI faults seen by initiators we did not write: libiscsi's tools and
libiscsi itself in-process (ctypes), and Wireshark's dissector.

What this establishes:

* libiscsi picks a random-format ISID (T = 10, ``80 xx xx xx 00 00``), so a LUN hidden from
  open-iscsi's ISIDs is listed by ``iscsi-ls -s`` and answers ``iscsi-inq``, and a target that
  refuses open-iscsi's ISIDs lets it log in: our probe's situation.
* The same libiscsi with ``iscsi_set_isid_oui(0x00023d, 0x010000)`` sends ``00 02 3d 01 00 00``,
  byte for byte the ISID open-iscsi sends for its session 1 (usr/initiator.c: 00 02 3d, then
  the session id in byte 3): the hidden LUN is gone from its REPORT LUNS and connecting to it
  fails with 05/25/00, and the refused login fails with 0x0202: the kernel's situation.
* libiscsi's connect sends TEST UNIT READY to the LUN: NOT READY and standby fail it with the
  sense we configured, unit attentions are retried away, a reservation conflict is let
  through (and shows on the next TEST UNIT READY); reads come back whole through 8-byte
  Data-In PDUs with a residual overflow, and after a slow LUN's latency.
* tshark reads the split Data-In sequence as we meant it (DataSN, buffer offsets, F, S, O
  and the residual) and the NOT READY sense; its SCSI layer cannot read an 8-byte fragment of
  READ CAPACITY(16) data alone and says "Malformed Packet: SCSI" for it, which is the
  dissector's limit (each Data-In is handed over unassembled), not a framing error.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio
from peers import iscsi_url, parse_iscsi_ls, require_tool, unique_loopback
from test_target_scsi_peers import (
    INITIATOR,
    IQN,
    Libiscsi,
    LibiscsiError,
    in_thread,
    lun_url,
    pattern,
    run_tool,
)
from test_tshark import ISCSI_PORT, capturing, pdus_by_stream, read_frames, tshark

from pyiscsi_failover.protocol.pdu import ISID, LoginStatus
from pyiscsi_failover.testing import (
    Fault,
    FaultKind,
    HideFromIsid,
    IsidMatch,
    NotReady,
    PortalConfig,
    RefuseIsid,
    ReservationConflict,
    ResidualOverflow,
    RunningTarget,
    SlowScsi,
    SplitDataIn,
    Standby,
    TargetConfig,
    TargetSpec,
    UnitAttention,
    serve_target,
)

pytestmark = pytest.mark.peer

DEADLINE = 40
#: open-iscsi's ISID for its session 1, as libiscsi's iscsi_set_isid_oui builds it.
OPEN_ISCSI_OUI = (0x00023D, 0x010000)
OPEN_ISCSI_ISID = bytes.fromhex("00023d010000")


def config(*faults: Fault, luns: tuple[int, ...] = (0, 1), port: int = 0) -> TargetConfig:
    return TargetConfig(
        portals=(PortalConfig(host=unique_loopback(), port=port, name="p", faults=faults),),
        targets=(TargetSpec(name=IQN, luns=luns),),
    )


def login_isids(running: RunningTarget) -> list[tuple[bytes, LoginStatus]]:
    return [
        (login.isid.to_bytes(), login.status)
        for login in running.logins
        if login.isid is not None and login.target_name == IQN
    ]


def injected(running: RunningTarget) -> set[FaultKind]:
    return {kind for record in running.connections for kind in record.faults}


# --------------------------------------------------------------------------------------------
# ISIDs


async def test_libiscsi_tools_with_their_random_isid_see_a_lun_hidden_from_open_iscsi() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config(HideFromIsid().at(1))) as running:
            where = running.portals[0]
            listing = await run_tool(
                "iscsi-ls", "libiscsi-bin", "-s", "-i", INITIATOR, iscsi_url(where.host, where.port)
            )
            inquiry = await run_tool(
                "iscsi-inq", "libiscsi-bin", "-i", INITIATOR, lun_url(where, 1)
            )
            await running.wait_idle()
    assert listing.returncode == 0, listing.stderr
    [target] = parse_iscsi_ls(listing.stdout.decode())
    assert set(target.luns) == {0, 1}
    assert inquiry.returncode == 0, inquiry.stderr
    assert "Peripheral Qualifier:CONNECTED" in inquiry.stdout.decode()
    sessions = login_isids(running)
    assert sessions and all(isid[0] >> 6 == 0b10 for isid, _ in sessions), sessions
    assert FaultKind.HIDE_FROM_ISID not in injected(running)


async def test_libiscsi_with_open_iscsis_isid_loses_the_hidden_lun() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config(HideFromIsid().at(1))) as running:
            where = running.portals[0]

            def sessions() -> tuple[list[int], list[int], str]:
                ours = Libiscsi(where, 0)
                try:
                    seen_by_random = ours.report_luns()
                finally:
                    ours.close()
                kernels = Libiscsi(where, 0, isid_oui=OPEN_ISCSI_OUI)
                try:
                    seen_by_oui = kernels.report_luns()
                finally:
                    kernels.close()
                with pytest.raises(LibiscsiError) as refused:
                    Libiscsi(where, 1, isid_oui=OPEN_ISCSI_OUI)
                return seen_by_random, seen_by_oui, str(refused.value)

            seen_by_random, seen_by_oui, error = await in_thread(sessions)
            await running.wait_idle()
    assert seen_by_random == [0, 1]
    assert seen_by_oui == [0]
    assert "LOGICAL_UNIT_NOT_SUPPORTED" in error
    isids = [isid for isid, _ in login_isids(running)]
    assert isids.count(OPEN_ISCSI_ISID) == 2
    assert IsidMatch().matches(ISID.from_bytes(OPEN_ISCSI_ISID))
    assert FaultKind.HIDE_FROM_ISID in injected(running)
    assert not running.violations


async def test_a_target_refusing_open_iscsis_isid_lets_libiscsi_in() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(config(RefuseIsid())) as running:
            where = running.portals[0]

            def sessions() -> str:
                Libiscsi(where, 0).close()
                with pytest.raises(LibiscsiError) as refused:
                    Libiscsi(where, 0, isid_oui=OPEN_ISCSI_OUI)
                return str(refused.value)

            error = await in_thread(sessions)
            await running.wait_idle()
    assert "Authorization failure" in error
    [(random_isid, ok), (oui_isid, refused)] = login_isids(running)
    assert random_isid[0] >> 6 == 0b10 and ok is LoginStatus.SUCCESS
    assert (oui_isid, refused) == (OPEN_ISCSI_ISID, LoginStatus.AUTHORIZATION_FAILURE)


# --------------------------------------------------------------------------------------------
# Status and delivery faults


async def test_libiscsis_connect_meets_not_ready_standby_attention_and_conflict() -> None:
    faults = (
        NotReady().at(1),
        Standby().at(2),
        UnitAttention(count=3).at(3),
        ReservationConflict().at(4),
    )
    with trio.fail_after(DEADLINE):
        async with serve_target(config(*faults, luns=(0, 1, 2, 3, 4))) as running:
            where = running.portals[0]
            runs = {
                lun: await run_tool(
                    "iscsi-inq", "libiscsi-bin", "-i", INITIATOR, lun_url(where, lun)
                )
                for lun in (1, 2, 3)
            }

            def conflict() -> int:
                session = Libiscsi(where, 4)
                try:
                    return session.test_unit_ready(4)
                finally:
                    session.close()

            conflicted = await in_thread(conflict)
            await running.wait_idle()
    not_ready, standby, attention = runs[1], runs[2], runs[3]
    assert not_ready.returncode != 0
    assert re.search(r"SENSE KEY:NOT READY\(2\).*\(0x0403\)", not_ready.stderr.decode())
    assert standby.returncode != 0
    assert re.search(r"SENSE KEY:NOT READY\(2\).*\(0x040b\)", standby.stderr.decode())
    assert attention.returncode == 0, attention.stderr
    assert conflicted == 0x18  # RESERVATION CONFLICT, after a connect that let it through
    assert {FaultKind.NOT_READY, FaultKind.STANDBY, FaultKind.UNIT_ATTENTION} <= injected(running)
    assert FaultKind.RESERVATION_CONFLICT in injected(running)
    assert not running.violations


async def test_libiscsi_reads_whole_through_split_overflowing_and_slow_replies() -> None:
    latency = 0.3
    faults = (
        SplitDataIn(segment=8).at(1),
        ResidualOverflow(excess=100).at(1),
        SlowScsi(seconds=latency).at(2),
    )
    with trio.fail_after(DEADLINE):
        async with serve_target(config(*faults, luns=(0, 1, 2))) as running:
            images = {lun: pattern(16 * 512, seed=lun) for lun in (1, 2)}
            for lun, image in images.items():
                running.logical_unit(IQN, lun).store.write(0, image)
            where = running.portals[0]

            def read(lun: int) -> tuple[bytes, float]:
                session = Libiscsi(where, lun)
                try:
                    started = time.monotonic()
                    return session.read10(0, len(images[lun]), 512), time.monotonic() - started
                finally:
                    session.close()

            split, _ = await in_thread(lambda: read(1))
            slow, took = await in_thread(lambda: read(2))
            await running.wait_idle()
    assert split == images[1]
    assert slow == images[2]
    assert took >= latency
    assert {FaultKind.SPLIT_DATA_IN, FaultKind.RESIDUAL_OVERFLOW, FaultKind.SLOW_SCSI} <= injected(
        running
    )
    assert not running.violations


# --------------------------------------------------------------------------------------------
# Wireshark


def test_tshark_reads_split_data_in_overflow_and_sense(tmp_path: Path) -> None:
    require_tool("tshark", "tshark")
    require_tool("dumpcap", "tshark")
    faults = (SplitDataIn(segment=8).at(1), ResidualOverflow(excess=100).at(1), NotReady().at(2))
    target = config(*faults, luns=(0, 1, 2), port=ISCSI_PORT)
    host = target.portals[0].host

    async def traffic() -> None:
        with trio.fail_after(DEADLINE):
            async with serve_target(target) as running:
                where = running.portals[0]
                capacity = await run_tool(
                    "iscsi-readcapacity16", "libiscsi-bin", "-i", INITIATOR, lun_url(where, 1)
                )
                assert capacity.returncode == 0, capacity.stderr
                assert "Total size:67108864" in capacity.stdout.decode()
                refused = await run_tool(
                    "iscsi-inq", "libiscsi-bin", "-i", INITIATOR, lun_url(where, 2)
                )
                assert refused.returncode != 0
                await running.wait_idle()
                assert not running.violations

    pcap = tmp_path / "faults.pcapng"
    with capturing(pcap, host):
        trio.run(traffic)
    profile = tmp_path / "wireshark-profile"
    frames = read_frames(tshark(pcap, profile, "-T", "pdml"))
    received = [pdu for stream in pdus_by_stream(frames, to_target=False) for pdu in stream]
    data_ins = [pdu for pdu in received if pdu.number("iscsi.opcode") & 0x3F == 0x25]
    by_task: dict[int, list[int]] = {}
    for index, pdu in enumerate(data_ins):
        by_task.setdefault(pdu.number("iscsi.initiatortasktag"), []).append(index)
    # READ CAPACITY(16): 32 bytes in four 8-byte Data-Ins, the last with S, O and residual 100.
    sequences = [[data_ins[i] for i in indexes] for indexes in by_task.values()]
    capacity = [seq for seq in sequences if len(seq) == 4]
    assert capacity, [len(seq) for seq in sequences]
    for sequence in sequences:
        assert [pdu.number("iscsi.datasn") for pdu in sequence] == list(range(len(sequence)))
        assert [pdu.number("iscsi.bufferOffset") for pdu in sequence] == [
            8 * n for n in range(len(sequence))
        ]
        assert all(pdu.number("iscsi.datasegmentlength") <= 8 for pdu in sequence)
        *body, last = sequence
        assert all(pdu.byte("iscsi.scsidata.S") & 0x01 == 0 for pdu in body)
        flags = last.byte("iscsi.scsidata.S")
        assert flags & 0x80 and flags & 0x01 and flags & 0x04  # F, S, O
        assert last.number("iscsi.scsidata.readresidualcount") == 100
    # The NOT READY sense of LUN 2, read by libiscsi's connect.
    sense = tshark(
        pcap,
        profile,
        "-Y",
        "scsi.sns.key",
        "-T",
        "fields",
        "-e",
        "scsi.sns.key",
        "-e",
        "scsi.sns.ascascq",
    )
    assert sense.split() == ["0x02", "0x0403"]
    # Nothing malformed but the SCSI layer's reading of lone fragments.
    malformed = tshark(pcap, profile, "-Y", "_ws.malformed", "-T", "pdml")
    reasons = re.findall(r'showname="\[Malformed Packet: ([^]"]*)\]"', malformed)
    assert set(reasons) <= {"SCSI"}, reasons
    flagged = tshark(
        pcap,
        profile,
        "-Y",
        "(_ws.expert.severity >= warning && !tcp.analysis.flags && !_ws.malformed)"
        " || (_ws.malformed && !(iscsi.opcode == 0x25))",
    )
    assert flagged.strip() == ""
