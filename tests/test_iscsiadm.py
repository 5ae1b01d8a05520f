"""The iscsiadm hand-off: golden argv of every builder, exit-code mapping, and attach/detach
against a scriptable fake iscsiadm (tests/fake_iscsiadm/iscsiadm) for the paths the kernel
cannot take on a test machine: success, session already there, every failure, timeouts. Also the
ledger of node records we created: detach deletes those and keeps every other record."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import Fake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyiscsi_failover.iscsiadm as iscsiadm_module
from pyiscsi_failover.connection_info import AddressingMode
from pyiscsi_failover.credentials import MASK, ChapCredentials, Secret
from pyiscsi_failover.errors import (
    ConnectionInfoError,
    DeviceTimeout,
    InvalidName,
    IscsiadmError,
    ISCSIError,
    LedgerError,
    LocalProtocolError,
)
from pyiscsi_failover.iscsiadm import (
    DEFAULT_LEDGER_PATH,
    DELETE_MODES,
    LEDGER_LOCK_TIMEOUT,
    AttachResult,
    Command,
    DetachResult,
    Iscsiadm,
    IscsiadmExit,
    LedgerEntry,
    NodeTarget,
    RecordFate,
    RecordLedger,
    Result,
    attach,
    by_path_name,
    detach,
    dry_run_plan,
    exit_meaning,
    handoff_plan,
    node_delete,
    node_login,
    node_logout,
    node_new,
    node_show,
    node_update,
    portal_argument,
    session_list,
)
from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol import scsi
from pyiscsi_failover.protocol.chap import ChapAlgorithm
from pyiscsi_failover.protocol.negotiation import Digest

IQN = "iqn.2010-10.org.openstack:volume-0001"
SECRET = "Zebra-Quartz-9137-secret"
SECRET_IN = "Mutual-Walrus-5521-secret"


def target(**changes: object) -> NodeTarget:
    fields: dict[str, object] = {"portal": Portal(host="10.0.0.1"), "iqn": IQN, "lun": 0}
    fields.update(changes)
    return NodeTarget(**fields)  # type: ignore[arg-type]


def chap_target(*, mutual: bool = False, **changes: object) -> NodeTarget:
    return target(
        chap=ChapCredentials("alice", Secret(SECRET)),
        target_chap=ChapCredentials("tgt-user", Secret(SECRET_IN)) if mutual else None,
        **changes,
    )


NODE = ("iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.1:3260")


@pytest.fixture(autouse=True)
def default_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordLedger:
    """attach/detach use the default ledger when given none: never the real one in a test."""
    path = tmp_path / "default-ledger" / "created-records.json"
    monkeypatch.setattr(iscsiadm_module, "DEFAULT_LEDGER_PATH", path)
    return RecordLedger(path)


# ---------------------------------------------------------------------------- golden argv


def test_node_record_commands_golden() -> None:
    t = target()
    assert node_new(t).argv == (*NODE, "-o", "new")
    assert node_show(t).argv == NODE
    assert node_login(t).argv == (*NODE, "--login")
    assert node_logout(t).argv == (*NODE, "--logout")
    assert node_delete(t).argv == (*NODE, "-o", "delete")
    assert session_list().argv == ("iscsiadm", "-m", "session")
    assert node_update(t, "node.startup", "manual").argv == (
        *NODE,
        "-o",
        "update",
        "-n",
        "node.startup",
        "-v",
        "manual",
    )
    assert node_delete(t).masked() == f"iscsiadm -m node -T {IQN} -p 10.0.0.1:3260 -o delete"


@pytest.mark.parametrize(
    ("portal", "tpgt", "expected"),
    [
        (Portal(host="10.0.0.1"), None, "10.0.0.1:3260"),
        (Portal(host="10.0.0.1", port=3261), 1, "10.0.0.1:3261,1"),
        (Portal(host="10.0.0.1", tpgt=7), None, "10.0.0.1:3260,7"),
        (Portal(host="10.0.0.1", tpgt=7), 7, "10.0.0.1:3260,7"),
        (Portal(host="FD00:0::1", port=3261, tpgt=2), None, "[fd00::1]:3261,2"),
        (Portal(host="::1"), None, "[::1]:3260"),
        (Portal(host="San.Example.com"), None, "san.example.com:3260"),
    ],
)
def test_portal_argument(portal: Portal, tpgt: int | None, expected: str) -> None:
    t = target(portal=portal, tpgt=tpgt)
    assert portal_argument(t) == expected
    assert node_login(t).argv[6] == expected


def test_secret_update_is_masked_but_runs_in_clear() -> None:
    cmd = node_update(chap_target(), "node.session.auth.password", Secret(SECRET))
    assert cmd.argv == (*NODE, "-o", "update", "-n", "node.session.auth.password", "-v", SECRET)
    expected = (
        f"iscsiadm -m node -T {IQN} -p 10.0.0.1:3260 -o update -n node.session.auth.password -v ***"
    )
    assert cmd.masked() == expected
    assert str(cmd) == expected
    assert repr(cmd) == f"Command({expected!r})"
    for shown in (cmd.masked(), str(cmd), repr(cmd), f"{cmd}", str([cmd]), repr(cmd.parts)):
        assert SECRET not in shown
    assert cmd.secrets == (Secret(SECRET),)


def test_masked_form_is_shell_quoted() -> None:
    cmd = node_update(target(), "node.session.auth.username", "alice o'brien")
    assert cmd.masked().endswith("-v 'alice o'\"'\"'brien'")
    assert shlex.split(cmd.masked()) == list(cmd.argv)


def test_handoff_plan_without_chap_golden() -> None:
    plan = [c.argv for c in handoff_plan(target())]
    assert plan == [
        (*NODE, "-o", "new"),
        (*NODE, "-o", "update", "-n", "node.startup", "-v", "manual"),
        (*NODE, "-o", "update", "-n", "node.session.scan", "-v", "manual"),
        (*NODE, "-o", "update", "-n", "node.session.auth.authmethod", "-v", "None"),
        (*NODE, "--login"),
    ]
    assert all(not c.secrets for c in handoff_plan(target()))


def test_handoff_plan_with_mutual_chap_golden() -> None:
    plan = handoff_plan(chap_target(mutual=True))
    update = (*NODE, "-o", "update", "-n")
    assert [c.argv for c in plan] == [
        (*NODE, "-o", "new"),
        (*update, "node.startup", "-v", "manual"),
        (*update, "node.session.scan", "-v", "manual"),
        (*update, "node.session.auth.authmethod", "-v", "CHAP"),
        (*update, "node.session.auth.username", "-v", "alice"),
        (*update, "node.session.auth.password", "-v", SECRET),
        (*update, "node.session.auth.username_in", "-v", "tgt-user"),
        (*update, "node.session.auth.password_in", "-v", SECRET_IN),
        (*NODE, "--login"),
    ]
    assert [c.secrets for c in plan][5:8] == [(Secret(SECRET),), (), (Secret(SECRET_IN),)]


def test_handoff_plan_for_an_existing_record_skips_new() -> None:
    plan = handoff_plan(chap_target(), create=False)
    assert [c.argv[7:] for c in plan] == [
        ("-o", "update", "-n", "node.startup", "-v", "manual"),
        ("-o", "update", "-n", "node.session.scan", "-v", "manual"),
        ("-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP"),
        ("-o", "update", "-n", "node.session.auth.username", "-v", "alice"),
        ("-o", "update", "-n", "node.session.auth.password", "-v", SECRET),
        ("--login",),
    ]


def test_handoff_plan_writes_what_the_probe_proved_golden() -> None:
    t = chap_target(
        header_digest=Digest.CRC32C,
        data_digest=Digest.NONE,
        chap_algorithms=(ChapAlgorithm.SHA3_256, ChapAlgorithm.SHA256, ChapAlgorithm.MD5),
    )
    update = (*NODE, "-o", "update", "-n")
    assert [c.argv for c in handoff_plan(t)] == [
        (*NODE, "-o", "new"),
        (*update, "node.startup", "-v", "manual"),
        (*update, "node.session.scan", "-v", "manual"),
        (*update, "node.conn[0].iscsi.HeaderDigest", "-v", "CRC32C"),
        (*update, "node.conn[0].iscsi.DataDigest", "-v", "None"),
        (*update, "node.session.auth.authmethod", "-v", "CHAP"),
        (*update, "node.session.auth.chap_algs", "-v", "SHA3-256,SHA256,MD5"),
        (*update, "node.session.auth.username", "-v", "alice"),
        (*update, "node.session.auth.password", "-v", SECRET),
        (*NODE, "--login"),
    ]


@pytest.mark.parametrize(
    ("algorithms", "written"),
    [
        ((ChapAlgorithm.MD5,), "MD5"),
        ((ChapAlgorithm.SHA1,), "SHA1"),
        ((ChapAlgorithm.SHA256, ChapAlgorithm.SHA1), "SHA256,SHA1"),
        ([ChapAlgorithm.MD5, ChapAlgorithm.SHA3_256], "MD5,SHA3-256"),  # a list is taken too
    ],
)
def test_chap_algs_use_open_iscsis_names_in_the_given_order(
    algorithms: Sequence[ChapAlgorithm], written: str
) -> None:
    t = chap_target(chap_algorithms=algorithms)
    assert t.chap_algorithms == tuple(algorithms)
    chap_algs = [c.argv[-1] for c in handoff_plan(t) if "node.session.auth.chap_algs" in c.argv]
    assert chap_algs == [written]


def test_digests_alone_and_without_chap_golden() -> None:
    plan = handoff_plan(target(data_digest=Digest.CRC32C), create=False)
    assert [c.argv[7:] for c in plan] == [
        ("-o", "update", "-n", "node.startup", "-v", "manual"),
        ("-o", "update", "-n", "node.session.scan", "-v", "manual"),
        ("-o", "update", "-n", "node.conn[0].iscsi.DataDigest", "-v", "CRC32C"),
        ("-o", "update", "-n", "node.session.auth.authmethod", "-v", "None"),
        ("--login",),
    ]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"header_digest": "CRC32C"}, "header_digest must be a Digest or None, not str"),
        ({"data_digest": True}, "data_digest must be a Digest or None, not bool"),
        ({"chap_algorithms": ()}, "chap_algorithms is empty"),
        ({"chap_algorithms": (5,)}, "must hold ChapAlgorithm members, not 5"),
        ({"chap_algorithms": "MD5"}, "must be a tuple of ChapAlgorithm or None, not str"),
        (
            {"chap_algorithms": (ChapAlgorithm.MD5, ChapAlgorithm.MD5)},
            "lists an algorithm twice",
        ),
    ],
)
def test_node_target_refuses_bad_digests_and_chap_algorithms(
    changes: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConnectionInfoError) as info:
        target(chap=ChapCredentials("alice", Secret(SECRET)), **changes)
    assert fragment in str(info.value)
    assert info.value.key == next(iter(changes))


def test_chap_algorithms_need_chap() -> None:
    with pytest.raises(ConnectionInfoError, match="chap_algorithms needs chap"):
        target(chap_algorithms=(ChapAlgorithm.MD5,))


def test_dry_run_plan_golden() -> None:
    head = f"iscsiadm -m node -T {IQN} -p 10.0.0.1:3260"
    assert dry_run_plan(chap_target(mutual=True)) == [
        f"{head} -o new",
        f"{head} -o update -n node.startup -v manual",
        f"{head} -o update -n node.session.scan -v manual",
        f"{head} -o update -n node.session.auth.authmethod -v CHAP",
        f"{head} -o update -n node.session.auth.username -v alice",
        f"{head} -o update -n node.session.auth.password -v ***",
        f"{head} -o update -n node.session.auth.username_in -v tgt-user",
        f"{head} -o update -n node.session.auth.password_in -v ***",
        f"{head} --login",
    ]


@pytest.mark.parametrize(
    ("portal", "lun", "expected"),
    [
        (Portal(host="10.0.0.1"), 0, f"ip-10.0.0.1:3260-iscsi-{IQN}-lun-0"),
        (Portal(host="10.0.0.1", port=3261, tpgt=4), 255, f"ip-10.0.0.1:3261-iscsi-{IQN}-lun-255"),
        (Portal(host="fd00::1"), 1, f"ip-fd00::1:3260-iscsi-{IQN}-lun-1"),
        (Portal(host="san.example.com"), 2, f"ip-san.example.com:3260-iscsi-{IQN}-lun-2"),
        (Portal(host="10.0.0.1"), 256, f"ip-10.0.0.1:3260-iscsi-{IQN}-lun-0x0100000000000000"),
        (Portal(host="10.0.0.1"), 0x412C, f"ip-10.0.0.1:3260-iscsi-{IQN}-lun-0x412c000000000000"),
        (Portal(host="10.0.0.1"), 0x10002, f"ip-10.0.0.1:3260-iscsi-{IQN}-lun-0x0002000100000000"),
    ],
)
def test_by_path_name_follows_udev_path_id(portal: Portal, lun: int, expected: str) -> None:
    assert by_path_name(target(portal=portal, lun=lun)) == expected


SAM, SAM2, SAM3, TRANSPARENT = (
    AddressingMode.SAM,
    AddressingMode.SAM2,
    AddressingMode.SAM3_FLAT,
    AddressingMode.TRANSPARENT,
)


@pytest.mark.parametrize(
    ("mode", "lun", "linux_lun", "component"),
    [
        # SAM (the default) and transparent: the LUN as given; path_id's hex form from 256 on.
        *[
            (mode, lun, linux_lun, component)
            for mode in (SAM, TRANSPARENT)
            for lun, linux_lun, component in [
                (0, 0, "lun-0"),
                (1, 1, "lun-1"),
                (255, 255, "lun-255"),
                (256, 256, "lun-0x0100000000000000"),
                (16383, 16383, "lun-0x3fff000000000000"),
            ]
        ],
        # SAM2: peripheral below 256, flat (+16384) from 256 on: tgt's encoding.
        (SAM2, 0, 0, "lun-0"),
        (SAM2, 1, 1, "lun-1"),
        (SAM2, 255, 255, "lun-255"),
        (SAM2, 256, 16640, "lun-0x4100000000000000"),
        (SAM2, 16383, 32767, "lun-0x7fff000000000000"),
        # SAM3-flat: always flat, so even LUN 0 is named in hex.
        (SAM3, 0, 16384, "lun-0x4000000000000000"),
        (SAM3, 1, 16385, "lun-0x4001000000000000"),
        (SAM3, 255, 16639, "lun-0x40ff000000000000"),
        (SAM3, 256, 16640, "lun-0x4100000000000000"),
        (SAM3, 16383, 32767, "lun-0x7fff000000000000"),
    ],
)
def test_by_path_name_applies_the_addressing_mode(
    mode: AddressingMode, lun: int, linux_lun: int, component: str
) -> None:
    t = target(lun=lun, addressing_mode=mode)
    assert t.linux_lun == linux_lun
    assert by_path_name(t) == f"ip-10.0.0.1:3260-iscsi-{IQN}-{component}"
    # The by-path LUN is the kernel's reading (scsilun_to_int) of the LUN field our PDUs carry.
    assert scsi.scsilun_to_int(scsi.lun_field(lun, mode)) == linux_lun


def test_node_target_default_mode_is_sam_and_spellings_are_normalised() -> None:
    assert target().addressing_mode is SAM
    assert target(lun=256, addressing_mode="SAM2").addressing_mode is SAM2
    from_scsi = target(lun=256, addressing_mode=scsi.AddressingMode.SAM3_FLAT)
    assert from_scsi.addressing_mode is SAM3
    assert from_scsi == target(lun=256, addressing_mode=SAM3)
    # SAM keeps the old range: the LUN is the kernel's own number.
    assert target(lun=2**32 - 1).linux_lun == 2**32 - 1
    assert target(lun=255, addressing_mode=SAM2).linux_lun == 255


@pytest.mark.parametrize(
    ("changes", "key", "shown"),
    [
        ({"addressing_mode": "sam2"}, "addressing_mode", "'sam2'"),
        ({"addressing_mode": "SAM-2"}, "addressing_mode", "'SAM-2'"),
        ({"addressing_mode": None}, "addressing_mode", "None"),
        ({"addressing_mode": 2}, "addressing_mode", "2"),
        ({"lun": 16384, "addressing_mode": SAM2}, "lun", "16384"),
        ({"lun": 16384, "addressing_mode": SAM3}, "lun", "16384"),
        ({"lun": 2**32 - 1, "addressing_mode": SAM2}, "lun", "4294967295"),
    ],
)
def test_node_target_refuses_a_bad_mode_or_a_lun_it_cannot_address(
    changes: dict[str, object], key: str, shown: str
) -> None:
    with pytest.raises(ConnectionInfoError) as caught:
        target(**changes)
    assert caught.value.key == key
    assert shown in str(caught.value)


# ---------------------------------------------------------------------------- validation


def test_node_target_normalises_and_inherits_tpgt() -> None:
    t = target(iqn="IQN.2010-10.ORG.OpenStack:Vol", portal=Portal(host="10.0.0.1", tpgt=3))
    assert t.iqn == "iqn.2010-10.org.openstack:vol"
    assert t.tpgt == 3


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"lun": -1}, "lun"),
        ({"lun": 2**32}, "lun"),
        ({"lun": True}, "lun"),
        ({"lun": "0"}, "lun"),
        ({"tpgt": 65536}, "tpgt"),
        ({"tpgt": False}, "tpgt"),
        ({"portal": Portal(host="10.0.0.1", tpgt=1), "tpgt": 2}, "tpgt"),
        ({"portal": "10.0.0.1:3260"}, "portal"),
        ({"chap": ("alice", SECRET)}, "chap"),
        ({"target_chap": ChapCredentials("t", Secret("x"))}, "target_chap"),
    ],
)
def test_node_target_rejects_bad_fields(changes: dict[str, object], key: str) -> None:
    with pytest.raises(ConnectionInfoError) as info:
        target(**changes)
    assert info.value.key == key
    assert isinstance(info.value, ISCSIError)
    assert isinstance(info.value, ValueError)
    assert SECRET not in str(info.value)


def test_node_target_rejects_bad_iqn() -> None:
    with pytest.raises(InvalidName):
        target(iqn="not-a-name")


@pytest.mark.parametrize(
    "value",
    [
        "line\nnode.startup = automatic",  # would inject a record line
        "tab\there",
        "nul\x00",
        "del\x7f",
        " leading",
        "trailing ",
        "x" * 256,
        "é" * 128,  # 256 bytes in UTF-8
    ],
)
def test_update_refuses_values_iscsiadm_would_change(value: str) -> None:
    with pytest.raises(ConnectionInfoError) as info:
        node_update(target(), "node.session.auth.username", value)
    assert info.value.key == "node.session.auth.username"
    secret_value = f"{SECRET}{value}" if value[0] != " " else value + SECRET
    with pytest.raises(ConnectionInfoError) as info:
        node_update(target(), "node.session.auth.password", Secret(secret_value))
    assert SECRET not in str(info.value)
    assert info.value.key == "node.session.auth.password"


def test_update_accepts_the_longest_value_and_inner_spaces() -> None:
    assert node_update(target(), "node.session.auth.username", "x" * 255).argv[-1] == "x" * 255
    assert node_update(target(), "node.session.auth.username", "a b").argv[-1] == "a b"


@pytest.mark.parametrize("name", ["-x", "", "node.startup -v", "node.conn[0", "node..x", 5])
def test_update_refuses_bad_parameter_names(name: object) -> None:
    with pytest.raises(ConnectionInfoError) as info:
        node_update(target(), name, "v")  # type: ignore[arg-type]
    assert info.value.key == "name"


def test_update_accepts_indexed_parameter_names() -> None:
    name = "node.conn[0].timeo.login_timeout"
    assert node_update(target(), name, "15").argv[-4:] == ("-n", name, "-v", "15")


def test_update_refuses_empty_secret_and_non_string_values() -> None:
    with pytest.raises(ConnectionInfoError, match="empty"):
        node_update(target(), "node.session.auth.password", Secret(""))
    with pytest.raises(ConnectionInfoError, match="str or Secret"):
        node_update(target(), "node.startup", 5)  # type: ignore[arg-type]


def test_plan_refuses_empty_chap_username() -> None:
    t = target(chap=ChapCredentials("", Secret(SECRET)))
    with pytest.raises(ConnectionInfoError) as info:
        handoff_plan(t)
    assert info.value.key == "node.session.auth.username"


_SAFE_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_characters="\x7f"),
    min_size=1,
    max_size=60,
).filter(lambda s: s == s.strip(" "))


@settings(max_examples=150)
@given(username=_SAFE_TEXT, secret=_SAFE_TEXT, secret_in=_SAFE_TEXT)
def test_masked_form_is_argv_with_secrets_replaced(
    username: str, secret: str, secret_in: str
) -> None:
    t = target(
        chap=ChapCredentials(username, Secret(secret)),
        target_chap=ChapCredentials(username, Secret(secret_in)),
    )
    for cmd in handoff_plan(t):
        revealed = [p.reveal_str() if isinstance(p, Secret) else p for p in cmd.parts]
        assert list(cmd.argv) == revealed
        shown = [MASK if isinstance(p, Secret) else p for p in cmd.parts]
        assert shlex.split(cmd.masked()) == shown
        assert repr(cmd) == f"Command({cmd.masked()!r})"


# ---------------------------------------------------------------------------- exit codes


def test_exit_codes_match_open_iscsi() -> None:
    # include/iscsi_err.h: contiguous 0..31; iscsiadm(8) of 2.1.8 adds 32.
    assert [int(c) for c in IscsiadmExit] == list(range(33))
    known = {c.name: int(c) for c in IscsiadmExit}
    assert known.items() >= {
        ("SESS_NOT_FOUND", 2),
        ("IDBM", 6),
        ("INVAL", 7),
        ("TRANS_TIMEOUT", 8),
        ("TRANS_NOT_FOUND", 12),
        ("SESS_EXISTS", 15),
        ("FATAL_LOGIN", 19),
        ("ISCSID_NOTCONN", 20),
        ("NO_OBJS_FOUND", 21),
        ("LOGIN_AUTH_FAILED", 24),
        ("SESSION_NOT_CONNECTED", 32),
    }
    meanings = [c.meaning for c in IscsiadmExit]
    assert all(meanings)
    assert len(set(meanings)) == len(meanings)


def test_exit_meaning() -> None:
    assert (
        exit_meaning(24) == "iSCSI login failed: authentication (CHAP) failure (LOGIN_AUTH_FAILED)"
    )
    assert exit_meaning(21).endswith("(NO_OBJS_FOUND)")
    assert exit_meaning(99) == "unknown iscsiadm exit status 99"
    assert exit_meaning(-9) == "iscsiadm was killed by signal 9"
    assert exit_meaning(None) == "iscsiadm did not finish"


# ---------------------------------------------------------------------------- the fake
# (tests/fakes.py: Fake, and the ``fake`` fixture conftest.py shares)


LOCAL = Portal(host="127.0.0.1")
KEY = f"{IQN} 127.0.0.1:3260"  # how the fake keys a node record
SETUP_OPS = ["new", "update", "update", "update", "update", "update"]


def local_target(*, mutual: bool = False) -> NodeTarget:
    return chap_target(mutual=mutual, portal=LOCAL)


async def test_attach_success_creates_record_logs_in_and_finds_the_disk(fake: Fake) -> None:
    t = local_target(mutual=True)
    device = fake.device_for(t)
    assert device == fake.dev_root / f"ip-127.0.0.1:3260-iscsi-{IQN}-lun-0"
    with trio.fail_after(30):
        result = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert result == AttachResult(
        device=device,
        created_record=True,
        session_existed=False,
        commands=(node_show(t).masked(), *dry_run_plan(t)),
    )
    assert device.exists()
    assert fake.ops() == ["show", *SETUP_OPS, "update", "update", "login"]
    assert fake.saved() == {"records": [KEY], "sessions": [KEY]}
    # The fake saw the real secrets (it logs only their hashes) in the right commands.
    argvs = [argv for _, argv in fake.calls()]
    assert argvs[6][-1] == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
    assert argvs[8][-1] == "sha256:" + hashlib.sha256(SECRET_IN.encode()).hexdigest()
    assert SECRET not in fake.log.read_text()
    assert SECRET not in repr(result)


async def test_attach_updates_an_existing_record_in_place(fake: Fake) -> None:
    fake.preload(records=[KEY])
    t = local_target()
    fake.device_for(t)
    with trio.fail_after(30):
        result = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert not result.created_record
    assert fake.ops() == ["show", "update", "update", "update", "update", "update", "login"]


async def test_attach_counts_an_existing_session_as_success(fake: Fake) -> None:
    t = local_target()
    device = fake.device_for(t)
    device.write_text("already attached\n")
    fake.script(login=IscsiadmExit.SESS_EXISTS)
    with trio.fail_after(30):
        result = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert result.session_existed
    assert result.created_record
    assert result.device == device
    assert fake.ops()[-1] == "login"


@pytest.mark.parametrize(
    "code",
    [IscsiadmExit.LOGIN_AUTH_FAILED, IscsiadmExit.ISCSID_NOTCONN, IscsiadmExit.TRANS_TIMEOUT, 99],
)
async def test_failed_login_removes_only_what_we_created(fake: Fake, code: int) -> None:
    t = local_target()
    fake.script(login=code)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert info.value.exit_code == code
    assert exit_meaning(code) in str(info.value)
    assert info.value.command == node_login(t).masked()
    assert str(info.value).endswith("iscsiadm: fake exit status " + str(code))
    assert fake.ops() == ["show", *SETUP_OPS, "login", "logout", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}


async def test_failed_login_keeps_a_record_we_did_not_create(fake: Fake) -> None:
    fake.preload(records=[KEY])
    fake.script(login=IscsiadmExit.LOGIN_AUTH_FAILED)
    with trio.fail_after(30), pytest.raises(IscsiadmError):
        await attach(local_target(), iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert fake.ops()[-2:] == ["login", "logout"]
    assert fake.saved()["records"] == [KEY]


async def test_failed_setup_deletes_the_new_record_without_logging_out(fake: Fake) -> None:
    fake.script(update=IscsiadmExit.IDBM)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await attach(local_target(), iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert info.value.exit_code == IscsiadmExit.IDBM
    assert "iSCSI node database" in str(info.value)
    assert fake.ops() == ["show", "new", "update", "delete"]
    assert fake.saved()["records"] == []


async def test_unexpected_show_status_stops_before_touching_anything(fake: Fake) -> None:
    fake.script(show=IscsiadmExit.ACCESS)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await attach(local_target(), iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert info.value.exit_code == IscsiadmExit.ACCESS
    assert fake.ops() == ["show"]


def test_result_status_and_error() -> None:
    shown = node_show(target()).masked()
    result = Result(command=shown, exit_code=21, stdout="", stderr="a\n\n  last line  \n\n")
    assert result.status is IscsiadmExit.NO_OBJS_FOUND
    assert result.last_stderr_line == "last line"
    error = result.error()
    assert str(error) == f"{exit_meaning(21)} [exit 21]: {shown}: last line"
    assert (error.exit_code, error.command) == (21, shown)
    assert Result(command=shown, exit_code=40, stdout="", stderr="").status is None
    assert str(Result(command=shown, exit_code=40, stdout="", stderr="").error()).endswith(shown)


async def test_every_exit_code_is_mapped(fake: Fake) -> None:
    iscsiadm = fake.iscsiadm()
    t = target()
    with trio.fail_after(60):
        for code in [*IscsiadmExit, 33, 255]:
            fake.script(show=int(code))
            if code == 0:
                assert (await iscsiadm.check(node_show(t))).status is IscsiadmExit.SUCCESS
                continue
            with pytest.raises(IscsiadmError) as info:
                await iscsiadm.check(node_show(t))
            assert info.value.exit_code == code
            assert str(info.value).startswith(f"{exit_meaning(code)} [exit {code}]: ")
            assert str(info.value).endswith(f"fake exit status {code}")


async def test_timeout_kills_iscsiadm_and_cleans_up(fake: Fake) -> None:
    fake.env["FAKE_ISCSIADM_HANG"] = "login"
    t = local_target()
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await attach(t, iscsiadm=fake.iscsiadm(timeout=1.0), dev_root=fake.dev_root)
    assert info.value.exit_code is None
    assert "did not finish within 1 s" in str(info.value)
    assert info.value.command == node_login(t).masked()
    # The login may have half-happened, so we log out (harmless when there is no session).
    assert fake.ops()[-3:] == ["login", "logout", "delete"]
    assert fake.saved()["records"] == []


async def test_attach_waits_for_tgt_lun_256_under_its_sam2_name(fake: Fake) -> None:
    """tgt reports LUN 256 as flat ``41 00``: Linux names it ``lun-0x4100000000000000``."""
    device = fake.dev_root / f"ip-127.0.0.1:3260-iscsi-{IQN}-lun-0x4100000000000000"
    fake.env["FAKE_ISCSIADM_DEVICE"] = str(device)  # where udev would put it, written out
    t = target(portal=LOCAL, lun=256, addressing_mode=SAM2)
    with trio.fail_after(30):
        result = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert result.device == device
    assert device.exists()
    # The same LUN under SAM waits for a name udev never makes for this disk.
    await detach(t, iscsiadm=fake.iscsiadm())
    device.unlink()
    sam = target(portal=LOCAL, lun=256)
    with trio.fail_after(30), pytest.raises(DeviceTimeout) as info:
        await attach(sam, iscsiadm=fake.iscsiadm(), device_timeout=0.2, dev_root=fake.dev_root)
    assert info.value.path.endswith("-lun-0x0100000000000000")


async def test_device_that_never_appears_times_out_and_undoes_the_login(fake: Fake) -> None:
    t = local_target()
    with trio.fail_after(30), pytest.raises(DeviceTimeout) as info:
        await attach(t, iscsiadm=fake.iscsiadm(), device_timeout=0.2, dev_root=fake.dev_root)
    assert isinstance(info.value, TimeoutError)
    assert info.value.path == str(fake.dev_root / by_path_name(t))
    assert fake.ops()[-3:] == ["login", "logout", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}


class SignallingIscsiadm(Iscsiadm):
    """Sets ``logged_in`` once a --login has run, so a test can cancel at exactly that point."""

    def __init__(self, fake: Fake) -> None:
        super().__init__(binary=fake.binary, env=fake.env)
        self.logged_in = trio.Event()

    async def run(self, cmd: Command) -> Result:
        result = await super().run(cmd)
        if "--login" in cmd.argv:
            self.logged_in.set()
        return result


async def test_cancelled_attach_still_cleans_up(fake: Fake) -> None:
    iscsiadm = SignallingIscsiadm(fake)
    t = local_target()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def attach_until_cancelled() -> None:
                await attach(t, iscsiadm=iscsiadm, device_timeout=60, dev_root=fake.dev_root)

            nursery.start_soon(attach_until_cancelled)
            await iscsiadm.logged_in.wait()
            nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    assert fake.ops()[-3:] == ["login", "logout", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}


async def test_secret_never_reaches_logs_errors_or_results(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyiscsi_failover")
    fake.env["FAKE_ISCSIADM_ECHO"] = "1"  # the fake echoes its argv, secret and all, to stderr
    fake.script(update=IscsiadmExit.INVAL)
    fake.preload(records=[KEY])
    t = local_target(mutual=True)
    iscsiadm = fake.iscsiadm()
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await iscsiadm.check(node_update(t, "node.session.auth.password", Secret(SECRET)))
    error = info.value
    assert str(error).endswith(f"-v {MASK}")  # the echoed argv, masked
    result = await iscsiadm.run(node_update(t, "node.session.auth.password_in", Secret(SECRET_IN)))
    assert result.stderr.rstrip().endswith(f"-v {MASK}")
    with trio.fail_after(30), pytest.raises(IscsiadmError) as attach_info:
        await attach(t, iscsiadm=iscsiadm, dev_root=fake.dev_root)
    shown = [
        caplog.text,
        str(error),
        repr(error),
        error.command,
        str(error.args),
        repr(result),
        result.stdout,
        result.stderr,
        str(attach_info.value),
        repr(attach_info.value),
        repr(t),
        repr(iscsiadm),
        fake.log.read_text(),
    ]
    for text in shown:
        assert SECRET not in text
        assert SECRET_IN not in text
    assert MASK in caplog.text
    assert any(
        r.levelno == logging.INFO and "running iscsiadm" in r.message for r in caplog.records
    )


async def test_output_masking_works_on_bytes_that_are_not_utf8(fake: Fake) -> None:
    secret = Secret(b"\xffraw-secret\xfe")
    fake.env["FAKE_ISCSIADM_ECHO"] = "1"
    result = await fake.iscsiadm().run(node_update(target(), "node.session.auth.password", secret))
    assert "raw-secret" not in result.stderr
    assert result.stderr.rstrip().endswith(f"-v {MASK}")
    assert hashlib.sha256(b"\xffraw-secret\xfe").hexdigest() in fake.log.read_text()


async def test_missing_binary_is_an_iscsiadm_error(tmp_path: Path) -> None:
    iscsiadm = Iscsiadm(binary=tmp_path / "no-such-iscsiadm")
    with trio.fail_after(10), pytest.raises(IscsiadmError) as info:
        await iscsiadm.run(node_update(chap_target(), "node.session.auth.password", Secret(SECRET)))
    assert info.value.exit_code is None
    assert "cannot run" in str(info.value)
    assert SECRET not in str(info.value)
    assert info.value.__cause__ is None


async def test_session_list_and_show_output(fake: Fake) -> None:
    iscsiadm = fake.iscsiadm()
    assert (await iscsiadm.run(session_list())).exit_code == IscsiadmExit.NO_OBJS_FOUND
    fake.preload(records=[KEY], sessions=[KEY])
    listed = await iscsiadm.run(session_list())
    assert listed.exit_code == 0
    assert IQN in listed.stdout
    shown = await iscsiadm.run(node_show(local_target()))
    assert f"node.name = {IQN}" in shown.stdout
    assert shown.last_stderr_line == ""


async def test_detach_always_deletes_any_record_and_is_idempotent(
    fake: Fake, default_ledger: RecordLedger
) -> None:
    fake.preload(records=[KEY], sessions=[KEY])  # not in any ledger: made by hand
    t = local_target()
    with trio.fail_after(30):
        ran = await detach(t, iscsiadm=fake.iscsiadm(), delete="always")
        commands = (node_logout(t).masked(), node_delete(t).masked())
        assert ran == DetachResult(record=RecordFate.DELETED, commands=commands)
        assert fake.saved() == {"records": [], "sessions": []}
        again = await detach(t, iscsiadm=fake.iscsiadm(), delete="always")
    # No session, no record, no ledger entry: nothing to detach.
    assert again == DetachResult(record=RecordFate.ABSENT, commands=commands)
    assert again.record.value == "absent"
    assert fake.ops() == ["logout", "delete", "logout", "delete"]
    assert not default_ledger.path.exists()


async def test_detach_always_forgets_our_ledger_entry(fake: Fake, ledger: RecordLedger) -> None:
    t = local_target()
    fake.preload(records=[KEY])
    ledger.add(t)
    with trio.fail_after(30):
        result = await detach(t, iscsiadm=fake.iscsiadm(), delete="always", ledger=ledger)
    assert result.record is RecordFate.DELETED
    assert ledger.entries() == ()


async def test_detach_without_a_ledger_uses_the_default_one_and_keeps_a_hand_made_record(
    fake: Fake, default_ledger: RecordLedger
) -> None:
    fake.preload(records=[KEY], sessions=[KEY])
    t = local_target()
    with trio.fail_after(30):
        kept = await detach(t, iscsiadm=fake.iscsiadm())
    assert kept.record is RecordFate.KEPT_NOT_OURS
    assert fake.saved() == {"records": [KEY], "sessions": []}
    # And a record the default ledger lists is deleted, and dropped from it.
    default_ledger.add(t)
    with trio.fail_after(30):
        deleted = await detach(t, iscsiadm=fake.iscsiadm())
    assert deleted.record is RecordFate.DELETED
    assert fake.saved() == {"records": [], "sessions": []}
    assert default_ledger.entries() == ()


async def test_attach_without_a_ledger_notes_its_record_in_the_default_one(
    fake: Fake, default_ledger: RecordLedger
) -> None:
    t = local_target()
    fake.device_for(t)
    with trio.fail_after(30):
        attached = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert attached.created_record
    assert default_ledger.entries() == (LedgerEntry.of(t),)


@pytest.mark.parametrize("delete", DELETE_MODES)
async def test_detach_with_no_record_and_no_session_is_absent(
    fake: Fake, ledger: RecordLedger, delete: str
) -> None:
    with trio.fail_after(30):
        result = await detach(
            local_target(),
            iscsiadm=fake.iscsiadm(),
            delete=delete,  # type: ignore[arg-type]
            ledger=ledger,
        )
    assert result.record is RecordFate.ABSENT
    assert result.record.description == "nothing to detach: no node record and no session"
    assert fake.ops()[0] == "logout"
    assert "delete" not in fake.ops() or delete == "always"


async def test_detach_of_a_session_whose_record_is_gone_is_not_absent(
    fake: Fake, ledger: RecordLedger
) -> None:
    fake.preload(records=[], sessions=[KEY])
    with trio.fail_after(30):
        result = await detach(local_target(), iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert result.record is RecordFate.ALREADY_GONE
    assert fake.saved() == {"records": [], "sessions": []}


@pytest.mark.parametrize("bad", ["yes", "IF_OURS", "", None, True, 1])
async def test_detach_refuses_an_unknown_delete_mode_before_running_anything(
    fake: Fake, bad: object
) -> None:
    with trio.fail_after(30), pytest.raises(LocalProtocolError) as info:
        await detach(local_target(), iscsiadm=fake.iscsiadm(), delete=bad)  # type: ignore[arg-type]
    assert f"delete={bad!r}" in str(info.value)
    assert "'if_ours', 'always', 'never'" in str(info.value)
    assert fake.ops() == []


@pytest.mark.parametrize(("delete_record", "fate"), [(True, "deleted"), (False, "kept_on_request")])
async def test_the_older_delete_record_keyword_still_works(
    fake: Fake, ledger: RecordLedger, delete_record: bool, fate: str
) -> None:
    t = local_target()
    fake.preload(records=[KEY])
    ledger.add(t)
    with trio.fail_after(30):
        result = await detach(
            t, iscsiadm=fake.iscsiadm(), delete_record=delete_record, ledger=ledger
        )
    assert result.record.value == fate


async def test_delete_and_delete_record_together_are_refused(fake: Fake) -> None:
    with trio.fail_after(30), pytest.raises(LocalProtocolError, match="not both"):
        await detach(local_target(), iscsiadm=fake.iscsiadm(), delete="never", delete_record=True)
    with trio.fail_after(30), pytest.raises(LocalProtocolError, match="not a bool"):
        await detach(local_target(), iscsiadm=fake.iscsiadm(), delete_record="no")  # type: ignore[arg-type]
    assert fake.ops() == []


@pytest.mark.parametrize("listed", [False, True])
async def test_detach_can_keep_the_record(fake: Fake, ledger: RecordLedger, listed: bool) -> None:
    fake.preload(records=[KEY], sessions=[KEY])
    if listed:
        ledger.add(local_target())  # even a record of ours stays when asked to
    with trio.fail_after(30):
        result = await detach(
            local_target(), iscsiadm=fake.iscsiadm(), delete="never", ledger=ledger
        )
    assert result.record is RecordFate.KEPT_ON_REQUEST
    assert fake.ops() == ["logout", "show"]
    assert fake.saved() == {"records": [KEY], "sessions": []}
    assert ledger.is_ours(local_target()) is listed


async def test_detach_reports_a_failed_logout(fake: Fake) -> None:
    fake.script(logout=IscsiadmExit.LOGOUT)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await detach(local_target(), iscsiadm=fake.iscsiadm())
    assert info.value.exit_code == IscsiadmExit.LOGOUT
    assert fake.ops() == ["logout"]


# ---------------------------------------------------------------------------- the ledger


@pytest.fixture
def ledger(tmp_path: Path) -> RecordLedger:
    # In a directory that does not exist yet, so that we see it created with mode 0700.
    return RecordLedger(tmp_path / "var-lib" / "created-records.json")


def ledger_document(ledger: RecordLedger) -> object:
    return json.loads(ledger.path.read_text())


def test_default_ledger_path(default_ledger: RecordLedger) -> None:
    assert Path("/var/lib/pyiscsi-failover/created-records.json") == DEFAULT_LEDGER_PATH
    # Looked up when the ledger is made (the autouse fixture moved it for this test).
    assert RecordLedger().path == default_ledger.path != DEFAULT_LEDGER_PATH
    assert repr(RecordLedger("/x/y.json")) == "RecordLedger('/x/y.json')"


async def test_attach_then_detach_deletes_the_record_we_made(
    fake: Fake, ledger: RecordLedger
) -> None:
    t = local_target(mutual=True)
    fake.device_for(t)
    with trio.fail_after(30):
        attached = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
    assert attached.created_record
    # Exactly what we made, in iscsiadm's terms, and nothing else: no CHAP name, no secret.
    assert ledger_document(ledger) == {
        "version": 1,
        "records": [{"iqn": IQN, "portal": "127.0.0.1:3260"}],
    }
    text = ledger.path.read_text()
    assert SECRET not in text and SECRET_IN not in text and "alice" not in text
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700
    with trio.fail_after(30):
        detached = await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert detached == DetachResult(
        record=RecordFate.DELETED,
        commands=(node_logout(t).masked(), node_show(t).masked(), node_delete(t).masked()),
    )
    assert fake.saved() == {"records": [], "sessions": []}
    assert ledger.entries() == ()
    assert ledger_document(ledger) == {"version": 1, "records": []}


async def test_a_record_that_existed_before_attach_survives_detach(
    fake: Fake, ledger: RecordLedger
) -> None:
    fake.preload(records=[KEY])  # an operator made it by hand
    t = local_target()
    fake.device_for(t)
    with trio.fail_after(30):
        attached = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
        assert not attached.created_record
        assert not ledger.path.exists()  # nothing of ours to note
        detached = await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert detached == DetachResult(
        record=RecordFate.KEPT_NOT_OURS,
        commands=(node_logout(t).masked(), node_show(t).masked()),
    )
    assert detached.record.description == "record kept: not created by pyiscsi-failover"
    assert fake.ops()[-2:] == ["logout", "show"]  # logged out, the record looked at, not deleted
    assert fake.saved() == {"records": [KEY], "sessions": []}


async def test_detach_of_a_record_never_attached_keeps_it(fake: Fake, ledger: RecordLedger) -> None:
    fake.preload(records=[KEY], sessions=[KEY])
    with trio.fail_after(30):
        result = await detach(local_target(), iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert result.record is RecordFate.KEPT_NOT_OURS
    assert fake.saved() == {"records": [KEY], "sessions": []}
    assert not ledger.path.parent.exists()  # reading an absent ledger creates nothing


async def test_a_record_of_ours_from_an_earlier_attach_stays_ours(
    fake: Fake, ledger: RecordLedger
) -> None:
    t = local_target()
    fake.preload(records=[KEY])
    ledger.add(t)  # an earlier attach made it; this one finds it in place
    fake.device_for(t)
    with trio.fail_after(30):
        attached = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
        assert not attached.created_record
        assert ledger.is_ours(t)
        detached = await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert detached.record is RecordFate.DELETED
    assert fake.saved()["records"] == []


async def test_detach_of_our_record_that_is_already_gone_forgets_it(
    fake: Fake, ledger: RecordLedger
) -> None:
    t = local_target()
    ledger.add(t)
    with trio.fail_after(30):
        result = await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert result.record is RecordFate.ALREADY_GONE
    assert fake.ops() == ["logout", "show"]
    assert ledger.entries() == ()


class SharedRecordIscsiadm(Iscsiadm):
    """Shows two records for the node, as real iscsiadm does when two tpgts share IQN and
    address (tests/test_iscsiadm_real.py checks the real thing)."""

    async def run(self, cmd: Command) -> Result:
        result = await super().run(cmd)
        if cmd.argv[7:] == () and result.exit_code == 0:
            two = "# BEGIN RECORD 2.1.8\nnode.tpgt = 1\n# END RECORD\n"
            two += "# BEGIN RECORD 2.1.8\nnode.tpgt = 2\n# END RECORD\n"
            return Result(command=result.command, exit_code=0, stdout=two, stderr="")
        return result


async def test_our_record_sharing_iqn_and_address_with_another_is_kept(
    fake: Fake, ledger: RecordLedger, caplog: pytest.LogCaptureFixture
) -> None:
    t = local_target()
    fake.preload(records=[KEY], sessions=[KEY])
    ledger.add(t)
    iscsiadm = SharedRecordIscsiadm(binary=fake.binary, env=fake.env)
    with trio.fail_after(30):
        result = await detach(t, iscsiadm=iscsiadm, ledger=ledger)
    assert result.record is RecordFate.KEPT_SHARED
    assert fake.ops() == ["logout", "show"]  # no delete: it would take the other record too
    assert fake.saved() == {"records": [KEY], "sessions": []}
    assert ledger.is_ours(t)  # still ours, for a later detach once the other one is gone
    assert "iscsiadm would delete both" in caplog.text


async def test_failed_attach_writes_no_ledger_entry_and_drops_a_stale_one(
    fake: Fake, ledger: RecordLedger
) -> None:
    t = local_target()
    other = target(portal=Portal(host="127.0.0.2"))
    ledger.add(other)
    ledger.add(t)  # stale: says ours, but there is no record (someone deleted it)
    fake.script(login=IscsiadmExit.LOGIN_AUTH_FAILED)
    with trio.fail_after(30), pytest.raises(IscsiadmError):
        await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
    assert fake.ops()[-2:] == ["logout", "delete"]
    assert ledger.entries() == (LedgerEntry.of(other),)


async def test_a_created_record_that_cleanup_cannot_delete_is_noted_for_detach(
    fake: Fake, ledger: RecordLedger, caplog: pytest.LogCaptureFixture
) -> None:
    t = local_target()
    fake.script(login=IscsiadmExit.LOGIN_AUTH_FAILED, delete=IscsiadmExit.IDBM)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
    assert info.value.exit_code == IscsiadmExit.LOGIN_AUTH_FAILED  # the attach's own error
    assert fake.saved()["records"] == [KEY]
    assert ledger.is_ours(t)
    assert "noted in" in caplog.text
    fake.script()
    with trio.fail_after(30):
        assert (await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)).record is (
            RecordFate.DELETED
        )
    assert fake.saved()["records"] == []


async def test_cancelled_attach_leaves_no_ledger_entry(fake: Fake, ledger: RecordLedger) -> None:
    iscsiadm = SignallingIscsiadm(fake)
    t = local_target()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def attach_until_cancelled() -> None:
                await attach(
                    t, iscsiadm=iscsiadm, device_timeout=60, dev_root=fake.dev_root, ledger=ledger
                )

            nursery.start_soon(attach_until_cancelled)
            await iscsiadm.logged_in.wait()
            nursery.cancel_scope.cancel()
    assert fake.saved() == {"records": [], "sessions": []}
    assert ledger.entries() == ()


async def test_a_ledger_that_cannot_be_written_undoes_the_attach(
    fake: Fake, ledger: RecordLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*_: object, **__: object) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    t = local_target()
    fake.device_for(t)
    with trio.fail_after(30), pytest.raises(LedgerError) as info:
        await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
    assert "cannot write it: No space left on device" in str(info.value)
    # Without a note, a later detach would keep the record: so it is undone now.
    assert fake.ops()[-2:] == ["logout", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}


async def test_a_ledger_path_that_cannot_be_read_stops_attach_before_it_starts(
    fake: Fake, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    ledger = RecordLedger(blocker / "created-records.json")
    with trio.fail_after(30), pytest.raises(LedgerError) as info:
        await attach(
            local_target(), iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger
        )
    assert "cannot open its directory: Not a directory" in str(info.value)
    assert fake.ops() == []


CORRUPT_LEDGERS = [
    (b"{not json", "it is not JSON (Expecting property name"),
    (b'{"version": 1, "records": []}\xff', "not UTF-8 (bad byte at offset 29)"),
    (b"[]", "not a JSON object"),
    (b'{"version": 2, "records": []}', "unknown version 2"),
    (b'{"version": true, "records": []}', "unknown version True"),
    (b'{"records": []}', "unknown version None"),
    (b'{"version": 1, "records": {}}', '"records" is not a list'),
    (b'{"version": 1, "records": [{"iqn": 1, "portal": "h"}]}', "record #0 is not"),
    (b'{"version": 1, "records": ["x"]}', "record #0 is not"),
    (b'{"version": 1, "records": [{"iqn": "bogus", "portal": "h"}]}', "record #0: invalid"),
    (
        b'{"version": 1, "records": [{"iqn": "iqn.2010-10.org.x:y", "portal": "h:0"}]}',
        "record #0: invalid portal",
    ),
    (b"[" * 200_000, "not usable JSON (RecursionError)"),
    (b" " * (1 << 20) + b"{}", "larger than 1048576 bytes"),
]


@pytest.mark.parametrize(("content", "fragment"), CORRUPT_LEDGERS)
async def test_a_corrupt_ledger_is_a_typed_error_before_anything_runs(
    fake: Fake, tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "created-records.json"
    path.write_bytes(content)
    ledger = RecordLedger(path)
    t = local_target()
    fake.preload(records=[KEY], sessions=[KEY])
    with trio.fail_after(30):
        with pytest.raises(LedgerError) as attached:
            await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=ledger)
        with pytest.raises(LedgerError) as detached:
            await detach(t, iscsiadm=fake.iscsiadm(), ledger=ledger)
    assert fake.ops() == []  # neither touched iscsiadm
    assert fake.saved() == {"records": [KEY], "sessions": [KEY]}
    for error in (attached.value, detached.value):
        message = str(error)
        assert isinstance(error, ISCSIError)
        assert error.path == str(path)
        assert message.startswith(f"node-record ledger {str(path)!r}: ")
        assert fragment in message, message
        assert "\n" not in message
        assert len(message) < 400
        assert error.__cause__ is None
    assert path.read_bytes() == content  # left as found, for the operator to look at


def test_an_unreadable_ledger_is_a_typed_error(tmp_path: Path) -> None:
    ledger = RecordLedger(tmp_path)  # a directory: reading it fails whoever we are
    with pytest.raises(LedgerError) as info:
        ledger.entries()
    assert "cannot read it: Is a directory" in str(info.value)


def test_the_ledger_file_is_0600_whatever_the_umask_and_old_mode(
    tmp_path: Path, ledger: RecordLedger
) -> None:
    old = os.umask(0)
    try:
        ledger.add(local_target())
        assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700
        ledger.path.chmod(0o644)
        ledger.add(target())
    finally:
        os.umask(old)
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    lock = ledger.path.with_name(ledger.path.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    RecordLedger(tmp_path / "ledger.json").add(target())
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_ledger_whole_and_no_litter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    ledger = RecordLedger(tmp_path / "ledger.json")
    ledger.add(local_target())
    before = ledger.path.read_bytes()

    def no_space(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, failing, no_space)
    with pytest.raises(LedgerError) as info:
        ledger.add(target())
    monkeypatch.undo()
    assert "cannot write it: No space left on device" in str(info.value)
    assert ledger.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "ledger.json.lock").symlink_to(elsewhere)
    with pytest.raises(LedgerError) as info:
        RecordLedger(tmp_path / "ledger.json").add(target())
    assert "cannot open its lock file" in str(info.value)
    assert not elsewhere.exists()


@contextlib.contextmanager
def lock_held(ledger: RecordLedger) -> Iterator[None]:
    """Hold the ledger's lock through a descriptor of our own, as another process would."""
    fd = os.open(ledger.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_the_lock_deadline_is_five_seconds() -> None:
    assert LEDGER_LOCK_TIMEOUT == 5.0
    assert RecordLedger("/x/y.json").lock_timeout == LEDGER_LOCK_TIMEOUT
    assert RecordLedger("/x/y.json").lock_path == Path("/x/y.json.lock")


async def test_a_lock_held_elsewhere_fails_after_the_deadline_without_blocking_trio(
    ledger: RecordLedger, autojump_clock: trio.testing.MockClock
) -> None:
    ledger.add(target(portal=Portal(host="10.0.0.9")))
    before = ledger.path.read_bytes()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(1)
            ticks += 1

    with lock_held(ledger), trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            start = trio.current_time()
            with pytest.raises(LedgerError) as info:
                await ledger.add_async(target())
            waited = trio.current_time() - start
            with pytest.raises(LedgerError):
                await ledger.remove_async(target(portal=Portal(host="10.0.0.9")))
            nursery.cancel_scope.cancel()
    assert waited == pytest.approx(5.0, abs=0.02)
    assert ticks >= 5  # the event loop kept running other tasks while we waited
    message = str(info.value)
    assert info.value.path == str(ledger.path)
    assert f"its lock file {str(ledger.lock_path)!r} is still held by another process" in message
    assert "after 5 s" in message
    assert ledger.path.read_bytes() == before  # nothing written


async def test_a_lock_released_in_time_is_taken(
    ledger: RecordLedger, autojump_clock: trio.testing.MockClock
) -> None:
    ledger.path.parent.mkdir(mode=0o700)
    holder = os.open(ledger.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)

    async def release_after_a_second() -> None:
        await trio.sleep(1)
        os.close(holder)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_after_a_second)
            start = trio.current_time()
            await ledger.add_async(target())
            waited = trio.current_time() - start
    assert 1.0 <= waited <= 1.02
    assert ledger.entries() == (LedgerEntry.of(target()),)


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def test_the_synchronous_methods_give_up_on_a_lock_another_process_holds(
    tmp_path: Path,
) -> None:
    ledger = RecordLedger(tmp_path / "ledger.json", lock_timeout=0.2)
    argv = [sys.executable, "-c", HOLDER, str(ledger.lock_path)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline() == "locked\n"
            with pytest.raises(LedgerError, match=r"still held by another process after 0\.2 s"):
                ledger.add(target())
            assert not ledger.path.exists()
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
    ledger.add(target())  # the lock is free again
    assert ledger.entries() == (LedgerEntry.of(target()),)


async def test_attach_whose_ledger_lock_stays_busy_is_undone(
    fake: Fake, ledger: RecordLedger, caplog: pytest.LogCaptureFixture
) -> None:
    busy = RecordLedger(ledger.path, lock_timeout=0.2)
    t = local_target()
    fake.device_for(t)
    ledger.path.parent.mkdir(mode=0o700)
    with lock_held(ledger), trio.fail_after(30), pytest.raises(LedgerError) as info:
        await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root, ledger=busy)
    assert "still held by another process" in str(info.value)
    assert fake.ops()[-3:] == ["login", "logout", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}
    assert busy.entries() == ()


