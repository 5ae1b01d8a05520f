"""Model-based test: our initiator against our own test target, wired back to back in memory.

A hypothesis ``RuleBasedStateMachine`` builds a world (targets served on two portals, ACLs, CHAP
one-way or mutual with right or wrong secrets and algorithm lists on both sides, digests, protocol
faults on a portal or on one target) and runs sessions in it: Normal to a known or unknown
target, or Discovery with SendTargets. Both peers are sans-IO, so :class:`Wire` pumps bytes from
one to the other (aioquic's ``roundtrip()``), chunked whole, byte by byte or at generated cuts:
no sockets, no clock, and every run is deterministic and takes milliseconds.

:func:`predict` says, from the world alone, how a run must end: success (LoginSucceeded, the
SendTargets answer when asked, LoggedOut), a refusal event with the status the situation calls
for, or one exact :class:`~pyiscsi_failover.errors.ISCSIError` subclass. Invariants checked after
every step (and, for the cheap ones, after every chunk):

* the initiator's state and the CSG of its Login Requests only move forward; T and C are never
  both set; T=1 always asks for a later stage; ISID and TSIH 0 never change during login;
* CmdSN and ExpStatSN of everything the initiator sends only grow (RFC 1982 serial order), all
  Login Requests carry the same CmdSN, and the first full-feature command reuses it;
* the target never reports a ProtocolViolation of our initiator;
* no secret (text or hex) appears in any byte on the wire, any repr of either machine or of
  anything they hold, any event, any exception (with its causes), or any log record;
* a run ends in exactly one outcome, the predicted one, within a bounded number of round trips.

The timing faults need a clock and sockets; a few trio tests at the end run
:func:`pyiscsi_failover.transport.login` against :func:`serve_target` on loopback for those.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Final, Literal

import pytest
import trio
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import (
    AuthenticationError,
    ChapDowngradeError,
    ChapReflectionError,
    ConnectionLost,
    ISCSIError,
    ISCSITimeout,
    LocalProtocolError,
    NegotiationError,
    PDUDecodeError,
    ProtocolError,
    TargetAuthenticationError,
    TextError,
)
from pyiscsi_failover.initiator import (
    LOGIN_SEGMENT_LIMIT,
    MAX_EMPTY_CONTINUATIONS,
    MAX_LOGIN_ROUNDS,
    NEED_DATA,
    Event,
    InitiatorConnection,
    LoggedOut,
    LoginConfig,
    LoginRedirected,
    LoginRejected,
    LoginSucceeded,
    State,
    TargetsDiscovered,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import ChapAlgorithm, ChapPolicy
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.negotiation import (
    DISCOVERY_KEYS,
    OFFERABLE_KEYS,
    Digest,
    OperationalProposal,
)
from pyiscsi_failover.protocol.pdu import (
    PDU,
    RESERVED_TAG,
    LoginRequest,
    LoginStatus,
    LogoutRequest,
    LogoutResponseCode,
    NopOut,
    TextRequest,
)
from pyiscsi_failover.protocol.sendtargets import DiscoveredTarget
from pyiscsi_failover.testing import serve_target
from pyiscsi_failover.testing.faults import (
    DelayPDUs,
    DowngradeToNone,
    Fault,
    FaultKind,
    GarbageKeyValues,
    MalformedPDU,
    NonUTF8Text,
    OversizedPDU,
    Redirect,
    RedirectLoop,
    ReflectChallenge,
    ResetMidLogin,
    ServiceUnavailable,
    Silent,
    SlowDrip,
    SplitStyle,
    SplitText,
    WrongChapResponse,
    WrongITT,
    WrongOpcode,
    find_fault,
)
from pyiscsi_failover.testing.target import (
    ChallengeReceived,
    ChapSettings,
    LoginFinished,
    PortalConfig,
    ProtocolViolation,
    TargetConfig,
    TargetConnection,
    TargetSpec,
)
from pyiscsi_failover.transport import login

# ---------------------------------------------------------------------------------------------
# The cast: fixed names, portals and recognisable secrets.

INITIATORS: Final = ("iqn.2026-11.test.stateful:ini-a", "iqn.2026-11.test.stateful:ini-b")
TARGETS: Final = tuple(f"iqn.2026-11.test.stateful:disk{i}" for i in range(3))
UNKNOWN_TARGET: Final = "iqn.2026-11.test.stateful:nowhere"
PORTALS: Final = (
    PortalConfig(host="127.0.0.1", port=3260, tpgt=1, name="p0"),
    PortalConfig(host="127.0.0.2", port=3261, tpgt=7, name="p1"),
)
PORTAL_NAMES: Final = tuple(portal.name for portal in PORTALS)
REDIRECT_TO: Final = ("p0", "p1", "[::1]:3262", "127.0.0.9:3263,5", "192.0.2.10")

USER: Final = "stateful-user"
TARGET_USER: Final = "stateful-target"
#: Every secret the machine ever configures: none may leak anywhere.
INI_SECRET: Final = "INI-SECRET-must-not-leak-7f3a"
SHORT_SECRET: Final = "TINY-S3CR"  # under 12 bytes: exercises the short-secret warning
WRONG_SECRET: Final = "WRONG-SECRET-must-not-leak-5d8e"
TGT_SECRET: Final = "TGT-SECRET-must-not-leak-0b9c"
TGT_WRONG_SECRET: Final = "TGT-WRONG-must-not-leak-2468"
ALL_SECRETS: Final = (INI_SECRET, SHORT_SECRET, WRONG_SECRET, TGT_SECRET, TGT_WRONG_SECRET)

#: No run may need more round trips than the initiator's own bounds allow, plus the few of
#: connect, SendTargets and logout; more would be a livelock.
#: Continuations are bounded by bytes (a few hundred here, at least 1 per PDU), not by count.
MAX_ROUNDTRIPS: Final = MAX_LOGIN_ROUNDS + 2 * MAX_EMPTY_CONTINUATIONS + 1024
#: Garbage values that are valid for none of the keys they are put in.
GARBAGE_VALUES: Final = ("banana!", "", "-1", "!!", "\u00e9t\u00e9")
GARBAGE_KEYS: Final = (
    "TargetPortalGroupTag",
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "InitialR2T",
    "DefaultTime2Wait",
    "TargetName",
    "TargetAddress",
)
SERIAL: Final = 1 << 32
#: The test target files these refusals as ProtocolViolation too, though RFC 7143 lets an
#: initiator offer what it likes; the answer (0x0201) is right, the "violation" is not ours.
POLICY_REFUSALS: Final = frozenset(
    {"CHAP not offered", "only authentication offered, none configured", "no common CHAP_A"}
)


def serial_le(a: int, b: int) -> bool:
    """RFC 1982: ``a`` is ``b`` or before it."""
    return (b - a) % SERIAL < SERIAL // 2


# ---------------------------------------------------------------------------------------------
# What the rules generate (test-side model of the world)

ChapChoice = Literal["none", "right", "short", "wrong-secret", "wrong-user"]
MutualChoice = Literal["none", "right", "wrong-secret", "wrong-user", "own-secret"]
AclChoice = Literal["anyone", "a-only", "b-only"]
SessionKind = Literal["discovery", "normal", "unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetChap:
    """CHAP as a target (or discovery) demands it: always an account for USER."""

    account_secret: str  # INI_SECRET or SHORT_SECRET
    mutual_secret: str | None  # TGT_SECRET, or INI_SECRET (misconfigured), or no mutual creds
    algorithms: tuple[ChapAlgorithm, ...]

    def settings(self) -> ChapSettings:
        return ChapSettings(
            accounts=(ChapCredentials(USER, Secret(self.account_secret)),),
            mutual=None
            if self.mutual_secret is None
            else ChapCredentials(TARGET_USER, Secret(self.mutual_secret)),
            algorithms=self.algorithms,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetChoice:
    served_on: tuple[str, ...] | None
    acl: AclChoice
    chap: TargetChap | None
    faults: tuple[Fault, ...]

    def spec(self, name: str) -> TargetSpec:
        allowed = {"anyone": None, "a-only": {INITIATORS[0]}, "b-only": {INITIATORS[1]}}[self.acl]
        return TargetSpec(
            name=name,
            portals=self.served_on,
            allowed_initiators=None if allowed is None else frozenset(allowed),
            chap=ChapSettings() if self.chap is None else self.chap.settings(),
            faults=self.faults,
        )

    def admits(self, initiator: str) -> bool:
        return self.acl == "anyone" or INITIATORS[0 if self.acl == "a-only" else 1] == initiator


@dataclass(frozen=True, slots=True, kw_only=True)
class InitiatorChoice:
    name: str
    chap: ChapChoice
    mutual: MutualChoice
    algorithms: tuple[ChapAlgorithm, ...]
    header_digest: tuple[Digest, ...]
    data_digest: tuple[Digest, ...]

    @property
    def secret(self) -> str | None:
        return {
            "none": None,
            "right": INI_SECRET,
            "short": SHORT_SECRET,
            "wrong-secret": WRONG_SECRET,
            "wrong-user": INI_SECRET,
        }[self.chap]

    def credentials(self) -> tuple[ChapCredentials | None, ChapCredentials | None]:
        secret = self.secret
        if secret is None:
            return None, None
        ours = ChapCredentials(
            "someone-else" if self.chap == "wrong-user" else USER, Secret(secret)
        )
        if self.mutual == "none":
            return ours, None
        name = "another-target" if self.mutual == "wrong-user" else TARGET_USER
        expected = {
            "right": TGT_SECRET,
            "wrong-secret": TGT_WRONG_SECRET,
            "wrong-user": TGT_SECRET,
            "own-secret": secret,
        }[self.mutual]
        return ours, ChapCredentials(name, Secret(expected))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionChoice:
    kind: SessionKind
    target_index: int
    portal_index: int
    #: Normal sessions only: None = no SendTargets, "" = the current target, else an index.
    query: int | str | None
    initial_cmdsn: int
    initial_itt: int
    initial_statsn: int
    tsih: int
    #: Give the initiator the credentials this session's CHAP asks for (else keep its own).
    align: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunking:
    """How bytes cross the wire: all at once (``sizes=()``), or cut at ``sizes``, cycled."""

    sizes: tuple[int, ...] = ()

    def cut(self, data: bytes) -> Iterator[bytes]:
        if not self.sizes:
            yield data
            return
        start, index = 0, 0
        while start < len(data):
            size = self.sizes[index % len(self.sizes)]
            yield data[start : start + size]
            start, index = start + size, index + 1


@dataclass(slots=True, kw_only=True)
class World:
    targets: list[TargetChoice | None]
    discovery_chap: TargetChap | None
    portal_faults: list[tuple[Fault, ...]]
    initiator: InitiatorChoice
    target_digests: tuple[Digest, ...] = (Digest.NONE, Digest.CRC32C)
    to_target: Chunking = field(default_factory=Chunking)
    to_initiator: Chunking = field(default_factory=Chunking)

    def config(self) -> TargetConfig:
        portals = tuple(
            replace(portal, faults=faults)
            for portal, faults in zip(PORTALS, self.portal_faults, strict=True)
        )
        return TargetConfig(
            portals=portals,
            targets=tuple(
                choice.spec(name)
                for name, choice in zip(TARGETS, self.targets, strict=True)
                if choice is not None
            ),
            discovery_chap=ChapSettings()
            if self.discovery_chap is None
            else self.discovery_chap.settings(),
            digests=self.target_digests,
        )

    def login_config(self, session: SessionChoice) -> LoginConfig:
        ours, theirs = self.initiator.credentials()
        return LoginConfig(
            initiator_name=self.initiator.name,
            target_name=None if session.kind == "discovery" else session_target(session),
            chap=ours,
            target_chap=theirs,
            chap_policy=ChapPolicy(algorithms=self.initiator.algorithms),
            proposal=OperationalProposal(
                header_digest=self.initiator.header_digest,
                data_digest=self.initiator.data_digest,
            ),
        )

    def aligned(self, session: SessionChoice) -> World:
        """The world with an initiator holding what this session's CHAP asks for."""
        if session.kind == "discovery":
            chap = self.discovery_chap
        else:
            choice = None if session.kind == "unknown" else self.targets[session.target_index]
            chap = None if choice is None else choice.chap
        ini = self.initiator
        if chap is None:
            return replace(self, initiator=replace(ini, chap="none", mutual="none"))
        # Lead with the target's least preferred algorithm, so its choice is really exercised.
        first = chap.algorithms[-1]
        return replace(
            self,
            initiator=replace(
                ini,
                chap="short" if chap.account_secret == SHORT_SECRET else "right",
                mutual="right" if chap.mutual_secret == TGT_SECRET else "none",
                algorithms=(first, *(a for a in ini.algorithms if a is not first)),
            ),
        )


