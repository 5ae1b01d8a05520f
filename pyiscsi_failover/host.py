"""Facts about this host that a login needs: its iSCSI InitiatorName.

Probing with the host's own InitiatorName lets target ACLs match, exactly as they will for the
kernel session that follows; the probe's ISID keeps the two sessions apart.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Final

from pyiscsi_failover.errors import InvalidName
from pyiscsi_failover.names import validate_iscsi_name

__all__ = [
    "FALLBACK_PREFIX",
    "INITIATOR_NAME_FILE",
    "default_initiator_name",
    "read_initiator_name",
]

logger = logging.getLogger(__name__)

INITIATOR_NAME_FILE: Final = Path("/etc/iscsi/initiatorname.iscsi")
FALLBACK_PREFIX: Final = "iqn.2026-11.org.pyiscsi-failover"


def read_initiator_name(path: Path = INITIATOR_NAME_FILE) -> str | None:
    """The ``InitiatorName=`` of open-iscsi's file, or None when absent or unusable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("InitiatorName="):
            value = line.partition("=")[2].strip()
            try:
                return validate_iscsi_name(value)
            except InvalidName:
                logger.warning("ignoring invalid InitiatorName in %s: %r", path, value)
                return None
    return None


def default_initiator_name(path: Path = INITIATOR_NAME_FILE) -> str:
    """open-iscsi's InitiatorName if configured, else one derived from the host name."""
    name = read_initiator_name(path)
    if name is not None:
        return name
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()) or "localhost"
    return f"{FALLBACK_PREFIX}:{host}"
