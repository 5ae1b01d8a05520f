"""The ordered prober: find the first working portal/target/LUN of a connection_info.

Three policies, one contract: each returns a :class:`ProbeResult` carrying the chosen candidate
and one :class:`Attempt` per candidate.

``sequential``
    Exactly the Cinder spec: one candidate after another, stop at the first success.
``ordered`` (default)
    Candidates are probed concurrently (bounded by ``concurrency``), yet the choice is always the
    one ``sequential`` would make: the first candidate in list order that works. A success at
    index *i* is chosen once every candidate before *i* has failed, and candidates after the
    lowest success so far are cancelled, since they can no longer win. Wall time is roughly the
    slowest failure before the winner rather than the sum of them.
``staggered``
    Happy eyeballs (RFC 8305 style, as in trio's ``open_tcp_stream``): start the next candidate
    when the previous one failed or after ``stagger`` seconds; the first success wins and cancels
    the rest. A blackholed main portal costs one stagger, not a connect timeout, but the winner
    may be a later candidate that answered first.

Each attempt catches its own expected errors and records them as an :class:`Outcome`;
connect_timeout + login_timeout is one budget per attempt, redirect hops included. Times come
from trio's clock, so tests can run under ``autojump_clock`` and assert exact virtual times.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final, TypeAlias

import trio

from pyiscsi_failover.connection_info import Candidate, ConnectionInfo
from pyiscsi_failover.errors import (
    AuthenticationError,
    ConnectionLost,
    ConnectRefused,
    ConnectTimeout,
    ISCSIError,
    ISCSITimeout,
    LocalProtocolError,
    NegotiationError,
    ProtocolError,
    RedirectLoopError,
    RedirectRefused,
    Unreachable,
)
from pyiscsi_failover.host import default_initiator_name
from pyiscsi_failover.login_config import LoginConfig
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import DEFAULT_POLICY, ChapPolicy
from pyiscsi_failover.transport import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_LOGIN_TIMEOUT,
    MAX_REDIRECTS,
    IPNetwork,
    LoginReport,
    RedirectMode,
    RedirectPolicy,
    login,
    open_connection,
    parse_network,
)

if TYPE_CHECKING:
    from pyiscsi_failover.initiator import LoginRejected
    from pyiscsi_failover.lun_check import LunInfo, LunReport
    from pyiscsi_failover.protocol.negotiation import OperationalParameters

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_STAGGER",
    "Attempt",
    "AttemptFinished",
    "AttemptStarted",
    "Check",
    "Checker",
    "Outcome",
    "Policy",
    "ProbeOptions",
    "ProbeResult",
    "ProgressEvent",
    "check_candidate",
    "discover_first",
    "outcome_of",
    "probe",
    "probe_sync",
]

DEFAULT_STAGGER: Final = 0.25
DEFAULT_CONCURRENCY: Final = 16


class Policy(enum.Enum):
    SEQUENTIAL = "sequential"
    ORDERED = "ordered"
    STAGGERED = "staggered"


class Check(enum.Enum):
    """How far a candidate is checked: TCP reachability, a login, or a login and its LUN
    (REPORT LUNS, INQUIRY, VPD 0x83, TEST UNIT READY, READ CAPACITY: see lun_check.py)."""

    TCP = "tcp"
    LOGIN = "login"
    LUN = "lun"


class Outcome(enum.Enum):
    """What happened to one candidate; the values are the CLI's JSON ``outcome`` strings."""

    OK = "ok"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    AUTH_FAILED = "auth_failed"
    AUTHORIZATION_FAILED = "authorization_failed"
    NOT_FOUND = "not_found"
    TARGET_ERROR = "target_error"
    PROTOCOL_ERROR = "protocol_error"
    REDIRECT_LOOP = "redirect_loop"
    REDIRECT_REFUSED = "redirect_refused"
    NEGOTIATION_FAILED = "negotiation_failed"
    LUN_MISSING = "lun_missing"
    LUN_NOT_READY = "lun_not_ready"
    LUN_STANDBY = "lun_standby"
    LUN_ERROR = "lun_error"
    WRONG_VOLUME = "wrong_volume"
    NOT_TRIED = "not_tried"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One candidate's probe. ``started_at``/``elapsed_s`` are relative to the probe's start."""

    candidate: Candidate
    outcome: Outcome
    detail: str = ""
    started_at: float | None = None
    elapsed_s: float = 0.0
    redirected_to: Portal | None = None
    redirect_refused: str | None = None
    handoff_portal: Portal | None = None
    notes: tuple[str, ...] = ()
    lun_info: LunInfo | None = None
    report: LoginReport | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def negotiated(self) -> OperationalParameters | None:
        """What the successful login agreed (digests...), for the hand-off; else None."""
        from pyiscsi_failover.initiator import LoginSucceeded

        if self.report is None or not isinstance(self.report.outcome, LoginSucceeded):
            return None
        return self.report.outcome.parameters

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.candidate.index,
            "portal": str(self.candidate.portal),
            "iqn": self.candidate.iqn,
            "lun": self.candidate.lun,
            "outcome": self.outcome.value,
            "detail": self.detail,
            "elapsed_ms": round(self.elapsed_s * 1000, 3),
            "redirected_to": None if self.redirected_to is None else str(self.redirected_to),
            "redirect_refused": self.redirect_refused,
            "notes": list(self.notes),
            "lun_info": None if self.lun_info is None else self.lun_info.to_json(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    policy: Policy
    check: Check
    attempts: tuple[Attempt, ...]
    chosen: Attempt | None
    elapsed_s: float

    @property
    def candidate(self) -> Candidate | None:
        return None if self.chosen is None else self.chosen.candidate

    def to_json(self) -> dict[str, object]:
        chosen: dict[str, object] | None = None
        if self.chosen is not None:
            c = self.chosen.candidate
            portal = self.chosen.handoff_portal or c.portal
            chosen = {"portal": str(portal), "iqn": c.iqn, "lun": c.lun}
        return {
            "chosen": chosen,
            "policy": self.policy.value,
            "check": self.check.value,
            "elapsed_ms": round(self.elapsed_s * 1000, 3),
            "attempts": [a.to_json() for a in self.attempts],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeOptions:
    """Every knob a user can turn; the defaults are the documented ones.

    ``connect_timeout + login_timeout`` is each candidate's whole budget, redirect hops
    included (see :func:`~pyiscsi_failover.transport.login`). ``redirects``, ``redirect_allow``
    (CIDR strings or networks; empty allows any address) and ``max_redirects`` make the
    :class:`~pyiscsi_failover.transport.RedirectPolicy`. ``chap_policy.algorithms`` is the
    CHAP_A offer, MD5 first by default because tgt reads only the first algorithm offered.
    """

    policy: Policy = Policy.ORDERED
    check: Check = Check.LOGIN
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    stagger: float = DEFAULT_STAGGER
    probe_all: bool = False
    initiator_name: str | None = None
    chap_policy: ChapPolicy = DEFAULT_POLICY
    redirects: RedirectMode = RedirectMode.FOLLOW
    redirect_allow: tuple[str | IPNetwork, ...] = ()
    max_redirects: int = MAX_REDIRECTS
    expect_wwid: str | None = None
    redirect_policy: RedirectPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.expect_wwid is not None:
            wwid = self.expect_wwid.strip() if isinstance(self.expect_wwid, str) else None
            if not wwid:
                raise LocalProtocolError(
                    f"expect_wwid must be a WWID (naa.6..., or 36... as udev shows it),"
                    f" not {self.expect_wwid!r}"
                )
            object.__setattr__(self, "expect_wwid", wwid)
        # Validates (and normalises) the three redirect fields at construction time.
        rules = RedirectPolicy(
            mode=self.redirects,
            allow=tuple(parse_network(item) for item in self.redirect_allow),
            max_redirects=self.max_redirects,
        )
        object.__setattr__(self, "redirects", rules.mode)
        object.__setattr__(self, "redirect_allow", rules.allow)
        object.__setattr__(self, "redirect_policy", rules)
        for name in ("connect_timeout", "login_timeout", "stagger"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise LocalProtocolError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.connect_timeout == 0 or self.login_timeout == 0:
            raise LocalProtocolError("connect_timeout and login_timeout must be above 0")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise LocalProtocolError(
                f"concurrency must be an integer >= 1, not {self.concurrency!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptStarted:
    candidate: Candidate
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptFinished:
    attempt: Attempt


ProgressEvent: TypeAlias = AttemptStarted | AttemptFinished
#: Probes one candidate and returns its outcome, never raising for an expected failure.
Checker: TypeAlias = Callable[[Candidate], Awaitable[Attempt]]


def _rejection_outcome(rejected: LoginRejected) -> Outcome:
    from pyiscsi_failover.protocol.pdu import LoginStatus, StatusClass

    named = {
        LoginStatus.AUTHENTICATION_FAILURE: Outcome.AUTH_FAILED,
        LoginStatus.AUTHORIZATION_FAILURE: Outcome.AUTHORIZATION_FAILED,
        LoginStatus.TARGET_NOT_FOUND: Outcome.NOT_FOUND,
        LoginStatus.TARGET_REMOVED: Outcome.NOT_FOUND,
    }
    if rejected.status is not None and rejected.status in named:
        return named[rejected.status]
    if rejected.status_class is StatusClass.TARGET_ERROR:
        return Outcome.TARGET_ERROR
    return Outcome.PROTOCOL_ERROR


def outcome_of(exc: ISCSIError) -> Outcome:
    """The outcome word for an error that ended a login (also used by ``login --json``)."""
    match exc:
        case ConnectRefused():
            return Outcome.REFUSED
        case ConnectTimeout() | ISCSITimeout():
            return Outcome.TIMEOUT
        case Unreachable():
            return Outcome.UNREACHABLE
        case AuthenticationError():
            return Outcome.AUTH_FAILED
        case RedirectLoopError():
            return Outcome.REDIRECT_LOOP
        case RedirectRefused():
            return Outcome.REDIRECT_REFUSED
        case NegotiationError():
            return Outcome.NEGOTIATION_FAILED
        case ConnectionLost() | ProtocolError():
            return Outcome.PROTOCOL_ERROR
        case _:
            return Outcome.PROTOCOL_ERROR


async def check_candidate(
    candidate: Candidate,
    info: ConnectionInfo,
    options: ProbeOptions,
    initiator_name: str,
    *,
    discovery: bool = False,
) -> Attempt:
    """Probe one candidate: TCP reachability, then (by default) a real login and logout.

    ``discovery`` makes it a Discovery session at the candidate's portal instead (with the
    discovery CHAP keys), asking SendTargets=All: the targets are in the attempt's report.
    """
    started = trio.current_time()

    def done(outcome: Outcome, detail: str, **extra: object) -> Attempt:
        return Attempt(
            candidate=candidate,
            outcome=outcome,
            detail=detail,
            elapsed_s=trio.current_time() - started,
            **extra,  # type: ignore[arg-type]
        )

    try:
        if options.check is Check.TCP:
            try:
                with trio.fail_after(options.connect_timeout):
                    stream = await open_connection(candidate.portal)
            except trio.TooSlowError:
                raise ConnectTimeout(
                    f"{candidate.portal}: no TCP connection within {options.connect_timeout:g} s"
                ) from None
            await stream.aclose()
            return done(Outcome.OK, "TCP connect succeeded")
        config = LoginConfig(
            initiator_name=initiator_name,
            target_name=None if discovery else candidate.iqn,
            chap=info.discovery_chap if discovery else info.chap,
            target_chap=info.discovery_target_chap if discovery else info.target_chap,
            chap_policy=options.chap_policy,
        )
        lun_check = None
        if options.check is Check.LUN and not discovery:
            from pyiscsi_failover.lun_check import LunCheck

            lun_check = LunCheck(candidate.lun, info.addressing_mode)
        report = await login(
            candidate.portal,
            config,
            connect_timeout=options.connect_timeout,
            login_timeout=options.login_timeout,
            redirect_policy=options.redirect_policy,
            send_targets="All" if discovery else None,
            lun_check=lun_check,
        )
    except RedirectRefused as exc:
        return done(Outcome.REDIRECT_REFUSED, str(exc), redirect_refused=exc.address)
    except ISCSIError as exc:
        return done(outcome_of(exc), str(exc))
    # Imported only now: the login state machine (and the codec) load with the first
    # connection, so that a command line's first SYN does not wait for them.
    from pyiscsi_failover.initiator import LoginRejected

    redirected_to = report.final_portal if report.redirects else None
    if isinstance(report.outcome, LoginRejected):
        return done(
            _rejection_outcome(report.outcome),
            f"login refused: {report.outcome.describe()}",
            redirected_to=redirected_to,
            report=report,
        )
    detail = "login and logout succeeded"
    if discovery:
        detail = f"SendTargets answered: {len(report.targets)} target(s)"
    notes = report.notes
    outcome = Outcome.OK
    lun_info = None
    if report.lun is not None:
        outcome, detail, lun_info = _lun_outcome(report.lun, options.expect_wwid)
        notes = (*report.lun.notes, *notes)
    if report.logout is None:
        # Still a working login, but say so: a logout that goes unanswered is a warning sign.
        detail = f"{detail}; logout unanswered: " + "; ".join(report.notes)
    return done(
        outcome,
        detail,
        redirected_to=redirected_to,
        handoff_portal=report.handoff_portal if outcome is Outcome.OK else None,
        notes=notes,
        lun_info=lun_info,
        report=report,
    )


def _same_volume(info: LunInfo, wwid: str) -> bool:
    """Whether ``info`` shows ``wwid``, given as Linux's ``naa.6...`` or udev's ``36...``."""
    return wwid.lower() in {w.lower() for w in (info.wwid, info.wwid_udev) if w is not None}


def _lun_outcome(lun: LunReport, expect_wwid: str | None) -> tuple[Outcome, str, LunInfo | None]:
    if lun.verdict.value != Outcome.OK.value:
        return Outcome(lun.verdict.value), lun.detail, lun.info
    info = lun.info
    if expect_wwid is not None and (info is None or not _same_volume(info, expect_wwid)):
        shown = "no WWID" if info is None or info.wwid is None else info.wwid
        return Outcome.WRONG_VOLUME, f"shows {shown}, expected {expect_wwid}", info
    return Outcome.OK, lun.detail, info


def _pin_volume(attempts: tuple[Attempt, ...], chosen: Attempt | None) -> tuple[Attempt, ...]:
    """Without ``expect_wwid`` the chosen candidate pins the WWID: any other that passed but
    shows another volume is ``wrong_volume``, so a wrong alternative list is seen before the
    wrong disk is ever attached."""
    if chosen is None or chosen.lun_info is None or chosen.lun_info.wwid is None:
        return attempts
    pinned = chosen.lun_info
    marked = []
    for attempt in attempts:
        info = attempt.lun_info
        if (
            attempt.ok
            and attempt is not chosen
            and info is not None
            and info.wwid is not None
            and not _same_volume(pinned, info.wwid)
        ):
            marked.append(
                replace(
                    attempt,
                    outcome=Outcome.WRONG_VOLUME,
                    detail=f"shows {info.wwid}, not {pinned.wwid} of the chosen candidate",
                    handoff_portal=None,
                )
            )
        else:
            marked.append(attempt)
    return tuple(marked)


class _Run:
    """Shared bookkeeping of one probe run across its attempt tasks."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        checker: Checker,
        on_progress: Callable[[ProgressEvent], None] | None,
    ) -> None:
        self.candidates = candidates
        self.checker = checker
        self.on_progress = on_progress
        self.start = trio.current_time()
        self.results: list[Attempt | None] = [None] * len(candidates)
        self.scopes: list[trio.CancelScope] = [trio.CancelScope() for _ in candidates]

    async def attempt(self, index: int) -> Attempt:
        candidate = self.candidates[index]
        with self.scopes[index]:
            at = trio.current_time() - self.start
            if self.on_progress:
                self.on_progress(AttemptStarted(candidate=candidate, at=at))
            attempt = replace(await self.checker(candidate), started_at=at)
            self.finish(index, attempt)
            return attempt
        # Only reached when our scope was cancelled: the attempt can no longer win.
        elapsed = trio.current_time() - self.start - at
        cancelled = Attempt(
            candidate=candidate,
            outcome=Outcome.CANCELLED,
            detail="cancelled: another candidate was chosen",
            started_at=at,
            elapsed_s=elapsed,
        )
        self.finish(index, cancelled)
        return cancelled

    def finish(self, index: int, attempt: Attempt) -> None:
        self.results[index] = attempt
        if self.on_progress:
            self.on_progress(AttemptFinished(attempt=attempt))

    def cancel_after(self, index: int) -> None:
        for scope in self.scopes[index + 1 :]:
            scope.cancel()

    def cancel_all_but(self, index: int) -> None:
        for i, scope in enumerate(self.scopes):
            if i != index:
                scope.cancel()

    def attempts(self) -> tuple[Attempt, ...]:
        return tuple(
            result
            if result is not None
            else Attempt(candidate=candidate, outcome=Outcome.NOT_TRIED, detail="not tried")
            for candidate, result in zip(self.candidates, self.results, strict=True)
        )


