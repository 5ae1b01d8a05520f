"""A LUN's backing file: the :class:`~.logical_unit.BlockStore` the server opens for a
:class:`~.config.LunSpec` with ``backing``.

Reads and writes are plain positional ``os.pread``/``os.pwrite`` on one descriptor, done
synchronously: a test target's I/O is small and local, and the sans-IO logical unit must get
its answer at once. A file shorter than the LUN is refused when
opened (:func:`open_backing_file`); should it shrink later, the missing blocks read as zeros.

Opens files, nothing else: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.testing.config import LunSpec

__all__ = ["BackingFile", "open_backing_file"]


class BackingFile:
    """An open backing file of ``size`` bytes (a whole number of blocks, at most the file's)."""

    __slots__ = ("_fd", "_path", "_size")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self._path = path
        self._fd = fd
        self._size = size

    def __repr__(self) -> str:
        return f"BackingFile({str(self._path)!r}, size={self._size})"

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def read(self, offset: int, length: int) -> bytes:
        chunks: list[bytes] = []
        done = 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                break  # the file ends early: the rest reads as zeros
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks) + bytes(length - done)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def open_backing_file(spec: LunSpec) -> BackingFile:
    """Open ``spec.backing`` for reading and writing; its size is ``spec.size`` or the file's
    own, rounded down to whole blocks. LocalProtocolError names the file and the reason when it
    cannot be used (missing, unreadable, a directory, empty, shorter than ``spec.size``)."""
    path = spec.backing
    if path is None:
        raise LocalProtocolError(f"LUN {spec.lun} has no backing file")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalProtocolError(
            f"LUN {spec.lun}: cannot open backing file {path}: {exc.strerror or exc}"
        ) from None
    try:
        size = _usable_size(spec, path, os.fstat(fd).st_size)
    except BaseException:
        os.close(fd)
        raise
    return BackingFile(Path(path), fd, size)


def _usable_size(spec: LunSpec, path: Path, actual: int) -> int:
    size = spec.size if spec.size is not None else actual - actual % spec.block_size
    if size < spec.block_size:
        raise LocalProtocolError(
            f"LUN {spec.lun}: backing file {path} holds {actual} bytes, less than one "
            f"{spec.block_size}-byte block"
        )
    if size > actual:
        raise LocalProtocolError(
            f"LUN {spec.lun}: backing file {path} holds {actual} bytes, less than the "
            f"configured size {size}"
        )
    return size
