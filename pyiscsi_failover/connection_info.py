"""Cinder/os-brick ``connection_info`` and ``provider_location``: parse, validate, build, redact.

A Cinder backend answers ``initialize_connection`` with ``{"driver_volume_type": "iscsi",
"data": {...}}``. This module turns that (or just ``data``, or its JSON text) into a
:class:`ConnectionInfo`: an ordered tuple of :class:`Candidate` (portal, IQN, LUN) to try, plus
the CHAP credentials. It also reads and writes the ``provider_location`` string some backends keep
in the volume table, and builds ``connection_info`` for the backend ("sample driver") side.

Shapes understood (keys of ``data``), and the order of the candidates:

* ``"single"``: ``target_portal``, ``target_iqn``, ``target_lun``.
* ``"alternatives"`` (Cinder spec "Failover to alternative iSCSI portals on login failure"): the
  above plus ``target_alternative_portals``/``_iqns``/``_luns``; element *i* of each belongs
  together. Order: the main target first, then the alternatives in list order.
* ``"multipath"`` (os-brick): ``target_portals``/``target_iqns``/``target_luns``, in list order.
* Both lists: the main target, then the alternatives, then the multipath entries not already
  listed. ``source`` is then ``"alternatives"``. When ``target_portal`` is given with the multipath
  lists it is always tried first (the spec's "main portal first"); drivers normally repeat it as
  ``target_portals[0]``, and then this is exactly os-brick's order.

Decisions worth knowing:

* Duplicates (same host, port, IQN and LUN; the tpgt is ignored because it is not part of where we
  connect) are dropped, keeping the first. ``Candidate.index`` is the position after that, so
  ``candidates[i].index == i`` and index 0 is the main target.
* Missing per-entry IQNs or LUNs fall back to ``target_iqn``/``target_lun`` repeated, as os-brick
  does for ``target_luns``; a missing ``target_lun`` is 0 (os-brick's default). Explicit lists must
  match the portal list in length. A key whose value is ``null`` counts as absent.
* An empty ``target_portals`` list is refused (os-brick would fail the attach); empty alternative
  lists just mean "no alternatives". ``target_iqns``/``target_luns`` without ``target_portals``
  are refused rather than silently ignored.
* LUNs are ints 0..16383 (:data:`MAX_LUN`) whatever the addressing mode. ``bool`` and ``float``
  are refused; a string of ASCII digits (``"1"``) is accepted because some drivers send one and
  os-brick passes it through.
* ``addressing_mode`` (os-brick's key, in ``data``) says how the LUN becomes the number Linux
  uses: ``SAM`` (default when absent or ``null``) and ``transparent`` keep it, ``SAM2`` adds 16384
  (flat addressing) from LUN 256 on, ``SAM3-flat`` always does
  (:func:`~pyiscsi_failover.protocol.scsi.lun_for_addressing`). It applies to every candidate.
  The values are case-sensitive, as in os-brick; where os-brick treats an unknown value as
  ``SAM``, we refuse it. Every LUN 0..16383 maps to a single-level LUN in every mode. os-brick
  would also pass a larger LUN through under ``SAM``/``transparent`` (a driver encoding the flat
  bit itself, 16640 for LUN 256); we refuse it, saying which LUN and mode to give instead, so one
  volume has one spelling and a typo is not read as a multi-level LUN.
* CHAP: ``auth_method``/``auth_username``/``auth_password`` and ``discovery_auth_*`` as os-brick
  reads them; they apply to every candidate (the spec says so). ``auth_method`` is ``CHAP`` or
  ``None`` (case-insensitive; absent, ``null`` and ``""`` mean none); like os-brick, username and
  password are ignored when the method is none. Neither os-brick nor Cinder defines mutual CHAP
  keys, so we take open-iscsi's names, ``auth_username_in``/``auth_password_in`` (and
  ``discovery_auth_username_in``/``discovery_auth_password_in``), and accept
  ``target_auth_username``/``target_auth_password`` (``discovery_target_auth_*``) as aliases; two
  spellings with different values are an error. Mutual CHAP needs ``auth_method`` CHAP, and its
  secret must differ from ours (RFC 7143: a secret that authenticates initiators must never
  authenticate targets). A secret over 255 bytes (UTF-8) is refused: open-iscsi cannot hold it.
* JSON text must be UTF-8; duplicate keys, ``NaN`` and ``Infinity`` are refused (a duplicated
  ``target_portal`` or ``auth_password`` is ambiguous). ``driver_volume_type`` must be ``iscsi``.
* ``provider_location`` is a volume-table field, not part of ``data``: read it with
  :func:`parse_provider_location`, never implicitly.

Every problem raises :class:`~pyiscsi_failover.errors.ConnectionInfoError` whose ``key`` names the
offending key (``target_alternative_portals[2]``) and whose message shows the value, except that a
secret's value is always shown as ``***``. Errors about JSON text are raised outside the ``except``
block so they do not carry the decoder's exception, whose ``doc`` holds the whole text.

Input files: :func:`read_limited` reads a connection_info or secret file (or stdin) whole but
never more than :data:`MAX_INPUT_BYTES`, so ``-c /dev/zero`` is an error rather than a hang; it is
the one function here that touches a file. JSON text given to :func:`parse_connection_info` has
the same cap.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Final, Literal, NoReturn

from pyiscsi_failover.credentials import MASK, MAX_SECRET_BYTES, ChapCredentials, Secret
from pyiscsi_failover.errors import ConnectionInfoError
from pyiscsi_failover.names import Portal, validate_iscsi_name
from pyiscsi_failover.protocol.addressing import AddressingMode

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_LUN",
    "SOURCES",
    "AddressingMode",
    "Candidate",
    "ConnectionInfo",
    "Source",
    "build_connection_info",
    "format_provider_location",
    "parse_connection_info",
    "parse_provider_location",
    "read_limited",
    "redacted",
]

#: Highest LUN accepted, in every addressing mode: flat-space addressing's 14 bits, so that
#: ``SAM2``/``SAM3-flat`` can always encode it (see the module docstring for ``SAM``).
MAX_LUN: Final = 16383
_FLAT_BIT: Final = 0x4000  # what os-brick's SAM2/SAM3-flat add (16384): the flat method's bits

#: The most :func:`read_limited` reads and :func:`parse_connection_info` parses. Real
#: connection_info and secret files are a few hundred bytes; more than this is not one.
MAX_INPUT_BYTES: Final = 1 << 20

#: Which shape a :class:`ConnectionInfo` came from.
Source = Literal["single", "alternatives", "multipath", "provider_location"]
SOURCES: Final[tuple[Source, ...]] = ("single", "alternatives", "multipath", "provider_location")

_TOP = "connection_info"
_PL = "provider_location"
_LUN_DIGITS = re.compile(r"[0-9]{1,5}")
_TPGT_DIGITS = re.compile(r"[0-9]{1,5}")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Key names of data, as Cinder, os-brick and the failover spec spell them.
_PORTAL, _IQN, _LUN = "target_portal", "target_iqn", "target_lun"
_ALT = ("target_alternative_portals", "target_alternative_iqns", "target_alternative_luns")
_MULTI = ("target_portals", "target_iqns", "target_luns")
_ADDRESSING = "addressing_mode"


@dataclass(frozen=True, slots=True)
class _ChapKeys:
    method: str
    username: str
    password: str
    username_in: tuple[str, str]  # (canonical open-iscsi name, accepted alias)
    password_in: tuple[str, str]


_SESSION_KEYS = _ChapKeys(
    method="auth_method",
    username="auth_username",
    password="auth_password",  # noqa: S106 (a key name, not a password)
    username_in=("auth_username_in", "target_auth_username"),
    password_in=("auth_password_in", "target_auth_password"),
)
_DISCOVERY_KEYS = _ChapKeys(
    method="discovery_auth_method",
    username="discovery_auth_username",
    password="discovery_auth_password",  # noqa: S106 (a key name)
    username_in=("discovery_auth_username_in", "discovery_target_auth_username"),
    password_in=("discovery_auth_password_in", "discovery_target_auth_password"),
)

#: Keys build_connection_info writes or parse_connection_info reads: ``extra`` may not use them.
_RESERVED: Final = frozenset(
    {_PORTAL, _IQN, _LUN, _ADDRESSING, *_ALT, *_MULTI, "driver_volume_type", "data"}
    | {
        key
        for keys in (_SESSION_KEYS, _DISCOVERY_KEYS)
        for key in (keys.method, keys.username, keys.password, *keys.username_in, *keys.password_in)
    }
)

# Substrings that mark a key as holding a secret, for redacted(); provider_auth is Cinder's
# "CHAP <user> <secret>" column.
_SECRET_WORDS: Final = (
    "password",
    "passwd",
    "pswd",
    "secret",
    "passphrase",
    "token",
    "private_key",
)
_SECRET_KEYS: Final = frozenset({"provider_auth"})


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One place to log in: a portal, the target's IQN there and the volume's LUN.

    ``index`` is the position in :attr:`ConnectionInfo.candidates` (0 = the main target). The IQN
    is stored normalised (lower case), so equal targets compare equal.
    """

    index: int
    portal: Portal
    iqn: str
    lun: int

    def __post_init__(self) -> None:
        index: object = self.index
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            _fail("index", f"must be an integer >= 0, got {_shown(index)}")
        if not isinstance(self.portal, Portal):
            _fail("portal", f"must be a Portal, got {_shown(self.portal)}")
        object.__setattr__(self, "iqn", _iqn(self.iqn, "iqn"))
        object.__setattr__(self, "lun", _lun(self.lun, "lun", allow_text=False))

    def _identity(self) -> tuple[str, int, str, int]:
        """What makes two candidates the same login (the tpgt is advisory)."""
        return (self.portal.host, self.portal.port, self.iqn, self.lun)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionInfo:
    """Where and how to log in: candidates in the order to try them, and CHAP for all of them.

    ``chap`` is ours (the target checks it), ``target_chap`` the target's (mutual CHAP, we check
    it); ``discovery_*`` are the same for SendTargets discovery sessions. Their reprs mask the
    secrets, so printing a ConnectionInfo is safe.

    ``addressing_mode`` applies to every candidate's LUN: the LUN field of our PDUs is
    ``protocol.scsi.lun_field(candidate.lun, info.addressing_mode)`` and the by-path name uses
    ``lun_for_addressing`` the same way. A spelling (``"SAM2"``) is accepted and normalised.
    """

    candidates: tuple[Candidate, ...]
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    discovery_chap: ChapCredentials | None = None
    discovery_target_chap: ChapCredentials | None = None
    addressing_mode: AddressingMode = AddressingMode.SAM
    source: Source

    def __post_init__(self) -> None:
        raw: object = self.candidates
        if not isinstance(raw, (tuple, list)):
            _fail("candidates", f"must be a tuple of Candidate, got {_shown(raw)}")
        candidates = tuple(raw)
        if not candidates:
            _fail("candidates", "must not be empty: there is nothing to log in to")
        seen: set[tuple[str, int, str, int]] = set()
        for position, candidate in enumerate(candidates):
            key = f"candidates[{position}]"
            if not isinstance(candidate, Candidate):
                _fail(key, f"must be a Candidate, got {_shown(candidate)}")
            if candidate.index != position:
                _fail(key, f"has index {candidate.index}; indexes must be 0, 1, 2... in order")
            if candidate._identity() in seen:
                _fail(key, f"repeats an earlier candidate ({candidate.portal} {candidate.iqn})")
            seen.add(candidate._identity())
        object.__setattr__(self, "candidates", candidates)
        source: object = self.source
        if source not in SOURCES:
            _fail("source", f"must be one of {', '.join(SOURCES)}, got {_shown(source)}")
        for name in ("chap", "target_chap", "discovery_chap", "discovery_target_chap"):
            value: object = getattr(self, name)
            if value is not None and not isinstance(value, ChapCredentials):
                _fail(name, f"must be ChapCredentials or None, got {type(value).__name__}")
        _check_mutual(self.chap, self.target_chap, "target_chap")
        _check_mutual(self.discovery_chap, self.discovery_target_chap, "discovery_target_chap")
        mode = _addressing_mode(self.addressing_mode, "addressing_mode")
        object.__setattr__(self, "addressing_mode", mode)

    @property
    def main(self) -> Candidate:
        """The main target: the one to try first."""
        return self.candidates[0]

    @property
    def alternatives(self) -> tuple[Candidate, ...]:
        """Everything after the main target, in the order to try it."""
        return self.candidates[1:]


