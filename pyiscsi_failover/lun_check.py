"""The LUN check, sans-IO: which SCSI commands prove a volume usable, and what their answers mean.

After a login, a probe asks the target whether *this* logical unit is there and ready:

* REPORT LUNS, sent to LUN 0, must list the candidate's LUN;
* a standard INQUIRY of the LUN must show peripheral qualifier 0 and a direct-access device
  (tgtd answers a missing LUN with LUN 0's data marked 0x7F, and its LUN 0 is a controller,
  type 0x0C, for which the kernel makes no disk);
* INQUIRY VPD 0x83 gives the WWID, rendered as Linux and udev render it;
* TEST UNIT READY must pass, after bounded retries of the UNIT ATTENTION tgtd queues at every
  login; NOT READY 04/0B or 04/0C is an ALUA standby or unavailable port, not a dead one;
* READ CAPACITY(16), falling back to (10), gives the size.

All five are sent at once (the connection pipelines them within the target's CmdSN window),
and TEST UNIT READY twice: a new I_T nexus starts with a UNIT ATTENTION pending on every LU
(SPC's "power on, reset or I_T nexus loss", which tgtd and LIO both queue at login), the first
TEST UNIT READY takes it, and the second, already on the wire, is its retry. That costs one small
command instead of one more round trip. BUSY and TASK SET FULL are retried a bounded number of
times, as is a UNIT ATTENTION. A RESERVATION CONFLICT is a note, not a failure: it is usually a
cluster's own reservation.

:class:`LunCheck` is driven by the transport: :meth:`LunCheck.start` gives the first
:class:`ScsiRequest`\\s, :meth:`LunCheck.completed` takes each answer and gives what to send
next, and :attr:`LunCheck.done` turns true once nothing is left. Only status and sense decide
what to send next; the data of the answers (the LUN list, the INQUIRY pages, the capacity) are
read by :meth:`LunCheck.digest` and :meth:`LunCheck.judge`, which the transport calls when it
would otherwise wait for the target (and after sending its logout), and at the latest when
:attr:`LunCheck.report` is asked for. Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from pyiscsi_failover.errors import LocalProtocolError, SCSIReplyError
from pyiscsi_failover.initiator import ScsiCompleted
from pyiscsi_failover.protocol.pdu import ScsiStatus
from pyiscsi_failover.protocol.scsi import (
    MAX_FLAT_LUN,
    AddressingMode,
    Capacity,
    Cdb,
    PeripheralDeviceType,
    SamLun,
    Sense,
    SenseKey,
    StandardInquiry,
    VpdPage,
    cdb_inquiry,
    cdb_read_capacity_10,
    cdb_read_capacity_16,
    cdb_report_luns,
    cdb_test_unit_ready,
    lun_field,
    parse_read_capacity_10,
    parse_read_capacity_16,
    parse_report_luns,
    parse_sense,
    parse_standard_inquiry,
    parse_vpd_device_identification,
)

__all__ = ["MAX_RETRIES", "LunCheck", "LunInfo", "LunReport", "LunVerdict", "ScsiRequest", "Step"]

#: How often one command is retried after BUSY, TASK SET FULL or UNIT ATTENTION.
MAX_RETRIES: Final = 3
_LUN_ZERO: Final = bytes(8)
#: ILLEGAL REQUEST codes of an LU that does not know a command: invalid opcode, invalid field.
_NOT_SUPPORTED: Final = frozenset({(0x20, 0x00), (0x24, 0x00)})


class Step(enum.Enum):
    """What each command of the check is for."""

    # Identity hash (members are singletons): Enum's runs Python code on every dict lookup.
    __hash__ = object.__hash__

    REPORT_LUNS = "REPORT LUNS"
    INQUIRY = "INQUIRY"
    DEVICE_ID = "INQUIRY VPD 0x83"
    TEST_UNIT_READY = "TEST UNIT READY"
    READ_CAPACITY_16 = "READ CAPACITY(16)"
    READ_CAPACITY_10 = "READ CAPACITY(10)"


#: The same CDB every time: built once.
_CDBS: Final[dict[Step, Cdb]] = {
    Step.REPORT_LUNS: cdb_report_luns(),
    Step.INQUIRY: cdb_inquiry(),
    Step.DEVICE_ID: cdb_inquiry(evpd=True, page=VpdPage.DEVICE_IDENTIFICATION),
    Step.TEST_UNIT_READY: cdb_test_unit_ready(),
    Step.READ_CAPACITY_16: cdb_read_capacity_16(),
    Step.READ_CAPACITY_10: cdb_read_capacity_10(),
}


class LunVerdict(enum.Enum):
    """The check's answer; the values are the prober's outcome words."""

    OK = "ok"
    MISSING = "lun_missing"
    NOT_READY = "lun_not_ready"
    STANDBY = "lun_standby"
    ERROR = "lun_error"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiRequest:
    """One command to submit: its CDB for ``lun`` (8 bytes as on the wire), and why."""

    step: Step
    cdb: Cdb
    lun: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class LunInfo:
    """What the logical unit told about itself; ``wwid`` as ``/sys/block/sdX/device/wwid``
    shows it, ``wwid_udev`` as udev's scsi_id (and so ``/dev/disk/by-id``) does."""

    wwid: str | None
    wwid_udev: str | None
    size_bytes: int | None
    block_size: int | None
    vendor: str
    product: str
    revision: str
    device_type: int

    def to_json(self) -> dict[str, object]:
        return {
            "wwid": self.wwid,
            "wwid_udev": self.wwid_udev,
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
            "vendor": self.vendor,
            "product": self.product,
            "revision": self.revision,
            "device_type": self.device_type,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LunReport:
    verdict: LunVerdict
    detail: str
    info: LunInfo | None = None
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class _Answers:
    inquiry: StandardInquiry | None = None
    wwid: str | None = None
    wwid_udev: str | None = None
    capacity: Capacity | None = None
    listed: bool | None = None
    listed_luns: tuple[SamLun, ...] = ()
    flat_listed: bool = False
    ready: bool = False
    failures: dict[Step, tuple[LunVerdict, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _sense_of(event: ScsiCompleted) -> Sense | None:
    if not event.sense:
        return None
    try:
        return parse_sense(event.sense)
    except SCSIReplyError:
        return None


def _unknown_to_the_lu(event: ScsiCompleted, sense: Sense | None) -> bool:
    """An ILLEGAL REQUEST saying the LU does not know the command (or this form of it)."""
    return (
        event.status is ScsiStatus.CHECK_CONDITION
        and sense is not None
        and sense.key is SenseKey.ILLEGAL_REQUEST
        and (sense.asc, sense.ascq) in _NOT_SUPPORTED
    )


def _describe(event: ScsiCompleted, sense: Sense | None) -> str:
    if event.status is None:
        return f"the target could not complete it (iSCSI response 0x{event.response:02x})"
    name = event.status.name.replace("_", " ")
    return name if sense is None else f"{name}, {sense.description}"


class LunCheck:
    """One LUN check over one logged-in session (see the module docstring)."""

    def __init__(self, lun: int, mode: AddressingMode = AddressingMode.SAM) -> None:
        try:
            self.lun = lun_field(lun, mode)
        except (LocalProtocolError, ValueError) as exc:
            raise LocalProtocolError(f"LUN {lun} with addressing mode {mode}: {exc}") from exc
        self.number = lun
        self.mode = AddressingMode(mode)
        self._in_flight: dict[Step, int] = {}  # step -> copies sent and not yet answered
        self._retries: dict[Step, int] = {}  # step -> retries sent
        self._answers = _Answers()
        self._final: list[tuple[Step, ScsiCompleted, Sense | None]] = []  # answers to judge
        self._taken = 0  # how many of them digest() has read
        self._done = False
        self._report: LunReport | None = None

    def start(self) -> list[ScsiRequest]:
        steps = (
            Step.REPORT_LUNS,
            Step.INQUIRY,
            Step.DEVICE_ID,
            Step.TEST_UNIT_READY,
            Step.READ_CAPACITY_16,
        )
        first = [self._request(step) for step in steps]
        # The login's UNIT ATTENTION retry, sent ahead (see the module docstring).
        return [*first, self._request(Step.TEST_UNIT_READY, retry=True)]

    def _request(self, step: Step, *, retry: bool = False) -> ScsiRequest:
        self._in_flight[step] = self._in_flight.get(step, 0) + 1
        self._retries[step] = self._retries.get(step, 0) + retry
        lun = _LUN_ZERO if step is Step.REPORT_LUNS else self.lun
        return ScsiRequest(step=step, cdb=_CDBS[step], lun=lun)

    @property
    def done(self) -> bool:
        """Whether every command has its final answer (or the check was abandoned)."""
        return self._done

    @property
    def report(self) -> LunReport | None:
        """The check's answer once :attr:`done` (see :meth:`judge`)."""
        return self.judge()

    def digest(self) -> None:
        """Read the data of the answers in so far (the transport calls it while it waits)."""
        for step, event, sense in self._final[self._taken :]:
            self._take(step, event, sense)
        self._taken = len(self._final)

    def judge(self) -> LunReport | None:
        """Read the answers' data and give the verdict, once; None until :attr:`done`. The
        transport calls it while the target works on the logout."""
        if not self._done:
            return None
        if self._report is None:
            self.digest()
            self._report = self._verdict()
        return self._report

    def abandon(self, reason: str) -> None:
        """End the check early (the target asked us to log out, say): a ``lun_error``."""
        self._in_flight.clear()
        self._done = True
        self._report = LunReport(
            verdict=LunVerdict.ERROR,
            detail=f"LUN {self.number}: check not finished: {reason}",
            notes=tuple(self._answers.notes),
        )

    def completed(self, step: Step, event: ScsiCompleted) -> list[ScsiRequest]:
        """Take the answer to ``step``; return the commands to send next (retries, fallback)."""
        in_flight = self._in_flight.get(step, 0)
        if not in_flight:
            raise LocalProtocolError(f"{step.value} was answered but is not in flight")
        self._in_flight[step] = in_flight - 1
        sense = _sense_of(event)
        if self._retryable(event, sense):
            if in_flight > 1:
                return []  # its retry is already on the wire
            if self._retries[step] < MAX_RETRIES:
                return [self._request(step, retry=True)]
        if step is Step.READ_CAPACITY_16 and _unknown_to_the_lu(event, sense):
            return [self._request(Step.READ_CAPACITY_10)]
        self._final.append((step, event, sense))
        self._done = not any(self._in_flight.values())
        return []

    @staticmethod
    def _retryable(event: ScsiCompleted, sense: Sense | None) -> bool:
        if event.status in (ScsiStatus.BUSY, ScsiStatus.TASK_SET_FULL):
            return True
        return (
            event.status is ScsiStatus.CHECK_CONDITION
            and sense is not None
            and sense.key is SenseKey.UNIT_ATTENTION
        )

    def _take(self, step: Step, event: ScsiCompleted, sense: Sense | None) -> None:
        answers = self._answers
        if event.status is ScsiStatus.RESERVATION_CONFLICT:
            answers.notes.append(f"{step.value}: reservation conflict (another initiator's)")
            if step is Step.TEST_UNIT_READY:
                answers.ready = True  # reserved by someone else is still there and ready
            return
        if event.status is not ScsiStatus.GOOD:
            self._failed(step, event, sense)
            return
        try:
            match step:
                case Step.REPORT_LUNS:
                    luns = parse_report_luns(event.data)
                    answers.listed = luns.lists(self.lun)
                    answers.listed_luns = luns.luns
                    flat_addressable = 256 <= self.number <= MAX_FLAT_LUN
                    if not answers.listed and self.mode is AddressingMode.SAM and flat_addressable:
                        # tgt and others list LUNs >= 256 flat-addressed: os-brick's SAM2.
                        flat = lun_field(self.number, AddressingMode.SAM2)
                        answers.flat_listed = flat != self.lun and luns.lists(flat)
                case Step.INQUIRY:
                    answers.inquiry = parse_standard_inquiry(event.data)
                case Step.DEVICE_ID:
                    identification = parse_vpd_device_identification(event.data)
                    answers.wwid = identification.wwid
                    answers.wwid_udev = identification.scsi_id
                case Step.TEST_UNIT_READY:
                    # Of two answers (see start()), the later one is the LU's state now.
                    answers.ready = True
                    answers.failures.pop(step, None)
                case Step.READ_CAPACITY_16:
                    answers.capacity = parse_read_capacity_16(event.data)
                case Step.READ_CAPACITY_10:
                    capacity = parse_read_capacity_10(event.data)
                    if capacity.needs_read_capacity_16:
                        answers.notes.append("READ CAPACITY(10) says the LU needs (16)")
                    answers.capacity = capacity
        except SCSIReplyError as exc:
            answers.failures[step] = (LunVerdict.ERROR, f"{step.value}: {exc}")

    def _failed(self, step: Step, event: ScsiCompleted, sense: Sense | None) -> None:
        answers = self._answers
        what = f"{step.value}: {_describe(event, sense)}"
        if step is Step.DEVICE_ID:
            # No page 0x83 is allowed (SPC makes it mandatory, old LUs lack it): no WWID then.
            answers.notes.append(f"no WWID: {what}")
            return
        verdict = LunVerdict.ERROR
        if sense is not None:
            if (sense.key, sense.asc) == (SenseKey.ILLEGAL_REQUEST, 0x25):
                verdict = LunVerdict.MISSING
            elif sense.key is SenseKey.NOT_READY and (sense.asc, sense.ascq) in (
                (0x04, 0x0B),
                (0x04, 0x0C),
            ):
                verdict = LunVerdict.STANDBY
            elif sense.key is SenseKey.NOT_READY:
                verdict = LunVerdict.NOT_READY
            elif sense.key is SenseKey.UNIT_ATTENTION:
                verdict = LunVerdict.NOT_READY
                what += f" (still after {MAX_RETRIES} retries)"
        if step is Step.TEST_UNIT_READY:
            answers.ready = False
        answers.failures[step] = (verdict, what)

    def _verdict(self) -> LunReport:
        answers = self._answers
        notes = tuple(answers.notes)
        lun = f"LUN {self.number}"
        if answers.listed is False:
            listed = ", ".join(str(lun.linux_lun) for lun in answers.listed_luns) or "none"
            hint = ""
            if answers.flat_listed:
                hint = "; it lists this LUN flat-addressed: does connection_info need"
                hint += " addressing_mode 'SAM2'?"
            return LunReport(
                verdict=LunVerdict.MISSING,
                detail=f"{lun} is not in REPORT LUNS (it lists {listed}){hint}",
                notes=notes,
            )
        inquiry = answers.inquiry
        if inquiry is not None and not inquiry.is_connected_disk:
            qualifier, device = int(inquiry.peripheral_qualifier), int(inquiry.device_type)
            what = (
                "no logical unit there"
                if qualifier != 0
                else f"a {_device_name(device)}, not a disk"
            )
            return LunReport(
                verdict=LunVerdict.MISSING,
                detail=f"{lun}: INQUIRY shows {what} (qualifier {qualifier}, type 0x{device:02x})",
                notes=notes,
            )
        for verdict in (
            LunVerdict.MISSING,
            LunVerdict.STANDBY,
            LunVerdict.NOT_READY,
            LunVerdict.ERROR,
        ):
            found = [what for v, what in answers.failures.values() if v is verdict]
            if found:
                return LunReport(verdict=verdict, detail=f"{lun}: " + "; ".join(found), notes=notes)
        if inquiry is None or not answers.ready:
            return LunReport(
                verdict=LunVerdict.ERROR, detail=f"{lun}: the check is incomplete", notes=notes
            )
        capacity = answers.capacity
        info = LunInfo(
            wwid=answers.wwid,
            wwid_udev=answers.wwid_udev,
            size_bytes=None if capacity is None else capacity.size_bytes,
            block_size=None if capacity is None else capacity.block_length,
            vendor=inquiry.vendor,
            product=inquiry.product,
            revision=inquiry.revision,
            device_type=int(inquiry.device_type),
        )
        size = "unknown size" if info.size_bytes is None else _size(info.size_bytes)
        detail = f"{lun} ready: {size}, {info.wwid or 'no WWID'}"
        return LunReport(verdict=LunVerdict.OK, detail=detail, info=info, notes=notes)


def _device_name(device_type: int) -> str:
    try:
        return PeripheralDeviceType(device_type).name.lower().replace("_", " ")
    except ValueError:
        return f"device of type 0x{device_type:02x}"


def _size(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
