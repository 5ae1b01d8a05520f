"""The test target's SCSI logical units: what each CDB gets, with no I/O of their own.

A :class:`LogicalUnit` is one disk (SCSI peripheral device type 0) over a :class:`BlockStore`:
:class:`SparseImage` in memory, or a backing file the server opens (:mod:`.backing_file`). It
answers every command through one method, :meth:`LogicalUnit.execute`, which maps a
:class:`ScsiRequest` (the CDB, the write data, the I_T nexus it came on) to a :class:`ScsiReply`
(status, sense, read data, the write length the CDB asked for). The iSCSI side
(:mod:`.target`) turns the reply into Data-In PDUs or a SCSI Response, applying the
initiator's Expected Data Transfer Length and the residuals; the LU only applies the CDB's own
allocation length.

:class:`LunTable` is what one session sees of its target: it answers what belongs to the target
rather than to one LU (REPORT LUNS, from any LUN address; a LUN that does not exist) and hands
everything else to the LU addressed. :class:`LogicalUnits` holds every LU of a configuration,
shared by all connections (the same volume through several portals), and builds each session's
table in :meth:`LogicalUnits.table_for`.

SCSI faults (:mod:`.scsi_faults`) build on two seams here: a :class:`ScsiResponder` (anything
with ``execute(request) -> ScsiReply``) wrapped around a LU answers something else (NOT READY,
a unit attention, a reservation conflict, another WWID), or asks through the reply for a
slower answer, smaller Data-In PDUs or a residual overflow; and a session's :class:`LunTable`
may leave a LUN out (missing on one portal, hidden from one ISID).

Commands (SPC-4, SBC-3): INQUIRY (standard; VPD 0x00, 0x80, 0x83, 0xB0, 0xB1), TEST UNIT READY,
REQUEST SENSE, READ CAPACITY(10) and (16), MODE SENSE(6) and (10) (caching 0x08, control 0x0A,
all 0x3F), READ and WRITE (10) and (16), SYNCHRONIZE CACHE (10) and (16); REPORT LUNS in the
table. Any other operation code gets CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND
OPERATION CODE (05/20/00); a bad field 05/24/00; an LBA past the end 05/21/00. Sense is fixed
format (the control page says D_SENSE 0).

Pure: never imports trio, socket or subprocess, and opens no file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.protocol.pdu import ISID, ScsiStatus
from pyiscsi_failover.protocol.scsi import (
    Association,
    CodeSet,
    Designator,
    DesignatorType,
    PeripheralDeviceType,
    PeripheralQualifier,
    SenseKey,
    decode_sam_lun,
    encode_fixed_sense,
    encode_read_capacity_10,
    encode_read_capacity_16,
    encode_report_luns,
    encode_sam_lun,
    encode_standard_inquiry,
    encode_vpd_device_identification,
    encode_vpd_supported_pages,
    encode_vpd_unit_serial,
)
from pyiscsi_failover.testing.config import DEFAULT_LUN_SIZE, LunSpec, TargetSpec
from pyiscsi_failover.testing.faults import FaultKind

__all__ = [
    "BlockStore",
    "LogicalUnit",
    "LogicalUnits",
    "LunTable",
    "Nexus",
    "OpenBacking",
    "ScsiReply",
    "ScsiRequest",
    "ScsiResponder",
    "SparseImage",
]

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
#: INQUIRY VERSION 6: SPC-4. Linux then tries READ CAPACITY(16) first.
_SPC4: Final = 0x06
#: Standard INQUIRY byte 7, CMDQUE: the LU queues commands (Linux then uses tagged commands).
_CMDQUE: Final = 0x02
#: Mode parameter header, DEVICE-SPECIFIC PARAMETER: DPOFUA (DPO and FUA are understood).
_DPOFUA: Final = 0x10
_SAVED_VALUES: Final = 3
_CHANGEABLE_VALUES: Final = 1
_ALL_PAGES: Final = 0x3F
_ALL_SUBPAGES: Final = 0xFF
_REPORT_LUNS_WLUN: Final = 0x01  # C1 01: the REPORT LUNS well-known logical unit
_VPD_PAGES: Final = (0x00, 0x80, 0x83, 0xB0, 0xB1)
#: Standard INQUIRY version descriptors (SPC-4 table of codes): SAM-5, iSCSI (no version
#: claimed), SPC-4, SBC-3.
_VERSION_DESCRIPTORS: Final = (0x00A0, 0x0960, 0x0460, 0x04C0)


# ---------------------------------------------------------------------------------------------
# Requests and replies


@dataclass(frozen=True, slots=True, kw_only=True)
class Nexus:
    """The I_T nexus a command arrived on: who asks, through which portal. Faults key on it."""

    initiator_name: str
    isid: ISID
    target_name: str
    portal_name: str
    tpgt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiRequest:
    """One command for one LU: its CDB (16 bytes, zero-padded), the write data the initiator
    sent for it (all of it, in order), the nexus it came on and its Expected Data Transfer
    Length (which the LU itself ignores: it answers what the CDB asks)."""

    lun: int
    cdb: bytes
    nexus: Nexus
    data_out: bytes = b""
    edtl: int = 0

    @property
    def opcode(self) -> int:
        return self.cdb[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiReply:
    """How a command ended, before iSCSI applies the Expected Data Transfer Length.

    ``data`` is the read data the CDB asks for, already cut to the CDB's allocation length;
    its length is the SCSI transfer length of a read. ``write_length`` is the number of bytes
    of write data the CDB asks for. ``sense`` goes with CHECK CONDITION (fixed format).

    The rest is for faults: ``latency`` holds the reply back that many seconds after its
    command arrived, ``data_segment_limit`` cuts its Data-In smaller than the initiator's
    MaxRecvDataSegmentLength, and ``faults`` names the faults that shaped it (reported as
    the connection's FaultInjected events).
    """

    status: ScsiStatus = ScsiStatus.GOOD
    data: bytes = b""
    write_length: int = 0
    sense: bytes = b""
    latency: float = 0.0
    data_segment_limit: int | None = None
    faults: tuple[FaultKind, ...] = ()

    @classmethod
    def check_condition(
        cls, key: SenseKey, asc: int, ascq: int, *, write_length: int = 0
    ) -> ScsiReply:
        """CHECK CONDITION with fixed-format sense ``key``/``asc``/``ascq``."""
        return cls(
            status=ScsiStatus.CHECK_CONDITION,
            sense=encode_fixed_sense(key, asc, ascq),
            write_length=write_length,
        )


class ScsiResponder(Protocol):
    """Anything that answers SCSI commands for one LUN: a :class:`LogicalUnit`, or a fault
    wrapped around one."""

    def execute(self, request: ScsiRequest) -> ScsiReply: ...


def _illegal(asc: int, ascq: int = 0) -> ScsiReply:
    return ScsiReply.check_condition(SenseKey.ILLEGAL_REQUEST, asc, ascq)


_INVALID_OPCODE: Final = _illegal(0x20)
_INVALID_FIELD: Final = _illegal(0x24)
_LBA_OUT_OF_RANGE: Final = _illegal(0x21)
_NOT_SUPPORTED_LUN: Final = _illegal(0x25)
_SAVING_NOT_SUPPORTED: Final = _illegal(0x39)


def _cut(data: bytes, allocation_length: int) -> ScsiReply:
    return ScsiReply(data=data[:allocation_length])


# ---------------------------------------------------------------------------------------------
# Block stores


class BlockStore(Protocol):
    """Where a LU keeps its blocks. Offsets and lengths are whole blocks, inside ``size``."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


class SparseImage:
    """An in-memory image: only written blocks take memory; the others read as zeros."""

    __slots__ = ("_block_size", "_blocks", "_size", "_zero")

    def __init__(self, size: int, block_size: int) -> None:
        if size <= 0 or block_size <= 0 or size % block_size:
            raise LocalProtocolError(
                f"an image of {size} bytes cannot hold whole {block_size}-byte blocks"
            )
        self._size = size
        self._block_size = block_size
        self._zero = bytes(block_size)
        self._blocks: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"SparseImage(size={self._size}, written_blocks={len(self._blocks)})"

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        first, count = self._span(offset, length)
        blocks, zero = self._blocks, self._zero
        return b"".join(blocks.get(index, zero) for index in range(first, first + count))

    def write(self, offset: int, data: bytes) -> None:
        first, count = self._span(offset, len(data))
        size = self._block_size
        for index in range(count):
            self._blocks[first + index] = bytes(data[index * size : (index + 1) * size])

    def flush(self) -> None:
        """Nothing to do: memory is the medium."""

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        size = self._block_size
        if offset % size or length % size or offset < 0 or offset + length > self._size:
            raise LocalProtocolError(
                f"{length} bytes at {offset} are not whole blocks inside a {self._size}-byte image"
            )
        return offset // size, length // size


# ---------------------------------------------------------------------------------------------
# One logical unit


def _be(cdb: bytes, start: int, end: int) -> int:
    return int.from_bytes(cdb[start:end], "big")


class LogicalUnit:
    """One disk LUN of the test target, over ``store`` (whose size is the LU's capacity).

    The LU holds no per-session state: whatever depends on who asks (the nexus) belongs to a
    fault wrapped around it.
    """

    __slots__ = ("block_size", "blocks", "spec", "store")

    def __init__(self, spec: LunSpec, store: BlockStore) -> None:
        if spec.wwid is None or spec.serial is None:
            raise LocalProtocolError(f"LUN {spec.lun} has no WWID or serial (use TargetSpec)")
        if store.size < spec.block_size or store.size % spec.block_size:
            raise LocalProtocolError(
                f"LUN {spec.lun}: a {store.size}-byte store is not whole "
                f"{spec.block_size}-byte blocks"
            )
        self.spec = spec
        self.store = store
        self.block_size = spec.block_size
        self.blocks = store.size // spec.block_size

    def __repr__(self) -> str:
        return f"LogicalUnit(lun={self.spec.lun}, blocks={self.blocks}, wwid={self.spec.wwid})"

    @property
    def wwid(self) -> str:
        """The NAA identifier in hex (``naa.`` + this is the kernel's WWID)."""
        assert self.spec.wwid is not None  # checked in __init__
        return self.spec.wwid

    def execute(self, request: ScsiRequest) -> ScsiReply:
        """The one way in: the reply to ``request`` (never raises for any CDB)."""
        handler = _HANDLERS.get(request.cdb[0])
        if handler is None:
            return _INVALID_OPCODE
        return handler(self, request.cdb, request.data_out)

    # -- identity ------------------------------------------------------------------------------

    def standard_inquiry(self) -> bytes:
        spec = self.spec
        data = bytearray(
            encode_standard_inquiry(
                vendor=spec.vendor, product=spec.product, revision=spec.revision, version=_SPC4
            )
        )
        data[7] |= _CMDQUE
        # Bytes 36-57 reserved or vendor-specific, then the version descriptors: SAM-5,
        # iSCSI, SPC-4, SBC-3 (what the LU claims to follow).
        descriptors = b"".join(code.to_bytes(2, "big") for code in _VERSION_DESCRIPTORS)
        data += bytes(22) + descriptors.ljust(16, b"\x00")  # through byte 73
        data[4] = len(data) - 5
        return bytes(data)

    def designators(self) -> tuple[Designator, ...]:
        """VPD 0x83: the NAA WWID (what Linux and udev name the disk by), then a T10 vendor
        ID (vendor + serial), both associated with the LU."""
        spec = self.spec
        assert spec.serial is not None  # checked in __init__
        return (
            Designator(
                code_set=CodeSet.BINARY,
                piv=False,
                association=Association.LOGICAL_UNIT,
                designator_type=DesignatorType.NAA,
                value=bytes.fromhex(self.wwid),
            ),
            Designator(
                code_set=CodeSet.ASCII,
                piv=False,
                association=Association.LOGICAL_UNIT,
                designator_type=DesignatorType.T10_VENDOR_ID,
                value=spec.vendor.ljust(8).encode("ascii") + spec.serial.encode("ascii"),
            ),
        )

    def vpd_page(self, page: int) -> bytes | None:
        spec = self.spec
        if page == 0x00:
            return encode_vpd_supported_pages(_VPD_PAGES)
        if page == 0x80:
            assert spec.serial is not None
            return encode_vpd_unit_serial(spec.serial)
        if page == 0x83:
            return encode_vpd_device_identification(self.designators())
        if page == 0xB0:
            # Block limits: optimal transfer length granularity 1 block; no other limit.
            body = bytearray(0x3C)
            body[2:4] = (1).to_bytes(2, "big")
            return bytes([0, 0xB0]) + len(body).to_bytes(2, "big") + bytes(body)
        if page == 0xB1:
            # Block device characteristics: MEDIUM ROTATION RATE 1, a non-rotating medium.
            body = bytearray(0x3C)
            body[0:2] = (1).to_bytes(2, "big")
            return bytes([0, 0xB1]) + len(body).to_bytes(2, "big") + bytes(body)
        return None

    # -- commands ------------------------------------------------------------------------------

    def _inquiry(self, cdb: bytes, _data: bytes) -> ScsiReply:
        evpd, page, allocation = cdb[1] & 0x01, cdb[2], _be(cdb, 3, 5)
        if cdb[1] & 0x02:  # CMDDT, obsolete
            return _INVALID_FIELD
        if not evpd:
            return _INVALID_FIELD if page else _cut(self.standard_inquiry(), allocation)
        data = self.vpd_page(page)
        return _INVALID_FIELD if data is None else _cut(data, allocation)

    def _test_unit_ready(self, _cdb: bytes, _data: bytes) -> ScsiReply:
        return ScsiReply()

    def _request_sense(self, cdb: bytes, _data: bytes) -> ScsiReply:
        # Autosense reports every error with its command, so nothing is ever pending here.
        return _cut(_no_sense(descriptor=bool(cdb[1] & 0x01)), cdb[4])

    def _read_capacity_10(self, cdb: bytes, _data: bytes) -> ScsiReply:
        if not cdb[8] & 0x01 and _be(cdb, 2, 6):
            return _INVALID_FIELD  # an LBA without PMI
        last = min(self.blocks - 1, _U32)  # 0xFFFFFFFF: "ask READ CAPACITY(16)"
        return ScsiReply(data=encode_read_capacity_10(last_lba=last, block_length=self.block_size))

    def _service_action_in(self, cdb: bytes, _data: bytes) -> ScsiReply:
        if cdb[1] & 0x1F != 0x10:  # only READ CAPACITY(16)
            return _INVALID_FIELD
        data = encode_read_capacity_16(last_lba=self.blocks - 1, block_length=self.block_size)
        return _cut(data, _be(cdb, 10, 14))

    def _mode_sense(self, cdb: bytes, _data: bytes) -> ScsiReply:
        ten = cdb[0] == 0x5A
        control, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        allocation = _be(cdb, 7, 9) if ten else cdb[4]
        if control == _SAVED_VALUES:
            return _SAVING_NOT_SUPPORTED
        if subpage and not (page == _ALL_PAGES and subpage == _ALL_SUBPAGES):
            return _INVALID_FIELD
        pages = _MODE_PAGES if page == _ALL_PAGES else {page: _MODE_PAGES.get(page)}
        if None in pages.values():
            return _INVALID_FIELD
        body = b"".join(
            data[:2] + bytes(len(data) - 2) if control == _CHANGEABLE_VALUES else data
            for data in pages.values()
            if data is not None
        )
        descriptor = b""
        if not cdb[1] & 0x08:  # DBD clear: one short LBA block descriptor
            descriptor = min(self.blocks, _U32).to_bytes(4, "big") + b"\x00"
            descriptor += self.block_size.to_bytes(3, "big")
        if ten:
            header_length = 8
            total = header_length + len(descriptor) + len(body)
            header = (total - 2).to_bytes(2, "big") + bytes([0, _DPOFUA, 0, 0])
            header += len(descriptor).to_bytes(2, "big")
        else:
            total = 4 + len(descriptor) + len(body)
            header = bytes([total - 1, 0, _DPOFUA, len(descriptor)])
        return _cut(header + descriptor + body, allocation)

    def _span(self, cdb: bytes) -> tuple[int, int] | ScsiReply:
        """(LBA, blocks) of a READ/WRITE/SYNCHRONIZE CACHE (10) or (16), or the error."""
        if cdb[0] in (0x88, 0x8A, 0x91):
            lba, count = _be(cdb, 2, 10), _be(cdb, 10, 14)
        else:
            lba, count = _be(cdb, 2, 6), _be(cdb, 7, 9)
        if lba + count > self.blocks:
            return _LBA_OUT_OF_RANGE
        return lba, count

    def _read(self, cdb: bytes, _data: bytes) -> ScsiReply:
        if cdb[1] >> 5:  # RDPROTECT: this LU keeps no protection information
            return _INVALID_FIELD
        span = self._span(cdb)
        if isinstance(span, ScsiReply):
            return span
        lba, count = span
        return ScsiReply(data=self.store.read(lba * self.block_size, count * self.block_size))

    def _write(self, cdb: bytes, data: bytes) -> ScsiReply:
        if cdb[1] >> 5:  # WRPROTECT
            return _INVALID_FIELD
        span = self._span(cdb)
        if isinstance(span, ScsiReply):
            return span
        lba, count = span
        length = count * self.block_size
        if len(data) < length:
            # Less data than the CDB names (the initiator's EDTL is short): write nothing.
            # INVALID FIELD IN COMMAND INFORMATION UNIT, as Linux's LIO answers.
            return ScsiReply.check_condition(
                SenseKey.ILLEGAL_REQUEST, 0x0E, 0x03, write_length=length
            )
        self.store.write(lba * self.block_size, data[:length])
        return ScsiReply(write_length=length)

    def _synchronize_cache(self, cdb: bytes, _data: bytes) -> ScsiReply:
        span = self._span(cdb)
        if isinstance(span, ScsiReply):
            return span
        self.store.flush()
        return ScsiReply()


def _no_sense(*, descriptor: bool) -> bytes:
    if descriptor:
        return bytes([0x72, 0, 0, 0, 0, 0, 0, 0])
    return encode_fixed_sense(SenseKey.NO_SENSE, 0, 0)


def _caching_page() -> bytes:
    # WCE 0 and RCD 0: writes are done when acknowledged, reads may be cached.
    return bytes([0x08, 0x12]) + bytes(0x12)


def _control_page() -> bytes:
    # QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), D_SENSE 0 (fixed-format sense),
    # BUSY TIMEOUT PERIOD unlimited.
    return bytes([0x0A, 0x0A, 0x00, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])


_MODE_PAGES: Final[dict[int, bytes | None]] = {0x08: _caching_page(), 0x0A: _control_page()}

_Handler = Callable[[LogicalUnit, bytes, bytes], ScsiReply]
#: Operation code -> handler: the commands a LU implements.
_HANDLERS: Final[dict[int, _Handler]] = {
    0x00: LogicalUnit._test_unit_ready,
    0x03: LogicalUnit._request_sense,
    0x12: LogicalUnit._inquiry,
    0x1A: LogicalUnit._mode_sense,
    0x25: LogicalUnit._read_capacity_10,
    0x28: LogicalUnit._read,
    0x2A: LogicalUnit._write,
    0x35: LogicalUnit._synchronize_cache,
    0x5A: LogicalUnit._mode_sense,
    0x88: LogicalUnit._read,
    0x8A: LogicalUnit._write,
    0x91: LogicalUnit._synchronize_cache,
    0x9E: LogicalUnit._service_action_in,
}


# ---------------------------------------------------------------------------------------------
# What one session sees


def _missing_lun_inquiry() -> bytes:
    """Standard INQUIRY data for a LUN with nothing behind it: qualifier 3, type 0x1F."""
    return encode_standard_inquiry(
        vendor="PYISCSI",
        product="NO LOGICAL UNIT",
        revision="0001",
        peripheral_qualifier=PeripheralQualifier.NO_LOGICAL_UNIT,
        device_type=PeripheralDeviceType.UNKNOWN,
        version=_SPC4,
    )


_MISSING_LUN_INQUIRY: Final = _missing_lun_inquiry()


class LunTable:
    """The LUNs one session sees (number -> responder), and the target-level answers.

    REPORT LUNS is answered from whatever LUN it is addressed to (Linux and libiscsi send it to
    LUN 0, which need not exist). For a LUN not in the table: standard INQUIRY gets qualifier
    3 and type 0x1F (GOOD), REQUEST SENSE gets 05/25/00 as its data (GOOD), and every other
    command CHECK CONDITION 05/25/00 (LOGICAL UNIT NOT SUPPORTED), as SPC-4 says.
    """

    __slots__ = ("_units",)

    def __init__(self, units: Mapping[int, ScsiResponder]) -> None:
        self._units = dict(sorted(units.items()))

    def __repr__(self) -> str:
        return f"LunTable(luns={list(self._units)})"

    @property
    def luns(self) -> tuple[int, ...]:
        return tuple(self._units)

    def responder(self, lun_field: bytes) -> ScsiResponder | None:
        lun = decode_sam_lun(lun_field).number
        return None if lun is None else self._units.get(lun)

    def execute(
        self, lun_field: bytes, cdb: bytes, nexus: Nexus, data_out: bytes, *, edtl: int = 0
    ) -> ScsiReply:
        """The reply to ``cdb`` sent to the 8-byte LUN ``lun_field``."""
        if cdb[0] == 0xA0:
            return self._report_luns(cdb)
        address = decode_sam_lun(lun_field)
        unit = None if address.number is None else self._units.get(address.number)
        if unit is None or address.number is None:
            return self._missing(cdb)
        request = ScsiRequest(
            lun=address.number, cdb=cdb, nexus=nexus, data_out=data_out, edtl=edtl
        )
        return unit.execute(request)

    def _report_luns(self, cdb: bytes) -> ScsiReply:
        select, allocation = cdb[2], _be(cdb, 6, 10)
        if allocation < 16 or select not in (0x00, 0x01, 0x02):
            return _INVALID_FIELD
        # SELECT REPORT 1 asks for well-known LUs only: this target has none to list.
        listed = () if select == 0x01 else self._units
        return _cut(encode_report_luns(encode_sam_lun(lun) for lun in listed), allocation)

    @staticmethod
    def _missing(cdb: bytes) -> ScsiReply:
        if cdb[0] == 0x12 and not cdb[1] & 0x03 and not cdb[2]:
            return _cut(_MISSING_LUN_INQUIRY, _be(cdb, 3, 5))
        if cdb[0] == 0x03:
            sense = encode_fixed_sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0)
            return _cut(sense, cdb[4])
        return _NOT_SUPPORTED_LUN