def _check_mutual(ours: ChapCredentials | None, theirs: ChapCredentials | None, key: str) -> None:
    if theirs is None:
        return
    if ours is None:
        _fail(key, "mutual CHAP needs our own CHAP credentials as well")
    if ours.secret == theirs.secret:
        _fail(key, "the target's CHAP secret must differ from ours (RFC 7143)")


# --------------------------------------------------------------------------------------------
# Small validators shared by the parsers and the builder


def _fail(key: str, problem: str) -> NoReturn:
    raise ConnectionInfoError(f"{key}: {problem}", key=key)


def _shown(value: object) -> str:
    """A short, safe description of a non-secret value for an error message.

    Containers are described, not printed: they may be huge, deeply nested, or hold a secret put
    under the wrong key.
    """
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:80]) + "..."
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        bits = value.bit_length()
        return repr(value) if bits <= 64 else f"an integer of {bits} bits"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _text(value: object, key: str, *, secret: bool = False) -> str:
    """A non-empty str without NUL (iSCSI text values are NUL-terminated)."""
    shown = MASK if secret else _shown(value)
    if not isinstance(value, str):
        _fail(key, f"must be a str, got {type(value).__name__} {shown}")
    if not value:
        _fail(key, "is empty")
    if "\x00" in value:
        _fail(key, f"contains a NUL character: {shown}")
    if _SURROGATE.search(value):
        # Not encodable as UTF-8, so it could never go on the wire. Checked by regex, not by
        # encoding: a UnicodeEncodeError would carry the whole string, secret included.
        _fail(key, f"contains a lone surrogate, which is not text: {shown}")
    return value


