"""CHAP for iSCSI login (RFC 1994 as profiled by RFC 7143 section 12.1.3), both sides.

:class:`ChapInitiator` is what the login state machine drives; :class:`ChapAuthenticator` is the
target side used by our scriptable test target. Both are sans-IO: keys go in as a mapping and come
out as ``(key, value)`` pairs; randomness is injectable so tests are deterministic.

The exchange (stage 0 of login)::

    initiator                               target
    AuthMethod=CHAP                 ->
                                    <-      AuthMethod=CHAP
    CHAP_A=5,6,7,8                  ->      (offer; target: select_algorithm)
                                    <-      CHAP_A=a CHAP_I=i CHAP_C=c
    CHAP_N CHAP_R [CHAP_I CHAP_C]   ->      (answer_challenge; target: check_response)
                                    <-      [CHAP_N CHAP_R]  mutual only (verify_target)

Security rules enforced here rather than left to callers: never accept ``AuthMethod=None`` or an
algorithm we did not offer (downgrade); refuse empty, short or over-long challenges; refuse a
challenge we issued ourselves, in this or any recent exchange (reflection); make our own
challenges random, at least 16 bytes, never repeated; refuse a mutual answer computed with our
own secret. Secrets never appear in a message, repr or log line.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import (
    AuthenticationError,
    ChapDowngradeError,
    ChapReflectionError,
    ISCSIError,
    LocalProtocolError,
    TargetAuthenticationError,
)
from pyiscsi_failover.protocol.text import format_binary, parse_binary, parse_number

__all__ = [
    "AUTH_METHOD_CHAP",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_POLICY",
    "MAX_CHALLENGE_LENGTH",
    "MIN_CHALLENGE_LENGTH",
    "MIN_SECRET_LENGTH",
    "ChallengeHistory",
    "ChapAlgorithm",
    "ChapAuthenticator",
    "ChapInitiator",
    "ChapPolicy",
    "chap_response",
    "parse_chap_algorithms",
]

logger = logging.getLogger(__name__)

#: The AuthMethod value for CHAP (values are case-sensitive).
AUTH_METHOD_CHAP = "CHAP"
#: RFC 7143 wants longer secrets when IPsec is not used; below this we warn (never refuse).
MIN_SECRET_LENGTH = 12
#: Our own challenges are never shorter than this, and shorter ones from a target are suspect.
MIN_CHALLENGE_LENGTH = 16
#: RFC 7143: the binary form of CHAP_C must not exceed 1024 bytes.
MAX_CHALLENGE_LENGTH = 1024

# Answers a target may give instead of a value; for CHAP_A they mean "none of your algorithms".
_REFUSALS = frozenset({"Reject", "NotUnderstood", "Irrelevant"})
# How often a random source may repeat itself before we decide it is broken.
_MAX_CHALLENGE_ATTEMPTS = 8


class ChapAlgorithm(enum.IntEnum):
    """CHAP_A algorithm numbers, as used by open-iscsi and Linux LIO.

    Beware tgt, which treats 7 as SHA-1: that is why MD5 is offered first by default and why
    the initiator checks which algorithm the target echoed.
    """

    MD5 = 5
    SHA1 = 6
    SHA256 = 7
    SHA3_256 = 8

    @property
    def hash_name(self) -> str:
        """The :mod:`hashlib` name of the digest."""
        return _HASH_NAMES[self]

    @property
    def digest_size(self) -> int:
        """Length of a response in bytes."""
        return _DIGEST_SIZES[self]

    @property
    def open_iscsi_name(self) -> str:
        """The name open-iscsi's ``node.session.auth.chap_algs`` uses (``SHA3-256``...)."""
        return _OPEN_ISCSI_NAMES[self]


