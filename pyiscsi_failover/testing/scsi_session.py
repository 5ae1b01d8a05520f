"""The SCSI half of a Normal session on the test target: tasks, write data, replies, TMFs.

:class:`~.target.TargetConnection` checks each SCSI Command's CmdSN and ExpStatSN and hands it
here with the Data-Outs and Task Management requests that follow. :class:`ScsiSession` runs
each command against the session's :class:`~.logical_unit.LunTable` once its write data is
complete, and sends the answer through the connection (:class:`SessionPort`):

* Reads: the LU's data, cut to the Expected Data Transfer Length (EDTL), in Data-In PDUs no
  larger than the initiator's MaxRecvDataSegmentLength, F set at the end of every
  MaxBurstLength sequence; a GOOD status rides on the last one (S), with the residual; any
  other status comes in a SCSI Response with the sense (RFC 7143 11.7.3: sense never rides on
  a Data-In).
* Writes: immediate data (ImmediateData=Yes), then unsolicited Data-Out up to FirstBurstLength
  (InitialR2T=No), then one R2T at a time (MaxOutstandingR2T is 1) for at most MaxBurstLength
  each, until EDTL bytes arrived; then the LU runs and a SCSI Response answers.
* Residuals (RFC 7143 11.4.5): the SCSI transfer length (the LU's read data before the EDTL
  cut, or the write length its CDB names) against EDTL: O and the excess, or U and the
  shortfall.
* What a SCSI fault asks through the reply (:mod:`.scsi_faults`): a hold before the answer
  (``latency``: the connection turns it into a marker the server waits on) and smaller Data-In
  PDUs (``data_segment_limit``); the faults that shaped it are named in :class:`ScsiAnswered`.
* Task management: ABORT TASK, LOGICAL UNIT RESET and TARGET WARM RESET end the tasks they
  name (only writes still waiting for data can be in progress: every other command is
  answered as soon as it arrives); any other function is "not supported".

What an initiator does wrong (unsolicited data it was not allowed to send, a Data-Out past
EDTL or for no task, a DataSN out of order) is reported as a violation; the data is used where
that makes sense, so one slip does not hang the initiator.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from pyiscsi_failover.protocol.pdu import (
    RESERVED_TAG,
    ScsiCommand,
    ScsiDataIn,
    ScsiResponse,
    ScsiStatus,
    sense_data_segment,
)
from pyiscsi_failover.protocol.scsi import decode_sam_lun, parse_sense
from pyiscsi_failover.testing.faults import FaultKind
from pyiscsi_failover.testing.logical_unit import LunTable, Nexus, ScsiReply
from pyiscsi_failover.testing.task_pdus import (
    DataOut,
    TaskFunction,
    TaskManagementRequest,
    TaskResponse,
    r2t_header,
    task_response_header,
)

__all__ = [
    "ScsiAnswered",
    "ScsiSession",
    "SessionParams",
    "SessionPort",
    "TaskManagementAnswered",
]

_SERIAL_MASK: Final = 0xFFFFFFFF
_DATA_IN_STATUSES: Final = frozenset({ScsiStatus.GOOD, ScsiStatus.CONDITION_MET})
#: How many aborted ITTs are remembered, so that their late Data-Outs are dropped quietly.
_ABORTED_MEMORY: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiAnswered:
    """A SCSI Command was answered: its LUN (``None`` for an address that names none), the
    operation code, the status and, for CHECK CONDITION, (key, ASC, ASCQ); ``faults`` are the
    SCSI faults that shaped the answer."""

    itt: int
    lun: int | None
    opcode: int
    status: int
    sense: tuple[int, int, int] | None = None
    data_in: int = 0
    data_out: int = 0
    faults: tuple[FaultKind, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskManagementAnswered:
    function: int
    referenced_task_tag: int
    response: TaskResponse


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionParams:
    """The operational keys that shape SCSI traffic, as negotiated at login."""

    immediate_data: bool
    initial_r2t: bool
    first_burst_length: int
    max_burst_length: int


class SessionPort(Protocol):
    """What the session needs from its connection: sequence numbers and a way out."""

    @property
    def statsn(self) -> int:
        """The next StatSN (not taken)."""
        ...

    @property
    def expcmdsn(self) -> int: ...

    @property
    def maxcmdsn(self) -> int: ...

    @property
    def data_segment_limit(self) -> int:
        """The initiator's MaxRecvDataSegmentLength."""
        ...

    def take_statsn(self) -> int: ...

    def send(self, pdu: ScsiDataIn | ScsiResponse) -> None: ...

    def send_header(self, header: bytes) -> None:
        """Send a 48-byte header with no data segment (digest added by the connection)."""
        ...

    def hold(self, seconds: float) -> None:
        """What is sent after this leaves no earlier than ``seconds`` after the command (the
        bytes that made it) arrived."""
        ...

    def violation(self, description: str) -> None: ...

    def answered(self, event: ScsiAnswered | TaskManagementAnswered) -> None: ...


