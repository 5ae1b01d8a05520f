"""The test target's SCSI logical units (pure): every command, its allocation length, the
missing-LUN answers, REPORT LUNS, and the block stores; replies are read back with the
package's own parsers (protocol/scsi.py), so both sides are held to the same SPC reading.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.protocol.pdu import ISID, ScsiStatus
from pyiscsi_failover.protocol.scsi import (
    PeripheralDeviceType,
    PeripheralQualifier,
    SenseKey,
    cdb_inquiry,
    cdb_read_capacity_10,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    encode_sam_lun,
    parse_read_capacity_10,
    parse_read_capacity_16,
    parse_report_luns,
    parse_sense,
    parse_standard_inquiry,
    parse_vpd_device_identification,
    parse_vpd_supported_pages,
    parse_vpd_unit_serial,
)
from pyiscsi_failover.testing.backing_file import open_backing_file
from pyiscsi_failover.testing.config import (
    DEFAULT_LUN_SIZE,
    LunSpec,
    TargetConfig,
    TargetSpec,
    default_wwid,
    normalize_wwid,
    parse_size,
)
from pyiscsi_failover.testing.logical_unit import (
    LogicalUnit,
    LogicalUnits,
    LunTable,
    Nexus,
    ScsiReply,
    ScsiRequest,
    SparseImage,
)
from pyiscsi_failover.testing.target import PortalConfig

IQN = "iqn.2024-01.com.example:scsi"
NEXUS = Nexus(
    initiator_name="iqn.2024-01.com.example:host",
    isid=ISID.from_bytes(bytes.fromhex("80123456789a")),
    target_name=IQN,
    portal_name="p",
    tpgt=1,
)
WWID = "6" + "0123456789abcdef" * 2
WWID = WWID[:32]


def unit(
    lun: int = 0,
    *,
    size: int = 1 << 20,
    block_size: int = 512,
    wwid: str | None = None,
    serial: str | None = None,
    vendor: str = "PYISCSI",
    product: str = "TEST DISK",
    revision: str = "0001",
) -> LogicalUnit:
    spec = LunSpec(
        lun=lun,
        size=size,
        block_size=block_size,
        wwid=wwid,
        serial=serial,
        vendor=vendor,
        product=product,
        revision=revision,
    )
    target = TargetSpec(name=IQN, luns=(spec,))
    [resolved] = target.logical_units
    return LogicalUnit(resolved, SparseImage(size, block_size))


def run(lu: LogicalUnit, cdb: bytes, data_out: bytes = b"") -> ScsiReply:
    padded = cdb + bytes(16 - len(cdb))
    return lu.execute(ScsiRequest(lun=lu.spec.lun, cdb=padded, nexus=NEXUS, data_out=data_out))


def sense_of(reply: ScsiReply) -> tuple[SenseKey, int, int]:
    assert reply.status is ScsiStatus.CHECK_CONDITION
    sense = parse_sense(reply.sense)
    assert not sense.descriptor_format
    return sense.key, sense.asc, sense.ascq


def read_cdb(lba: int, blocks: int, *, sixteen: bool = False) -> bytes:
    if sixteen:
        return bytes([0x88, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\0"


def write_cdb(lba: int, blocks: int, *, sixteen: bool = False) -> bytes:
    cdb = bytearray(read_cdb(lba, blocks, sixteen=sixteen))
    cdb[0] += 2  # 0x28 -> 0x2A, 0x88 -> 0x8A
    return bytes(cdb)


def mode_sense(page: int, *, ten: bool = False, control: int = 0, dbd: bool = False) -> bytes:
    byte1 = 0x08 if dbd else 0
    if ten:
        return bytes([0x5A, byte1, control << 6 | page, 0, 0, 0, 0, 0x10, 0, 0])
    return bytes([0x1A, byte1, control << 6 | page, 0, 0xFF, 0])


ILLEGAL = SenseKey.ILLEGAL_REQUEST


# --------------------------------------------------------------------------------------------
# Configuration of LUNs


def test_lun_spec_defaults_resolve_in_the_target() -> None:
    target = TargetSpec(name=IQN)
    [lun0] = target.logical_units
    assert (lun0.lun, lun0.blocks, lun0.block_size) == (0, DEFAULT_LUN_SIZE // 512, 512)
    assert lun0.wwid == default_wwid(IQN, 0)
    assert lun0.wwid is not None and lun0.wwid[0] == "6" and len(lun0.wwid) == 32
    assert lun0.serial == lun0.wwid[-16:]
    assert lun0.linux_wwid == f"naa.{lun0.wwid}"
    assert lun0.scsi_id == f"3{lun0.wwid}"
    # Stable across runs, distinct across LUNs and targets.
    assert default_wwid(IQN, 0) == default_wwid(IQN, 0)
    assert len({default_wwid(IQN, 0), default_wwid(IQN, 1), default_wwid(IQN + "x", 0)}) == 3


def test_target_luns_take_numbers_sorted_and_refuse_duplicates() -> None:
    target = TargetSpec(name=IQN, luns=(5, LunSpec(lun=1, wwid=f"naa.{WWID}")))
    assert [spec.lun for spec in target.logical_units] == [1, 5]
    assert target.find_lun(1) is not None and target.find_lun(1).wwid == WWID  # type: ignore[union-attr]
    assert target.find_lun(2) is None
    with pytest.raises(LocalProtocolError, match="same LUN"):
        TargetSpec(name=IQN, luns=(1, LunSpec(lun=1)))


@pytest.mark.parametrize(
    "text", [f"naa.{WWID}", f"3{WWID}", f"0x{WWID.upper()}", WWID, f" {WWID} "]
)
def test_wwid_spellings_normalise(text: str) -> None:
    assert normalize_wwid(text) == WWID


@pytest.mark.parametrize(
    "text", ["", "naa.5", "7" + "0" * 31, WWID + "0", "6" + "g" * 31, "naa." + "5" * 15]
)
def test_bad_wwids_are_refused_by_name(text: str) -> None:
    with pytest.raises(LocalProtocolError, match="WWID"):
        normalize_wwid(text)


def test_naa5_wwid_is_accepted() -> None:
    assert normalize_wwid("naa.5000c50015ea71ac") == "5000c50015ea71ac"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lun": 16384}, "LUN must be"),
        ({"lun": -1}, "LUN must be"),
        ({"lun": True}, "LUN must be"),
        ({"lun": 0, "block_size": 520}, "block size"),
        ({"lun": 0, "size": 100}, "at least one block"),
        ({"lun": 0, "size": 1000}, "not a multiple"),
        ({"lun": 0, "vendor": "TOO LONG VENDOR"}, "vendor"),
        ({"lun": 0, "product": "é"}, "product"),
        ({"lun": 0, "serial": ""}, "serial"),
        ({"lun": 0, "revision": "12345"}, "revision"),
    ],
)
def test_lun_spec_refuses_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        LunSpec(**kwargs)  # type: ignore[arg-type]


def test_lun_spec_parse() -> None:
    spec = LunSpec.parse(f"3,size=2M,block-size=4096,wwid=naa.{WWID},serial=S1,backing=/x/y")
    assert spec == LunSpec(
        lun=3, size=2 << 20, block_size=4096, wwid=WWID, serial="S1", backing=Path("/x/y")
    )
    assert LunSpec.parse("7") == LunSpec(lun=7)
    assert parse_size("64MiB") == parse_size("64m") == 64 << 20
    assert parse_size("1T") == 1 << 40


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x", "expected LUN"),
        ("1,colour=red", "not KEY=VALUE"),
        ("1,size", "not KEY=VALUE"),
        ("1,size=1M,size=2M", "twice"),
        ("1,size=lots", "size"),
        ("1,block-size=big", "block-size"),
    ],
)
def test_lun_spec_parse_errors(text: str, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        LunSpec.parse(text)


def test_config_checks_burst_lengths() -> None:
    portal = PortalConfig(host="127.0.0.1", port=0)
    with pytest.raises(LocalProtocolError, match="first_burst_length must not exceed"):
        TargetConfig(portals=(portal,), first_burst_length=8192, max_burst_length=4096)
    with pytest.raises(LocalProtocolError, match="max_burst_length must be"):
        TargetConfig(portals=(portal,), max_burst_length=100)


# --------------------------------------------------------------------------------------------
# INQUIRY


@given(allocation=st.integers(0, 0xFFFF))
def test_standard_inquiry_identity_and_allocation_length(allocation: int) -> None:
    lu = unit(vendor="ACME", product="VOLUME", revision="9.1")
    reply = run(
        lu,
        cdb_inquiry(allocation_length=max(allocation, 5)).cdb[:3] + allocation.to_bytes(2, "big"),
    )
    assert reply.status is ScsiStatus.GOOD
    assert len(reply.data) == min(allocation, 74)
    if allocation >= 36:
        parsed = parse_standard_inquiry(reply.data)
        assert parsed.is_connected_disk
        assert (parsed.vendor, parsed.product, parsed.revision) == ("ACME", "VOLUME", "9.1")
        assert parsed.version == 6
        assert parsed.truncated == (allocation < 74)
        assert reply.data[7] & 0x02  # CMDQUE
    if allocation >= 74:
        assert reply.data[4] == 69
        assert reply.data[58:66] == bytes.fromhex("00a00960046004c0")  # SAM-5 iSCSI SPC-4 SBC-3


def test_vpd_pages() -> None:
    lu = unit(wwid=WWID, serial="SERIAL42")
    pages = parse_vpd_supported_pages(run(lu, cdb_inquiry(evpd=True, page=0).cdb).data)
    assert pages.pages == (0x00, 0x80, 0x83, 0xB0, 0xB1)
    assert parse_vpd_unit_serial(run(lu, cdb_inquiry(evpd=True, page=0x80).cdb).data).serial == (
        "SERIAL42"
    )
    ident = parse_vpd_device_identification(run(lu, cdb_inquiry(evpd=True, page=0x83).cdb).data)
    assert ident.wwid == f"naa.{WWID}"
    assert ident.scsi_id == f"3{WWID}"
    assert ident.peripheral_qualifier == PeripheralQualifier.CONNECTED
    for page in (0xB0, 0xB1):
        data = run(lu, cdb_inquiry(evpd=True, page=page).cdb).data
        assert data[1] == page and int.from_bytes(data[2:4], "big") == len(data) - 4 == 0x3C
    assert run(lu, cdb_inquiry(evpd=True, page=0xB1).cdb).data[4:6] == b"\x00\x01"  # no rotation


def test_vpd_page_cut_by_allocation_length() -> None:
    lu = unit(wwid=WWID)
    reply = run(lu, cdb_inquiry(evpd=True, page=0x83, allocation_length=24).cdb)
    assert len(reply.data) == 24
    ident = parse_vpd_device_identification(reply.data)
    assert ident.truncated and ident.wwid == f"naa.{WWID}"  # the NAA designator came first


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x12, 0, 0x83, 0, 0xFF, 0]),  # a page without EVPD
        bytes([0x12, 1, 0x89, 0, 0xFF, 0]),  # a page we do not have
        bytes([0x12, 2, 0, 0, 0xFF, 0]),  # CMDDT
    ],
    ids=["page-without-evpd", "unknown-page", "cmddt"],
)
def test_inquiry_bad_fields(cdb: bytes) -> None:
    assert sense_of(run(unit(), cdb)) == (ILLEGAL, 0x24, 0)


# --------------------------------------------------------------------------------------------
# Capacity, TEST UNIT READY, REQUEST SENSE, MODE SENSE


@pytest.mark.parametrize("block_size", [512, 4096])
def test_read_capacity_10_and_16(block_size: int) -> None:
    lu = unit(size=8 << 20, block_size=block_size)
    ten = parse_read_capacity_10(run(lu, cdb_read_capacity_10().cdb).data)
    sixteen = parse_read_capacity_16(run(lu, cdb_read_capacity_16().cdb).data)
    assert ten.size_bytes == sixteen.size_bytes == 8 << 20
    assert ten.block_length == sixteen.block_length == block_size
    assert len(run(lu, cdb_read_capacity_16(allocation_length=12).cdb).data) == 12


def test_read_capacity_of_a_lun_too_large_for_ten_bytes() -> None:
    size = (1 << 32) * 512 + 512 * 7  # 2 TiB and a bit: sparse, nothing is allocated
    lu = unit(size=size)
    ten = parse_read_capacity_10(run(lu, cdb_read_capacity_10().cdb).data)
    assert ten.needs_read_capacity_16
    assert parse_read_capacity_16(run(lu, cdb_read_capacity_16().cdb).data).size_bytes == size


def test_read_capacity_bad_fields() -> None:
    lu = unit()
    lba_without_pmi = bytes([0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert sense_of(run(lu, lba_without_pmi)) == (ILLEGAL, 0x24, 0)
    get_lba_status = bytes([0x9E, 0x12]) + bytes(14)
    assert sense_of(run(lu, get_lba_status)) == (ILLEGAL, 0x24, 0)


def test_test_unit_ready_and_request_sense() -> None:
    lu = unit()
    assert run(lu, cdb_test_unit_ready().cdb) == ScsiReply()
    fixed = run(lu, bytes([0x03, 0, 0, 0, 252, 0]))
    assert fixed.status is ScsiStatus.GOOD
    assert parse_sense(fixed.data).key is SenseKey.NO_SENSE
    descriptor = run(lu, bytes([0x03, 1, 0, 0, 252, 0]))
    assert parse_sense(descriptor.data).descriptor_format
    assert len(run(lu, bytes([0x03, 0, 0, 0, 8, 0])).data) == 8


def _mode_pages(data: bytes, header: int, descriptor: int) -> dict[int, bytes]:
    pages: dict[int, bytes] = {}
    at = header + descriptor
    while at < len(data):
        pages[data[at] & 0x3F] = data[at : at + 2 + data[at + 1]]
        at += 2 + data[at + 1]
    assert at == len(data)
    return pages


@pytest.mark.parametrize("ten", [False, True], ids=["6", "10"])
@pytest.mark.parametrize("dbd", [False, True], ids=["descriptor", "dbd"])
def test_mode_sense_pages(ten: bool, dbd: bool) -> None:
    lu = unit(size=4 << 20)
    data = run(lu, mode_sense(0x3F, ten=ten, dbd=dbd)).data
    header = 8 if ten else 4
    declared = int.from_bytes(data[0:2], "big") + 2 if ten else data[0] + 1
    assert declared == len(data)
    descriptor = int.from_bytes(data[6:8], "big") if ten else data[3]
    assert descriptor == (0 if dbd else 8)
    assert not data[3 if ten else 2] & 0x80  # not write-protected
    if not dbd:
        block = data[header : header + 8]
        assert int.from_bytes(block[0:4], "big") == (4 << 20) // 512
        assert int.from_bytes(block[5:8], "big") == 512
    pages = _mode_pages(data, header, descriptor)
    assert list(pages) == [0x08, 0x0A]
    assert len(pages[0x08]) == 20 and not pages[0x08][2] & 0x04  # WCE 0
    assert len(pages[0x0A]) == 12 and not pages[0x0A][2] & 0x04  # D_SENSE 0: fixed sense
    single = run(lu, mode_sense(0x08, ten=ten, dbd=dbd)).data
    assert list(_mode_pages(single, header, descriptor)) == [0x08]


def test_mode_sense_changeable_saved_and_unknown() -> None:
    lu = unit()
    changeable = run(lu, mode_sense(0x3F, control=1, dbd=True)).data
    for page in _mode_pages(changeable, 4, 0).values():
        assert not any(page[2:])  # nothing can be changed
    assert sense_of(run(lu, mode_sense(0x3F, control=3))) == (ILLEGAL, 0x39, 0)
    assert sense_of(run(lu, mode_sense(0x1C))) == (ILLEGAL, 0x24, 0)
    subpage = bytes([0x1A, 0, 0x08, 0x01, 0xFF, 0])
    assert sense_of(run(lu, subpage)) == (ILLEGAL, 0x24, 0)
    all_subpages = bytes([0x1A, 0x08, 0x3F, 0xFF, 0xFF, 0])
    assert list(_mode_pages(run(lu, all_subpages).data, 4, 0)) == [0x08, 0x0A]
    assert len(run(lu, bytes([0x1A, 0, 0x3F, 0, 3, 0])).data) == 3  # allocation length


# --------------------------------------------------------------------------------------------
# READ and WRITE


@settings(max_examples=60)
@given(
    writes=st.lists(
        st.tuples(
            st.integers(0, 63), st.integers(0, 8), st.binary(min_size=1, max_size=8), st.booleans()
        ),
        max_size=12,
    ),
    reads=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 8), st.booleans()), max_size=8),
)
def test_read_after_write_returns_the_data(
    writes: list[tuple[int, int, bytes, bool]], reads: list[tuple[int, int, bool]]
) -> None:
    lu = unit(size=64 * 512)
    model = bytearray(64 * 512)
    for lba, blocks, pattern, sixteen in writes:
        data = (pattern * (blocks * 512))[: blocks * 512]
        reply = run(lu, write_cdb(lba, blocks, sixteen=sixteen), data)
        if lba + blocks > 64:
            assert sense_of(reply) == (ILLEGAL, 0x21, 0)
            continue
        assert reply == ScsiReply(write_length=blocks * 512)
        model[lba * 512 : (lba + blocks) * 512] = data
    for lba, blocks, sixteen in [*reads, (0, 64, False)]:
        reply = run(lu, read_cdb(lba, blocks, sixteen=sixteen))
        if lba + blocks > 64:
            assert sense_of(reply) == (ILLEGAL, 0x21, 0)
        else:
            assert reply.data == bytes(model[lba * 512 : (lba + blocks) * 512])


def test_write_with_more_data_than_the_cdb_names_writes_what_it_names() -> None:
    lu = unit()
    reply = run(lu, write_cdb(1, 1), b"A" * 512 + b"B" * 512)
    assert reply == ScsiReply(write_length=512)
    assert run(lu, read_cdb(0, 3)).data == bytes(512) + b"A" * 512 + bytes(512)


def test_write_with_less_data_than_the_cdb_names_writes_nothing() -> None:
    lu = unit()
    reply = run(lu, write_cdb(0, 2), b"A" * 512)
    assert sense_of(reply) == (ILLEGAL, 0x0E, 0x03)
    assert reply.write_length == 1024
    assert run(lu, read_cdb(0, 2)).data == bytes(1024)


def test_protection_fields_and_synchronize_cache() -> None:
    lu = unit(size=16 * 512)
    protected = bytearray(read_cdb(0, 1))
    protected[1] = 0x20
    assert sense_of(run(lu, bytes(protected))) == (ILLEGAL, 0x24, 0)
    protected[0] = 0x2A
    assert sense_of(run(lu, bytes(protected), bytes(512))) == (ILLEGAL, 0x24, 0)
    sync10 = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 16, 0])
    assert run(lu, sync10) == ScsiReply()
    sync16 = bytes([0x91, 0]) + (15).to_bytes(8, "big") + (2).to_bytes(4, "big") + bytes(2)
    assert sense_of(run(lu, sync16)) == (ILLEGAL, 0x21, 0)
    assert run(lu, read_cdb(16, 0)) == ScsiReply()  # zero blocks at the end: fine


HANDLED = {0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x35, 0x5A, 0x88, 0x8A, 0x91, 0x9E}


@given(opcode=st.integers(0, 255).filter(lambda op: op not in HANDLED))
def test_every_other_opcode_is_an_invalid_operation_code(opcode: int) -> None:
    assert sense_of(run(unit(), bytes([opcode]) + bytes(15))) == (ILLEGAL, 0x20, 0)


@settings(max_examples=300)
@given(cdb=st.binary(min_size=16, max_size=16), data=st.binary(max_size=2048))
def test_any_cdb_gets_a_reply_with_sense_when_it_fails(cdb: bytes, data: bytes) -> None:
    lu = unit(size=64 * 512)
    reply = run(lu, cdb, data)
    assert isinstance(reply, ScsiReply)
    if reply.status is ScsiStatus.CHECK_CONDITION:
        assert parse_sense(reply.sense).key in (SenseKey.ILLEGAL_REQUEST,)
    else:
        assert reply.status is ScsiStatus.GOOD and not reply.sense


# --------------------------------------------------------------------------------------------
# The session's table: REPORT LUNS and missing LUNs


def table(*luns: int) -> LunTable:
    return LunTable({lun: unit(lun) for lun in luns})


@given(
    luns=st.sets(st.integers(0, 16383), max_size=40),
    allocation=st.integers(16, 600),
    addressed=st.integers(0, 16383),
)
def test_report_luns_round_trips_through_the_parser(
    luns: set[int], allocation: int, addressed: int
) -> None:
    lun_table = LunTable({lun: unit(lun, size=512) for lun in luns})
    cdb = cdb_report_luns(allocation_length=allocation).cdb
    reply = lun_table.execute(encode_sam_lun(addressed), cdb, NEXUS, b"")
    assert reply.status is ScsiStatus.GOOD
    assert len(reply.data) == min(allocation, 8 + 8 * len(luns))
    report = parse_report_luns(reply.data)
    assert report.list_length == 8 * len(luns)
    fits = (min(allocation, len(reply.data)) - 8) // 8
    assert [lun.number for lun in report.luns] == sorted(luns)[:fits]
    assert report.truncated == (fits < len(luns))
    # Below 256 peripheral addressing, from 256 on flat (what Linux decodes back).
    assert all((lun.raw[0] == 0) == (lun.number < 256) for lun in report.luns if lun.number)


def test_report_luns_fields() -> None:
    lun_table = table(0, 3)
    short = cdb_report_luns(allocation_length=16).cdb[:6] + (15).to_bytes(4, "big") + bytes(2)
    assert sense_of(lun_table.execute(bytes(8), short, NEXUS, b"")) == (ILLEGAL, 0x24, 0)
    well_known = lun_table.execute(bytes(8), cdb_report_luns(select_report=1).cdb, NEXUS, b"")
    assert parse_report_luns(well_known.data).luns == ()
    every = lun_table.execute(bytes(8), cdb_report_luns(select_report=2).cdb, NEXUS, b"")
    assert [lun.number for lun in parse_report_luns(every.data).luns] == [0, 3]
    bad = lun_table.execute(bytes(8), cdb_report_luns(select_report=0x10).cdb, NEXUS, b"")
    assert sense_of(bad) == (ILLEGAL, 0x24, 0)
    wlun = bytes([0xC1, 0x01]) + bytes(6)
    assert lun_table.execute(wlun, cdb_report_luns().cdb, NEXUS, b"").status is ScsiStatus.GOOD


@pytest.mark.parametrize(
    "lun_field",
    [
        encode_sam_lun(7),
        encode_sam_lun(300),
        bytes([0xC1, 0x02]) + bytes(6),
        bytes([0, 1, 0, 2]) + bytes(4),
    ],
    ids=["peripheral", "flat", "well-known", "two-level"],
)
def test_missing_lun_answers(lun_field: bytes) -> None:
    lun_table = table(1)
    inquiry = lun_table.execute(lun_field, cdb_inquiry().cdb, NEXUS, b"")
    assert inquiry.status is ScsiStatus.GOOD
    parsed = parse_standard_inquiry(inquiry.data)
    assert parsed.peripheral_qualifier == PeripheralQualifier.NO_LOGICAL_UNIT
    assert parsed.device_type == PeripheralDeviceType.UNKNOWN
    assert inquiry.data[0] == 0x7F
    sense = lun_table.execute(lun_field, bytes([0x03, 0, 0, 0, 252, 0]) + bytes(10), NEXUS, b"")
    assert sense.status is ScsiStatus.GOOD
    assert (parse_sense(sense.data).asc, parse_sense(sense.data).ascq) == (0x25, 0)
    for cdb in (
        cdb_test_unit_ready().cdb,
        cdb_inquiry(evpd=True, page=0x83).cdb,
        cdb_read_capacity_16().cdb,
        read_cdb(0, 1),
    ):
        reply = lun_table.execute(lun_field, cdb + bytes(16 - len(cdb)), NEXUS, b"")
        assert sense_of(reply) == (ILLEGAL, 0x25, 0)


def test_flat_addressed_small_lun_reaches_the_lu() -> None:
    # tgtd decodes both peripheral (00 05) and flat (40 05) to LUN 5; so do we.
    lun_table = table(5)
    flat5 = bytes([0x40, 0x05]) + bytes(6)
    reply = lun_table.execute(flat5, cdb_test_unit_ready().cdb + bytes(10), NEXUS, b"")
    assert reply == ScsiReply()
    assert lun_table.luns == (5,)


# --------------------------------------------------------------------------------------------
# Stores


def test_sparse_image_reads_zeros_until_written_and_checks_spans() -> None:
    image = SparseImage(4 * 512, 512)
    assert image.read(0, 2048) == bytes(2048)
    image.write(512, b"x" * 512)
    assert image.read(0, 1024) == bytes(512) + b"x" * 512
    for offset, length in ((1, 512), (0, 100), (2048, 512), (-512, 512)):
        with pytest.raises(LocalProtocolError):
            image.read(offset, length)
    with pytest.raises(LocalProtocolError):
        SparseImage(1000, 512)


def test_backing_file_reads_writes_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * 4096 + b"tail")  # 4 KiB and 4 stray bytes
    spec = LunSpec(lun=0, backing=path)
    store = open_backing_file(spec)
    try:
        assert store.size == 4096  # whole blocks only
        assert store.read(512, 512) == b"\x01" * 512
        store.write(1024, b"Z" * 512)
        store.flush()
        assert path.read_bytes()[1024:1536] == b"Z" * 512
    finally:
        store.close()
    assert store.closed
    store.close()  # idempotent
    sized = open_backing_file(LunSpec(lun=0, backing=path, size=2048))
    assert sized.size == 2048
    sized.close()


@pytest.mark.parametrize(
    ("content", "size", "match"),
    [
        (None, None, "cannot open"),
        (b"", None, "less than one"),
        (bytes(1024), 2048, "less than the configured"),
    ],
    ids=["missing", "empty", "short"],
)
def test_backing_file_errors(
    tmp_path: Path, content: bytes | None, size: int | None, match: str
) -> None:
    path = tmp_path / "disk.img"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LocalProtocolError, match=match):
        open_backing_file(LunSpec(lun=0, backing=path, size=size))


def test_backing_file_that_shrinks_reads_zeros(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x07" * 2048)
    store = open_backing_file(LunSpec(lun=0, backing=path))
    os.truncate(path, 512)
    assert store.read(0, 1024) == b"\x07" * 512 + bytes(512)
    store.close()


def test_logical_units_share_one_lu_per_target_lun_and_refuse_backing_without_opener(
    tmp_path: Path,
) -> None:
    portal = PortalConfig(host="127.0.0.1", port=0)
    config = TargetConfig(portals=(portal,), targets=(TargetSpec(name=IQN, luns=(0, 2)),))
    units = LogicalUnits(config.targets)
    lu0 = units.get(IQN, 0)
    assert lu0 is not None and units.get(IQN, 1) is None
    assert units.table_for(config.targets[0], NEXUS).luns == (0, 2)
    assert units.table_for(config.targets[0], NEXUS).responder(encode_sam_lun(0)) is lu0
    assert len(list(units)) == 2
    backed = TargetSpec(name=IQN, luns=(LunSpec(lun=0, backing=tmp_path / "x"),))
    with pytest.raises(LocalProtocolError, match="only the server opens"):
        LogicalUnits((backed,))
    path = tmp_path / "x"
    path.write_bytes(bytes(4096))
    opened = LogicalUnits((backed,), open_backing=open_backing_file)
    lu = opened.get(IQN, 0)
    assert lu is not None and lu.blocks == 8
    opened.close()
