"""The test target's trio server: portals, socket and timing faults, and a log for tests.

``async with serve_target(config) as running:`` opens the LUNs' backing files, binds every
portal of a :class:`~pyiscsi_failover.testing.target.TargetConfig` (port 0 gets a free port;
the real ones are in ``running.portals``, in configuration order), runs one sans-IO
:class:`~pyiscsi_failover.testing.target.TargetConnection` per accepted connection, all sharing
one set of logical units (``running.logical_units``: the same volume on every portal), and
closes every socket and file it opened on the way out. Tests then assert on
``running.connections`` and ``running.logins`` ("every login was followed by a logout", "no
session lingered") and wait on :meth:`RunningTarget.wait_for` instead of sleeping
(``ConnectionRecord.bytes_buffered`` tells that a partial PDU arrived, e.g. one whose required
digest never comes).

Faults carried out here rather than in the state machine:

* ``refuse``: the port is bound but never listens, so a connect gets RST (ECONNREFUSED);
* ``blackhole``: the socket listens with a backlog of 0 and its accept queue is filled with our
  own loopback connections that are never accepted, so the kernel drops further SYNs and a
  connect hangs until its deadline (checked on Linux, where TCP_INFO shows the queue);
* ``silent``: connections are accepted and read but nothing is ever sent;
* ``delay``: each PDU is sent after a pause; ``slow-drip``: responses go out byte by byte;
* ``slow-scsi``: the state machine puts a :class:`~.target.Hold` before a slow LUN's reply,
  and what follows waits until that long after the bytes that asked for it arrived;
* ``reset-mid-login``: the state machine says when (after the first request), and the socket is
  closed with SO_LINGER 0 so the peer sees RST.

Only this layer imports trio and socket; it must never import subprocess.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import trio

from pyiscsi_failover.errors import LocalProtocolError
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.negotiation import SessionType
from pyiscsi_failover.protocol.pdu import ISID, LoginStatus
from pyiscsi_failover.testing.backing_file import open_backing_file
from pyiscsi_failover.testing.faults import DelayPDUs, FaultKind, SlowDrip, find_fault
from pyiscsi_failover.testing.logical_unit import LogicalUnit, LogicalUnits
from pyiscsi_failover.testing.target import (
    ChallengeReceived,
    Event,
    FaultInjected,
    Hold,
    LoginFinished,
    LogoutReceived,
    PortalConfig,
    ProtocolViolation,
    TargetConfig,
    TargetConnection,
)

__all__ = ["ConnectionRecord", "LoginRecord", "RunningTarget", "serve_target"]

logger = logging.getLogger(__name__)

_LISTEN_BACKLOG = 128
_RECEIVE_SIZE = 65536
# Blackhole: how many of our own connections may be needed to fill a listen(0) accept queue, and
# how long one may take to connect before we conclude that its SYN was dropped (the queue is
# full). Linux needs one and says so through TCP_INFO, so the wait is only a fallback.
_MAX_FILLERS = 8
_FILLER_CONNECT_SECONDS = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRecord:
    """One login as the target saw it end."""

    portal: Portal
    portal_name: str
    initiator_name: str | None
    isid: ISID | None
    target_name: str | None
    session_type: SessionType | None
    status: LoginStatus
    tsih: int

    @property
    def succeeded(self) -> bool:
        return self.status is LoginStatus.SUCCESS


class ConnectionRecord:
    """What happened on one accepted connection; updated while the connection lives."""

    __slots__ = (
        "bytes_buffered",
        "bytes_received",
        "bytes_sent",
        "events",
        "logged_out",
        "login",
        "open",
        "peer",
        "portal",
        "portal_name",
        "reset",
    )

    def __init__(self, *, portal: Portal, portal_name: str, peer: str) -> None:
        self.portal = portal
        self.portal_name = portal_name
        self.peer = peer
        self.events: list[Event] = []
        self.open = True
        self.login: LoginRecord | None = None
        self.logged_out = False
        #: True when the target reset the connection (reset-mid-login).
        self.reset = False
        self.bytes_received = 0
        self.bytes_sent = 0
        #: Received bytes that are not yet a whole PDU: the target waits for the rest.
        self.bytes_buffered = 0

    def __repr__(self) -> str:
        return (
            f"ConnectionRecord(portal={self.portal_name!r}, peer={self.peer!r}, open={self.open}, "
            f"login={self.login!r}, logged_out={self.logged_out})"
        )

    @property
    def lingering(self) -> bool:
        """Logged in and never logged out: the session would linger on a real target."""
        return self.login is not None and self.login.succeeded and not self.logged_out

    @property
    def faults(self) -> list[FaultKind]:
        return [event.kind for event in self.events if isinstance(event, FaultInjected)]

    @property
    def violations(self) -> list[str]:
        return [event.description for event in self.events if isinstance(event, ProtocolViolation)]


class RunningTarget:
    """A serving test target: its bound portals and the record of every connection."""

    def __init__(self, config: TargetConfig, logical_units: LogicalUnits) -> None:
        #: The configuration with every port resolved.
        self.config = config
        #: Every LUN of every target, shared by all connections (and so all portals).
        self.logical_units = logical_units
        #: Bound portals (with their tpgt), in configuration order.
        self.portals: list[Portal] = [portal.portal for portal in config.portals]
        self.connections: list[ConnectionRecord] = []
        #: Mutual-CHAP challenges initiators sent (for the reflect-challenge fault).
        self.challenges: list[bytes] = []
        self._changed = trio.Event()
        self._next_tsih = 1

    def __repr__(self) -> str:
        portals = ", ".join(str(portal) for portal in self.portals)
        return f"RunningTarget(portals=[{portals}], connections={len(self.connections)})"

    def logical_unit(self, target_name: str, lun: int) -> LogicalUnit:
        """The LU serving ``lun`` of ``target_name`` (its image can be read and written)."""
        target = self.config.find_target(target_name)
        unit = None if target is None else self.logical_units.get(target.name, lun)
        if unit is None:
            raise LocalProtocolError(f"no LUN {lun} in target {target_name!r}")
        return unit

    def portal(self, name: str) -> Portal:
        """The bound address of the portal configured as ``name``."""
        found = self.config.find_portal(name)
        if found is None:
            raise LocalProtocolError(f"no portal named {name!r}")
        return found.portal

    @property
    def logins(self) -> list[LoginRecord]:
        return [c.login for c in self.connections if c.login is not None]

    @property
    def logouts(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if c.logged_out]

    @property
    def open_connections(self) -> list[ConnectionRecord]:
        return [c for c in self.connections if c.open]

    @property
    def lingering_sessions(self) -> list[ConnectionRecord]:
        """Connections that logged in and never logged out."""
        return [c for c in self.connections if c.lingering]

    @property
    def violations(self) -> list[str]:
        return [v for c in self.connections for v in c.violations]

    async def wait_for(self, predicate: Callable[[RunningTarget], bool]) -> None:
        """Return once ``predicate(self)`` holds; it is re-checked after every change."""
        while not predicate(self):
            await self._changed.wait()

    async def wait_idle(self) -> None:
        """Return once no connection is open (e.g. after the initiator under test is done)."""
        await self.wait_for(lambda running: not running.open_connections)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _allocate_tsih(self) -> int:
        tsih = self._next_tsih
        self._next_tsih = tsih % 0xFFFF + 1
        return tsih


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET  # a host name: resolved by bind() in that family


def _accept_queue_full(sock: trio.socket.SocketType) -> bool:
    """Linux: TCP_INFO of a listening socket gives its accept queue length and backlog."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None or not sys.platform.startswith("linux"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
    except OSError:
        return False
    if len(info) < 32:
        return False
    queued, backlog = struct.unpack_from("=II", info, 24)  # tcpi_unacked, tcpi_sacked
    return bool(queued > backlog)


