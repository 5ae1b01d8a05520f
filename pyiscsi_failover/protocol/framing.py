"""A receive buffer that cuts a TCP byte stream into whole PDUs.

The transport feeds whatever bytes arrive with :meth:`PDUBuffer.feed` and pulls PDUs with
:meth:`PDUBuffer.next_pdu`, which returns ``None`` while a PDU is incomplete (h11's
``receive_data``/``next_event``). The 48-byte BHS is judged as soon as it is complete: a
DataSegmentLength above the cap (our MaxRecvDataSegmentLength) is refused before a single byte of
its data is waited for, so a hostile length cannot make us buffer megabytes. The AHS needs no
cap of its own: the 8-bit TotalAHSLength bounds it to 1020 bytes.

Bytes are appended to one ``bytearray`` and consumed by advancing an offset; the consumed prefix
is dropped only once it is at least half the buffer, so each byte is copied a bounded number of
times however the stream is chunked.

After a decode error PDU boundaries are lost (the stream cannot be resynchronised), so the
buffer stays failed: every later :meth:`~PDUBuffer.next_pdu` raises the same error again and
fed bytes are dropped. The caller should close the connection.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from typing import Final

from pyiscsi_failover.errors import LocalProtocolError, PDUDecodeError
from pyiscsi_failover.protocol.pdu import PDU
from pyiscsi_failover.protocol.wire import MAX_DATA_SEGMENT_LENGTH, next_pdu

__all__ = ["PDUBuffer"]

#: Consumed bytes are dropped from the front once there are at least this many (and they are
#: at least half the buffer); below that the copy is not worth doing.
_COMPACT_AT: Final = 64 * 1024


class PDUBuffer:
    """Bytes in, whole PDUs out, with a cap on the data segment a peer may announce.

    ``max_data_segment_length``, ``header_digest`` and ``data_digest`` may be changed at any
    time (they change when login completes); they apply from the next PDU cut.
    """

    __slots__ = ("_buffer", "_failed", "_max", "_start", "data_digest", "header_digest")

    def __init__(
        self,
        *,
        max_data_segment_length: int = 8192,
        header_digest: bool = False,
        data_digest: bool = False,
    ) -> None:
        self._buffer = bytearray()
        self._start = 0
        self._failed: PDUDecodeError | None = None
        self._max = _valid_cap(max_data_segment_length)
        self.header_digest = header_digest
        self.data_digest = data_digest

    @property
    def max_data_segment_length(self) -> int:
        """The largest DataSegmentLength accepted (our declared MaxRecvDataSegmentLength)."""
        return self._max

    @max_data_segment_length.setter
    def max_data_segment_length(self, value: int) -> None:
        self._max = _valid_cap(value)

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as part of a PDU."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer (dropped once the stream has failed)."""
        if self._failed is None:
            self._buffer += data

    def next_pdu(self) -> PDU | None:
        """The next whole PDU, or None until more bytes arrive; PDUDecodeError for garbage."""
        if self._failed is not None:
            raise _again(self._failed)
        try:
            found = next_pdu(
                self._buffer,
                self._start,
                header_digest=self.header_digest,
                data_digest=self.data_digest,
                max_data_segment_length=self._max,
            )
        except PDUDecodeError as exc:
            self._fail(exc)
            raise
        if found is None:
            return None
        pdu, total = found
        self._consume(total)
        return pdu

    def _consume(self, count: int) -> None:
        self._start += count
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start >= _COMPACT_AT and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0

    def _fail(self, exc: PDUDecodeError) -> None:
        self._failed = exc
        self._buffer = bytearray()
        self._start = 0


def _again(exc: PDUDecodeError) -> PDUDecodeError:
    """A fresh copy of a stored error (re-raising one instance would pile up tracebacks)."""
    return PDUDecodeError(str(exc), field=exc.field, offset=exc.offset, value=exc.value)


def _valid_cap(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalProtocolError(f"max_data_segment_length must be an int, not {value!r}")
    if not 0 <= value <= MAX_DATA_SEGMENT_LENGTH:
        raise LocalProtocolError(
            f"max_data_segment_length must be 0..{MAX_DATA_SEGMENT_LENGTH}, not {value}"
        )
    return value
