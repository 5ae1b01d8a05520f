"""CRC32C, the checksum of iSCSI's HeaderDigest and DataDigest.

RFC 7143 uses the Castagnoli CRC in its usual reflected form and sends the 32-bit result least
significant byte first, so :func:`crc32c` returns the four bytes exactly as they go on the wire
(32 zero bytes give ``aa 36 91 8a``). The arithmetic is left to ``google_crc32c`` (a C extension)
rather than done by hand here: a home-made table is one more thing to get subtly wrong.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import google_crc32c

__all__ = ["DIGEST_LENGTH", "crc32c"]

#: Bytes a header or data digest occupies on the wire.
DIGEST_LENGTH = 4


def crc32c(data: bytes | bytearray | memoryview) -> bytes:
    """The on-the-wire CRC32C digest of ``data`` (least significant byte first)."""
    # google_crc32c insists on a read-only buffer; copy anything else (bytearray, memoryview of
    # one) rather than make every caller remember that.
    raw = data if isinstance(data, bytes) else bytes(data)
    value: int = google_crc32c.value(raw)
    return value.to_bytes(DIGEST_LENGTH, "little")
