"""The target side of the four task PDUs the codec does not know yet: SCSI Data-Out and Task
Management Function Request in, R2T and Task Management Function Response out.

:mod:`pyiscsi_failover.protocol.wire` is the package's codec, and it speaks what an initiator
needs (SCSI Command, Response, Data-In...). A target that takes writes and task management
also needs these four; until the codec has them, the test target reads and writes their fixed
48-byte headers here, field by field as RFC 7143 lays them out (11.5, 11.6, 11.7, 11.8). Only
the header is handled here: framing, digests and the data segment are the connection's.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DATA_OUT",
    "TASK_MANAGEMENT_REQUEST",
    "DataOut",
    "TaskFunction",
    "TaskManagementRequest",
    "TaskResponse",
    "r2t_header",
    "task_response_header",
]

#: Opcodes (byte 0, bits 5-0).
TASK_MANAGEMENT_REQUEST: Final = 0x02
DATA_OUT: Final = 0x05
_TASK_MANAGEMENT_RESPONSE: Final = 0x22
_R2T: Final = 0x31
_FINAL: Final = 0x80
_IMMEDIATE: Final = 0x40
_FUNCTION: Final = 0x7F


def _field(header: bytes, offset: int) -> int:
    return int.from_bytes(header[offset : offset + 4], "big")


class TaskFunction(enum.IntEnum):
    """The Function field of a Task Management Function Request (RFC 7143 11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TaskResponse(enum.IntEnum):
    """The Response field of a Task Management Function Response (RFC 7143 11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


@dataclass(frozen=True, slots=True, kw_only=True)
class DataOut:
    """A SCSI Data-Out (0x05): ``data`` at ``buffer_offset`` of the write tagged ``itt``.

    ``ttt`` is the all-ones reserved tag for unsolicited data, else the R2T's tag; ``final``
    (F) ends the sequence (the unsolicited burst, or the data one R2T asked for).
    """

    final: bool
    lun: bytes
    itt: int
    ttt: int
    expstatsn: int
    datasn: int
    buffer_offset: int
    data: bytes

    @classmethod
    def from_pdu(cls, header: bytes, data: bytes) -> DataOut:
        return cls(
            final=bool(header[1] & _FINAL),
            lun=header[8:16],
            itt=_field(header, 16),
            ttt=_field(header, 20),
            expstatsn=_field(header, 28),
            datasn=_field(header, 36),
            buffer_offset=_field(header, 40),
            data=data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskManagementRequest:
    """A Task Management Function Request (0x02). ``function`` is kept raw: a reserved value
    is answered, not refused."""

    immediate: bool
    function: int
    lun: bytes
    itt: int
    referenced_task_tag: int
    cmdsn: int
    expstatsn: int
    refcmdsn: int
    expdatasn: int

    @classmethod
    def from_pdu(cls, header: bytes) -> TaskManagementRequest:
        return cls(
            immediate=bool(header[0] & _IMMEDIATE),
            function=header[1] & _FUNCTION,
            lun=header[8:16],
            itt=_field(header, 16),
            referenced_task_tag=_field(header, 20),
            cmdsn=_field(header, 24),
            expstatsn=_field(header, 28),
            refcmdsn=_field(header, 32),
            expdatasn=_field(header, 36),
        )

    @property
    def known_function(self) -> TaskFunction | None:
        try:
            return TaskFunction(self.function)
        except ValueError:
            return None


def _header(opcode: int, byte1: int, *, lun: bytes = bytes(8), itt: int) -> bytearray:
    header = bytearray(48)
    header[0], header[1] = opcode, byte1
    header[8:16] = lun
    header[16:20] = itt.to_bytes(4, "big")
    return header


def _put(header: bytearray, offset: int, value: int) -> None:
    header[offset : offset + 4] = value.to_bytes(4, "big")


def r2t_header(
    *,
    lun: bytes,
    itt: int,
    ttt: int,
    statsn: int,
    expcmdsn: int,
    maxcmdsn: int,
    r2tsn: int,
    buffer_offset: int,
    desired_length: int,
) -> bytes:
    """An R2T (0x31, RFC 7143 11.8): send ``desired_length`` bytes from ``buffer_offset``.
    StatSN is the next one the target will use; an R2T does not take it."""
    header = _header(_R2T, _FINAL, lun=lun, itt=itt)
    for offset, value in (
        (20, ttt),
        (24, statsn),
        (28, expcmdsn),
        (32, maxcmdsn),
        (36, r2tsn),
        (40, buffer_offset),
        (44, desired_length),
    ):
        _put(header, offset, value)
    return bytes(header)


def task_response_header(
    *, response: TaskResponse, itt: int, statsn: int, expcmdsn: int, maxcmdsn: int
) -> bytes:
    """A Task Management Function Response (0x22, RFC 7143 11.6)."""
    header = _header(_TASK_MANAGEMENT_RESPONSE, _FINAL, itt=itt)
    header[2] = response
    for offset, value in ((24, statsn), (28, expcmdsn), (32, maxcmdsn)):
        _put(header, offset, value)
    return bytes(header)
