"""The one thin trio layer: connect to a portal and drive an initiator over the socket.

This is the only boundary where ``OSError`` and trio's errors become ours
(:class:`~pyiscsi_failover.errors.NetworkError` and friends), and where a target's redirects
meet the :class:`RedirectPolicy`. Reusable coroutines here take no timeout; :func:`login` and
:func:`discover` are the high-level entry points and take the connect and login deadlines,
because each portal needs its own: together they are one budget per candidate, redirect hops
included. Every socket is closed on every path.
"""

from __future__ import annotations

import enum
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import trio

from pyiscsi_failover.errors import (
    AuthenticationError,
    ConnectionLost,
    ConnectRefused,
    ConnectTimeout,
    ISCSIError,
    ISCSITimeout,
    LocalProtocolError,
    LoginFailed,
    NetworkError,
    NotAnISCSITarget,
    ProtocolError,
    RedirectLoopError,
    RedirectRefused,
    Unreachable,
)
from pyiscsi_failover.names import Portal

if TYPE_CHECKING:
    # At run time each function imports what it uses from the login state machine: that
    # loads the PDU models and the codec with the first connection, after its SYN is sent,
    # rather than before a command line's first SYN (see login_config.py).
    from pyiscsi_failover.initiator import (
        Event,
        InitiatorConnection,
        LoggedOut,
        LoginRedirected,
        LoginRejected,
        LoginSucceeded,
    )
    from pyiscsi_failover.login_config import LoginConfig
    from pyiscsi_failover.lun_check import LunCheck, LunReport, ScsiRequest
    from pyiscsi_failover.protocol.sendtargets import DiscoveredTarget

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_LOGOUT_TIMEOUT",
    "DEFAULT_REDIRECT_POLICY",
    "MAX_REDIRECTS",
    "DiscoveryReport",
    "LoginReport",
    "Redirect",
    "RedirectMode",
    "RedirectPolicy",
    "discover",
    "login",
    "open_connection",
    "parse_network",
]

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT: Final = 3.0
DEFAULT_LOGIN_TIMEOUT: Final = 10.0
#: Logout is courtesy after a successful probe; a target slow to answer it does not fail the probe.
DEFAULT_LOGOUT_TIMEOUT: Final = 2.0
MAX_REDIRECTS: Final = 4
_RECEIVE_SIZE: Final = 65536
_UNREACHABLE_ERRNOS: Final = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN, errno.EHOSTDOWN}
)


class RedirectMode(enum.Enum):
    """Whether a login follows a target's redirects (RFC 7143 says an initiator should)."""

    FOLLOW = "follow"
    NEVER = "never"


IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(item: str | IPNetwork) -> IPNetwork:
    """A redirect allow-list entry: a network, or its CIDR text (a bare address is a /32 or
    /128). Raises :class:`LocalProtocolError` naming the entry."""
    if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return item
    try:
        return ipaddress.ip_network(str(item).strip(), strict=False)
    except ValueError:
        raise LocalProtocolError(
            f"redirect allow entry {item!r} is not an IP network in CIDR form"
            " (10.0.0.0/8, fd00::/8)"
        ) from None


