"""SCSI for the LUN check: CDB builders, reply parsers, SAM LUNs, the Linux WWID, sense data.

A probe that logs in proves little about the volume. This module holds the pure SCSI half of
the answer: the few commands a probe sends (TEST UNIT READY, INQUIRY standard and VPD, REPORT
LUNS, READ CAPACITY(10)/(16)), typed parsers for their replies, the LUN arithmetic that tells
which 8-byte LUN field and which ``/dev/disk/by-path`` name a connection_info LUN becomes, and
the WWID exactly as Linux shows it, so that two portals can be compared for "same volume".

Facts it relies on (SPC-4, SAM-5, RFC 7143 section 11.4.7; Linux and udev behaviour):

* CDBs are big-endian; a reply may be cut at the allocation length, so every parser reports a
  truncated reply as such instead of guessing what was cut.
* An 8-byte LUN has four 2-byte levels; bits 7-6 of byte 0 pick the addressing method
  (00 peripheral, 01 flat, 10 logical unit, 11 extended: well-known LUNs are ``C1 xx``).
  Linux keeps a LUN as an integer built from the levels (``scsilun_to_int``: level *i* lands
  in bits 16i..16i+15), so flat LUN 256 (``41 00``) is 16640 in its H:C:T:L name, and udev's
  ``path_id`` names it ``lun-0x4100000000000000`` (``lun-N`` below 256).
* os-brick's ``addressing_mode`` adds 16384 (the flat method's ``0x4000``) to the LUN: always
  for ``SAM3-flat``, from 256 on for ``SAM2``; ``SAM`` (default) and ``transparent`` keep it.
* The kernel's ``wwid`` (``scsi_vpd_lun_id``) considers only designators associated with the
  logical unit, ranks them SCSI name 9 > NAA-6 8 > EUI-64/16 7 > EUI-64/12 6 > NAA-5 5 >
  NAA-4 4 > EUI-64/8 3 > NAA-3 = T10 1, lets a later designator win a tie, and prints
  ``naa.``/``eui.`` + lowercase hex, ``t10.`` + the escaped bytes, or the name itself.
* udev's ``scsi_id`` searches NAA-6, NAA-5, any NAA, EUI-64, then T10 vendor ID, each binary
  before ASCII, and prints the designator type as one hex digit then the identifier in hex
  (binary) or as is (ASCII): ``3`` + NAA hex is the form multipath and os-brick compare.
* Sense data comes in fixed (0x70/0x71) or descriptor (0x72/0x73) format; the iSCSI SCSI
  Response carries it after a 2-byte SenseLength.

Malformed replies raise :class:`~pyiscsi_failover.errors.SCSIReplyError` (a ``ProtocolError``)
naming the field, its byte offset and the value found; bad arguments to a builder raise
:class:`~pyiscsi_failover.errors.PDUEncodeError` (a ``LocalProtocolError``). Plain
``int.from_bytes`` suits these small fixed layouts; construct stays in ``wire.py``.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeVar

from pyiscsi_failover.errors import PDUEncodeError, SCSIReplyError
from pyiscsi_failover.protocol.addressing import AddressingMode
from pyiscsi_failover.protocol.pdu import ScsiStatus  # one status enum, shared with the codec

__all__ = [
    "MAX_FLAT_LUN",
    "AddressingMode",
    "Association",
    "Capacity",
    "Cdb",
    "CodeSet",
    "Designator",
    "DesignatorType",
    "DeviceIdentification",
    "LunAddressMethod",
    "PeripheralDeviceType",
    "PeripheralQualifier",
    "ReportLuns",
    "SamLun",
    "ScsiOpcode",
    "ScsiStatus",
    "SelectReport",
    "Sense",
    "SenseKey",
    "StandardInquiry",
    "SupportedVpdPages",
    "UnitSerialNumber",
    "VpdPage",
    "by_path_lun",
    "cdb_inquiry",
    "cdb_read_capacity_10",
    "cdb_read_capacity_16",
    "cdb_report_luns",
    "cdb_test_unit_ready",
    "decode_sam_lun",
    "describe_asc",
    "encode_descriptor_sense",
    "encode_fixed_sense",
    "encode_read_capacity_10",
    "encode_read_capacity_16",
    "encode_report_luns",
    "encode_sam_lun",
    "encode_sense_segment",
    "encode_standard_inquiry",
    "encode_vpd_device_identification",
    "encode_vpd_supported_pages",
    "encode_vpd_unit_serial",
    "int_to_scsilun",
    "linux_wwid",
    "lun_field",
    "lun_for_addressing",
    "parse_read_capacity_10",
    "parse_read_capacity_16",
    "parse_report_luns",
    "parse_scsi_status",
    "parse_sense",
    "parse_sense_segment",
    "parse_standard_inquiry",
    "parse_vpd_device_identification",
    "parse_vpd_supported_pages",
    "parse_vpd_unit_serial",
    "scsilun_to_int",
    "udev_scsi_id",
]

#: Highest LUN number flat-space addressing carries (14 bits).
MAX_FLAT_LUN: Final = 0x3FFF

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_FLAT: Final = 0x4000  # bits 7-6 of byte 0 = 01: what os-brick's "+ 16384" sets


# --------------------------------------------------------------------------------------------
# Codes
# --------------------------------------------------------------------------------------------


class ScsiOpcode(IntEnum):
    """Operation codes (CDB byte 0) of the commands a probe sends."""

    TEST_UNIT_READY = 0x00
    INQUIRY = 0x12
    READ_CAPACITY_10 = 0x25
    SERVICE_ACTION_IN_16 = 0x9E  # READ CAPACITY(16) is its service action 0x10
    REPORT_LUNS = 0xA0


class VpdPage(IntEnum):
    """The Vital Product Data pages a probe reads."""

    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83


class SelectReport(IntEnum):
    """REPORT LUNS byte 2: which logical units to list (tgtd ignores it)."""

    LOGICAL_UNITS = 0x00  # every addressable LU except the well-known ones
    WELL_KNOWN = 0x01
    ALL = 0x02


class PeripheralQualifier(IntEnum):
    """Standard INQUIRY byte 0 bits 7-5: whether a logical unit is there at all."""

    CONNECTED = 0
    NOT_CONNECTED = 1  # supported here, but no device connected now
    NO_LOGICAL_UNIT = 3  # nothing at this LUN (tgtd answers so for an unmapped LUN: 0x7F)


class PeripheralDeviceType(IntEnum):
    """Standard INQUIRY byte 0 bits 4-0 (SPC-4 table 'peripheral device type')."""

    DIRECT_ACCESS = 0x00  # a disk: the only type the kernel's sd driver takes
    SEQUENTIAL_ACCESS = 0x01
    PRINTER = 0x02
    PROCESSOR = 0x03
    WRITE_ONCE = 0x04
    CD_DVD = 0x05
    OPTICAL_MEMORY = 0x07
    MEDIUM_CHANGER = 0x08
    STORAGE_ARRAY_CONTROLLER = 0x0C  # tgtd's LUN 0
    ENCLOSURE_SERVICES = 0x0D
    SIMPLIFIED_DIRECT_ACCESS = 0x0E
    OPTICAL_CARD = 0x0F
    BRIDGE_CONTROLLER = 0x10
    OBJECT_STORAGE = 0x11
    AUTOMATION_DRIVE = 0x12
    HOST_MANAGED_ZONED = 0x14
    WELL_KNOWN_LOGICAL_UNIT = 0x1E
    UNKNOWN = 0x1F


class CodeSet(IntEnum):
    """Designator byte 0 bits 3-0: how the identifier bytes are encoded."""

    BINARY = 1
    ASCII = 2
    UTF8 = 3


class Association(IntEnum):
    """Designator byte 1 bits 5-4: what the designator names."""

    LOGICAL_UNIT = 0
    TARGET_PORT = 1
    TARGET_DEVICE = 2


class DesignatorType(IntEnum):
    """Designator byte 1 bits 3-0."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI_64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8
    PROTOCOL_SPECIFIC_PORT = 0x9
    UUID = 0xA