def _portal(value: object, key: str) -> Portal:
    if isinstance(value, Portal):
        return value
    text = _text(value, key)
    try:
        return Portal.parse(text)
    except ValueError as exc:  # InvalidPortal, or anything else names.py lets through
        raise ConnectionInfoError(f"{key}: {exc}", key=key) from exc


def _iqn(value: object, key: str) -> str:
    text = _text(value, key)
    try:
        return validate_iscsi_name(text)
    except ValueError as exc:  # InvalidName
        raise ConnectionInfoError(f"{key}: {exc}", key=key) from exc


def _lun(value: object, key: str, *, allow_text: bool) -> int:
    if isinstance(value, bool):
        _fail(key, f"must be a LUN 0..{MAX_LUN}, got the bool {value!r}")
    if isinstance(value, int):
        number = value
    elif allow_text and isinstance(value, str) and _LUN_DIGITS.fullmatch(value):
        number = int(value)
    else:
        kind = "an integer or a string of digits" if allow_text else "an integer"
        _fail(key, f"must be {kind} 0..{MAX_LUN}, got {type(value).__name__} {_shown(value)}")
    if not 0 <= number <= MAX_LUN:
        hint = ""
        if _FLAT_BIT <= number <= _FLAT_BIT | MAX_LUN:
            # A driver that encoded the flat bit itself (os-brick passes it through under SAM).
            flat = number - _FLAT_BIT
            modes = "'SAM2' or 'SAM3-flat'" if flat >= 256 else "'SAM3-flat'"
            hint = f"; for flat-addressed LUN {flat} give {flat} with {_ADDRESSING} {modes}"
        _fail(key, f"LUN {_shown(number)} is not in 0..{MAX_LUN}{hint}")
    return number


