"""os-brick integration: Nova's and Cinder's iSCSI attaches fail over to a working portal.

os-brick (the library Nova and Cinder call for every volume attach) never reads the spec's
``target_alternative_*`` keys and pays open-iscsi's login retries (about 120 s) for every dead
portal while it holds its host-wide attach lock. :class:`FailoverISCSIConnector` is os-brick's
own ``ISCSIConnector`` with a probe in front of ``connect_volume``: it asks
``python -m pyiscsi_failover probe`` (a child process) which candidates answer a login, then lets
os-brick's unchanged code log in to those only. :func:`install` puts it in place of the ``ISCSI``
connector in os-brick's connector factory; ``contrib/os-brick/`` holds the ``.pth`` hook and
systemd drop-ins that call it in nova-compute, cinder-volume and cinder-backup.

Modules:

* :mod:`.probe`: runs the probe child and reads its JSON verdict (no os-brick needed).
* :mod:`.plan`: the candidates of a ``connection_properties`` dict, spelled as the dict spells
  them, and the properties handed to os-brick for connect and for cleanup (pure).
* :mod:`.connector`: the connector class (imports os-brick).
* :mod:`.hook`: :func:`install` / :func:`uninstall` (import os-brick when called).
* :mod:`.autoload`: what the ``.pth`` file imports at interpreter start (imports nothing heavy).

Nova and Cinder run under eventlet, where ``import trio`` fails, so nothing in this package
imports trio or construct; the probe, which needs trio, runs in its own interpreter. Importing
this package itself loads nothing: its names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyiscsi_failover.os_brick.autoload import ENV_ENABLE
    from pyiscsi_failover.os_brick.connector import FailoverISCSIConnector
    from pyiscsi_failover.os_brick.hook import CONNECTOR_PATH, install, uninstall

__all__ = ["CONNECTOR_PATH", "ENV_ENABLE", "FailoverISCSIConnector", "install", "uninstall"]

_HOMES = {
    "CONNECTOR_PATH": "hook",
    "ENV_ENABLE": "autoload",
    "FailoverISCSIConnector": "connector",
    "install": "hook",
    "uninstall": "hook",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