async def _sequential(run: _Run, probe_all: bool) -> Attempt | None:
    chosen: Attempt | None = None
    for index in range(len(run.candidates)):
        attempt = await run.attempt(index)
        if attempt.ok and chosen is None:
            chosen = attempt
            if not probe_all:
                break
    return chosen


async def _ordered(run: _Run, concurrency: int, probe_all: bool) -> Attempt | None:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(index: int, task_status: trio.TaskStatus[None]) -> None:
        async with limiter:
            # Started one by one, in list order, as capacity frees up.
            task_status.started()
            if run.scopes[index].cancel_called:
                return  # an earlier candidate already won: reported as not tried
            attempt = await run.attempt(index)
        if attempt.ok and not probe_all:
            run.cancel_after(index)  # later candidates can no longer win

    async with trio.open_nursery() as nursery:
        for index in range(len(run.candidates)):
            await nursery.start(one, index)
    return next((result for result in run.results if result is not None and result.ok), None)


async def _staggered(run: _Run, stagger: float, probe_all: bool) -> Attempt | None:
    winner: list[Attempt] = []

    async def one(index: int, finished: trio.Event) -> None:
        attempt = await run.attempt(index)
        if attempt.ok and not winner:
            winner.append(attempt)
            if not probe_all:
                run.cancel_all_but(index)
        finished.set()

    async with trio.open_nursery() as nursery:
        for index in range(len(run.candidates)):
            if winner and not probe_all:
                break
            finished = trio.Event()
            nursery.start_soon(one, index, finished)
            # Next candidate when this one has finished (failed) or after one stagger.
            with trio.move_on_after(stagger):
                await finished.wait()
    return winner[0] if winner else None