_HASH_NAMES: dict[ChapAlgorithm, str] = {
    ChapAlgorithm.MD5: "md5",
    ChapAlgorithm.SHA1: "sha1",
    ChapAlgorithm.SHA256: "sha256",
    ChapAlgorithm.SHA3_256: "sha3_256",
}
_DIGEST_SIZES: dict[ChapAlgorithm, int] = {
    ChapAlgorithm.MD5: 16,
    ChapAlgorithm.SHA1: 20,
    ChapAlgorithm.SHA256: 32,
    ChapAlgorithm.SHA3_256: 32,
}

_OPEN_ISCSI_NAMES: dict[ChapAlgorithm, str] = {
    ChapAlgorithm.MD5: "MD5",
    ChapAlgorithm.SHA1: "SHA1",
    ChapAlgorithm.SHA256: "SHA256",
    ChapAlgorithm.SHA3_256: "SHA3-256",
}

#: MD5 first: tgt and older arrays know nothing else, and tgt misreads 7.
DEFAULT_ALGORITHMS: tuple[ChapAlgorithm, ...] = (
    ChapAlgorithm.MD5,
    ChapAlgorithm.SHA1,
    ChapAlgorithm.SHA256,
    ChapAlgorithm.SHA3_256,
)


def _as_algorithm(value: object) -> ChapAlgorithm:
    if isinstance(value, ChapAlgorithm):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return ChapAlgorithm(value)
        except ValueError:
            pass
    raise LocalProtocolError(
        f"unknown CHAP algorithm {value!r}; known: {_format_list(ChapAlgorithm)}"
    )


def parse_chap_algorithms(text: str) -> tuple[ChapAlgorithm, ...]:
    """Read a comma-separated offer such as ``SHA256,MD5`` (open-iscsi's names, any case, or
    the CHAP_A numbers ``7,5``), keeping its order. Raises :class:`LocalProtocolError` naming
    the entry that is unknown or repeated."""
    by_name = {name.upper(): algorithm for algorithm, name in _OPEN_ISCSI_NAMES.items()}
    by_name |= {algorithm.name: algorithm for algorithm in ChapAlgorithm}  # SHA3_256 too
    known = ",".join(_OPEN_ISCSI_NAMES.values())
    algorithms: list[ChapAlgorithm] = []
    for raw in text.split(","):
        entry = raw.strip()
        if entry.isdigit():
            found = next((a for a in ChapAlgorithm if int(a) == int(entry)), None)
        else:
            found = by_name.get(entry.upper())
        if found is None:
            raise LocalProtocolError(
                f"unknown CHAP algorithm {entry!r} in {text!r}; known: {known} (or 5,6,7,8)"
            )
        if found in algorithms:
            raise LocalProtocolError(f"CHAP algorithm {entry!r} is listed twice in {text!r}")
        algorithms.append(found)
    return tuple(algorithms)


def _is_int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _format_list(algorithms: Iterable[ChapAlgorithm]) -> str:
    return ",".join(str(int(a)) for a in algorithms)


def _default_challenge_length(algorithm: ChapAlgorithm) -> int:
    # LIO and open-iscsi make challenges as long as the digest; we never go below 16.
    return max(algorithm.digest_size, MIN_CHALLENGE_LENGTH)


def chap_response(
    algorithm: ChapAlgorithm | int,
    identifier: int,
    secret: bytes | Secret,
    challenge: bytes,
) -> bytes:
    """Hash(identifier as one byte || secret || challenge), the RFC 1994 response."""
    alg = _as_algorithm(algorithm)
    if not _is_int_in(identifier, 0, 255):
        raise LocalProtocolError(f"CHAP identifier must be an integer 0..255, not {identifier!r}")
    raw = secret.reveal() if isinstance(secret, Secret) else bytes(secret)
    try:
        digest = hashlib.new(alg.hash_name)
    except ValueError as exc:  # e.g. MD5 in a FIPS-mode OpenSSL
        raise LocalProtocolError(
            f"hash {alg.hash_name} for CHAP_A={int(alg)} is unavailable"
        ) from exc
    digest.update(bytes((identifier,)))
    digest.update(raw)
    digest.update(bytes(challenge))
    return digest.digest()


