"""Tests of the real-peer harness (``tests/peers.py``) against tgt's tgtd and libiscsi's iscsi-ls.

If these pass, a failure in a peer test elsewhere is about our code, not about the harness:
tgtd starts and stops cleanly, several run at once, targets/ACLs/CHAP accounts/redirects do
what tgtadm promises, and iscsi-ls (a real initiator) sees exactly that. Every subprocess runs
under a timeout (tgtadm 10 s, iscsi-ls 20 s, tgtd readiness 10 s), which stands in for
``trio.fail_after`` in these synchronous tests. Only loopback addresses are used.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from ipaddress import IPv4Address

import peers
import pytest
from peers import (
    PeerError,
    Tgtd,
    TgtdStarter,
    iscsi_ls,
    iscsi_url,
    iter_ipc_files,
    parse_iscsi_ls,
    pid_alive,
    require_tool,
    unique_loopback,
)

IQN = "iqn.2024-01.test.pyiscsi:"
USER = "harness-user"
SECRET = "harness-secret-42"  # test-only


def _names(stdout: str) -> set[str]:
    return {target.name for target in parse_iscsi_ls(stdout)}


def _connect_error(host: str, port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, port))


# --------------------------------------------------------------------------------------------
# pure helpers (no peer needed)


def test_unique_loopback_addresses_are_distinct_and_never_127_0_0_1() -> None:
    addresses = [unique_loopback() for _ in range(254)]  # one full cycle, wherever it starts
    assert len(set(addresses)) == len(addresses)
    parsed = [IPv4Address(address) for address in addresses]
    assert all(address.is_loopback for address in parsed)
    assert IPv4Address("127.0.0.1") not in parsed
    assert all(0 < int(octet) < 255 for address in addresses for octet in address.split(".")[1:])
    # The middle octets come from the pid, so concurrent pytest processes use other ones.
    high, low = peers._loopback_prefix(os.getpid())
    assert {address.rsplit(".", 1)[0] for address in addresses} == {f"127.{high}.{low}"}


def test_loopback_prefixes_differ_between_neighbouring_pids() -> None:
    prefixes = {peers._loopback_prefix(pid) for pid in range(1000, 1000 + 254 * 254)}
    assert len(prefixes) == 254 * 254


def test_parse_iscsi_ls_reads_targets_and_luns() -> None:
    text = (
        "Target:iqn.2024-01.test:a Portal:127.1.2.3:3260,1\n"
        "Lun:0    Type:STORAGE_ARRAY_CONTROLLER\n"
        "Lun:1    Type:DIRECT_ACCESS (Size:1023k)\n"
        "Target:iqn.2024-01.test:b Portal:[::1]:3260,1\n"
        "list_luns: iscsi_connect failed. Failed to log in to target.\n"
    )
    first, second = parse_iscsi_ls(text)
    assert (first.name, first.portal) == ("iqn.2024-01.test:a", "127.1.2.3:3260,1")
    assert first.luns == {0: "STORAGE_ARRAY_CONTROLLER", 1: "DIRECT_ACCESS (Size:1023k)"}
    assert (second.name, second.portal, second.luns) == ("iqn.2024-01.test:b", "[::1]:3260,1", {})


def test_iscsi_url_forms() -> None:
    assert iscsi_url("127.1.2.3") == "iscsi://127.1.2.3:3260"
    assert iscsi_url("::1", 3261) == "iscsi://[::1]:3261"
    assert iscsi_url("127.1.2.3", user="u", password="p") == "iscsi://u%p@127.1.2.3:3260"


def test_require_tool_installs_then_skips_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_apt(argv: list[str]) -> bool:
        calls.append(argv)
        return False

    monkeypatch.setattr(peers, "_apt", fake_apt)
    monkeypatch.setattr(peers, "_apt_update", lambda: True)
    monkeypatch.delenv("CI", raising=False)
    binary = f"no-such-tool-{os.getpid()}-skip"
    with pytest.raises(pytest.skip.Exception, match=r"no-such-package.*apt-get install"):
        require_tool(binary, "no-such-package")
    if os.geteuid() == 0 and peers._which("apt-get"):
        # First try, then (because it failed and the lists were refreshed) once more.
        assert (
            calls
            == [["apt-get", "install", "-y", "--no-install-recommends", "no-such-package"]] * 2
        )
    else:
        assert calls == []


def test_require_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "_apt", lambda argv: False)
    monkeypatch.setattr(peers, "_apt_update", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-package"):
        require_tool(f"no-such-tool-{os.getpid()}-ci", "no-such-package")


# --------------------------------------------------------------------------------------------
# tgtd + iscsi-ls


@pytest.mark.peer
def test_tgtd_serves_two_targets_that_iscsi_ls_discovers(tgtd_factory: TgtdStarter) -> None:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN + "alpha", luns=2)
    daemon.add_target(2, IQN + "beta")
    daemon.allow(1)
    daemon.allow(2)
    assert daemon.target_ids() == [1, 2]

    status, out, err = iscsi_ls("-i", IQN + "harness", iscsi_url(daemon.host, daemon.port))
    assert status == 0, err
    listed = parse_iscsi_ls(out)
    assert {t.name for t in listed} == {IQN + "alpha", IQN + "beta"}
    # tgt answers SendTargets with only the portal we connected to, portal group tag 1.
    assert {t.portal for t in listed} == {f"{daemon.host}:{daemon.port},1"}

    status, out, err = iscsi_ls("-s", iscsi_url(daemon.host, daemon.port))
    assert status == 0, err
    luns = {t.name: t.luns for t in parse_iscsi_ls(out)}
    assert sorted(luns[IQN + "alpha"]) == [0, 1, 2]  # LUN 0 is tgt's own controller
    assert luns[IQN + "alpha"][0] == "STORAGE_ARRAY_CONTROLLER"
    assert luns[IQN + "beta"][1].startswith("DIRECT_ACCESS")


@pytest.mark.peer
def test_acl_limits_normal_logins_to_the_allowed_initiator(tgtd_factory: TgtdStarter) -> None:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN + "private")
    daemon.allow(1, IQN + "friend")
    url = iscsi_url(daemon.host, daemon.port)

    # tgt leaves the target out of a stranger's SendTargets answer; iscsi-ls then lists
    # nothing and still exits 0.
    status, out, err = iscsi_ls("-i", IQN + "stranger", "-s", url)
    assert (status, out) == (0, ""), err
    status, out, err = iscsi_ls("-i", IQN + "friend", "-s", url)
    assert status == 0, err
    assert _names(out) == {IQN + "private"}


@pytest.mark.peer
def test_chap_account_is_enforced(tgtd_factory: TgtdStarter) -> None:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN + "secure")
    daemon.allow(1)
    daemon.add_account(USER, SECRET)
    daemon.bind_account(1, USER)
    assert USER in daemon.show()

    # Discovery needs no CHAP on tgt; the normal login for the LUN listing does.
    status, out, _ = iscsi_ls("-s", iscsi_url(daemon.host, daemon.port))
    assert status != 0
    assert _names(out) == {IQN + "secure"}
    assert "Authentication failure" in out

    status, out, _ = iscsi_ls("-s", iscsi_url(daemon.host, daemon.port), chap=(USER, "wrong-0123"))
    assert status != 0
    assert "Authentication failure" in out

    for args, chap in (
        ((iscsi_url(daemon.host, daemon.port, user=USER, password=SECRET),), None),
        ((iscsi_url(daemon.host, daemon.port),), (USER, SECRET)),  # LIBISCSI_CHAP_* variables
    ):
        status, out, err = iscsi_ls("-s", *args, chap=chap)
        assert status == 0, err
        assert 1 in parse_iscsi_ls(out)[0].luns


@pytest.mark.peer
def test_two_tgtd_instances_run_side_by_side(tgtd_factory: TgtdStarter) -> None:
    first, second = tgtd_factory(), tgtd_factory()
    assert first.host != second.host
    assert first.control_port != second.control_port
    first.add_target(1, IQN + "first")
    second.add_target(1, IQN + "second")
    first.allow(1)
    second.allow(1)

    for daemon, name in ((first, "first"), (second, "second")):
        status, out, err = iscsi_ls(iscsi_url(daemon.host, daemon.port))
        assert status == 0, err
        assert _names(out) == {IQN + name}  # each tgtadm -C reached its own daemon

    first.stop()
    status, out, err = iscsi_ls(iscsi_url(second.host, second.port))
    assert status == 0, err
    assert _names(out) == {IQN + "second"}


@pytest.mark.peer
def test_redirect_temporary_is_followed_by_iscsi_ls_permanent_is_not(
    tgtd_factory: TgtdStarter,
) -> None:
    front, back = tgtd_factory(), tgtd_factory()
    front.add_target(1, IQN + "moved", luns=1)
    back.add_target(1, IQN + "moved", luns=3)  # more LUNs: shows which portal answered
    front.allow(1)
    back.allow(1)
    url = iscsi_url(front.host, front.port)

    front.redirect(1, back.host, back.port)
    assert front.show(1).splitlines() == [
        f"RedirectAddress={back.host}",
        f"RedirectPort={back.port}",
        "RedirectReason=Temporary",
    ]
    status, out, err = iscsi_ls("-s", url)
    assert status == 0, err
    (listed,) = parse_iscsi_ls(out)
    assert listed.portal == f"{front.host}:{front.port},1"  # SendTargets is not redirected
    assert sorted(listed.luns) == [0, 1, 2, 3]  # but the login went to the back portal

    front.redirect(1, back.host, back.port, "Permanent")
    status, out, _ = iscsi_ls("-s", url)
    assert status != 0
    assert "Target moved permanently" in out  # libiscsi 1.19 follows only 0x0101

    front.clear_redirect(1)
    status, out, err = iscsi_ls("-s", url)
    assert status == 0, err
    assert sorted(parse_iscsi_ls(out)[0].luns) == [0, 1]


@pytest.mark.peer
def test_redirect_to_a_dead_portal_fails_in_iscsi_ls(tgtd_factory: TgtdStarter) -> None:
    front = tgtd_factory()
    front.add_target(1, IQN + "moved")
    front.allow(1)
    nowhere = unique_loopback()
    assert _connect_error(nowhere, 3260) == errno.ECONNREFUSED
    front.redirect(1, nowhere, 3260)
    status, out, _ = iscsi_ls("-s", iscsi_url(front.host, front.port))
    assert status != 0
    assert "iscsi_connect failed" in out


@pytest.mark.peer
def test_stop_leaves_no_process_socket_or_file(tgtd_factory: TgtdStarter) -> None:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN + "doomed")
    daemon.allow(1)
    pid, control_port = daemon.pid, daemon.control_port
    assert pid_alive(pid)
    assert list(iter_ipc_files(control_port))
    assert _connect_error(daemon.host, daemon.port) == 0

    started = time.monotonic()
    daemon.stop()
    # The graceful path (tgtadm --op delete --mode system) ended it, not the SIGKILL fallback.
    assert time.monotonic() - started < peers._STOP_TIMEOUT
    assert not daemon.running
    assert not pid_alive(pid)
    assert list(iter_ipc_files(control_port)) == []
    assert _connect_error(daemon.host, daemon.port) == errno.ECONNREFUSED
    daemon.stop()  # idempotent
    with pytest.raises(PeerError):
        daemon.tgtadm("--op", "show", "--mode", "target")


@pytest.mark.peer
def test_stop_after_tgtd_died_still_cleans_up() -> None:
    with Tgtd() as daemon:
        os.kill(daemon.pid, signal.SIGKILL)  # our own child, killed behind the harness's back
    assert not daemon.running
    assert not pid_alive(daemon.pid)
    assert list(iter_ipc_files(daemon.control_port)) == []


@pytest.mark.peer
def test_a_taken_portal_is_reported(tgtd_factory: TgtdStarter) -> None:
    first = tgtd_factory()
    with pytest.raises(PeerError, match="could not bind"):
        Tgtd(first.host, first.port)
    # Without an explicit host the harness moves on to a fresh address.
    second = tgtd_factory()
    assert second.host != first.host
