"""The pure SCSI layer: CDBs, reply parsers, SAM LUNs and addressing, the Linux WWID, sense.

Worked examples come from ``shared/PROTOCOL.md`` ("SCSI over the probe session"): tgtd's VPD
page 0x83 for target 1 LUN 1 built byte by byte as its ``spc_lu_init`` lays it out, tgt's LUN
256 through os-brick's SAM2 into Linux's 16640 and udev's ``lun-0x4100000000000000``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyiscsi_failover.errors import (
    LocalProtocolError,
    PDUEncodeError,
    ProtocolError,
    SCSIReplyError,
)
from pyiscsi_failover.protocol import scsi
from pyiscsi_failover.protocol.scsi import (
    MAX_FLAT_LUN,
    AddressingMode,
    Association,
    CodeSet,
    Designator,
    DesignatorType,
    LunAddressMethod,
    PeripheralDeviceType,
    PeripheralQualifier,
    ScsiOpcode,
    ScsiStatus,
    SelectReport,
    Sense,
    SenseKey,
    VpdPage,
    by_path_lun,
    cdb_inquiry,
    cdb_read_capacity_10,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    decode_sam_lun,
    encode_descriptor_sense,
    encode_fixed_sense,
    encode_read_capacity_10,
    encode_read_capacity_16,
    encode_report_luns,
    encode_sam_lun,
    encode_sense_segment,
    encode_standard_inquiry,
    encode_vpd_device_identification,
    encode_vpd_supported_pages,
    encode_vpd_unit_serial,
    int_to_scsilun,
    linux_wwid,
    lun_field,
    lun_for_addressing,
    parse_read_capacity_10,
    parse_read_capacity_16,
    parse_report_luns,
    parse_scsi_status,
    parse_sense,
    parse_sense_segment,
    parse_standard_inquiry,
    parse_vpd_device_identification,
    parse_vpd_supported_pages,
    parse_vpd_unit_serial,
    scsilun_to_int,
    udev_scsi_id,
)

# --------------------------------------------------------------------------------------------
# tgtd's worked example (PROTOCOL.md section 5), built from its description
# --------------------------------------------------------------------------------------------

TGT_T10 = b"IET     00010001" + bytes(20)
TGT_NAA3 = bytes.fromhex("3000000100000001")
TGT_NAA6 = bytes.fromhex("60000000000000000e00000000010001")
TGT_VPD83 = (
    bytes.fromhex("00830048")
    + bytes.fromhex("02010024")
    + TGT_T10
    + bytes.fromhex("01030008")
    + TGT_NAA3
    + bytes.fromhex("01030010")
    + TGT_NAA6
)
TGT_WWID = "naa.60000000000000000e00000000010001"
TGT_SCSI_ID = "360000000000000000e00000000010001"


def _designator(
    kind: DesignatorType | int,
    value: bytes,
    *,
    code_set: CodeSet | int = CodeSet.BINARY,
    association: Association | int = Association.LOGICAL_UNIT,
) -> Designator:
    return Designator(
        code_set=code_set, piv=False, association=association, designator_type=kind, value=value
    )


def test_tgt_vpd83_worked_example_parses_to_its_three_designators() -> None:
    assert len(TGT_VPD83) == 4 + 72
    page = parse_vpd_device_identification(TGT_VPD83)
    assert page.peripheral_qualifier is PeripheralQualifier.CONNECTED
    assert page.device_type is PeripheralDeviceType.DIRECT_ACCESS
    assert not page.truncated
    assert page.designators == (
        _designator(DesignatorType.T10_VENDOR_ID, TGT_T10, code_set=CodeSet.ASCII),
        _designator(DesignatorType.NAA, TGT_NAA3),
        _designator(DesignatorType.NAA, TGT_NAA6),
    )
    assert [d.naa_type for d in page.designators] == [None, 3, 6]


def test_tgt_vpd83_worked_example_renders_as_linux_and_udev_show_it() -> None:
    page = parse_vpd_device_identification(TGT_VPD83)
    assert page.wwid == TGT_WWID
    assert page.scsi_id == TGT_SCSI_ID
    assert linux_wwid(page.designators) == TGT_WWID
    assert udev_scsi_id(page.designators) == TGT_SCSI_ID


def test_tgt_vpd83_rebuilds_byte_for_byte() -> None:
    page = parse_vpd_device_identification(TGT_VPD83)
    assert encode_vpd_device_identification(page.designators) == TGT_VPD83


def test_tgt_vpd83_without_its_naa6_shows_the_later_of_two_equal_ranks() -> None:
    # T10 and NAA-3 both rank 1 in the kernel: the later one (NAA-3) wins the tie.
    designators = parse_vpd_device_identification(TGT_VPD83).designators[:2]
    assert linux_wwid(designators) == "naa.3000000100000001"
    assert udev_scsi_id(designators) == "33000000100000001"  # udev: any NAA before T10


def test_t10_alone_is_escaped_as_the_kernel_prints_it_and_cut_at_nul_by_udev() -> None:
    t10 = [_designator(DesignatorType.T10_VENDOR_ID, TGT_T10, code_set=CodeSet.ASCII)]
    assert linux_wwid(t10) == "t10.IET     00010001" + "\\0" * 20
    assert udev_scsi_id(t10) == "1IET     00010001"


def test_kernel_escapes_control_bytes_like_percent_p_e() -> None:
    raw = b"A\n\t\x07\x1b\x00\x01\x7f\x80\xa0\xff\\"
    t10 = [_designator(DesignatorType.T10_VENDOR_ID, raw, code_set=CodeSet.ASCII)]
    assert linux_wwid(t10) == "t10.A\\n\\t\\a\\e\\0\\001\\177\\200\xa0\xff\\"


def test_tgtadm_scsi_id_example_renders_its_naa6() -> None:
    # tgtadm --params scsi_id=0123456789abcdef0123456789abcdef: NAA 6 holds the nibbles, top 6.
    naa6 = _designator(DesignatorType.NAA, bytes.fromhex("6123456789abcdef0123456789abcdef"))
    designators = [_designator(DesignatorType.NAA, TGT_NAA3), naa6]
    assert linux_wwid(designators) == "naa.6123456789abcdef0123456789abcdef"
    assert udev_scsi_id(designators) == "36123456789abcdef0123456789abcdef"


# The kernel's ranks, one designator each, ordered from strongest to weakest.
_RANKED = [
    _designator(DesignatorType.SCSI_NAME_STRING, b"iqn.2001-04.com.example:lu\x00\x00", code_set=3),
    _designator(DesignatorType.NAA, bytes.fromhex("6" + "1" * 31)),
    _designator(DesignatorType.EUI_64, bytes(range(1, 17))),
    _designator(DesignatorType.EUI_64, bytes(range(1, 13))),
    _designator(DesignatorType.NAA, bytes.fromhex("5" + "2" * 15)),
    _designator(DesignatorType.NAA, bytes.fromhex("4" + "3" * 15)),
    _designator(DesignatorType.EUI_64, bytes(range(1, 9))),
]
_RENDERED = [
    "iqn.2001-04.com.example:lu",
    "naa.6" + "1" * 31,
    "eui.0102030405060708090a0b0c0d0e0f10",
    "eui.0102030405060708090a0b0c",
    "naa.5" + "2" * 15,
    "naa.4" + "3" * 15,
    "eui.0102030405060708",
]


@pytest.mark.parametrize("index", range(len(_RANKED)))
def test_kernel_prefers_the_higher_rank_in_either_order(index: int) -> None:
    weaker = [*_RANKED[index + 1 :], _designator(DesignatorType.NAA, TGT_NAA3)]
    assert linux_wwid([_RANKED[index], *weaker]) == _RENDERED[index]
    assert linux_wwid([*weaker, _RANKED[index]]) == _RENDERED[index]


def test_only_designators_of_the_logical_unit_count() -> None:
    port = _designator(DesignatorType.NAA, TGT_NAA6, association=Association.TARGET_PORT)
    device = _designator(DesignatorType.NAA, TGT_NAA6, association=Association.TARGET_DEVICE)
    lu = _designator(DesignatorType.NAA, TGT_NAA3)
    assert linux_wwid([port, device, lu]) == "naa.3000000100000001"
    assert udev_scsi_id([port, device, lu]) == "33000000100000001"
    assert linux_wwid([port]) is None
    assert udev_scsi_id([port]) is None


def test_udev_searches_naa6_then_naa5_then_any_naa_then_eui_then_t10() -> None:
    t10 = _designator(DesignatorType.T10_VENDOR_ID, b"VENDOR  thing", code_set=CodeSet.ASCII)
    eui = _designator(DesignatorType.EUI_64, bytes(range(8)))
    naa3 = _designator(DesignatorType.NAA, TGT_NAA3)
    naa5 = _designator(DesignatorType.NAA, bytes.fromhex("5" + "2" * 15))
    naa6 = _designator(DesignatorType.NAA, TGT_NAA6)
    assert udev_scsi_id([t10, eui, naa3, naa5, naa6]) == "3" + TGT_NAA6.hex()
    assert udev_scsi_id([t10, eui, naa3, naa5]) == "35" + "2" * 15
    assert udev_scsi_id([t10, eui, naa3]) == "3" + TGT_NAA3.hex()
    assert udev_scsi_id([t10, eui]) == "20001020304050607"
    assert udev_scsi_id([t10]) == "1VENDOR  thing"


def test_udev_takes_binary_before_ascii_and_ignores_other_code_sets() -> None:
    ascii_naa6 = _designator(DesignatorType.NAA, b"6abc", code_set=CodeSet.ASCII)
    binary_naa6 = _designator(DesignatorType.NAA, TGT_NAA6)
    utf8_naa6 = _designator(DesignatorType.NAA, TGT_NAA6, code_set=CodeSet.UTF8)
    assert udev_scsi_id([ascii_naa6, binary_naa6]) == TGT_SCSI_ID
    assert udev_scsi_id([ascii_naa6]) == "36abc"
    assert udev_scsi_id([utf8_naa6]) is None


def test_the_kernel_never_shows_an_empty_or_odd_length_naa_and_udev_has_no_name_form() -> None:
    empty = _designator(DesignatorType.NAA, b"")
    odd = _designator(DesignatorType.NAA, bytes.fromhex("6" + "0" * 19))  # 10 bytes
    assert linux_wwid([empty]) is None
    assert linux_wwid([odd]) is None
    name = _RANKED[0]
    assert udev_scsi_id([name]) is None  # type 8 is never searched: no "8..." from scsi_id


def test_a_t10_shorter_than_the_current_choice_does_not_replace_it() -> None:
    long_t10 = _designator(DesignatorType.T10_VENDOR_ID, b"LONGER  vendor id", code_set=2)
    short_t10 = _designator(DesignatorType.T10_VENDOR_ID, b"SHORT", code_set=2)
    assert linux_wwid([long_t10, short_t10]) == "t10.LONGER  vendor id"
    assert linux_wwid([short_t10, long_t10]) == "t10.LONGER  vendor id"


# --------------------------------------------------------------------------------------------
# CDBs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cdb", "hex_bytes", "transfer"),
    [
        (cdb_test_unit_ready(), "000000000000", 0),
        (cdb_inquiry(), "12000000ff00", 255),
        (cdb_inquiry(allocation_length=36), "120000002400", 36),
        (cdb_inquiry(evpd=True, page=VpdPage.DEVICE_IDENTIFICATION), "12018300ff00", 255),
        (cdb_inquiry(evpd=True, page=0, allocation_length=4), "120100000400", 4),
        (cdb_report_luns(), "a0" + "00" * 5 + "00001000" + "0000", 4096),
        (
            cdb_report_luns(select_report=SelectReport.ALL, allocation_length=16),
            "a00002000000000000100000",
            16,
        ),
        (cdb_read_capacity_10(), "25" + "00" * 9, 8),
        (cdb_read_capacity_16(), "9e10" + "00" * 8 + "00000020" + "0000", 32),
    ],
)
def test_cdb_bytes(cdb: scsi.Cdb, hex_bytes: str, transfer: int) -> None:
    assert cdb.cdb.hex() == hex_bytes
    assert cdb.transfer_length == transfer


def test_cdb_layouts_exactly() -> None:
    assert cdb_inquiry().cdb == bytes.fromhex("12 00 00 00 ff 00")
    assert cdb_inquiry(evpd=True, page=0x83).cdb == bytes.fromhex("12 01 83 00 ff 00")
    assert cdb_report_luns().cdb == bytes.fromhex("a0 00 00 00 00 00 00 00 10 00 00 00")
    assert cdb_read_capacity_10().cdb == bytes.fromhex("25 00 00 00 00 00 00 00 00 00")
    assert cdb_read_capacity_16().cdb == bytes.fromhex("9e 10" + " 00" * 8 + " 00 00 00 20 00 00")
    assert cdb_inquiry().opcode is ScsiOpcode.INQUIRY
    assert cdb_read_capacity_16().opcode is ScsiOpcode.SERVICE_ACTION_IN_16
    assert cdb_test_unit_ready().opcode is ScsiOpcode.TEST_UNIT_READY


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: cdb_inquiry(page=0x83), "page"),
        (lambda: cdb_inquiry(evpd=True, page=0x100), "page"),
        (lambda: cdb_inquiry(evpd=True, page=-1), "page"),
        (lambda: cdb_inquiry(allocation_length=4), "allocation_length"),
        (lambda: cdb_inquiry(evpd=True, allocation_length=3), "allocation_length"),
        (lambda: cdb_inquiry(allocation_length=0x10000), "allocation_length"),
        (lambda: cdb_inquiry(evpd=1), "evpd"),  # type: ignore[arg-type]
        (lambda: cdb_inquiry(allocation_length=True), "allocation_length"),
        (lambda: cdb_report_luns(allocation_length=15), "allocation_length"),
        (lambda: cdb_report_luns(allocation_length=2**32), "allocation_length"),
        (lambda: cdb_report_luns(select_report=0x100), "select_report"),
        (lambda: cdb_read_capacity_16(allocation_length=11), "allocation_length"),
        (lambda: cdb_read_capacity_16(allocation_length=1.5), "allocation_length"),  # type: ignore[arg-type]
    ],
)
def test_bad_cdb_arguments_are_refused_naming_the_field(
    build: Callable[[], object], field: str
) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        build()
    assert isinstance(caught.value, PDUEncodeError)
    assert caught.value.field == field
    assert field in str(caught.value)


# --------------------------------------------------------------------------------------------
# Standard INQUIRY
# --------------------------------------------------------------------------------------------

TGT_LUN0 = encode_standard_inquiry(
    vendor="IET",
    product="Controller",
    revision="0001",
    device_type=PeripheralDeviceType.STORAGE_ARRAY_CONTROLLER,
)


def test_standard_inquiry_of_a_disk() -> None:
    data = encode_standard_inquiry(vendor="IET", product="VIRTUAL-DISK", revision="0001", tpgs=1)
    assert len(data) == 36
    assert data[8:36] == b"IET     VIRTUAL-DISK    0001"
    inquiry = parse_standard_inquiry(data)
    assert inquiry.peripheral_qualifier is PeripheralQualifier.CONNECTED
    assert inquiry.device_type is PeripheralDeviceType.DIRECT_ACCESS
    assert (inquiry.vendor, inquiry.product, inquiry.revision) == ("IET", "VIRTUAL-DISK", "0001")
    assert inquiry.tpgs == 1
    assert inquiry.length == 36
    assert not inquiry.truncated
    assert inquiry.is_connected_disk


def test_tgt_lun0_is_a_controller_not_a_disk() -> None:
    inquiry = parse_standard_inquiry(TGT_LUN0)
    assert inquiry.device_type is PeripheralDeviceType.STORAGE_ARRAY_CONTROLLER
    assert not inquiry.is_connected_disk


def test_tgt_missing_lun_is_lun0_data_marked_7f() -> None:
    inquiry = parse_standard_inquiry(b"\x7f" + TGT_LUN0[1:])
    assert inquiry.peripheral_qualifier is PeripheralQualifier.NO_LOGICAL_UNIT
    assert inquiry.device_type is PeripheralDeviceType.UNKNOWN
    assert not inquiry.is_connected_disk


def test_unknown_device_type_and_qualifier_are_kept_as_ints() -> None:
    inquiry = parse_standard_inquiry(bytes([0b101_10101]) + TGT_LUN0[1:])
    assert inquiry.peripheral_qualifier == 5
    assert not isinstance(inquiry.peripheral_qualifier, PeripheralQualifier)
    assert inquiry.device_type == 0x15
    assert not isinstance(inquiry.device_type, PeripheralDeviceType)


@pytest.mark.parametrize("size", range(5, 36))
def test_a_truncated_standard_inquiry_keeps_what_arrived(size: int) -> None:
    data = encode_standard_inquiry(vendor="VENDOR12", product="PRODUCT-NAME-16C", revision="R1.2")
    inquiry = parse_standard_inquiry(data[:size])
    assert inquiry.truncated
    assert inquiry.length == 36
    assert "VENDOR12".startswith(inquiry.vendor)
    assert "PRODUCT-NAME-16C".startswith(inquiry.product)
    assert "R1.2".startswith(inquiry.revision)


def test_standard_inquiry_longer_than_declared_is_not_truncated() -> None:
    data = TGT_LUN0[:4] + bytes([91]) + TGT_LUN0[5:] + bytes(60)
    inquiry = parse_standard_inquiry(data)
    assert inquiry.length == 96
    assert not inquiry.truncated
    assert inquiry.vendor == "IET"


def test_non_ascii_identity_bytes_are_shown_escaped_not_refused() -> None:
    data = bytearray(TGT_LUN0)
    data[8:11] = b"I\xffT"
    assert parse_standard_inquiry(bytes(data)).vendor == "I\\xffT"


def test_a_standard_inquiry_without_its_header_is_refused() -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse_standard_inquiry(TGT_LUN0[:4])
    assert caught.value.field == "ADDITIONAL LENGTH"
    assert "ADDITIONAL LENGTH" in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vendor": "NINE CHAR"}, "vendor"),
        ({"product": "é"}, "product"),
        ({"revision": "a\nb"}, "revision"),
        ({"device_type": 0x20}, "device_type"),
        ({"peripheral_qualifier": 8}, "peripheral_qualifier"),
        ({"tpgs": 4}, "tpgs"),
    ],
)
def test_encode_standard_inquiry_refuses_what_does_not_fit(
    kwargs: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {"vendor": "V", "product": "P", "revision": "R", **kwargs}
    with pytest.raises(PDUEncodeError) as caught:
        encode_standard_inquiry(**args)  # type: ignore[arg-type]
    assert caught.value.field == field


printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)


@given(
    vendor=printable.filter(lambda s: len(s) <= 8),
    product=printable,
    revision=printable.filter(lambda s: len(s) <= 4),
    qualifier=st.integers(0, 7),
    device_type=st.integers(0, 0x1F),
    removable=st.booleans(),
    tpgs=st.integers(0, 3),
)
def test_standard_inquiry_round_trip(
    vendor: str,
    product: str,
    revision: str,
    qualifier: int,
    device_type: int,
    removable: bool,
    tpgs: int,
) -> None:
    data = encode_standard_inquiry(
        vendor=vendor,
        product=product,
        revision=revision,
        peripheral_qualifier=qualifier,
        device_type=device_type,
        removable=removable,
        tpgs=tpgs,
    )
    inquiry = parse_standard_inquiry(data)
    assert (inquiry.vendor, inquiry.product, inquiry.revision) == (vendor, product, revision)
    assert (inquiry.peripheral_qualifier, inquiry.device_type) == (qualifier, device_type)
    assert (inquiry.removable, inquiry.tpgs, inquiry.truncated) == (removable, tpgs, False)


# --------------------------------------------------------------------------------------------
# VPD pages
# --------------------------------------------------------------------------------------------


def test_supported_pages_round_trip_and_truncation() -> None:
    data = encode_vpd_supported_pages([0x00, 0x80, 0x83, 0xB0])
    assert data == bytes.fromhex("00 00 00 04 00 80 83 b0")
    page = parse_vpd_supported_pages(data)
    assert page.pages == (0x00, 0x80, 0x83, 0xB0)
    assert not page.truncated
    cut = parse_vpd_supported_pages(data[:6])
    assert cut.pages == (0x00, 0x80)
    assert cut.truncated


def test_tgt_unit_serial_is_right_justified_and_read_without_padding() -> None:
    data = encode_vpd_unit_serial("beaf11", width=36)
    assert data == bytes.fromhex("00 80 00 24") + b" " * 30 + b"beaf11"
    page = parse_vpd_unit_serial(data)
    assert page.serial == "beaf11"
    assert not page.truncated
    assert parse_vpd_unit_serial(data[:20]).truncated


@pytest.mark.parametrize(
    "parse", [parse_vpd_supported_pages, parse_vpd_unit_serial, parse_vpd_device_identification]
)
def test_a_vpd_reply_for_another_page_is_refused(parse: Callable[[bytes], object]) -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse(bytes.fromhex("00 b0 00 00"))
    assert caught.value.field == "PAGE CODE"
    assert caught.value.offset == 1
    assert caught.value.value == 0xB0


@pytest.mark.parametrize(
    "parse", [parse_vpd_supported_pages, parse_vpd_unit_serial, parse_vpd_device_identification]
)
def test_a_vpd_reply_without_its_header_is_refused(parse: Callable[[bytes], object]) -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse(b"\x00\x83\x00")
    assert caught.value.field == "PAGE LENGTH"


def test_vpd_qualifier_is_kept_for_tgt_missing_lun() -> None:
    page = parse_vpd_device_identification(b"\x7f" + TGT_VPD83[1:])
    assert page.peripheral_qualifier is PeripheralQualifier.NO_LOGICAL_UNIT
    assert page.wwid == TGT_WWID  # the page is LUN 0's: the qualifier is what says "missing"


@given(st.integers(4, len(TGT_VPD83) - 1))
def test_a_cut_vpd83_keeps_whole_designators_and_says_truncated(size: int) -> None:
    full = parse_vpd_device_identification(TGT_VPD83).designators
    page = parse_vpd_device_identification(TGT_VPD83[:size])
    assert page.truncated
    assert page.designators == full[: len(page.designators)]
    whole = {44: 1, 56: 2}
    assert len(page.designators) == max([n for end, n in whole.items() if size >= end] + [0])


def test_a_designator_overrunning_a_complete_page_is_refused() -> None:
    broken = bytearray(TGT_VPD83)
    broken[56 + 3] = 0x11  # NAA 6 claims 17 bytes; the page holds 16
    with pytest.raises(SCSIReplyError) as caught:
        parse_vpd_device_identification(bytes(broken))
    assert caught.value.field == "DESIGNATOR LENGTH"
    assert caught.value.offset == 59
    assert caught.value.value == 0x11


def test_a_designator_header_cut_by_the_page_length_is_refused() -> None:
    page = bytes.fromhex("00 83 00 02 01 03")  # a complete page of 2 bytes: half a header
    with pytest.raises(SCSIReplyError) as caught:
        parse_vpd_device_identification(page)
    assert caught.value.field == "DESIGNATOR LENGTH"


def test_vpd83_bytes_after_the_page_are_ignored() -> None:
    page = parse_vpd_device_identification(TGT_VPD83 + b"\xff" * 7)
    assert page.wwid == TGT_WWID
    assert not page.truncated


designators = st.builds(
    Designator,
    code_set=st.integers(0, 15),
    piv=st.booleans(),
    association=st.integers(0, 3),
    designator_type=st.integers(0, 15),
    value=st.binary(max_size=40),
    protocol_identifier=st.integers(0, 15),
)


@given(st.lists(designators, max_size=6))
def test_vpd83_round_trip(items: list[Designator]) -> None:
    page = parse_vpd_device_identification(encode_vpd_device_identification(items))
    assert page.designators == tuple(items)
    assert not page.truncated
    # The renderers are total over whatever a page holds.
    wwid = linux_wwid(page.designators)
    named = any(d.designator_type == 8 and d.association == 0 and d.value for d in items)
    assert wwid is None or wwid.startswith(("naa.", "eui.", "t10.")) or named
    scsi_id = udev_scsi_id(page.designators)
    assert scsi_id is None or scsi_id[0] in "123"


def test_designator_to_bytes_refuses_an_oversized_value() -> None:
    with pytest.raises(PDUEncodeError):
        _designator(DesignatorType.NAA, bytes(256)).to_bytes()


# --------------------------------------------------------------------------------------------
# SAM LUNs and addressing
# --------------------------------------------------------------------------------------------


def test_tgt_lun_256_through_sam2_is_linux_16640_and_lun_0x4100() -> None:
    linux = lun_for_addressing(256, AddressingMode.SAM2)
    assert linux == 16640
    field = lun_field(256, "SAM2")
    assert field == bytes.fromhex("41 00 00 00 00 00 00 00")
    assert field == encode_sam_lun(256)  # what tgtd lists in REPORT LUNS
    assert scsilun_to_int(field) == 16640
    assert by_path_lun(linux) == "lun-0x4100000000000000"
    lun = decode_sam_lun(field)
    assert (lun.method, lun.number, lun.linux_lun) == (LunAddressMethod.FLAT, 256, 16640)


def test_tgt_lun_256_with_the_default_sam_is_not_what_tgt_lists() -> None:
    field = lun_field(256)
    assert field == bytes.fromhex("01 00 00 00 00 00 00 00")  # peripheral, bus 1: not LUN 256
    lun = decode_sam_lun(field)
    assert (lun.method, lun.number) == (LunAddressMethod.PERIPHERAL, None)
    assert not parse_report_luns(encode_report_luns([encode_sam_lun(256)])).lists(field)
    assert by_path_lun(256) == "lun-0x0100000000000000"


@pytest.mark.parametrize(
    ("raw", "linux"),
    [("0005000000000000", 5), ("4100000000000000", 16640), ("0000000000000000", 0)],
)
def test_scsilun_to_int_examples(raw: str, linux: int) -> None:
    assert scsilun_to_int(bytes.fromhex(raw)) == linux
    assert int_to_scsilun(linux) == bytes.fromhex(raw)


def test_scsilun_levels_land_in_16_bit_steps() -> None:
    assert scsilun_to_int(bytes.fromhex("0001 0002 0003 0004")) == 0x0004_0003_0002_0001
    assert int_to_scsilun(0x0004_0003_0002_0001) == bytes.fromhex("0001000200030004")


def test_report_luns_well_known_lun_and_other_methods() -> None:
    wlun = decode_sam_lun(bytes.fromhex("c101000000000000"))
    assert (wlun.method, wlun.number, wlun.well_known) == (LunAddressMethod.EXTENDED, None, 1)
    assert wlun.linux_lun == 0xC101
    logical = decode_sam_lun(bytes.fromhex("8001000000000000"))
    assert (logical.method, logical.number) == (LunAddressMethod.LOGICAL_UNIT, None)
    two_level = decode_sam_lun(bytes.fromhex("0001000200000000"))
    assert (two_level.method, two_level.number) == (LunAddressMethod.PERIPHERAL, None)


@given(st.integers(0, MAX_FLAT_LUN))
def test_sam_lun_encode_decode(number: int) -> None:
    raw = encode_sam_lun(number)
    lun = decode_sam_lun(raw)
    assert lun.number == number
    assert lun.method is (LunAddressMethod.PERIPHERAL if number < 256 else LunAddressMethod.FLAT)
    flat = decode_sam_lun(encode_sam_lun(number, method=LunAddressMethod.FLAT))
    assert (flat.method, flat.number) == (LunAddressMethod.FLAT, number)
    assert flat.linux_lun == 0x4000 | number


@given(st.integers(0, MAX_FLAT_LUN), st.sampled_from(list(AddressingMode)))
def test_addressing_modes_as_os_brick_applies_them(number: int, mode: AddressingMode) -> None:
    linux = lun_for_addressing(number, mode)
    if mode is AddressingMode.SAM3_FLAT or (mode is AddressingMode.SAM2 and number >= 256):
        assert linux == number + 16384
    else:
        assert linux == number
    assert lun_for_addressing(number, mode.value) == linux  # the connection_info spelling
    field = lun_field(number, mode)
    assert scsilun_to_int(field) == linux
    lun = decode_sam_lun(field)
    if mode in (AddressingMode.SAM2, AddressingMode.SAM3_FLAT):
        # These modes address the backend's LUN number exactly, as tgtd lists it for SAM2.
        assert lun.number == number
        if mode is AddressingMode.SAM2:
            assert field == encode_sam_lun(number)
    elif number < 256:
        assert lun.number == number
    expected = f"lun-{linux}" if linux < 256 else f"lun-0x{linux:04x}000000000000"
    assert by_path_lun(linux) == expected


@given(st.integers(0, 2**64 - 1))
def test_linux_lun_integers_round_trip(linux: int) -> None:
    assert scsilun_to_int(int_to_scsilun(linux)) == linux
    name = by_path_lun(linux)
    if linux >= 256:
        assert name == (f"lun-0x{linux & 0xFFFF:04x}{(linux >> 16) & 0xFFFF:04x}00000000")


@given(st.binary(min_size=8, max_size=8))
def test_any_8_byte_lun_decodes(raw: bytes) -> None:
    lun = decode_sam_lun(raw)
    assert lun.raw == raw
    assert int_to_scsilun(lun.linux_lun) == raw
    if lun.number is not None:
        assert encode_sam_lun(lun.number, method=lun.method) == raw


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: lun_for_addressing(16384, "SAM2"), "lun"),
        (
            lambda: lun_for_addressing(1, "SAM3-flat") and lun_for_addressing(16384, "SAM3-flat"),
            "lun",
        ),
        (lambda: lun_for_addressing(-1), "lun"),
        (lambda: lun_for_addressing(1, "sam2"), "addressing_mode"),
        (lambda: lun_for_addressing(1, "SAM4"), "addressing_mode"),
        (lambda: encode_sam_lun(256, method=LunAddressMethod.PERIPHERAL), "lun"),
        (lambda: encode_sam_lun(16384), "lun"),
        (lambda: encode_sam_lun(1, method=LunAddressMethod.EXTENDED), "method"),
        (lambda: decode_sam_lun(b"\x00" * 7), "lun"),
        (lambda: scsilun_to_int(b"\x00" * 9), "lun"),
        (lambda: int_to_scsilun(2**64), "lun"),
        (lambda: by_path_lun(-1), "linux_lun"),
    ],
)
def test_bad_lun_arguments_are_refused(call: Callable[[], object], field: str) -> None:
    with pytest.raises(PDUEncodeError) as caught:
        call()
    assert caught.value.field == field


def test_sam_and_transparent_take_a_full_64_bit_lun() -> None:
    assert lun_for_addressing(2**64 - 1, AddressingMode.TRANSPARENT) == 2**64 - 1
    assert lun_for_addressing(2**40, AddressingMode.SAM) == 2**40


# --------------------------------------------------------------------------------------------
# REPORT LUNS
# --------------------------------------------------------------------------------------------


def test_tgt_report_luns_lists_controller_and_disks() -> None:
    data = encode_report_luns([encode_sam_lun(n) for n in (0, 1, 256)])
    assert data[:8] == bytes.fromhex("00000018 00000000")
    report = parse_report_luns(data)
    assert report.list_length == 24
    assert [lun.number for lun in report.luns] == [0, 1, 256]
    assert not report.truncated
    assert report.lists(lun_field(1))
    assert report.lists(lun_field(256, AddressingMode.SAM2))
    assert not report.lists(lun_field(2))


@given(st.lists(st.integers(0, MAX_FLAT_LUN), max_size=20), st.integers(0, 200))
def test_report_luns_cut_anywhere_says_so(numbers: list[int], cut: int) -> None:
    data = encode_report_luns([encode_sam_lun(n) for n in numbers])
    size = max(8, min(cut, len(data)))
    report = parse_report_luns(data[:size])
    assert report.list_length == 8 * len(numbers)
    assert [lun.number for lun in report.luns] == numbers[: (size - 8) // 8]
    assert report.truncated == (size < len(data))


def test_report_luns_with_a_ragged_list_length_is_refused() -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse_report_luns(bytes.fromhex("0000000c 00000000") + bytes(12))
    assert (caught.value.field, caught.value.offset, caught.value.value) == (
        "LUN LIST LENGTH",
        0,
        12,
    )


def test_report_luns_without_its_header_is_refused() -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse_report_luns(bytes(7))
    assert caught.value.field == "LUN LIST LENGTH"


# --------------------------------------------------------------------------------------------
# READ CAPACITY
# --------------------------------------------------------------------------------------------


def test_read_capacity_10_of_a_1_mib_lun() -> None:
    data = encode_read_capacity_10(last_lba=2047, block_length=512)
    assert data == bytes.fromhex("000007ff 00000200")
    capacity = parse_read_capacity_10(data)
    assert (capacity.last_lba, capacity.block_length, capacity.size_bytes) == (2047, 512, 1 << 20)
    assert not capacity.needs_read_capacity_16


def test_read_capacity_10_saying_use_16() -> None:
    capacity = parse_read_capacity_10(
        encode_read_capacity_10(last_lba=0xFFFFFFFF, block_length=512)
    )
    assert capacity.needs_read_capacity_16
    assert capacity.size_bytes is None


def test_read_capacity_16_of_a_large_thin_lun() -> None:
    data = encode_read_capacity_16(
        last_lba=(1 << 33) - 1, block_length=4096, physical_block_exponent=3, thin_provisioned=True
    )
    assert len(data) == 32
    capacity = parse_read_capacity_16(data)
    assert capacity.size_bytes == (1 << 33) * 4096
    assert (capacity.physical_block_exponent, capacity.thin_provisioned) == (3, True)
    short = parse_read_capacity_16(data[:12])
    assert short.size_bytes == capacity.size_bytes
    assert (short.physical_block_exponent, short.thin_provisioned) == (0, False)


@given(st.integers(0, 2**64 - 1), st.integers(1, 2**32 - 1))
def test_read_capacity_16_round_trip(last_lba: int, block_length: int) -> None:
    data = encode_read_capacity_16(last_lba=last_lba, block_length=block_length)
    capacity = parse_read_capacity_16(data)
    assert capacity.size_bytes == (last_lba + 1) * block_length
    assert (capacity.last_lba, capacity.block_length) == (last_lba, block_length)


@pytest.mark.parametrize(
    ("parse", "data", "field"),
    [
        (parse_read_capacity_10, bytes(7), "LOGICAL BLOCK LENGTH"),
        (parse_read_capacity_10, bytes.fromhex("000007ff00000000"), "LOGICAL BLOCK LENGTH"),
        (parse_read_capacity_16, bytes(11), "LOGICAL BLOCK LENGTH"),
        (parse_read_capacity_16, bytes(32), "LOGICAL BLOCK LENGTH"),
    ],
)
def test_bad_read_capacity_replies_are_refused(
    parse: Callable[[bytes], object], data: bytes, field: str
) -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse(data)
    assert caught.value.field == field


# --------------------------------------------------------------------------------------------
# Status and sense
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "asc", "ascq", "text"),
    [
        (SenseKey.NOT_READY, 0x04, 0x01, "NOT READY 04/01: logical unit is in process of becoming"),
        (
            SenseKey.NOT_READY,
            0x04,
            0x0B,
            "NOT READY 04/0B: logical unit not accessible, target port in standby",
        ),
        (
            SenseKey.NOT_READY,
            0x04,
            0x0C,
            "NOT READY 04/0C: logical unit not accessible, target port in unavailable",
        ),
        (SenseKey.NOT_READY, 0x3A, 0x00, "NOT READY 3A/00: medium not present"),
        (SenseKey.UNIT_ATTENTION, 0x29, 0x00, "UNIT ATTENTION 29/00: power on, reset"),
        (
            SenseKey.UNIT_ATTENTION,
            0x3F,
            0x0E,
            "UNIT ATTENTION 3F/0E: reported LUNs data has changed",
        ),
        (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00, "ILLEGAL REQUEST 20/00: invalid command operation"),
        (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, "ILLEGAL REQUEST 24/00: invalid field in CDB"),
        (SenseKey.ILLEGAL_REQUEST, 0x25, 0x00, "ILLEGAL REQUEST 25/00: logical unit not supported"),
        (SenseKey.ABORTED_COMMAND, 0xEE, 0x42, "ABORTED COMMAND EE/42: no description known"),
    ],
)
def test_common_sense_codes_read_plainly(key: SenseKey, asc: int, ascq: int, text: str) -> None:
    for data in (encode_fixed_sense(key, asc, ascq), encode_descriptor_sense(key, asc, ascq)):
        sense = parse_sense(data)
        assert (sense.key, sense.asc, sense.ascq) == (key, asc, ascq)
        assert sense.description.startswith(text)


def test_tgt_sense_is_18_byte_fixed_format() -> None:
    data = encode_fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
    assert data == bytes.fromhex("70 00 05 00 00 00 00 0a 00 00 00 00 25 00 00 00 00 00")
    sense = parse_sense(data)
    assert sense == Sense(key=SenseKey.ILLEGAL_REQUEST, asc=0x25, ascq=0)


@given(
    key=st.sampled_from(list(SenseKey)),
    asc=st.integers(0, 255),
    ascq=st.integers(0, 255),
    deferred=st.booleans(),
    valid_bit=st.booleans(),
)
def test_sense_round_trip_in_both_formats(
    key: SenseKey, asc: int, ascq: int, deferred: bool, valid_bit: bool
) -> None:
    fixed = bytearray(encode_fixed_sense(key, asc, ascq, deferred=deferred))
    fixed[0] |= 0x80 if valid_bit else 0  # the VALID bit is not part of the response code
    assert parse_sense(bytes(fixed)) == Sense(key=key, asc=asc, ascq=ascq, deferred=deferred)
    descriptor = parse_sense(encode_descriptor_sense(key, asc, ascq, deferred=deferred))
    assert descriptor == Sense(
        key=key, asc=asc, ascq=ascq, deferred=deferred, descriptor_format=True
    )
    segment = encode_sense_segment(bytes(fixed))
    assert parse_sense_segment(segment) == parse_sense(bytes(fixed))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "RESPONSE CODE"),
        (bytes.fromhex("7f") + bytes(17), "RESPONSE CODE"),
        (bytes.fromhex("00") + bytes(17), "RESPONSE CODE"),
        (encode_fixed_sense(2, 4, 1)[:13], "ADDITIONAL SENSE CODE QUALIFIER"),
        (bytes.fromhex("70 00 02 00 00 00 00 05") + bytes(10), "ADDITIONAL SENSE LENGTH"),
        (encode_descriptor_sense(2, 4, 1)[:7], "ADDITIONAL SENSE LENGTH"),
    ],
)
def test_bad_sense_is_refused_naming_the_field(data: bytes, field: str) -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse_sense(data)
    assert caught.value.field == field


def test_sense_segment_edges() -> None:
    assert parse_sense_segment(b"") is None
    assert parse_sense_segment(b"\x00\x00") is None
    assert parse_sense_segment(b"\x00\x00response-data") is None
    sense = encode_fixed_sense(SenseKey.UNIT_ATTENTION, 0x29, 0)
    with_response_data = encode_sense_segment(sense) + b"\x01\x02"
    assert parse_sense_segment(with_response_data) == parse_sense(sense)
    with pytest.raises(SCSIReplyError) as caught:
        parse_sense_segment(b"\x00")
    assert caught.value.field == "SenseLength"
    with pytest.raises(SCSIReplyError) as caught:
        parse_sense_segment(b"\x00\x13" + sense)
    assert (caught.value.field, caught.value.value) == ("SenseLength", 19)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (0x00, ScsiStatus.GOOD),
        (0x02, ScsiStatus.CHECK_CONDITION),
        (0x04, ScsiStatus.CONDITION_MET),
        (0x08, ScsiStatus.BUSY),
        (0x18, ScsiStatus.RESERVATION_CONFLICT),
        (0x28, ScsiStatus.TASK_SET_FULL),
        (0x30, ScsiStatus.ACA_ACTIVE),
        (0x40, ScsiStatus.TASK_ABORTED),
    ],
)
def test_scsi_status_codes(code: int, status: ScsiStatus) -> None:
    assert parse_scsi_status(code) is status


def test_an_unknown_scsi_status_is_refused() -> None:
    with pytest.raises(SCSIReplyError) as caught:
        parse_scsi_status(0x01)
    assert (caught.value.field, caught.value.value) == ("Status", 1)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: encode_fixed_sense(16, 0, 0), "key"),
        (lambda: encode_descriptor_sense(2, 256, 0), "asc"),
        (lambda: encode_fixed_sense(2, 0, -1), "ascq"),
        (lambda: encode_read_capacity_10(last_lba=0, block_length=0), "block_length"),
        (lambda: encode_read_capacity_16(last_lba=2**64, block_length=512), "last_lba"),
        (lambda: encode_report_luns([b"\x00" * 4]), "lun"),
        (lambda: encode_vpd_supported_pages([256]), "page"),
        (lambda: encode_vpd_unit_serial("sé"), "serial"),
    ],
)
def test_bad_encoder_arguments_are_refused(call: Callable[[], object], field: str) -> None:
    with pytest.raises(PDUEncodeError) as caught:
        call()
    assert caught.value.field == field


# --------------------------------------------------------------------------------------------
# Totality: arbitrary bytes into every parser raise only our ProtocolError
# --------------------------------------------------------------------------------------------

PARSERS: list[Callable[[bytes], object]] = [
    parse_standard_inquiry,
    parse_vpd_supported_pages,
    parse_vpd_unit_serial,
    parse_vpd_device_identification,
    parse_report_luns,
    parse_read_capacity_10,
    parse_read_capacity_16,
    parse_sense,
    parse_sense_segment,
]


def _total(parse: Callable[[bytes], object], data: bytes) -> None:
    try:
        result = parse(data)
    except ProtocolError:
        return
    if isinstance(result, scsi.DeviceIdentification):
        linux_wwid(result.designators)
        udev_scsi_id(result.designators)
    if isinstance(result, Sense):
        assert result.description


@pytest.mark.parametrize("parse", PARSERS)
@given(data=st.binary(max_size=300))
@example(data=b"")
def test_parsers_are_total_over_arbitrary_bytes(
    parse: Callable[[bytes], object], data: bytes
) -> None:
    _total(parse, data)


def _vpd_prefix(page: int) -> st.SearchStrategy[bytes]:
    """Bytes that pass the VPD header checks, so the body parsers get exercised."""
    return st.builds(
        lambda q, body, declared: bytes([q, page]) + declared.to_bytes(2, "big") + body,
        st.integers(0, 255),
        st.binary(max_size=200),
        st.integers(0, 0xFFFF),
    )


@given(data=_vpd_prefix(0x83))
def test_vpd83_parser_is_total_past_the_header(data: bytes) -> None:
    _total(parse_vpd_device_identification, data)


@given(position=st.integers(0, len(TGT_VPD83) - 1), byte=st.integers(0, 255))
def test_mutated_tgt_vpd83_never_breaks_the_parser(position: int, byte: int) -> None:
    mutated = bytearray(TGT_VPD83)
    mutated[position] = byte
    _total(parse_vpd_device_identification, bytes(mutated))


@given(data=st.binary(min_size=8, max_size=8 + 8 * 8))
def test_report_luns_parser_is_total_with_plausible_lengths(data: bytes) -> None:
    plausible = (len(data) - 8 - (len(data) % 8)).to_bytes(4, "big") + data[4:]
    _total(parse_report_luns, plausible)


def test_the_kernel_keeps_a_longer_t10_over_a_shorter_name_string() -> None:
    # scsi_vpd_lun_id compares sizes before taking a T10 or name designator, whatever the rank.
    t10 = _designator(DesignatorType.T10_VENDOR_ID, TGT_T10, code_set=CodeSet.ASCII)
    name = _designator(DesignatorType.SCSI_NAME_STRING, b"iqn.x\x00\x00\x00", code_set=3)
    assert linux_wwid([t10, name]) == linux_wwid([t10])
    assert linux_wwid([name, t10]) == "iqn.x"


def test_udev_skips_identifiers_longer_than_its_buffer() -> None:
    huge = _designator(DesignatorType.NAA, bytes([0x60]) + bytes(127))  # 2*128 + 2 > 256
    assert udev_scsi_id([huge, _designator(DesignatorType.NAA, TGT_NAA3)]) == "33000000100000001"
    fits = _designator(DesignatorType.NAA, bytes([0x60]) + bytes(126))
    assert udev_scsi_id([fits]) == "3" + fits.value.hex()


def test_encoders_refuse_lengths_their_length_fields_cannot_hold() -> None:
    big = _designator(DesignatorType.VENDOR_SPECIFIC, bytes(255))
    with pytest.raises(PDUEncodeError) as caught:
        encode_vpd_device_identification([big] * 260)
    assert caught.value.field == "page length"
    with pytest.raises(PDUEncodeError) as caught:
        encode_sense_segment(bytes(0x10000))
    assert caught.value.field == "sense"
