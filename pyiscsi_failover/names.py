"""iSCSI names and portals: validation, normalisation and the ``host[:port][,tpgt]`` syntax.

Used wherever a name or an address enters the package (connection_info, CLI arguments,
``TargetAddress`` and ``SendTargets`` answers), so that everything downstream compares and prints
one canonical form.

Decisions worth knowing:

* Names are ASCII only. RFC 3722 allows more after stringprep, which we do not implement; every
  deployed name we know of is ASCII, and a half-done stringprep would compare names wrongly.
  Valid names are returned lower-cased (stringprep case-folds; so do LIO and open-iscsi).
* An unbracketed host with more than one colon is taken as a bare IPv6 address and never carries a
  port: ``fd00::1:3260`` is the address ``fd00::1:3260`` on the default port, exactly as
  open-iscsi reads it. Write ``[fd00::1]:3260`` to give a port. Anything that is not a valid IPv6
  address is refused rather than guessed at.
* Hosts are normalised (IPv6 compressed, names lower-cased) so equal portals compare equal.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyiscsi_failover.errors import InvalidName, InvalidPortal

__all__ = ["DEFAULT_PORT", "MAX_NAME_LENGTH", "Portal", "validate_iscsi_name"]

#: The IANA-assigned iSCSI port.
DEFAULT_PORT = 3260
#: RFC 7143: an iSCSI name is at most 223 bytes (UTF-8).
MAX_NAME_LENGTH = 223

_IQN = re.compile(
    r"iqn\.(?P<year>[0-9]{4})-(?P<month>[0-9]{2})"
    r"\.(?P<authority>[^:]*)"
    r"(?::(?P<unique>.*))?",
    re.DOTALL,
)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_NAME_CHARS = re.compile(r"[a-z0-9.:-]*")
_EUI = re.compile(r"eui\.[0-9a-f]{16}")
_NAA = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})")

_DIGITS = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _shown(value: str, limit: int = 80) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _bad_name(name: str, problem: str) -> InvalidName:
    return InvalidName(f"invalid iSCSI name {_shown(name)}: {problem}", name=name)


def validate_iscsi_name(name: str) -> str:
    """Check an ``iqn.``/``eui.``/``naa.`` name and return its normalised (lower-case) form."""
    if not isinstance(name, str):
        raise InvalidName(f"an iSCSI name is a str, not {type(name).__name__}", name=repr(name))
    if not name:
        raise _bad_name(name, "it is empty")
    if not name.isascii():
        raise _bad_name(name, "only ASCII names are supported")
    if len(name) > MAX_NAME_LENGTH:
        raise _bad_name(name, f"it is {len(name)} bytes, more than {MAX_NAME_LENGTH}")
    lowered = name.lower()
    if not _NAME_CHARS.fullmatch(lowered):
        bad = next(c for c in lowered if not _NAME_CHARS.fullmatch(c))
        raise _bad_name(name, f"character {bad!r} is not allowed (only letters, digits, '-.:')")
    if lowered.startswith("iqn."):
        _check_iqn(name, lowered)
    elif lowered.startswith("eui."):
        if not _EUI.fullmatch(lowered):
            raise _bad_name(name, "an eui. name is 'eui.' followed by exactly 16 hex digits")
    elif lowered.startswith("naa."):
        if not _NAA.fullmatch(lowered):
            raise _bad_name(name, "a naa. name is 'naa.' followed by 16 or 32 hex digits")
    else:
        raise _bad_name(name, "it must start with 'iqn.', 'eui.' or 'naa.'")
    return lowered


def _check_iqn(name: str, lowered: str) -> None:
    match = _IQN.fullmatch(lowered)
    if match is None:
        raise _bad_name(name, "an iqn. name is 'iqn.YYYY-MM.reversed.domain[:anything]'")
    if not 1 <= int(match["month"]) <= 12:
        raise _bad_name(name, f"month {match['month']} in the date is not 01..12")
    authority = match["authority"]
    if not authority or not all(_LABEL.fullmatch(label) for label in authority.split(".")):
        raise _bad_name(
            name, f"naming authority {authority!r} is not a reversed domain name (e.g. com.example)"
        )
    if match["unique"] is not None and not match["unique"]:
        raise _bad_name(name, "nothing follows the ':'")


def _bad_portal(text: str, problem: str) -> InvalidPortal:
    return InvalidPortal(f"invalid portal {_shown(text)}: {problem}", text=text)


def _parse_int(text: str, value: str, what: str, low: int, high: int) -> int:
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise _bad_portal(text, f"{what} {value!r} is not a number {low}..{high}")
    return int(value)


def _normalise_host(host: str, text: str, *, ipv6_only: bool = False) -> str:
    """The canonical form of a host, or InvalidPortal naming ``text``."""
    if not host:
        raise _bad_portal(text, "the host is empty")
    if not host.isascii() or any(c.isspace() or c in "[],/" for c in host):
        raise _bad_portal(text, f"host {host!r} contains characters a host cannot have")
    if ":" in host or ipv6_only:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _bad_portal(text, f"{host!r} is not a valid IPv6 address") from None
    lowered = host.lower()
    labels = lowered.split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(lowered))
        except ValueError:
            raise _bad_portal(text, f"{host!r} is not a valid IPv4 address") from None
    if len(lowered) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _bad_portal(text, f"{host!r} is not a valid host name")
    return lowered


@dataclass(frozen=True, slots=True, kw_only=True)
class Portal:
    """A target portal: where to connect, and optionally the target portal group tag.

    ``host`` is a host name, an IPv4 address or an IPv6 address without brackets; it is stored
    normalised. ``str()`` gives ``host:port`` (IPv6 in brackets); :meth:`with_tpgt` adds the tag.
    """

    host: str
    port: int = DEFAULT_PORT
    tpgt: int | None = None

    def __post_init__(self) -> None:
        shown = f"host={self.host!r}, port={self.port!r}, tpgt={self.tpgt!r}"
        if not isinstance(self.host, str):
            raise _bad_portal(shown, "the host must be a str")
        object.__setattr__(self, "host", _normalise_host(self.host, shown))
        port: object = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _bad_portal(shown, "the port must be an integer 1..65535")
        tpgt: object = self.tpgt
        if tpgt is not None and (
            isinstance(tpgt, bool) or not isinstance(tpgt, int) or not 0 <= tpgt <= 65535
        ):
            raise _bad_portal(shown, "the tpgt must be None or an integer 0..65535")

    @classmethod
    def parse(cls, text: str, *, default_port: int = DEFAULT_PORT) -> Portal:
        """Parse ``host``, ``host:port``, ``host,tpgt``, ``host:port,tpgt``; IPv6 as ``[addr]``.

        ``default_port`` is used when the text gives none. See the module docstring for how an
        unbracketed IPv6 address is read.
        """
        if not isinstance(text, str):
            raise InvalidPortal(f"a portal is a str, not {type(text).__name__}", text=repr(text))
        if (
            isinstance(default_port, bool)
            or not isinstance(default_port, int)
            or not 1 <= default_port <= 65535
        ):
            raise _bad_portal(text, f"default_port {default_port!r} is not 1..65535")
        rest, comma, tpgt_text = text.partition(",")
        tpgt = _parse_int(text, tpgt_text, "tpgt", 0, 65535) if comma else None
        port_text: str | None = None
        if rest.startswith("["):
            host, bracket, after = rest[1:].partition("]")
            if not bracket:
                raise _bad_portal(text, "'[' without a closing ']'")
            if after:
                if not after.startswith(":"):
                    raise _bad_portal(text, f"unexpected {after!r} after ']'")
                port_text = after[1:]
            host = _normalise_host(host, text, ipv6_only=True)
        elif rest.count(":") > 1:
            host = _normalise_host(rest, text)  # bare IPv6: never carries a port
        else:
            host, colon, after = rest.partition(":")
            if colon:
                port_text = after
            host = _normalise_host(host, text)
        port = default_port if port_text is None else _parse_int(text, port_text, "port", 1, 65535)
        return cls(host=host, port=port, tpgt=tpgt)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for connecting: the host without brackets."""
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"{host}:{self.port}"

    def with_tpgt(self) -> str:
        """``host:port,tpgt`` (iscsiadm's ``-p`` form); just ``host:port`` when no tpgt is known."""
        return str(self) if self.tpgt is None else f"{self},{self.tpgt}"
