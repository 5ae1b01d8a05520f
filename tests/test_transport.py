"""The trio boundary: OS errors become ours, deadlines hold, redirects are bounded."""

from __future__ import annotations

import errno
import socket
from functools import partial

import pytest
import trio

from pyiscsi_failover.errors import (
    ConnectionLost,
    ConnectRefused,
    ConnectTimeout,
    LocalProtocolError,
    LoginFailed,
    NotAnISCSITarget,
    ProtocolError,
    RedirectLoopError,
    Unreachable,
)
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.negotiation import Digest, OperationalProposal
from pyiscsi_failover.testing import (
    Blackhole,
    GarbageKeyValues,
    PortalConfig,
    Redirect,
    RedirectLoop,
    SplitText,
    TargetConfig,
    TargetSpec,
    serve_target,
)
from pyiscsi_failover.transport import _network_error, discover, login, open_connection

IQN = "iqn.2026-11.test.pyiscsi:transport"
INITIATOR = "iqn.2026-11.test.pyiscsi:initiator"
HERE = Portal(host="127.0.0.1", port=3260)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ConnectRefused),
        (OSError(errno.ENETUNREACH, "unreachable"), Unreachable),
        (OSError(errno.EHOSTUNREACH, "no route"), Unreachable),
        (OSError(errno.EADDRNOTAVAIL, "not available"), Unreachable),
        (ConnectionResetError(errno.ECONNRESET, "reset"), ConnectionLost),
    ],
)
def test_os_errors_map_to_ours(exc: OSError, expected: type[Exception]) -> None:
    mapped = _network_error(exc, HERE, "login")
    assert type(mapped) is expected
    assert str(HERE) in str(mapped)


async def test_refused_port() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connects get RST
        port = holder.getsockname()[1]
        with trio.fail_after(5), pytest.raises(ConnectRefused):
            await open_connection(Portal(host="127.0.0.1", port=port))


async def test_blackholed_portal_hits_the_connect_deadline() -> None:
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, faults=(Blackhole(),)),),
        targets=(TargetSpec(name=IQN),),
    )
    async with serve_target(config) as running:
        start = trio.current_time()
        with trio.fail_after(5), pytest.raises(ConnectTimeout, match=r"0\.2 s"):
            await login(
                running.portals[0],
                LoginConfig(initiator_name=INITIATOR, target_name=IQN),
                connect_timeout=0.2,
            )
        assert 0.2 <= trio.current_time() - start < 2


async def test_redirect_is_followed_and_loops_are_errors() -> None:
    config = TargetConfig(
        portals=(
            PortalConfig(host="127.0.0.1", port=0, name="old", faults=(Redirect(to="new"),)),
            PortalConfig(host="127.0.0.1", port=0, name="new"),
            PortalConfig(host="127.0.0.1", port=0, name="loop", faults=(RedirectLoop(),)),
        ),
        targets=(TargetSpec(name=IQN),),
    )
    async with serve_target(config) as running:
        old, new, loop = running.portals
        with trio.fail_after(5):
            report = await login(old, LoginConfig(initiator_name=INITIATOR, target_name=IQN))
        assert isinstance(report.outcome, LoginSucceeded)
        assert (report.final_portal.host, report.final_portal.port) == (new.host, new.port)
        assert report.handoff_portal == old  # temporary: keep the original address
        with trio.fail_after(5), pytest.raises(RedirectLoopError, match="redirect loop"):
            await login(loop, LoginConfig(initiator_name=INITIATOR, target_name=IQN))
        await running.wait_idle()
        assert not running.lingering_sessions


async def test_discover_needs_a_discovery_config() -> None:
    with pytest.raises(LocalProtocolError):
        await discover(HERE, LoginConfig(initiator_name=INITIATOR, target_name=IQN))