def session_target(session: SessionChoice) -> str:
    return UNKNOWN_TARGET if session.kind == "unknown" else TARGETS[session.target_index]


# ---------------------------------------------------------------------------------------------
# Strategies

algorithm_lists = st.lists(st.sampled_from(ChapAlgorithm), min_size=1, max_size=4, unique=True).map(
    tuple
)
target_chaps = st.builds(
    TargetChap,
    account_secret=st.sampled_from((INI_SECRET, SHORT_SECRET)),
    mutual_secret=st.sampled_from((None, TGT_SECRET, INI_SECRET)),
    algorithms=algorithm_lists,
)
garbage_faults = st.builds(
    GarbageKeyValues,
    keys=st.lists(st.sampled_from(GARBAGE_KEYS), min_size=1, max_size=2, unique=True).map(tuple),
    value=st.sampled_from(GARBAGE_VALUES),
)
protocol_faults: st.SearchStrategy[Fault] = st.one_of(
    st.just(MalformedPDU()),
    st.builds(
        OversizedPDU,
        length=st.one_of(
            st.integers(LOGIN_SEGMENT_LIMIT + 1, 0xFFFFFF), st.integers(1, LOGIN_SEGMENT_LIMIT)
        ),
    ),
    st.just(WrongOpcode()),
    st.just(WrongITT()),
    st.builds(Redirect, to=st.sampled_from(REDIRECT_TO), permanent=st.booleans()),
    st.builds(RedirectLoop, permanent=st.booleans()),
    st.just(WrongChapResponse()),
    st.builds(
        ReflectChallenge,
        challenge=st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
        initiator_secret=st.booleans(),
    ),
    st.just(DowngradeToNone()),
    garbage_faults,
    st.just(NonUTF8Text()),
    # Not smaller: the initiator counts continuation PDUs against its round limits, so tinier
    # login segments fail (see test_login_response_split_into_small_segments).
    st.builds(
        SplitText,
        chunk=st.integers(24, 600),
        style=st.sampled_from(SplitStyle),
        login=st.just(True),
    ),
    # Text answers are at most ~320 bytes here: 2-byte segments stay well under MAX_ROUNDTRIPS.
    st.builds(
        SplitText,
        chunk=st.one_of(st.integers(2, 16), st.integers(17, 600)),
        style=st.sampled_from(SplitStyle),
        login=st.just(False),
    ),
    st.just(ServiceUnavailable()),
)


def fault_tuples(
    extra: st.SearchStrategy[Fault] | None = None,
) -> st.SearchStrategy[tuple[Fault, ...]]:
    one = protocol_faults if extra is None else st.one_of(protocol_faults, extra)
    return st.lists(one, max_size=2, unique_by=lambda fault: fault.kind).map(tuple)


no_faults: st.SearchStrategy[tuple[Fault, ...]] = st.just(())
# Weighted towards working targets: a fault or a refusal ends a run early, a success covers it all.
target_choices = st.builds(
    TargetChoice,
    served_on=st.one_of(
        st.none(),
        st.none(),
        st.lists(st.sampled_from(PORTAL_NAMES), max_size=2, unique=True).map(tuple),
    ),
    acl=st.sampled_from(("anyone", "anyone", "anyone", "a-only", "b-only")),
    chap=st.one_of(st.none(), target_chaps),
    faults=st.one_of(no_faults, no_faults, fault_tuples()),
)
digest_offers = st.sampled_from(
    (
        (Digest.NONE,),
        (Digest.NONE,),
        (Digest.CRC32C, Digest.NONE),
        (Digest.NONE, Digest.CRC32C),
        (Digest.CRC32C,),
    )
)
initiator_choices = st.builds(
    InitiatorChoice,
    name=st.sampled_from(INITIATORS),
    chap=st.sampled_from(("none", "right", "short", "wrong-secret", "wrong-user")),
    mutual=st.sampled_from(("none", "right", "wrong-secret", "wrong-user", "own-secret")),
    algorithms=algorithm_lists,
    header_digest=digest_offers,
    data_digest=digest_offers,
)
chunkings = st.one_of(
    st.just(Chunking()),
    st.just(Chunking(sizes=(1,))),
    st.lists(st.integers(1, 97), min_size=1, max_size=6).map(lambda s: Chunking(sizes=tuple(s))),
)


