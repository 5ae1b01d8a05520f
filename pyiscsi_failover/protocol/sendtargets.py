"""The answer to ``SendTargets``: TargetName/TargetAddress lists turned into typed targets.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pyiscsi_failover.errors import InvalidName, InvalidPortal, TextError
from pyiscsi_failover.names import Portal, validate_iscsi_name

__all__ = ["DiscoveredTarget", "format_send_targets", "parse_send_targets"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveredTarget:
    """One target a portal told us about, with the portals (and their group tags) serving it."""

    iqn: str
    portals: tuple[Portal, ...] = ()


def parse_send_targets(pairs: Iterable[tuple[str, str]]) -> list[DiscoveredTarget]:
    """Group ``TargetName``/``TargetAddress`` pairs; other keys (e.g. TargetAlias) are ignored.

    A TargetAddress before any TargetName, an invalid name or an unparsable address is the
    target's fault and raises :class:`TextError` naming the key and value.
    """
    targets: list[DiscoveredTarget] = []
    name: str | None = None
    portals: list[Portal] = []
    for key, value in pairs:
        if key == "TargetName":
            if name is not None:
                targets.append(DiscoveredTarget(iqn=name, portals=tuple(portals)))
            try:
                name = validate_iscsi_name(value)
            except InvalidName as exc:
                raise TextError(f"SendTargets: bad TargetName={value!r}: {exc}", key=key) from exc
            portals = []
        elif key == "TargetAddress":
            if name is None:
                raise TextError(
                    f"SendTargets: TargetAddress={value!r} before any TargetName", key=key
                )
            try:
                portals.append(Portal.parse(value))
            except InvalidPortal as exc:
                raise TextError(
                    f"SendTargets: bad TargetAddress={value!r}: {exc}", key=key
                ) from exc
    if name is not None:
        targets.append(DiscoveredTarget(iqn=name, portals=tuple(portals)))
    return targets


def format_send_targets(targets: Iterable[DiscoveredTarget]) -> list[tuple[str, str]]:
    """The target-side inverse of :func:`parse_send_targets` (used by our test target)."""
    pairs: list[tuple[str, str]] = []
    for target in targets:
        pairs.append(("TargetName", target.iqn))
        for portal in target.portals:
            tpgt = 1 if portal.tpgt is None else portal.tpgt
            pairs.append(("TargetAddress", f"{portal},{tpgt}"))
    return pairs