class ChallengeHistory:
    """The challenges we sent recently, so one coming back at us can be refused (reflection).

    Reflection works across sessions: a rogue target keeps our mutual challenge from one login
    and sends it as its own in the next, hoping we compute the answer for it. So the history is
    shared by default between every :class:`ChapInitiator` of the process (bounded, thread-safe;
    challenges are public, so remembering them leaks nothing). Tests pass their own.
    """

    __slots__ = ("_lock", "_maxlen", "_order", "_seen")

    def __init__(self, maxlen: int = 4096) -> None:
        if maxlen < 1:
            raise LocalProtocolError(f"ChallengeHistory needs room for at least one, not {maxlen}")
        self._maxlen = maxlen
        self._order: deque[bytes] = deque()
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def remember(self, challenge: bytes) -> None:
        with self._lock:
            if challenge in self._seen:
                return
            self._order.append(challenge)
            self._seen.add(challenge)
            while len(self._order) > self._maxlen:
                self._seen.discard(self._order.popleft())

    def __contains__(self, challenge: object) -> bool:
        with self._lock:
            return challenge in self._seen

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def __repr__(self) -> str:
        return f"ChallengeHistory(maxlen={self._maxlen}, remembered={len(self)})"


_PROCESS_HISTORY = ChallengeHistory()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChapPolicy:
    """What the initiator accepts from a target and how it challenges back.

    ``min_challenge_length``: a shorter challenge from the target is refused (an empty one always
    is). ``challenge_length``: length of our own mutual challenge; None means the digest size of
    the chosen algorithm but at least 16 bytes. ``max_challenge_length``: RFC 7143's limit.
    """

    algorithms: tuple[ChapAlgorithm, ...] = DEFAULT_ALGORITHMS
    min_challenge_length: int = MIN_CHALLENGE_LENGTH
    challenge_length: int | None = None
    max_challenge_length: int = MAX_CHALLENGE_LENGTH

    def __post_init__(self) -> None:
        algorithms = tuple(_as_algorithm(a) for a in self.algorithms)
        if not algorithms:
            raise LocalProtocolError("ChapPolicy needs at least one algorithm")
        if len(set(algorithms)) != len(algorithms):
            raise LocalProtocolError(
                f"ChapPolicy lists an algorithm twice: {_format_list(algorithms)}"
            )
        object.__setattr__(self, "algorithms", algorithms)
        if not 0 <= self.min_challenge_length <= self.max_challenge_length:
            raise LocalProtocolError(
                "ChapPolicy needs 0 <= min_challenge_length <= max_challenge_length, not "
                f"{self.min_challenge_length} and {self.max_challenge_length}"
            )
        if self.challenge_length is not None and not (
            MIN_CHALLENGE_LENGTH <= self.challenge_length <= MAX_CHALLENGE_LENGTH
        ):
            raise LocalProtocolError(
                f"our challenge_length must be {MIN_CHALLENGE_LENGTH}..{MAX_CHALLENGE_LENGTH} "
                f"bytes, not {self.challenge_length}"
            )

    def own_challenge_length(self, algorithm: ChapAlgorithm) -> int:
        """Length of the challenge we send when ``algorithm`` was chosen."""
        if self.challenge_length is not None:
            return self.challenge_length
        return _default_challenge_length(algorithm)


#: The policy used when none is given (frozen, so sharing it is safe).
DEFAULT_POLICY = ChapPolicy()


class _State(enum.Enum):
    START = "start"
    OFFERED = "offered"  # initiator: CHAP_A sent / target: challenge sent
    ANSWERED = "answered"  # initiator, mutual: response and our challenge sent
    DONE = "done"
    FAILED = "failed"