_sessions = st.builds(
    SessionChoice,
    kind=st.sampled_from(("normal", "normal", "normal", "normal", "unknown")),
    align=st.sampled_from((True, True, False)),
    target_index=st.integers(0, len(TARGETS) - 1),
    portal_index=st.integers(0, len(PORTALS) - 1),
    query=st.one_of(st.none(), st.just(""), st.integers(0, len(TARGETS) - 1)),
    initial_cmdsn=st.one_of(
        st.just(1), st.integers(0, SERIAL - 1), st.integers(SERIAL - 3, SERIAL - 1)
    ),
    initial_itt=st.one_of(
        st.just(1),
        st.integers(0, RESERVED_TAG - 1),
        st.integers(RESERVED_TAG - 3, RESERVED_TAG - 1),
    ),
    initial_statsn=st.one_of(st.just(0x1000), st.integers(0, SERIAL - 1)),
    tsih=st.integers(1, 0xFFFF),
)

# ---------------------------------------------------------------------------------------------
# The prediction


class Kind(enum.Enum):
    SUCCESS = "success"
    REJECTED = "rejected"
    REDIRECTED = "redirected"
    ERROR = "error"
    #: Both peers idle with the initiator waiting for bytes that never come (the target went
    #: deaf after an oversized-but-acceptable header); the trio layer's deadline ends that.
    STALLED = "stalled"


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    kind: Kind
    why: str
    status: LoginStatus | None = None
    error: type[ISCSIError] | None = None
    redirect: Portal | None = None
    permanent: bool = False
    #: For SUCCESS, and for errors in full feature phase: the login itself succeeded.
    logged_in: bool = False
    auth_method: str | None = None
    header_digest: Digest | None = None
    data_digest: Digest | None = None
    targets: tuple[DiscoveredTarget, ...] | None = None


def _error(error: type[ISCSIError], why: str, *, logged_in: bool = False) -> Expected:
    return Expected(kind=Kind.ERROR, error=error, why=why, logged_in=logged_in)


def _rejected(status: LoginStatus, why: str) -> Expected:
    return Expected(kind=Kind.REJECTED, status=status, why=why)


def _find(faults: list[Fault], kind: FaultKind) -> Fault | None:
    return find_fault(tuple(faults), kind)


def _first_response_fault(faults: list[Fault]) -> Expected | None:
    """What a fault that mangles the target's first Login Response does to us, if any."""
    if _find(faults, FaultKind.MALFORMED_PDU) is not None:
        return _error(PDUDecodeError, "malformed first response")
    oversized = _find(faults, FaultKind.OVERSIZED_PDU)
    if isinstance(oversized, OversizedPDU):
        if oversized.length > LOGIN_SEGMENT_LIMIT:
            return _error(PDUDecodeError, "data segment over the login limit")
        return Expected(kind=Kind.STALLED, why="announced data never comes")
    if _find(faults, FaultKind.WRONG_OPCODE) is not None:
        return _error(ProtocolError, "Text Response during login")
    if _find(faults, FaultKind.WRONG_ITT) is not None:
        return _error(ProtocolError, "Login Response with a foreign ITT")
    return None


def _digest(offer: tuple[Digest, ...], accepted: tuple[Digest, ...]) -> Digest | None:
    """The first of our digests the target accepts; the None default if it accepts none."""
    chosen = next((digest for digest in offer if digest in accepted), None)
    if chosen is None and Digest.NONE in offer:
        return Digest.NONE
    return chosen


def _portal_of(name: str) -> PortalConfig:
    return next(portal for portal in PORTALS if portal.name == name)


def _served(choice: TargetChoice, portal: PortalConfig) -> bool:
    return choice.served_on is None or portal.name in choice.served_on


def _listing(world: World, names: list[tuple[str, TargetChoice]]) -> tuple[DiscoveredTarget, ...]:
    return tuple(
        DiscoveredTarget(
            iqn=name,
            portals=tuple(
                Portal(host=p.host, port=p.port, tpgt=p.tpgt) for p in PORTALS if _served(choice, p)
            ),
        )
        for name, choice in names
    )


def predict(world: World, session: SessionChoice, seen_challenges: list[bytes]) -> Expected:
    """How the run must end, worked out from the world as RFC 7143 and the faults' docs say."""
    ini = world.initiator
    portal = PORTALS[session.portal_index]
    portal_faults = world.portal_faults[session.portal_index]
    if find_fault(portal_faults, FaultKind.RESET_MID_LOGIN) is not None:
        return _error(ConnectionLost, "reset after the first request")
    faults = list(portal_faults)
    status: LoginStatus | None = None
    target: TargetChoice | None = None
    chap: TargetChap | None
    if session.kind == "discovery":
        chap = world.discovery_chap
    else:
        choice = None if session.kind == "unknown" else world.targets[session.target_index]
        if choice is None or not _served(choice, portal):
            status, chap = LoginStatus.TARGET_NOT_FOUND, None
        else:
            target, chap = choice, choice.chap
            faults += choice.faults  # a portal's fault of the same kind wins
    garbage: set[str] = set()
    found = _find(faults, FaultKind.GARBAGE_KEY_VALUES)
    if isinstance(found, GarbageKeyValues):
        garbage = set(found.keys)
    mangled = _first_response_fault(faults)

    redirect = _find(faults, FaultKind.REDIRECT) or _find(faults, FaultKind.REDIRECT_LOOP)
    if status is None:
        if _find(faults, FaultKind.SERVICE_UNAVAILABLE) is not None:
            status = LoginStatus.SERVICE_UNAVAILABLE
        elif isinstance(redirect, Redirect | RedirectLoop):
            if isinstance(redirect, RedirectLoop):
                address = Portal(host=portal.host, port=portal.port, tpgt=portal.tpgt)
            elif redirect.to in PORTAL_NAMES:
                named = _portal_of(redirect.to)
                address = Portal(host=named.host, port=named.port, tpgt=named.tpgt)
            else:
                address = Portal.parse(redirect.to)
            return mangled or Expected(
                kind=Kind.REDIRECTED,
                redirect=address,
                permanent=redirect.permanent,
                why="redirect fault",
            )
        elif target is not None and not target.admits(ini.name):
            status = LoginStatus.AUTHORIZATION_FAILURE
    if status is not None:
        return mangled or _rejected(status, "refused at identification")

    # Stage 0, first answer: which AuthMethod the target settles on.
    ini_chap = ini.chap != "none"
    required = chap is not None
    downgrade = required and _find(faults, FaultKind.DOWNGRADE_TO_NONE) is not None
    if required and not downgrade and not ini_chap:
        return mangled or _rejected(LoginStatus.AUTHENTICATION_FAILURE, "CHAP required")
    if not required and ini_chap:
        return mangled or _rejected(LoginStatus.AUTHENTICATION_FAILURE, "only CHAP offered")
    if mangled:
        return mangled
    if _find(faults, FaultKind.NON_UTF8_TEXT) is not None:
        return _error(TextError, "first response is not UTF-8")
    if "TargetPortalGroupTag" in garbage:
        return _error(ProtocolError, "garbage TargetPortalGroupTag")
    if ini_chap and (downgrade or "AuthMethod" in garbage):
        return _error(ChapDowngradeError, "target did not answer AuthMethod=CHAP")
    if not ini_chap and "AuthMethod" in garbage:
        return _error(ProtocolError, "garbage AuthMethod when only None was offered")

    if ini_chap:
        assert chap is not None
        common = next((a for a in ini.algorithms if a in chap.algorithms), None)
        if common is None:
            return _rejected(LoginStatus.AUTHENTICATION_FAILURE, "no common CHAP_A")
        if garbage & {"CHAP_A", "CHAP_I", "CHAP_C"}:
            return _error(TextError, "garbage in the target's challenge")
        reflect = _find(faults, FaultKind.REFLECT_CHALLENGE)
        if isinstance(reflect, ReflectChallenge) and not reflect.initiator_secret:
            replayed = reflect.challenge
            if replayed is None and seen_challenges:
                # The latest mutual challenge one of our initiators sent: in our history.
                return _error(ChapReflectionError, "our own challenge came back")
            if replayed is not None and len(replayed) < 16:
                return _error(AuthenticationError, "challenge too short")
        if ini.chap == "wrong-user" or ini.secret != chap.account_secret:
            return _rejected(LoginStatus.AUTHENTICATION_FAILURE, "wrong CHAP credentials")
        if ini.mutual != "none":
            if chap.mutual_secret is None:
                return _rejected(LoginStatus.AUTHENTICATION_FAILURE, "target cannot prove itself")
            if "CHAP_N" in garbage or ini.mutual == "wrong-user":
                return _error(TargetAuthenticationError, "target answered under another name")
            if "CHAP_R" in garbage:
                return _error(TextError, "garbage CHAP_R")
            if _find(faults, FaultKind.WRONG_CHAP_RESPONSE) is not None:
                return _error(TargetAuthenticationError, "target's CHAP_R has a flipped bit")
            answered_with = chap.mutual_secret
            if isinstance(reflect, ReflectChallenge) and reflect.initiator_secret:
                answered_with = chap.account_secret
            _, expected_creds = ini.credentials()
            assert expected_creds is not None
            if answered_with == ini.secret:
                return _error(ChapReflectionError, "target answered with our own secret")
            if answered_with != expected_creds.secret.reveal_str():
                return _error(TargetAuthenticationError, "target's secret is not the expected one")

    # Stage 1: one round; every key we offer is answered, and MaxRecvDataSegmentLength declared.
    offered = DISCOVERY_KEYS if session.kind == "discovery" else frozenset(OFFERABLE_KEYS)
    if garbage & (offered | {"MaxRecvDataSegmentLength"}):
        return _error(NegotiationError, "garbage operational answer")
    header = _digest(ini.header_digest, world.target_digests)
    data = _digest(ini.data_digest, world.target_digests)
    if header is None or data is None:
        return _error(NegotiationError, "no acceptable digest")

    targets: tuple[DiscoveredTarget, ...] | None = None
    if session.kind == "discovery":
        listed = [
            (name, choice)
            for name, choice in zip(TARGETS, world.targets, strict=True)
            if choice is not None and choice.admits(ini.name)
        ]
        targets = _listing(world, listed)
    elif isinstance(session.query, int):
        # SendTargets=<iqn>: listed only if that target exists and admits us.
        other = world.targets[session.query]
        admitted = other is not None and other.admits(ini.name)
        targets = (
            _listing(world, [(TARGETS[session.query], other)])
            if admitted and other is not None
            else ()
        )
    elif session.query is not None:
        assert target is not None  # SendTargets= (empty): the target we are logged in to
        targets = _listing(world, [(TARGETS[session.target_index], target)])
    if targets and (
        "TargetName" in garbage or ("TargetAddress" in garbage and any(t.portals for t in targets))
    ):
        return _error(TextError, "garbage in the SendTargets answer", logged_in=True)
    return Expected(
        kind=Kind.SUCCESS,
        why="nothing in the way",
        logged_in=True,
        auth_method="CHAP" if ini_chap else "None",
        header_digest=header,
        data_digest=data,
        targets=targets,
    )


