"""The iscsiadm hand-off: golden argv of every builder, exit-code mapping, and attach/detach
against a scriptable fake iscsiadm (tests/fake_iscsiadm/iscsiadm) for the paths the kernel
cannot take on a test machine: success, session already there, every failure, timeouts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.credentials import MASK, ChapCredentials, Secret
from pyiscsi_failover.errors import (
    ConnectionInfoError,
    DeviceTimeout,
    InvalidName,
    IscsiadmError,
    ISCSIError,
)
from pyiscsi_failover.iscsiadm import (
    AttachResult,
    Command,
    Iscsiadm,
    IscsiadmExit,
    NodeTarget,
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

IQN = "iqn.2010-10.org.openstack:volume-0001"
SECRET = "Zebra-Quartz-9137-secret"
SECRET_IN = "Mutual-Walrus-5521-secret"
FAKE = Path(__file__).parent / "fake_iscsiadm" / "iscsiadm"


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
        (*update, "node.session.auth.authmethod", "-v", "CHAP"),
        (*update, "node.session.auth.username", "-v", "alice"),
        (*update, "node.session.auth.password", "-v", SECRET),
        (*update, "node.session.auth.username_in", "-v", "tgt-user"),
        (*update, "node.session.auth.password_in", "-v", SECRET_IN),
        (*NODE, "--login"),
    ]
    assert [c.secrets for c in plan][4:7] == [(Secret(SECRET),), (), (Secret(SECRET_IN),)]


def test_handoff_plan_for_an_existing_record_skips_new() -> None:
    plan = handoff_plan(chap_target(), create=False)
    assert [c.argv[7:] for c in plan] == [
        ("-o", "update", "-n", "node.startup", "-v", "manual"),
        ("-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP"),
        ("-o", "update", "-n", "node.session.auth.username", "-v", "alice"),
        ("-o", "update", "-n", "node.session.auth.password", "-v", SECRET),
        ("--login",),
    ]


def test_dry_run_plan_golden() -> None:
    head = f"iscsiadm -m node -T {IQN} -p 10.0.0.1:3260"
    assert dry_run_plan(chap_target(mutual=True)) == [
        f"{head} -o new",
        f"{head} -o update -n node.startup -v manual",
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


@dataclass
class Fake:
    """One fake iscsiadm installation in a tmp dir: binary, state, log, by-path dir."""

    tmp: Path
    binary: Path
    state: Path
    log: Path
    dev_root: Path
    env: dict[str, str]

    def iscsiadm(self, *, timeout: float = 20.0) -> Iscsiadm:
        return Iscsiadm(binary=self.binary, timeout=timeout, env=self.env)

    def script(self, **codes: int) -> None:
        self.env["FAKE_ISCSIADM_EXIT"] = json.dumps(codes)

    def device_for(self, t: NodeTarget) -> Path:
        path = self.dev_root / by_path_name(t)
        self.env["FAKE_ISCSIADM_DEVICE"] = str(path)
        return path

    def calls(self) -> list[tuple[str, list[str]]]:
        """(operation, argv as the fake logged it) for every call so far."""
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [(str(c["op"]), [str(a) for a in c["argv"]]) for c in lines]

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls()]

    def saved(self) -> dict[str, list[str]]:
        if not (self.state / "state.json").exists():
            return {"records": [], "sessions": []}
        loaded: dict[str, list[str]] = json.loads((self.state / "state.json").read_text())
        return loaded

    def preload(self, *, records: list[str], sessions: Sequence[str] = ()) -> None:
        (self.state / "state.json").write_text(
            json.dumps({"records": records, "sessions": list(sessions)})
        )


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    # A wrapper runs the fake with this interpreter, whatever python3 is on PATH.
    binary = tmp_path / "bin" / "iscsiadm"
    binary.parent.mkdir()
    binary.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} "$@"\n'
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    state, dev_root = tmp_path / "state", tmp_path / "by-path"
    state.mkdir()
    dev_root.mkdir()
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "FAKE_ISCSIADM_LOG": str(log),
        "FAKE_ISCSIADM_STATE": str(state),
    }
    return Fake(tmp=tmp_path, binary=binary, state=state, log=log, dev_root=dev_root, env=env)


LOCAL = Portal(host="127.0.0.1")
KEY = f"{IQN} 127.0.0.1:3260"  # how the fake keys a node record
SETUP_OPS = ["new", "update", "update", "update", "update"]


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
    assert argvs[5][-1] == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
    assert argvs[7][-1] == "sha256:" + hashlib.sha256(SECRET_IN.encode()).hexdigest()
    assert SECRET not in fake.log.read_text()
    assert SECRET not in repr(result)


async def test_attach_updates_an_existing_record_in_place(fake: Fake) -> None:
    fake.preload(records=[KEY])
    t = local_target()
    fake.device_for(t)
    with trio.fail_after(30):
        result = await attach(t, iscsiadm=fake.iscsiadm(), dev_root=fake.dev_root)
    assert not result.created_record
    assert fake.ops() == ["show", "update", "update", "update", "update", "login"]


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


async def test_detach_logs_out_and_deletes_and_is_idempotent(fake: Fake) -> None:
    fake.preload(records=[KEY], sessions=[KEY])
    t = local_target()
    with trio.fail_after(30):
        ran = await detach(t, iscsiadm=fake.iscsiadm())
        assert ran == [node_logout(t).masked(), node_delete(t).masked()]
        assert fake.saved() == {"records": [], "sessions": []}
        again = await detach(t, iscsiadm=fake.iscsiadm())  # no session, no record: fine
    assert again == ran
    assert fake.ops() == ["logout", "delete", "logout", "delete"]


async def test_detach_can_keep_the_record(fake: Fake) -> None:
    fake.preload(records=[KEY], sessions=[KEY])
    with trio.fail_after(30):
        await detach(local_target(), iscsiadm=fake.iscsiadm(), delete_record=False)
    assert fake.saved() == {"records": [KEY], "sessions": []}


async def test_detach_reports_a_failed_logout(fake: Fake) -> None:
    fake.script(logout=IscsiadmExit.LOGOUT)
    with trio.fail_after(30), pytest.raises(IscsiadmError) as info:
        await detach(local_target(), iscsiadm=fake.iscsiadm())
    assert info.value.exit_code == IscsiadmExit.LOGOUT
    assert fake.ops() == ["logout"]
