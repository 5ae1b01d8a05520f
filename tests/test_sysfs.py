"""sysfs lookups and writes against a tree laid out as Linux lays it out (tests/sysfs_tree.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from fakes import Fake
from sysfs_tree import FakeSysfs

from pyiscsi_failover.iscsiadm import IscsiadmExit
from pyiscsi_failover.names import Portal
from pyiscsi_failover.sysfs import (
    KernelSession,
    block_device_of,
    delete_disk,
    disk_wwid,
    find_session,
    scan_lun,
    session_disks,
    set_recovery_timeout,
)

IQN = "iqn.2026-12.test.pyiscsi:sysfs"
OTHER = "iqn.2026-12.test.pyiscsi:other"


@pytest.fixture
def tree(tmp_path: Path) -> FakeSysfs:
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.add_session(3, host=5, iqn=OTHER, address="127.0.0.1", port=3260)
    sysfs.add_session(4, host=6, iqn=IQN, address="127.0.0.1", port=3261, target=2)
    sysfs.add_session(7, host=9, iqn=IQN, address="fd00::1", port=3260)
    sysfs.add_disk(4, host=6, target=2, lun=1, block="sdb", wwid="naa.60000000000000000e0001")
    sysfs.add_disk(4, host=6, target=2, lun=2, block="sdc", wwid="naa.60000000000000000e0002")
    return sysfs


def test_a_session_is_found_by_target_address_and_port(tree: FakeSysfs) -> None:
    session = find_session(Portal(host="127.0.0.1", port=3261), IQN, sys_root=tree.root)
    assert session is not None
    assert (session.name, session.host, session.channel, session.target) == ("session4", 6, 0, 2)
    assert session.state == "LOGGED_IN"
    # The IPv6 address matches bracketed or not; another port or IQN is another session.
    ipv6 = find_session(Portal(host="fd00::1", port=3260), IQN, sys_root=tree.root)
    assert ipv6 is not None and ipv6.name == "session7"
    assert find_session(Portal(host="127.0.0.1", port=3260), IQN, sys_root=tree.root) is None
    assert find_session(Portal(host="127.0.0.2", port=3261), IQN, sys_root=tree.root) is None
    assert find_session(Portal(host="127.0.0.1"), IQN, sys_root=tree.root / "nothing") is None


def test_disks_scan_delete_and_recovery_timeout_write_where_the_kernel_reads(
    tree: FakeSysfs,
) -> None:
    session = find_session(Portal(host="127.0.0.1", port=3261), IQN, sys_root=tree.root)
    assert session is not None
    assert session_disks(session, sys_root=tree.root) == {1: "sdb", 2: "sdc"}
    assert disk_wwid("sdc", sys_root=tree.root) == "naa.60000000000000000e0002"
    assert disk_wwid("sdz", sys_root=tree.root) is None
    scan_lun(session, 16384 + 300, sys_root=tree.root)
    assert tree.written("class", "scsi_host", "host6", "scan") == "0 2 16684"
    delete_disk("sdb", sys_root=tree.root)
    assert tree.written("block", "sdb", "device", "delete") == "1"
    set_recovery_timeout(session, 5, sys_root=tree.root)
    assert tree.written("class", "iscsi_session", "session4", "recovery_tmo") == "5"


def test_block_device_of_follows_the_by_path_link(tmp_path: Path) -> None:
    (tmp_path / "sdd").write_text("")
    link = tmp_path / "by-path" / "ip-127.0.0.1:3260-iscsi-iqn-lun-1"
    link.parent.mkdir()
    link.symlink_to("../sdd")
    assert block_device_of(link) == "sdd"
    assert block_device_of(tmp_path / "sdd") == "sdd"


# -- detach and attach of one LUN of a shared target -------------------------------------------


async def test_detach_of_one_lun_of_a_shared_session_removes_only_its_disk(
    tree: FakeSysfs, fake: Fake
) -> None:
    from pyiscsi_failover.iscsiadm import NodeTarget, RecordFate, RecordLedger, detach

    t = NodeTarget(portal=Portal(host="127.0.0.1", port=3261), iqn=IQN, lun=2)
    with trio.fail_after(30):
        result = await detach(
            t,
            iscsiadm=fake.iscsiadm(),
            ledger=RecordLedger(fake.tmp / "ledger.json"),
            sys_root=tree.root,
        )
    assert result.record is RecordFate.KEPT_IN_USE and result.removed_disk == "sdc"
    assert tree.written("block", "sdc", "device", "delete") == "1"
    assert tree.written("block", "sdb", "device", "delete") == ""  # LUN 1's disk stays
    assert fake.ops() == []  # no logout: LUN 1 still uses the session


async def test_detach_from_a_dead_portal_first_cuts_the_recovery_timeout(
    tmp_path: Path, fake: Fake
) -> None:
    from pyiscsi_failover.iscsiadm import NodeTarget, RecordLedger, detach

    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.add_session(8, host=3, iqn=IQN, address="127.0.0.1", port=3262, state="FAILED")
    sysfs.add_disk(8, host=3, lun=1, block="sdd", wwid="naa.6000")
    t = NodeTarget(portal=Portal(host="127.0.0.1", port=3262), iqn=IQN, lun=1)
    with trio.fail_after(30):
        await detach(
            t,
            iscsiadm=fake.iscsiadm(),
            ledger=RecordLedger(tmp_path / "l.json"),
            sys_root=sysfs.root,
        )
    assert sysfs.written("class", "iscsi_session", "session8", "recovery_tmo") == "5"
    assert fake.ops()[0] == "logout"


async def test_attach_into_an_existing_session_scans_only_its_lun(
    tree: FakeSysfs, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another volume's session is there (login exit 15): write "C T L" for this LUN only, and
    take the disk that appears; our scan's disk is removed again if the attach then fails."""
    import pyiscsi_failover.iscsiadm as module
    from pyiscsi_failover.errors import WrongVolume
    from pyiscsi_failover.iscsiadm import NodeTarget, RecordLedger, attach, by_path_name

    t = NodeTarget(portal=Portal(host="127.0.0.1", port=3261), iqn=IQN, lun=3)
    device = fake.dev_root / by_path_name(t)
    scan = tree.root / "class" / "scsi_host" / "host6" / "scan"
    fake.script(login=IscsiadmExit.SESS_EXISTS)

    def kernel_scan(session: KernelSession, lun: int, *, sys_root: Path) -> None:
        scan_lun(session, lun, sys_root=sys_root)
        if not (tree.root / "block" / "sde").exists():
            tree.add_disk(4, host=6, target=2, lun=lun, block="sde", wwid="naa.6000000000e0003")
        device.symlink_to(tree.root / "block" / "sde")  # what udev makes of it

    monkeypatch.setattr(module, "scan_lun", kernel_scan)
    ledger = RecordLedger(fake.tmp / "ledger.json")
    with trio.fail_after(30):
        result = await attach(
            t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger, sys_root=tree.root
        )
    assert result.session_existed and result.device == device
    assert scan.read_text() == "0 2 3"
    assert fake.ops()[-1] == "login"  # no logout of the session other LUNs use

    device.unlink()
    scan.write_text("")
    with trio.fail_after(30), pytest.raises(WrongVolume):
        await attach(
            t,
            iscsiadm=fake.iscsiadm(),
            dev_root=fake.dev_root,
            ledger=ledger,
            sys_root=tree.root,
            expect_wwid="naa.60000000000000000e0009",
        )
    assert tree.written("block", "sde", "device", "delete") == "1"  # our scan's disk, removed
    assert "logout" not in fake.ops()