# ---------------------------------------------------------------------------------------------
# The wire between the two machines, and what we observe on it


class Capture(logging.Handler):
    """Keeps every record of the package's loggers, formatted, to search for secrets."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.getMessage()} {record.args!r} {record.exc_text or ''}")


def leaks(text: str) -> list[str]:
    """The secrets found in ``text``, as text or as hex."""
    found = []
    for secret in ALL_SECRETS:
        if secret in text or secret.encode().hex() in text.lower():
            found.append(secret)
    return found


def exception_texts(exc: BaseException) -> list[str]:
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return texts


def machine_reprs(obj: object) -> list[str]:
    """repr of the object and of everything it holds, one level down (slots or __dict__)."""
    texts = [repr(obj)]
    names: list[str] = list(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        names += list(getattr(klass, "__slots__", ()))
    for name in names:
        value = getattr(obj, name, None)
        texts.append(repr(value))
        if isinstance(value, Secret):
            continue  # its one slot is the secret itself, which only reveal() may give
        texts += [
            repr(getattr(value, inner, None)) for inner in getattr(type(value), "__slots__", ())
        ]
    return texts


_STATE_RANK: Final = {
    State.IDLE: 0,
    State.SECURITY_NEGOTIATION: 1,
    State.OPERATIONAL_NEGOTIATION: 2,
    State.FULL_FEATURE: 3,
    State.TEXT_EXCHANGE: 3,  # goes back and forth with FULL_FEATURE: same rank
    State.LOGGING_OUT: 4,
    State.DONE: 5,
    State.FAILED: 5,
}


class Wire:
    """One connection: an initiator and a target connection, bytes pumped between them."""

    def __init__(
        self,
        world: World,
        session: SessionChoice,
        expected: Expected,
        seen_challenges: list[bytes],
    ) -> None:
        self.world = world
        self.session = session
        self.expected = expected
        self.seen_challenges = seen_challenges
        self.config = world.login_config(session)
        self.ini = InitiatorConnection(
            self.config, initial_cmdsn=session.initial_cmdsn, initial_itt=session.initial_itt
        )
        portal = PORTALS[session.portal_index]
        self.tgt = TargetConnection(
            world.config(),
            portal=Portal(host=portal.host, port=portal.port),
            tsih=session.tsih,
            initial_statsn=session.initial_statsn,
            seen_challenges=seen_challenges,
        )
        self.events: list[Event] = []
        self.target_events: list[object] = []
        self.error: ISCSIError | None = None
        self.stalled = False
        self.finished = False
        self.roundtrips = 0
        self.eof_to_initiator = False
        # What the initiator sends, decoded independently.
        self.sent = PDUBuffer(max_data_segment_length=(1 << 24) - 1)
        self.sent_pdus: list[PDU] = []
        self.wire_bytes = bytearray()
        self.rank = 0
        self.ini.start_login()

    # -- pumping ---------------------------------------------------------------------------

    @property
    def outcome_known(self) -> bool:
        if self.error is not None or self.stalled:
            return True
        return bool(self.events) and isinstance(
            self.events[-1], LoggedOut | LoginRejected | LoginRedirected
        )

    def roundtrip(self) -> None:
        """One exchange: the initiator's bytes to the target, then the target's back (and its
        EOF once it closed). :meth:`finish` repeats this until the run has its outcome."""
        assert not self.outcome_known
        self.roundtrips += 1
        assert self.roundtrips <= MAX_ROUNDTRIPS, "no end in sight: a livelock"
        moved = False
        out = self.ini.data_to_send()
        if out:
            moved = True
            self.observe_initiator(out)
            for chunk in self.world.to_target.cut(out):
                self.tgt.receive_data(chunk)
        self.collect_target_events()
        back = self.tgt.data_to_send()
        self.wire_bytes += back
        if back:
            moved = True
            for chunk in self.world.to_initiator.cut(back):
                if not self.deliver(chunk):
                    return
        if self.tgt.closed and not self.eof_to_initiator:
            self.eof_to_initiator = True
            moved = True
            if not self.deliver(b""):
                return
        if not moved and not self.outcome_known:
            # Nothing crossed either way, so nothing new can happen: only a deadline helps.
            self.stalled = True

    def deliver(self, chunk: bytes) -> bool:
        """Feed the initiator and handle its events; False once it failed."""
        try:
            self.ini.receive_data(chunk)
            self.drain()
        except LocalProtocolError:
            raise  # our own command failed: a bug in the initiator, never a run's outcome
        except ISCSIError as exc:
            self.error = exc
            return False
        self.check_progress()
        return True

    def drain(self) -> None:
        while (event := self.ini.next_event()) is not NEED_DATA:
            assert not self.outcome_known, f"{event!r} after the run ended"
            self.events.append(event)
            self.react(event)

    def react(self, event: Event) -> None:
        match event:
            case LoginSucceeded():
                # From now on the initiator's PDUs carry the negotiated digests.
                self.sent.header_digest = event.parameters.header_digest is Digest.CRC32C
                self.sent.data_digest = event.parameters.data_digest is Digest.CRC32C
                query = self.query()
                if self.session.kind != "discovery":
                    with pytest.raises(LocalProtocolError):
                        self.ini.send_targets("All")
                    assert self.ini.state is State.FULL_FEATURE
                if query is None:
                    self.ini.logout()
                else:
                    self.ini.send_targets(query)
            case TargetsDiscovered():
                self.ini.logout()
            case LoggedOut() | LoginRejected() | LoginRedirected():
                pass

    def query(self) -> str | None:
        if self.session.kind == "discovery":
            return "All"
        query = self.session.query
        return TARGETS[query] if isinstance(query, int) else query

    def collect_target_events(self) -> None:
        while (event := self.tgt.next_event()) is not None:
            self.target_events.append(event)
            if isinstance(event, ChallengeReceived):
                self.seen_challenges.append(event.challenge)
            if isinstance(event, ProtocolViolation):
                assert event.description in POLICY_REFUSALS, event.description

    # -- observing what the initiator sends --------------------------------------------------

    def observe_initiator(self, data: bytes) -> None:
        self.wire_bytes += data
        self.sent.feed(data)
        while (pdu := self.sent.next_pdu()) is not None:
            self.check_sent(pdu)
            self.sent_pdus.append(pdu)

    def check_sent(self, pdu: PDU) -> None:
        previous = [p for p in self.sent_pdus if _sequenced(p)]
        if not _sequenced(pdu):
            return
        assert isinstance(pdu, LoginRequest | TextRequest | LogoutRequest | NopOut)
        if previous:
            last = previous[-1]
            assert isinstance(last, LoginRequest | TextRequest | LogoutRequest | NopOut)
            assert serial_le(last.cmdsn, pdu.cmdsn), (last.cmdsn, pdu.cmdsn)
            # The first Login Request's ExpStatSN means nothing (RFC 7143 11.12.8): no StatSN
            # has been seen yet. From the second PDU on it acknowledges what came back.
            if len(previous) > 1:
                assert serial_le(last.expstatsn, pdu.expstatsn), (last.expstatsn, pdu.expstatsn)
        logins = [p for p in previous if isinstance(p, LoginRequest)]
        if isinstance(pdu, LoginRequest):
            assert not (pdu.transit and pdu.cont)
            assert not pdu.transit or pdu.nsg > pdu.csg
            assert pdu.isid == self.config.isid
            assert pdu.tsih == 0
            assert pdu.itt != RESERVED_TAG
            assert pdu.cmdsn == self.session.initial_cmdsn
            if logins:
                assert logins[-1].csg <= pdu.csg, "login went back a stage"
        elif isinstance(pdu, TextRequest | LogoutRequest):
            assert pdu.itt != RESERVED_TAG
            fresh = [p for p in previous if not isinstance(p, LoginRequest)]
            if not fresh:
                # RFC 7143 4.2: the first command after login reuses the login's CmdSN.
                assert pdu.cmdsn == self.session.initial_cmdsn

    def check_progress(self) -> None:
        rank = _STATE_RANK[self.ini.state]
        assert rank >= self.rank, f"initiator went back to {self.ini.state}"
        self.rank = rank

    # -- the end ---------------------------------------------------------------------------

    def finish(self) -> None:
        """Pump to the end, close the connection and check the outcome against the prediction."""
        while not self.outcome_known:
            self.roundtrip()
        # The initiator hangs up; the target must take that quietly.
        self.tgt.receive_data(b"")
        self.collect_target_events()
        self.finished = True
        self.check_outcome()

    def check_outcome(self) -> None:
        expected = self.expected
        described = f"expected {expected.kind.value} ({expected.why}): {expected}"
        if self.error is not None:
            assert expected.kind is Kind.ERROR, f"{described}, got {self.error!r}"
            assert type(self.error) is expected.error, f"{described}, got {self.error!r}"
            assert self.ini.state is State.FAILED
            logged_in = bool(self.events) and isinstance(self.events[0], LoginSucceeded)
            assert logged_in == expected.logged_in, f"{described}, events {self.events}"
            return
        if self.stalled:
            assert expected.kind is Kind.STALLED, f"{described}, but the run stalled"
            assert not self.events
            assert self.ini.state is State.SECURITY_NEGOTIATION
            return
        last = self.events[-1]
        assert self.ini.state is State.DONE
        # Exactly one outcome: nothing more to read, nothing more to send.
        assert self.ini.next_event() is NEED_DATA
        assert self.ini.data_to_send() == b""
        finished = [e for e in self.target_events if isinstance(e, LoginFinished)]
        assert len(finished) == 1, self.target_events
        match last:
            case LoginRejected():
                assert expected.kind is Kind.REJECTED, f"{described}, got {last}"
                assert last.status is expected.status, f"{described}, got {last}"
                assert finished[0].status is expected.status
                assert len(self.events) == 1
            case LoginRedirected():
                assert expected.kind is Kind.REDIRECTED, f"{described}, got {last}"
                assert last.address == expected.redirect
                assert last.permanent == expected.permanent
                assert len(self.events) == 1
                assert finished[0].status is (
                    LoginStatus.TARGET_MOVED_PERMANENTLY
                    if expected.permanent
                    else LoginStatus.TARGET_MOVED_TEMPORARILY
                )
            case LoggedOut():
                assert expected.kind is Kind.SUCCESS, f"{described}, got {self.events}"
                self.check_success(last, finished[0])
            case _:
                pytest.fail(f"{described}, but the run ended on {last!r}")

    def check_success(self, last: LoggedOut, finished: LoginFinished) -> None:
        expected = self.expected
        succeeded = self.events[0]
        assert isinstance(succeeded, LoginSucceeded)
        portal = PORTALS[self.session.portal_index]
        assert succeeded.auth_method == expected.auth_method
        assert succeeded.target_portal_group_tag == portal.tpgt
        assert succeeded.tsih == self.session.tsih == finished.tsih
        assert succeeded.parameters.header_digest is expected.header_digest
        assert succeeded.parameters.data_digest is expected.data_digest
        assert finished.status is LoginStatus.SUCCESS
        assert finished.initiator_name == self.world.initiator.name
        if expected.targets is None:
            assert len(self.events) == 2
        else:
            assert len(self.events) == 3
            discovered = self.events[1]
            assert isinstance(discovered, TargetsDiscovered)
            assert discovered.targets == expected.targets
        assert last.response is LogoutResponseCode.CLOSED

    # -- secrets ---------------------------------------------------------------------------

    def texts(self) -> list[str]:
        texts = machine_reprs(self.ini) + machine_reprs(self.tgt)
        texts += [repr(self.config), repr(self.world.config())]
        texts += [repr(e) for e in self.events] + [repr(e) for e in self.target_events]
        texts.append(self.wire_bytes.hex())
        texts.append(bytes(self.wire_bytes).decode("latin-1"))
        if self.error is not None:
            texts += exception_texts(self.error)
        return texts


def _sequenced(pdu: PDU) -> bool:
    return isinstance(pdu, LoginRequest | TextRequest | LogoutRequest | NopOut)


# ---------------------------------------------------------------------------------------------
# The state machine


class LoginMachine(RuleBasedStateMachine):
    """Configures a world between runs, runs sessions in it step by step, checks as it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.wire: Wire | None = None
        self.seen_challenges: list[bytes] = []
        #: Set while a check runs; still set in teardown means it failed, and teardown must not
        #: pile a second failure on top of the first.
        self.failing = False
        self.capture = Capture()
        self.logger = logging.getLogger("pyiscsi_failover")
        self.old_level = self.logger.level
        self.logger.addHandler(self.capture)
        self.logger.setLevel(logging.DEBUG)

    def teardown(self) -> None:
        try:
            if self.wire is not None and not self.wire.finished and not self.failing:
                self.end_run()  # the example's last run: it is checked like every other
        finally:
            self.logger.removeHandler(self.capture)
            self.logger.setLevel(self.old_level)

    @property
    def idle(self) -> bool:
        return self.wire is None

    @property
    def running(self) -> bool:
        return self.wire is not None

    # -- configuration, between runs --------------------------------------------------------

    @initialize(
        served=st.lists(
            st.one_of(st.none(), target_choices, target_choices), min_size=3, max_size=3
        ),
        discovery_chap=st.one_of(st.none(), st.none(), target_chaps),
        portal_faults=st.lists(
            st.one_of(no_faults, no_faults, no_faults, fault_tuples(st.just(ResetMidLogin()))),
            min_size=2,
            max_size=2,
        ),
        initiator=initiator_choices,
        target_digests=st.sampled_from(
            ((Digest.NONE, Digest.CRC32C), (Digest.NONE, Digest.CRC32C), (Digest.NONE,))
        ),
        to_target=chunkings,
        to_initiator=chunkings,
    )
    def build_world(
        self,
        served: list[TargetChoice | None],
        discovery_chap: TargetChap | None,
        portal_faults: list[tuple[Fault, ...]],
        initiator: InitiatorChoice,
        target_digests: tuple[Digest, ...],
        to_target: Chunking,
        to_initiator: Chunking,
    ) -> None:
        self.world = World(
            targets=served,
            discovery_chap=discovery_chap,
            portal_faults=portal_faults,
            initiator=initiator,
            target_digests=target_digests,
            to_target=to_target,
            to_initiator=to_initiator,
        )

    @precondition(lambda self: self.idle)
    @rule(index=st.integers(0, len(TARGETS) - 1), choice=st.one_of(st.none(), target_choices))
    def reconfigure_target(self, index: int, choice: TargetChoice | None) -> None:
        assert self.world is not None
        self.world.targets[index] = choice

    @precondition(lambda self: self.idle)
    @rule(chap=st.one_of(st.none(), target_chaps))
    def reconfigure_discovery_chap(self, chap: TargetChap | None) -> None:
        assert self.world is not None
        self.world.discovery_chap = chap

    @precondition(lambda self: self.idle)
    @rule(index=st.integers(0, len(PORTALS) - 1), faults=fault_tuples(st.just(ResetMidLogin())))
    def reconfigure_portal(self, index: int, faults: tuple[Fault, ...]) -> None:
        assert self.world is not None
        self.world.portal_faults[index] = faults

    @precondition(lambda self: self.idle)
    @rule(initiator=initiator_choices)
    def reconfigure_initiator(self, initiator: InitiatorChoice) -> None:
        assert self.world is not None
        self.world.initiator = initiator

    @precondition(lambda self: self.idle)
    @rule(to_target=chunkings, to_initiator=chunkings)
    def rechunk(self, to_target: Chunking, to_initiator: Chunking) -> None:
        assert self.world is not None
        self.world.to_target, self.world.to_initiator = to_target, to_initiator

    # -- runs ------------------------------------------------------------------------------

    @precondition(lambda self: self.idle)
    @rule(session=_sessions.map(lambda session: replace(session, kind="discovery")))
    def start_discovery(self, session: SessionChoice) -> None:
        self.start(session)

    @precondition(lambda self: self.idle)
    @rule(session=_sessions)
    def start_normal(self, session: SessionChoice) -> None:
        """A Normal session, to a configured target or (now and then) an unknown one."""
        self.start(session)

    def start(self, session: SessionChoice) -> None:
        assert self.world is not None
        # A snapshot: the rules may change self.world only once this run is over.
        world = replace(
            self.world,
            targets=list(self.world.targets),
            portal_faults=list(self.world.portal_faults),
        )
        if session.align:
            world = world.aligned(session)
        expected = predict(world, session, self.seen_challenges)
        self.wire = Wire(world, session, expected, self.seen_challenges)

    @precondition(lambda self: self.running)
    @rule(count=st.integers(1, 4))
    def step(self, count: int) -> None:
        wire = self.wire
        assert wire is not None
        with self.guarded():
            for _ in range(count):
                if wire.outcome_known:
                    break
                wire.roundtrip()
        if wire.outcome_known:
            self.end_run()

    @precondition(lambda self: self.running)
    @rule()
    def run_to_the_end(self) -> None:
        self.end_run()

    @precondition(lambda self: self.running)
    @rule(method=st.sampled_from(("start_login", "send_targets", "logout")))
    def misuse(self, method: str) -> None:
        """Commands in the wrong state are our caller's mistake: refused, nothing changes."""
        wire = self.wire
        assert wire is not None
        # step() ends a run the moment its outcome is known, and Wire.react answers
        # LoginSucceeded and TargetsDiscovered at once: between rules no command is in turn.
        assert not wire.outcome_known
        before = wire.ini.state
        assert before not in (State.IDLE, State.FULL_FEATURE, State.DONE, State.FAILED), before
        with self.guarded(), pytest.raises(LocalProtocolError):
            getattr(wire.ini, method)()
        assert wire.ini.state is before

    def end_run(self) -> None:
        wire = self.wire
        assert wire is not None
        with self.guarded():
            wire.finish()
            self.check_secrets()
        event(f"run: {wire.expected.kind.value}: {wire.expected.why}")
        self.wire = None

    @contextmanager
    def guarded(self) -> Iterator[None]:
        self.failing = True
        yield
        self.failing = False

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def state_only_moves_forward(self) -> None:
        if self.wire is not None:
            with self.guarded():
                self.wire.check_progress()

    @invariant()
    def no_secret_anywhere(self) -> None:
        with self.guarded():
            self.check_secrets()

    def check_secrets(self) -> None:
        texts = list(self.capture.lines)
        if self.wire is not None:
            texts += self.wire.texts()
        for text in texts:
            assert not leaks(text), f"secret {leaks(text)} in {text[:200]!r}"


