"""Put :class:`~pyiscsi_failover.os_brick.connector.FailoverISCSIConnector` in os-brick's factory.

Nova builds its iSCSI connector once, at service start, with
``InitiatorConnector.factory("ISCSI", ...)``, and Cinder through the same factory; os-brick has
no plugin hook. The factory looks the protocol up in the dict ``get_connector_mapping(arch)``
returns (one per architecture family) and imports the class named there, so :func:`install`
rewrites the ``ISCSI`` entry of each of those dicts. ``ISER`` is left alone: it shares the
class but not the transport, and our probe speaks iSCSI over TCP only.

Call :func:`install` before the service builds its connector: the ``.pth`` hook
(:mod:`.autoload`) does it as soon as os-brick's connector module is imported.

Imports os-brick only when called; never trio or construct.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Final

__all__ = ["CONNECTOR_PATH", "STOCK_PATH", "install", "installed", "uninstall"]

LOG = logging.getLogger(__name__)

#: What the factory imports once :func:`install` ran.
CONNECTOR_PATH: Final = "pyiscsi_failover.os_brick.connector.FailoverISCSIConnector"
#: os-brick's own entry.
STOCK_PATH: Final = "os_brick.initiator.connectors.iscsi.ISCSIConnector"


def _mappings() -> list[dict[str, Any]]:
    """Every distinct dict ``get_connector_mapping`` can return (one per architecture family)."""
    from os_brick import initiator
    from os_brick.initiator import connector

    arches: tuple[str | None, ...] = (None, "x86_64", "aarch64", initiator.S390)
    arches += (initiator.S390X, initiator.PPC64, initiator.PPC64LE)
    found: dict[int, dict[str, Any]] = {}
    for arch in arches:
        mapping = connector.get_connector_mapping(arch)
        found.setdefault(id(mapping), mapping)
    return list(found.values())


def install() -> int:
    """Route ``factory("ISCSI")`` to our connector on every architecture; idempotent.

    Imports the connector class first, so that a broken install fails here, at service start,
    and not at the first attach. An ``ISCSI`` entry that is neither os-brick's nor ours
    (another plugin's) is left in place with a warning. Returns how many mappings now name ours.
    """
    from os_brick import initiator

    importlib.import_module(CONNECTOR_PATH.rpartition(".")[0])
    ours = 0
    for mapping in _mappings():
        current = mapping.get(initiator.ISCSI)
        if current == CONNECTOR_PATH:
            ours += 1
        elif current == STOCK_PATH:
            mapping[initiator.ISCSI] = CONNECTOR_PATH
            ours += 1
        elif current is not None:
            LOG.warning(
                "pyiscsi-failover: os-brick's ISCSI connector is already replaced by %s; "
                "leaving it",
                current,
            )
    LOG.debug("pyiscsi-failover: ISCSI connector replaced in %d mapping(s)", ours)
    return ours


def uninstall() -> int:
    """Put os-brick's own connector back wherever ours is; returns how many were restored.

    Connectors already built stay what they are: Nova builds its own at service start.
    """
    from os_brick import initiator

    restored = 0
    for mapping in _mappings():
        if mapping.get(initiator.ISCSI) == CONNECTOR_PATH:
            mapping[initiator.ISCSI] = STOCK_PATH
            restored += 1
    return restored


def installed() -> bool:
    """Whether ``factory("ISCSI")`` gives our connector on this machine's architecture."""
    from os_brick import initiator
    from os_brick.initiator import connector

    return bool(connector.get_connector_mapping().get(initiator.ISCSI) == CONNECTOR_PATH)