def _warn_if_short(credentials: ChapCredentials, role: str) -> None:
    if len(credentials.secret) < MIN_SECRET_LENGTH:
        logger.warning(
            "the %s CHAP secret for user %r is shorter than %d bytes; RFC 7143 asks for "
            "longer secrets when IPsec is not in use",
            role,
            credentials.username,
            MIN_SECRET_LENGTH,
        )


def _check_credentials(credentials: object, role: str) -> ChapCredentials:
    if not isinstance(credentials, ChapCredentials):
        raise LocalProtocolError(f"{role} credentials must be ChapCredentials")
    if not credentials.username:
        raise LocalProtocolError(f"{role} CHAP username is empty")
    if not len(credentials.secret):
        raise LocalProtocolError(f"{role} CHAP secret for user {credentials.username!r} is empty")
    _warn_if_short(credentials, role)
    return credentials


def _short(value: str, limit: int = 64) -> str:
    """A peer-supplied value for a message, cut so garbage cannot flood a log."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _require(keys: Mapping[str, str], key: str, error: type[AuthenticationError]) -> str:
    value = keys.get(key)
    if value is None:
        raise error(f"the peer's CHAP message lacks {key}")
    return value


def _random_challenge(
    token_bytes: Callable[[int], bytes],
    length: int,
    history: ChallengeHistory,
    avoid: bytes,
) -> bytes:
    """A fresh challenge: random, never one we sent before, never the peer's own."""
    for _ in range(_MAX_CHALLENGE_ATTEMPTS):
        challenge = bytes(token_bytes(length))
        if len(challenge) != length:
            raise LocalProtocolError(
                f"the random source returned {len(challenge)} bytes, not {length}"
            )
        if challenge != avoid and challenge not in history:
            history.remember(challenge)
            return challenge
    raise LocalProtocolError("the random source keeps repeating challenges")


def _random_identifier(
    identifier: Callable[[], int] | None, token_bytes: Callable[[int], bytes]
) -> int:
    value = identifier() if identifier is not None else bytes(token_bytes(1))[0]
    if not _is_int_in(value, 0, 255):
        raise LocalProtocolError(f"CHAP identifier source gave {value!r}, not 0..255")
    return value


