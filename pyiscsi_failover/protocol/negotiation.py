"""Operational parameter negotiation for the initiator side of login (RFC 7143 sections 6.2, 13).

:class:`Negotiator` produces the keys we offer in LoginOperationalNegotiation, checks the target's
answers against each key's result function, answers keys the target proposes on its own, and
hands back the outcome as :class:`OperationalParameters`. It deals in ``(key, value)`` pairs only
(see :mod:`pyiscsi_failover.protocol.text` for the bytes), so the login state machine decides
when pairs travel and in which PDU.

The rules it applies, per RFC 7143:

* list keys (HeaderDigest, DataDigest): the answer is the first value of the proposer's list the
  responder accepts, and must be one we offered;
* numbers: the result is the minimum (MaxBurstLength, ...) or maximum (DefaultTime2Wait) of both
  sides' values, so an answer beyond our offer is an error; a proposal out of range is answered
  ``Reject``; FirstBurstLength never exceeds MaxBurstLength;
* booleans: OR (InitialR2T, DataPDUInOrder, DataSequenceInOrder) and AND (ImmediateData). The
  answer is optional when our value settles the result on its own (Yes for OR, No for AND), so
  such keys are never pending;
* declarative keys (MaxRecvDataSegmentLength, TargetAlias, TargetPortalGroupTag) are recorded and
  never answered;
* a key we do not know is answered ``NotUnderstood``; a key irrelevant to a discovery session is
  answered ``Irrelevant``; the obsolete marker keys are answered ``Reject`` (RFC 7143 13.25);
* ``Reject``/``NotUnderstood`` in answer to our offer leave the key at its RFC default, which is
  fine only if the default is itself something our offer allows; a ``Reject`` of a digest key
  ends the login (the target accepts none of our digests, so no session could work);
  ``Irrelevant`` is accepted only where the RFC makes the key irrelevant.

Keys of the security and login layer (:data:`LOGIN_KEYS`) are ignored here: the login state
machine routes them to CHAP and its own checks.

Pure: this module must never import trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from pyiscsi_failover.errors import LocalProtocolError, NegotiationError, TextError
from pyiscsi_failover.protocol.text import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    SPECIAL_VALUES,
    VALUE_MAX_BYTES,
    format_boolean,
    parse_boolean,
    parse_number,
)

__all__ = [
    "DEFAULT_PROPOSAL",
    "DISCOVERY_KEYS",
    "LOGIN_KEYS",
    "OFFERABLE_KEYS",
    "Digest",
    "Negotiator",
    "OperationalParameters",
    "OperationalProposal",
    "SessionType",
]

logger = logging.getLogger(__name__)

#: Keys that belong to the security/login layer; the Negotiator never answers them.
LOGIN_KEYS = frozenset(
    {
        "AuthMethod",
        "CHAP_A",
        "CHAP_C",
        "CHAP_I",
        "CHAP_N",
        "CHAP_R",
        "InitiatorName",
        "SessionType",
        "TargetAddress",
        "TargetName",
    }
)

_DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192


class Digest(enum.Enum):
    """HeaderDigest/DataDigest values; the enum value is the text on the wire."""

    NONE = "None"
    CRC32C = "CRC32C"


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


class _Function(enum.Enum):
    """How a key's outcome follows from both sides' values (RFC 7143 section 13)."""

    LIST = "first value of the proposer's list that the responder accepts"
    MINIMUM = "minimum"
    MAXIMUM = "maximum"
    OR = "boolean OR"
    AND = "boolean AND"


_Scalar: TypeAlias = "Digest | bool | int | str"
_Offer: TypeAlias = "tuple[Digest, ...] | tuple[str, ...] | bool | int"


@dataclass(frozen=True, slots=True)
class _Rule:
    """One negotiated key: its result function, RFC default and range, and where it is stored.

    Positional on purpose: the table below reads as the RFC's table does.
    """

    key: str
    function: _Function
    default: _Scalar
    low: int
    high: int
    attr: str | None  # field of OperationalProposal/OperationalParameters, if any
    discovery_irrelevant: bool  # RFC 7143: "Irrelevant when: SessionType=Discovery"


_F = _Function
_24 = 2**24 - 1  # the largest length RFC 7143 allows (MaxBurstLength etc.)
# fmt: off
_RULES = {rule.key: rule for rule in (
    # key                   function    default      low  high   field                   disc.
    _Rule("HeaderDigest",   _F.LIST,    Digest.NONE, 0,   0,     "header_digest",         False),
    _Rule("DataDigest",     _F.LIST,    Digest.NONE, 0,   0,     "data_digest",           False),
    _Rule("MaxConnections", _F.MINIMUM, 1,           1,   65535, "max_connections",       True),
    _Rule("InitialR2T",     _F.OR,      True,        0,   0,     "initial_r2t",           True),
    _Rule("ImmediateData",  _F.AND,     True,        0,   0,     "immediate_data",        True),
    _Rule("MaxBurstLength", _F.MINIMUM, 262144,      512, _24,   "max_burst_length",      True),
    _Rule("FirstBurstLength", _F.MINIMUM, 65536,     512, _24,   "first_burst_length",    True),
    _Rule("DefaultTime2Wait", _F.MAXIMUM, 2,         0,   3600,  "default_time2wait",     False),
    _Rule("DefaultTime2Retain", _F.MINIMUM, 20,      0,   3600,  "default_time2retain",   False),
    _Rule("MaxOutstandingR2T", _F.MINIMUM, 1,        1,   65535, "max_outstanding_r2t",   True),
    _Rule("DataPDUInOrder", _F.OR,      True,        0,   0,     "data_pdu_in_order",     True),
    _Rule("DataSequenceInOrder", _F.OR, True,        0,   0,     "data_sequence_in_order", True),
    _Rule("ErrorRecoveryLevel", _F.MINIMUM, 0,       0,   2,     "error_recovery_level",  False),
    # RFC 7143 keys we never offer but must answer when a target proposes them.
    _Rule("TaskReporting",  _F.LIST,    "RFC3720",   0,   0,     None,                    True),
    _Rule("iSCSIProtocolLevel", _F.MINIMUM, 1,       0,   31,    None,                    True),
)}
# fmt: on
# What we answer for the keys above that have no proposal field: plain RFC 3720 task reporting,
# and protocol level 1 (RFC 7143 itself).
_FIXED_PREFERENCES: dict[str, _Offer] = {
    "TaskReporting": ("RFC3720",),
    "iSCSIProtocolLevel": 1,
}
#: Keys whose Reject ends the login: they decide how every later PDU is framed.
_MUST_SETTLE = frozenset({"HeaderDigest", "DataDigest"})

# RFC 7143 13.25: markers are obsolete; a compliant implementation answers them with Reject.
_OBSOLETE_KEYS = frozenset({"IFMarker", "OFMarker", "IFMarkInt", "OFMarkInt"})
_DIGESTS = {digest.value: digest for digest in Digest}

_MRDSL = "MaxRecvDataSegmentLength"
_FBL = "FirstBurstLength"
_MBL = "MaxBurstLength"

#: Every key :meth:`Negotiator.offer` can send, in the order it sends them.
OFFERABLE_KEYS: tuple[str, ...] = (
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    _MRDSL,
    _MBL,
    _FBL,
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "InitiatorAlias",
)
#: The subset that matters in a discovery session (RFC 7143 marks the rest "Irrelevant when
#: SessionType=Discovery"); what :meth:`Negotiator.offer` sends there by default.
DISCOVERY_KEYS: frozenset[str] = frozenset(OFFERABLE_KEYS) - {
    key for key, rule in _RULES.items() if rule.discovery_irrelevant
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationalParameters:
    """The negotiated outcome; every field starts at its RFC 7143 default."""

    header_digest: Digest = Digest.NONE
    data_digest: Digest = Digest.NONE
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    #: What we receive at most per data segment: the value we declared (8192 if we did not).
    max_recv_data_segment_length: int = _DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
    #: What the target declared it receives: the most we may send in one data segment.
    target_max_recv_data_segment_length: int = _DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    target_portal_group_tag: int | None = None
    target_alias: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationalProposal:
    """What we offer. Digest tuples are in our order of preference.

    ``send_keys`` picks which keys :meth:`Negotiator.offer` sends (a subset of
    :data:`OFFERABLE_KEYS`); ``None`` means every key that matters for the session type.
    Unsent keys still guide our answers when the target proposes them.
    """

    # None first, so nothing changes for targets that accept it; CRC32C so that a target that
    # requires digests can still choose them (and the hand-off then asks the kernel for them).
    header_digest: tuple[Digest, ...] = (Digest.NONE, Digest.CRC32C)
    data_digest: tuple[Digest, ...] = (Digest.NONE, Digest.CRC32C)
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    initiator_alias: str | None = None
    send_keys: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("header_digest", "data_digest"):
            digests = getattr(self, name)
            if (
                not isinstance(digests, tuple)
                or not digests
                or not all(isinstance(d, Digest) for d in digests)
                or len(set(digests)) != len(digests)
            ):
                raise LocalProtocolError(
                    f"{name} must be a non-empty tuple of distinct Digest values, not {digests!r}"
                )
        ranges = {"max_recv_data_segment_length": (512, _24)}
        for rule in _RULES.values():
            if rule.attr is not None and rule.function in (_F.MINIMUM, _F.MAXIMUM):
                ranges[rule.attr] = (rule.low, rule.high)
        for name, (low, high) in ranges.items():
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise LocalProtocolError(
                    f"{name} must be an integer in {low}..{high}, not {number!r}"
                )
        for rule in _RULES.values():
            is_flag = rule.function in (_F.OR, _F.AND)
            if rule.attr is not None and is_flag and not isinstance(getattr(self, rule.attr), bool):
                raise LocalProtocolError(f"{rule.attr} must be a bool")
        if self.first_burst_length > self.max_burst_length:
            raise LocalProtocolError(
                f"first_burst_length {self.first_burst_length} exceeds max_burst_length"
                f" {self.max_burst_length} (RFC 7143 forbids it)"
            )
        if self.initiator_alias is not None:
            alias = self.initiator_alias
            if "\x00" in alias or not alias.isprintable() or len(alias.encode()) > VALUE_MAX_BYTES:
                raise LocalProtocolError(
                    f"initiator_alias must be printable text of at most {VALUE_MAX_BYTES} bytes"
                )
        if self.send_keys is not None:
            unknown = set(self.send_keys) - set(OFFERABLE_KEYS)
            if unknown:
                raise LocalProtocolError(f"send_keys has keys we cannot offer: {sorted(unknown)}")
            if "InitiatorAlias" in self.send_keys and self.initiator_alias is None:
                raise LocalProtocolError("send_keys has InitiatorAlias but initiator_alias is None")


#: The proposal used when none is given (frozen, so sharing it is safe).
DEFAULT_PROPOSAL = OperationalProposal()


def _format(value: _Offer | _Scalar) -> str:
    if isinstance(value, tuple):
        return ",".join(item.value if isinstance(item, Digest) else item for item in value)
    if isinstance(value, Digest):
        return value.value
    if isinstance(value, bool):
        return format_boolean(value)
    return str(value)


def _admissible(rule: _Rule, offer: _Offer, result: _Scalar) -> bool:
    """Whether ``result`` is an outcome the key's result function allows, given our ``offer``."""
    match rule.function:
        case _F.LIST:
            assert isinstance(offer, tuple)
            return result in offer
        case _F.MINIMUM:
            assert isinstance(offer, int)
            assert isinstance(result, int)
            return result <= offer
        case _F.MAXIMUM:
            assert isinstance(offer, int)
            assert isinstance(result, int)
            return result >= offer
        case _F.OR:
            return bool(result) or not offer
        case _F.AND:
            return not result or bool(offer)