async def probe(
    info: ConnectionInfo,
    options: ProbeOptions | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    checker: Checker | None = None,
) -> ProbeResult:
    """Probe ``info``'s candidates under ``options.policy`` and choose one.

    ``checker`` replaces the network check (tests and simulations); by default each candidate
    gets :func:`check_candidate` with the host's InitiatorName.
    """
    options = options or ProbeOptions()
    if checker is None:
        initiator_name = options.initiator_name or default_initiator_name()

        async def default_checker(candidate: Candidate) -> Attempt:
            return await check_candidate(candidate, info, options, initiator_name)

        checker = default_checker
    run = _Run(info.candidates, checker, on_progress)
    if options.policy is Policy.SEQUENTIAL:
        chosen = await _sequential(run, options.probe_all)
    elif options.policy is Policy.ORDERED:
        chosen = await _ordered(run, options.concurrency, options.probe_all)
    else:
        chosen = await _staggered(run, options.stagger, options.probe_all)
    return ProbeResult(
        policy=options.policy,
        check=options.check,
        attempts=_pin_volume(run.attempts(), chosen),
        chosen=chosen,
        elapsed_s=trio.current_time() - run.start,
    )


async def discover_first(
    info: ConnectionInfo,
    options: ProbeOptions | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> ProbeResult:
    """SendTargets discovery at the first of ``info``'s portals that answers: the main portal,
    then the alternatives in order, under ``options.policy``, each portal once.

    The chosen attempt's ``report.targets`` holds the answer. Discovery logs in with
    ``info.discovery_chap`` (and ``discovery_target_chap``); ``options.check`` is not used.
    """
    options = options or ProbeOptions()
    initiator_name = options.initiator_name or default_initiator_name()
    first: dict[tuple[str, int], Candidate] = {}
    for c in info.candidates:
        first.setdefault((c.portal.host.lower(), c.portal.port), c)
    portals = replace(
        info,
        candidates=tuple(replace(c, index=i) for i, c in enumerate(first.values())),
    )

    async def discovery(candidate: Candidate) -> Attempt:
        return await check_candidate(candidate, portals, options, initiator_name, discovery=True)

    return await probe(portals, options, on_progress=on_progress, checker=discovery)


def probe_sync(
    info: ConnectionInfo,
    options: ProbeOptions | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> ProbeResult:
    """:func:`probe` for callers that are not async (os-brick-style code); runs a trio loop."""
    return trio.run(lambda: probe(info, options, on_progress=on_progress))