# ---------------------------------------------------------------------------------------------
# Every LU of a configuration

#: Opens a LUN's backing file: (spec) -> store. The server passes
#: :func:`~pyiscsi_failover.testing.backing_file.open_backing_file`.
OpenBacking = Callable[[LunSpec], BlockStore]


class LogicalUnits:
    """Every LU of some targets (usually a :class:`TargetConfig`'s), keyed by (target name,
    LUN), shared by all connections so that every portal serves the same volume.

    Backing files are opened through ``open_backing`` (the server's); without one, a LUN with
    a backing file is refused here, so that a sans-IO user never silently gets an empty disk
    instead of its file.
    """

    __slots__ = ("_units",)

    def __init__(
        self, targets: Iterable[TargetSpec], *, open_backing: OpenBacking | None = None
    ) -> None:
        self._units: dict[tuple[str, int], LogicalUnit] = {}
        try:
            for target in targets:
                for spec in target.logical_units:
                    self._units[target.name, spec.lun] = LogicalUnit(
                        spec, _store_for(target, spec, open_backing)
                    )
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"LogicalUnits({len(self._units)} LUs)"

    def __iter__(self) -> Iterator[LogicalUnit]:
        return iter(self._units.values())

    def get(self, target_name: str, lun: int) -> LogicalUnit | None:
        return self._units.get((target_name, lun))

    def table_for(self, target: TargetSpec, nexus: Nexus) -> LunTable:
        """Every LUN of ``target``, unchanged, for ``nexus``: a session without SCSI faults
        (:func:`.scsi_faults.session_luns` builds one with them)."""
        return LunTable(
            {
                spec.lun: self._units[target.name, spec.lun]
                for spec in target.logical_units
                if (target.name, spec.lun) in self._units
            }
        )

    def close(self) -> None:
        """Flush and close every store that can be closed (backing files)."""
        for unit in self._units.values():
            close = getattr(unit.store, "close", None)
            if callable(close):
                close()


def _store_for(target: TargetSpec, spec: LunSpec, open_backing: OpenBacking | None) -> BlockStore:
    if spec.backing is None:
        return SparseImage(spec.size or DEFAULT_LUN_SIZE, spec.block_size)
    if open_backing is None:
        raise LocalProtocolError(
            f"LUN {spec.lun} of {target.name} has a backing file ({spec.backing}), which only "
            "the server opens; pass open_backing"
        )
    return open_backing(spec)