def _addressing_mode(value: object, key: str) -> AddressingMode:
    """os-brick's spelling (case-sensitive) as an :class:`AddressingMode`; nothing else."""
    if isinstance(value, str):
        try:
            return AddressingMode(value)
        except ValueError:
            pass
    spellings = ", ".join(repr(m.value) for m in AddressingMode)
    hint = ""
    if isinstance(value, str):
        close = [m.value for m in AddressingMode if m.value.lower() == value.strip().lower()]
        if close:
            hint = f" (did you mean {close[0]!r}? the value is case-sensitive, as in os-brick)"
    _fail(key, f"must be one of {spellings}, got {_shown(value)}{hint}")


def _dedupe(entries: Iterable[tuple[Portal, str, int]]) -> tuple[Candidate, ...]:
    """Candidates in order, exact repeats dropped (first kept), indexes renumbered."""
    result: list[Candidate] = []
    seen: set[tuple[str, int, str, int]] = set()
    for portal, iqn, lun in entries:
        identity = (portal.host, portal.port, iqn, lun)
        if identity not in seen:
            seen.add(identity)
            result.append(Candidate(index=len(result), portal=portal, iqn=iqn, lun=lun))
    return tuple(result)


# --------------------------------------------------------------------------------------------
# parse_connection_info


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _BadConstant(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> NoReturn:
    raise _BadConstant(name)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit and not limit % (1 << 20) else f"{limit} bytes"


def _load_json(raw: str | bytes | bytearray | memoryview) -> object:
    """Decode JSON text, or raise ConnectionInfoError that holds nothing of the text."""
    if len(raw) > MAX_INPUT_BYTES:  # characters or bytes: either way far more than a real one
        _fail(_TOP, f"JSON text is larger than {_size(MAX_INPUT_BYTES)}")
    problem: str | None = None
    key = _TOP
    result: object = None
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8-sig")
        result = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        problem = f"JSON text must be UTF-8 (bad byte at offset {exc.start})"
    except json.JSONDecodeError as exc:
        problem = f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    except _DuplicateKey as exc:
        key = exc.key
        problem = "appears more than once in one JSON object"
    except _BadConstant as exc:
        problem = f"{exc.args[0]} is not a JSON number"
    except RecursionError:
        problem = "JSON nested too deeply"
    except ValueError:  # e.g. an integer longer than Python's int/str conversion limit
        problem = "invalid JSON: a number is too long"
    if problem is not None:
        # Raised here, outside the except blocks, so the decoder's exception (whose .doc is
        # the whole text, passwords included) is not kept as __context__.
        raise ConnectionInfoError(f"{key}: {problem}", key=key)
    return result


def parse_connection_info(obj: Mapping[str, object] | str | bytes) -> ConnectionInfo:
    """Validate a Cinder iSCSI ``connection_info`` (whole, or just ``data``; a mapping or JSON).

    See the module docstring for the shapes, the candidate order and what is accepted. Raises
    :class:`ConnectionInfoError` naming the offending key; never leaks a builtin exception.
    """
    document: object = obj
    if isinstance(obj, (str, bytes, bytearray, memoryview)):
        document = _load_json(obj)
    if not isinstance(document, Mapping):
        _fail(_TOP, f"must be a JSON object / mapping, got {type(document).__name__}")
    data: object = document
    if "driver_volume_type" in document or "data" in document:
        volume_type = document.get("driver_volume_type")
        if volume_type is not None and (
            not isinstance(volume_type, str) or volume_type.lower() != "iscsi"
        ):
            _fail("driver_volume_type", f"must be 'iscsi', got {_shown(volume_type)}")
        data = document.get("data")
        if data is None:
            _fail("data", "is missing: connection_info must carry the iSCSI properties in 'data'")
    if not isinstance(data, Mapping):
        _fail("data", f"must be a JSON object / mapping, got {type(data).__name__}")
    return _parse_data(data)


def _optional_list(data: Mapping[str, object], key: str) -> list[object] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        _fail(key, f"must be a list, got {type(value).__name__} {_shown(value)}")
    return list(value)


def _parallel(
    data: Mapping[str, object],
    keys: tuple[str, str, str],
    default_iqn: str | None,
    default_lun: int,
    *,
    allow_empty: bool,
) -> list[tuple[Portal, str, int]] | None:
    """The (portal, iqn, lun) triples of one family of parallel lists, or None if absent."""
    portals_key, iqns_key, luns_key = keys
    raw_portals = _optional_list(data, portals_key)
    raw_iqns = _optional_list(data, iqns_key)
    raw_luns = _optional_list(data, luns_key)
    if raw_portals is None:
        if raw_iqns is not None or raw_luns is not None:
            other = iqns_key if raw_iqns is not None else luns_key
            _fail(portals_key, f"is missing, but {other} is given (the lists go together)")
        return None
    if not raw_portals and not allow_empty:
        _fail(portals_key, "is an empty list; leave the key out instead")
    count = len(raw_portals)
    portals = [_portal(value, f"{portals_key}[{i}]") for i, value in enumerate(raw_portals)]
    if raw_iqns is None:
        if default_iqn is None:
            _fail(iqns_key, f"is missing, and there is no {_IQN} to use for every portal")
        iqns = [default_iqn] * count
    else:
        if len(raw_iqns) != count:
            _fail(iqns_key, f"has {len(raw_iqns)} entries but {portals_key} has {count}")
        iqns = [_iqn(value, f"{iqns_key}[{i}]") for i, value in enumerate(raw_iqns)]
    if raw_luns is None:
        luns = [default_lun] * count
    else:
        if len(raw_luns) != count:
            _fail(luns_key, f"has {len(raw_luns)} entries but {portals_key} has {count}")
        luns = [
            _lun(value, f"{luns_key}[{i}]", allow_text=True) for i, value in enumerate(raw_luns)
        ]
    return list(zip(portals, iqns, luns, strict=True))


def _parse_data(data: Mapping[str, object]) -> ConnectionInfo:
    raw_iqn = data.get(_IQN)
    main_iqn = None if raw_iqn is None else _iqn(raw_iqn, _IQN)
    raw_lun = data.get(_LUN)
    main_lun = 0 if raw_lun is None else _lun(raw_lun, _LUN, allow_text=True)

    main: tuple[Portal, str, int] | None = None
    raw_portal = data.get(_PORTAL)
    if raw_portal is not None:
        portal = _portal(raw_portal, _PORTAL)
        if main_iqn is None:
            _fail(_IQN, f"is missing (required with {_PORTAL})")
        main = (portal, main_iqn, main_lun)

    alternatives = _parallel(data, _ALT, main_iqn, main_lun, allow_empty=True)
    if alternatives is not None and main is None:
        _fail(_PORTAL, f"is missing: {_ALT[0]} are alternatives to a main {_PORTAL}")
    multipath = _parallel(data, _MULTI, main_iqn, main_lun, allow_empty=False)
    if main is None and multipath is None:
        hint = ""
        if data.get(_PL) is not None:
            hint = f" ({_PL} is not read here: use parse_provider_location)"
        _fail(_PORTAL, f"is missing: give {_PORTAL} and {_IQN}, or {_MULTI[0]}{hint}")

    source: Source = "single"
    if alternatives is not None:
        source = "alternatives"
    elif multipath is not None:
        source = "multipath"
    entries = ([main] if main else []) + (alternatives or []) + (multipath or [])

    chap, target_chap = _parse_chap(data, _SESSION_KEYS)
    discovery_chap, discovery_target_chap = _parse_chap(data, _DISCOVERY_KEYS)
    raw_mode = data.get(_ADDRESSING)
    mode = AddressingMode.SAM if raw_mode is None else _addressing_mode(raw_mode, _ADDRESSING)
    return ConnectionInfo(
        candidates=_dedupe(entries),
        chap=chap,
        target_chap=target_chap,
        discovery_chap=discovery_chap,
        discovery_target_chap=discovery_target_chap,
        addressing_mode=mode,
        source=source,
    )


def _chap_enabled(data: Mapping[str, object], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, str):
        _fail(key, f"must be 'CHAP' or 'None', got {type(value).__name__} {_shown(value)}")
    method = value.lower()
    if method in ("", "none"):
        return False
    if method == "chap":
        return True
    _fail(key, f"unknown method {_shown(value)}: only 'CHAP' and 'None' are supported")


def _same(a: object, b: object) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return hmac.compare_digest(
            a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
        )
    return False


def _aliased(
    data: Mapping[str, object], names: tuple[str, str], *, secret: bool
) -> tuple[str, object] | None:
    """(key used, value) for a key with an alias, or None; two different values are an error."""
    found = [(name, data[name]) for name in names if data.get(name) is not None]
    if not found:
        return None
    if len(found) == 2 and not _same(found[0][1], found[1][1]):
        what = "secret" if secret else "value"
        _fail(names[1], f"gives a different {what} than {names[0]}; give only one of them")
    return found[0]


def _parse_chap(
    data: Mapping[str, object], keys: _ChapKeys
) -> tuple[ChapCredentials | None, ChapCredentials | None]:
    user_in = _aliased(data, keys.username_in, secret=False)
    password_in = _aliased(data, keys.password_in, secret=True)
    if not _chap_enabled(data, keys.method):
        # As os-brick: without a method, auth_username/auth_password are not used.
        for found in (user_in, password_in):
            if found is not None:
                _fail(found[0], f"mutual CHAP needs {keys.method} 'CHAP'")
        return None, None
    raw_username = data.get(keys.username)
    if raw_username is None:
        _fail(keys.username, f"is missing (required when {keys.method} is CHAP)")
    ours = ChapCredentials(
        _text(raw_username, keys.username), _secret(data, keys.password, keys.method)
    )
    if user_in is None and password_in is None:
        return ours, None
    if user_in is None:
        _fail(keys.username_in[0], f"is missing, but {keys.password_in[0]} is given")
    if password_in is None:
        _fail(keys.password_in[0], f"is missing, but {keys.username_in[0]} is given")
    theirs = ChapCredentials(
        _text(user_in[1], user_in[0]), _chap_secret(password_in[1], password_in[0])
    )
    if theirs.secret == ours.secret:
        _fail(
            password_in[0],
            f"must differ from {keys.password} (RFC 7143: a secret that authenticates "
            "initiators must never authenticate targets)",
        )
    return ours, theirs


def _secret(data: Mapping[str, object], key: str, method_key: str) -> Secret:
    value = data.get(key)
    if value is None:
        _fail(key, f"is missing (required when {method_key} is CHAP)")
    return _chap_secret(value, key)


def _chap_secret(value: object, key: str) -> Secret:
    text = _text(value, key, secret=True)
    size = len(text.encode("utf-8"))  # cannot fail: _text refused lone surrogates
    if size > MAX_SECRET_BYTES:
        _fail(
            key,
            f"is {size} bytes long; open-iscsi holds CHAP secrets of at most "
            f"{MAX_SECRET_BYTES} bytes",
        )
    return Secret(text)


def read_limited(
    source: str | os.PathLike[str] | IO[bytes] | IO[str],
    *,
    what: str,
    limit: int = MAX_INPUT_BYTES,
) -> bytes:
    """The whole content of a file (by path) or an open stream, if it is 1..``limit`` bytes.

    For connection_info and CHAP secret files, and stdin: reads at most ``limit + 1`` bytes, so
    ``/dev/zero`` or a runaway pipe costs nothing. A path is opened as given (symlinks and pipes,
    such as ``<(...)``, are fine). A text stream is read as text and returned UTF-8 encoded.
    ``what`` names the input in errors (``"connection_info"``, ``"CHAP secret file"``).

    Raises :class:`ConnectionInfoError` naming ``what`` and the file: cannot be read, larger than
    ``limit``, empty (0 bytes; stripping is the caller's business), or a text stream that is not
    UTF-8. The error never carries the content, not even as its ``__context__``.
    """
    if isinstance(source, (str, os.PathLike)):
        name = repr(os.fspath(source))
        problem: str | None = None
        data: bytes | str = b""
        try:
            with open(source, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            problem = f"cannot read {what} {name}: {exc.strerror or type(exc).__name__}"
    else:
        label = getattr(source, "name", None)
        name = label if isinstance(label, str) else "stream"
        problem = None
        try:
            data = source.read(limit + 1)
        except UnicodeDecodeError as exc:
            problem = f"{what} {name} is not UTF-8 text (bad byte at offset {exc.start})"
        except OSError as exc:
            problem = f"cannot read {what} {name}: {exc.strerror or type(exc).__name__}"
    raw = b""
    if problem is None:
        try:
            raw = data.encode("utf-8", errors="surrogateescape") if isinstance(data, str) else data
        except UnicodeEncodeError:  # a lone surrogate from a str stream
            problem = f"{what} {name} is not valid text (it has a lone surrogate)"
    if problem is not None:
        # Raised outside the except blocks: a codec error would carry the content as context.
        raise ConnectionInfoError(problem)
    if len(raw) > limit:
        raise ConnectionInfoError(f"{what} {name} is larger than {_size(limit)}")
    if not raw:
        empty = "an empty file" if isinstance(source, (str, os.PathLike)) else "empty"
        raise ConnectionInfoError(f"{what} {name} is {empty}")
    return raw


# --------------------------------------------------------------------------------------------
# provider_location


def parse_provider_location(
    text: str,
    *,
    default_lun: int | None = None,
    addressing_mode: AddressingMode | str = AddressingMode.SAM,
) -> ConnectionInfo:
    """Parse ``<portal>[;<portal>...][,<tpgt>] <iqn> [<lun>]`` (Cinder's volume-table format).

    Example: ``10.0.1.2:3260;10.0.2.2:3260,1 iqn.2010-10.org.openstack:volume-1 1``. Every portal
    shares the IQN and LUN; the one ``,tpgt`` (after the last portal) is given to every portal.
    Cinder writes its target helper's target id there (tgtadm's is always 0), not necessarily
    the portal group tag, so treat it as advisory. Cinder writes the LUN as ``None`` when it has
    none and then falls back to a driver-specific LUN; a missing or ``None`` LUN here needs
    ``default_lun``, otherwise it is an error. The result carries no CHAP (Cinder keeps that in
    ``provider_auth``); ``source`` is ``"provider_location"``. Nor does the string hold an
    addressing mode (the driver knows its own): give it as ``addressing_mode`` (default SAM).
    """
    if not isinstance(text, str):
        _fail(_PL, f"must be a str, got {type(text).__name__}")
    fields = text.split()
    if len(fields) not in (2, 3):
        _fail(
            _PL,
            f"expected '<portal>[;<portal>...][,<tpgt>] <iqn> [<lun>]', got {_shown(text)}",
        )
    portal_list, comma, tpgt_text = fields[0].rpartition(",")
    if not comma:
        portal_list, tpgt_text = fields[0], ""
    tpgt: int | None = None
    if comma:
        if not _TPGT_DIGITS.fullmatch(tpgt_text) or int(tpgt_text) > 65535:
            _fail(f"{_PL}.tpgt", f"{_shown(tpgt_text)} is not a number 0..65535")
        tpgt = int(tpgt_text)
        if "," in portal_list:
            _fail(_PL, f"only one ',<tpgt>', after the last portal, is allowed: {_shown(text)}")
    portals: list[Portal] = []
    for i, part in enumerate(portal_list.split(";")):
        portal = _portal(part, f"{_PL}.portals[{i}]")
        portals.append(Portal(host=portal.host, port=portal.port, tpgt=tpgt))
    iqn = _iqn(fields[1], f"{_PL}.iqn")
    if len(fields) == 3 and fields[2] != "None":
        lun = _lun(fields[2], f"{_PL}.lun", allow_text=True)
    elif default_lun is None:
        _fail(f"{_PL}.lun", "is missing (pass default_lun= to accept that)")
    else:
        lun = _lun(default_lun, "default_lun", allow_text=False)
    return ConnectionInfo(
        candidates=_dedupe((portal, iqn, lun) for portal in portals),
        addressing_mode=_addressing_mode(addressing_mode, "addressing_mode"),
        source="provider_location",
    )


def format_provider_location(info_or_candidates: ConnectionInfo | Sequence[Candidate]) -> str:
    """The ``provider_location`` string for candidates that share one IQN, LUN and tpgt.

    That is all the format can express; anything else raises :class:`ConnectionInfoError`. CHAP
    and the addressing mode are not part of it. ``parse_provider_location`` reads the result back
    to the same candidates (pass it the ``addressing_mode`` to get the same ConnectionInfo).
    """
    if isinstance(info_or_candidates, ConnectionInfo):
        candidates: tuple[object, ...] = info_or_candidates.candidates
    elif isinstance(info_or_candidates, (list, tuple)):
        candidates = tuple(info_or_candidates)
    else:
        _fail(
            "candidates",
            f"must be a ConnectionInfo or a sequence of Candidate, got "
            f"{type(info_or_candidates).__name__}",
        )
    if not candidates:
        _fail("candidates", "is empty")
    first: Candidate | None = None
    for i, candidate in enumerate(candidates):
        key = f"candidates[{i}]"
        if not isinstance(candidate, Candidate):
            _fail(key, f"must be a Candidate, got {_shown(candidate)}")
        if first is None:
            first = candidate
            continue
        if candidate.iqn != first.iqn:
            _fail(
                f"{key}.iqn", f"{candidate.iqn!r} differs from {first.iqn!r}: {_PL} holds one IQN"
            )
        if candidate.lun != first.lun:
            _fail(f"{key}.lun", f"{candidate.lun} differs from {first.lun}: {_PL} holds one LUN")
        if candidate.portal.tpgt != first.portal.tpgt:
            _fail(
                f"{key}.portal",
                f"tpgt {candidate.portal.tpgt} differs from "
                f"{first.portal.tpgt}: {_PL} holds one tpgt",
            )
    assert first is not None
    portals = ";".join(str(c.portal) for c in candidates if isinstance(c, Candidate))
    tpgt = "" if first.portal.tpgt is None else f",{first.portal.tpgt}"
    return f"{portals}{tpgt} {first.iqn} {first.lun}"


# --------------------------------------------------------------------------------------------
# build_connection_info


def _chap_argument(value: object, key: str) -> ChapCredentials | None:
    if value is None:
        return None
    if not isinstance(value, ChapCredentials):
        _fail(key, f"must be ChapCredentials or None, got {type(value).__name__}")
    _text(value.username, f"{key}.username")
    # Decoded without raising: a UnicodeDecodeError would carry the secret in its context.
    text = value.secret.reveal().decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in value.secret.reveal():
        _fail(f"{key}.secret", "must be UTF-8 text to travel in JSON")
    _text(text, f"{key}.secret", secret=True)
    return value


def build_connection_info(
    portals: Sequence[str | Portal] | str | Portal,
    iqns: Sequence[str] | str,
    luns: Sequence[int] | int,
    *,
    auth: ChapCredentials | None = None,
    target_auth: ChapCredentials | None = None,
    discovery_auth: ChapCredentials | None = None,
    discovery_target_auth: ChapCredentials | None = None,
    multipath: bool = False,
    addressing_mode: AddressingMode | str | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The ``connection_info`` a backend driver returns from ``initialize_connection``.

    The first portal (with the first IQN and LUN) is the main ``target_portal``/``target_iqn``/
    ``target_lun``; the rest become ``target_alternative_*`` in order. A single IQN or LUN is used
    for every portal. ``multipath=True`` also writes ``target_portals``/``target_iqns``/
    ``target_luns`` (all of them, main first) for os-brick's multipath attach.
    ``addressing_mode`` (an :class:`AddressingMode` or its spelling) is written as os-brick's
    ``addressing_mode`` key; ``None`` leaves the key out, which readers take as ``SAM``. ``extra``
    adds other keys (``volume_id``, ``access_mode``...) and may not override ours.

    CHAP passwords are written **in plain text** (``auth_password``, ``auth_password_in`` for
    ``target_auth``, and the ``discovery_`` equivalents): that is what Cinder sends and os-brick
    reads. Log the result only through :func:`redacted`. Names and portals are written in their
    normalised form; repeating a (portal, IQN, LUN) raises :class:`ConnectionInfoError`, as does
    any invalid argument, so :func:`parse_connection_info` always reads the result back.
    """
    if isinstance(portals, (str, Portal)):
        portals = [portals]
    if not isinstance(portals, Sequence):
        _fail("portals", f"must be a sequence of portals, got {type(portals).__name__}")
    parsed = [_portal(value, f"portals[{i}]") for i, value in enumerate(portals)]
    count = len(parsed)
    if count == 0:
        _fail("portals", "is empty: there must be at least the main portal")

    if isinstance(iqns, str):
        iqn_list = [_iqn(iqns, "iqns")] * count
    elif isinstance(iqns, Sequence):
        if len(iqns) != count:
            _fail("iqns", f"has {len(iqns)} entries but portals has {count}")
        iqn_list = [_iqn(value, f"iqns[{i}]") for i, value in enumerate(iqns)]
    else:
        _fail("iqns", f"must be a str or a sequence of str, got {type(iqns).__name__}")

    if isinstance(luns, int):
        lun_list = [_lun(luns, "luns", allow_text=False)] * count
    elif isinstance(luns, Sequence):
        if len(luns) != count:
            _fail("luns", f"has {len(luns)} entries but portals has {count}")
        lun_list = [_lun(value, f"luns[{i}]", allow_text=False) for i, value in enumerate(luns)]
    else:
        _fail("luns", f"must be an int or a sequence of int, got {type(luns).__name__}")

    seen: set[tuple[str, int, str, int]] = set()
    for i, (portal, iqn, lun) in enumerate(zip(parsed, iqn_list, lun_list, strict=True)):
        identity = (portal.host, portal.port, iqn, lun)
        if identity in seen:
            _fail(f"portals[{i}]", f"repeats an earlier ({portal}, {iqn}, {lun})")
        seen.add(identity)

    ours = _chap_argument(auth, "auth")
    theirs = _chap_argument(target_auth, "target_auth")
    discovery_ours = _chap_argument(discovery_auth, "discovery_auth")
    discovery_theirs = _chap_argument(discovery_target_auth, "discovery_target_auth")
    _check_mutual(ours, theirs, "target_auth")
    _check_mutual(discovery_ours, discovery_theirs, "discovery_target_auth")
    mode = None if addressing_mode is None else _addressing_mode(addressing_mode, _ADDRESSING)

    texts = [portal.with_tpgt() for portal in parsed]
    data: dict[str, object] = {_PORTAL: texts[0], _IQN: iqn_list[0], _LUN: lun_list[0]}
    if count > 1:
        data[_ALT[0]] = texts[1:]
        data[_ALT[1]] = iqn_list[1:]
        data[_ALT[2]] = lun_list[1:]
    if multipath:
        data[_MULTI[0]] = list(texts)
        data[_MULTI[1]] = list(iqn_list)
        data[_MULTI[2]] = list(lun_list)
    if mode is not None:
        data[_ADDRESSING] = mode.value
    for keys, mine, target in (
        (_SESSION_KEYS, ours, theirs),
        (_DISCOVERY_KEYS, discovery_ours, discovery_theirs),
    ):
        if mine is not None:
            data[keys.method] = "CHAP"
            data[keys.username] = mine.username
            data[keys.password] = mine.secret.reveal_str()
        if target is not None:
            data[keys.username_in[0]] = target.username
            data[keys.password_in[0]] = target.secret.reveal_str()

    if extra is not None:
        if not isinstance(extra, Mapping):
            _fail("extra", f"must be a mapping, got {type(extra).__name__}")
        for key, value in extra.items():
            if not isinstance(key, str):
                _fail("extra", f"keys must be str, got {type(key).__name__} {_shown(key)}")
            if key in _RESERVED:
                _fail(key, "is set by build_connection_info and may not come from extra")
            data[key] = copy.deepcopy(value)
    return {"driver_volume_type": "iscsi", "data": data}


# --------------------------------------------------------------------------------------------
# redacted


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return lowered in _SECRET_KEYS or any(word in lowered for word in _SECRET_WORDS)


def redacted(obj: object) -> object:
    """A deep copy of ``obj`` (a connection_info, its ``data``, or any JSON-like value) that is
    safe to log: the value of every key that names a password, secret, passphrase, token or
    private key (case-insensitive substring; also ``provider_auth``) becomes ``"***"``, and so
    does every :class:`Secret`. ``None`` values stay ``None`` (they hide nothing). Dicts come
    back as dicts, lists as lists, tuples as tuples.
    """
    return _redact(obj, set())


def _redact(obj: object, active: set[int]) -> object:
    if isinstance(obj, Secret):
        return MASK
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, ChapCredentials, Portal)):
        return obj  # immutable, and ChapCredentials/Portal reprs hold no secret
    if isinstance(obj, (Mapping, list, tuple)):
        if id(obj) in active:
            return "<cycle>"
        active.add(id(obj))
        try:
            if isinstance(obj, Mapping):
                return {
                    key: MASK
                    if _is_secret_key(key) and value is not None
                    else _redact(value, active)
                    for key, value in obj.items()
                }
            items = [_redact(item, active) for item in obj]
            return items if isinstance(obj, list) else tuple(items)
        finally:
            active.discard(id(obj))
    return copy.deepcopy(obj)
