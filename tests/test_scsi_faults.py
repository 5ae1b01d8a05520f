"""The test target's SCSI faults, pure and sans-IO: their spellings and configuration, what a
faulty LU answers to each command (read back with the package's own SCSI parsers), what the
iSCSI side makes of a slow, split or overflowing reply, and the ISID faults at login.

The network tests (our prober against every fault under every policy, libiscsi's tools) are
in test_scsi_faults_loopback.py and test_scsi_faults_peers.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_target_scsi_session import (
    INITIATOR,
    IQN,
    RANDOM_ISID,
    Initiator,
    data_ins,
    read10,
    write10,
)

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.protocol.pdu import (
    ISID,
    LoginRequest,
    LoginResponse,
    LoginStatus,
    ScsiResponse,
    ScsiStatus,
    Stage,
)
from pyiscsi_failover.protocol.scsi import (
    PeripheralQualifier,
    SenseKey,
    cdb_inquiry,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    encode_sam_lun,
    parse_read_capacity_16,
    parse_report_luns,
    parse_sense,
    parse_sense_segment,
    parse_standard_inquiry,
    parse_vpd_device_identification,
    parse_vpd_unit_serial,
)
from pyiscsi_failover.protocol.text import encode_text
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu
from pyiscsi_failover.testing import (
    CheckCondition,
    Fault,
    FaultKind,
    FaultLayer,
    HideFromIsid,
    IsidMatch,
    LunMissing,
    LunSpec,
    NotReady,
    OtherWwid,
    PortalConfig,
    RefuseIsid,
    ReservationConflict,
    ResidualOverflow,
    ScsiFault,
    SlowScsi,
    SplitDataIn,
    Standby,
    TargetConfig,
    TargetSpec,
    UnitAttention,
    format_fault,
    parse_fault,
)
from pyiscsi_failover.testing.faults import OPEN_ISCSI_OUI
from pyiscsi_failover.testing.logical_unit import (
    LogicalUnit,
    LogicalUnits,
    Nexus,
    ScsiReply,
    ScsiRequest,
)
from pyiscsi_failover.testing.scsi_faults import FaultyUnit, SessionLuns, session_luns
from pyiscsi_failover.testing.scsi_session import ScsiAnswered
from pyiscsi_failover.testing.target import FaultInjected, Hold, LoginFinished, TargetConnection

#: What open-iscsi sends for its session 1 (usr/initiator.c: 00 02 3d, then the session id).
OPEN_ISCSI = ISID.from_bytes(bytes.fromhex("00023d010000"))
PORTAL_A = PortalConfig(host="127.0.0.1", port=3260, name="a")
PORTAL_B = PortalConfig(host="127.0.0.2", port=3260, name="b")
BLOCK = 512

# --------------------------------------------------------------------------------------------
# Helpers


def target(*faults: Fault, luns: tuple[int, ...] = (0, 1)) -> TargetSpec:
    return TargetSpec(
        name=IQN, luns=tuple(LunSpec(lun=lun, size=1 << 20) for lun in luns), faults=faults
    )


def nexus(isid: ISID = RANDOM_ISID, portal: str = "a") -> Nexus:
    return Nexus(initiator_name=INITIATOR, isid=isid, target_name=IQN, portal_name=portal, tpgt=1)


def table(*faults: Fault, isid: ISID = RANDOM_ISID) -> SessionLuns:
    spec = target()
    return session_luns(LogicalUnits((spec,)), spec, nexus(isid), faults)


def ask(luns: SessionLuns, lun: int, cdb: bytes, *, edtl: int = 0, data: bytes = b"") -> ScsiReply:
    return luns.table.execute(encode_sam_lun(lun), cdb.ljust(16, b"\0"), nexus(), data, edtl=edtl)


def sense(reply: ScsiReply) -> tuple[SenseKey, int, int]:
    assert reply.status is ScsiStatus.CHECK_CONDITION, reply
    parsed = parse_sense(reply.sense)
    return parsed.key, parsed.asc, parsed.ascq


TUR = cdb_test_unit_ready().cdb
INQUIRY = cdb_inquiry().cdb
DEVICE_ID = cdb_inquiry(evpd=True, page=0x83).cdb
SERIAL = cdb_inquiry(evpd=True, page=0x80).cdb
CAPACITY = cdb_read_capacity_16().cdb
REPORT_LUNS = cdb_report_luns().cdb
REQUEST_SENSE = bytes([0x03, 0, 0, 0, 252, 0])
MODE_SENSE = bytes([0x1A, 0x08, 0x3F, 0, 0xFF, 0])


def listed(luns: SessionLuns) -> list[int]:
    reply = ask(luns, 0, REPORT_LUNS, edtl=4096)
    return [lun.linux_lun for lun in parse_report_luns(reply.data).luns]


# --------------------------------------------------------------------------------------------
# Spellings and configuration

SCSI_SPELLINGS = [
    "refuse-isid:open-iscsi",
    "refuse-isid:random",
    "refuse-isid:oui:0x00a0b0",
    "lun-missing",
    "lun-missing@0,1",
    "hide-from-isid:open-iscsi@1",
    "hide-from-isid:random",
    "not-ready:04/03",
    "not-ready:3a/00@1",
    "standby@0",
    "check-condition:3/11/00",
    "unit-attention:1:29/00",
    "unit-attention:4:2a/09@0,1",
    "reservation-conflict@1",
    "other-wwid",
    "other-wwid:naa.6" + "1" * 31 + "@1",
    "slow-scsi:0.25@0",
    "split-data-in:8",
    "residual-overflow:512@1",
]


@pytest.mark.parametrize("text", SCSI_SPELLINGS)
def test_scsi_fault_spellings_round_trip(text: str) -> None:
    fault = parse_fault(text)
    assert format_fault(fault) == text
    assert parse_fault(format_fault(fault)) == fault


def test_every_new_kind_is_spelled_and_scsi_faults_live_in_the_scsi_layer() -> None:
    kinds = {parse_fault(text).kind for text in SCSI_SPELLINGS}
    scsi = {kind for kind in FaultKind if kind.layer is FaultLayer.SCSI}
    assert scsi <= kinds
    assert FaultKind.REFUSE_ISID in kinds
    assert FaultKind.REFUSE_ISID.layer is FaultLayer.PROTOCOL
    assert all(kind.per_target for kind in kinds)


def test_short_spellings_give_the_documented_defaults() -> None:
    assert parse_fault("not-ready") == NotReady(asc=0x04, ascq=0x03)
    assert parse_fault("check-condition") == CheckCondition(
        key=SenseKey.HARDWARE_ERROR, asc=0x44, ascq=0
    )
    assert parse_fault("unit-attention") == UnitAttention(count=1, asc=0x29, ascq=0)
    assert parse_fault("unit-attention:3") == UnitAttention(count=3)
    assert parse_fault("split-data-in") == SplitDataIn(segment=8)
    assert parse_fault("residual-overflow") == ResidualOverflow(excess=512)
    assert parse_fault("hide-from-isid") == HideFromIsid(isid=IsidMatch(oui=OPEN_ISCSI_OUI))
    assert parse_fault("refuse-isid").isid == IsidMatch()  # type: ignore[union-attr]
    assert parse_fault("lun-missing@3,1") == LunMissing(luns=frozenset({1, 3}))
    wwid = "6" + "a" * 31
    assert parse_fault(f"other-wwid:3{wwid}") == OtherWwid(wwid=wwid)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delay:1@0", "takes no @LUN"),
        ("refuse-isid@0", "takes no @LUN"),
        ("lun-missing@", "decimal LUN numbers"),
        ("lun-missing@one", "decimal LUN numbers"),
        ("lun-missing@99999", "LUN must be 0..16383"),
        ("not-ready:4", "ASC/ASCQ in hex"),
        ("not-ready:04/zz", "ASC/ASCQ in hex"),
        ("check-condition:4/44", "KEY/ASC/ASCQ in hex"),
        ("unit-attention:0", "at least 1"),
        ("unit-attention:2:29", "ASC/ASCQ in hex"),
        ("slow-scsi", "slow-scsi:SECONDS"),
        ("slow-scsi:-1", ">= 0"),
        ("split-data-in:0", "1..16777215"),
        ("residual-overflow:0", "1..4294967295"),
        ("other-wwid:naa.5", "NAA 6"),
        ("hide-from-isid:oui:0x400000", "below 0x400000"),
        ("hide-from-isid:kernel", "open-iscsi, oui:0xHHHHHH or random"),
        ("standby:now", "takes no parameter"),
    ],
)
def test_bad_spellings_name_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message.replace(".", r"\.").replace("+", r"\+")):
        parse_fault(text)


def test_a_fault_naming_a_lun_nobody_serves_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match=r"portal a: fault not-ready names LUN 7"):
        TargetConfig(
            portals=(replace(PORTAL_A, faults=(NotReady(luns=frozenset({7})),)),),
            targets=(target(),),
        )
    with pytest.raises(LocalProtocolError, match=r"target .*: fault standby names LUN 2, 9"):
        TargetConfig(portals=(PORTAL_A,), targets=(target(Standby(luns=frozenset({0, 2, 9}))),))
    # A portal that serves no target with that LUN: the LUNs of the targets it serves count.
    other = TargetSpec(name=IQN + "-b", luns=(5,), portals=("b",))
    with pytest.raises(LocalProtocolError, match="portal a: fault lun-missing names LUN 5"):
        TargetConfig(
            portals=(replace(PORTAL_A, faults=(LunMissing(luns=frozenset({5})),)), PORTAL_B),
            targets=(replace(target(), portals=("a",)), other),
        )


def test_one_kind_may_act_twice_on_different_luns_only() -> None:
    two = (NotReady(luns=frozenset({0})), NotReady(asc=0x3A, ascq=0, luns=frozenset({1})))
    config = TargetConfig(portals=(replace(PORTAL_A, faults=two),), targets=(target(),))
    assert config.portals[0].faults == two
    for clash in (
        (NotReady(luns=frozenset({0, 1})), NotReady(luns=frozenset({1}))),
        (NotReady(), NotReady(luns=frozenset({1}))),
    ):
        with pytest.raises(LocalProtocolError, match=r"not-ready.*twice for the same LUNs"):
            PortalConfig(host="127.0.0.1", faults=clash)
    with pytest.raises(LocalProtocolError, match="twice"):
        TargetSpec(name=IQN, faults=(RefuseIsid(), RefuseIsid(isid=IsidMatch(oui=None))))


# --------------------------------------------------------------------------------------------
# ISID matching


def test_open_iscsi_isids_are_oui_format_with_its_oui() -> None:
    match = IsidMatch()
    for session_id in (0, 1, 7, 255):
        assert match.matches(ISID.from_bytes(bytes([0x00, 0x02, 0x3D, session_id, 0, 0])))
    assert not match.matches(RANDOM_ISID)
    assert not match.matches(ISID.from_bytes(bytes.fromhex("80023d010000")))  # random format
    assert not match.matches(ISID.from_bytes(bytes.fromhex("00023e010000")))  # another OUI
    assert not match.matches(ISID.from_bytes(bytes.fromhex("40023d010000")))  # IANA EN format
    assert IsidMatch(oui=None).matches(RANDOM_ISID)
    assert not IsidMatch(oui=None).matches(OPEN_ISCSI)


@given(raw=st.binary(min_size=6, max_size=6))
def test_isid_matches_follow_the_first_three_bytes(raw: bytes) -> None:
    isid = ISID.from_bytes(raw)
    assert IsidMatch().matches(isid) == (raw[:3] == b"\x00\x02\x3d")
    assert IsidMatch(oui=None).matches(isid) == (raw[0] >> 6 == 0b10)
    if raw[0] >> 6 == 0:
        assert IsidMatch(oui=int.from_bytes(raw[:3], "big")).matches(isid)


@given(raw=st.binary(min_size=5, max_size=5))
def test_our_probe_isids_are_never_open_iscsis(raw: bytes) -> None:
    from pyiscsi_failover.login_config import probe_isid

    isid = probe_isid(lambda n: raw[:n])
    assert not IsidMatch().matches(isid)
    assert IsidMatch(oui=None).matches(isid)


# --------------------------------------------------------------------------------------------
# What a session's LUN table holds


def test_lun_missing_leaves_the_lun_out_of_the_session() -> None:
    luns = table(LunMissing(luns=frozenset({1})))
    assert luns.removed == ((1, FaultKind.LUN_MISSING),)
    assert listed(luns) == [0]
    inquiry = parse_standard_inquiry(ask(luns, 1, INQUIRY, edtl=255).data)
    assert inquiry.peripheral_qualifier is PeripheralQualifier.NO_LOGICAL_UNIT
    assert sense(ask(luns, 1, TUR)) == (SenseKey.ILLEGAL_REQUEST, 0x25, 0)
    assert ask(luns, 0, TUR).status is ScsiStatus.GOOD
    assert listed(table(LunMissing())) == []


def test_hide_from_isid_hides_the_lun_from_matching_isids_only() -> None:
    hidden = HideFromIsid(luns=frozenset({0}))
    kernel = table(hidden, isid=OPEN_ISCSI)
    assert kernel.removed == ((0, FaultKind.HIDE_FROM_ISID),)
    assert listed(kernel) == [1]
    probe = table(hidden, isid=RANDOM_ISID)
    assert probe.removed == ()
    assert listed(probe) == [0, 1]
    assert ask(probe, 0, TUR).status is ScsiStatus.GOOD
    # The other way round: hidden from random-format ISIDs (ours), shown to the kernel's.
    assert listed(table(HideFromIsid(isid=IsidMatch(oui=None)), isid=RANDOM_ISID)) == []
    assert listed(table(HideFromIsid(isid=IsidMatch(oui=None)), isid=OPEN_ISCSI)) == [0, 1]


def test_other_wwid_shows_another_identity_over_the_same_blocks() -> None:
    spec = target()
    units = LogicalUnits((spec,))
    unit = units.get(IQN, 1)
    assert unit is not None
    unit.store.write(0, b"\x5a" * BLOCK)
    plain = session_luns(units, spec, nexus(), ())
    derived = session_luns(units, spec, nexus(), (OtherWwid(luns=frozenset({1})),))
    chosen_wwid = "6" + "b" * 31
    chosen = session_luns(units, spec, nexus(), (OtherWwid(wwid=chosen_wwid),))

    def wwid(luns: SessionLuns, lun: int = 1) -> str | None:
        return parse_vpd_device_identification(ask(luns, lun, DEVICE_ID, edtl=255).data).wwid

    own = f"naa.{unit.wwid}"
    assert wwid(plain) == own
    assert wwid(derived) not in (None, own)
    assert wwid(derived) == wwid(session_luns(units, spec, nexus(), (OtherWwid(),)))  # stable
    assert wwid(derived, 0) == f"naa.{units.get(IQN, 0).wwid}"  # type: ignore[union-attr]
    assert wwid(chosen) == f"naa.{chosen_wwid}"
    assert parse_vpd_unit_serial(ask(chosen, 1, SERIAL, edtl=255).data).serial == "b" * 16
    # Same blocks: what was written reads back through the other identity, and writes land.
    assert ask(derived, 1, read10(0, 1), edtl=BLOCK).data == b"\x5a" * BLOCK
    written = ask(derived, 1, write10(1, 1), edtl=BLOCK, data=b"\xa5" * BLOCK)
    assert written.status is ScsiStatus.GOOD
    assert unit.store.read(BLOCK, BLOCK) == b"\xa5" * BLOCK
    assert FaultKind.OTHER_WWID in ask(derived, 1, DEVICE_ID, edtl=255).faults
    assert FaultKind.OTHER_WWID not in ask(derived, 1, TUR).faults


def test_unfaulted_luns_are_served_by_the_lu_itself() -> None:
    luns = table(NotReady(luns=frozenset({1})))
    assert isinstance(luns.table.responder(encode_sam_lun(0)), LogicalUnit)
    assert isinstance(luns.table.responder(encode_sam_lun(1)), FaultyUnit)


# --------------------------------------------------------------------------------------------
# What a faulty LU answers

STATUS_FAULTS: list[tuple[ScsiFault, ScsiStatus, tuple[SenseKey, int, int] | None]] = [
    (NotReady(), ScsiStatus.CHECK_CONDITION, (SenseKey.NOT_READY, 0x04, 0x03)),
    (NotReady(asc=0x3A, ascq=0x00), ScsiStatus.CHECK_CONDITION, (SenseKey.NOT_READY, 0x3A, 0)),
    (Standby(), ScsiStatus.CHECK_CONDITION, (SenseKey.NOT_READY, 0x04, 0x0B)),
    (CheckCondition(), ScsiStatus.CHECK_CONDITION, (SenseKey.HARDWARE_ERROR, 0x44, 0)),
    (
        CheckCondition(key=SenseKey.MEDIUM_ERROR, asc=0x11, ascq=0),
        ScsiStatus.CHECK_CONDITION,
        (SenseKey.MEDIUM_ERROR, 0x11, 0),
    ),
    (ReservationConflict(), ScsiStatus.RESERVATION_CONFLICT, None),
]


@pytest.mark.parametrize(("fault", "status", "expected"), STATUS_FAULTS)
def test_status_faults_answer_every_command_but_inquiry(
    fault: ScsiFault, status: ScsiStatus, expected: tuple[SenseKey, int, int] | None
) -> None:
    luns = table(fault.at(1))
    for cdb, edtl in ((TUR, 0), (CAPACITY, 32), (read10(0, 1), BLOCK)):
        reply = ask(luns, 1, cdb, edtl=edtl)
        assert reply.status is status, cdb
        assert reply.faults == (fault.kind,)
        assert not reply.data
        if expected is not None:
            assert sense(reply) == expected
    written = ask(luns, 1, write10(0, 1), edtl=BLOCK, data=b"\xff" * BLOCK)
    assert written.status is status
    unit = luns.table.responder(encode_sam_lun(1))
    assert isinstance(unit, FaultyUnit)
    assert unit.unit.store.read(0, BLOCK) == bytes(BLOCK), "a refused write wrote nothing"
    # INQUIRY and REPORT LUNS get through: the LU is there, it just will not serve.
    inquiry = parse_standard_inquiry(ask(luns, 1, INQUIRY, edtl=255).data)
    assert inquiry.is_connected_disk
    assert listed(luns) == [0, 1]
    # The other LUN is untouched.
    assert ask(luns, 0, TUR).status is ScsiStatus.GOOD


def test_request_sense_reports_the_not_ready_state_as_its_data() -> None:
    for fault, expected in (
        (NotReady(), (SenseKey.NOT_READY, 0x04, 0x03)),
        (CheckCondition(), (SenseKey.HARDWARE_ERROR, 0x44, 0)),
    ):
        reply = ask(table(fault), 0, REQUEST_SENSE, edtl=252)
        assert reply.status is ScsiStatus.GOOD
        parsed = parse_sense(reply.data)
        assert (parsed.key, parsed.asc, parsed.ascq) == expected
        assert not parsed.descriptor_format
        descriptor = ask(table(fault), 0, bytes([0x03, 0x01, 0, 0, 252, 0]), edtl=252)
        assert parse_sense(descriptor.data).descriptor_format
    assert ask(table(ReservationConflict()), 0, REQUEST_SENSE, edtl=252).status is ScsiStatus.GOOD


def test_standby_still_serves_mode_sense_and_request_sense() -> None:
    luns = table(Standby())
    assert ask(luns, 0, MODE_SENSE, edtl=255).status is ScsiStatus.GOOD
    reply = ask(luns, 0, REQUEST_SENSE, edtl=252)
    assert reply.status is ScsiStatus.GOOD
    assert parse_sense(reply.data).key is SenseKey.NO_SENSE
    # REPORT TARGET PORT GROUPS is served in standby: this LU does not implement it.
    rtpg = ask(luns, 0, bytes([0xA3, 0x0A]) + bytes(4) + (255).to_bytes(4, "big"), edtl=255)
    assert sense(rtpg) == (SenseKey.ILLEGAL_REQUEST, 0x20, 0)


def test_a_unit_attention_goes_to_the_first_commands_of_each_session() -> None:
    spec = target()
    units = LogicalUnits((spec,))
    fault = UnitAttention(count=2, luns=frozenset({0}))
    first = session_luns(units, spec, nexus(), (fault,))
    # INQUIRY and REPORT LUNS do not take it.
    assert ask(first, 0, INQUIRY, edtl=255).status is ScsiStatus.GOOD
    assert listed(first) == [0, 1]
    assert sense(ask(first, 0, TUR)) == (SenseKey.UNIT_ATTENTION, 0x29, 0)
    assert ask(first, 1, TUR).status is ScsiStatus.GOOD  # LUN 1 has none
    # REQUEST SENSE takes the second one as its data.
    reported = ask(first, 0, REQUEST_SENSE, edtl=252)
    assert reported.status is ScsiStatus.GOOD
    assert reported.faults == (FaultKind.UNIT_ATTENTION,)
    assert parse_sense(reported.data).key is SenseKey.UNIT_ATTENTION
    assert ask(first, 0, TUR).status is ScsiStatus.GOOD
    assert ask(first, 0, TUR).faults == ()
    # A new session (a new I_T nexus) has its own.
    second = session_luns(units, spec, nexus(portal="b"), (fault,))
    custom = session_luns(units, spec, nexus(), (UnitAttention(asc=0x2A, ascq=0x09),))
    assert sense(ask(second, 0, CAPACITY, edtl=32)) == (SenseKey.UNIT_ATTENTION, 0x29, 0)
    assert sense(ask(custom, 1, TUR)) == (SenseKey.UNIT_ATTENTION, 0x2A, 0x09)


def test_status_faults_take_turns_as_lio_checks_them() -> None:
    every = (
        ReservationConflict(),
        CheckCondition(),
        NotReady(),
        Standby(),
        UnitAttention(),
    )
    luns = table(*every)
    assert sense(ask(luns, 0, TUR))[0] is SenseKey.UNIT_ATTENTION
    assert sense(ask(luns, 0, TUR)) == (SenseKey.NOT_READY, 0x04, 0x0B)
    assert sense(ask(table(*every[:3]), 0, TUR)) == (SenseKey.NOT_READY, 0x04, 0x03)
    assert sense(ask(table(*every[:2]), 0, TUR))[0] is SenseKey.HARDWARE_ERROR
    assert ask(table(*every[:1]), 0, TUR).status is ScsiStatus.RESERVATION_CONFLICT
    # Standby serves MODE SENSE; the NOT READY behind it does not.
    assert sense(ask(luns, 0, MODE_SENSE, edtl=255)) == (SenseKey.NOT_READY, 0x04, 0x03)


def test_residual_overflow_pads_good_replies_past_edtl() -> None:
    luns = table(ResidualOverflow(excess=100))
    capacity = ask(luns, 0, CAPACITY, edtl=32)
    assert len(capacity.data) == 32 + 100
    assert parse_read_capacity_16(capacity.data[:32]).size_bytes == 1 << 20
    inquiry = ask(luns, 0, INQUIRY, edtl=255)
    assert len(inquiry.data) == 255 + 100  # the real 74 bytes, zeros to EDTL, then the excess
    assert parse_standard_inquiry(inquiry.data).vendor == "PYISCSI"
    assert len(ask(luns, 0, TUR).data) == 100
    written = ask(luns, 0, write10(0, 2), edtl=2 * BLOCK, data=bytes(2 * BLOCK))
    assert written.write_length == 2 * BLOCK + 100
    failed = ask(table(ResidualOverflow(), NotReady()), 0, TUR)
    assert failed.status is ScsiStatus.CHECK_CONDITION and not failed.data


# --------------------------------------------------------------------------------------------
# The iSCSI side: holds, Data-In segments, residuals, events


def connection(*faults: Fault) -> Initiator:
    """A connection at portal a, which carries ``faults``."""
    config = TargetConfig(portals=(replace(PORTAL_A, faults=faults),), targets=(target(),))
    return Initiator(TargetConnection(config, portal=PORTAL_A.portal))


def test_a_slow_reply_is_held_back_and_so_is_what_follows() -> None:
    ini = connection(SlowScsi(seconds=1.5, luns=frozenset({1})))
    ini.login()
    ini.events()
    _, fast = ini.command(TUR, edtl=0)
    _, slow = ini.command(TUR, edtl=0, lun=encode_sam_lun(1))
    _, after = ini.command(TUR, edtl=0)
    ini.conn.receive_data(fast + slow + after)
    items = ini.conn.output()
    assert [type(item) for item in items] == [bytes, Hold, bytes, bytes]
    assert items[1] == Hold(seconds=1.5)
    responses = [decode_pdu(item) for item in items if isinstance(item, bytes)]
    assert all(isinstance(r, ScsiResponse) and r.status is ScsiStatus.GOOD for r in responses)
    events = ini.events()
    assert FaultInjected(kind=FaultKind.SLOW_SCSI) in events
    answered = [e for e in events if isinstance(e, ScsiAnswered)]
    assert [e.faults for e in answered] == [(), (FaultKind.SLOW_SCSI,), ()]


def test_data_in_is_split_into_the_faults_segments() -> None:
    ini = connection(SplitDataIn(segment=24))
    ini.login([("MaxRecvDataSegmentLength", "262144")])
    ini.events()
    image = bytes(range(256)) * 4
    ini.conn._logical_units.get(IQN, 0).store.write(0, image[:BLOCK] * 2)  # type: ignore[union-attr]
    _, raw = ini.command(read10(0, 2), edtl=2 * BLOCK, read=True)
    pdus = data_ins(ini.feed(raw))
    assert len(pdus) == -(-2 * BLOCK // 24)
    assert all(len(p.data) <= 24 for p in pdus)
    assert [p.buffer_offset for p in pdus] == list(range(0, 2 * BLOCK, 24))
    assert [p.datasn for p in pdus] == list(range(len(pdus)))
    assert b"".join(p.data for p in pdus) == image[:BLOCK] * 2
    assert pdus[-1].status is ScsiStatus.GOOD and all(p.status is None for p in pdus[:-1])
    # A reply without data is not split (there is nothing to split).
    _, tur = ini.command(TUR, edtl=0)
    [response] = ini.feed(tur)
    assert isinstance(response, ScsiResponse)


def test_residual_overflow_reaches_the_initiator_as_o_and_the_excess() -> None:
    ini = connection(ResidualOverflow(excess=300))
    ini.login()
    ini.events()
    _, raw = ini.command(CAPACITY, edtl=32, read=True)
    [last] = data_ins(ini.feed(raw))
    assert len(last.data) == 32
    assert parse_read_capacity_16(last.data).size_bytes == 1 << 20
    assert (last.overflow, last.underflow, last.residual) == (True, False, 300)
    _, write = ini.command(write10(0, 1), edtl=BLOCK, write=True, data=bytes(BLOCK))
    [response] = ini.feed(write)
    assert isinstance(response, ScsiResponse)
    assert (response.overflow, response.residual) == (True, 300)


def test_not_ready_reaches_the_initiator_as_a_response_with_sense() -> None:
    ini = connection(NotReady())
    ini.login()
    ini.events()
    _, raw = ini.command(read10(0, 1), edtl=BLOCK, read=True)
    [response] = ini.feed(raw)
    assert isinstance(response, ScsiResponse)
    assert response.status is ScsiStatus.CHECK_CONDITION
    found = parse_sense_segment(response.data)
    assert found is not None and (found.key, found.asc, found.ascq) == (SenseKey.NOT_READY, 4, 3)
    assert (response.underflow, response.residual) == (True, BLOCK)
    events = ini.events()
    assert [e for e in events if isinstance(e, FaultInjected)] == [
        FaultInjected(kind=FaultKind.NOT_READY)
    ]


def test_portal_faults_act_on_that_portal_only_and_target_faults_on_all() -> None:
    config = TargetConfig(
        portals=(replace(PORTAL_A, faults=(LunMissing(luns=frozenset({1})),)), PORTAL_B),
        targets=(target(Standby(luns=frozenset({0}))),),
    )
    units = LogicalUnits(config.targets)
    seen = {}
    for portal in config.portals:
        ini = Initiator(TargetConnection(config, portal=portal.portal, logical_units=units))
        ini.login()
        _, report = ini.command(REPORT_LUNS, edtl=4096, read=True)
        [data] = data_ins(ini.feed(report))
        _, tur = ini.command(TUR, edtl=0)
        [response] = ini.feed(tur)
        assert isinstance(response, ScsiResponse)
        seen[portal.name] = (
            [lun.linux_lun for lun in parse_report_luns(data.data).luns],
            response.status,
        )
        assert (FaultInjected(kind=FaultKind.LUN_MISSING) in ini.events()) is (portal.name == "a")
    assert seen == {
        "a": ([0], ScsiStatus.CHECK_CONDITION),
        "b": ([0, 1], ScsiStatus.CHECK_CONDITION),
    }


# --------------------------------------------------------------------------------------------
# refuse-isid at login


def login_status(ini: Initiator, isid: ISID, *, discovery: bool = False) -> LoginStatus:
    keys = [("InitiatorName", INITIATOR)]
    keys += [("SessionType", "Discovery")] if discovery else [("TargetName", IQN)]
    request = LoginRequest(
        transit=True,
        cont=False,
        csg=Stage.LOGIN_OPERATIONAL_NEGOTIATION,
        nsg=Stage.FULL_FEATURE_PHASE,
        isid=isid,
        itt=1,
        cmdsn=1,
        expstatsn=0,
        data=encode_text(keys),
    )
    ini.conn.receive_data(encode_pdu(request))
    [raw] = ini.conn.pdus_to_send()
    response = decode_pdu(raw)
    assert isinstance(response, LoginResponse) and response.status is not None
    return response.status


@pytest.mark.parametrize(
    ("match", "refused"),
    [(IsidMatch(), OPEN_ISCSI), (IsidMatch(oui=None), RANDOM_ISID)],
    ids=["open-iscsi", "random"],
)
def test_refuse_isid_refuses_matching_normal_logins_only(match: IsidMatch, refused: ISID) -> None:
    passes = RANDOM_ISID if refused == OPEN_ISCSI else OPEN_ISCSI
    fault = (RefuseIsid(isid=match),)
    for on_portal in (True, False):
        config = TargetConfig(
            portals=(replace(PORTAL_A, faults=fault if on_portal else ()),),
            targets=(replace(target(), faults=() if on_portal else fault),),
        )
        denied = Initiator(TargetConnection(config, portal=PORTAL_A.portal))
        assert login_status(denied, refused) is LoginStatus.AUTHORIZATION_FAILURE
        events = denied.events()
        assert FaultInjected(kind=FaultKind.REFUSE_ISID) in events
        [finished] = [e for e in events if isinstance(e, LoginFinished)]
        assert finished.isid == refused and not finished.succeeded
        allowed = Initiator(TargetConnection(config, portal=PORTAL_A.portal))
        assert login_status(allowed, passes) is LoginStatus.SUCCESS
        # A Discovery session is not refused: the fault guards the target's LUNs.
        discovery = Initiator(TargetConnection(config, portal=PORTAL_A.portal))
        assert login_status(discovery, refused, discovery=True) is LoginStatus.SUCCESS


def test_delivery_faults_ride_on_the_reply() -> None:
    reply = ask(table(SlowScsi(seconds=0.5), SplitDataIn(segment=4)), 0, INQUIRY, edtl=255)
    assert (reply.latency, reply.data_segment_limit) == (0.5, 4)
    assert reply.faults == (FaultKind.SPLIT_DATA_IN, FaultKind.SLOW_SCSI)
    assert parse_standard_inquiry(reply.data).is_connected_disk
    # The LU itself never looks at the EDTL a request carries.
    unit = LogicalUnits((target(),)).get(IQN, 0)
    assert unit is not None
    request = ScsiRequest(lun=0, cdb=INQUIRY.ljust(16, b"\0"), nexus=nexus())
    assert unit.execute(request) == unit.execute(replace(request, edtl=7))
