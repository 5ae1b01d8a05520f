"""The candidates of os-brick's ``connection_properties``, and the properties os-brick gets back.

:func:`targets_of` lists every (portal, IQN, LUN) of a ``connection_properties`` dict in the
order :func:`~pyiscsi_failover.connection_info.parse_connection_info` gives its candidates (the
main target, the spec's ``target_alternative_*``, then os-brick's ``target_portals`` entries not
already listed), which is the order of the probe's rows. Each :class:`Target` keeps the dict's
own spelling: os-brick names node records and ``/dev/disk/by-path`` links after the strings it
is given, so a volume attached through us must be found by stock code and the other way round.

:func:`connect_properties` and :func:`cleanup_properties` build the dicts handed to os-brick's
own methods: for connect, the working candidates only; for disconnect, extend and
``get_volume_paths``, every candidate, in the ``target_portals``/``target_iqns``/``target_luns``
form os-brick reads. Other keys (CHAP, ``addressing_mode``, ``encrypted``...) pass unchanged;
the LUNs stay as given, since os-brick applies ``addressing_mode`` itself.

Pure: never imports trio, construct, os-brick, socket or subprocess.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pyiscsi_failover.connection_info import parse_connection_info
from pyiscsi_failover.errors import ConnectionInfoError, InvalidPortal
from pyiscsi_failover.names import Portal

__all__ = [
    "PLURAL_KEYS",
    "SKIP_KEY",
    "Target",
    "cleanup_properties",
    "connect_properties",
    "explicit_paths",
    "path_key",
    "targets_of",
]

#: os-brick's multipath form: parallel lists, element i of each belonging together.
PLURAL_KEYS: Final = ("target_portals", "target_iqns", "target_luns")
_ALTERNATIVE_KEYS: Final = (
    "target_alternative_portals",
    "target_alternative_iqns",
    "target_alternative_luns",
)
#: Where connect_properties lists the (portal, IQN) pairs the probe found dead, for the
#: connector's filter of SendTargets results (``"host:port iqn"`` strings; no secret).
SKIP_KEY: Final = "pyiscsi_failover_skip"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One candidate as the properties spell it (``lun`` may be a string of digits)."""

    portal: str
    iqn: str
    lun: int | str

    def as_tuple(self) -> tuple[str, str, int | str]:
        return (self.portal, self.iqn, self.lun)


def path_key(portal: str, iqn: str) -> str | None:
    """``"host:port iqn"`` normalised (case, brackets, default port), or None if unreadable."""
    try:
        parsed = Portal.parse(portal)
    except (InvalidPortal, TypeError):
        return None
    return f"{parsed} {iqn.lower()}"


def explicit_paths(props: Mapping[str, object]) -> bool:
    """Whether os-brick takes the paths from the properties rather than SendTargets discovery
    (its own test: both ``target_portals`` and ``target_iqns`` present)."""
    return props.get("target_portals") is not None and props.get("target_iqns") is not None


def _family(
    props: Mapping[str, object], keys: tuple[str, str, str], iqn: object, lun: object
) -> list[tuple[object, object, object]]:
    portals, iqns, luns = (props.get(key) for key in keys)
    if not isinstance(portals, (list, tuple)):
        return []
    count = len(portals)
    iqn_list = list(iqns) if isinstance(iqns, (list, tuple)) else [iqn] * count
    lun_list = list(luns) if isinstance(luns, (list, tuple)) else [lun] * count
    return list(zip(portals, iqn_list, lun_list, strict=False))


def _identity(portal: object, iqn: object, lun: object) -> tuple[str, int, str, int]:
    main = parse_connection_info(
        {"target_portal": portal, "target_iqn": iqn, "target_lun": lun}
    ).main
    return (main.portal.host, main.portal.port, main.iqn, main.lun)