LoginMachine.TestCase.settings = settings(
    max_examples=200,
    report_multiple_bugs=False,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestLoginMachine = LoginMachine.TestCase


# ---------------------------------------------------------------------------------------------
# Named scenarios: the outcomes the model must give, written out by hand, through the same wire.

ALL_ALGORITHMS: Final = tuple(ChapAlgorithm)
PLAIN: Final = TargetChoice(served_on=None, acl="anyone", chap=None, faults=())
ONE_WAY: Final = TargetChap(
    account_secret=INI_SECRET, mutual_secret=None, algorithms=ALL_ALGORITHMS
)
MUTUAL: Final = replace(ONE_WAY, mutual_secret=TGT_SECRET)
NO_CHAP_INITIATOR: Final = InitiatorChoice(
    name=INITIATORS[0],
    chap="none",
    mutual="none",
    algorithms=ALL_ALGORITHMS,
    header_digest=(Digest.NONE,),
    data_digest=(Digest.NONE,),
)
CHAP_INITIATOR: Final = replace(NO_CHAP_INITIATOR, chap="right")
MUTUAL_INITIATOR: Final = replace(CHAP_INITIATOR, mutual="right")


def scenario_world(
    target: TargetChoice = PLAIN,
    *,
    initiator: InitiatorChoice = NO_CHAP_INITIATOR,
    discovery_chap: TargetChap | None = None,
    portal_faults: tuple[Fault, ...] = (),
    target_digests: tuple[Digest, ...] = (Digest.NONE, Digest.CRC32C),
) -> World:
    return World(
        targets=[target, replace(PLAIN, acl="b-only"), None],
        discovery_chap=discovery_chap,
        portal_faults=[portal_faults, ()],
        initiator=initiator,
        target_digests=target_digests,
    )


def scenario_session(kind: SessionKind = "normal", **changes: object) -> SessionChoice:
    base = SessionChoice(
        kind=kind,
        target_index=0,
        portal_index=0,
        query=None,
        initial_cmdsn=1,
        initial_itt=1,
        initial_statsn=0x1000,
        tsih=0x1234,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def chap_target(chap: TargetChap, *faults: Fault) -> TargetChoice:
    return replace(PLAIN, chap=chap, faults=faults)


def faulty(*faults: Fault) -> TargetChoice:
    return replace(PLAIN, faults=faults)


Outcome = tuple[Kind, LoginStatus | type[ISCSIError] | None]
SUCCESS: Final[Outcome] = (Kind.SUCCESS, None)
AUTH_FAILURE: Final[Outcome] = (Kind.REJECTED, LoginStatus.AUTHENTICATION_FAILURE)


def refused(status: LoginStatus) -> Outcome:
    return (Kind.REJECTED, status)


def fails(error: type[ISCSIError]) -> Outcome:
    return (Kind.ERROR, error)


SCENARIOS: Final = [
    pytest.param(scenario_world(), scenario_session(), SUCCESS, id="no-auth"),
    pytest.param(scenario_world(), scenario_session("discovery"), SUCCESS, id="discovery"),
    pytest.param(scenario_world(), scenario_session(query=""), SUCCESS, id="sendtargets-current"),
    pytest.param(scenario_world(), scenario_session(query=1), SUCCESS, id="sendtargets-acl"),
    pytest.param(
        scenario_world(chap_target(ONE_WAY), initiator=CHAP_INITIATOR),
        scenario_session(),
        SUCCESS,
        id="chap-one-way",
    ),
    pytest.param(
        scenario_world(chap_target(MUTUAL), initiator=MUTUAL_INITIATOR),
        scenario_session(query=""),
        SUCCESS,
        id="chap-mutual",
    ),
    pytest.param(
        scenario_world(initiator=CHAP_INITIATOR, discovery_chap=ONE_WAY),
        scenario_session("discovery"),
        SUCCESS,
        id="discovery-chap",
    ),
    pytest.param(
        scenario_world(
            chap_target(replace(ONE_WAY, algorithms=(ChapAlgorithm.SHA3_256, ChapAlgorithm.SHA1))),
            initiator=CHAP_INITIATOR,
        ),
        scenario_session(),
        SUCCESS,
        id="chap-first-common-algorithm",
    ),
    pytest.param(
        scenario_world(
            initiator=replace(
                NO_CHAP_INITIATOR,
                header_digest=(Digest.CRC32C,),
                data_digest=(Digest.CRC32C, Digest.NONE),
            )
        ),
        scenario_session(query=""),
        SUCCESS,
        id="crc32c-digests",
    ),
    pytest.param(
        scenario_world(
            initiator=replace(NO_CHAP_INITIATOR, header_digest=(Digest.CRC32C,)),
            target_digests=(Digest.NONE,),
        ),
        scenario_session(),
        fails(NegotiationError),
        id="no-acceptable-digest",
    ),
    pytest.param(
        scenario_world(
            chap_target(ONE_WAY), initiator=replace(CHAP_INITIATOR, chap="wrong-secret")
        ),
        scenario_session(),
        AUTH_FAILURE,
        id="chap-wrong-secret",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY), initiator=replace(CHAP_INITIATOR, chap="wrong-user")),
        scenario_session(),
        AUTH_FAILURE,
        id="chap-wrong-user",
    ),
    pytest.param(
        scenario_world(
            chap_target(replace(ONE_WAY, algorithms=(ChapAlgorithm.SHA256,))),
            initiator=replace(CHAP_INITIATOR, algorithms=(ChapAlgorithm.MD5,)),
        ),
        scenario_session(),
        AUTH_FAILURE,
        id="chap-no-common-algorithm",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY)), scenario_session(), AUTH_FAILURE, id="chap-required"
    ),
    pytest.param(
        scenario_world(initiator=CHAP_INITIATOR),
        scenario_session(),
        AUTH_FAILURE,
        id="chap-unknown",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY), initiator=MUTUAL_INITIATOR),
        scenario_session(),
        AUTH_FAILURE,
        id="mutual-target-has-no-credentials",
    ),
    pytest.param(
        scenario_world(
            chap_target(MUTUAL), initiator=replace(MUTUAL_INITIATOR, mutual="wrong-secret")
        ),
        scenario_session(),
        fails(TargetAuthenticationError),
        id="mutual-wrong-target-secret",
    ),
    pytest.param(
        scenario_world(
            chap_target(MUTUAL), initiator=replace(MUTUAL_INITIATOR, mutual="wrong-user")
        ),
        scenario_session(),
        fails(TargetAuthenticationError),
        id="mutual-wrong-target-name",
    ),
    pytest.param(
        scenario_world(
            chap_target(replace(MUTUAL, mutual_secret=INI_SECRET)),
            initiator=replace(MUTUAL_INITIATOR, mutual="own-secret"),
        ),
        scenario_session(),
        fails(ChapReflectionError),
        id="mutual-same-secret-both-ways",
    ),
    pytest.param(
        scenario_world(replace(PLAIN, acl="b-only")),
        scenario_session(),
        refused(LoginStatus.AUTHORIZATION_FAILURE),
        id="acl",
    ),
    pytest.param(
        scenario_world(),
        scenario_session("unknown"),
        refused(LoginStatus.TARGET_NOT_FOUND),
        id="unknown-target",
    ),
    pytest.param(
        scenario_world(replace(PLAIN, served_on=("p1",))),
        scenario_session(),
        refused(LoginStatus.TARGET_NOT_FOUND),
        id="not-on-this-portal",
    ),
    pytest.param(
        scenario_world(faulty(ServiceUnavailable())),
        scenario_session(),
        refused(LoginStatus.SERVICE_UNAVAILABLE),
        id="service-unavailable",
    ),
    pytest.param(
        scenario_world(faulty(Redirect(to="p1"))),
        scenario_session(),
        (Kind.REDIRECTED, None),
        id="redirect-temporary",
    ),
    pytest.param(
        scenario_world(portal_faults=(Redirect(to="[::1]:3262", permanent=True),)),
        scenario_session("discovery"),
        (Kind.REDIRECTED, None),
        id="redirect-permanent",
    ),
    pytest.param(
        scenario_world(faulty(RedirectLoop())),
        scenario_session(),
        (Kind.REDIRECTED, None),
        id="redirect-loop",
    ),
    pytest.param(
        scenario_world(faulty(MalformedPDU())),
        scenario_session(),
        fails(PDUDecodeError),
        id="malformed",
    ),
    pytest.param(
        scenario_world(faulty(OversizedPDU())),
        scenario_session(),
        fails(PDUDecodeError),
        id="oversized",
    ),
    pytest.param(
        scenario_world(faulty(OversizedPDU(length=LOGIN_SEGMENT_LIMIT))),
        scenario_session(),
        (Kind.STALLED, None),
        id="oversized-within-limit",
    ),
    pytest.param(
        scenario_world(faulty(WrongOpcode())),
        scenario_session(),
        fails(ProtocolError),
        id="wrong-opcode",
    ),
    pytest.param(
        scenario_world(faulty(WrongITT())), scenario_session(), fails(ProtocolError), id="wrong-itt"
    ),
    pytest.param(
        scenario_world(faulty(NonUTF8Text())),
        scenario_session(),
        fails(TextError),
        id="non-utf8",
    ),
    pytest.param(
        scenario_world(faulty(GarbageKeyValues())),
        scenario_session(),
        fails(NegotiationError),
        id="garbage-mrdsl",
    ),
    pytest.param(
        scenario_world(faulty(GarbageKeyValues(keys=("TargetPortalGroupTag",)))),
        scenario_session(),
        fails(ProtocolError),
        id="garbage-tpgt",
    ),
    pytest.param(
        scenario_world(
            chap_target(ONE_WAY, GarbageKeyValues(keys=("CHAP_C",))), initiator=CHAP_INITIATOR
        ),
        scenario_session(),
        fails(TextError),
        id="garbage-chap-c",
    ),
    pytest.param(
        scenario_world(portal_faults=(GarbageKeyValues(keys=("TargetAddress",), value="!!"),)),
        scenario_session("discovery"),
        fails(TextError),
        id="garbage-sendtargets",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY, DowngradeToNone()), initiator=CHAP_INITIATOR),
        scenario_session(),
        fails(ChapDowngradeError),
        id="downgrade",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY, DowngradeToNone())),
        scenario_session(),
        SUCCESS,
        id="downgrade-without-credentials",
    ),
    pytest.param(
        scenario_world(chap_target(MUTUAL, WrongChapResponse()), initiator=MUTUAL_INITIATOR),
        scenario_session(),
        fails(TargetAuthenticationError),
        id="wrong-chap-response",
    ),
    pytest.param(
        scenario_world(chap_target(ONE_WAY, WrongChapResponse()), initiator=CHAP_INITIATOR),
        scenario_session(),
        SUCCESS,
        id="wrong-chap-response-one-way",
    ),
    pytest.param(
        scenario_world(
            chap_target(MUTUAL, ReflectChallenge(initiator_secret=True)),
            initiator=MUTUAL_INITIATOR,
        ),
        scenario_session(),
        fails(ChapReflectionError),
        id="reflect-initiator-secret",
    ),
    pytest.param(
        scenario_world(
            chap_target(ONE_WAY, ReflectChallenge(challenge=b"\x01" * 8)), initiator=CHAP_INITIATOR
        ),
        scenario_session(),
        fails(AuthenticationError),
        id="short-challenge",
    ),
    pytest.param(
        scenario_world(
            initiator=CHAP_INITIATOR,
            discovery_chap=ONE_WAY,
            portal_faults=(SplitText(chunk=24, style=SplitStyle.CONTINUE, login=True),),
        ),
        scenario_session("discovery"),
        SUCCESS,
        id="split-login-and-text",
    ),
    pytest.param(
        scenario_world(portal_faults=(SplitText(chunk=5, style=SplitStyle.TGT),)),
        scenario_session("discovery"),
        SUCCESS,
        id="split-text-tgt-style",
    ),
    pytest.param(
        scenario_world(portal_faults=(ResetMidLogin(),)),
        scenario_session(),
        fails(ConnectionLost),
        id="reset",
    ),
]


