"""attach_volume: probe, hand off, and go on past a failed hand-off, in the given order.

The candidates are our own test target on loopback (in this process); open-iscsi is the fake
iscsiadm (tests/fake_iscsiadm), which can fail the kernel's login at one portal and make the
disk appear at another; the kernel's WWID comes from a sysfs tree of our own (sysfs_tree.py).
The real kernel's part is proven in the VM (tests/test_vm_kernel.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fakes import Fake

from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.errors import IscsiadmUnavailable
from pyiscsi_failover.iscsiadm import Iscsiadm, IscsiadmExit, RecordLedger
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Check, Outcome, Policy, ProbeOptions
from pyiscsi_failover.testing import PortalConfig, TargetConfig, TargetSpec, serve_target
from pyiscsi_failover.testing.config import LunSpec
from pyiscsi_failover.testing.faults import Refuse
from pyiscsi_failover.volume import HandoffOutcome, attach_volume

IQN = "iqn.2026-12.test.pyiscsi:volume"
INITIATOR = "iqn.2026-12.test.pyiscsi:initiator"
WWID = "naa.600000000000000000000000000000a1"
OTHER_WWID = "naa.600000000000000000000000000000b2"


@asynccontextmanager
async def three_portals(*, refuse_first: bool = False) -> AsyncIterator[list[Portal]]:
    faults = (Refuse(),) if refuse_first else ()
    config = TargetConfig(
        portals=(
            PortalConfig(host="127.0.0.1", port=0, name="a", faults=faults),
            PortalConfig(host="127.0.0.1", port=0, name="b"),
            PortalConfig(host="127.0.0.1", port=0, name="c"),
        ),
        targets=(TargetSpec(name=IQN, luns=(LunSpec(lun=1, wwid=WWID),)),),
    )
    async with serve_target(config) as running:
        yield list(running.portals)


def volume(portals: list[Portal]) -> dict[str, object]:
    main, *alternatives = (f"{p.host}:{p.port}" for p in portals)
    document = build_connection_info(main, IQN, 1)
    data = document["data"]
    assert isinstance(data, dict)
    data["target_alternative_portals"] = alternatives
    data["target_alternative_iqns"] = [IQN] * len(alternatives)
    data["target_alternative_luns"] = [1] * len(alternatives)
    return document


def devices(fake: Fake, portals: list[Portal], *, at: list[int]) -> dict[int, Path]:
    """Let the kernel's disk appear (the fake's login creates it) at the portals ``at``."""
    paths = {
        i: fake.dev_root / f"ip-{portals[i].host}:{portals[i].port}-iscsi-{IQN}-lun-1" for i in at
    }
    fake.env["FAKE_ISCSIADM_DEVICES"] = json.dumps(
        {f"{portals[i].host}:{portals[i].port}": str(path) for i, path in paths.items()}
    )
    return paths


def options(**changes: object) -> ProbeOptions:
    base: dict[str, object] = {
        "initiator_name": INITIATOR,
        "policy": Policy.ORDERED,
        "connect_timeout": 2.0,
        "login_timeout": 3.0,
    }
    return ProbeOptions(**{**base, **changes})  # type: ignore[arg-type]


def key(portal: Portal) -> str:
    return f"{IQN} {portal.host}:{portal.port}"


async def test_a_failed_kernel_login_goes_on_to_the_next_candidate(fake: Fake) -> None:
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        paths = devices(fake, portals, at=[0, 1, 2])
        fake.env["FAKE_ISCSIADM_EXIT"] = json.dumps(
            {f"login@{portals[0].host}:{portals[0].port}": IscsiadmExit.LOGIN_AUTH_FAILED}
        )
        ledger = RecordLedger(fake.tmp / "ledger.json")
        with trio.fail_after(30):
            attachment = await attach_volume(
                info, options(), iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger
            )
    assert [(h.index, h.outcome) for h in attachment.handoffs] == [
        (0, HandoffOutcome.LOGIN_FAILED),
        (1, HandoffOutcome.ATTACHED),
    ]
    assert "LOGIN_AUTH_FAILED" in attachment.handoffs[0].detail
    assert attachment.device == paths[1]
    # The second round probed the candidates still open, told with their own indexes.
    assert [a.candidate.index for a in attachment.probes[1].attempts] == [1, 2]
    assert attachment.probes[1].chosen is attachment.probes[1].attempts[0]
    # The first hand-off was undone: only the second's record and session are left, and ours.
    assert fake.saved() == {"records": [key(portals[1])], "sessions": [key(portals[1])]}
    assert [e.portal for e in ledger.entries()] == [f"{portals[1].host}:{portals[1].port}"]
    assert [json.loads(line)["op"] for line in fake.log.read_text().splitlines()].count(
        "login"
    ) == 2
    assert attachment.handoffs[1].to_json()["outcome"] == "attached"


async def test_each_login_is_bounded_and_the_records_own_bounds_come_back(fake: Fake) -> None:
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        devices(fake, portals, at=[1])
        first = key(portals[0])
        fake.preload(records=[first])
        (fake.state / "values.json").write_text(
            json.dumps(
                {
                    first: {
                        "node.conn[0].timeo.login_timeout": "30",
                        "node.session.initial_login_retry_max": "4",
                    }
                }
            )
        )
        fake.env["FAKE_ISCSIADM_EXIT"] = json.dumps(
            {f"login@{portals[0].host}:{portals[0].port}": IscsiadmExit.TRANS_TIMEOUT}
        )
        with trio.fail_after(30):
            attachment = await attach_volume(
                info,
                options(),
                iscsiadm=fake.iscsiadm(),
                dev_root=fake.dev_root,
                ledger=RecordLedger(fake.tmp / "ledger.json"),
            )
    assert attachment.attached is not None and attachment.attached.index == 1
    values = json.loads((fake.state / "values.json").read_text())
    # The operator's record was bounded to one try of 2 + 3 s for our login, then put back.
    assert values[first] == {
        "node.conn[0].timeo.login_timeout": "30",
        "node.session.initial_login_retry_max": "4",
        "node.startup": "manual",
        "node.session.scan": "manual",
        "node.session.auth.authmethod": "None",
        "node.conn[0].iscsi.HeaderDigest": "None",  # what the probe negotiated
        "node.conn[0].iscsi.DataDigest": "None",
    }
    updates = [
        argv[-3:]
        for op, argv in fake.calls()
        if op == "update" and argv[argv.index("-p") + 1].endswith(str(portals[0].port))
    ]
    assert ["node.conn[0].timeo.login_timeout", "-v", "5"] in updates
    assert updates[-2:] == [
        ["node.conn[0].timeo.login_timeout", "-v", "30"],
        ["node.session.initial_login_retry_max", "-v", "4"],
    ]
    assert fake.saved()["records"] == [first, key(portals[1])]  # the operator's record kept


async def test_a_disk_that_never_appears_goes_on_and_is_logged_out(fake: Fake) -> None:
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        paths = devices(fake, portals, at=[1])
        with trio.fail_after(30):
            attachment = await attach_volume(
                info,
                options(),
                iscsiadm=fake.iscsiadm(),
                dev_root=fake.dev_root,
                device_timeout=0.5,
                ledger=RecordLedger(fake.tmp / "ledger.json"),
            )
    outcomes = [h.outcome for h in attachment.handoffs]
    assert outcomes == [HandoffOutcome.NO_DEVICE, HandoffOutcome.ATTACHED]
    assert "did not appear within 0.5 s" in attachment.handoffs[0].detail
    assert attachment.device == paths[1]
    assert fake.saved() == {"records": [key(portals[1])], "sessions": [key(portals[1])]}


async def test_a_kernel_disk_showing_another_volume_is_never_kept(fake: Fake) -> None:
    sys_root = fake.tmp / "sys"
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        paths = devices(fake, portals, at=[0, 1])
        # The kernel's disk behind the first portal is another volume than the probe saw.
        for i, wwid in ((0, OTHER_WWID), (1, WWID)):
            disk = sys_root / "block" / paths[i].name / "device"
            disk.mkdir(parents=True)
            (disk / "wwid").write_text(f"{wwid}\n")
        with trio.fail_after(30):
            attachment = await attach_volume(
                info,
                options(check=Check.LUN),
                iscsiadm=fake.iscsiadm(),
                dev_root=fake.dev_root,
                ledger=RecordLedger(fake.tmp / "ledger.json"),
                sys_root=sys_root,
            )
    assert [h.outcome for h in attachment.handoffs] == [
        HandoffOutcome.WRONG_VOLUME,
        HandoffOutcome.ATTACHED,
    ]
    assert OTHER_WWID in attachment.handoffs[0].detail and WWID in attachment.handoffs[0].detail
    assert attachment.device == paths[1]
    assert fake.saved()["sessions"] == [key(portals[1])]


async def test_candidates_the_probe_found_dead_are_not_probed_again(fake: Fake) -> None:
    async with three_portals(refuse_first=True) as portals:
        info = parse_connection_info(volume(portals))
        devices(fake, portals, at=[2])
        with trio.fail_after(30):
            attachment = await attach_volume(
                info,
                options(policy=Policy.SEQUENTIAL),
                iscsiadm=fake.iscsiadm(),
                dev_root=fake.dev_root,
                device_timeout=0.5,
                ledger=RecordLedger(fake.tmp / "ledger.json"),
            )
    first = attachment.probes[0]
    assert [a.outcome for a in first.attempts][:2] == [Outcome.REFUSED, Outcome.OK]
    assert [[a.candidate.index for a in p.attempts] for p in attachment.probes[1:]] == [[2]]
    assert [(h.index, h.outcome.value) for h in attachment.handoffs] == [
        (1, "no_device"),
        (2, "attached"),
    ]


async def test_when_every_hand_off_fails_nothing_is_left_behind(fake: Fake) -> None:
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        fake.script(login=IscsiadmExit.LOGIN_AUTH_FAILED)
        with trio.fail_after(30):
            attachment = await attach_volume(
                info,
                options(),
                iscsiadm=fake.iscsiadm(),
                dev_root=fake.dev_root,
                ledger=RecordLedger(fake.tmp / "ledger.json"),
            )
    assert attachment.attached is None and attachment.device is None
    assert [h.index for h in attachment.handoffs] == [0, 1, 2]
    assert fake.saved() == {"records": [], "sessions": []}
    assert len(attachment.probes) == 3


async def test_an_iscsiadm_that_cannot_run_stops_at_once(tmp_path: Path) -> None:
    async with three_portals() as portals:
        info = parse_connection_info(volume(portals))
        missing = Iscsiadm(binary=tmp_path / "no-such-iscsiadm")
        with trio.fail_after(30), pytest.raises(IscsiadmUnavailable, match="cannot run"):
            await attach_volume(
                info, options(), iscsiadm=missing, ledger=RecordLedger(tmp_path / "ledger.json")
            )