def _parse_single(rule: _Rule, value: str) -> _Scalar:
    """Parse one value of ``rule``'s type; raises TextError naming the key."""
    match rule.function:
        case _F.LIST:
            if rule.key in ("HeaderDigest", "DataDigest"):
                digest = _DIGESTS.get(value)
                if digest is None:
                    raise TextError(f"{rule.key} is not None or CRC32C", key=rule.key)
                return digest
            return value
        case _F.MINIMUM | _F.MAXIMUM:
            return parse_number(rule.key, value, low=rule.low, high=rule.high)
        case _F.OR | _F.AND:
            return parse_boolean(rule.key, value)


def _excerpt(value: str) -> str:
    return value if len(value) <= 64 else value[:64] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class _OfferPlan:
    """What :meth:`Negotiator.offer` sends and records, for one proposal and session type."""

    pairs: tuple[tuple[str, str], ...]
    offers: dict[str, _Offer]
    settled: dict[str, _Scalar]
    pending: frozenset[str]
    declared_mrdsl: bool


_OFFER_PLANS: dict[tuple[OperationalProposal, SessionType], _OfferPlan] = {}
_MAX_OFFER_PLANS = 64


class Negotiator:
    """One leading connection's operational negotiation, initiator side.

    Call :meth:`offer` once to get the keys to send, then :meth:`receive` with each round of the
    target's keys (the pairs it returns go in our next request), then :meth:`result` once the
    target has answered everything (:attr:`pending` is empty). Any :class:`NegotiationError`
    ends the negotiation; discard the object then.
    """

    def __init__(self, proposal: OperationalProposal, *, session_type: SessionType) -> None:
        self._proposal = proposal
        self._session_type = session_type
        self._offers: dict[str, _Offer] | None = None  # None until offer() is called
        self._pending: set[str] = set()
        self._results: dict[str, _Scalar] = {}
        self._irrelevant: set[str] = set()
        self._heard: set[str] = set()  # negotiated keys the target has sent: never again
        self._declared_mrdsl = False
        self._target_mrdsl = _DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        self._target_portal_group_tag: int | None = None
        self._target_alias: str | None = None

    @property
    def proposal(self) -> OperationalProposal:
        return self._proposal

    @property
    def session_type(self) -> SessionType:
        return self._session_type

    @property
    def pending(self) -> frozenset[str]:
        """Keys we offered that still wait for the target's answer."""
        return frozenset(self._pending)

    def _keys_to_offer(self) -> list[str]:
        chosen = self._proposal.send_keys
        if chosen is None:
            chosen = (
                DISCOVERY_KEYS
                if self._session_type is SessionType.DISCOVERY
                else frozenset(OFFERABLE_KEYS)
            )
            if self._proposal.initiator_alias is None:
                chosen = chosen - {"InitiatorAlias"}
        return [key for key in OFFERABLE_KEYS if key in chosen]

    def _preference(self, rule: _Rule) -> _Offer:
        """What we would choose for ``rule``: our proposal, or a fixed value for unproposed keys."""
        if rule.attr is None:
            return _FIXED_PREFERENCES[rule.key]
        value: _Offer = getattr(self._proposal, rule.attr)
        if rule.key == _FBL:
            # FirstBurstLength must not exceed MaxBurstLength, whatever that has become.
            max_burst = self._results.get(_MBL, self._proposal.max_burst_length)
            assert isinstance(value, int)
            assert isinstance(max_burst, int)
            value = min(value, max_burst)
        return value

    def offer(self) -> list[tuple[str, str]]:
        """The keys to send in LoginOperationalNegotiation. Call it once."""
        if self._offers is not None:
            raise LocalProtocolError("offer() was already called on this Negotiator")
        if self._heard:
            return self._make_offer()
        # Before the target has proposed anything the offer depends on the proposal and the
        # session type alone, so every probe of a run shares one (it is a tenth of a login's
        # sans-IO work).
        cache_key = (self._proposal, self._session_type)
        plan = _OFFER_PLANS.get(cache_key)
        if plan is None:
            pairs = self._make_offer()
            plan = _OfferPlan(
                pairs=tuple(pairs),
                offers=dict(self._offers or {}),
                settled=dict(self._results),
                pending=frozenset(self._pending),
                declared_mrdsl=self._declared_mrdsl,
            )
            if len(_OFFER_PLANS) >= _MAX_OFFER_PLANS:
                _OFFER_PLANS.clear()
            _OFFER_PLANS[cache_key] = plan
            return pairs
        self._offers = dict(plan.offers)
        self._results.update(plan.settled)
        self._pending.update(plan.pending)
        self._declared_mrdsl = plan.declared_mrdsl
        return list(plan.pairs)

    def _make_offer(self) -> list[tuple[str, str]]:
        self._offers = {}
        pairs: list[tuple[str, str]] = []
        for key in self._keys_to_offer():
            if key == _MRDSL:
                pairs.append((key, str(self._proposal.max_recv_data_segment_length)))
                self._declared_mrdsl = True
                continue
            if key == "InitiatorAlias":
                assert self._proposal.initiator_alias is not None
                pairs.append((key, self._proposal.initiator_alias))
                continue
            if key in self._heard:
                continue  # the target proposed it first and we answered: offering is renegotiating
            rule = _RULES[key]
            value = self._preference(rule)
            self._offers[key] = value
            pairs.append((key, _format(value)))
            if (rule.function is _F.OR and value is True) or (
                rule.function is _F.AND and value is False
            ):
                # Our value settles the outcome alone, so the target need not answer.
                self._results[key] = value
            else:
                self._pending.add(key)
        return pairs

    def receive(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Process one round of the target's keys; return the answers we owe it, in its order."""
        items = list(pairs)
        seen: set[str] = set()
        for key, value in items:
            if key in seen:
                raise NegotiationError(
                    f"target sent {key} twice in one round", key=key, value=_excerpt(value)
                )
            seen.add(key)
        # MaxBurstLength goes before FirstBurstLength so an answer to the latter can respect the
        # former; answers still go out in the target's order.
        order = sorted(range(len(items)), key=lambda i: items[i][0] == _FBL)
        answers: dict[int, tuple[str, str]] = {}
        for index in order:
            key, value = items[index]
            answer = self._receive_one(key, value)
            if answer is not None:
                logger.debug("answering target's %s with %s", key, answer)
                answers[index] = (key, answer)
        self._check_consistency()
        return [answers[index] for index in sorted(answers)]

    def _receive_one(self, key: str, value: str) -> str | None:
        if key in LOGIN_KEYS:
            return None
        if key in (_MRDSL, "TargetPortalGroupTag", "TargetAlias", "InitiatorAlias"):
            return self._declaration(key, value)
        if key in _OBSOLETE_KEYS or key not in _RULES:
            if value in SPECIAL_VALUES:
                raise NegotiationError(
                    f"target answered {key}={value}, a key we never sent", key=key, value=value
                )
            if key in _OBSOLETE_KEYS:
                return REJECT
            logger.info("target sent key %s, which we do not know", _excerpt(key))
            return NOT_UNDERSTOOD
        if key in self._heard:
            raise NegotiationError(
                f"target sent {key} again after it was settled", key=key, value=_excerpt(value)
            )
        self._heard.add(key)
        rule = _RULES[key]
        if self._offers is not None and key in self._offers:
            self._check_answer(rule, self._offers[key], value)
            return None
        return self._answer_proposal(rule, value)

    def _declaration(self, key: str, value: str) -> str | None:
        if key == "InitiatorAlias":
            # Only an initiator declares it: a target sending it is proposing nonsense.
            return None if value in SPECIAL_VALUES else REJECT
        if key == "TargetAlias":
            self._target_alias = value
            return None
        if value in SPECIAL_VALUES:
            # A target refusing our own declaration changes nothing we rely on.
            logger.info("target answered %s=%s; keeping the defaults", key, value)
            return None
        try:
            if key == _MRDSL:
                self._target_mrdsl = parse_number(key, value, low=512, high=_24)
            else:
                self._target_portal_group_tag = parse_number(key, value, low=0, high=65535)
        except TextError as exc:
            raise NegotiationError(
                f"target declared an invalid {key}: {exc}", key=key, value=_excerpt(value)
            ) from exc
        return None

    def _irrelevance_allowed(self, rule: _Rule) -> bool:
        if self._session_type is SessionType.DISCOVERY and rule.discovery_irrelevant:
            return True
        # FirstBurstLength is also irrelevant with InitialR2T=Yes and ImmediateData=No; whether
        # that holds is checked once both are known (_check_consistency).
        return rule.key == _FBL

    def _check_answer(self, rule: _Rule, offer: _Offer, value: str) -> None:
        key = rule.key
        self._pending.discard(key)
        if value in SPECIAL_VALUES:
            if value == IRRELEVANT and not self._irrelevance_allowed(rule):
                raise NegotiationError(
                    f"target answered {key}=Irrelevant, which RFC 7143 does not allow here",
                    key=key,
                    value=value,
                )
            discovery = self._session_type is SessionType.DISCOVERY
            if value == IRRELEVANT or (discovery and rule.discovery_irrelevant):
                # The key does not matter here, whatever the target thinks of our value.
                self._irrelevant.add(key)
                self._results.pop(key, None)
            else:
                self._fall_back(rule, offer, value)
            return
        try:
            result = _parse_single(rule, value)
        except TextError as exc:
            raise NegotiationError(
                f"target answered {key} with an invalid value: {exc}",
                key=key,
                value=_excerpt(value),
            ) from exc
        if not _admissible(rule, offer, result):
            raise NegotiationError(
                f"target answered {key}={_excerpt(value)}, not a possible outcome of our offer"
                f" {key}={_format(offer)} (result function: {rule.function.value})",
                key=key,
                value=_excerpt(value),
            )
        self._results[key] = result

    def _fall_back(self, rule: _Rule, offer: _Offer, value: str) -> None:
        """After Reject/NotUnderstood the key keeps its default, if our offer allows that.

        A Reject of a digest key is different: the target can use none of the digests we
        offered, so the default (None) is exactly what it refused. Going on would give a session
        whose very next PDU the target cannot read, so the login ends here instead.
        """
        if value == REJECT and rule.key in _MUST_SETTLE:
            raise NegotiationError(
                f"target rejected {rule.key}={_format(offer)}: it accepts none of the digests"
                " we offer",
                key=rule.key,
                value=value,
            )
        if not _admissible(rule, offer, rule.default):
            raise NegotiationError(
                f"target answered {rule.key}={value}; its default {_format(rule.default)} is not"
                f" acceptable under our offer {rule.key}={_format(offer)}",
                key=rule.key,
                value=value,
            )
        logger.warning("target answered %s=%s; using the default", rule.key, value)
        self._results[rule.key] = rule.default

    def _answer_proposal(self, rule: _Rule, value: str) -> str:
        key = rule.key
        if value in SPECIAL_VALUES:
            raise NegotiationError(
                f"target sent {key}={value} though we never offered {key}", key=key, value=value
            )
        if self._session_type is SessionType.DISCOVERY and rule.discovery_irrelevant:
            self._irrelevant.add(key)
            return IRRELEVANT
        ours = self._preference(rule)
        result: _Scalar
        match rule.function:
            case _F.LIST:
                assert isinstance(ours, tuple)
                accepted = {_format(item): item for item in ours}
                choice = next((item for item in value.split(",") if item in accepted), None)
                if choice is None:
                    return self._refuse(rule, ours, value)
                result = accepted[choice]
            case _F.MINIMUM | _F.MAXIMUM:
                assert isinstance(ours, int)
                try:
                    theirs = parse_number(key, value, low=rule.low, high=rule.high)
                except TextError:
                    return self._refuse(rule, ours, value)
                result = min(theirs, ours) if rule.function is _F.MINIMUM else max(theirs, ours)
            case _F.OR | _F.AND:
                assert isinstance(ours, bool)
                try:
                    flag = parse_boolean(key, value)
                except TextError:
                    return self._refuse(rule, ours, value)
                result = (flag or ours) if rule.function is _F.OR else (flag and ours)
        self._results[key] = result
        return _format(result)

    def _refuse(self, rule: _Rule, ours: _Offer, value: str) -> str:
        """Answer Reject to an unacceptable proposal, which leaves the key at its default."""
        if not _admissible(rule, ours, rule.default):
            raise NegotiationError(
                f"target proposed {rule.key}={_excerpt(value)}, which we cannot accept, and the"
                f" default {_format(rule.default)} is not acceptable either",
                key=rule.key,
                value=_excerpt(value),
            )
        logger.info("rejecting target's %s=%s", rule.key, _excerpt(value))
        self._results[rule.key] = rule.default
        return REJECT

    def _outcome(self, key: str) -> _Scalar | None:
        """The settled outcome of ``key``; its default if never negotiated; None while pending."""
        if key in self._pending:
            return None
        return self._results.get(key, _RULES[key].default)

    def _check_consistency(self) -> None:
        """Checks across keys, made once the keys involved are settled (pending ones wait)."""
        if _FBL in self._irrelevant and self._session_type is SessionType.NORMAL:
            initial_r2t = self._outcome("InitialR2T")
            immediate_data = self._outcome("ImmediateData")
            settled = initial_r2t is not None and immediate_data is not None
            if settled and not (initial_r2t is True and immediate_data is False):
                raise NegotiationError(
                    "target answered FirstBurstLength=Irrelevant, but it is relevant unless"
                    " InitialR2T=Yes and ImmediateData=No",
                    key=_FBL,
                    value=IRRELEVANT,
                )
        first, most = self._results.get(_FBL), self._results.get(_MBL)
        if (
            isinstance(first, int)
            and isinstance(most, int)
            and _FBL not in self._irrelevant
            and first > most
        ):
            raise NegotiationError(
                f"FirstBurstLength={first} exceeds MaxBurstLength={most}",
                key=_FBL,
                value=str(first),
            )

    def result(self) -> OperationalParameters:
        """The negotiated parameters. Raises NegotiationError if an offered key is unanswered."""
        if self._pending:
            raise NegotiationError(
                f"target left offered keys unanswered: {', '.join(sorted(self._pending))}",
                key=min(self._pending),
            )
        self._check_consistency()
        max_burst = self._final_int(_MBL)
        return OperationalParameters(
            header_digest=self._final_digest("HeaderDigest"),
            data_digest=self._final_digest("DataDigest"),
            max_connections=self._final_int("MaxConnections"),
            initial_r2t=self._final_bool("InitialR2T"),
            immediate_data=self._final_bool("ImmediateData"),
            max_recv_data_segment_length=(
                self._proposal.max_recv_data_segment_length
                if self._declared_mrdsl
                else _DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
            ),
            target_max_recv_data_segment_length=self._target_mrdsl,
            max_burst_length=max_burst,
            # Only differs with a default on one side (Irrelevant, Reject): keep the invariant.
            first_burst_length=min(self._final_int(_FBL), max_burst),
            default_time2wait=self._final_int("DefaultTime2Wait"),
            default_time2retain=self._final_int("DefaultTime2Retain"),
            max_outstanding_r2t=self._final_int("MaxOutstandingR2T"),
            data_pdu_in_order=self._final_bool("DataPDUInOrder"),
            data_sequence_in_order=self._final_bool("DataSequenceInOrder"),
            error_recovery_level=self._final_int("ErrorRecoveryLevel"),
            target_portal_group_tag=self._target_portal_group_tag,
            target_alias=self._target_alias,
        )

    def _final(self, key: str) -> _Scalar:
        rule = _RULES[key]
        if key in self._irrelevant:
            return rule.default
        return self._results.get(key, rule.default)

    def _final_int(self, key: str) -> int:
        value = self._final(key)
        assert isinstance(value, int)
        assert not isinstance(value, bool)
        return value

    def _final_bool(self, key: str) -> bool:
        value = self._final(key)
        assert isinstance(value, bool)
        return value

    def _final_digest(self, key: str) -> Digest:
        value = self._final(key)
        assert isinstance(value, Digest)
        return value
