"""iSCSI text data: ``key=value`` pairs, their reassembly across PDUs, and value codecs.

Login and Text PDUs carry their parameters as UTF-8 ``key=value`` pairs, each ended by a NUL
(RFC 7143 section 6.1). This module turns such data segments into ordered lists of pairs and
back, joins data segments that a peer split over several PDUs, and converts the value forms the
RFC defines (decimal, ``0x`` hex and ``0b`` base64 numbers and binary strings, ``Yes``/``No``).

Everything a peer can get wrong here raises :class:`~pyiscsi_failover.errors.TextError` naming
the key (and, for framing faults, the byte offset); no ``UnicodeDecodeError``,
``binascii.Error`` or ``ValueError`` from the standard library escapes. Messages never contain a
value of a binary key, so a CHAP response never ends up in a log line.

Pure: this module must never import trio, socket or subprocess.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from pyiscsi_failover.errors import LocalProtocolError, TextError

__all__ = [
    "IRRELEVANT",
    "KEY_MAX_BYTES",
    "LARGE_BINARY_KEYS",
    "NOT_UNDERSTOOD",
    "REJECT",
    "SPECIAL_VALUES",
    "VALUE_MAX_BYTES",
    "TextReassembler",
    "decode_keys",
    "decode_text",
    "encode_text",
    "format_binary",
    "format_boolean",
    "parse_binary",
    "parse_boolean",
    "parse_number",
]

#: Answer to a key the responder does not know.
NOT_UNDERSTOOD = "NotUnderstood"
#: Answer to a key that does not matter in this negotiation (e.g. burst sizes in discovery).
IRRELEVANT = "Irrelevant"
#: Answer to a proposal the responder will not accept.
REJECT = "Reject"
#: The reserved answers; RFC 7143 forbids using any of them as a proposed value.
SPECIAL_VALUES = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})

#: Longest key name (RFC 7143 section 6.1).
KEY_MAX_BYTES = 63
#: Longest value, unless the key is one of :data:`LARGE_BINARY_KEYS`.
VALUE_MAX_BYTES = 255

#: Keys whose values are large binary strings, mapped to the longest *decoded* length allowed.
#: RFC 7143 section 12.1.3: CHAP_C and CHAP_R are binary values whose binary length (not the
#: length of their encoded form) must not exceed 1024 bytes. Their ``0x`` form is therefore up to
#: 2 + 2048 characters, far beyond the general 255-byte value limit.
LARGE_BINARY_KEYS: Mapping[str, int] = MappingProxyType({"CHAP_C": 1024, "CHAP_R": 1024})

# letters, digits, '.', '-', '+', '@', '_'; "X#" opens an IANA-registered public extension key.
_KEY_RE = re.compile(rb"(?:X#)?[A-Za-z0-9.+@_-]+")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# How much of a malformed key to quote in a message.
_QUOTE_BYTES = 64


def _quote(raw: bytes) -> str:
    """Printable excerpt of peer bytes for a message (never a value: only key positions)."""
    return raw[:_QUOTE_BYTES].decode("utf-8", "backslashreplace")


#: Keys already found valid, so that the few a login uses skip the checks below (they ran on
#: every pair of every PDU). Bounded: once full it starts over, so a peer that sends endless
#: distinct keys can neither grow it nor keep the common keys out of it for long.
_VALID_KEYS: dict[bytes, str] = {}
_VALID_KEYS_MAX = 256


def _check_key(raw: bytes, *, offset: int | None) -> str:
    known = _VALID_KEYS.get(raw)
    if known is not None:
        return known
    key = _checked_key(raw, offset=offset)
    if len(_VALID_KEYS) >= _VALID_KEYS_MAX:
        _VALID_KEYS.clear()
    _VALID_KEYS[raw] = key
    return key


def _checked_key(raw: bytes, *, offset: int | None) -> str:
    where = "" if offset is None else f" at offset {offset}"
    if not raw:
        raise TextError(f"empty key{where}", key="")
    if len(raw) > KEY_MAX_BYTES:
        raise TextError(
            f"key {_quote(raw)!r}{where} is {len(raw)} bytes long, over {KEY_MAX_BYTES}",
            key=_quote(raw),
        )
    if _KEY_RE.fullmatch(raw) is None:
        raise TextError(
            f"key {_quote(raw)!r}{where} has characters outside letters, digits and '.-+@_'",
            key=_quote(raw),
        )
    return raw.decode("ascii")


def _check_value_length(key: str, value: str, size: int, *, where: str) -> None:
    if size <= VALUE_MAX_BYTES:
        return
    limit = LARGE_BINARY_KEYS.get(key)
    if limit is None:
        raise TextError(
            f"value of {key}{where} is {size} bytes long, over {VALUE_MAX_BYTES}", key=key
        )
    # The longest valid encoding of `limit` bytes is hex: "0x" and two digits a byte. Refuse
    # anything longer before decoding it.
    if size > 2 + 2 * limit:
        raise TextError(
            f"value of {key}{where} is {size} bytes long, too long for {limit} binary bytes",
            key=key,
        )
    decoded = parse_binary(key, value)
    if len(decoded) > limit:
        raise TextError(
            f"value of {key}{where} holds {len(decoded)} binary bytes, over {limit}", key=key
        )


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` each, in order, validating every key and value.

    Repeated keys are allowed here (a SendTargets answer repeats them); keeping one negotiation
    round free of repeats is the caller's job.
    """
    out = bytearray()
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TextError(
                "keys and values must be str", key=key if isinstance(key, str) else None
            )
        try:
            raw_key = key.encode("ascii")
        except UnicodeEncodeError:
            raise TextError(f"key {key[:_QUOTE_BYTES]!r} is not ASCII", key=key) from None
        name = _check_key(raw_key, offset=None)
        if "\x00" in value:
            raise TextError(f"value of {name} contains a NUL", key=name)
        try:
            raw_value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise TextError(f"value of {name} is not encodable as UTF-8", key=name) from None
        _check_value_length(name, value, len(raw_value), where="")
        out += raw_key + b"=" + raw_value + b"\x00"
    return bytes(out)