async def _fill_accept_queue(
    listener: trio.socket.SocketType, family: socket.AddressFamily, address: object
) -> list[trio.socket.SocketType]:
    """Connect to ``listener`` until its accept queue is full; return the connections."""
    fillers: list[trio.socket.SocketType] = []
    try:
        for _ in range(_MAX_FILLERS):
            if _accept_queue_full(listener):
                return fillers
            filler = trio.socket.socket(family, socket.SOCK_STREAM)
            fillers.append(filler)
            with trio.move_on_after(_FILLER_CONNECT_SECONDS) as scope:
                await filler.connect(address)
            if scope.cancelled_caught:
                fillers.pop().close()  # its SYN was dropped: the queue is already full
                return fillers
    except BaseException:
        for filler in fillers:
            filler.close()
        raise
    for filler in fillers:
        filler.close()
    raise LocalProtocolError("could not fill the accept queue of a blackhole portal")


class _Server:
    """Everything serve_target opened, so that it can all be closed."""

    def __init__(self) -> None:
        self.sockets: list[trio.socket.SocketType] = []

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    async def bind(
        self, portal: PortalConfig
    ) -> tuple[PortalConfig, trio.socket.SocketType | None]:
        """Bind one portal; return it with its real port, and the socket to accept on (if any)."""
        family = _family(portal.host)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        self.sockets.append(sock)
        refuse = portal.has(FaultKind.REFUSE)
        if not refuse:
            # Not for a refusing portal: on Linux two SO_REUSEADDR sockets may share a port
            # while neither listens, so someone else could start listening on "our" dead port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((portal.host, portal.port))
        bound = replace(portal, port=sock.getsockname()[1])
        if refuse:
            return bound, None  # bound, never listening: connect() gets RST
        if portal.has(FaultKind.BLACKHOLE):
            sock.listen(0)
            self.sockets.extend(await _fill_accept_queue(sock, family, sock.getsockname()))
            return bound, None  # never accepted
        sock.listen(_LISTEN_BACKLOG)
        return bound, sock


