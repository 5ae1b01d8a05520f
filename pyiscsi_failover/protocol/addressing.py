"""os-brick's LUN addressing modes, on their own: the connection_info model reads them and the
SCSI helpers apply them, and neither should have to load the other (nor the PDU models) for that.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["AddressingMode"]


class AddressingMode(str, Enum):
    """connection_info's ``addressing_mode``: how its LUN becomes the LUN Linux uses, spelled
    as os-brick's constants spell it (case-sensitive)."""

    SAM = "SAM"
    SAM2 = "SAM2"
    SAM3_FLAT = "SAM3-flat"
    TRANSPARENT = "transparent"