def _never_a_portal(address: IPAddress) -> str | None:
    """Addresses no target can live at, refused whatever the allow list says."""
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class RedirectPolicy:
    """Which redirects a login follows, checked before anything is sent to the new address.

    ``allow`` lists the networks a redirect may lead to; empty means any address (but never an
    unspecified, multicast or broadcast one). A host name in a TargetAddress is resolved once and
    every address it resolves to must be allowed; we then connect only to those addresses.
    ``max_redirects`` bounds the chain; the per-candidate deadline bounds its time anyway.
    Strings are accepted for ``mode`` and ``allow`` (``"never"``, ``"10.0.0.0/8"``).
    """

    mode: RedirectMode = RedirectMode.FOLLOW
    allow: tuple[IPNetwork, ...] = ()
    max_redirects: int = MAX_REDIRECTS

    def __post_init__(self) -> None:
        mode: object = self.mode
        if isinstance(mode, str):
            try:
                mode = RedirectMode(mode)
            except ValueError:
                raise LocalProtocolError(
                    f"redirect mode must be 'follow' or 'never', not {mode!r}"
                ) from None
        if not isinstance(mode, RedirectMode):
            raise LocalProtocolError(f"redirect mode must be a RedirectMode, not {mode!r}")
        object.__setattr__(self, "mode", mode)
        allow: object = self.allow
        if isinstance(allow, str) or not isinstance(allow, tuple | list):
            raise LocalProtocolError(f"redirect allow list must be a tuple of CIDRs, not {allow!r}")
        object.__setattr__(self, "allow", tuple(parse_network(item) for item in allow))
        count: object = self.max_redirects
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
            raise LocalProtocolError(f"max_redirects must be an integer 0..64, not {count!r}")

    def refusal(self, address: IPAddress) -> str | None:
        """Why a redirect to ``address`` is not allowed, or None if it is."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        reason = _never_a_portal(address)
        if reason is not None:
            return reason
        if self.allow and not any(address in network for network in self.allow):
            return "not in the allowed networks " + ", ".join(str(n) for n in self.allow)
        return None


#: What getaddrinfo gives for one address: (family, type, proto, canonname, sockaddr).
_AddrInfo: TypeAlias = tuple[int, int, int, str, tuple[Any, ...]]


def _network_error(exc: OSError, portal: Portal, during: str) -> NetworkError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return ConnectRefused(f"{portal}: connection refused")
    if exc.errno in _UNREACHABLE_ERRNOS:
        return Unreachable(f"{portal}: unreachable ({reason})")
    return ConnectionLost(f"{portal}: connection lost during {during} ({reason})")


@functools.lru_cache(maxsize=1024)
def _literal(host: str, port: int) -> tuple[_AddrInfo, ...] | None:
    """The address of a literal host, which needs no resolver round trip (most portals are
    literals); None for a name. Cached: parsing the literal was a visible part of a login."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        return ((socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port)),)
    return ((socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0)),)


async def _resolve(portal: Portal) -> list[_AddrInfo]:
    literal = _literal(portal.host, portal.port)
    if literal is not None:
        return list(literal)
    try:
        infos = await trio.socket.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Unreachable(f"{portal}: cannot resolve {portal.host!r} ({exc.strerror})") from exc
    return [(f, t, p, c, tuple(a)) for f, t, p, c, a in infos]


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