@contextlib.asynccontextmanager
async def serve_target(config: TargetConfig) -> AsyncIterator[RunningTarget]:
    """Serve ``config`` until the block exits; yields the :class:`RunningTarget`."""
    server = _Server()
    # Backing files are opened (and their problems reported) before any portal is bound.
    logical_units = LogicalUnits(config.targets, open_backing=open_backing_file)
    try:
        bound: list[tuple[PortalConfig, trio.socket.SocketType | None]] = []
        for portal in config.portals:
            bound.append(await server.bind(portal))
        resolved = replace(config, portals=tuple(portal for portal, _ in bound))
        running = RunningTarget(resolved, logical_units)
        # The caller's exception is kept out of the nursery, which would wrap it in an
        # ExceptionGroup, and re-raised unchanged once the nursery is done.
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            for portal, sock in bound:
                if sock is not None:
                    nursery.start_soon(_accept_loop, running, portal, sock, nursery)
            try:
                yield running
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
    finally:
        server.close()
        logical_units.close()


async def _accept_loop(
    running: RunningTarget,
    portal: PortalConfig,
    sock: trio.socket.SocketType,
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            conn, peer = await sock.accept()
        except OSError as exc:
            # EMFILE and friends: log and keep serving, as trio's SocketListener does.
            logger.warning("accept on portal %s failed: %s", portal.name, exc)
            await trio.sleep(0.01)
            continue
        nursery.start_soon(_serve_connection, running, portal, trio.SocketStream(conn), peer)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST: SO_LINGER on, timeout 0."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def _record_events(
    running: RunningTarget, record: ConnectionRecord, conn: TargetConnection
) -> None:
    while (event := conn.next_event()) is not None:
        record.events.append(event)
        logger.debug("portal %s, peer %s: %s", record.portal_name, record.peer, event)
        match event:
            case LoginFinished():
                logger.info(
                    "portal %s: login of %s to %s: %s",
                    record.portal_name,
                    event.initiator_name,
                    event.target_name or "discovery",
                    event.status.name,
                )
                record.login = LoginRecord(
                    portal=record.portal,
                    portal_name=record.portal_name,
                    initiator_name=event.initiator_name,
                    isid=event.isid,
                    target_name=event.target_name,
                    session_type=event.session_type,
                    status=event.status,
                    tsih=event.tsih,
                )
            case LogoutReceived():
                record.logged_out = True
            case ChallengeReceived():
                running.challenges.append(event.challenge)
    running._notify()


async def _send(
    stream: trio.SocketStream,
    portal: PortalConfig,
    items: list[bytes | Hold],
    received_at: float,
) -> int:
    """Send ``items`` (PDUs, and holds counted from ``received_at``); the bytes sent."""
    delay = find_fault(portal.faults, FaultKind.DELAY)
    drip = find_fault(portal.faults, FaultKind.SLOW_DRIP)
    sent = 0
    for pdu in items:
        if isinstance(pdu, Hold):
            await trio.sleep_until(received_at + pdu.seconds)
            continue
        sent += len(pdu)
        if isinstance(delay, DelayPDUs):
            await trio.sleep(delay.seconds)
        if isinstance(drip, SlowDrip):
            for index in range(len(pdu)):
                await stream.send_all(pdu[index : index + 1])
                await trio.sleep(drip.interval)
        else:
            await stream.send_all(pdu)
    return sent


async def _serve_connection(
    running: RunningTarget, portal: PortalConfig, stream: trio.SocketStream, peer: object
) -> None:
    record = ConnectionRecord(portal=portal.portal, portal_name=portal.name, peer=_peer_text(peer))
    running.connections.append(record)
    conn = TargetConnection(
        running.config,
        portal=portal.portal,
        tsih=running._allocate_tsih(),
        seen_challenges=running.challenges,
        logical_units=running.logical_units,
    )
    silent = portal.has(FaultKind.SILENT)
    reset = False
    try:
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            received_at = trio.current_time()
            record.bytes_received += len(data)
            conn.receive_data(data)
            record.bytes_buffered = conn.buffered
            _record_events(running, record, conn)
            pdus = conn.output()
            if conn.abort:
                reset = True
                break
            if silent:
                if not data:
                    break
                continue  # read everything, answer nothing
            if pdus:
                record.bytes_sent += await _send(stream, portal, pdus, received_at)
            if conn.closed or not data:
                break
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        logger.debug("connection from %s on %s broke: %s", record.peer, portal.name, exc)
    finally:
        if reset:
            record.reset = True
            _reset(stream)
        else:
            stream.socket.close()
        record.open = False
        running._notify()
