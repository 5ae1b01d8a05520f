"""The one thin trio layer: open a TCP stream to a portal and drive an initiator over it.

This is the only boundary where ``OSError`` and trio's errors become ours
(:class:`~pyiscsi_failover.errors.NetworkError` and friends). Reusable coroutines here take no
timeout; :func:`login` and :func:`discover` are the high-level entry points and take the connect
and login deadlines, because each portal needs its own. Every stream is closed on every path.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

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
    ProtocolError,
    RedirectLoopError,
    Unreachable,
)
from pyiscsi_failover.initiator import (
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
from pyiscsi_failover.protocol.sendtargets import DiscoveredTarget

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOGIN_TIMEOUT",
    "DEFAULT_LOGOUT_TIMEOUT",
    "MAX_REDIRECTS",
    "DiscoveryReport",
    "LoginReport",
    "Redirect",
    "discover",
    "login",
    "open_connection",
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


def _network_error(exc: OSError, portal: Portal, during: str) -> NetworkError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return ConnectRefused(f"{portal}: connection refused")
    if exc.errno in _UNREACHABLE_ERRNOS:
        return Unreachable(f"{portal}: unreachable ({reason})")
    return ConnectionLost(f"{portal}: connection lost during {during} ({reason})")


async def open_connection(portal: Portal) -> trio.SocketStream:
    """Connect to ``portal``, trying its resolved addresses in order. No deadline of its own."""
    try:
        infos = await trio.socket.getaddrinfo(portal.host, portal.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Unreachable(f"{portal}: cannot resolve {portal.host!r} ({exc.strerror})") from exc
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    assert last is not None  # getaddrinfo never returns an empty list without raising
    raise _network_error(last, portal, "connect") from last


@asynccontextmanager
async def _connected(portal: Portal, connect_timeout: float) -> AsyncIterator[trio.SocketStream]:
    try:
        with trio.fail_after(connect_timeout):
            stream = await open_connection(portal)
    except trio.TooSlowError as exc:
        raise ConnectTimeout(f"{portal}: no TCP connection within {connect_timeout:g} s") from exc
    async with stream:
        yield stream


@dataclass(slots=True)
class _Sending:
    """Whether our last request is wholly on the wire (it is not when a send was cancelled)."""

    done: bool = True


async def _next_event(
    stream: trio.SocketStream,
    conn: InitiatorConnection,
    portal: Portal,
    sending: _Sending | None = None,
) -> Event:
    """Pump bytes both ways until the connection yields its next event."""
    if sending is None:
        sending = _Sending()
    try:
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                # trio raises Cancelled from send_all only before the first byte, or after a
                # partial send when the socket buffer was full: either way not wholly sent.
                sending.done = False
                await stream.send_all(out)
                sending.done = True
            if event is not NEED_DATA:
                return event
            data = await stream.receive_some(_RECEIVE_SIZE)
            conn.receive_data(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise _network_error(cause, portal, conn.state.value) from exc
        raise ConnectionLost(f"{portal}: connection lost during {conn.state.value}") from exc
    except ConnectionLost as exc:
        # Before OSError, which it subclasses: the state machine already said what was lost.
        raise ConnectionLost(f"{portal}: {exc}") from exc
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
    connect_s: float = 0.0
    login_s: float = 0.0
    total_s: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return isinstance(self.outcome, LoginSucceeded)

    def raise_for_status(self) -> LoginSucceeded:
        """The success event, or :class:`LoginFailed` for callers that prefer exceptions."""
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


async def login(
    portal: Portal,
    config: LoginConfig,
    *,
    connect_timeout: float = 3.0,
    login_timeout: float = 10.0,
    logout_timeout: float = DEFAULT_LOGOUT_TIMEOUT,
    max_redirects: int = MAX_REDIRECTS,
    send_targets: str | None = None,
) -> LoginReport:
    """Log in at ``portal`` (following redirects), optionally ask SendTargets, and log out.

    ``connect_timeout`` bounds each TCP connect, ``login_timeout`` each login (and SendTargets)
    after its connect. Raises :class:`NetworkError`, :class:`ISCSITimeout`, :class:`ProtocolError`,
    :class:`AuthenticationError` or :class:`RedirectLoopError`; a target's refusal is returned.
    """
    started = time.monotonic()
    redirects: list[Redirect] = []
    visited = {_key(portal)}
    current = portal
    connect_s = login_s = 0.0
    while True:
        hop_start = time.monotonic()
        async with _connected(current, connect_timeout) as stream:
            connected_at = time.monotonic()
            connect_s += connected_at - hop_start
            conn = InitiatorConnection(config)
            conn.start_login()
            sending = _Sending()
            try:
                with trio.fail_after(login_timeout):
                    event = await _next_event(stream, conn, current, sending)
                    targets: tuple[DiscoveredTarget, ...] = ()
                    if isinstance(event, LoginSucceeded) and send_targets is not None:
                        targets = await _send_targets(stream, conn, current, send_targets)
            except trio.TooSlowError as exc:
                stage = conn.state.value
                await _abandon_login(stream, conn, current, sending, logout_timeout)
                raise ISCSITimeout(
                    f"{current}: {stage} did not finish within {login_timeout:g} s"
                ) from exc
            except trio.Cancelled:
                # Our caller gave up on us (the prober chose another candidate).
                await _abandon_login(stream, conn, current, sending, logout_timeout)
                raise
            except (ProtocolError, AuthenticationError):
                # We refused an answer; if the target had already logged us in, log out.
                await _logout_refused_login(stream, conn, current, logout_timeout)
                raise
            login_s += time.monotonic() - connected_at
            if isinstance(event, LoginRedirected):
                redirects.append(
                    Redirect(source=current, address=event.address, permanent=event.permanent)
                )
                key = _key(event.address)
                if key in visited:
                    chain = " -> ".join(str(r.source) for r in redirects) + f" -> {event.address}"
                    raise RedirectLoopError(f"redirect loop: {chain}")
                if len(redirects) > max_redirects:
                    raise RedirectLoopError(
                        f"{portal}: more than {max_redirects} redirects (last to {event.address})"
                    )
                visited.add(key)
                current = event.address
                continue
            if not isinstance(event, LoginSucceeded | LoginRejected):
                raise ProtocolError(f"{current}: unexpected event {type(event).__name__} at login")
            logout: LoggedOut | None = None
            notes: list[str] = []
            if isinstance(event, LoginSucceeded):
                # Shielded (and bounded by logout_timeout): a cancelled caller still logs out.
                with trio.CancelScope(shield=True):
                    logout, note = await _logout(stream, conn, current, logout_timeout)
                if note:
                    notes.append(note)
            return LoginReport(
                portal=portal,
                final_portal=current,
                outcome=event,
                redirects=tuple(redirects),
                logout=logout,
                targets=targets,
                connect_s=connect_s,
                login_s=login_s,
                total_s=time.monotonic() - started,
                notes=tuple(notes),
            )


async def _logout(
    stream: trio.SocketStream, conn: InitiatorConnection, portal: Portal, deadline_s: float
) -> tuple[LoggedOut | None, str | None]:
    conn.logout()
    try:
        with trio.fail_after(deadline_s):
            event = await _next_event(stream, conn, portal)
    except trio.TooSlowError:
        return None, f"no Logout Response within {deadline_s:g} s"
    except (NetworkError, ProtocolError) as exc:
        return None, f"logout failed: {exc}"
    if not isinstance(event, LoggedOut):
        return None, f"unexpected {type(event).__name__} instead of a Logout Response"
    return event, None


async def _send_targets(
    stream: trio.SocketStream, conn: InitiatorConnection, portal: Portal, which: str
) -> tuple[DiscoveredTarget, ...]:
    conn.send_targets(which)
    event = await _next_event(stream, conn, portal)
    if not isinstance(event, TargetsDiscovered):
        raise ProtocolError(f"{portal}: expected a SendTargets answer, got {type(event).__name__}")
    return event.targets


async def _logout_refused_login(
    stream: trio.SocketStream, conn: InitiatorConnection, portal: Portal, deadline_s: float
) -> None:
    """Best effort, shielded and bounded: end the session a refused login left on the target."""
    if not conn.logout_refused_login():
        return
    with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
        try:
            await _next_event(stream, conn, portal)
        except ISCSIError as exc:
            logger.debug("%s: logout after a refused login failed: %s", portal, exc)


async def _abandon_login(
    stream: trio.SocketStream,
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
    if conn.state is not State.OPERATIONAL_NEGOTIATION or not sending.done:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(deadline_s):
        try:
            # Further negotiation rounds happen inside; it returns with the login's end.
            event = await _next_event(stream, conn, portal)
        except ISCSIError:
            return  # the target broke the connection or the protocol: nothing to log out of
        if isinstance(event, LoginSucceeded):
            _, note = await _logout(stream, conn, portal, deadline_s)
            if note:
                logger.debug("%s: abandoned login: %s", portal, note)


async def discover(
    portal: Portal,
    config: LoginConfig,
    *,
    connect_timeout: float = 3.0,
    login_timeout: float = 10.0,
    logout_timeout: float = DEFAULT_LOGOUT_TIMEOUT,
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
        send_targets="All",
    )


def _key(portal: Portal) -> tuple[str, int]:
    return (portal.host.lower(), portal.port)