def decode_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Decode a whole (reassembled) data segment into pairs, keeping order and repeated keys.

    Empty entries between NULs are skipped: some targets pad with extra NULs. Bytes after the
    last NUL are an error, since a pair may only be parsed once it is complete.
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # entries must be hashable for the key cache
    if data and data[-1] != 0:
        start = data.rfind(b"\x00") + 1
        tail = data[start:]
        key = _quote(tail.partition(b"=")[0])
        raise TextError(
            f"text data does not end with NUL: {len(tail)} trailing bytes at offset {start}"
            f" (key {key!r})",
            key=key,
        )
    pairs: list[tuple[str, str]] = []
    offset = 0
    for entry in data.split(b"\x00")[:-1]:
        if entry:
            pairs.append(_decode_entry(entry, offset))
        offset += len(entry) + 1
    return pairs


def _decode_entry(entry: bytes, offset: int) -> tuple[str, str]:
    raw_key, sep, raw_value = entry.partition(b"=")
    if not sep:
        raise TextError(
            f"no '=' in text entry {_quote(raw_key)!r} at offset {offset}", key=_quote(raw_key)
        )
    key = _check_key(raw_key, offset=offset)
    value_offset = offset + len(raw_key) + 1
    try:
        value = raw_value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"value of {key} is not valid UTF-8 (byte {value_offset + exc.start})", key=key
        ) from None
    _check_value_length(key, value, len(raw_value), where=f" at offset {value_offset}")
    return key, value


def decode_keys(data: bytes) -> dict[str, str]:
    """Decode one negotiation round, where RFC 7143 forbids sending a key twice."""
    keys: dict[str, str] = {}
    for key, value in decode_text(data):
        if key in keys:
            raise TextError(f"key {key} is repeated in one negotiation round", key=key)
        keys[key] = value
    return keys


