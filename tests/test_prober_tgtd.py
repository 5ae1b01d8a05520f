"""The prober against real tgtd portals on loopback: the choice, the outcomes, the hand-off.

Each test starts its own tgtd daemons (``tgtd_factory``), each on a fresh loopback address.
A "dead" portal is a loopback socket that is bound but never listens, so a connect to it is
refused at once and nothing else can take the address meanwhile. Every policy must choose what
``sequential`` chooses, leave no I_T nexus (session) behind on tgtd, and, after a tgt redirect,
hand open-iscsi the portal RFC 7143 says to keep: the original one for a temporary redirect
(0x0101), the new one for a permanent redirect (0x0102).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from typing import Literal

import pytest
import trio
from peers import Tgtd, TgtdStarter, unique_loopback

from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Outcome, Policy, ProbeOptions, ProbeResult, probe

pytestmark = pytest.mark.peer

INITIATOR = "iqn.2026-11.test.pyiscsi:prober-tgtd"
VOLUME = "iqn.2026-11.test.pyiscsi:prober-volume"
LOCKED = "iqn.2026-11.test.pyiscsi:prober-locked"
MISSING = "iqn.2026-11.test.pyiscsi:prober-missing"
# tgt's CHAP accounts are global; LOCKED is bound to someone else's account, so our (valid)
# credentials are the wrong ones for it.
OUR_CHAP = ChapCredentials("prober", Secret(b"prober-secret-0123"))
SOMEONE_ELSE = ("someone", "someone-elses-secret")
CONNECT_TIMEOUT = 1.0
LOGIN_TIMEOUT = 3.0
DEADLINE = 20.0
#: Every candidate here answers at once, so a whole run takes milliseconds; this is generous.
FAST_RUN = 2.0
#: How long tgtd may take to drop a closed connection's I_T nexus.
NEXUS_GONE = 5.0


@pytest.fixture
def dead_portal() -> Iterator[Portal]:
    """A loopback address and port that refuses connections for the whole test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((unique_loopback(), 0))  # bound, never listening: connect() gets RST
        host, port = sock.getsockname()
        yield Portal(host=host, port=port)
    finally:
        sock.close()


def serve_volume(daemon: Tgtd, *, locked: bool = False) -> None:
    """VOLUME (tid 1) for our CHAP account; with ``locked``, also LOCKED (tid 2) for someone
    else's account."""
    daemon.add_target(1, VOLUME)
    daemon.allow(1)
    daemon.add_account(OUR_CHAP.username, OUR_CHAP.secret.reveal_str())
    daemon.bind_account(1, OUR_CHAP.username)
    if locked:
        daemon.add_target(2, LOCKED)
        daemon.allow(2)
        daemon.add_account(*SOMEONE_ELSE)
        daemon.bind_account(2, SOMEONE_ELSE[0])


def info_for(candidates: Sequence[tuple[Portal | str, str]]) -> ConnectionInfo:
    data = build_connection_info(
        [portal if isinstance(portal, str) else str(portal) for portal, _ in candidates],
        [iqn for _, iqn in candidates],
        0,
        auth=OUR_CHAP,
    )
    return parse_connection_info(data)


def options(policy: Policy) -> ProbeOptions:
    return ProbeOptions(
        policy=policy,
        connect_timeout=CONNECT_TIMEOUT,
        login_timeout=LOGIN_TIMEOUT,
        initiator_name=INITIATOR,
    )


async def assert_no_session_left(*daemons: Tgtd) -> None:
    """tgtd lists an ``I_T nexus: N`` line per live session; none may remain.

    tgtd drops a session when its connection ends, which it learns asynchronously, so this
    polls tgtadm (there is no event to wait on in another process) under a deadline.
    """
    with trio.fail_after(NEXUS_GONE):
        for daemon in daemons:
            while "I_T nexus: " in daemon.show():  # noqa: ASYNC110 (state of another process)
                await trio.sleep(0.02)


def assert_logged_out(result: ProbeResult) -> None:
    for attempt in result.attempts:
        if attempt.ok:
            assert attempt.report is not None
            assert attempt.report.logout is not None, attempt.detail