def test_leak_detector_sees_secrets_as_text_and_hex() -> None:
    assert leaks(f"x{TGT_SECRET}y") == [TGT_SECRET]
    assert leaks("0x" + SHORT_SECRET.encode().hex().upper()) == [SHORT_SECRET]
    assert not leaks(repr(ChapCredentials(USER, Secret(INI_SECRET))))
    assert not any(leaks(text) for text in machine_reprs(ChapCredentials(USER, Secret(INI_SECRET))))


@pytest.mark.parametrize(
    "chunking", [Chunking(), Chunking(sizes=(1,)), Chunking(sizes=(7, 1, 48))], ids=str
)
@pytest.mark.parametrize(("world", "session", "outcome"), SCENARIOS)
def test_scenario_ends_as_stated(
    world: World, session: SessionChoice, outcome: Outcome, chunking: Chunking
) -> None:
    world = replace(world, to_target=chunking, to_initiator=chunking)
    expected = predict(world, session, [])
    kind, detail = outcome
    assert expected.kind is kind, expected
    assert detail in (None, expected.status, expected.error), expected
    wire = Wire(world, session, expected, [])
    wire.finish()
    assert not any(leaks(text) for text in wire.texts())


def test_reflected_challenge_from_an_earlier_login_is_refused() -> None:
    """A target replays the mutual challenge our initiator sent it in an earlier session."""
    seen: list[bytes] = []
    honest = scenario_world(chap_target(MUTUAL), initiator=MUTUAL_INITIATOR)
    first = Wire(honest, scenario_session(), predict(honest, scenario_session(), seen), seen)
    first.finish()
    assert first.expected.kind is Kind.SUCCESS
    assert len(seen) == 1
    rogue = scenario_world(chap_target(MUTUAL, ReflectChallenge()), initiator=MUTUAL_INITIATOR)
    expected = predict(rogue, scenario_session(), seen)
    assert expected.error is ChapReflectionError
    second = Wire(rogue, scenario_session(), expected, seen)
    second.finish()


