"""The hand-off against the real open-iscsi ``iscsiadm`` (Debian package open-iscsi).

Node-record operations work offline (they only touch /etc/iscsi/nodes, no iscsid needed), so
they are checked for real: creating, updating and reading back a record, and deleting it. A
kernel login cannot work on a test machine (no iscsid / iscsi_tcp here, and no target), which is
exactly what lets us check that a failed attach raises a clear typed error and removes only the
record it created, and that detach with a ledger deletes only records the ledger lists. Every
record uses a fresh IQN and a 127.0.0.X portal and is removed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import pyiscsi_failover.iscsiadm as iscsiadm_module
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import IscsiadmError
from pyiscsi_failover.iscsiadm import (
    Iscsiadm,
    IscsiadmExit,
    NodeTarget,
    RecordFate,
    RecordLedger,
    attach,
    detach,
    exit_meaning,
    handoff_plan,
    node_delete,
    node_new,
    node_show,
    portal_argument,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.chap import ChapAlgorithm
from pyiscsi_failover.protocol.negotiation import Digest

SECRET = "Zebra-Quartz-9137-secret"
SECRET_IN = "Mutual-Walrus-5521-secret"


def _find_iscsiadm() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("iscsiadm", path=path)


ISCSIADM = _find_iscsiadm()

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(
        ISCSIADM is None,
        reason="PEER TEST SKIPPED: iscsiadm not found; install the Debian package open-iscsi",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="PEER TEST SKIPPED: iscsiadm writes /etc/iscsi/nodes, which needs root",
    ),
]


def _iqn() -> str:
    return f"iqn.2026-11.test.pyiscsi:{uuid.uuid4().hex}"


def _forget(iqn: str) -> None:
    """Remove every record for ``iqn``, whatever a failed test left behind."""
    assert ISCSIADM is not None
    subprocess.run(
        [ISCSIADM, "-m", "node", "-T", iqn, "-o", "delete"], capture_output=True, check=False
    )


@pytest.fixture(autouse=True)
def default_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordLedger:
    """attach/detach use the default ledger when given none: never the real one in a test."""
    path = tmp_path / "default-ledger" / "created-records.json"
    monkeypatch.setattr(iscsiadm_module, "DEFAULT_LEDGER_PATH", path)
    return RecordLedger(path)


@pytest.fixture
def iscsiadm() -> Iscsiadm:
    assert ISCSIADM is not None
    return Iscsiadm(binary=ISCSIADM, timeout=30.0)


@pytest.fixture
def node() -> Iterator[NodeTarget]:
    """A CHAP (mutual) target on a unique IQN and loopback portal; its records are removed."""
    last = uuid.uuid4().int % 200 + 20
    t = NodeTarget(
        portal=Portal(host=f"127.0.0.{last}", port=3, tpgt=1),
        iqn=_iqn(),
        lun=0,
        chap=ChapCredentials("alice", Secret(SECRET)),
        target_chap=ChapCredentials("tgt-user", Secret(SECRET_IN)),
    )
    yield t
    _forget(t.iqn)


def _record(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and not key.startswith("#"):
            fields[key.strip()] = value.strip()
    return fields


async def test_missing_record_is_no_objs_found(iscsiadm: Iscsiadm, node: NodeTarget) -> None:
    with trio.fail_after(30):
        result = await iscsiadm.run(node_show(node))
    assert result.status is IscsiadmExit.NO_OBJS_FOUND
    assert result.exit_code == 21


async def test_node_record_create_update_read_delete(iscsiadm: Iscsiadm, node: NodeTarget) -> None:
    setup = handoff_plan(node)[:-1]  # everything but --login
    with trio.fail_after(30):
        for cmd in setup:
            await iscsiadm.check(cmd)
        shown = await iscsiadm.check(node_show(node))
    record = _record(shown.stdout)
    assert record["node.name"] == node.iqn
    assert record["node.tpgt"] == "1"
    assert record["node.conn[0].address"] == node.portal.host
    assert record["node.conn[0].port"] == "3"
    assert record["node.startup"] == "manual"
    assert record["node.session.scan"] == "manual"
    assert record["node.session.auth.authmethod"] == "CHAP"
    assert record["node.session.auth.username"] == "alice"
    assert record["node.session.auth.username_in"] == "tgt-user"
    # iscsiadm shows passwords as asterisks unless asked (-S); we never ask.
    assert record["node.session.auth.password"] == "********"
    assert record["node.session.auth.password_in"] == "********"
    assert SECRET not in shown.stdout
    assert SECRET_IN not in shown.stdout
    with trio.fail_after(30):
        await iscsiadm.check(node_delete(node))
        gone = await iscsiadm.run(node_show(node))
    assert gone.status is IscsiadmExit.NO_OBJS_FOUND


@pytest.mark.parametrize(
    ("header", "data", "algorithms", "chap_algs"),
    [
        (
            Digest.CRC32C,
            Digest.NONE,
            (ChapAlgorithm.SHA3_256, ChapAlgorithm.SHA256, ChapAlgorithm.SHA1, ChapAlgorithm.MD5),
            "SHA3-256,SHA256,SHA1,MD5",
        ),
        (Digest.NONE, Digest.CRC32C, (ChapAlgorithm.MD5, ChapAlgorithm.SHA256), "MD5,SHA256"),
    ],
)
async def test_the_record_shows_the_digests_and_chap_algorithms_we_wrote(
    iscsiadm: Iscsiadm,
    node: NodeTarget,
    header: Digest,
    data: Digest,
    algorithms: tuple[ChapAlgorithm, ...],
    chap_algs: str,
) -> None:
    proved = dataclasses.replace(
        node, header_digest=header, data_digest=data, chap_algorithms=algorithms
    )
    with trio.fail_after(30):
        for cmd in handoff_plan(proved)[:-1]:  # everything but --login
            await iscsiadm.check(cmd)
        shown = await iscsiadm.check(node_show(proved))
    record = _record(shown.stdout)
    assert record["node.conn[0].iscsi.HeaderDigest"] == header.value
    assert record["node.conn[0].iscsi.DataDigest"] == data.value
    assert record["node.session.auth.chap_algs"] == chap_algs
    # Updating an existing record in place (create=False) changes them again.
    again = dataclasses.replace(
        proved, header_digest=data, data_digest=header, chap_algorithms=(ChapAlgorithm.SHA1,)
    )
    with trio.fail_after(30):
        for cmd in handoff_plan(again, create=False)[:-1]:
            await iscsiadm.check(cmd)
        shown = await iscsiadm.check(node_show(again))
    record = _record(shown.stdout)
    assert record["node.conn[0].iscsi.HeaderDigest"] == data.value
    assert record["node.conn[0].iscsi.DataDigest"] == header.value
    assert record["node.session.auth.chap_algs"] == "SHA1"


async def test_ipv6_portal_record(iscsiadm: Iscsiadm) -> None:
    t = NodeTarget(portal=Portal(host="::1", port=3, tpgt=2), iqn=_iqn(), lun=0)
    try:
        with trio.fail_after(30):
            await iscsiadm.check(node_new(t))
            shown = await iscsiadm.check(node_show(t))
        record = _record(shown.stdout)
        # The record keeps the bare address: this is what udev's by-path name will contain.
        assert record["node.conn[0].address"] == "::1"
        assert record["node.tpgt"] == "2"
    finally:
        _forget(t.iqn)


async def test_failed_attach_is_typed_and_removes_the_record_it_created(
    iscsiadm: Iscsiadm, node: NodeTarget
) -> None:
    with trio.fail_after(60), pytest.raises(IscsiadmError) as info:
        await attach(node, iscsiadm=iscsiadm, device_timeout=1.0)
    error = info.value
    assert error.exit_code is not None
    assert error.exit_code not in (IscsiadmExit.SUCCESS, IscsiadmExit.SESS_EXISTS)
    assert str(error).startswith(exit_meaning(error.exit_code))
    assert SECRET not in str(error)
    assert SECRET_IN not in str(error)
    with trio.fail_after(30):
        after = await iscsiadm.run(node_show(node))
    assert after.status is IscsiadmExit.NO_OBJS_FOUND


async def test_failed_attach_keeps_a_record_that_existed(
    iscsiadm: Iscsiadm, node: NodeTarget
) -> None:
    with trio.fail_after(60):
        await iscsiadm.check(node_new(node))
        with pytest.raises(IscsiadmError):
            await attach(node, iscsiadm=iscsiadm, device_timeout=1.0)
        after = await iscsiadm.run(node_show(node))
    assert after.status is IscsiadmExit.SUCCESS
    assert _record(after.stdout)["node.session.auth.authmethod"] == "CHAP"


async def test_detach_always_without_session_or_record_is_fine(
    iscsiadm: Iscsiadm, node: NodeTarget
) -> None:
    with trio.fail_after(30):
        await iscsiadm.check(node_new(node))
        ran = await detach(node, iscsiadm=iscsiadm, delete="always")
        after = await iscsiadm.run(node_show(node))
        again = await detach(node, iscsiadm=iscsiadm, delete="always")
    assert (ran.record, again.record) == (RecordFate.DELETED, RecordFate.ABSENT)
    assert len(ran.commands) == len(again.commands) == 2
    assert after.status is IscsiadmExit.NO_OBJS_FOUND


async def test_detach_by_default_keeps_a_hand_made_record_and_reports_absent_ones(
    iscsiadm: Iscsiadm, node: NodeTarget, default_ledger: RecordLedger
) -> None:
    with trio.fail_after(30):
        absent = await detach(node, iscsiadm=iscsiadm)
        _new_by_hand(node)
        kept = await detach(node, iscsiadm=iscsiadm)
        after = await iscsiadm.run(node_show(node))
    assert absent.record is RecordFate.ABSENT
    assert kept.record is RecordFate.KEPT_NOT_OURS
    assert after.status is IscsiadmExit.SUCCESS
    assert not default_ledger.path.exists()


def _new_by_hand(t: NodeTarget, portal: str | None = None) -> None:
    """``iscsiadm -o new`` as an operator would type it, outside our code."""
    assert ISCSIADM is not None
    argv = [ISCSIADM, "-m", "node", "-T", t.iqn, "-p", portal or portal_argument(t), "-o", "new"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode == 0, done.stderr


def _records(t: NodeTarget) -> list[str]:
    """The tpgt of every record of ``t``'s IQN at its address and port, as iscsiadm shows them."""
    assert ISCSIADM is not None
    argv = [ISCSIADM, "-m", "node", "-T", t.iqn, "-p", str(t.portal)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    return [value for key, value in _record_lines(done.stdout) if key == "node.tpgt"]


def _record_lines(text: str) -> list[tuple[str, str]]:
    return [
        (key.strip(), value.strip())
        for key, sep, value in (line.partition(" = ") for line in text.splitlines())
        if sep and not key.startswith("#")
    ]


@pytest.fixture
def ledger(tmp_path: Path) -> RecordLedger:
    return RecordLedger(tmp_path / "created-records.json")


async def test_a_record_created_by_hand_survives_detach_with_a_ledger(
    iscsiadm: Iscsiadm, node: NodeTarget, ledger: RecordLedger
) -> None:
    _new_by_hand(node)
    with trio.fail_after(30):
        result = await detach(node, iscsiadm=iscsiadm, ledger=ledger)
        after = await iscsiadm.run(node_show(node))
    assert result.record is RecordFate.KEPT_NOT_OURS
    assert after.status is IscsiadmExit.SUCCESS
    assert _records(node) == ["1"]
    assert not ledger.path.exists()


async def test_a_record_in_the_ledger_is_deleted_by_detach(
    iscsiadm: Iscsiadm, node: NodeTarget, ledger: RecordLedger
) -> None:
    # attach cannot log in here, so we create the record the way attach does and note it.
    with trio.fail_after(30):
        for cmd in handoff_plan(node)[:-1]:
            await iscsiadm.check(cmd)
        ledger.add(node)
        result = await detach(node, iscsiadm=iscsiadm, ledger=ledger)
        after = await iscsiadm.run(node_show(node))
    assert result.record is RecordFate.DELETED
    assert after.status is IscsiadmExit.NO_OBJS_FOUND
    assert ledger.entries() == ()


async def test_our_record_is_kept_when_another_tpgt_shares_its_address(
    iscsiadm: Iscsiadm, node: NodeTarget, ledger: RecordLedger
) -> None:
    # iscsiadm -o delete -p ADDR:PORT,1 would delete the tpgt 2 record as well.
    with trio.fail_after(30):
        await iscsiadm.check(node_new(node))
        ledger.add(node)
        _new_by_hand(node, f"{node.portal},2")
        assert sorted(_records(node)) == ["1", "2"]
        result = await detach(node, iscsiadm=iscsiadm, ledger=ledger)
    assert result.record is RecordFate.KEPT_SHARED
    assert sorted(_records(node)) == ["1", "2"]
    assert ledger.is_ours(node)


async def test_failed_attach_with_a_ledger_notes_nothing(
    iscsiadm: Iscsiadm, node: NodeTarget, ledger: RecordLedger
) -> None:
    with trio.fail_after(60), pytest.raises(IscsiadmError):
        await attach(node, iscsiadm=iscsiadm, device_timeout=1.0, ledger=ledger)
    with trio.fail_after(30):
        after = await iscsiadm.run(node_show(node))
    assert after.status is IscsiadmExit.NO_OBJS_FOUND
    assert ledger.entries() == ()
