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
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Outcome, ProbeOptions, probe
from pyiscsi_failover.protocol.negotiation import Digest
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