# ---------------------------------------------------------------------------------------------
# Regressions: bugs this machine found in the initiator, fixed


def test_cmdsn_wraps_at_2_32() -> None:
    world, session = scenario_world(), scenario_session("discovery", initial_cmdsn=0xFFFFFFFF)
    wire = Wire(world, session, predict(world, session, []), [])
    wire.finish()
    # The login and the first command share CmdSN 2**32-1; the logout after it wraps to 0
    # (RFC 1982 serial arithmetic).
    sent = [
        (type(pdu), pdu.cmdsn)
        for pdu in wire.sent_pdus
        if isinstance(pdu, LoginRequest | TextRequest | LogoutRequest | NopOut)
    ]
    assert sent[-2:] == [(TextRequest, 0xFFFFFFFF), (LogoutRequest, 0)]
    assert {cmdsn for kind, cmdsn in sent if kind is LoginRequest} == {0xFFFFFFFF}


def test_reserved_initial_itt_is_refused_up_front() -> None:
    config = LoginConfig(initiator_name=INITIATORS[0], target_name=TARGETS[0])
    with pytest.raises(LocalProtocolError, match="0xffffffff is reserved"):
        InitiatorConnection(config, initial_itt=RESERVED_TAG)


def test_task_tags_wrap_past_the_reserved_tag() -> None:
    """The highest legal tag is used, and the next one is 0, never 0xffffffff."""
    world = scenario_world()
    session = scenario_session("discovery", initial_itt=RESERVED_TAG - 1)
    wire = Wire(world, session, predict(world, session, []), [])
    wire.finish()
    tags = [pdu.itt for pdu in wire.sent_pdus if isinstance(pdu, LoginRequest)]
    assert set(tags) == {RESERVED_TAG - 1}
    later = [pdu.itt for pdu in wire.sent_pdus if isinstance(pdu, TextRequest | LogoutRequest)]
    assert later == [0, 1]