class TextReassembler:
    """Joins the data segments of a text sequence split over several PDUs.

    A Login or Text PDU with C=1 (or a Text Response with F=0) says more text follows; a
    ``key=value`` pair may be cut anywhere, so nothing is parsed until the last segment. ``limit``
    bounds the total so a peer cannot make us buffer without end (RFC 7143 requires at least
    8192 bytes, and 64 KiB where authentication items may be long).
    """

    __slots__ = ("_limit", "_parts", "_size")

    def __init__(self, *, limit: int = 65536) -> None:
        if limit < 1:
            raise LocalProtocolError(f"reassembly limit must be positive, not {limit}")
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def in_progress(self) -> bool:
        """Whether segments have been fed without the final one yet."""
        return bool(self._parts)

    def reset(self) -> None:
        """Drop any partial text (e.g. when the exchange is abandoned)."""
        self._parts.clear()
        self._size = 0

    def feed(self, segment: bytes, *, more: bool) -> bytes | None:
        """Add one PDU's data segment; return the whole text once ``more`` is false."""
        size = self._size + len(segment)
        if size > self._limit:
            self.reset()
            raise TextError(f"text data continued past {self._limit} bytes")
        self._parts.append(bytes(segment))
        self._size = size
        if more:
            return None
        whole = b"".join(self._parts)
        self.reset()
        return whole


def _hex_digits(key: str, digits: str) -> str:
    if not digits:
        raise TextError(f"value of {key} has no digits after its 0x prefix", key=key)
    if not set(digits) <= _HEX_DIGITS:
        raise TextError(f"value of {key} has a non-hex digit after its 0x prefix", key=key)
    return digits


def _base64_bytes(key: str, text: str) -> bytes:
    if not text:
        raise TextError(f"value of {key} has nothing after its 0b prefix", key=key)
    if not text.isascii() or _BASE64_RE.fullmatch(text) is None:
        raise TextError(f"value of {key} is not base64 after its 0b prefix", key=key)
    # Accept base64 with its '=' padding left out, as some encoders do.
    if "=" not in text:
        text += "=" * (-len(text) % 4)
    if len(text) % 4:
        raise TextError(f"value of {key} has base64 of a length no encoder makes", key=key)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TextError(f"value of {key} is not valid base64", key=key) from None


def parse_number(key: str, value: str, *, low: int = 0, high: int = 2**64 - 1) -> int:
    """Parse a numerical value (decimal, ``0x`` hex or ``0b`` base64) and check its range."""
    if len(value) > VALUE_MAX_BYTES:
        raise TextError(f"value of {key} is too long for a number", key=key)
    prefix = value[:2]
    if prefix in ("0x", "0X"):
        number = int(_hex_digits(key, value[2:]), 16)
    elif prefix in ("0b", "0B"):
        number = int.from_bytes(_base64_bytes(key, value[2:]), "big")
    elif value.isascii() and value.isdigit():
        # isascii() first: int() would accept other scripts' digits, signs, '_' and spaces.
        number = int(value)
    else:
        raise TextError(f"value of {key} is not a number: {value[:_QUOTE_BYTES]!r}", key=key)
    if not low <= number <= high:
        raise TextError(f"{key}={number} is outside {low}..{high}", key=key)
    return number


def parse_binary(key: str, value: str) -> bytes:
    """Parse a binary value: ``0x``/``0X`` hex (an odd digit count implies a leading 0 nibble, as
    RFC 7143 defines) or ``0b``/``0B`` base64. The value itself never appears in an error."""
    prefix = value[:2]
    if prefix in ("0x", "0X"):
        digits = _hex_digits(key, value[2:])
        return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
    if prefix in ("0b", "0B"):
        return _base64_bytes(key, value[2:])
    raise TextError(f"value of {key} is not a 0x or 0b binary value", key=key)


def format_binary(data: bytes) -> str:
    """Encode bytes as ``0x`` and lowercase hex, the form every target parses."""
    if not data:
        raise TextError("an empty binary value has no 0x form")
    return "0x" + data.hex()


def parse_boolean(key: str, value: str) -> bool:
    """Parse ``Yes``/``No`` (exactly: RFC 7143 values are case-sensitive)."""
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise TextError(f"value of {key} is not Yes or No: {value[:_QUOTE_BYTES]!r}", key=key)


def format_boolean(flag: bool) -> str:
    """Encode a boolean as ``Yes``/``No``."""
    return "Yes" if flag else "No"