class ChapInitiator:
    """The initiator's half of CHAP: answer the target's challenge, optionally challenge back.

    Call in order: :meth:`auth_method_offer` / :meth:`check_auth_method` around the AuthMethod
    round, then :meth:`offer`, :meth:`answer_challenge` and, for mutual CHAP,
    :meth:`verify_target`. Any error is final: the object then refuses further calls.
    """

    __slots__ = (
        "_algorithm",
        "_challenge",
        "_credentials",
        "_history",
        "_identifier",
        "_my_identifier",
        "_policy",
        "_state",
        "_target_credentials",
        "_token_bytes",
    )

    def __init__(
        self,
        credentials: ChapCredentials,
        *,
        target_credentials: ChapCredentials | None = None,
        policy: ChapPolicy = DEFAULT_POLICY,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        identifier: Callable[[], int] | None = None,
        history: ChallengeHistory | None = None,
    ) -> None:
        self._credentials = _check_credentials(credentials, "initiator")
        self._target_credentials = (
            None if target_credentials is None else _check_credentials(target_credentials, "target")
        )
        if self._target_credentials is not None and (
            self._target_credentials.secret == self._credentials.secret
        ):
            # RFC 7143 forbids one secret for both directions; verify_target will refuse.
            logger.warning(
                "mutual CHAP for user %r uses the same secret in both directions; the "
                "target's answer will be refused",
                self._credentials.username,
            )
        self._policy = policy
        self._token_bytes = token_bytes
        self._identifier = identifier
        self._history = _PROCESS_HISTORY if history is None else history
        self._state = _State.START
        self._algorithm: ChapAlgorithm | None = None
        self._my_identifier: int | None = None
        self._challenge: bytes | None = None

    def __repr__(self) -> str:
        target = None if self._target_credentials is None else self._target_credentials.username
        return (
            f"ChapInitiator(username={self._credentials.username!r}, target_username={target!r}, "
            f"state={self._state.value!r})"
        )

    @property
    def mutual(self) -> bool:
        """Whether we also authenticate the target."""
        return self._target_credentials is not None

    @property
    def algorithm(self) -> ChapAlgorithm | None:
        """The algorithm the target chose, once known."""
        return self._algorithm

    @property
    def complete(self) -> bool:
        """True once every CHAP step succeeded (after verify_target for mutual CHAP)."""
        return self._state is _State.DONE

    def auth_method_offer(self) -> str:
        """The AuthMethod value to send: only CHAP, since we have credentials to use."""
        return AUTH_METHOD_CHAP

    def check_auth_method(self, chosen: str) -> None:
        """Refuse any AuthMethod answer but CHAP: a target choosing None is a downgrade."""
        if chosen != AUTH_METHOD_CHAP:
            self._state = _State.FAILED
            raise ChapDowngradeError(
                f"target answered AuthMethod={_short(chosen)} although CHAP credentials are "
                "configured; refusing to log in without CHAP"
            )

    def offer(self) -> list[tuple[str, str]]:
        """The CHAP_A list, in our order of preference."""
        self._expect(_State.START, "offer")
        self._state = _State.OFFERED
        return [("CHAP_A", _format_list(self._policy.algorithms))]

    def answer_challenge(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Check the target's CHAP_A/I/C; answer with CHAP_N/CHAP_R (and our own CHAP_I/C)."""
        self._expect(_State.OFFERED, "answer_challenge")
        try:
            return self._answer_challenge(keys)
        except ISCSIError:
            self._state = _State.FAILED
            raise

    def _answer_challenge(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        policy = self._policy
        chosen = _require(keys, "CHAP_A", AuthenticationError)
        if chosen in _REFUSALS:
            raise AuthenticationError(
                f"target supports none of the CHAP algorithms offered "
                f"({_format_list(policy.algorithms)}): CHAP_A={chosen}"
            )
        number = parse_number("CHAP_A", chosen, low=0, high=255)
        if number not in policy.algorithms:
            raise ChapDowngradeError(
                f"target chose CHAP_A={number}, which we did not offer "
                f"({_format_list(policy.algorithms)})"
            )
        algorithm = ChapAlgorithm(number)
        target_identifier = parse_number(
            "CHAP_I", _require(keys, "CHAP_I", AuthenticationError), low=0, high=255
        )
        challenge = parse_binary("CHAP_C", _require(keys, "CHAP_C", AuthenticationError))
        if not challenge:
            raise AuthenticationError("target sent an empty CHAP_C")
        if len(challenge) < policy.min_challenge_length:
            raise AuthenticationError(
                f"target's CHAP_C is {len(challenge)} bytes, shorter than the "
                f"{policy.min_challenge_length} required"
            )
        if len(challenge) > policy.max_challenge_length:
            raise AuthenticationError(
                f"target's CHAP_C is {len(challenge)} bytes, longer than the "
                f"{policy.max_challenge_length} allowed"
            )
        if challenge in self._history:
            raise ChapReflectionError(
                "target sent back a CHAP_C that we issued ourselves (reflection attack)"
            )
        self._algorithm = algorithm
        response = chap_response(algorithm, target_identifier, self._credentials.secret, challenge)
        pairs = [
            ("CHAP_N", self._credentials.username),
            ("CHAP_R", format_binary(response)),
        ]
        if self._target_credentials is None:
            self._state = _State.DONE
            return pairs
        self._my_identifier = _random_identifier(self._identifier, self._token_bytes)
        self._challenge = _random_challenge(
            self._token_bytes,
            policy.own_challenge_length(algorithm),
            self._history,
            avoid=challenge,
        )
        pairs += [
            ("CHAP_I", str(self._my_identifier)),
            ("CHAP_C", format_binary(self._challenge)),
        ]
        self._state = _State.ANSWERED
        return pairs

    def verify_target(self, keys: Mapping[str, str]) -> None:
        """Mutual CHAP: check the target's CHAP_N/CHAP_R answer to our challenge."""
        if self._target_credentials is None:
            raise LocalProtocolError("verify_target is only for mutual CHAP")
        self._expect(_State.ANSWERED, "verify_target")
        try:
            self._verify_target(self._target_credentials, keys)
        except ISCSIError:
            self._state = _State.FAILED
            raise
        self._state = _State.DONE

    def _verify_target(self, target: ChapCredentials, keys: Mapping[str, str]) -> None:
        assert self._algorithm is not None
        assert self._my_identifier is not None
        assert self._challenge is not None
        name = _require(keys, "CHAP_N", TargetAuthenticationError)
        raw_response = _require(keys, "CHAP_R", TargetAuthenticationError)
        if name != target.username:
            raise TargetAuthenticationError(
                f"target answered mutual CHAP as {_short(name)}, expected {target.username!r}"
            )
        response = parse_binary("CHAP_R", raw_response)
        ours = chap_response(
            self._algorithm, self._my_identifier, self._credentials.secret, self._challenge
        )
        if hmac.compare_digest(response, ours):
            raise ChapReflectionError(
                "target's CHAP_R was computed with the initiator's own secret; the two "
                "directions must use different secrets (RFC 7143)"
            )
        expected = chap_response(
            self._algorithm, self._my_identifier, target.secret, self._challenge
        )
        if not hmac.compare_digest(response, expected):
            raise TargetAuthenticationError(
                f"target {target.username!r} gave a wrong CHAP_R to our mutual challenge"
            )

    def _expect(self, state: _State, step: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(
                f"ChapInitiator.{step}() called in state {self._state.value!r}, "
                f"expected {state.value!r}"
            )


class ChapAuthenticator:
    """The target's half of CHAP, small on purpose: the test target layers its faults on top.

    ``accounts`` maps initiator usernames to their secrets; ``mutual`` is what the target
    answers with when the initiator challenges it.
    """

    __slots__ = (
        "_accounts",
        "_algorithm",
        "_algorithms",
        "_authenticated",
        "_challenge",
        "_challenge_length",
        "_identifier",
        "_identifier_source",
        "_mutual",
        "_state",
        "_token_bytes",
    )

    def __init__(
        self,
        accounts: Mapping[str, Secret],
        *,
        mutual: ChapCredentials | None = None,
        algorithms: tuple[ChapAlgorithm, ...] = DEFAULT_ALGORITHMS,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        challenge_length: int | None = None,
        identifier: Callable[[], int] | None = None,
    ) -> None:
        self._accounts: dict[str, Secret] = {}
        for username, secret in accounts.items():
            credentials = _check_credentials(ChapCredentials(username, secret), "initiator")
            self._accounts[username] = credentials.secret
        self._mutual = None if mutual is None else _check_credentials(mutual, "target")
        self._algorithms = tuple(_as_algorithm(a) for a in algorithms)
        if not self._algorithms:
            raise LocalProtocolError("ChapAuthenticator needs at least one algorithm")
        if challenge_length is not None and not 1 <= challenge_length <= MAX_CHALLENGE_LENGTH:
            # Short challenges are allowed here on purpose: the test target uses them as a fault.
            raise LocalProtocolError(
                f"challenge_length must be 1..{MAX_CHALLENGE_LENGTH}, not {challenge_length}"
            )
        self._challenge_length = challenge_length
        self._token_bytes = token_bytes
        self._identifier_source = identifier
        self._state = _State.START
        self._algorithm: ChapAlgorithm | None = None
        self._identifier: int | None = None
        self._challenge: bytes | None = None
        self._authenticated: str | None = None

    def __repr__(self) -> str:
        mutual = None if self._mutual is None else self._mutual.username
        return (
            f"ChapAuthenticator(accounts={sorted(self._accounts)!r}, mutual={mutual!r}, "
            f"state={self._state.value!r})"
        )

    @property
    def algorithm(self) -> ChapAlgorithm | None:
        return self._algorithm

    @property
    def authenticated_username(self) -> str | None:
        """The initiator's CHAP_N once its response checked out."""
        return self._authenticated

    def select_algorithm(self, offer: str) -> list[tuple[str, str]]:
        """Pick the first algorithm in the initiator's CHAP_A list that we support; challenge."""
        self._expect(_State.START, "select_algorithm")
        supported = {int(a) for a in self._algorithms}
        chosen: ChapAlgorithm | None = None
        # Entries we do not understand are skipped, as for any list-valued key.
        for item in offer.split(","):
            if item.isascii() and item.isdigit() and len(item) <= 3 and int(item) in supported:
                chosen = ChapAlgorithm(int(item))
                break
        if chosen is None:
            self._state = _State.FAILED
            raise AuthenticationError(
                f"none of the initiator's CHAP algorithms {_short(offer)} is supported "
                f"({_format_list(self._algorithms)})"
            )
        self._algorithm = chosen
        self._identifier = _random_identifier(self._identifier_source, self._token_bytes)
        length = self._challenge_length or _default_challenge_length(chosen)
        self._challenge = bytes(self._token_bytes(length))
        if len(self._challenge) != length:
            raise LocalProtocolError(
                f"the random source returned {len(self._challenge)} bytes, not {length}"
            )
        self._state = _State.OFFERED
        return [
            ("CHAP_A", str(int(chosen))),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", format_binary(self._challenge)),
        ]

    def check_response(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        """Verify CHAP_N/CHAP_R; answer the initiator's own CHAP_I/CHAP_C if it sent them."""
        self._expect(_State.OFFERED, "check_response")
        try:
            pairs = self._check_response(keys)
        except ISCSIError:
            self._state = _State.FAILED
            raise
        self._state = _State.DONE
        return pairs

    def _check_response(self, keys: Mapping[str, str]) -> list[tuple[str, str]]:
        assert self._algorithm is not None
        assert self._identifier is not None
        assert self._challenge is not None
        name = _require(keys, "CHAP_N", AuthenticationError)
        response = parse_binary("CHAP_R", _require(keys, "CHAP_R", AuthenticationError))
        secret = self._accounts.get(name)
        if secret is None:
            raise AuthenticationError(f"unknown CHAP user {_short(name)}")
        expected = chap_response(self._algorithm, self._identifier, secret, self._challenge)
        if not hmac.compare_digest(response, expected):
            raise AuthenticationError(f"wrong CHAP_R for user {name!r}")
        self._authenticated = name
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        if self._mutual is None:
            raise AuthenticationError(
                "initiator asked for mutual CHAP but the target has no credentials for it"
            )
        identifier = parse_number(
            "CHAP_I", _require(keys, "CHAP_I", AuthenticationError), low=0, high=255
        )
        challenge = parse_binary("CHAP_C", _require(keys, "CHAP_C", AuthenticationError))
        if not challenge:
            raise AuthenticationError("initiator sent an empty CHAP_C")
        if len(challenge) > MAX_CHALLENGE_LENGTH:
            raise AuthenticationError(
                f"initiator's CHAP_C is {len(challenge)} bytes, longer than {MAX_CHALLENGE_LENGTH}"
            )
        if challenge == self._challenge:
            raise ChapReflectionError(
                "initiator sent back the CHAP_C the target issued (reflection attack)"
            )
        answer = chap_response(self._algorithm, identifier, self._mutual.secret, challenge)
        return [("CHAP_N", self._mutual.username), ("CHAP_R", format_binary(answer))]

    def _expect(self, state: _State, step: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(
                f"ChapAuthenticator.{step}() called in state {self._state.value!r}, "
                f"expected {state.value!r}"
            )
