"""Targets that require digests: the probe must answer for a session that really works.

Such a target answers ``HeaderDigest=None`` with ``Reject`` and then cannot read a PDU without
a digest. We offer ``None,CRC32C`` by default (None preferred, so targets that accept it see no
change), honour the target's choice, and end the login as ``negotiation_failed`` when the target
rejects every digest we offer, rather than report "ok" for a session whose logout goes unanswered.
Checked against the real tgtd with its digests set to CRC32C per target (tgtadm): tgt then picks
CRC32C from our offer, but still accepts a plain ``None`` offer, so it cannot show the refusal;
our test target's digest modes do (``digests-required``, ``reject-digests``).
"""

from __future__ import annotations

import pytest
import trio
from peers import Tgtd, TgtdStarter

from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.errors import NegotiationError
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Outcome, ProbeOptions, probe
from pyiscsi_failover.protocol.negotiation import Digest, OperationalProposal
from pyiscsi_failover.testing import (
    DigestsRequired,
    Fault,
    PortalConfig,
    RejectDigests,
    TargetConfig,
    TargetSpec,
    serve_target,
)
from pyiscsi_failover.transport import login

INITIATOR = "iqn.2026-12.test.pyiscsi:digests"
IQN = "iqn.2026-12.test.pyiscsi:digests-required"
OPEN_IQN = "iqn.2026-12.test.pyiscsi:digests-optional"
DEADLINE = 20


@pytest.fixture
def tgtd(tgtd_factory: TgtdStarter) -> Tgtd:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN, luns=1)
    daemon.allow(1)
    daemon.set_param(1, "HeaderDigest", "CRC32C")
    daemon.set_param(1, "DataDigest", "CRC32C")
    daemon.add_target(2, OPEN_IQN, luns=1)
    daemon.allow(2)
    return daemon


@pytest.mark.peer
async def test_default_offer_logs_in_with_the_digests_tgtd_requires(tgtd: Tgtd) -> None:
    with trio.fail_after(DEADLINE):
        report = await login(
            Portal.parse(tgtd.portal), LoginConfig(initiator_name=INITIATOR, target_name=IQN)
        )
    assert isinstance(report.outcome, LoginSucceeded)
    assert report.outcome.parameters.header_digest is Digest.CRC32C
    assert report.outcome.parameters.data_digest is Digest.CRC32C
    # The logout travels with digests and is answered: the session was really usable.
    assert report.logout is not None, report.notes


@pytest.mark.peer
async def test_default_offer_keeps_none_where_tgtd_allows_it(tgtd: Tgtd) -> None:
    with trio.fail_after(DEADLINE):
        report = await login(
            Portal.parse(tgtd.portal), LoginConfig(initiator_name=INITIATOR, target_name=OPEN_IQN)
        )
    assert isinstance(report.outcome, LoginSucceeded)
    assert report.outcome.parameters.header_digest is Digest.NONE
    assert report.outcome.parameters.data_digest is Digest.NONE
    assert report.logout is not None, report.notes


@pytest.mark.peer
async def test_the_probe_reports_the_digests_for_the_hand_off(tgtd: Tgtd) -> None:
    info = parse_connection_info(build_connection_info([tgtd.portal], IQN, 1))
    with trio.fail_after(DEADLINE):
        result = await probe(info, ProbeOptions(initiator_name=INITIATOR))
    assert result.chosen is not None and result.chosen.outcome is Outcome.OK
    negotiated = result.chosen.negotiated
    assert negotiated is not None
    assert (negotiated.header_digest, negotiated.data_digest) == (Digest.CRC32C, Digest.CRC32C)
    assert result.chosen.notes == ()


def target_with(fault: Fault) -> TargetConfig:
    return TargetConfig(
        portals=(PortalConfig(host="127.0.0.1", port=0, name="p", faults=(fault,)),),
        targets=(TargetSpec(name=IQN),),
    )


@pytest.mark.parametrize(
    ("fault", "offer", "key"),
    [
        (DigestsRequired(), (Digest.NONE,), "HeaderDigest"),
        (DigestsRequired(header=False), (Digest.NONE,), "DataDigest"),
        (RejectDigests(), (Digest.NONE, Digest.CRC32C), "HeaderDigest"),
    ],
    ids=["required-none-offered", "data-required-none-offered", "reject-digests"],
)
async def test_a_rejected_digest_is_negotiation_failed_not_ok(
    fault: Fault, offer: tuple[Digest, ...], key: str
) -> None:
    """Before, the probe logged a warning, kept None and said "ok" for a target no session
    could use (its logout went unanswered). Now the candidate fails, naming the key. We log
    out of the session the target completed; a target that demands header digests after
    rejecting our offer cannot read that logout, so there we can only close the connection."""
    proposal = OperationalProposal(header_digest=offer, data_digest=offer)
    config = LoginConfig(initiator_name=INITIATOR, target_name=IQN, proposal=proposal)
    with trio.fail_after(DEADLINE):
        async with serve_target(target_with(fault)) as running:
            with pytest.raises(NegotiationError) as caught:
                await login(running.portal("p"), config, login_timeout=2)
            await running.wait_idle()
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{running.portal('p')}: target rejected {key}=")
    assert not running.open_connections
    unreadable_logout = isinstance(fault, DigestsRequired) and fault.header
    assert bool(running.lingering_sessions) == unreadable_logout


@pytest.mark.parametrize("fault", [DigestsRequired(), DigestsRequired(header=False)])
async def test_our_target_requiring_digests_gets_them_from_the_default_offer(
    fault: DigestsRequired,
) -> None:
    with trio.fail_after(DEADLINE):
        async with serve_target(target_with(fault)) as running:
            report = await login(
                running.portal("p"), LoginConfig(initiator_name=INITIATOR, target_name=IQN)
            )
            await running.wait_idle()
    assert isinstance(report.outcome, LoginSucceeded)
    params = report.outcome.parameters
    assert (params.header_digest is Digest.CRC32C) == fault.header
    assert params.data_digest is Digest.CRC32C
    assert report.logout is not None, report.notes
    assert not running.violations
