"""Faults the test target can inject, described as plain data.

A fault is a small frozen dataclass; its class says *what* goes wrong and its fields say *how
much*. Who carries it out depends on the layer the fault lives in (see :data:`FaultLayer`):

* ``SOCKET`` faults (refuse, blackhole) are applied by the server when it binds a portal;
* ``TIMING`` faults (silent, delay, slow drip) and the RST of ``reset-mid-login`` are applied
  by the server to the bytes the state machine produces;
* ``PROTOCOL`` faults are applied by the sans-IO :class:`~pyiscsi_failover.testing.target.
  TargetConnection` to the PDUs it builds; the digest faults (``digests-required``,
  ``reject-digests``) also change what it answers to HeaderDigest/DataDigest and which digests
  it sends and expects after login.

Every fault can be set on a portal; protocol faults can also be set on one target (they then
apply to Normal sessions with that target only). One portal or target may carry several
faults of different kinds: ``delay`` with ``redirect`` makes a slow hop of a redirect chain,
and two portals redirecting to each other make a loop. :func:`parse_fault` reads the command-line
spelling (``delay:0.5``, ``redirect:127.0.0.2:3260``...) and ``str(fault)`` gives it back.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from pyiscsi_failover.errors import LocalProtocolError

__all__ = [
    "Blackhole",
    "DelayPDUs",
    "DigestsRequired",
    "DowngradeToNone",
    "Fault",
    "FaultKind",
    "FaultLayer",
    "GarbageKeyValues",
    "MalformedPDU",
    "NonUTF8Text",
    "OversizedPDU",
    "Redirect",
    "RedirectLoop",
    "ReflectChallenge",
    "Refuse",
    "RejectDigests",
    "ResetMidLogin",
    "ServiceUnavailable",
    "Silent",
    "SlowDrip",
    "SplitStyle",
    "SplitText",
    "WrongChapResponse",
    "WrongITT",
    "WrongOpcode",
    "find_fault",
    "format_fault",
    "parse_fault",
]


class FaultLayer(enum.IntEnum):
    """Which layer carries a fault out (and so where it may be configured)."""

    SOCKET = 1
    TIMING = 2
    PROTOCOL = 3


class FaultKind(enum.Enum):
    """Every fault the test target knows; the value is its command-line name."""

    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    SILENT = "silent"
    RESET_MID_LOGIN = "reset-mid-login"
    DELAY = "delay"
    SLOW_DRIP = "slow-drip"
    MALFORMED_PDU = "malformed-pdu"
    OVERSIZED_PDU = "oversized-pdu"
    WRONG_OPCODE = "wrong-opcode"
    WRONG_ITT = "wrong-itt"
    REDIRECT = "redirect"
    REDIRECT_LOOP = "redirect-loop"
    WRONG_CHAP_RESPONSE = "wrong-chap-response"
    REFLECT_CHALLENGE = "reflect-challenge"
    DOWNGRADE_TO_NONE = "downgrade-to-none"
    GARBAGE_KEY_VALUES = "garbage-key-values"
    NON_UTF8_TEXT = "non-utf8-text"
    SPLIT_TEXT = "split-text"
    SERVICE_UNAVAILABLE = "service-unavailable"
    DIGESTS_REQUIRED = "digests-required"
    REJECT_DIGESTS = "reject-digests"

    @property
    def layer(self) -> FaultLayer:
        if self in (FaultKind.REFUSE, FaultKind.BLACKHOLE):
            return FaultLayer.SOCKET
        if self in (
            FaultKind.SILENT,
            FaultKind.DELAY,
            FaultKind.SLOW_DRIP,
            FaultKind.RESET_MID_LOGIN,
        ):
            return FaultLayer.TIMING
        return FaultLayer.PROTOCOL

    @property
    def per_target(self) -> bool:
        """Whether the fault may be set on one target (only protocol faults can)."""
        return self.layer is FaultLayer.PROTOCOL


class SplitStyle(enum.Enum):
    """How a text answer is cut into several PDUs (all with F=0 and a TTT but the last)."""

    #: RFC 7143: C=1 on every PDU but the last; chunks may end in the middle of a pair.
    CONTINUE = "continue"
    #: What tgt does: F=0 with a TTT but C=0, chunks cut at any byte.
    TGT = "tgt"


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalProtocolError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise LocalProtocolError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    """Nothing listens on the portal: the port is bound but not listening, so connect gets RST."""

    kind: ClassVar[FaultKind] = FaultKind.REFUSE


@dataclass(frozen=True, slots=True, kw_only=True)
class Blackhole:
    """SYNs are dropped: a listen(0) socket whose accept queue we fill and never drain."""

    kind: ClassVar[FaultKind] = FaultKind.BLACKHOLE


@dataclass(frozen=True, slots=True, kw_only=True)
class Silent:
    """Connections are accepted and read, but nothing is ever sent back."""

    kind: ClassVar[FaultKind] = FaultKind.SILENT


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetMidLogin:
    """The first Login Request is read, then the connection is reset (SO_LINGER 0, close)."""

    kind: ClassVar[FaultKind] = FaultKind.RESET_MID_LOGIN


@dataclass(frozen=True, slots=True, kw_only=True)
class DelayPDUs:
    """Every PDU the target sends is held back for ``seconds``."""

    kind: ClassVar[FaultKind] = FaultKind.DELAY
    seconds: float

    def __post_init__(self) -> None:
        _check_seconds("delay", self.seconds)


@dataclass(frozen=True, slots=True, kw_only=True)
class SlowDrip:
    """Responses go out one byte at a time, ``interval`` seconds apart."""

    kind: ClassVar[FaultKind] = FaultKind.SLOW_DRIP
    interval: float = 0.01

    def __post_init__(self) -> None:
        _check_seconds("slow-drip interval", self.interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class MalformedPDU:
    """The first Login Response is replaced by 48 bytes that are no valid PDU (unknown opcode)."""

    kind: ClassVar[FaultKind] = FaultKind.MALFORMED_PDU


@dataclass(frozen=True, slots=True, kw_only=True)
class OversizedPDU:
    """The first Login Response claims a DataSegmentLength of ``length`` (and sends no data)."""

    kind: ClassVar[FaultKind] = FaultKind.OVERSIZED_PDU
    length: int = 0xFFFFFF

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not 0 < self.length <= 0xFFFFFF:
            raise LocalProtocolError(f"oversized length must be 1..16777215, got {self.length!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongOpcode:
    """A well-formed Text Response is sent where the first Login Response belongs."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_OPCODE


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongITT:
    """The first Login Response carries an Initiator Task Tag the initiator never used."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_ITT


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    """Every login is redirected (status 0x0101, or 0x0102 when ``permanent``) to ``to``.

    ``to`` is the name of a portal in the same :class:`TargetConfig` (resolved to its bound
    address, so ephemeral ports work) or a ``host:port[,tpgt]`` address.
    """

    kind: ClassVar[FaultKind] = FaultKind.REDIRECT
    to: str
    permanent: bool = False

    def __post_init__(self) -> None:
        if not self.to:
            raise LocalProtocolError("redirect needs an address or a portal name")


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectLoop:
    """Every login is redirected to the very portal it arrived on."""

    kind: ClassVar[FaultKind] = FaultKind.REDIRECT_LOOP
    permanent: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class WrongChapResponse:
    """In mutual CHAP, the target's CHAP_R is wrong (one bit flipped)."""

    kind: ClassVar[FaultKind] = FaultKind.WRONG_CHAP_RESPONSE


