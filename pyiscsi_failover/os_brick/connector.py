"""``FailoverISCSIConnector``: os-brick's ``ISCSIConnector`` with a portal probe before attach.

``connect_volume`` reads every candidate of the properties (the single target, the spec's
``target_alternative_*`` and os-brick's ``target_portals`` lists), has the probe child (see
:mod:`.probe`) try a login to each under the host's own initiator name, then calls os-brick's
unchanged ``connect_volume`` with the working ones only (see :mod:`.plan`):

* single path: the chosen candidate first, then the others not known dead;
* multipath: the healthy ones; without explicit lists os-brick still runs SendTargets
  discovery, through the first healthy portal, and what it discovers at a portal the probe
  found dead is dropped.

So os-brick keeps its semantics (``addressing_mode``, CHAP and discovery CHAP, its node records,
its locks, its device scan) and only stops paying open-iscsi's retries for dead portals. The
probe runs before os-brick takes its ``connect_volume`` lock, so a slow probe holds up no other
attach. Errors:

* no candidate works: ``TargetPortalsNotFound(target_portals=[every candidate's portal])``,
  before any node record is made;
* no verdict (the probe cannot start, crashes, times out; the host's initiator name cannot be
  read; our parser refuses the properties): a warning, and stock ``connect_volume`` with the
  properties as given, so our failure never blocks an attach os-brick alone could make.

``disconnect_volume``, ``extend_volume`` and ``get_volume_paths`` hand os-brick every candidate
in the plural form (and, where os-brick would have used SendTargets, what its discovery
database holds for each candidate's portal), so a volume attached through an alternative portal
loses its session, node record and device on detach. The connector never touches the
``attach``/``detach`` ledger of :mod:`pyiscsi_failover.iscsiadm`: os-brick makes and deletes
its own node records.

Imports os-brick; never trio or construct (Nova and Cinder run under eventlet).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from os_brick import exception
from os_brick.initiator.connectors.iscsi import ISCSIConnector

from pyiscsi_failover import __version__
from pyiscsi_failover.errors import ConnectionInfoError
from pyiscsi_failover.os_brick import plan
from pyiscsi_failover.os_brick.probe import (
    ProbeProcessError,
    ProbeSettings,
    Verdict,
    chosen_first,
    healthy,
    run_probe,
)

__all__ = ["FailoverISCSIConnector"]

LOG = logging.getLogger(__name__)

_announced = threading.Event()


def _announce(connector: FailoverISCSIConnector) -> None:
    """The line an operator looks for to see that the hook took effect (once per process)."""
    if _announced.is_set():
        return
    _announced.set()
    LOG.info(
        "pyiscsi-failover %s: FailoverISCSIConnector handles iSCSI attaches in this process "
        "(multipath %s); each attach probes its portals with %s -m pyiscsi_failover probe",
        __version__,
        "on" if connector.use_multipath else "off",
        connector.probe_settings.python,
    )


class FailoverISCSIConnector(ISCSIConnector):  # type: ignore[misc]  # os-brick has no types
    """os-brick's ``ISCSIConnector``, same constructor, with failover to a working portal.

    ``probe_settings`` is read from the environment at construction
    (:meth:`ProbeSettings.from_environ`); assign another to change it. When the environment
    holds an unusable value the connector logs it and probes with the defaults.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            self.probe_settings = ProbeSettings.from_environ()
        except ProbeProcessError as exc:
            LOG.warning("pyiscsi-failover: %s; probing with the default settings", exc)
            self.probe_settings = ProbeSettings()

    # ---------------------------------------------------------------------------------------
    # connect

    def connect_volume(self, connection_properties: dict[str, Any]) -> dict[str, Any] | None:
        _announce(self)
        try:
            targets = plan.targets_of(connection_properties)
        except ConnectionInfoError as exc:
            return self._stock_connect(connection_properties, f"cannot read them: {exc}")
        try:
            initiator = self.get_initiator()
        except Exception as exc:  # os-brick's own helper; whatever it raises, attach as stock
            return self._stock_connect(
                connection_properties,
                f"the host's initiator name could not be read: {type(exc).__name__}",
            )
        if not initiator:
            return self._stock_connect(
                connection_properties, "the host's initiator name could not be read"
            )
        try:
            verdict = run_probe(
                connection_properties,
                self.probe_settings,
                initiator_name=initiator,
                every_candidate=self.use_multipath,
                expected=len(targets),
            )
        except ProbeProcessError as exc:
            return self._stock_connect(connection_properties, str(exc))
        order = healthy(verdict) if self.use_multipath else chosen_first(verdict)
        if not order:
            LOG.warning(
                "pyiscsi-failover: no portal of this volume works (%s, %.2f s); not calling "
                "os-brick",
                verdict.summary(),
                verdict.elapsed_s,
            )
            raise exception.TargetPortalsNotFound(target_portals=[t.portal for t in targets])
        dead = [row.index for row in verdict.rows if row.index not in order]
        props = plan.connect_properties(
            connection_properties,
            targets,
            order,
            multipath=self.use_multipath,
            dead=dead if self.use_multipath else (),
        )
        self._log_plan(verdict, targets, order)
        result: dict[str, Any] | None = super().connect_volume(props)
        return result

    def _stock_connect(
        self, connection_properties: dict[str, Any], reason: str
    ) -> dict[str, Any] | None:
        LOG.warning(
            "pyiscsi-failover: no probe for this attach (%s); os-brick attaches on its own", reason
        )
        result: dict[str, Any] | None = super().connect_volume(connection_properties)
        return result

    def _log_plan(self, verdict: Verdict, targets: tuple[plan.Target, ...], order: Any) -> None:
        LOG.info(
            "pyiscsi-failover: probed %d candidate(s) in %.2f s: %s; os-brick %s: %s",
            len(targets),
            verdict.elapsed_s,
            verdict.summary(),
            "logs in to" if self.use_multipath else "tries in order",
            ", ".join(targets[i].portal for i in order),
        )

    def _discover_iscsi_portals(self, connection_properties: dict[str, Any]) -> list[Any]:
        """os-brick's SendTargets discovery, less the paths the probe found dead."""
        found: list[Any] = super()._discover_iscsi_portals(connection_properties)
        skip = connection_properties.get(plan.SKIP_KEY)
        if not skip:
            return found
        kept = [entry for entry in found if plan.path_key(entry[0], entry[1]) not in skip]
        if len(kept) < len(found):
            LOG.info(
                "pyiscsi-failover: discovery listed %d path(s); %d at portals the probe found "
                "dead are left out",
                len(found),
                len(found) - len(kept),
            )
        return kept or found

    # ---------------------------------------------------------------------------------------
    # disconnect, extend, paths: every candidate

    def _every_candidate(self, connection_properties: Mapping[str, Any]) -> dict[str, Any]:
        """The properties naming every candidate (and what discovery found through each)."""
        try:
            targets = plan.targets_of(connection_properties)
        except ConnectionInfoError as exc:
            LOG.warning(
                "pyiscsi-failover: cannot read the properties (%s); os-brick uses them as given",
                exc,
            )
            return dict(connection_properties)
        discovered: list[tuple[str, str, int | str]] = []
        if not plan.explicit_paths(connection_properties):
            for target in targets:
                discovered += self._discovered_through(connection_properties, target)
        return plan.cleanup_properties(connection_properties, targets, discovered)

    def _discovered_through(
        self, connection_properties: Mapping[str, Any], target: plan.Target
    ) -> list[tuple[str, str, int | str]]:
        """What os-brick's discovery database lists for ``target``'s portal, narrowed as
        os-brick narrows it: when every discovered (portal, LUN) also has the volume's IQN, the
        other IQNs there belong to other volumes."""
        lookup = dict(connection_properties)
        for key in plan.PLURAL_KEYS:
            lookup.pop(key, None)
        lookup.update(target_portal=target.portal, target_iqn=target.iqn, target_lun=target.lun)
        try:
            found = list(self._get_discoverydb_portals(lookup))
        except Exception:  # nothing discovered there (os-brick raises TargetPortalsNotFound)
            return []
        everything = {(ip, lun) for ip, _iqn, lun in found}
        matching = {(ip, lun) for ip, iqn, lun in found if iqn == target.iqn}
        if len(everything) == len(matching):
            return [(ip, target.iqn, lun) for ip, lun in sorted(matching, key=str)]
        return [(ip, iqn, lun) for ip, iqn, lun in found]

    def disconnect_volume(
        self,
        connection_properties: dict[str, Any],
        device_info: dict[str, Any] | None,
        force: bool = False,
        ignore_errors: bool = False,
    ) -> None:
        super().disconnect_volume(
            self._every_candidate(connection_properties),
            device_info,
            force=force,
            ignore_errors=ignore_errors,
        )

    def extend_volume(self, connection_properties: dict[str, Any]) -> int | None:
        result: int | None = super().extend_volume(self._every_candidate(connection_properties))
        return result

    def get_volume_paths(self, connection_properties: dict[str, Any]) -> list[str]:
        paths: list[str] = super().get_volume_paths(self._every_candidate(connection_properties))
        return paths
