"""CRC32C as iSCSI sends it: RFC 3720 appendix B.4 vectors, byte order, and a bitwise oracle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyiscsi_failover.protocol.digest import DIGEST_LENGTH, crc32c

# RFC 3720 appendix B.4 (kept in RFC 7143): inputs and the digest bytes as they go on the wire.
_SCSI_READ_10_PDU = bytes.fromhex(
    "01c00000 00000000 00000000 00000000 14000000 00000400"
    "00000014 00000018 28000000 00000000 02000000 00000000"
)


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        pytest.param(bytes(32), "aa36918a", id="32-zeros"),
        pytest.param(b"\xff" * 32, "43aba862", id="32-ones"),
        pytest.param(bytes(range(32)), "4e79dd46", id="incrementing"),
        pytest.param(bytes(range(31, -1, -1)), "5cdb3f11", id="decrementing"),
        pytest.param(_SCSI_READ_10_PDU, "563a96d9", id="scsi-read-10-pdu"),
        # The catalogue check value of CRC-32C is 0xe3069283; iSCSI sends it LSB first.
        pytest.param(b"123456789", "839206e3", id="check-value"),
        pytest.param(b"", "00000000", id="empty"),
    ],
)
def test_known_vectors(data: bytes, wire: str) -> None:
    assert crc32c(data) == bytes.fromhex(wire)


def test_accepts_mutable_buffers() -> None:
    # google_crc32c itself refuses a bytearray; the wrapper must not.
    assert crc32c(bytearray(32)) == crc32c(bytes(32)) == bytes.fromhex("aa36918a")
    assert crc32c(memoryview(bytearray(b"123456789"))) == bytes.fromhex("839206e3")


def _bitwise_crc32c(data: bytes) -> bytes:
    """Test oracle only: the textbook reflected CRC-32C (polynomial 0x82f63b78), one bit a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return (crc ^ 0xFFFFFFFF).to_bytes(4, "little")


@given(st.binary(max_size=300))
def test_matches_bitwise_reference(data: bytes) -> None:
    digest = crc32c(data)
    assert len(digest) == DIGEST_LENGTH
    assert digest == _bitwise_crc32c(data)