def targets_of(props: Mapping[str, object]) -> tuple[Target, ...]:
    """Every candidate, deduplicated, in the probe's order, spelled as in ``props``.

    Raises :class:`~pyiscsi_failover.errors.ConnectionInfoError` when our parser refuses the
    properties (the connector then leaves them to stock os-brick).
    """
    info = parse_connection_info(props)
    main_iqn = props.get("target_iqn")
    main_lun = props.get("target_lun")
    if main_lun is None:
        main_lun = 0
    raw: list[tuple[object, object, object]] = []
    if props.get("target_portal") is not None:
        raw.append((props["target_portal"], main_iqn, main_lun))
    raw += _family(props, _ALTERNATIVE_KEYS, main_iqn, main_lun)
    raw += _family(props, PLURAL_KEYS, main_iqn, main_lun)
    targets: list[Target] = []
    seen: set[tuple[str, int, str, int]] = set()
    for portal, iqn, lun in raw:
        identity = _identity(portal, iqn, lun)
        if identity in seen:
            continue
        seen.add(identity)
        # The parse above checked the types.
        assert isinstance(portal, str)
        assert isinstance(iqn, str)
        assert isinstance(lun, (int, str))
        targets.append(Target(portal=portal, iqn=iqn, lun=lun))
    wanted = [(c.portal.host, c.portal.port, c.iqn, c.lun) for c in info.candidates]
    if [_identity(*t.as_tuple()) for t in targets] != wanted:  # pragma: no cover (a parser change)
        raise ConnectionInfoError(
            "connection_properties: the candidates read here differ from the parser's",
            key="connection_properties",
        )
    return tuple(targets)


def _with_paths(
    props: Mapping[str, object], first: Target, paths: Sequence[Target] | None
) -> dict[str, object]:
    """A copy of ``props`` whose main target is ``first`` and whose plural lists are ``paths``
    (left out when None)."""
    result = copy.copy(dict(props))
    result.update(target_portal=first.portal, target_iqn=first.iqn, target_lun=first.lun)
    for key in PLURAL_KEYS:
        result.pop(key, None)
    if paths is not None:
        result["target_portals"] = [t.portal for t in paths]
        result["target_iqns"] = [t.iqn for t in paths]
        result["target_luns"] = [t.lun for t in paths]
    return result


def connect_properties(
    props: Mapping[str, object],
    targets: Sequence[Target],
    order: Sequence[int],
    *,
    multipath: bool,
    dead: Iterable[int] = (),
) -> dict[str, object]:
    """The properties for os-brick's ``connect_volume``: the candidates ``order`` names.

    Single path: ``order`` is the chosen candidate first and the others not known dead; with
    one, it becomes the main target and the plural lists go, else the lists hold them all
    (os-brick tries them in turn). Multipath: ``order`` is the healthy candidates. When os-brick
    would discover the paths itself (no explicit lists), the first healthy candidate becomes
    the portal it discovers through, and the dead ones are listed under :data:`SKIP_KEY` for
    the connector's filter of what discovery returns.
    """
    if not order:
        raise ValueError("no candidate to connect to")
    chosen = [targets[i] for i in order]
    if multipath and not explicit_paths(props):
        result = _with_paths(props, chosen[0], None)
        skip = [path_key(targets[i].portal, targets[i].iqn) for i in dead]
        result[SKIP_KEY] = [key for key in skip if key is not None]
        return result
    if not multipath and len(chosen) == 1:
        return _with_paths(props, chosen[0], None)
    return _with_paths(props, chosen[0], chosen)


def cleanup_properties(
    props: Mapping[str, object],
    targets: Sequence[Target],
    discovered: Iterable[tuple[str, str, int | str]] = (),
) -> dict[str, object]:
    """The properties for disconnect, extend and ``get_volume_paths``: every candidate, then
    every ``discovered`` path not already listed, in the plural form."""
    paths = list(targets)
    known = {path_key(t.portal, t.iqn) for t in paths}
    for portal, iqn, lun in discovered:
        key = path_key(portal, iqn)
        if key not in known:
            known.add(key)
            paths.append(Target(portal=portal, iqn=iqn, lun=lun))
    return _with_paths(props, targets[0], paths)