async def _connect_socket(info: _AddrInfo) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY, as trio.SocketStream would set."""
    family, type_, proto, _, sockaddr = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(sockaddr)
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
    except BaseException:
        _close(sock)
        raise
    if error:
        _close(sock)
        raise OSError(error, os.strerror(error))
    return sock


async def _connect_to(portal: Portal, infos: list[_AddrInfo]) -> socket.socket:
    """Connect to the first of ``infos`` that answers; no deadline of its own."""
    last: OSError | None = None
    for info in infos:
        try:
            return await _connect_socket(info)
        except OSError as exc:
            last = exc
    assert last is not None  # getaddrinfo never returns an empty list without raising
    raise _network_error(last, portal, "connect") from last


async def open_connection(portal: Portal) -> trio.SocketStream:
    """Connect to ``portal``, trying its resolved addresses in order. No deadline of its own."""
    sock = await _connect_to(portal, await _resolve(portal))
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _checked_redirect(
    policy: RedirectPolicy, source: Portal, address: Portal, infos: list[_AddrInfo]
) -> None:
    """Raise :class:`RedirectRefused` unless every address of ``address`` is allowed."""
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        reason = policy.refusal(ip)
        if reason is not None:
            shown = str(address) if str(ip) == address.host else f"{address} ({ip})"
            raise RedirectRefused(
                f"{source}: redirect to {shown} refused: {reason}",
                address=str(address),
                reason=reason,
            )


@dataclass(slots=True)
class _Sending:
    """Whether our last request is wholly on the wire (it is not when a send was cancelled)."""

    done: bool = True


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def _receive_some(sock: socket.socket, idle: Callable[[], object] | None = None) -> bytes:
    """The next bytes from ``sock``; ``idle`` runs once, if at all, when none are there yet."""
    while True:
        try:
            return sock.recv(_RECEIVE_SIZE)
        except BlockingIOError:
            if idle is not None:
                idle()
                idle = None
                continue  # the peer may have answered meanwhile
            await trio.lowlevel.wait_readable(sock)


async def _next_event(
    sock: socket.socket,
    conn: InitiatorConnection,
    portal: Portal,
    sending: _Sending | None = None,
    idle: Callable[[], object] | None = None,
) -> Event:
    """Pump bytes both ways until the connection yields its next event; ``idle`` runs once
    if we would otherwise wait for the target (see :func:`_receive_some`).

    The socket is used directly, not through trio.SocketStream, whose every send and receive
    costs two passes through the scheduler even when the kernel is ready: that was a third of
    a login's CPU. Waiting happens only in wait_readable/wait_writable, which are cancellation
    points, so deadlines and the prober's cancellation work as before.
    """
    from pyiscsi_failover.initiator import NEED_DATA

    if sending is None:
        sending = _Sending()
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                # Cancellation can only strike while waiting for buffer space, after part of
                # the request went out: then it is not wholly on the wire.
                sending.done = False
                await _send_all(sock, out)
                sending.done = True
            if event is not NEED_DATA:
                return event
            conn.receive_data(await _receive_some(sock, idle))
            idle = None
    except ConnectionLost as exc:
        # Before OSError, which it subclasses: the state machine already said what was lost.
        raise ConnectionLost(f"{portal}: {exc}") from exc
    except NotAnISCSITarget as exc:
        raise NotAnISCSITarget(f"{portal}: {exc}") from exc
    except OSError as exc:
        raise _network_error(exc, portal, conn.state.value) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    source: Portal
    address: Portal
    permanent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginReport:
    """What one login attempt found, after following redirects.

    ``outcome`` is the final login event: success or the target's refusal. Network and protocol
    failures are raised instead, as :class:`~pyiscsi_failover.errors.ISCSIError` subclasses.
    """

    portal: Portal
    final_portal: Portal
    outcome: LoginSucceeded | LoginRejected
    redirects: tuple[Redirect, ...] = ()
    logout: LoggedOut | None = None
    targets: tuple[DiscoveredTarget, ...] = ()
    lun: LunReport | None = None
    connect_s: float = 0.0
    login_s: float = 0.0
    total_s: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        from pyiscsi_failover.initiator import LoginSucceeded

        return isinstance(self.outcome, LoginSucceeded)

    def raise_for_status(self) -> LoginSucceeded:
        """The success event, or :class:`LoginFailed` for callers that prefer exceptions."""
        from pyiscsi_failover.initiator import LoginRejected

        outcome = self.outcome
        if isinstance(outcome, LoginRejected):
            raise LoginFailed(
                f"{self.final_portal}: login refused: {outcome.describe()}",
                status_class=outcome.status_class,
                status_detail=outcome.status_detail,
                retryable=outcome.retryable,
            )
        return outcome

    @property
    def handoff_portal(self) -> Portal:
        """The address to give open-iscsi: a temporary redirect keeps the original address,
        a permanent one replaces it (RFC 7143 status 0x0101 vs 0x0102)."""
        chosen = self.portal
        for redirect in self.redirects:
            if redirect.permanent:
                chosen = redirect.address
        return chosen


DiscoveryReport = LoginReport


DEFAULT_REDIRECT_POLICY: Final = RedirectPolicy()


async def login(
    portal: Portal,
    config: LoginConfig,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
    logout_timeout: float = DEFAULT_LOGOUT_TIMEOUT,
    redirect_policy: RedirectPolicy = DEFAULT_REDIRECT_POLICY,
    send_targets: str | None = None,
    lun_check: LunCheck | None = None,
) -> LoginReport:
    """Log in at ``portal`` (following redirects), optionally ask SendTargets or check a LUN
    (:class:`~pyiscsi_failover.lun_check.LunCheck`, its answer in :attr:`LoginReport.lun`),
    and log out.

    One budget covers the whole call, every redirect hop included: it ends within
    ``connect_timeout + login_timeout``, plus at most ``logout_timeout`` of cleanup (the logout,
    or the logout of a login we gave up on). Within that budget each TCP connect (name
    resolution included) gets at most ``connect_timeout`` and each hop's login (and SendTargets)
    at most ``login_timeout``, so a chain of slow redirects cannot stretch a candidate.
    Raises :class:`NetworkError`, :class:`ISCSITimeout`, :class:`ProtocolError`,
    :class:`AuthenticationError`, :class:`RedirectLoopError` or :class:`RedirectRefused`; a
    target's refusal is returned.
    """
    started = time.monotonic()
    budget = connect_timeout + login_timeout
    deadline = trio.current_time() + budget
    redirects: list[Redirect] = []
    visited = {_key(portal)}
    current = portal
    infos: list[_AddrInfo] | None = None  # the checked addresses of a redirect
    connect_s = login_s = 0.0

    def too_slow(what: str, step_s: float, step_end: float) -> str:
        if step_end < deadline or not redirects:
            return f"{current}: {what} within {step_s:g} s"
        hops = f"{len(redirects)} redirect{'s' if len(redirects) > 1 else ''}"
        return (
            f"{current}: {what} within the candidate's {budget:g} s budget ({hops} from {portal})"
        )

    while True:
        hop_start = time.monotonic()
        connect_by = min(trio.current_time() + connect_timeout, deadline)
        # Plain cancel scopes rather than fail_at (a generator context manager): a login runs
        # three of them, and they were a visible part of its CPU.
        with trio.CancelScope(deadline=connect_by) as connect_scope:
            if infos is None:
                infos = await _resolve(current)
            sock = await _connect_to(current, infos)
        if connect_scope.cancelled_caught:
            raise ConnectTimeout(too_slow("no TCP connection", connect_timeout, connect_by))
        try:
            from pyiscsi_failover.initiator import (
                InitiatorConnection,
                LoginRedirected,
                LoginRejected,
                LoginSucceeded,
            )

            connected_at = time.monotonic()
            connect_s += connected_at - hop_start
            conn = InitiatorConnection(config)
            conn.start_login()
            sending = _Sending()
            login_by = min(trio.current_time() + login_timeout, deadline)
            event: Event | None = None
            targets: tuple[DiscoveredTarget, ...] = ()
            try:
                with trio.CancelScope(deadline=login_by) as login_scope:
                    event = await _next_event(sock, conn, current, sending)
                    if isinstance(event, LoginSucceeded) and send_targets is not None:
                        targets = await _send_targets(sock, conn, current, send_targets)
                    if isinstance(event, LoginSucceeded) and lun_check is not None:
                        await _check_lun(sock, conn, current, lun_check, sending)
                    if isinstance(event, LoginRedirected):
                        infos = await _follow(
                            redirect_policy,
                            current,
                            event,
                            redirects=redirects,
                            visited=visited,
                            origin=portal,
                        )
            except trio.Cancelled:
                # Our caller gave up on us (the prober chose another candidate); our own
                # deadline ends in login_scope instead.
                await _abandon_login(sock, conn, current, sending, logout_timeout)
                raise
            except (ProtocolError, AuthenticationError) as exc:
                # We refused an answer; if the target had already logged us in, log out.
                await _logout_refused_login(sock, conn, current, logout_timeout)
                _name_portal(exc, current)
                raise
            if login_scope.cancelled_caught:
                if conn.peer_is_not_iscsi:
                    # It spoke first and waits for us to speak its protocol (SSH does).
                    raise NotAnISCSITarget(
                        f"{current}: not an iSCSI target (its reply is not an iSCSI PDU)"
                    )
                stage = conn.state.value
                if isinstance(event, LoginRedirected):
                    stage = f"resolving the redirect to {event.address}"
                await _abandon_login(sock, conn, current, sending, logout_timeout)
                raise ISCSITimeout(too_slow(f"{stage} did not finish", login_timeout, login_by))
            login_s += time.monotonic() - connected_at
            if isinstance(event, LoginRedirected):
                current = event.address
                continue
            if not isinstance(event, LoginSucceeded | LoginRejected):
                raise ProtocolError(f"{current}: unexpected event {type(event).__name__} at login")
            logout: LoggedOut | None = None
            notes: list[str] = []
            if isinstance(event, LoginSucceeded):
                # Shielded (and bounded by logout_timeout): a cancelled caller still logs out.
                # A LUN check's answers are read while the target logs us out.
                judge = None if lun_check is None else lun_check.judge
                logout, note = await _logout(
                    sock, conn, current, logout_timeout, shield=True, idle=judge
                )
                if note:
                    notes.append(note)
            return LoginReport(
                portal=portal,
                final_portal=current,
                outcome=event,
                redirects=tuple(redirects),
                logout=logout,
                targets=targets,
                lun=None if lun_check is None else lun_check.report,
                connect_s=connect_s,
                login_s=login_s,
                total_s=time.monotonic() - started,
                notes=tuple(notes),
            )
        finally:
            _close(sock)


async def _follow(
    policy: RedirectPolicy,
    current: Portal,
    event: LoginRedirected,
    *,
    redirects: list[Redirect],
    visited: set[tuple[str, int]],
    origin: Portal,
) -> list[_AddrInfo]:
    """Check a redirect against ``policy`` and resolve it once; the checked addresses are the
    only ones the next hop may connect to. Nothing is sent to a refused address."""
    address = event.address
    if policy.mode is RedirectMode.NEVER:
        raise RedirectRefused(
            f"{current}: redirect to {address} refused: redirects are not followed"
            " (--redirects never)",
            address=str(address),
            reason="redirects are not followed",
        )
    redirects.append(Redirect(source=current, address=address, permanent=event.permanent))
    key = _key(address)
    if key in visited:
        chain = " -> ".join(str(r.source) for r in redirects) + f" -> {address}"
        raise RedirectLoopError(f"redirect loop: {chain}")
    if len(redirects) > policy.max_redirects:
        raise RedirectLoopError(
            f"{origin}: more than {policy.max_redirects} redirects (last to {address})"
        )
    visited.add(key)
    infos = await _resolve(address)
    _checked_redirect(policy, current, address, infos)
    return infos


async def _logout(
    sock: socket.socket,
    conn: InitiatorConnection,
    portal: Portal,
    deadline_s: float,
    *,
    shield: bool = False,
    idle: Callable[[], object] | None = None,
) -> tuple[LoggedOut | None, str | None]:
    conn.logout()
    event: Event | None = None
    try:
        # One scope for both the deadline and (after a success) the shield from our caller.
        with trio.CancelScope(deadline=trio.current_time() + deadline_s, shield=shield):
            event = await _next_event(sock, conn, portal, idle=idle)
    except (NetworkError, ProtocolError) as exc:
        return None, f"logout failed: {exc}"
    if event is None:
        return None, f"no Logout Response within {deadline_s:g} s"
    from pyiscsi_failover.initiator import LoggedOut

    if not isinstance(event, LoggedOut):
        return None, f"unexpected {type(event).__name__} instead of a Logout Response"
    return event, None


async def _send_targets(
    sock: socket.socket, conn: InitiatorConnection, portal: Portal, which: str
) -> tuple[DiscoveredTarget, ...]:
    conn.send_targets(which)
    event = await _next_event(sock, conn, portal)
    from pyiscsi_failover.initiator import TargetsDiscovered

    if not isinstance(event, TargetsDiscovered):
        raise ProtocolError(f"{portal}: expected a SendTargets answer, got {type(event).__name__}")
    return event.targets


async def _check_lun(
    sock: socket.socket,
    conn: InitiatorConnection,
    portal: Portal,
    check: LunCheck,
    sending: _Sending,
) -> None:
    """Run ``check``'s SCSI commands over the session, pipelined, until it has its answer."""
    from pyiscsi_failover.initiator import NEED_DATA, ScsiCompleted, TargetRequest

    steps = {}

    def submit(requests: list[ScsiRequest]) -> None:
        for request in requests:
            cdb = request.cdb
            steps[conn.submit(cdb.cdb, lun=request.lun, transfer_length=cdb.transfer_length)] = (
                request.step
            )

    submit(check.start())
    while not check.done:
        # Answers that arrived together are taken without a trip through the pump (and the
        # scheduler); it runs when the next one is not here yet, sending what is queued first.
        event = NEED_DATA if conn.has_output else conn.next_event()
        if event is NEED_DATA:
            # Waiting for the target: read the answers already in meanwhile.
            event = await _next_event(sock, conn, portal, sending, idle=check.digest)
        if isinstance(event, TargetRequest):
            # A logout request (or a drop, or renegotiation) ends the check cleanly: the
            # login's own logout follows at once.
            what = event.event.name.lower().replace("_", " ")
            check.abandon(f"the target sent an async {what}")
            return
        if not isinstance(event, ScsiCompleted):
            raise ProtocolError(f"{portal}: unexpected {type(event).__name__} during the LUN check")
        submit(check.completed(steps.pop(event.itt), event))