@dataclass(slots=True)
class _Write:
    """A write waiting for its data."""

    command: ScsiCommand
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    received: int = 0  # the end of the data received so far (in order, DataPDUInOrder=Yes)
    unsolicited_open: bool = False  # unsolicited Data-Out may still come
    r2t_ttt: int | None = None  # the outstanding R2T's tag
    r2t_end: int = 0
    r2ts: int = 0  # R2Ts sent: the R2TSN of the next one, and part of ExpDataSN
    next_datasn: int = 0

    def take(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, data))
        self.received = max(self.received, offset + len(data))

    def assembled(self) -> bytes:
        if len(self.pieces) == 1 and self.pieces[0][0] == 0:
            return self.pieces[0][1]
        buffer = bytearray(self.command.edtl)
        for offset, data in self.pieces:
            buffer[offset : offset + len(data)] = data
        return bytes(buffer)


def _serial_before(value: int, reference: int) -> bool:
    distance = (reference - value) & _SERIAL_MASK
    return 0 < distance < 0x80000000


class ScsiSession:
    """The SCSI tasks of one Normal session (one connection: MaxConnections is 1)."""

    __slots__ = ("_aborted", "_next_ttt", "_nexus", "_params", "_port", "_table", "_writes")

    def __init__(
        self, *, table: LunTable, nexus: Nexus, params: SessionParams, port: SessionPort
    ) -> None:
        self._table = table
        self._nexus = nexus
        self._params = params
        self._port = port
        self._writes: dict[int, _Write] = {}
        self._aborted: deque[int] = deque(maxlen=_ABORTED_MEMORY)
        self._next_ttt = 1

    @property
    def table(self) -> LunTable:
        return self._table

    @property
    def pending_writes(self) -> tuple[int, ...]:
        """ITTs of the writes still waiting for data."""
        return tuple(self._writes)

    # -- commands ------------------------------------------------------------------------------

    def command(self, command: ScsiCommand) -> None:
        """A SCSI Command whose CmdSN the connection has already accounted for."""
        if command.itt in self._writes:
            self._port.violation(f"SCSI Command reuses ITT 0x{command.itt:08x} of a task")
            del self._writes[command.itt]
        if not command.write or not command.edtl:
            if command.data:
                self._port.violation("a SCSI Command without W carries data")
            self._run(command, b"", r2ts=0)
            return
        params = self._params
        write = _Write(command=command, unsolicited_open=not command.final)
        if command.data:
            if not params.immediate_data:
                self._port.violation("immediate data was sent with ImmediateData=No")
            write.take(0, command.data[: command.edtl])
        if write.unsolicited_open and params.initial_r2t:
            self._port.violation("F=0 (unsolicited Data-Out to follow) with InitialR2T=Yes")
        if len(command.data) > min(params.first_burst_length, command.edtl):
            self._port.violation(
                f"{len(command.data)} bytes of immediate data exceed FirstBurstLength "
                f"{params.first_burst_length} or EDTL {command.edtl}"
            )
        self._writes[command.itt] = write
        self._advance(write)

    def data_out(self, pdu: DataOut) -> None:
        write = self._writes.get(pdu.itt)
        if write is None:
            if pdu.itt not in self._aborted:
                self._port.violation(f"Data-Out for ITT 0x{pdu.itt:08x}, which has no write")
            return
        edtl = write.command.edtl
        if pdu.ttt == RESERVED_TAG:
            if not write.unsolicited_open:
                self._port.violation("unsolicited Data-Out after the unsolicited burst ended")
            elif pdu.buffer_offset + len(pdu.data) > self._params.first_burst_length:
                self._port.violation("unsolicited data beyond FirstBurstLength")
            if pdu.final:
                write.unsolicited_open = False
        elif pdu.ttt == write.r2t_ttt:
            if pdu.buffer_offset + len(pdu.data) > write.r2t_end:
                self._port.violation("Data-Out beyond what the R2T asked for")
            if pdu.final:
                write.r2t_ttt = None
        else:
            self._port.violation(f"Data-Out with TTT 0x{pdu.ttt:08x}, which no R2T gave")
            return
        if pdu.datasn != write.next_datasn:
            self._port.violation(f"Data-Out DataSN {pdu.datasn}, expected {write.next_datasn}")
        write.next_datasn = 0 if pdu.final else pdu.datasn + 1
        if pdu.buffer_offset != write.received:
            self._port.violation(
                f"Data-Out at offset {pdu.buffer_offset}, expected {write.received} "
                "(DataPDUInOrder=Yes)"
            )
        end = pdu.buffer_offset + len(pdu.data)
        if end > edtl:
            self._port.violation(f"Data-Out reaches byte {end}, beyond EDTL {edtl}")
        if pdu.buffer_offset < edtl:
            write.take(pdu.buffer_offset, pdu.data[: edtl - pdu.buffer_offset])
        self._advance(write)

    def _advance(self, write: _Write) -> None:
        command = write.command
        if write.received >= command.edtl and write.r2t_ttt is None:
            del self._writes[command.itt]
            self._run(command, write.assembled(), r2ts=write.r2ts)
            return
        if write.unsolicited_open or write.r2t_ttt is not None:
            return  # more data is on its way
        port = self._port
        offset = write.received
        length = min(self._params.max_burst_length, command.edtl - offset)
        ttt = self._new_ttt()
        port.send_header(
            r2t_header(
                lun=command.lun,
                itt=command.itt,
                ttt=ttt,
                statsn=port.statsn,
                expcmdsn=port.expcmdsn,
                maxcmdsn=port.maxcmdsn,
                r2tsn=write.r2ts,
                buffer_offset=offset,
                desired_length=length,
            )
        )
        write.r2t_ttt, write.r2t_end = ttt, offset + length
        write.r2ts += 1
        write.next_datasn = 0

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = ttt % 0x7FFFFFFF + 1  # never the reserved all-ones tag
        return ttt

    # -- replies -------------------------------------------------------------------------------

    def _run(self, command: ScsiCommand, data_out: bytes, *, r2ts: int) -> None:
        reply = self._table.execute(
            command.lun, command.cdb, self._nexus, data_out, edtl=command.edtl
        )
        self.reply(command, reply, data_out=len(data_out), r2ts=r2ts)

    def reply(self, command: ScsiCommand, reply: ScsiReply, *, data_out: int, r2ts: int) -> None:
        """Send ``reply`` to ``command``: Data-In and/or a SCSI Response, with residuals."""
        port = self._port
        edtl = command.edtl
        spdtl = reply.write_length if command.write else len(reply.data)
        overflow, underflow = spdtl > edtl, spdtl < edtl
        residual = abs(spdtl - edtl)
        data = reply.data[:edtl] if command.read else b""
        # A status rides on the last Data-In only when no sense must go with it (11.7.3).
        rides = reply.status in _DATA_IN_STATUSES and not reply.sense and bool(data)
        if reply.latency:
            port.hold(reply.latency)
        segment = port.data_segment_limit
        if reply.data_segment_limit is not None:
            segment = min(segment, reply.data_segment_limit)
        sent = self._send_data_in(
            command,
            data,
            segment=segment,
            status=reply.status if rides else None,
            residual=residual,
            overflow=overflow,
            underflow=underflow,
        )
        if not rides:
            port.send(
                ScsiResponse(
                    itt=command.itt,
                    statsn=port.take_statsn(),
                    expcmdsn=port.expcmdsn,
                    maxcmdsn=port.maxcmdsn,
                    status=reply.status,
                    expdatasn=sent + r2ts,
                    overflow=overflow,
                    underflow=underflow,
                    residual=residual,
                    data=sense_data_segment(reply.sense) if reply.sense else b"",
                )
            )
        sense = None
        if reply.sense:
            parsed = parse_sense(reply.sense)
            sense = (int(parsed.key), parsed.asc, parsed.ascq)
        port.answered(
            ScsiAnswered(
                itt=command.itt,
                lun=decode_sam_lun(command.lun).number,
                opcode=command.cdb[0],
                status=int(reply.status),
                sense=sense,
                data_in=len(data),
                data_out=data_out,
                faults=reply.faults,
            )
        )

    def _send_data_in(
        self,
        command: ScsiCommand,
        data: bytes,
        *,
        segment: int,
        status: ScsiStatus | None,
        residual: int,
        overflow: bool,
        underflow: bool,
    ) -> int:
        """Data-In PDUs of at most ``segment`` bytes for ``data``; the number sent (the
        DataSNs used)."""
        if not data:
            return 0
        port = self._port
        burst = self._params.max_burst_length
        offset = datasn = 0
        total = len(data)
        while offset < total:
            burst_end = min((offset // burst + 1) * burst, total)
            end = min(offset + segment, burst_end)
            last = end == total
            with_status = last and status is not None
            port.send(
                ScsiDataIn(
                    itt=command.itt,
                    expcmdsn=port.expcmdsn,
                    maxcmdsn=port.maxcmdsn,
                    datasn=datasn,
                    buffer_offset=offset,
                    final=end == burst_end,
                    status=status if with_status else None,
                    statsn=port.take_statsn() if with_status else 0,
                    overflow=overflow and with_status,
                    underflow=underflow and with_status,
                    residual=residual if with_status else 0,
                    data=data[offset:end],
                )
            )
            offset, datasn = end, datasn + 1
        return datasn

    # -- task management -----------------------------------------------------------------------

    def task_management(self, request: TaskManagementRequest) -> None:
        """Answer a Task Management Function Request (its CmdSN is already accounted for)."""
        function = request.known_function
        if function is TaskFunction.ABORT_TASK:
            response = self._abort_task(request)
        elif function is TaskFunction.LOGICAL_UNIT_RESET:
            if self._table.responder(request.lun) is None:
                response = TaskResponse.LUN_DOES_NOT_EXIST
            else:
                self._abort_where(lambda write: write.command.lun == request.lun)
                response = TaskResponse.FUNCTION_COMPLETE
        elif function is TaskFunction.TARGET_WARM_RESET:
            self._abort_where(lambda write: True)
            response = TaskResponse.FUNCTION_COMPLETE
        else:
            response = TaskResponse.NOT_SUPPORTED
        port = self._port
        port.send_header(
            task_response_header(
                response=response,
                itt=request.itt,
                statsn=port.take_statsn(),
                expcmdsn=port.expcmdsn,
                maxcmdsn=port.maxcmdsn,
            )
        )
        port.answered(
            TaskManagementAnswered(
                function=request.function,
                referenced_task_tag=request.referenced_task_tag,
                response=response,
            )
        )

    def _abort_task(self, request: TaskManagementRequest) -> TaskResponse:
        itt = request.referenced_task_tag
        if itt in self._writes:
            del self._writes[itt]
            self._aborted.append(itt)
            return TaskResponse.FUNCTION_COMPLETE
        # RFC 7143 11.5.1: no such task, but its RefCmdSN is in the window and before this
        # request: it is considered received, and done. Otherwise the task does not exist
        # (here: it was answered already, or never sent).
        port = self._port
        in_window = not _serial_before(request.refcmdsn, port.expcmdsn) and not _serial_before(
            port.maxcmdsn, request.refcmdsn
        )
        if in_window and _serial_before(request.refcmdsn, request.cmdsn):
            return TaskResponse.FUNCTION_COMPLETE
        return TaskResponse.TASK_DOES_NOT_EXIST

    def _abort_where(self, chosen: Callable[[_Write], bool]) -> None:
        for itt in [itt for itt, write in self._writes.items() if chosen(write)]:
            del self._writes[itt]
            self._aborted.append(itt)
