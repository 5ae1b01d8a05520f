"""The Initiator Session ID, on its own so that a LoginConfig can be made without the PDU models.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ISID"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ISID:
    """Initiator Session ID (bytes 8-13 of Login PDUs): T (2 bits), A (6), B (16), C (8), D (16)."""

    t: int
    a: int
    b: int
    c: int
    d: int

    def to_bytes(self) -> bytes:
        return (
            bytes([(self.t & 0x3) << 6 | (self.a & 0x3F)])
            + self.b.to_bytes(2, "big")
            + bytes([self.c])
            + self.d.to_bytes(2, "big")
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ISID:
        return cls(
            t=raw[0] >> 6,
            a=raw[0] & 0x3F,
            b=int.from_bytes(raw[1:3], "big"),
            c=raw[3],
            d=int.from_bytes(raw[4:6], "big"),
        )