class LunAddressMethod(IntEnum):
    """Bits 7-6 of a LUN level's first byte (SAM-5 section 4.7)."""

    PERIPHERAL = 0
    FLAT = 1
    LOGICAL_UNIT = 2
    EXTENDED = 3


class SenseKey(IntEnum):
    """The 4-bit sense key; every value is named, so parsing never meets an unknown one."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    EQUAL = 0xC  # obsolete since SPC-4, still the name on the wire decoders show
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


_E = TypeVar("_E", bound=IntEnum)


def _enum_or_int(kind: type[_E], value: int) -> _E | int:
    """Known codes become enum members; unknown ones stay plain ints rather than failing."""
    # The member map first: calling the enum costs several times as much, on every field.
    member = kind._value2member_map_.get(value)
    if member is not None:
        return member  # type: ignore[return-value]
    try:
        return kind(value)  # a member construction would still find (none today)
    except ValueError:
        return value


def _decode_error(reply: str, field: str, offset: int | None, value: object, why: str) -> Exception:
    # The one place a reply is refused.
    where = "" if offset is None else f" (byte {offset})"
    return SCSIReplyError(
        f"malformed {reply}: {field}{where} {why}", field=field, offset=offset, value=value
    )


def _encode_error(field: str, value: object, why: str) -> PDUEncodeError:
    return PDUEncodeError(f"{field}={value!r}: {why}", field=field, value=value)


def _need(data: bytes, size: int, reply: str, field: str) -> None:
    if len(data) < size:
        raise _decode_error(
            reply, field, len(data), len(data), f"is missing: the reply has {len(data)} bytes"
        )


def _check_int(field: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _encode_error(field, value, f"must be an integer from {low} to {high}")
    return value


# --------------------------------------------------------------------------------------------
# CDB builders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Cdb:
    """A command descriptor block and the data-in length to expect (the PDU's EDTL).

    tgtd refuses INQUIRY, REPORT LUNS and READ CAPACITY(16) with 05/24/00 when EDTL is below
    the allocation length, so ``transfer_length`` always equals it.
    """

    cdb: bytes
    transfer_length: int

    @property
    def opcode(self) -> ScsiOpcode | int:
        return _enum_or_int(ScsiOpcode, self.cdb[0])


def cdb_test_unit_ready() -> Cdb:
    """TEST UNIT READY: six zero bytes, no data."""
    return Cdb(cdb=bytes(6), transfer_length=0)


def cdb_inquiry(*, evpd: bool = False, page: int = 0, allocation_length: int = 255) -> Cdb:
    """INQUIRY: the standard data (``evpd=False``, page 0) or a VPD page (``evpd=True``).

    A page without EVPD is refused here (a target answers it with ILLEGAL REQUEST 24/00). The
    allocation length must leave room for the reply's header: 5 bytes standard, 4 for VPD.
    255 is the default because some older devices reject anything longer.
    """
    if not isinstance(evpd, bool):
        raise _encode_error("evpd", evpd, "must be a bool")
    _check_int("page", page, 0, 0xFF)
    if page and not evpd:
        raise _encode_error("page", page, "a VPD page needs evpd=True")
    _check_int("allocation_length", allocation_length, 4 if evpd else 5, _U16)
    cdb = bytes([ScsiOpcode.INQUIRY, int(evpd), page]) + allocation_length.to_bytes(2, "big")
    return Cdb(cdb=cdb + b"\x00", transfer_length=allocation_length)


def cdb_report_luns(
    *, select_report: SelectReport | int = SelectReport.LOGICAL_UNITS, allocation_length: int = 4096
) -> Cdb:
    """REPORT LUNS (send it to LUN 0). SPC requires an allocation length of at least 16; the
    default 4096 holds 511 LUNs, and :func:`parse_report_luns` says when the list was cut."""
    _check_int("select_report", select_report, 0, 0xFF)
    _check_int("allocation_length", allocation_length, 16, _U32)
    cdb = (
        bytes([ScsiOpcode.REPORT_LUNS, 0, int(select_report), 0, 0, 0])
        + allocation_length.to_bytes(4, "big")
        + b"\x00\x00"
    )
    return Cdb(cdb=cdb, transfer_length=allocation_length)


def cdb_read_capacity_10() -> Cdb:
    """READ CAPACITY(10): LBA 0, PMI 0; the reply is 8 bytes."""
    return Cdb(cdb=bytes([ScsiOpcode.READ_CAPACITY_10]) + bytes(9), transfer_length=8)


_RC16_SERVICE_ACTION: Final = 0x10


def cdb_read_capacity_16(*, allocation_length: int = 32) -> Cdb:
    """READ CAPACITY(16): SERVICE ACTION IN(16) with service action 0x10, LBA 0, PMI 0.

    The reply's first 12 bytes carry the last LBA and block length; 32 is the full reply.
    """
    _check_int("allocation_length", allocation_length, 12, _U32)
    cdb = (
        bytes([ScsiOpcode.SERVICE_ACTION_IN_16, _RC16_SERVICE_ACTION])
        + bytes(8)
        + allocation_length.to_bytes(4, "big")
        + b"\x00\x00"
    )
    return Cdb(cdb=cdb, transfer_length=allocation_length)


# --------------------------------------------------------------------------------------------
# Standard INQUIRY
# --------------------------------------------------------------------------------------------

_INQUIRY: Final = "standard INQUIRY reply"
_STANDARD_INQUIRY_LENGTH: Final = 36  # through PRODUCT REVISION LEVEL
_IDENTITY: Final = (("vendor", 8, 8), ("product", 16, 16), ("revision", 32, 4))


def _text(raw: bytes) -> str:
    """An INQUIRY/VPD ASCII field, trailing (and leading) spaces and NUL padding removed.

    SPC allows only printable ASCII; anything else is shown backslash-escaped, visibly, rather
    than refused: a device with an odd byte in its product name is still a usable disk.
    """
    return raw.rstrip(b" \x00").lstrip(b" ").decode("ascii", errors="backslashreplace")


@dataclass(frozen=True, slots=True, kw_only=True)
class StandardInquiry:
    """The standard INQUIRY data that matter to a probe.

    ``length`` is what the target declares (ADDITIONAL LENGTH + 5); ``truncated`` says that
    fewer bytes arrived (an allocation length below it), in which case the identity fields may
    be cut short. ``tpgs`` is non-zero when the LU supports ALUA.
    """

    peripheral_qualifier: PeripheralQualifier | int
    device_type: PeripheralDeviceType | int
    removable: bool
    version: int
    response_data_format: int
    tpgs: int
    vendor: str
    product: str
    revision: str
    length: int
    truncated: bool

    @property
    def is_connected_disk(self) -> bool:
        """Peripheral qualifier 0 and a direct-access device: something Linux makes a disk of."""
        return (
            self.peripheral_qualifier == PeripheralQualifier.CONNECTED
            and self.device_type == PeripheralDeviceType.DIRECT_ACCESS
        )


def parse_standard_inquiry(data: bytes) -> StandardInquiry:
    """Parse standard INQUIRY data; at least the 5-byte header must be there."""
    _need(data, 5, _INQUIRY, "ADDITIONAL LENGTH")
    length = data[4] + 5
    fields = {name: _text(data[start : start + size]) for name, start, size in _IDENTITY}
    return StandardInquiry(
        peripheral_qualifier=_enum_or_int(PeripheralQualifier, data[0] >> 5),
        device_type=_enum_or_int(PeripheralDeviceType, data[0] & 0x1F),
        removable=bool(data[1] & 0x80),
        version=data[2],
        response_data_format=data[3] & 0x0F,
        tpgs=(data[5] >> 4) & 0x3 if len(data) > 5 else 0,
        vendor=fields["vendor"],
        product=fields["product"],
        revision=fields["revision"],
        length=length,
        truncated=len(data) < length,
    )


def _ascii_field(field: str, value: str, size: int) -> bytes:
    if not isinstance(value, str) or len(value) > size or not value.isascii():
        raise _encode_error(field, value, f"must be ASCII text of at most {size} characters")
    if not value.isprintable():
        raise _encode_error(field, value, "must be printable ASCII")
    return value.encode("ascii").ljust(size, b" ")


def _peripheral_byte(qualifier: int, device_type: int) -> int:
    _check_int("peripheral_qualifier", qualifier, 0, 7)
    _check_int("device_type", device_type, 0, 0x1F)
    return qualifier << 5 | device_type


def encode_standard_inquiry(
    *,
    vendor: str,
    product: str,
    revision: str,
    peripheral_qualifier: PeripheralQualifier | int = PeripheralQualifier.CONNECTED,
    device_type: PeripheralDeviceType | int = PeripheralDeviceType.DIRECT_ACCESS,
    removable: bool = False,
    version: int = 0x06,
    tpgs: int = 0,
) -> bytes:
    """36 bytes of standard INQUIRY data (response data format 2), for a test target."""
    _check_int("version", version, 0, 0xFF)
    _check_int("tpgs", tpgs, 0, 3)
    head = bytes(
        [
            _peripheral_byte(peripheral_qualifier, device_type),
            0x80 if removable else 0,
            version,
            0x02,
            _STANDARD_INQUIRY_LENGTH - 5,
            tpgs << 4,
            0,
            0,
        ]
    )
    return (
        head
        + _ascii_field("vendor", vendor, 8)
        + _ascii_field("product", product, 16)
        + _ascii_field("revision", revision, 4)
    )


# --------------------------------------------------------------------------------------------
# VPD pages
# --------------------------------------------------------------------------------------------


def _vpd_body(data: bytes, page: VpdPage) -> tuple[int, int, bytes, bool]:
    """The common 4-byte VPD header: (qualifier, device type, page bytes, truncated)."""
    reply = f"VPD page 0x{page:02x} reply"
    _need(data, 4, reply, "PAGE LENGTH")
    if data[1] != page:
        raise _decode_error(reply, "PAGE CODE", 1, data[1], f"is 0x{data[1]:02x}, not 0x{page:02x}")
    length = int.from_bytes(data[2:4], "big")
    body = data[4 : 4 + length]
    return data[0] >> 5, data[0] & 0x1F, body, len(body) < length


def _vpd(page: VpdPage, body: bytes, qualifier: int, device_type: int) -> bytes:
    if len(body) > _U16:
        raise _encode_error("page length", len(body), f"must be at most {_U16}")
    return (
        bytes([_peripheral_byte(qualifier, device_type), page])
        + len(body).to_bytes(2, "big")
        + body
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SupportedVpdPages:
    """VPD page 0x00: the page codes the logical unit supports."""

    peripheral_qualifier: PeripheralQualifier | int
    device_type: PeripheralDeviceType | int
    pages: tuple[int, ...]
    truncated: bool


def parse_vpd_supported_pages(data: bytes) -> SupportedVpdPages:
    qualifier, device_type, body, truncated = _vpd_body(data, VpdPage.SUPPORTED_PAGES)
    return SupportedVpdPages(
        peripheral_qualifier=_enum_or_int(PeripheralQualifier, qualifier),
        device_type=_enum_or_int(PeripheralDeviceType, device_type),
        pages=tuple(body),
        truncated=truncated,
    )


def encode_vpd_supported_pages(
    pages: Iterable[int], *, peripheral_qualifier: int = 0, device_type: int = 0
) -> bytes:
    body = bytes(_check_int("page", page, 0, 0xFF) for page in pages)
    return _vpd(VpdPage.SUPPORTED_PAGES, body, peripheral_qualifier, device_type)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitSerialNumber:
    """VPD page 0x80. ``serial`` is stripped of its padding (tgtd right-justifies it)."""

    peripheral_qualifier: PeripheralQualifier | int
    device_type: PeripheralDeviceType | int
    serial: str
    truncated: bool


def parse_vpd_unit_serial(data: bytes) -> UnitSerialNumber:
    qualifier, device_type, body, truncated = _vpd_body(data, VpdPage.UNIT_SERIAL_NUMBER)
    return UnitSerialNumber(
        peripheral_qualifier=_enum_or_int(PeripheralQualifier, qualifier),
        device_type=_enum_or_int(PeripheralDeviceType, device_type),
        serial=_text(body),
        truncated=truncated,
    )


def encode_vpd_unit_serial(
    serial: str, *, width: int = 0, peripheral_qualifier: int = 0, device_type: int = 0
) -> bytes:
    """VPD page 0x80; ``width`` right-justifies the serial with spaces, as tgtd does (36)."""
    _check_int("width", width, 0, 0xFF)
    size = max(width, len(serial) if isinstance(serial, str) else 0)
    body = _ascii_field("serial", serial, size).rstrip(b" ").rjust(size, b" ")
    return _vpd(VpdPage.UNIT_SERIAL_NUMBER, body, peripheral_qualifier, device_type)


@dataclass(frozen=True, slots=True, kw_only=True)
class Designator:
    """One identification descriptor of VPD page 0x83, raw identifier bytes kept."""

    code_set: CodeSet | int
    piv: bool
    association: Association | int
    designator_type: DesignatorType | int
    value: bytes
    protocol_identifier: int = 0

    @property
    def naa_type(self) -> int | None:
        """The NAA field (top nibble of the identifier) of an NAA designator."""
        if self.designator_type != DesignatorType.NAA or not self.value:
            return None
        return self.value[0] >> 4

    def to_bytes(self) -> bytes:
        _check_int("protocol_identifier", self.protocol_identifier, 0, 0xF)
        _check_int("code_set", self.code_set, 0, 0xF)
        _check_int("association", self.association, 0, 3)
        _check_int("designator_type", self.designator_type, 0, 0xF)
        if len(self.value) > 0xFF:
            raise _encode_error("value", self.value, "a designator holds at most 255 bytes")
        return (
            bytes(
                [
                    self.protocol_identifier << 4 | self.code_set,
                    (0x80 if self.piv else 0) | self.association << 4 | self.designator_type,
                    0,
                    len(self.value),
                ]
            )
            + self.value
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceIdentification:
    """VPD page 0x83: every designator, in page order.

    ``truncated`` means the reply stopped before the page's end, so designators may be
    missing; only whole designators are listed. Check the peripheral qualifier before trusting
    the page: tgtd answers for an unmapped LUN with LUN 0's page marked 0x7F.
    """

    peripheral_qualifier: PeripheralQualifier | int
    device_type: PeripheralDeviceType | int
    designators: tuple[Designator, ...]
    truncated: bool

    @property
    def wwid(self) -> str | None:
        """The kernel's ``/sys/block/sdX/device/wwid`` (without its newline)."""
        return linux_wwid(self.designators)

    @property
    def scsi_id(self) -> str | None:
        """udev ``scsi_id``'s identifier (ID_SERIAL before whitespace is replaced)."""
        return udev_scsi_id(self.designators)


_VPD83: Final = "VPD page 0x83 reply"


def parse_vpd_device_identification(data: bytes) -> DeviceIdentification:
    qualifier, device_type, body, truncated = _vpd_body(data, VpdPage.DEVICE_IDENTIFICATION)
    designators: list[Designator] = []
    offset = 0
    while offset < len(body):
        header_end = offset + 4
        end = header_end + body[offset + 3] if header_end <= len(body) else header_end
        if end > len(body):
            if truncated:
                break  # cut by the allocation length: keep the whole designators before it
            raise _decode_error(
                _VPD83,
                "DESIGNATOR LENGTH",
                4 + offset + 3,
                body[offset + 3] if header_end <= len(body) else None,
                f"of the designator at byte {4 + offset} runs past the page's end"
                f" (byte {4 + len(body)})",
            )
        designators.append(
            Designator(
                protocol_identifier=body[offset] >> 4,
                code_set=_enum_or_int(CodeSet, body[offset] & 0x0F),
                piv=bool(body[offset + 1] & 0x80),
                association=_enum_or_int(Association, (body[offset + 1] >> 4) & 0x3),
                designator_type=_enum_or_int(DesignatorType, body[offset + 1] & 0x0F),
                value=body[header_end:end],
            )
        )
        offset = end
    return DeviceIdentification(
        peripheral_qualifier=_enum_or_int(PeripheralQualifier, qualifier),
        device_type=_enum_or_int(PeripheralDeviceType, device_type),
        designators=tuple(designators),
        truncated=truncated,
    )


def encode_vpd_device_identification(
    designators: Iterable[Designator], *, peripheral_qualifier: int = 0, device_type: int = 0
) -> bytes:
    body = b"".join(designator.to_bytes() for designator in designators)
    return _vpd(VpdPage.DEVICE_IDENTIFICATION, body, peripheral_qualifier, device_type)


# --------------------------------------------------------------------------------------------
# The WWID, as the kernel and as udev render it
# --------------------------------------------------------------------------------------------


def _kernel_priority(d: Designator) -> int:
    """The kernel's ``designator_prio``: 0 means "never chosen"."""
    if d.association != Association.LOGICAL_UNIT or not d.value:
        return 0
    if d.designator_type == DesignatorType.SCSI_NAME_STRING:
        return 9
    if d.designator_type == DesignatorType.NAA:
        return {6: 8, 5: 5, 4: 4, 3: 1}.get(d.value[0] >> 4, 0)
    if d.designator_type == DesignatorType.EUI_64:
        return {16: 7, 12: 6, 8: 3}.get(len(d.value), 0)
    if d.designator_type == DesignatorType.T10_VENDOR_ID:
        return 1
    return 0


# The kernel's "%pE" with no flags escapes what is not printable by its own ctype table, which
# counts 0x20-0x7e and 0xa0-0xff as printable: whitespace controls and \a, \e get a letter,
# NUL "\0", the rest three octal digits.
_KERNEL_LETTER_ESCAPES: Final = {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x0B: "\\v",
    0x0C: "\\f",
    0x07: "\\a",
    0x1B: "\\e",
    0x00: "\\0",
}


def _kernel_escaped(raw: bytes) -> str:
    out = []
    for byte in raw:
        if 0x20 <= byte <= 0x7E or byte >= 0xA0:
            out.append(chr(byte))  # bytes 0xa0-0xff pass through raw; shown as Latin-1 here
        else:
            out.append(_KERNEL_LETTER_ESCAPES.get(byte, f"\\{byte:03o}"))
    return "".join(out)


def linux_wwid(designators: Iterable[Designator]) -> str | None:
    """The WWID the kernel shows in ``/sys/block/sdX/device/wwid`` (``scsi_vpd_lun_id``).

    ``None`` when no designator qualifies (the file is then empty). A SCSI name string is
    shown up to its NUL padding, which sysfs itself prints along. Kernels before the 2020
    priority fix (about v5.11) preferred the longest designator instead; not modelled here.
    """
    wwid: str | bytes | None = None  # bytes: a T10 identifier, escaped once it has won
    best_priority = best_size = 0
    for d in designators:
        priority = _kernel_priority(d)
        if priority == 0 or best_priority > priority:
            continue
        size = len(d.value)
        if d.designator_type == DesignatorType.T10_VENDOR_ID:
            if best_size > size:
                continue
            wwid = d.value
        elif d.designator_type == DesignatorType.EUI_64:
            wwid = "eui." + d.value.hex()
        elif d.designator_type == DesignatorType.NAA:
            if size in (8, 16):
                wwid = "naa." + d.value.hex()
            # other lengths still take the rank but print nothing, as in the kernel
        else:  # SCSI name string
            if best_size > size:
                continue
            wwid = d.value.split(b"\x00", 1)[0].decode("utf-8", errors="backslashreplace")
        best_priority, best_size = priority, size
    return "t10." + _kernel_escaped(wwid) if isinstance(wwid, bytes) else wwid


# udev scsi_id's search: (designator type, NAA type or None for any), binary before ASCII.
_UDEV_SEARCH: Final = (
    (DesignatorType.NAA, 6),
    (DesignatorType.NAA, 5),
    (DesignatorType.NAA, None),
    (DesignatorType.EUI_64, None),
    (DesignatorType.T10_VENDOR_ID, None),
)
_UDEV_MAX_SERIAL: Final = 256  # scsi_id's buffer: longer identifiers are skipped


def udev_scsi_id(designators: Iterable[Designator]) -> str | None:
    """The identifier udev's ``scsi_id --whitelisted`` prints from VPD 0x83 (``3`` + NAA hex...).

    Only designators associated with the logical unit count, code set binary or ASCII exactly.
    An ASCII identifier is copied as is, up to its first NUL. ``None`` when nothing matches:
    scsi_id then falls back to vendor-specific designators and to VPD 0x80, which are not
    modelled (nor its pre-SPC-3 page format, nor its 254-byte read of the page).
    """
    candidates = [d for d in designators if d.association == Association.LOGICAL_UNIT]
    for wanted_type, naa_type in _UDEV_SEARCH:
        for code_set in (CodeSet.BINARY, CodeSet.ASCII):
            for d in candidates:
                if d.designator_type != wanted_type or d.code_set != code_set:
                    continue
                if naa_type is not None and d.naa_type != naa_type:
                    continue
                binary = code_set == CodeSet.BINARY
                if (len(d.value) * (2 if binary else 1)) + 2 > _UDEV_MAX_SERIAL:
                    continue
                ident = d.value.hex() if binary else d.value.split(b"\x00", 1)[0].decode("latin-1")
                return f"{int(wanted_type):x}{ident}"
    return None


# --------------------------------------------------------------------------------------------
# SAM LUNs, Linux's LUN integer, os-brick's addressing modes, udev's by-path name
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SamLun:
    """An 8-byte SAM LUN, decoded as far as a probe needs.

    ``number`` is the LUN number of a single-level peripheral (bus 0) or flat address, the
    number a storage backend and connection_info speak of; it is ``None`` for any other form
    (multi-level, logical unit or extended addressing). ``well_known`` is the W-LUN number of
    an extended address ``C1 xx`` (``C1 01`` is the REPORT LUNS well-known LU).
    """

    raw: bytes
    method: LunAddressMethod
    number: int | None
    well_known: int | None

    @property
    def linux_lun(self) -> int:
        """The integer Linux uses for this LUN (H:C:T:L and by-path)."""
        return scsilun_to_int(self.raw)


def _lun_bytes(raw: bytes) -> bytes:
    if not isinstance(raw, bytes | bytearray) or len(raw) != 8:
        raise _encode_error("lun", raw, "an SAM LUN is exactly 8 bytes")
    return bytes(raw)


def decode_sam_lun(raw: bytes) -> SamLun:
    """Decode an 8-byte LUN (a REPORT LUNS entry, or a PDU's LUN field)."""
    raw = _lun_bytes(raw)
    method = LunAddressMethod(raw[0] >> 6)
    single_level = not any(raw[2:])
    number = well_known = None
    if single_level and method == LunAddressMethod.PERIPHERAL and raw[0] == 0:
        number = raw[1]
    elif single_level and method == LunAddressMethod.FLAT:
        number = (raw[0] & 0x3F) << 8 | raw[1]
    elif single_level and raw[0] == 0xC1:
        well_known = raw[1]
    return SamLun(raw=raw, method=method, number=number, well_known=well_known)


def encode_sam_lun(number: int, *, method: LunAddressMethod | None = None) -> bytes:
    """A single-level LUN: peripheral below 256 and flat above unless ``method`` says which
    (the choice tgtd makes in REPORT LUNS)."""
    _check_int("lun", number, 0, MAX_FLAT_LUN)
    if method is None:
        method = LunAddressMethod.PERIPHERAL if number <= 0xFF else LunAddressMethod.FLAT
    if method == LunAddressMethod.PERIPHERAL:
        _check_int("lun", number, 0, 0xFF)
        return bytes([0, number]) + bytes(6)
    if method == LunAddressMethod.FLAT:
        _check_int("lun", number, 0, MAX_FLAT_LUN)
        return (_FLAT | number).to_bytes(2, "big") + bytes(6)
    raise _encode_error("method", method, "only peripheral and flat addressing carry a number")


def scsilun_to_int(raw: bytes) -> int:
    """Linux's ``scsilun_to_int``: level i (bytes 2i, 2i+1) becomes bits 16i..16i+15."""
    raw = _lun_bytes(raw)
    return sum(int.from_bytes(raw[i : i + 2], "big") << (8 * i) for i in range(0, 8, 2))


def int_to_scsilun(lun: int) -> bytes:
    """Linux's ``int_to_scsilun``, the inverse of :func:`scsilun_to_int`: the 8-byte LUN field
    the kernel's initiator sends for a given H:C:T:L LUN."""
    _check_int("lun", lun, 0, _U64)
    return b"".join(((lun >> (16 * level)) & _U16).to_bytes(2, "big") for level in range(4))


def lun_for_addressing(lun: int, mode: AddressingMode | str = AddressingMode.SAM) -> int:
    """os-brick's ``lun_for_addressing``: connection_info's LUN as the integer Linux will use.

    ``SAM3-flat`` always, and ``SAM2`` from LUN 256 on, add 16384 (flat addressing); ``SAM``
    and ``transparent`` leave the LUN alone. os-brick would also shift LUNs above 16383 into
    nonsense; those are refused here.
    """
    try:
        mode = AddressingMode(mode)
    except ValueError:
        raise _encode_error(
            "addressing_mode", mode, f"must be one of {', '.join(m.value for m in AddressingMode)}"
        ) from None
    _check_int("lun", lun, 0, _U64)
    flat = mode == AddressingMode.SAM3_FLAT or (mode == AddressingMode.SAM2 and lun >= 256)
    if flat:
        return _FLAT | _check_int("lun", lun, 0, MAX_FLAT_LUN)
    return lun


def lun_field(lun: int, mode: AddressingMode | str = AddressingMode.SAM) -> bytes:
    """The 8-byte LUN field for our PDUs, and the REPORT LUNS entry it must match: what the
    kernel would send once os-brick's addressing mode has been applied."""
    return int_to_scsilun(lun_for_addressing(lun, mode))


def by_path_lun(linux_lun: int) -> str:
    """The ``lun-…`` component of ``/dev/disk/by-path`` names (systemd ``path_id``).

    Below 256 it is decimal; otherwise the first two LUN levels in hex, then eight zeros:
    levels 3 and 4 are not shown, as in path_id.
    """
    _check_int("linux_lun", linux_lun, 0, _U64)
    if linux_lun < 256:
        return f"lun-{linux_lun}"
    return f"lun-0x{linux_lun & _U16:04x}{(linux_lun >> 16) & _U16:04x}00000000"


# --------------------------------------------------------------------------------------------
# REPORT LUNS
# --------------------------------------------------------------------------------------------

_REPORT_LUNS: Final = "REPORT LUNS reply"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportLuns:
    """The LUN inventory. ``list_length`` is what the target declares (8 per LUN, not cut
    when the reply is); ``truncated`` means fewer LUNs arrived than it declares: ask again with
    an allocation length of ``list_length + 8``."""

    list_length: int
    luns: tuple[SamLun, ...]
    truncated: bool

    def lists(self, field: bytes) -> bool:
        """Whether the 8-byte LUN ``field`` (see :func:`lun_field`) is in the list."""
        return any(lun.raw == field for lun in self.luns)


def parse_report_luns(data: bytes) -> ReportLuns:
    _need(data, 8, _REPORT_LUNS, "LUN LIST LENGTH")
    list_length = int.from_bytes(data[0:4], "big")
    if list_length % 8:
        raise _decode_error(
            _REPORT_LUNS, "LUN LIST LENGTH", 0, list_length, "is not a multiple of 8"
        )
    available = min(list_length, len(data) - 8) // 8
    luns = tuple(decode_sam_lun(data[8 + 8 * i : 16 + 8 * i]) for i in range(available))
    return ReportLuns(list_length=list_length, luns=luns, truncated=available * 8 < list_length)


def encode_report_luns(luns: Iterable[bytes]) -> bytes:
    body = b"".join(_lun_bytes(lun) for lun in luns)
    if len(body) > _U32:
        raise _encode_error("luns", len(body) // 8, "too many LUNs for one list")
    return len(body).to_bytes(4, "big") + bytes(4) + body


# --------------------------------------------------------------------------------------------
# READ CAPACITY
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    """READ CAPACITY(10) or (16) data.

    READ CAPACITY(10) answers a last LBA of 0xFFFFFFFF when the LU is too large for it:
    ``needs_read_capacity_16`` is then true and ``size_bytes`` is ``None``. The two
    provisioning fields come from READ CAPACITY(16) only (0 and false otherwise).
    """

    last_lba: int
    block_length: int
    size_bytes: int | None
    needs_read_capacity_16: bool
    physical_block_exponent: int = 0
    thin_provisioned: bool = False


def _block_length(data: bytes, offset: int, reply: str) -> int:
    block_length = int.from_bytes(data[offset : offset + 4], "big")
    if block_length == 0:
        raise _decode_error(reply, "LOGICAL BLOCK LENGTH", offset, 0, "is zero")
    return block_length


def parse_read_capacity_10(data: bytes) -> Capacity:
    reply = "READ CAPACITY(10) reply"
    _need(data, 8, reply, "LOGICAL BLOCK LENGTH")
    last_lba = int.from_bytes(data[0:4], "big")
    block_length = _block_length(data, 4, reply)
    too_big = last_lba == _U32
    return Capacity(
        last_lba=last_lba,
        block_length=block_length,
        size_bytes=None if too_big else (last_lba + 1) * block_length,
        needs_read_capacity_16=too_big,
    )


def parse_read_capacity_16(data: bytes) -> Capacity:
    reply = "READ CAPACITY(16) reply"
    _need(data, 12, reply, "LOGICAL BLOCK LENGTH")
    last_lba = int.from_bytes(data[0:8], "big")
    block_length = _block_length(data, 8, reply)
    return Capacity(
        last_lba=last_lba,
        block_length=block_length,
        size_bytes=(last_lba + 1) * block_length,
        needs_read_capacity_16=False,
        physical_block_exponent=data[13] & 0x0F if len(data) > 13 else 0,
        thin_provisioned=bool(data[14] & 0x80) if len(data) > 14 else False,
    )


def encode_read_capacity_10(*, last_lba: int, block_length: int) -> bytes:
    _check_int("last_lba", last_lba, 0, _U32)
    _check_int("block_length", block_length, 1, _U32)
    return last_lba.to_bytes(4, "big") + block_length.to_bytes(4, "big")


def encode_read_capacity_16(
    *,
    last_lba: int,
    block_length: int,
    physical_block_exponent: int = 0,
    thin_provisioned: bool = False,
) -> bytes:
    """The full 32-byte READ CAPACITY(16) data."""
    _check_int("last_lba", last_lba, 0, _U64)
    _check_int("block_length", block_length, 1, _U32)
    _check_int("physical_block_exponent", physical_block_exponent, 0, 0xF)
    return (
        last_lba.to_bytes(8, "big")
        + block_length.to_bytes(4, "big")
        + bytes([0, physical_block_exponent, 0x80 if thin_provisioned else 0])
        + bytes(17)
    )


# --------------------------------------------------------------------------------------------
# Status and sense
# --------------------------------------------------------------------------------------------


def parse_scsi_status(value: int) -> ScsiStatus:
    """The status byte as a :class:`ScsiStatus`; a code SAM does not define is refused."""
    try:
        return ScsiStatus(value)
    except ValueError:
        raise _decode_error("SCSI status", "Status", None, value, "is not a SAM status") from None


# (ASC, ASCQ) -> SPC's wording, for the codes a probe meets. The sense key is not part of the key:
# SPC defines each ASC/ASCQ pair once, whatever key comes with it.
_ASC_TEXT: Final = {
    (0x00, 0x00): "no additional sense information",
    (0x04, 0x00): "logical unit not ready, cause not reportable",
    (0x04, 0x01): "logical unit is in process of becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x04, 0x0A): "logical unit not accessible, asymmetric access state transition",
    (0x04, 0x0B): "logical unit not accessible, target port in standby state",
    (0x04, 0x0C): "logical unit not accessible, target port in unavailable state",
    (0x20, 0x00): "invalid command operation code",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x29, 0x01): "power on occurred",
    (0x2A, 0x06): "asymmetric access state changed",
    (0x3A, 0x00): "medium not present",
    (0x3F, 0x03): "inquiry data has changed",
    (0x3F, 0x0E): "reported LUNs data has changed",
}


def describe_asc(asc: int, ascq: int) -> str | None:
    """SPC's words for an additional sense code and qualifier, when we know them."""
    return _ASC_TEXT.get((asc, ascq))


@dataclass(frozen=True, slots=True, kw_only=True)
class Sense:
    """Sense data reduced to what decides a probe: key, ASC and ASCQ.

    ``deferred`` is true for response codes 0x71/0x73 (the error belongs to an earlier
    command); ``descriptor_format`` for 0x72/0x73.
    """

    key: SenseKey
    asc: int
    ascq: int
    deferred: bool = False
    descriptor_format: bool = False

    @property
    def description(self) -> str:
        """``NOT READY 04/0B: logical unit not accessible, target port in standby state``."""
        text = describe_asc(self.asc, self.ascq) or "no description known"
        return f"{self.key.name.replace('_', ' ')} {self.asc:02X}/{self.ascq:02X}: {text}"


_SENSE: Final = "sense data"


def parse_sense(data: bytes) -> Sense:
    """Fixed (0x70/0x71: key in byte 2, ASC/ASCQ in 12/13) or descriptor format (0x72/0x73:
    key, ASC, ASCQ in bytes 1-3). Both need their ASC and ASCQ present."""
    _need(data, 1, _SENSE, "RESPONSE CODE")
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        _need(data, 14, _SENSE, "ADDITIONAL SENSE CODE QUALIFIER")
        if data[7] < 6:
            raise _decode_error(
                _SENSE,
                "ADDITIONAL SENSE LENGTH",
                7,
                data[7],
                "is below 6, so the fixed-format sense carries no ASC/ASCQ",
            )
        return Sense(
            key=SenseKey(data[2] & 0x0F), asc=data[12], ascq=data[13], deferred=code == 0x71
        )
    if code in (0x72, 0x73):
        _need(data, 8, _SENSE, "ADDITIONAL SENSE LENGTH")
        return Sense(
            key=SenseKey(data[1] & 0x0F),
            asc=data[2],
            ascq=data[3],
            deferred=code == 0x73,
            descriptor_format=True,
        )
    raise _decode_error(
        _SENSE, "RESPONSE CODE", 0, data[0], f"0x{code:02x} is neither fixed nor descriptor format"
    )


def _sense_args(key: SenseKey | int, asc: int, ascq: int) -> None:
    _check_int("key", key, 0, 0xF)
    _check_int("asc", asc, 0, 0xFF)
    _check_int("ascq", ascq, 0, 0xFF)


def encode_fixed_sense(
    key: SenseKey | int, asc: int, ascq: int, *, deferred: bool = False
) -> bytes:
    """18 bytes of fixed-format sense, the form tgtd sends."""
    _sense_args(key, asc, ascq)
    return (
        bytes([0x71 if deferred else 0x70, 0, key, 0, 0, 0, 0, 10])
        + bytes(4)
        + bytes([asc, ascq])
        + bytes(4)
    )


def encode_descriptor_sense(
    key: SenseKey | int, asc: int, ascq: int, *, deferred: bool = False
) -> bytes:
    """8 bytes of descriptor-format sense with no descriptors."""
    _sense_args(key, asc, ascq)
    return bytes([0x73 if deferred else 0x72, key, asc, ascq, 0, 0, 0, 0])


_SEGMENT: Final = "SCSI Response data segment"


def parse_sense_segment(segment: bytes) -> Sense | None:
    """The sense in a SCSI Response's data segment (RFC 7143 section 11.4.7): SenseLength
    (2 bytes) then the sense data; any response data after it is ignored. ``None`` when the
    segment or its SenseLength is empty."""
    if not segment:
        return None
    _need(segment, 2, _SEGMENT, "SenseLength")
    length = int.from_bytes(segment[0:2], "big")
    if length == 0:
        return None
    if length > len(segment) - 2:
        raise _decode_error(
            _SEGMENT,
            "SenseLength",
            0,
            length,
            f"exceeds the {len(segment) - 2} bytes of sense the segment holds",
        )
    return parse_sense(segment[2 : 2 + length])


def encode_sense_segment(sense: bytes) -> bytes:
    """SenseLength + sense: the data segment of a CHECK CONDITION response (unpadded)."""
    if len(sense) > _U16:
        raise _encode_error("sense", len(sense), f"sense data holds at most {_U16} bytes")
    return len(sense).to_bytes(2, "big") + sense