async def _logout_refused_login(
    sock: socket.socket, conn: InitiatorConnection, portal: Portal, deadline_s: float
) -> None:
    """Best effort, shielded and bounded: end the session a refused login left on the target."""
    if not conn.logout_refused_login():
        return
    with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
        try:
            await _next_event(sock, conn, portal)
        except ISCSIError as exc:
            logger.debug("%s: logout after a refused login failed: %s", portal, exc)


async def _abandon_login(
    sock: socket.socket,
    conn: InitiatorConnection,
    portal: Portal,
    sending: _Sending,
    deadline_s: float,
) -> None:
    """Stop a login (deadline or cancellation) without leaving a session on the target.

    Once our request to enter the full feature phase is wholly on the wire, the target may be
    logging us in; closing now would leave a session nobody logged out. So read its answer and
    log out if it let us in: best effort, shielded from cancellation, within ``deadline_s``.
    Earlier than that the target cannot have logged us in, and closing is enough.
    """
    from pyiscsi_failover.initiator import LoginSucceeded, State

    if conn.state is State.FULL_FEATURE and sending.done:
        # Logged in (a LUN check or SendTargets was cut short): log out of that session.
        with trio.CancelScope(shield=True):
            _, note = await _logout(sock, conn, portal, deadline_s)
        if note:
            logger.debug("%s: abandoned session: %s", portal, note)
        return
    if conn.state is not State.OPERATIONAL_NEGOTIATION or not sending.done:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
        try:
            # Further negotiation rounds happen inside; it returns with the login's end.
            event = await _next_event(sock, conn, portal)
        except ISCSIError:
            return  # the target broke the connection or the protocol: nothing to log out of
        if isinstance(event, LoginSucceeded):
            _, note = await _logout(sock, conn, portal, deadline_s)
            if note:
                logger.debug("%s: abandoned login: %s", portal, note)


async def discover(
    portal: Portal,
    config: LoginConfig,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
    logout_timeout: float = DEFAULT_LOGOUT_TIMEOUT,
    redirect_policy: RedirectPolicy = DEFAULT_REDIRECT_POLICY,
) -> DiscoveryReport:
    """A Discovery session at ``portal``: login, SendTargets=All, logout."""
    if config.target_name is not None:
        raise LocalProtocolError("discover() needs a LoginConfig without target_name")
    return await login(
        portal,
        config,
        connect_timeout=connect_timeout,
        login_timeout=login_timeout,
        logout_timeout=logout_timeout,
        redirect_policy=redirect_policy,
        send_targets="All",
    )


def _name_portal(exc: ISCSIError, portal: Portal) -> None:
    """Prefix the portal to a sans-IO error's message (the state machine does not know it),
    keeping the exception's type and fields; a message that names it already is left alone."""
    message = str(exc)
    if not message.startswith(f"{portal}: "):
        exc.args = (f"{portal}: {message}", *exc.args[1:])


def _key(portal: Portal) -> tuple[str, int]:
    return (portal.host.lower(), portal.port)