@pytest.mark.parametrize("policy", list(Policy))
async def test_every_policy_skips_dead_missing_and_wrong_chap_candidates(
    tgtd_factory: TgtdStarter, dead_portal: Portal, policy: Policy
) -> None:
    first = tgtd_factory()
    second = tgtd_factory()
    serve_volume(first, locked=True)
    serve_volume(second)
    # One more portal on the second daemon, on its own loopback address.
    extra = Portal(host=unique_loopback(), port=3260)
    second.tgtadm("--op", "new", "--mode", "portal", "--param", f"portal={extra}")
    info = info_for(
        [
            (dead_portal, VOLUME),  # refused
            (first.portal, MISSING),  # tgtd serves no such target
            (first.portal, LOCKED),  # our CHAP account is not this target's
            (extra, VOLUME),  # works: the choice
            (first.portal, VOLUME),  # works too, but comes later
        ]
    )
    with trio.fail_after(DEADLINE):
        result = await probe(info, options(policy))
        await assert_no_session_left(first, second)
    outcomes = [a.outcome for a in result.attempts]
    assert outcomes[:4] == [Outcome.REFUSED, Outcome.NOT_FOUND, Outcome.AUTH_FAILED, Outcome.OK]
    if policy is Policy.ORDERED:
        # Started alongside the others and cut off once #3 won, unless it had finished already;
        # or never started, when #3 won before the start loop reached it.
        assert outcomes[4] in (Outcome.CANCELLED, Outcome.OK, Outcome.NOT_TRIED)
    else:
        assert outcomes[4] is Outcome.NOT_TRIED
    assert result.candidate is not None and result.candidate.index == 3
    assert result.to_json()["chosen"] == {"portal": str(extra), "iqn": VOLUME, "lun": 0}
    assert result.elapsed_s < FAST_RUN
    assert_logged_out(result)
    assert "0x0203" in result.attempts[1].detail
    assert "0x0201" in result.attempts[2].detail


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("last_target", [False, True], ids=["others-remain", "last-target"])
async def test_a_target_deleted_from_the_main_portal_fails_over(
    tgtd_factory: TgtdStarter, policy: Policy, last_target: bool
) -> None:
    # The main target existed and was then removed (a volume migrated away); the alternative
    # on another daemon is chosen. tgt answers "not found" (0x0203) while it serves other
    # targets, but once it serves none it just closes the connection during the login.
    main = tgtd_factory()
    alternative = tgtd_factory()
    serve_volume(main, locked=not last_target)
    serve_volume(alternative)
    main.delete_target(1)
    info = info_for([(main.portal, VOLUME), (alternative.portal, VOLUME)])
    with trio.fail_after(DEADLINE):
        result = await probe(info, options(policy))
        await assert_no_session_left(main, alternative)
    gone = result.attempts[0]
    if last_target:
        assert gone.outcome is Outcome.PROTOCOL_ERROR
        # A FIN or, when tgtd is busy, an RST: either way lost while negotiating security.
        assert "during security negotiation" in gone.detail
        assert "during failed" not in gone.detail
    else:
        assert gone.outcome is Outcome.NOT_FOUND
    assert result.attempts[1].outcome is Outcome.OK
    assert result.candidate is not None and result.candidate.index == 1
    assert result.elapsed_s < FAST_RUN
    assert_logged_out(result)


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("reason", ["Temporary", "Permanent"])
async def test_tgt_redirect_hands_off_the_portal_rfc_7143_keeps(
    tgtd_factory: TgtdStarter,
    dead_portal: Portal,
    policy: Policy,
    reason: Literal["Temporary", "Permanent"],
) -> None:
    old = tgtd_factory()
    new = tgtd_factory()
    serve_volume(old)
    serve_volume(new)
    old.redirect(1, new.host, new.port, reason)
    info = info_for([(dead_portal, VOLUME), (old.portal, VOLUME)])
    with trio.fail_after(DEADLINE):
        result = await probe(info, options(policy))
        await assert_no_session_left(old, new)
    assert [a.outcome for a in result.attempts] == [Outcome.REFUSED, Outcome.OK]
    chosen = result.chosen
    assert chosen is not None and chosen.candidate.index == 1
    new_portal = Portal(host=new.host, port=new.port)
    assert chosen.redirected_to == new_portal
    # Temporary: open-iscsi must keep using the address it was given; permanent: the new one.
    handoff = new_portal if reason == "Permanent" else Portal.parse(old.portal)
    assert chosen.handoff_portal == handoff
    body = result.to_json()
    assert body["chosen"] == {"portal": str(handoff), "iqn": VOLUME, "lun": 0}
    attempts = body["attempts"]
    assert isinstance(attempts, list)
    assert attempts[1]["redirected_to"] == str(new_portal)
    assert attempts[1]["portal"] == old.portal  # the candidate itself is reported unchanged
    assert_logged_out(result)