def test_login_response_split_into_small_segments() -> None:
    world = scenario_world(
        chap_target(MUTUAL, SplitText(chunk=8, login=True)), initiator=MUTUAL_INITIATOR
    )
    session = scenario_session()
    expected = predict(world, session, [])
    assert expected.kind is Kind.SUCCESS
    Wire(world, session, expected, []).finish()


# ---------------------------------------------------------------------------------------------
# Timing faults over real loopback sockets

DEADLINE: Final = 0.3
#: How late after its deadline a typed error may come (scheduling slack on a busy machine).
SLACK: Final = 0.7


async def _login_against(fault: Fault) -> tuple[ISCSIError, float, bool]:
    """Log in at a portal with ``fault``; the error, how long it took, and whether it reset."""
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, faults=(fault,)),),
        targets=(TargetSpec(name=TARGETS[0]),),
    )
    login_config = LoginConfig(initiator_name=INITIATORS[0], target_name=TARGETS[0])
    with trio.fail_after(DEADLINE + SLACK + 2.0):
        async with serve_target(config) as running:
            started = trio.current_time()
            with pytest.raises(ISCSIError) as caught:
                await login(
                    running.portals[0],
                    login_config,
                    connect_timeout=DEADLINE,
                    login_timeout=DEADLINE,
                )
            elapsed = trio.current_time() - started
            await running.wait_idle()  # our side closed its socket on the error path
            assert not running.lingering_sessions
            reset = any(record.reset for record in running.connections)
    return caught.value, elapsed, reset


@pytest.mark.parametrize(
    "fault",
    [Silent(), DelayPDUs(seconds=DEADLINE * 2), SlowDrip(interval=0.05)],
    ids=["silent", "delay", "slow-drip"],
)
async def test_timing_faults_end_in_a_timeout_at_the_deadline(fault: Fault) -> None:
    error, elapsed, reset = await _login_against(fault)
    assert type(error) is ISCSITimeout, repr(error)
    assert "did not finish within 0.3 s" in str(error)
    assert DEADLINE <= elapsed < DEADLINE + SLACK
    assert not reset


async def test_reset_mid_login_is_connection_lost_before_the_deadline() -> None:
    error, elapsed, reset = await _login_against(ResetMidLogin())
    assert type(error) is ConnectionLost, repr(error)
    assert elapsed < DEADLINE
    assert reset


@pytest.mark.parametrize(
    "fault", [DelayPDUs(seconds=0.01), SlowDrip(interval=0.0)], ids=["short-delay", "drip-0"]
)
async def test_slow_but_in_time_targets_still_log_in(fault: Fault) -> None:
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, faults=(fault,)),),
        targets=(TargetSpec(name=TARGETS[0]),),
    )
    with trio.fail_after(5):
        async with serve_target(config) as running:
            report = await login(
                running.portals[0],
                LoginConfig(initiator_name=INITIATORS[0], target_name=TARGETS[0]),
                login_timeout=3.0,
            )
            await running.wait_idle()
            assert report.ok
            assert report.logout is not None
            assert not running.lingering_sessions