STRANGER = 54321  # a uid that is neither ours nor root's


@pytest.fixture
def written(tmp_path: Path) -> RecordLedger:
    """A valid ledger with one entry, in a private directory."""
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    ledger = RecordLedger(directory / "created-records.json")
    ledger.add(target())
    return ledger


def refused(ledger: RecordLedger) -> str:
    """The message of the LedgerError that reading and adding both raise; nothing written."""
    before = ledger.path.read_bytes() if ledger.path.is_file() else None
    with pytest.raises(LedgerError) as read:
        ledger.entries()
    with pytest.raises(LedgerError) as added:
        ledger.add(local_target())
    after = ledger.path.read_bytes() if ledger.path.is_file() else None
    assert before == after
    assert str(read.value) == str(added.value)
    assert read.value.path == str(ledger.path)
    assert str(read.value).startswith(f"node-record ledger {str(ledger.path)!r}: ")
    return str(read.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away (chown)")
def test_a_ledger_owned_by_someone_else_is_refused(written: RecordLedger) -> None:
    os.chown(written.path, STRANGER, -1)
    assert f"it belongs to uid {STRANGER}; only we (uid 0) or root may own it" in refused(written)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away (chown)")
def test_a_ledger_in_a_directory_owned_by_someone_else_is_refused(written: RecordLedger) -> None:
    os.chown(written.path.parent, STRANGER, -1)
    message = refused(written)
    assert f"its directory {str(written.path.parent)!r} belongs to uid {STRANGER}" in message


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_ledger_writable_by_group_or_others_is_refused(written: RecordLedger, mode: int) -> None:
    written.path.chmod(mode)
    assert f"it is writable by group or others (mode {mode:04o})" in refused(written)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_ledger_in_a_directory_writable_by_others_is_refused(
    written: RecordLedger, mode: int
) -> None:
    written.path.parent.chmod(mode)
    message = refused(written)
    assert f"its directory {str(written.path.parent)!r} is writable by group or others" in message
    assert f"(mode {mode:04o})" in message


def test_a_new_ledger_is_never_started_in_a_world_writable_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    ledger = RecordLedger(shared / "created-records.json")
    with pytest.raises(LedgerError, match="is writable by group or others"):
        ledger.add(target())
    assert list(shared.iterdir()) == []  # not even a lock file


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away (chown)")
def test_files_of_ours_or_roots_are_trusted(
    written: RecordLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = (LedgerEntry.of(target()),)
    # Seen as a non-root user: the ledger and directory root owns are trusted...
    monkeypatch.setattr(os, "geteuid", lambda: STRANGER)
    assert written.entries() == entries
    # ...and so are the user's own; another user's are not.
    os.chown(written.path, STRANGER, -1)
    os.chown(written.path.parent, STRANGER, -1)
    assert written.entries() == entries
    monkeypatch.setattr(os, "geteuid", lambda: STRANGER + 1)
    with pytest.raises(LedgerError, match=f"belongs to uid {STRANGER}; only we"):
        written.entries()


def test_a_symlink_in_place_of_the_ledger_is_refused_not_followed(
    written: RecordLedger, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(written.path.read_bytes())
    written.path.unlink()
    written.path.symlink_to(elsewhere)
    assert "it is a symbolic link, which is never followed" in refused(written)
    assert json.loads(elsewhere.read_text())["records"] == [{"iqn": IQN, "portal": "10.0.0.1:3260"}]


def test_a_fifo_in_place_of_the_ledger_is_refused_without_hanging(written: RecordLedger) -> None:
    written.path.unlink()
    os.mkfifo(written.path, 0o600)
    assert "it is not a regular file" in refused(written)


def test_concurrent_adds_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    threads, per_thread = 8, 6
    barrier = threading.Barrier(threads)

    def add_some(n: int) -> None:
        ledger = RecordLedger(path)  # each its own object, as separate processes would be
        barrier.wait()
        for i in range(per_thread):
            ledger.add(target(portal=Portal(host=f"127.0.{n}.{i + 1}")))

    workers = [threading.Thread(target=add_some, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert len(RecordLedger(path).entries()) == threads * per_thread


@pytest.mark.parametrize(
    ("ours", "theirs", "same"),
    [
        (Portal(host="10.0.0.1"), Portal(host="10.0.0.1", tpgt=4), True),  # iscsiadm ignores it
        (Portal(host="10.0.0.1", tpgt=1), Portal(host="10.0.0.1", tpgt=2), True),
        (Portal(host="10.0.0.1"), Portal(host="10.0.0.1", port=3261), False),
        (Portal(host="10.0.0.1"), Portal(host="10.0.0.2"), False),
        (Portal(host="fd00::1", tpgt=1), Portal(host="FD00:0::1"), True),
    ],
)
def test_ledger_entries_match_records_as_iscsiadm_does(
    ours: Portal, theirs: Portal, same: bool
) -> None:
    entry = LedgerEntry.of(target(portal=ours))
    assert entry.portal == portal_argument(target(portal=ours))
    assert entry.matches(target(portal=theirs)) is same
    assert not entry.matches(target(portal=ours, iqn="iqn.2010-10.org.openstack:volume-0002"))


def test_ledger_entries_are_normalised_and_validated() -> None:
    entry = LedgerEntry(iqn=IQN.upper(), portal="[FD00:0::1]:3260,1")
    assert (entry.iqn, entry.portal) == (IQN, "[fd00::1]:3260,1")
    assert entry.matches(target(portal=Portal(host="fd00::1")))
    with pytest.raises(InvalidName):
        LedgerEntry(iqn="volume-1", portal="10.0.0.1")
    with pytest.raises(ISCSIError):
        LedgerEntry(iqn=IQN, portal="10.0.0.1:99999")


def test_adding_the_same_record_again_keeps_one_entry(ledger: RecordLedger) -> None:
    ledger.add(target(portal=Portal(host="10.0.0.1")))
    ledger.add(target(portal=Portal(host="10.0.0.1", tpgt=3)))
    assert ledger.entries() == (LedgerEntry(iqn=IQN, portal="10.0.0.1:3260,3"),)
    assert ledger.remove(target(portal=Portal(host="10.0.0.1")))
    assert not ledger.remove(target(portal=Portal(host="10.0.0.1")))
    assert ledger.entries() == ()


LEDGER_TARGETS = [target(portal=Portal(host=f"10.0.0.{n}", tpgt=n % 2 or None)) for n in (1, 2, 3)]


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, len(LEDGER_TARGETS) - 1)), max_size=12))
def test_the_ledger_behaves_like_a_set(tmp_path: Path, operations: list[tuple[bool, int]]) -> None:
    path = tmp_path / f"ledger-{len(list(tmp_path.iterdir()))}.json"
    ledger = RecordLedger(path)
    model: set[int] = set()
    for add, index in operations:
        t = LEDGER_TARGETS[index]
        if add:
            ledger.add(t)
            model.add(index)
        else:
            assert ledger.remove(t) is (index in model)
            model.discard(index)
        assert {i for i, t in enumerate(LEDGER_TARGETS) if ledger.is_ours(t)} == model
    assert len(RecordLedger(path).entries()) == len(model)