@dataclass(frozen=True, slots=True, kw_only=True)
class ReflectChallenge:
    """CHAP reflection, as an attacker (or a target sharing one secret both ways) would do it.

    By default the target's CHAP_C is a challenge an initiator sent it before: ``challenge``, or
    (unset) the latest mutual-CHAP challenge any initiator sent the server on an earlier
    connection; until there is one, a fresh challenge goes out. With ``initiator_secret`` the
    target instead answers a mutual challenge with a CHAP_R computed from the *initiator's*
    secret, which is what reflecting the initiator's own challenge back at it yields.
    """

    kind: ClassVar[FaultKind] = FaultKind.REFLECT_CHALLENGE
    challenge: bytes | None = None
    initiator_secret: bool = False

    def __post_init__(self) -> None:
        if self.challenge is not None and not 1 <= len(self.challenge) <= 1024:
            raise LocalProtocolError("a reflected challenge must be 1..1024 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class DowngradeToNone:
    """The target answers ``AuthMethod=None`` even though CHAP is configured, and lets it pass."""

    kind: ClassVar[FaultKind] = FaultKind.DOWNGRADE_TO_NONE


@dataclass(frozen=True, slots=True, kw_only=True)
class GarbageKeyValues:
    """Wherever the target sends one of ``keys``, the value is ``value`` instead."""

    kind: ClassVar[FaultKind] = FaultKind.GARBAGE_KEY_VALUES
    keys: tuple[str, ...] = ("MaxRecvDataSegmentLength",)
    value: str = "banana"

    def __post_init__(self) -> None:
        if not self.keys:
            raise LocalProtocolError("garbage-key-values needs at least one key")
        if "\x00" in self.value or len(self.value.encode("utf-8", "replace")) > 255:
            raise LocalProtocolError("a garbage value must be at most 255 bytes without NUL")


@dataclass(frozen=True, slots=True, kw_only=True)
class NonUTF8Text:
    """The first Login Response and every Text Response carry bytes that are not UTF-8."""

    kind: ClassVar[FaultKind] = FaultKind.NON_UTF8_TEXT


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitText:
    """Text Responses (and Login Responses if ``login``) are cut into ``chunk``-byte segments.

    Login Responses are always cut with C=1, the only way RFC 7143 allows; some initiators
    (libiscsi 1.19) cannot reassemble them, hence the separate switch.
    """

    kind: ClassVar[FaultKind] = FaultKind.SPLIT_TEXT
    chunk: int = 32
    style: SplitStyle = SplitStyle.CONTINUE
    login: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not 1 <= self.chunk <= 0xFFFFFF:
            raise LocalProtocolError(f"split-text chunk must be 1..16777215, got {self.chunk!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceUnavailable:
    """Every login fails with status 0x0301 (service unavailable: retry later or elsewhere)."""

    kind: ClassVar[FaultKind] = FaultKind.SERVICE_UNAVAILABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestsRequired:
    """The target insists on CRC32C digests (``header`` and/or ``data``), as some arrays do.

    It answers ``CRC32C`` to a HeaderDigest/DataDigest offer that contains it, and ``Reject``
    to one that does not (``None`` alone), and then uses the digest on the connection anyway
    from the first PDU after the final Login Response (RFC 7143 starts digests there), also
    when the initiator never sent the key: what it sends is CRC32C-protected, and what it
    receives without the digest is not understood (a 48-byte Logout without its 4 digest
    bytes is waited on, never answered).
    """

    kind: ClassVar[FaultKind] = FaultKind.DIGESTS_REQUIRED
    header: bool = True
    data: bool = True

    def __post_init__(self) -> None:
        if not (self.header or self.data):
            raise LocalProtocolError(
                "digests-required needs the header digest, the data one or both"
            )

    @property
    def keys(self) -> tuple[str, ...]:
        """The digest keys required: ``HeaderDigest``, ``DataDigest`` or both."""
        return (("HeaderDigest",) if self.header else ()) + (("DataDigest",) if self.data else ())


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectDigests:
    """HeaderDigest and DataDigest are answered ``Reject`` whatever is offered.

    The login goes on and the connection uses no digest (a rejected key keeps its default,
    None), unless :class:`DigestsRequired` is set too, which then decides what is used.
    """

    kind: ClassVar[FaultKind] = FaultKind.REJECT_DIGESTS


Fault: TypeAlias = (
    Refuse
    | Blackhole
    | Silent
    | ResetMidLogin
    | DelayPDUs
    | SlowDrip
    | MalformedPDU
    | OversizedPDU
    | WrongOpcode
    | WrongITT
    | Redirect
    | RedirectLoop
    | WrongChapResponse
    | ReflectChallenge
    | DowngradeToNone
    | GarbageKeyValues
    | NonUTF8Text
    | SplitText
    | ServiceUnavailable
    | DigestsRequired
    | RejectDigests
)

_SIMPLE: dict[FaultKind, Fault] = {
    FaultKind.REFUSE: Refuse(),
    FaultKind.BLACKHOLE: Blackhole(),
    FaultKind.SILENT: Silent(),
    FaultKind.RESET_MID_LOGIN: ResetMidLogin(),
    FaultKind.MALFORMED_PDU: MalformedPDU(),
    FaultKind.WRONG_OPCODE: WrongOpcode(),
    FaultKind.WRONG_ITT: WrongITT(),
    FaultKind.WRONG_CHAP_RESPONSE: WrongChapResponse(),
    FaultKind.DOWNGRADE_TO_NONE: DowngradeToNone(),
    FaultKind.NON_UTF8_TEXT: NonUTF8Text(),
    FaultKind.SERVICE_UNAVAILABLE: ServiceUnavailable(),
    FaultKind.REJECT_DIGESTS: RejectDigests(),
}

_DIGEST_PARTS: dict[str, DigestsRequired] = {
    "both": DigestsRequired(),
    "header": DigestsRequired(data=False),
    "data": DigestsRequired(header=False),
}


def find_fault(faults: tuple[Fault, ...], kind: FaultKind) -> Fault | None:
    """The first fault of ``kind`` in ``faults``, or None."""
    for fault in faults:
        if fault.kind is kind:
            return fault
    return None


def _number(kind: FaultKind, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LocalProtocolError(f"{kind.value} needs a number of seconds, got {text!r}") from None


def _integer(kind: FaultKind, text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise LocalProtocolError(f"{kind.value} needs an integer, got {text!r}") from None


def parse_fault(text: str) -> Fault:
    """Read a fault's command-line spelling.

    ``NAME`` for faults without parameters, and: ``delay:SECONDS``, ``slow-drip[:SECONDS]``,
    ``oversized-pdu[:LENGTH]``, ``redirect:ADDRESS`` / ``redirect-permanent:ADDRESS`` (ADDRESS
    is ``host:port[,tpgt]`` or a portal name), ``redirect-loop[:permanent]``,
    ``reflect-challenge[:0xHEX|:initiator-secret]``, ``garbage-key-values[:KEY,KEY...]``,
    ``split-text[:CHUNK[:continue|tgt[:login]]]``, ``digests-required[:header|data|both]``.
    """
    name, sep, arg = text.strip().partition(":")
    permanent = False
    if name == "redirect-permanent":
        name, permanent = "redirect", True
    try:
        kind = FaultKind(name)
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise LocalProtocolError(f"unknown fault {name!r}; known faults: {known}") from None
    if kind in _SIMPLE:
        if sep:
            raise LocalProtocolError(f"fault {kind.value} takes no parameter")
        return _SIMPLE[kind]
    match kind:
        case FaultKind.DELAY:
            if not sep:
                raise LocalProtocolError("delay needs seconds: delay:SECONDS")
            return DelayPDUs(seconds=_number(kind, arg))
        case FaultKind.SLOW_DRIP:
            return SlowDrip(interval=_number(kind, arg)) if sep else SlowDrip()
        case FaultKind.OVERSIZED_PDU:
            return OversizedPDU(length=_integer(kind, arg)) if sep else OversizedPDU()
        case FaultKind.REDIRECT:
            if not arg:
                raise LocalProtocolError("redirect needs an address: redirect:HOST:PORT[,TPGT]")
            return Redirect(to=arg, permanent=permanent)
        case FaultKind.REDIRECT_LOOP:
            if sep and arg not in ("permanent", "temporary"):
                raise LocalProtocolError("redirect-loop takes 'permanent' or 'temporary'")
            return RedirectLoop(permanent=arg == "permanent")
        case FaultKind.REFLECT_CHALLENGE:
            if not sep:
                return ReflectChallenge()
            if arg == "initiator-secret":
                return ReflectChallenge(initiator_secret=True)
            hex_digits = arg[2:] if arg[:2].lower() == "0x" else arg
            try:
                challenge = bytes.fromhex(hex_digits)
            except ValueError:
                raise LocalProtocolError("reflect-challenge needs 0x followed by hex") from None
            return ReflectChallenge(challenge=challenge)
        case FaultKind.GARBAGE_KEY_VALUES:
            if not sep:
                return GarbageKeyValues()
            return GarbageKeyValues(keys=tuple(k for k in arg.split(",") if k))
        case FaultKind.SPLIT_TEXT:
            if not sep:
                return SplitText()
            chunk_text, sep2, rest = arg.partition(":")
            style_text, sep3, login_text = rest.partition(":")
            try:
                style = SplitStyle(style_text) if sep2 else SplitStyle.CONTINUE
            except ValueError:
                raise LocalProtocolError("split-text style must be 'continue' or 'tgt'") from None
            if sep3 and login_text != "login":
                raise LocalProtocolError("split-text takes ':login' after the style, or nothing")
            return SplitText(chunk=_integer(kind, chunk_text), style=style, login=bool(sep3))
        case FaultKind.DIGESTS_REQUIRED:
            if not sep:
                return DigestsRequired()
            if arg not in _DIGEST_PARTS:
                raise LocalProtocolError("digests-required takes 'header', 'data' or 'both'")
            return _DIGEST_PARTS[arg]
    raise LocalProtocolError(f"fault {kind.value} cannot be parsed")  # pragma: no cover


def format_fault(fault: Fault) -> str:
    """The command-line spelling of ``fault`` (the inverse of :func:`parse_fault`)."""
    match fault:
        case DelayPDUs(seconds=seconds):
            return f"delay:{seconds:g}"
        case SlowDrip(interval=interval):
            return f"slow-drip:{interval:g}"
        case OversizedPDU(length=length):
            return f"oversized-pdu:{length}"
        case Redirect(to=to, permanent=permanent):
            return f"{'redirect-permanent' if permanent else 'redirect'}:{to}"
        case RedirectLoop(permanent=permanent):
            return f"redirect-loop:{'permanent' if permanent else 'temporary'}"
        case ReflectChallenge(initiator_secret=True):
            return "reflect-challenge:initiator-secret"
        case ReflectChallenge(challenge=challenge):
            return "reflect-challenge" + ("" if challenge is None else f":0x{challenge.hex()}")
        case GarbageKeyValues(keys=keys):
            return "garbage-key-values:" + ",".join(keys)
        case SplitText(chunk=chunk, style=style, login=login):
            return f"split-text:{chunk}:{style.value}" + (":login" if login else "")
        case DigestsRequired(header=header, data=data):
            part = "both" if header and data else ("header" if header else "data")
            return f"digests-required:{part}"
    return fault.kind.value