@pytest.mark.parametrize("split", [False, True])
async def test_discovery_with_crc32c_digests_on_the_wire(split: bool) -> None:
    # SendTargets answers carry data, so both digests are exercised after login, also when
    # the answer is split over several PDUs.
    faults = (SplitText(chunk=40),) if split else ()
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, faults=faults),),
        targets=(TargetSpec(name=IQN), TargetSpec(name=IQN + "-2")),
    )
    proposal = OperationalProposal(header_digest=(Digest.CRC32C,), data_digest=(Digest.CRC32C,))
    async with serve_target(config) as running:
        with trio.fail_after(5):
            report = await discover(
                running.portals[0], LoginConfig(initiator_name=INITIATOR, proposal=proposal)
            )
        assert isinstance(report.outcome, LoginSucceeded)
        assert report.outcome.parameters.header_digest is Digest.CRC32C
        assert report.outcome.parameters.data_digest is Digest.CRC32C
        assert sorted(t.iqn for t in report.targets) == [IQN, IQN + "-2"]
        assert report.logout is not None


async def test_raise_for_status_gives_login_failed_with_the_status() -> None:
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0),), targets=(TargetSpec(name=IQN),)
    )
    async with serve_target(config) as running:
        with trio.fail_after(5):
            ok = await login(
                running.portals[0], LoginConfig(initiator_name=INITIATOR, target_name=IQN)
            )
            missing = await login(
                running.portals[0],
                LoginConfig(initiator_name=INITIATOR, target_name=IQN + "-missing"),
            )
    assert ok.raise_for_status() is ok.outcome
    with pytest.raises(LoginFailed, match=r"target not found \(0x0203\)") as caught:
        missing.raise_for_status()
    assert (caught.value.status_class, caught.value.status_detail) == (2, 3)
    assert caught.value.retryable is False


async def test_a_refused_final_login_answer_is_still_logged_out() -> None:
    # The target completes the login (T=1, NSG=FullFeaturePhase) with a value we refuse: it
    # holds a session, so we log out of it before reporting the protocol error.
    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, faults=(GarbageKeyValues(),)),),
        targets=(TargetSpec(name=IQN),),
    )
    async with serve_target(config) as running:
        with trio.fail_after(5), pytest.raises(ProtocolError, match="banana"):
            await login(running.portals[0], LoginConfig(initiator_name=INITIATOR, target_name=IQN))
        await running.wait_idle()
        assert [login.succeeded for login in running.logins] == [True]
        assert not running.lingering_sessions
        assert [record.logged_out for record in running.connections] == [True]


@pytest.mark.parametrize(
    ("banner", "then_wait"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 400 Bad Request\r\n" + b"X-Padding: x\r\n" * 8 + b"\r\n", False),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", True),
    ],
    ids=["http-short", "http-long", "ssh-waits"],
)
async def test_a_peer_that_is_not_iscsi_is_named_as_such(banner: bytes, then_wait: bool) -> None:
    """An HTTP or SSH server on the port is one clear line naming the portal, not "unknown
    opcode 0x08", whether it closes after a short reply, sends a whole (undecodable) header's
    worth, or waits for us after its banner (we then stop at the login deadline).
    A target's bad PDU (the hostile suite's malformed-pdu) stays a decode error."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(banner)
            if then_wait:
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        portal = Portal(host="127.0.0.1", port=port)
        with trio.fail_after(5), pytest.raises(NotAnISCSITarget) as caught:
            await login(
                portal, LoginConfig(initiator_name=INITIATOR, target_name=IQN), login_timeout=0.3
            )
        nursery.cancel_scope.cancel()
    assert str(caught.value) == f"{portal}: not an iSCSI target (its reply is not an iSCSI PDU)"


async def test_idle_work_runs_once_and_only_when_the_peer_has_not_answered() -> None:
    """The LUN check reads its answers while it would wait: never before data already there."""
    from pyiscsi_failover.transport import _receive_some

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(b"ready")
        calls: list[str] = []
        with trio.fail_after(5):
            assert await _receive_some(ours, lambda: calls.append("idle")) == b"ready"
        assert calls == []  # the answer was in: nothing ran before it

        def idle() -> None:
            calls.append("idle")
            theirs.sendall(b"late")  # the peer answers while we work

        with trio.fail_after(5):
            assert await _receive_some(ours, idle) == b"late"
        assert calls == ["idle"]
