"""pyiscsi-failover: find the first working iSCSI portal/target in user space, then hand it
to open-iscsi."""

from __future__ import annotations

from pyiscsi_failover.errors import ISCSIError

__version__ = "0.1.0"

__all__ = ["ISCSIError", "__version__"]
