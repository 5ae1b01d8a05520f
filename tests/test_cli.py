"""The ``pyiscsi-failover`` command line, end to end against real targets on loopback.

Most tests call :func:`pyiscsi_failover.cli.run` directly with ``io.StringIO`` streams. ``run``
starts its own trio loop, so these are plain ``def`` tests and the targets live in other
processes: our scriptable test target (``python -m pyiscsi_failover.testing``, started once per
module and awaited on its ``ready`` line) and, for the ``peer`` tests, Debian's tgtd. Every
network wait is bounded by the CLI's own ``--connect-timeout``/``--login-timeout``; the tests
use short ones so that a hang fails fast instead of stalling the suite.

Contract under test: exit 0 success, 1 target or network failure, 2 bad usage or input, each
failure with exactly one ``pyiscsi-failover: ...`` line on stderr and never a traceback; ``--json``
prints one object; CHAP secrets never appear in any output or log record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import select
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from peers import TgtdStarter

from pyiscsi_failover import __version__, cli
from pyiscsi_failover.connection_info import MAX_INPUT_BYTES
from pyiscsi_failover.demo import DEMO_IQN
from pyiscsi_failover.errors import ConnectRefused, ISCSIError

INITIATOR: Final = "iqn.2024-01.com.example:cli-test-initiator"
OPEN_IQN: Final = "iqn.2024-01.com.example:cli-open"
OTHER_IQN: Final = "iqn.2024-01.com.example:cli-other"
CHAP_IQN: Final = "iqn.2024-01.com.example:cli-chap"
USER: Final = "cli-user"
TARGET_USER: Final = "cli-target"
# Recognisable, long enough (>= 12 bytes) not to draw the weak-secret warning, and distinct.
SECRET: Final = "Zq7-CLI-SECRET-must-never-show"
TARGET_SECRET: Final = "Wk4-CLI-TARGET-SECRET-never-shows"
WRONG_SECRET: Final = "Xy9-CLI-WRONG-SECRET-never-shows"
ALL_SECRETS: Final = (SECRET, TARGET_SECRET, WRONG_SECRET)

READY_TIMEOUT: Final = 20.0
FAST: Final = ("--connect-timeout", "2", "--login-timeout", "5")
NAME: Final = ("--initiator-name", INITIATOR)

DATA: Final = Path(__file__).parent / "data"
BAD_DIR: Final = DATA / "bad_connection_info"
BAD_EXPECTED: Final[dict[str, str]] = json.loads((BAD_DIR / "expected.json").read_text())
FAKE_ISCSIADM: Final = Path(__file__).parent / "fake_iscsiadm" / "iscsiadm"

ATTEMPT_KEYS: Final = {
    "index",
    "portal",
    "iqn",
    "lun",
    "outcome",
    "detail",
    "elapsed_ms",
    "redirected_to",
    "redirect_refused",
    "notes",
    "lun_info",
}
OUTCOMES: Final = {
    "ok",
    "refused",
    "timeout",
    "unreachable",
    "auth_failed",
    "authorization_failed",
    "not_found",
    "target_error",
    "protocol_error",
    "redirect_loop",
    "redirect_refused",
    "negotiation_failed",
    "lun_missing",
    "lun_not_ready",
    "lun_standby",
    "lun_error",
    "wrong_volume",
    "not_tried",
    "cancelled",
}
#: Loopback's broadcast address: connect() fails at once with ENETUNREACH, sending nothing.
UNREACHABLE: Final = "127.255.255.255:3260"


# --------------------------------------------------------------------------------------------
# Running the CLI in-process


class TerminalIO(io.StringIO):
    """A stdout that says it is a terminal, to exercise the live-progress path."""

    def isatty(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)  # the whole stdout must be one JSON document

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def cli_run(*argv: str, stdin: str = "", tty: bool = False) -> Ran:
    out: io.StringIO = TerminalIO() if tty else io.StringIO()
    err = io.StringIO()
    code = cli.run(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return Ran(code, out.getvalue(), err.getvalue())


def assert_fails(ran: Ran, code: int, *fragments: str) -> str:
    """Exit ``code`` with exactly one prefixed line on stderr holding every fragment."""
    assert ran.code == code, ran
    assert "Traceback" not in ran.err
    assert len(ran.err_lines) == 1, ran.err
    line = ran.err_lines[0]
    assert line.startswith("pyiscsi-failover: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in ALL_SECRETS:
            assert secret not in text


@pytest.fixture(autouse=True)
def _clean_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A secret in the developer's environment must not leak into (or satisfy) these tests.
    monkeypatch.delenv(cli.SECRET_ENV, raising=False)
    monkeypatch.delenv(cli.TARGET_SECRET_ENV, raising=False)


# --------------------------------------------------------------------------------------------
# The targets: our test target as processes, started once per module


@dataclasses.dataclass(frozen=True)
class Served:
    """A running test-target process and its bound portals by name (``HOST:PORT``)."""

    process: subprocess.Popen[str]
    portals: dict[str, str]
    announced: dict[str, str]  # HOST:PORT,TPGT as SendTargets lists it


@dataclasses.dataclass(frozen=True)
class Targets:
    open: Served  # no CHAP: portals ok, refused, blackhole, redirect (-> ok); two targets
    chap: Served  # CHAP (mutual available) for logins and discovery; only INITIATOR allowed


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyiscsi_failover.testing", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _await_ready(process: subprocess.Popen[str], *names: str) -> Served:
    """Wait (bounded, no sleep) for ``ready``; read the portal lines printed before it."""
    assert process.stdout is not None and process.stderr is not None
    readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT)
    line = process.stdout.readline() if readable else ""
    if line != "ready\n":
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"test target not ready (got {line!r}): {err}")
    portals, announced = {}, {}
    for name in names:
        kind, got_name, address, *_faults = process.stderr.readline().split()
        assert (kind, got_name) == ("portal", name)
        announced[name] = address
        portals[name] = address.rpartition(",")[0]
    return Served(process, portals, announced)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    chap_file = tmp_path_factory.mktemp("cli-target") / "chap"
    chap_file.write_text(f"chap {USER}:{SECRET}\nmutual-chap {TARGET_USER}:{TARGET_SECRET}\n")
    processes = [
        _spawn(
            *("--portal", "ok=127.0.0.1:0", "--portal", "refused=127.0.0.1:0"),
            *("--portal", "blackhole=127.0.0.1:0", "--portal", "redirect=127.0.0.1:0"),
            *("--target", OPEN_IQN, "--target", OTHER_IQN),
            *("--fault", "refused=refuse", "--fault", "blackhole=blackhole"),
            *("--fault", "redirect=redirect-permanent:ok"),
        ),
        _spawn(
            *("--portal", "chap=127.0.0.1:0", "--target", CHAP_IQN),
            *("--chap-file", str(chap_file), "--allow-initiator", INITIATOR),
        ),
    ]
    try:
        # Both start at once; each is awaited on its own ready line.
        open_ = _await_ready(processes[0], "ok", "refused", "blackhole", "redirect")
        chap = _await_ready(processes[1], "chap")
        yield Targets(open=open_, chap=chap)
    finally:
        for process in processes:
            _stop(process)
    assert [p.returncode for p in processes] == [0, 0]  # SIGTERM is a clean stop


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "chap-secret"
    path.write_text(SECRET + "\n")  # a trailing newline, as an editor leaves it
    return path


@pytest.fixture
def target_secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "target-chap-secret"
    path.write_text(TARGET_SECRET)
    return path


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path


def chap_info(targets: Targets, *, portals: list[str] | None = None, **extra: object) -> object:
    """A whole Cinder connection_info for the CHAP target, refused portal first by default."""
    portals = portals or [targets.open.portals["refused"], targets.chap.portals["chap"]]
    data: dict[str, object] = {
        "target_portal": portals[0],
        "target_iqn": CHAP_IQN,
        "target_lun": 3,
        "target_alternative_portals": portals[1:],
        "target_alternative_iqns": [CHAP_IQN] * (len(portals) - 1),
        "target_alternative_luns": [3] * (len(portals) - 1),
        "auth_method": "CHAP",
        "auth_username": USER,
        "auth_password": SECRET,
        **extra,
    }
    return {"driver_volume_type": "iscsi", "data": data}


# --------------------------------------------------------------------------------------------
# --help, --version, parsing


def test_help_goes_to_the_given_stdout() -> None:
    ran = cli_run("--help")
    assert ran.code == 0
    assert ran.err == ""
    assert ran.out.startswith("usage: pyiscsi-failover")
    for command in ("discover", "login", "probe", "attach", "detach", "demo"):
        assert command in ran.out


@pytest.mark.parametrize("command", ["discover", "login", "probe", "attach", "detach", "demo"])
def test_subcommand_help(command: str) -> None:
    ran = cli_run(command, "--help")
    assert ran.code == 0
    assert ran.out.startswith(f"usage: pyiscsi-failover {command}")
    assert ran.err == ""


def test_version() -> None:
    ran = cli_run("--version")
    assert (ran.code, ran.out, ran.err) == (0, f"pyiscsi-failover {__version__}\n", "")


def test_help_from_many_threads_at_once_leaves_sys_stdout_alone() -> None:
    # run() is called from worker threads by embedding programs (and tests): help output must
    # go to each call's own stdout, and sys.stdout must never be swapped under other threads.
    real = sys.stdout
    outs = [io.StringIO() for _ in range(16)]
    barrier = threading.Barrier(len(outs))

    def one(out: io.StringIO) -> None:
        barrier.wait()
        assert cli.run(["--version"] if outs.index(out) % 2 else ["--help"], stdout=out) == 0

    threads = [threading.Thread(target=one, args=(out,)) for out in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sys.stdout is real
    for index, out in enumerate(outs):
        text = out.getvalue()
        if index % 2:
            assert text == f"pyiscsi-failover {__version__}\n"
        else:
            assert text.startswith("usage: pyiscsi-failover")
            assert text.count("usage:") == 1


def test_timeout_is_an_alias_of_login_timeout_and_verbose_works_after_the_command() -> None:
    args = cli.build_parser().parse_args(["login", "h", OPEN_IQN, "--timeout", "7", "-vv"])
    assert args.login_timeout == 7.0
    assert args.verbose == 2
    defaults = cli.build_parser().parse_args(["probe", "--portal", "h", "--iqn", OPEN_IQN])
    assert (defaults.connect_timeout, defaults.login_timeout, defaults.verbose) == (3.0, 10.0, 0)
    assert (defaults.policy, defaults.check, defaults.stagger) == ("ordered", "login", 0.25)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "required: command"),
        (["frobnicate"], "invalid choice"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--policy", "bogus"], "--policy"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--check", "ping"], "--check"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--connect-timeout", "0"], "positive"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--login-timeout", "nan"], "positive"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--timeout", "inf"], "positive"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--stagger", "-1"], ">= 0"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--concurrency", "0"], "at least 1"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--lun", "16384"], "16383"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--lun", "x"], "--lun"),
        (["probe", "--portal", "h", "--iqn", OPEN_IQN, "--frobnicate"], "--frobnicate"),
        (["login", "127.0.0.1"], "required"),
        (["attach", "--dry-run"], "--connection-info"),
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], fragment: str) -> None:
    assert_fails(cli_run(*argv), 2, fragment)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        # Refused outright, with a pointer to the right way.
        (["--chap-secret", SECRET], "use --chap-secret-file or $PYISCSI_CHAP_SECRET"),
        (["--target-chap-secret", SECRET], "--target-chap-secret-file"),
        (["--chap-secret=" + SECRET], "visible to every local user"),
        # No abbreviations: this must not be read as --chap-secret-file (and echoed back).
        (["--chap-secret-fi", SECRET], "unrecognized option(s) --chap-secret-fi"),
        (["--password", SECRET], "1 unexpected argument(s), not shown"),
        (["--password=" + SECRET], "unrecognized option(s) --password"),
        ([SECRET], "not shown"),
    ],
)
def test_a_secret_on_argv_is_refused_and_not_echoed(argv: list[str], fragment: str) -> None:
    base = ["login", "127.0.0.1", OPEN_IQN, "--chap-user", USER]
    ran = cli_run(*base, *argv)
    assert_fails(ran, 2, fragment)
    assert_no_secret(ran.out, ran.err)


# --------------------------------------------------------------------------------------------
# discover


def test_discover_lists_every_target_with_its_portals(targets: Targets) -> None:
    served = targets.open
    ran = cli_run("discover", served.portals["ok"], *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.err == ""
    lines = ran.out.splitlines()
    assert lines[0].startswith(f"2 target(s) at {served.portals['ok']} (")
    every_portal = sorted(f"    {address}" for address in served.announced.values())
    for iqn in (OPEN_IQN, OTHER_IQN):
        start = lines.index(iqn)
        assert sorted(lines[start + 1 : start + 1 + len(every_portal)]) == every_portal


def test_discover_json(targets: Targets) -> None:
    served = targets.open
    ran = cli_run("discover", served.portals["ok"], "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["outcome"] == "ok"
    assert body["portal"] == body["final_portal"] == served.portals["ok"]
    assert body["redirects"] == []
    assert body["logged_out"] is True
    assert body["auth_method"] == "None"
    assert body["tsih"] > 0
    assert body["target_portal_group_tag"] == 1
    assert all(body[k] >= 0 for k in ("connect_ms", "login_ms", "elapsed_ms"))
    assert sorted(t["iqn"] for t in body["targets"]) == sorted([OPEN_IQN, OTHER_IQN])
    for target in body["targets"]:
        assert sorted(target["portals"]) == sorted(served.announced.values())


def test_discover_with_connection_info_uses_its_main_portal_and_discovery_chap(
    targets: Targets, tmp_path: Path
) -> None:
    document = chap_info(
        targets,
        portals=[targets.chap.portals["chap"], targets.open.portals["refused"]],
        discovery_auth_method="CHAP",
        discovery_auth_username=USER,
        discovery_auth_password=SECRET,
    )
    path = write_json(tmp_path / "ci.json", document)
    ran = cli_run("discover", "-c", str(path), "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["portal"] == targets.chap.portals["chap"]
    assert body["auth_method"] == "CHAP"
    assert [t["iqn"] for t in body["targets"]] == [CHAP_IQN]
    assert_no_secret(ran.out, ran.err)


def test_discover_with_connection_info_without_discovery_chap_is_refused(
    targets: Targets, tmp_path: Path
) -> None:
    path = write_json(
        tmp_path / "ci.json", chap_info(targets, portals=[targets.chap.portals["chap"]])
    )
    ran = cli_run("discover", "-c", str(path), *NAME, *FAST)
    assert_fails(ran, 1, targets.chap.portals["chap"], "login refused", "answered SendTargets")


@pytest.mark.parametrize("policy", ["sequential", "ordered", "staggered"])
def test_discover_with_connection_info_fails_over_to_the_next_portal_in_order(
    targets: Targets, tmp_path: Path, policy: str
) -> None:
    dead = [targets.open.portals["refused"], targets.open.portals["blackhole"]]
    document = chap_info(
        targets,
        portals=[*dead, targets.chap.portals["chap"], targets.open.portals["ok"]],
        discovery_auth_method="CHAP",
        discovery_auth_username=USER,
        discovery_auth_password=SECRET,
    )
    path = write_json(tmp_path / "ci.json", document)
    argv = ["discover", "-c", str(path), "--policy", policy, "--stagger", "0.1"]
    ran = cli_run(*argv, "--json", *NAME, "--connect-timeout", "1", "--login-timeout", "5")
    assert ran.code == 0, ran
    body = ran.json()
    # The main portal and the first alternative are dead; the next one answers, not the last.
    assert body["answered"] == targets.chap.portals["chap"]
    assert [t["iqn"] for t in body["targets"]] == [CHAP_IQN]
    outcomes = [a["outcome"] for a in body["attempts"]]
    # Ordered waits out the blackholed portal before it may choose a later one; staggered
    # takes the first to answer and cancels it.
    silent = "cancelled" if policy == "staggered" else "timeout"
    assert outcomes[:3] == ["refused", silent, "ok"], outcomes
    text = cli_run(*argv, *NAME, "--connect-timeout", "1")
    assert f"at {targets.chap.portals['chap']}, which answered (#2 of 4" in text.out, text
    assert_no_secret(ran.out, ran.err, text.out, text.err)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["discover"], "give a portal"),
        (["discover", "127.0.0.1", "-c", "x.json"], "not both"),
        (["discover", "127.0.0.1:99999"], "port"),
        (["discover", "127.0.0.1", "--initiator-name", "bogus"], "--initiator-name"),
    ],
)
def test_discover_usage_errors(argv: list[str], fragment: str) -> None:
    assert_fails(cli_run(*argv), 2, fragment)


# --------------------------------------------------------------------------------------------
# login


def test_login_reports_outcome_parameters_and_timings(targets: Targets) -> None:
    portal = targets.open.portals["ok"]
    ran = cli_run("login", portal, OPEN_IQN, *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.err == ""
    lines = ran.out.splitlines()
    assert lines[0].startswith(f"login ok: {OPEN_IQN} at {portal} (TSIH ")
    assert lines[0].endswith("AuthMethod None); logged out")
    assert lines[1].startswith("timings: connect ")
    assert lines[2] == "negotiated:"
    assert "    header_digest = None" in lines
    assert "    target_portal_group_tag = 1" in lines


def test_login_json(targets: Targets) -> None:
    portal = targets.open.portals["ok"]
    ran = cli_run("login", portal, OTHER_IQN, "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["outcome"] == "ok"
    assert body["portal"] == body["final_portal"] == portal
    assert body["logged_out"] is True
    assert body["notes"] == []
    assert body["tsih"] > 0
    negotiated = body["negotiated"]
    assert negotiated["header_digest"] == "None"
    assert negotiated["target_max_recv_data_segment_length"] == 8192  # the target's default
    assert negotiated["target_portal_group_tag"] == 1


def test_login_follows_a_permanent_redirect(targets: Targets) -> None:
    served = targets.open
    ran = cli_run("login", served.portals["redirect"], OPEN_IQN, "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["final_portal"] == served.portals["ok"]
    assert body["redirects"] == [
        {"from": served.portals["redirect"], "to": served.portals["ok"], "permanent": True}
    ]
    text = cli_run("login", served.portals["redirect"], OPEN_IQN, *NAME, *FAST)
    assert text.out.splitlines()[0] == (
        f"redirected permanently: {served.portals['redirect']} -> {served.portals['ok']}"
    )


def test_login_with_mutual_chap_secret_from_env_and_file(
    targets: Targets, target_secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.SECRET_ENV, SECRET)
    argv = ["login", targets.chap.portals["chap"], CHAP_IQN, "--json", "--chap-user", USER]
    argv += [
        "--target-chap-user",
        TARGET_USER,
        "--target-chap-secret-file",
        str(target_secret_file),
    ]
    ran = cli_run(*argv, *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.json()["auth_method"] == "CHAP"
    assert_no_secret(ran.out, ran.err)


def test_login_with_a_wrong_chap_secret_exits_1(
    targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.SECRET_ENV, WRONG_SECRET)
    portal = targets.chap.portals["chap"]
    ran = cli_run("login", portal, CHAP_IQN, "--chap-user", USER, *NAME, *FAST)
    assert_fails(ran, 1, f"{portal}: login refused: authentication failure (0x0201)")
    assert ran.out == ""
    assert_no_secret(ran.err)


def test_login_rejected_json_still_describes_the_refusal(targets: Targets) -> None:
    portal = targets.open.portals["ok"]
    ran = cli_run("login", portal, "iqn.2024-01.com.example:nope", "--json", *NAME, *FAST)
    assert_fails(ran, 1, "target not found")
    body = ran.json()
    assert (body["outcome"], body["status"], body["retryable"]) == ("rejected", "0x0203", False)


@pytest.mark.parametrize(
    ("where", "argv", "fragment"),
    [
        ("refused", [], "connection refused"),
        ("blackhole", ["--connect-timeout", "0.2"], "no TCP connection within 0.2 s"),
        ("unreachable", [], "unreachable"),
        ("ok", [], "target not found (0x0203)"),
    ],
)
def test_login_failures_exit_1(
    targets: Targets, where: str, argv: list[str], fragment: str
) -> None:
    portal = UNREACHABLE if where == "unreachable" else targets.open.portals[where]
    iqn = "iqn.2024-01.com.example:unknown" if where == "ok" else OPEN_IQN
    ran = cli_run("login", portal, iqn, *NAME, *FAST, *argv)
    assert_fails(ran, 1, portal, fragment)


def test_login_as_an_initiator_the_acl_does_not_allow_exits_1(
    targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.SECRET_ENV, SECRET)
    stranger = ("--initiator-name", "iqn.2024-01.com.example:stranger")
    ran = cli_run("login", targets.chap.portals["chap"], CHAP_IQN, "--chap-user", USER, *stranger)
    assert_fails(ran, 1, "authorization failure")


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line, no traceback


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    unreadable = tmp_path / "a-directory"
    unreadable.mkdir()
    return {"empty": empty, "dir": unreadable, "missing": tmp_path / "missing"}


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["login", "127.0.0.1:99999", OPEN_IQN], "port '99999'"),
        (["login", "not a portal", OPEN_IQN], "portal: invalid portal 'not a portal'"),
        (["login", "[::1", OPEN_IQN], "portal:"),
        (["login", "127.0.0.1", "iqn.bad"], "iqn: invalid iSCSI name"),
        (["login", "127.0.0.1", OPEN_IQN, "--chap-user", USER], "--chap-user needs"),
        (["login", "127.0.0.1", OPEN_IQN, "--chap-secret-file", "{empty}"], "needs --chap-user"),
        (
            [
                "login",
                "127.0.0.1",
                OPEN_IQN,
                "--chap-user",
                USER,
                "--chap-secret-file",
                "{missing}",
            ],
            "cannot read CHAP secret file",
        ),
        (
            ["login", "127.0.0.1", OPEN_IQN, "--chap-user", USER, "--chap-secret-file", "{dir}"],
            "Is a directory",
        ),
        (
            ["login", "127.0.0.1", OPEN_IQN, "--chap-user", USER, "--chap-secret-file", "{empty}"],
            "is empty",
        ),
        (["login", "127.0.0.1", OPEN_IQN, "--target-chap-user", "t"], "needs --chap-user too"),
        (
            ["login", "127.0.0.1", OPEN_IQN, "--target-chap-secret-file", "{empty}"],
            "needs --target-chap-user",
        ),
        (["probe", "--portal", "bad portal", "--iqn", OPEN_IQN], "--portal: invalid portal"),
        (["probe", "--portal", "127.0.0.1", "--iqn", "iqn.nope"], "--iqn: invalid iSCSI name"),
        (["probe", "--portal", "127.0.0.1"], "at least one --portal and one --iqn"),
        (["probe", "--iqn", OPEN_IQN], "at least one --portal and one --iqn"),
        (
            [
                *("probe", "--portal", "127.0.0.1", "--portal", "127.0.0.2", "--iqn", OPEN_IQN),
                "--lun",
                "1",
                "--lun",
                "2",
                "--lun",
                "3",
            ],
            "--lun must be given once or once per --portal (2)",
        ),
        (["probe", "-c", "{missing}"], "cannot read connection_info"),
        (["probe", "-c", "{dir}"], "cannot read connection_info"),
        (["probe", "-c", "{empty}", "--portal", "127.0.0.1"], "not both"),
        (["probe", "-c", "{empty}", "--iqn", OPEN_IQN], "not both"),
        (["probe", "-c", "{empty}"], "is empty (white space only)"),
        (["attach", "-c", "{missing}", "--dry-run"], "cannot read connection_info"),
        (["detach", "-c", "{missing}"], "cannot read connection_info"),
    ],
)
def test_bad_input_exits_2(argv: list[str], fragment: str, bad_inputs: dict[str, Path]) -> None:
    filled = [a.format(**{k: str(v) for k, v in bad_inputs.items()}) for a in argv]
    assert_fails(cli_run(*filled, *NAME), 2, fragment)


def test_the_whole_bad_connection_info_corpus_exits_2(tmp_path: Path) -> None:
    files = sorted(p.name for p in BAD_DIR.glob("*.json") if p.name != "expected.json")
    assert files == sorted(BAD_EXPECTED)  # every file is covered, and only those
    # The corpus's own passwords must not be echoed back either.
    corpus_secrets = {"S3cr3t-Corpus-Pa55", "Anoth3r-Corpus-Pa55"}
    for name in files:
        path = BAD_DIR / name
        key = BAD_EXPECTED[name]
        for argv in (
            ["probe", "-c", str(path)],
            ["attach", "-c", str(path), "--dry-run"],
            ["detach", "-c", str(path), "--iscsiadm", str(tmp_path / "never-run")],
            ["discover", "-c", str(path)],
        ):
            ran = cli_run(*argv, *NAME)
            line = assert_fails(ran, 2, key)
            assert ran.out == "", (name, argv)
            assert not any(s in line for s in corpus_secrets), line
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a text stdin cannot carry it; covered by the file path above
        # The same answer through "-c -".
        assert_fails(cli_run("probe", "-c", "-", *NAME, stdin=text), 2, key)


def test_non_utf8_connection_info_file_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"target_portal": "h\xe9"}')
    assert_fails(cli_run("probe", "-c", str(path)), 2, "UTF-8", "offset 20")


def test_unreadable_stdin_exits_2() -> None:
    class BadStdin(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    err = io.StringIO()
    code = cli.run(["probe", "-c", "-"], stdout=io.StringIO(), stderr=err, stdin=BadStdin())
    assert code == 2
    assert err.getvalue() == (
        "pyiscsi-failover: connection_info on stdin is not UTF-8 text (bad byte at offset 0)\n"
    )


# --------------------------------------------------------------------------------------------
# probe


@pytest.mark.parametrize("policy", ["ordered", "staggered", "sequential"])
def test_probe_json_chooses_the_first_working_candidate(targets: Targets, policy: str) -> None:
    served = targets.open
    portals = [served.portals["refused"], served.portals["ok"]]
    argv = ["probe", "--portal", portals[0], "--portal", portals[1], "--iqn", OPEN_IQN]
    ran = cli_run(*argv, "--lun", "7", "--policy", policy, "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.err == ""
    body = ran.json()
    assert set(body) >= {"chosen", "policy", "elapsed_ms", "attempts"}
    assert body["chosen"] == {"portal": served.portals["ok"], "iqn": OPEN_IQN, "lun": 7}
    assert body["policy"] == policy
    assert body["check"] == "login"
    assert body["elapsed_ms"] >= 0
    for index, attempt in enumerate(body["attempts"]):
        assert set(attempt) == ATTEMPT_KEYS
        assert attempt["outcome"] in OUTCOMES
        assert (attempt["index"], attempt["portal"]) == (index, portals[index])
        assert (attempt["iqn"], attempt["lun"]) == (OPEN_IQN, 7)
        assert attempt["redirected_to"] is None
    assert [a["outcome"] for a in body["attempts"]] == ["refused", "ok"]
    assert body["attempts"][0]["detail"] == f"{portals[0]}: connection refused"
    assert body["attempts"][1]["detail"] == "login and logout succeeded"


def test_probe_all_reports_every_candidate(targets: Targets) -> None:
    served = targets.open
    order = ["refused", "ok", "blackhole", "redirect"]
    argv = ["probe", "--all", "--json", "--iqn", OPEN_IQN, "--connect-timeout", "0.3"]
    for name in order:
        argv += ["--portal", served.portals[name]]
    ran = cli_run(*argv, *NAME)
    assert ran.code == 0, ran
    body = ran.json()
    assert [a["portal"] for a in body["attempts"]] == [served.portals[n] for n in order]
    assert [a["outcome"] for a in body["attempts"]] == ["refused", "ok", "timeout", "ok"]
    assert body["attempts"][3]["redirected_to"] == served.portals["ok"]
    assert body["chosen"]["portal"] == served.portals["ok"]


def test_probe_without_all_stops_after_the_winner(targets: Targets) -> None:
    served = targets.open
    argv = ["probe", "--json", "--iqn", OPEN_IQN, "--policy", "sequential"]
    argv += ["--portal", served.portals["ok"], "--portal", served.portals["blackhole"]]
    body = cli_run(*argv, *NAME, *FAST).json()
    assert [a["outcome"] for a in body["attempts"]] == ["ok", "not_tried"]


def test_probe_permanent_redirect_hands_off_the_new_address(targets: Targets) -> None:
    served = targets.open
    argv = ["probe", "--json", "--iqn", OPEN_IQN, "--portal", served.portals["redirect"]]
    body = cli_run(*argv, *NAME, *FAST).json()
    assert body["chosen"]["portal"] == served.portals["ok"]
    assert body["attempts"][0]["redirected_to"] == served.portals["ok"]


def test_probe_tcp_check(targets: Targets) -> None:
    served = targets.open
    argv = ["probe", "--check", "tcp", "--json", "--iqn", "iqn.2024-01.com.example:any"]
    argv += ["--portal", served.portals["refused"], "--portal", served.portals["ok"]]
    body = cli_run(*argv, *NAME, *FAST).json()
    assert body["check"] == "tcp"
    assert [a["outcome"] for a in body["attempts"]] == ["refused", "ok"]


def test_probe_reads_connection_info_from_stdin(targets: Targets) -> None:
    document = json.dumps(chap_info(targets))
    ran = cli_run("probe", "-c", "-", "--json", *NAME, *FAST, stdin=document)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["chosen"] == {"portal": targets.chap.portals["chap"], "iqn": CHAP_IQN, "lun": 3}
    assert [a["outcome"] for a in body["attempts"]] == ["refused", "ok"]
    assert_no_secret(ran.out, ran.err)


def test_probe_command_line_credentials_replace_the_files(
    targets: Targets, tmp_path: Path, secret_file: Path
) -> None:
    # The file carries a wrong password; --chap-user/--chap-secret-file win.
    document = chap_info(targets, auth_password=WRONG_SECRET)
    path = write_json(tmp_path / "ci.json", document)
    ran = cli_run("probe", "-c", str(path), "--json", *NAME, *FAST)
    assert_fails(ran, 1, "none of the 2 candidates works", "#1", "auth_failed")
    assert [a["outcome"] for a in ran.json()["attempts"]] == ["refused", "auth_failed"]
    fixed = ["--chap-user", USER, "--chap-secret-file", str(secret_file)]
    ran = cli_run("probe", "-c", str(path), "--json", *fixed, *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.json()["chosen"]["portal"] == targets.chap.portals["chap"]
    assert_no_secret(ran.out, ran.err)


@pytest.mark.parametrize(
    ("argv", "outcome"),
    [
        (["--portal", UNREACHABLE, "--iqn", OPEN_IQN], "unreachable"),
        (["--portal", "{refused}", "--iqn", OPEN_IQN], "refused"),
        (["--portal", "{blackhole}", "--iqn", OPEN_IQN, "--connect-timeout", "0.2"], "timeout"),
        (["--portal", "{ok}", "--iqn", "iqn.2024-01.com.example:unknown"], "not_found"),
        (["--portal", "{chap}", "--iqn", CHAP_IQN], "auth_failed"),  # no credentials given
        (
            [
                "--portal",
                "{chap}",
                "--iqn",
                CHAP_IQN,
                "--chap-user",
                USER,
                "--initiator-name",
                "iqn.2024-01.com.example:stranger",
            ],
            "authorization_failed",
        ),
    ],
)
def test_probe_none_works_exits_1_with_json_and_one_line(
    targets: Targets, argv: list[str], outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "--chap-user" in argv:  # the secret set without --chap-user would be a usage error
        monkeypatch.setenv(cli.SECRET_ENV, SECRET)
    names = {**targets.open.portals, **targets.chap.portals}
    filled = [a.format(**names) for a in argv]
    if "--initiator-name" not in filled:
        filled += NAME
    ran = cli_run("probe", "--json", *FAST, *filled)
    line = assert_fails(ran, 1, "the only candidate does not work: #0")
    body = ran.json()
    assert body["chosen"] is None
    assert [a["outcome"] for a in body["attempts"]] == [outcome]
    assert body["attempts"][0]["detail"].split(": ")[-1] in line


def test_probe_on_a_terminal_shows_live_progress_then_a_table(targets: Targets) -> None:
    served = targets.open
    argv = ["probe", "--iqn", OPEN_IQN, "--portal", served.portals["refused"]]
    argv += ["--portal", served.portals["ok"], "--policy", "sequential"]
    ran = cli_run(*argv, *NAME, *FAST, tty=True)
    assert ran.code == 0, ran
    lines = ran.out.splitlines()
    assert lines[0] == "probing 2 candidate(s), policy sequential, check login"
    progress = lines[1:5]
    assert progress[0].endswith(f"#0 {served.portals['refused']} {OPEN_IQN}: probing...")
    assert progress[1].endswith(f"#0 {served.portals['refused']}: refused connection refused")
    assert progress[2].endswith(f"#1 {served.portals['ok']} {OPEN_IQN}: probing...")
    assert progress[3].endswith(f"#1 {served.portals['ok']}: ok login and logout succeeded")
    assert all(line.startswith("  [") for line in progress)
    table = lines[5:]
    assert table[0].split() == ["#", "portal", "iqn", "lun", "outcome", "ms", "detail"]
    assert table[1].split()[:5] == ["0", served.portals["refused"], OPEN_IQN, "0", "refused"]
    assert table[2].split()[:5] == ["*1", served.portals["ok"], OPEN_IQN, "0", "ok"]
    assert table[3].startswith(f"chosen: #1 {served.portals['ok']} {OPEN_IQN} lun 0 (sequential")


def test_probe_piped_prints_only_the_table(targets: Targets) -> None:
    served = targets.open
    ran = cli_run("probe", "--iqn", OPEN_IQN, "--portal", served.portals["ok"], *NAME, *FAST)
    assert ran.code == 0
    lines = ran.out.splitlines()
    assert lines[0].split()[0] == "#"
    assert len(lines) == 3
    assert "probing" not in ran.out


def test_probe_json_on_a_terminal_is_still_only_json(targets: Targets) -> None:
    served = targets.open
    argv = ["probe", "--iqn", OPEN_IQN, "--portal", served.portals["ok"], "--json"]
    ran = cli_run(*argv, *NAME, *FAST, tty=True)
    assert ran.json()["chosen"]["portal"] == served.portals["ok"]


# --------------------------------------------------------------------------------------------
# attach and detach, with the fake iscsiadm


@dataclasses.dataclass(frozen=True)
class FakeIscsiadm:
    binary: Path
    log: Path
    state: Path
    dev_root: Path

    def ops(self) -> list[str]:
        if not self.log.exists():
            return []
        return [json.loads(line)["op"] for line in self.log.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]

    def saved(self) -> Any:
        return json.loads((self.state / "state.json").read_text())

    def preload(self, *, records: list[str], sessions: list[str]) -> None:
        (self.state / "state.json").write_text(
            json.dumps({"records": records, "sessions": sessions})
        )


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeIscsiadm:
    # A wrapper runs the fake with this interpreter, whatever python3 is on PATH.
    binary = tmp_path / "bin" / "iscsiadm"
    binary.parent.mkdir()
    binary.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_ISCSIADM))} "$@"\n'
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    fake = FakeIscsiadm(binary, tmp_path / "calls.jsonl", tmp_path / "state", tmp_path / "by-path")
    fake.state.mkdir()
    fake.dev_root.mkdir()
    monkeypatch.setenv("FAKE_ISCSIADM_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_ISCSIADM_STATE", str(fake.state))
    # A test that forgets --state-file must not touch the machine's real ledger.
    monkeypatch.setattr(cli, "_STATE_FILE", tmp_path / "default-state" / "created-records.json")
    return fake


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "lib" / "created-records.json"


def test_attach_dry_run_prints_masked_commands_and_runs_none(
    targets: Targets, tmp_path: Path, fake: FakeIscsiadm, state_file: Path
) -> None:
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    chap = targets.chap.portals["chap"]
    base = ["attach", "-c", str(path), "--dry-run", "--iscsiadm", str(fake.binary), *NAME, *FAST]
    base += ["--state-file", str(state_file)]
    ran = cli_run(*base)
    assert ran.code == 0, ran
    lines = ran.out.splitlines()
    plan = lines[lines.index("would run:") + 1 :]
    node = f"iscsiadm -m node -T {CHAP_IQN} -p {chap}"
    # What the probe proved is handed on: the digests it negotiated and our CHAP_A offer.
    assert plan == [
        f"    {node} -o new",
        f"    {node} -o update -n node.startup -v manual",
        f"    {node} -o update -n node.session.scan -v manual",
        f"    {node} -o update -n 'node.conn[0].iscsi.HeaderDigest' -v None",
        f"    {node} -o update -n 'node.conn[0].iscsi.DataDigest' -v None",
        f"    {node} -o update -n node.session.auth.authmethod -v CHAP",
        f"    {node} -o update -n node.session.auth.chap_algs -v MD5,SHA1,SHA256,SHA3-256",
        f"    {node} -o update -n node.session.auth.username -v {USER}",
        f"    {node} -o update -n node.session.auth.password -v ***",
        f"    {node} --login",
    ]
    preferred = cli_run(*base, "--chap-algorithms", "SHA256,MD5").out.splitlines()
    assert f"    {node} -o update -n node.session.auth.chap_algs -v SHA256,MD5" in preferred
    # A TCP-only check proves no digests: the record keeps its own.
    tcp = cli_run(*base, "--check", "tcp").out
    assert "HeaderDigest" not in tcp and "chap_algs -v MD5,SHA1,SHA256,SHA3-256" in tcp
    as_json = cli_run(*base, "--json")
    assert as_json.code == 0, as_json
    body = as_json.json()
    assert body["probe"]["chosen"] == {"portal": chap, "iqn": CHAP_IQN, "lun": 3}
    assert body["dry_run"] == [line.strip() for line in plan]
    assert fake.ops() == []  # nothing was run
    assert not state_file.parent.exists()  # and the ledger was not written (nor its directory)
    assert_no_secret(ran.out, ran.err, as_json.out, as_json.err)


def test_attach_runs_iscsiadm_and_finds_the_disk(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> None:
    chap = targets.chap.portals["chap"]
    device = fake.dev_root / f"ip-{chap}-iscsi-{CHAP_IQN}-lun-3"
    monkeypatch.setenv("FAKE_ISCSIADM_DEVICE", str(device))
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = ["attach", "-c", str(path), "--iscsiadm", str(fake.binary), "--json"]
    argv += ["--state-file", str(state_file)]
    ran = cli_run(*argv, "--dev-root", str(fake.dev_root), "--device-timeout", "5", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["probe"]["chosen"]["portal"] == chap
    attached = body["attach"]
    assert attached["device"] == str(device)
    assert (attached["created_record"], attached["session_existed"]) == (True, False)
    assert f"iscsiadm -m node -T {CHAP_IQN} -p {chap} --login" in attached["commands"]
    # The record is set up, its login bounded to one try of the probe's budget, then its own
    # login settings put back.
    bounds = ["show", "update", "update"]
    assert fake.ops() == ["show", "new", *["update"] * 8, *bounds, "login", "update", "update"]
    bound = [argv[-4:] for argv in fake.argvs()[11:13]]
    assert bound == [
        ["-n", "node.conn[0].timeo.login_timeout", "-v", "7"],  # 2 s + 5 s (FAST)
        ["-n", "node.session.initial_login_retry_max", "-v", "1"],
    ]
    restored = [argv[-4:] for argv in fake.argvs()[14:16]]
    assert restored == [
        ["-n", "node.conn[0].timeo.login_timeout", "-v", "15"],
        ["-n", "node.session.initial_login_retry_max", "-v", "8"],
    ]
    assert [h["outcome"] for h in body["handoffs"]] == ["attached"]
    # iscsiadm got the real secret (the fake logs only its hash); we printed none.
    digest = "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
    assert fake.argvs()[9][-1] == digest
    assert fake.saved()["sessions"] == [f"{CHAP_IQN} {chap}"]
    # The record we made is noted, with no secret and no CHAP name; the file is ours alone.
    ledger = json.loads(state_file.read_text())
    assert ledger == {"version": 1, "records": [{"iqn": CHAP_IQN, "portal": chap}]}
    assert USER not in state_file.read_text()
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_file.parent.stat().st_mode) == 0o700
    assert_no_secret(ran.out, ran.err, json.dumps(body), state_file.read_text())


def test_attach_waits_for_the_by_path_name_of_the_addressing_mode(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> None:
    """connection_info's addressing_mode reaches the hand-off: tgt's LUN 256 with SAM2."""
    chap = targets.chap.portals["chap"]
    device = fake.dev_root / f"ip-{chap}-iscsi-{CHAP_IQN}-lun-0x4100000000000000"
    monkeypatch.setenv("FAKE_ISCSIADM_DEVICE", str(device))
    info = chap_info(targets, target_lun=256, target_alternative_luns=[256], addressing_mode="SAM2")
    path = write_json(tmp_path / "ci.json", info)
    argv = ["attach", "-c", str(path), "--iscsiadm", str(fake.binary), "--json"]
    argv += ["--state-file", str(state_file), "--dev-root", str(fake.dev_root)]
    ran = cli_run(*argv, "--device-timeout", "5", *NAME, *FAST)
    assert ran.code == 0, ran
    assert ran.json()["attach"]["device"] == str(device)


def test_attach_failure_exits_1_masked_and_undoes_the_record(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> None:
    monkeypatch.setenv("FAKE_ISCSIADM_EXIT", json.dumps({"login": 24}))
    monkeypatch.setenv("FAKE_ISCSIADM_ECHO", "1")  # the fake echoes its argv, secret included
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = ["attach", "-c", str(path), "--iscsiadm", str(fake.binary), *NAME, *FAST]
    ran = cli_run(*argv, "--dev-root", str(fake.dev_root), "--state-file", str(state_file))
    assert_fails(ran, 1, "LOGIN_AUTH_FAILED", "--login")
    assert fake.ops()[-2:] == ["logout", "delete"]  # a record we created is deleted again
    assert fake.saved()["records"] == []
    assert not state_file.exists()  # and never noted
    assert_no_secret(ran.out, ran.err)


def test_attach_with_a_missing_iscsiadm_exits_1(targets: Targets, tmp_path: Path) -> None:
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = ["attach", "-c", str(path), "--iscsiadm", str(tmp_path / "no-such-iscsiadm")]
    assert_fails(cli_run(*argv, *NAME, *FAST), 1, "cannot run", "No such file")


def test_attach_when_no_candidate_works_runs_nothing(
    targets: Targets, tmp_path: Path, fake: FakeIscsiadm
) -> None:
    document = chap_info(targets, portals=[targets.open.portals["refused"]])
    path = write_json(tmp_path / "ci.json", document)
    argv = ["attach", "-c", str(path), "--iscsiadm", str(fake.binary), "--json"]
    ran = cli_run(*argv, *NAME, *FAST)
    assert_fails(ran, 1, "nothing attached")
    assert ran.json()["attach"] is None
    assert fake.ops() == []


@pytest.mark.parametrize("keep", [False, True])
def test_detach_logs_out_of_every_candidate_and_keeps_records_it_did_not_make(
    targets: Targets, tmp_path: Path, fake: FakeIscsiadm, state_file: Path, keep: bool
) -> None:
    refused, chap = targets.open.portals["refused"], targets.chap.portals["chap"]
    key = f"{CHAP_IQN} {chap}"
    fake.preload(records=[key], sessions=[key])  # made by an operator, not by attach
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = ["detach", "-c", str(path), "--iscsiadm", str(fake.binary)]
    argv += ["--state-file", str(state_file), *(["--keep-record"] if keep else [])]
    ran = cli_run(*argv, "--json")
    assert ran.code == 0, ran
    fate = "kept_on_request" if keep else "kept_not_ours"
    assert ran.json() == {
        "detached": [
            # No record and no session at the refused portal: nothing to detach there.
            {"portal": refused, "iqn": CHAP_IQN, "record": "absent"},
            {"portal": chap, "iqn": CHAP_IQN, "record": fate},
        ]
    }
    assert fake.ops() == ["logout", "show", "logout", "show"]
    assert fake.saved() == {"records": [key], "sessions": []}
    assert not state_file.parent.exists()  # detach only reads the ledger here
    text = cli_run(*argv)
    reason = "record kept, as asked" if keep else "record kept: not created by pyiscsi-failover"
    assert text.code == 0, text
    assert text.out.splitlines() == [
        f"{CHAP_IQN} at {refused}: nothing to detach: no node record and no session",
        f"detached {CHAP_IQN} at {chap}: {reason}",
    ]


def _attach_then_detach(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> tuple[Ran, Ran]:
    chap = targets.chap.portals["chap"]
    monkeypatch.setenv(
        "FAKE_ISCSIADM_DEVICE", str(fake.dev_root / f"ip-{chap}-iscsi-{CHAP_IQN}-lun-3")
    )
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    common = ["-c", str(path), "--iscsiadm", str(fake.binary), "--state-file", str(state_file)]
    attached = cli_run("attach", *common, "--dev-root", str(fake.dev_root), *NAME, *FAST)
    assert attached.code == 0, attached
    return attached, cli_run("detach", *common)


def test_attach_then_detach_deletes_the_record_attach_made(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> None:
    refused, chap = targets.open.portals["refused"], targets.chap.portals["chap"]
    attached, detached = _attach_then_detach(targets, tmp_path, fake, monkeypatch, state_file)
    assert attached.out.splitlines()[-1] == (
        f"node record: created (noted in {state_file}; detach deletes it)"
    )
    assert detached.code == 0, detached
    assert detached.out.splitlines() == [
        f"{CHAP_IQN} at {refused}: nothing to detach: no node record and no session",
        f"detached {CHAP_IQN} at {chap}: record deleted",
    ]
    assert fake.ops()[-5:] == ["logout", "show", "logout", "show", "delete"]
    assert fake.saved() == {"records": [], "sessions": []}
    assert json.loads(state_file.read_text()) == {"version": 1, "records": []}


def test_a_record_that_existed_before_attach_survives_detach(
    targets: Targets,
    tmp_path: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    state_file: Path,
) -> None:
    key = f"{CHAP_IQN} {targets.chap.portals['chap']}"
    fake.preload(records=[key], sessions=[])
    attached, detached = _attach_then_detach(targets, tmp_path, fake, monkeypatch, state_file)
    assert attached.out.splitlines()[-1].startswith("node record: already there")
    assert detached.code == 0, detached
    assert detached.out.splitlines()[-1].endswith("record kept: not created by pyiscsi-failover")
    assert fake.ops()[-4:] == ["logout", "show", "logout", "show"]
    assert fake.saved() == {"records": [key], "sessions": []}
    assert not state_file.exists()


@pytest.mark.parametrize("command", ["attach", "detach"])
def test_a_corrupt_ledger_exits_1_with_one_line_and_runs_nothing(
    targets: Targets, tmp_path: Path, fake: FakeIscsiadm, state_file: Path, command: str
) -> None:
    key = f"{CHAP_IQN} {targets.chap.portals['chap']}"
    fake.preload(records=[key], sessions=[key])
    state_file.parent.mkdir()
    state_file.write_text('{"version": 1, "records": [')
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = [command, "-c", str(path), "--iscsiadm", str(fake.binary), "--state-file"]
    extra = [*NAME, *FAST] if command == "attach" else []
    ran = cli_run(*argv, str(state_file), *extra)
    assert_fails(ran, 1, f"node-record ledger {str(state_file)!r}: it is not JSON", "repair it")
    assert fake.ops() == []
    assert fake.saved() == {"records": [key], "sessions": [key]}
    assert state_file.read_text() == '{"version": 1, "records": ['


def test_state_file_is_an_option_of_attach_and_detach_only() -> None:
    for command in ("attach", "detach"):
        ran = cli_run(command, "--help")
        assert "--state-file PATH" in ran.out
        # argparse wraps the help text, at blanks and after hyphens.
        assert "(default/var/lib/pyiscsi-failover/created-records.json)" in "".join(ran.out.split())
    assert_fails(cli_run("probe", "--portal", "h", "--iqn", OPEN_IQN, "--state-file", "x"), 2)


# --------------------------------------------------------------------------------------------
# Secrets never show, whatever the command, verbosity or output format


def test_no_secret_in_any_output_or_log_record(
    targets: Targets,
    tmp_path: Path,
    secret_file: Path,
    target_secret_file: Path,
    fake: FakeIscsiadm,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chap = targets.chap.portals["chap"]
    monkeypatch.setenv("FAKE_ISCSIADM_DEVICE", str(fake.dev_root / "any"))
    monkeypatch.setenv("FAKE_ISCSIADM_ECHO", "1")
    ci = write_json(
        tmp_path / "ci.json",
        chap_info(
            targets,
            discovery_auth_method="CHAP",
            discovery_auth_username=USER,
            discovery_auth_password=SECRET,
        ),
    )
    wrong = write_json(tmp_path / "wrong.json", chap_info(targets, auth_password=WRONG_SECRET))
    # A bad file that holds a secret: its error must name the key, not the value.
    broken = write_json(
        tmp_path / "broken.json",
        {
            "target_portal": chap,
            "target_iqn": CHAP_IQN,
            "auth_method": "CHAP",
            "auth_password": SECRET,
        },
    )
    from_file = ["--chap-user", USER, "--chap-secret-file", str(secret_file)]
    mutual = [
        "--target-chap-user",
        TARGET_USER,
        "--target-chap-secret-file",
        str(target_secret_file),
    ]
    runs: list[tuple[list[str], dict[str, str], bool]] = [
        (["-vv", "login", chap, CHAP_IQN, "--chap-user", USER], {cli.SECRET_ENV: SECRET}, False),
        (["login", chap, CHAP_IQN, "-vv", "--json", *from_file, *mutual], {}, False),
        (
            ["-vv", "login", chap, CHAP_IQN, "--chap-user", USER],
            {cli.SECRET_ENV: WRONG_SECRET},
            False,
        ),
        (["-vv", "discover", "-c", str(ci), "--json"], {}, False),
        (["-vv", "discover", chap, *from_file], {}, False),
        (["-vv", "probe", "-c", str(ci), "--json"], {}, False),
        (["-vv", "probe", "-c", str(ci), "--all"], {}, True),
        (["-vv", "probe", "-c", str(wrong), "--json"], {}, False),
        (["-vv", "probe", "--portal", chap, "--iqn", CHAP_IQN, *from_file, *mutual], {}, True),
        (
            [
                "-vv",
                "probe",
                "--portal",
                chap,
                "--iqn",
                CHAP_IQN,
                "--chap-user",
                USER,
                "--target-chap-user",
                TARGET_USER,
            ],
            {cli.SECRET_ENV: SECRET, cli.TARGET_SECRET_ENV: TARGET_SECRET},
            False,
        ),
        (["-vv", "probe", "-c", str(broken)], {}, False),
        (["-vv", "attach", "-c", str(ci), "--dry-run"], {}, False),
        (["-vv", "attach", "-c", str(ci), "--dry-run", "--json", *from_file, *mutual], {}, False),
        (
            [
                "-vv",
                "attach",
                "-c",
                str(ci),
                "--iscsiadm",
                str(fake.binary),
                "--dev-root",
                str(fake.dev_root),
                "--device-timeout",
                "0.1",
            ],
            {},
            False,
        ),
    ]
    codes = []
    with caplog.at_level(logging.DEBUG):
        for argv, env, tty in runs:
            with monkeypatch.context() as mp:
                for key, value in env.items():
                    mp.setenv(key, value)
                ran = cli_run(*argv, *NAME, *FAST, tty=tty)
            codes.append(ran.code)
            assert "Traceback" not in ran.err
            assert_no_secret(ran.out, ran.err)
    # The battery really ran: successes, target failures and bad input alike...
    assert set(codes) == {0, 1, 2}, codes
    # ...and logging was really captured at debug level, secrets and all checked.
    messages = [record.getMessage() for record in caplog.records]
    assert any("CHAP secret read from" in m for m in messages)
    assert any("taken from $PYISCSI_TARGET_CHAP_SECRET" in m for m in messages)
    assert any("running iscsiadm" in m for m in messages)
    assert_no_secret(caplog.text, *messages)


def test_logging_is_restored_after_a_run(targets: Targets) -> None:
    package = logging.getLogger("pyiscsi_failover")
    before = (list(package.handlers), package.level, package.propagate)
    ran = cli_run("-vv", "probe", "--iqn", OPEN_IQN, "--portal", targets.open.portals["ok"], *NAME)
    assert ran.code == 0
    assert "DEBUG pyiscsi_failover.cli" in ran.err  # -vv did log, to the stderr we gave
    assert (list(package.handlers), package.level, package.propagate) == before


def test_concurrent_runs_keep_their_logs_apart_and_restore_the_level(targets: Targets) -> None:
    package = logging.getLogger("pyiscsi_failover")
    before = (list(package.handlers), package.level)
    served = targets.open
    argvs = [
        ["-vv", "probe", "--check", "tcp", "--iqn", OPEN_IQN, "--portal", served.portals["ok"]],
        ["probe", "--check", "tcp", "--iqn", OPEN_IQN, "--portal", served.portals["refused"]],
    ] * 4
    results: list[Ran | None] = [None] * len(argvs)
    barrier = threading.Barrier(len(argvs))

    def one(index: int) -> None:
        barrier.wait()
        results[index] = cli_run(*argvs[index], *NAME, *FAST)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, ran in enumerate(results):
        assert ran is not None
        if index % 2 == 0:  # verbose and successful: its own debug lines, nobody else's
            assert ran.code == 0
            assert "DEBUG" in ran.err
            assert served.portals["refused"] not in ran.err
        else:  # quiet and failing: exactly its one line
            assert_fails(ran, 1, served.portals["refused"])
    assert (list(package.handlers), package.level) == before


def test_warnings_are_shown_without_verbose(
    targets: Targets, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = "Qz8-tiny"  # RFC 7143 wants >= 12 bytes
    monkeypatch.setenv(cli.SECRET_ENV, tiny)
    argv = ["login", targets.chap.portals["chap"], CHAP_IQN, "--chap-user", USER]
    ran = cli_run(*argv, *NAME, *FAST)
    assert ran.code == 1
    assert ran.err_lines[0].startswith("pyiscsi-failover: WARNING ")
    assert "shorter than 12 bytes" in ran.err_lines[0]
    assert ran.err_lines[1].startswith("pyiscsi-failover: ")
    assert tiny not in ran.err


# --------------------------------------------------------------------------------------------
# Unexpected failures still end in one line, never a traceback


def _raising(exc: BaseException, *, in_nursery: bool = False) -> Any:
    async def fail() -> None:
        raise exc

    async def command(*_: object) -> int:
        if in_nursery:  # trio wraps a child task's error in a (nested) exception group
            async with trio.open_nursery() as outer:
                outer.start_soon(trio.lowlevel.checkpoint)
                async with trio.open_nursery() as inner:
                    inner.start_soon(fail)
        await fail()
        return 0

    return command


@pytest.mark.parametrize(
    ("exc", "in_nursery", "code", "line"),
    [
        (RuntimeError(f"bug {SECRET}"), False, 1, "internal error (RuntimeError); run with -vv"),
        (ValueError(SECRET), True, 1, "internal error (ValueError)"),
        (ConnectRefused("h:1: connection refused"), True, 1, "h:1: connection refused"),
        (ISCSIError("plain failure"), False, 1, "plain failure"),
        (KeyboardInterrupt(), False, 130, "interrupted"),
    ],
)
def test_unexpected_errors_become_one_line(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException, in_nursery: bool, code: int, line: str
) -> None:
    monkeypatch.setitem(cli._COMMANDS, "probe", _raising(exc, in_nursery=in_nursery))
    ran = cli_run("probe", "--portal", "h", "--iqn", OPEN_IQN)
    assert_fails(ran, code, line)
    assert_no_secret(ran.err)


def test_a_vanished_stdout_keeps_the_exit_status_without_output(targets: Targets) -> None:
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    argv = ["probe", "--check", "tcp", "--iqn", OPEN_IQN, "--portal", targets.open.portals["ok"]]
    # The reader left (`| head -1`): the probe still worked, and says so by its status only.
    assert cli.run(argv, stdout=Closed(), stderr=err) == 0
    assert err.getvalue() == ""
    argv = [
        "probe",
        "--check",
        "tcp",
        "--iqn",
        OPEN_IQN,
        "--portal",
        targets.open.portals["refused"],
    ]
    assert cli.run(argv, stdout=Closed(), stderr=err) == 1
    assert err.getvalue().startswith("pyiscsi-failover: the only candidate does not work")
    err = io.StringIO()
    # --help and --version ignore a reader that went away, as argparse does, and exit 0.
    assert cli.run(["--version"], stdout=Closed(), stderr=err) == 0
    assert cli.run(["probe", "--help"], stdout=Closed(), stderr=err) == 0
    assert err.getvalue() == ""


# --------------------------------------------------------------------------------------------
# demo


def test_demo_default_policy_explains_the_choice() -> None:
    started = time.monotonic()
    ran = cli_run("demo", *NAME)
    assert ran.code == 0, ran
    assert time.monotonic() - started < 10  # one 3 s connect timeout, not one per dead portal
    lines = ran.out.splitlines()
    assert "policy ordered" in ran.out
    progress = [line for line in lines if line.startswith("  [")]
    assert len(progress) == 6  # three started, three finished
    rows = {line.split()[0]: line.split() for line in lines if line[:2] in (" 0", " 1", "*2")}
    assert rows["0"][4] == "timeout"
    assert rows["1"][4] == "refused"
    assert rows["*2"][4] == "ok"
    assert lines[-1].startswith("=> chosen #2 127.0.0.1:")
    assert '"auth_password": "***"' in ran.out


def test_demo_json_staggered() -> None:
    ran = cli_run("demo", "--json", "--policy", "staggered", *NAME)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["policy"] == "staggered"
    assert (body["chosen"]["iqn"], body["chosen"]["lun"]) == (DEMO_IQN, 1)
    outcomes = [a["outcome"] for a in body["attempts"]]
    assert outcomes[1:] == ["refused", "ok"]
    assert outcomes[0] in {"cancelled", "timeout"}
    assert body["chosen"]["portal"] == body["attempts"][2]["portal"]


# --------------------------------------------------------------------------------------------
# The real command, as a process


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "pyiscsi_failover", *argv]


def test_end_to_end_as_a_process(targets: Targets, secret_file: Path) -> None:
    served = targets.open
    env = {**os.environ, cli.TARGET_SECRET_ENV: TARGET_SECRET}
    argv = ["probe", "--json", "--iqn", CHAP_IQN, *NAME, *FAST]
    argv += ["--portal", served.portals["refused"], "--portal", targets.chap.portals["chap"]]
    argv += ["--chap-user", USER, "--chap-secret-file", str(secret_file)]
    argv += ["--target-chap-user", TARGET_USER]
    done = subprocess.run(
        _command(*argv), capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    body = json.loads(done.stdout)
    assert body["chosen"] == {"portal": targets.chap.portals["chap"], "iqn": CHAP_IQN, "lun": 0}
    assert_no_secret(done.stdout, done.stderr)

    bad = subprocess.run(
        _command("login", "127.0.0.1:70000", OPEN_IQN),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("pyiscsi-failover: portal: invalid portal '127.0.0.1:70000'")


def test_a_closed_pipe_is_not_a_traceback(targets: Targets) -> None:
    # As in `pyiscsi-failover probe ... | head -0`: the reader is gone before we write.
    argv = ["probe", "--check", "tcp", "--iqn", OPEN_IQN, "--portal", targets.open.portals["ok"]]
    process = subprocess.Popen(
        _command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) == 0  # the probe worked; the reader's leaving changes nothing
    assert err == ""


# --------------------------------------------------------------------------------------------
# Against Debian's tgtd


TGT_OPEN: Final = "iqn.2026-11.test.pyiscsi:cli-open"
TGT_CHAP: Final = "iqn.2026-11.test.pyiscsi:cli-chap"
TGT_USER: Final = "cliuser"


@pytest.fixture
def tgtd_portal(tgtd_factory: TgtdStarter) -> str:
    daemon = tgtd_factory()
    daemon.add_target(1, TGT_OPEN, luns=1)
    daemon.allow(1)
    daemon.add_target(2, TGT_CHAP, luns=2)
    daemon.allow(2)
    daemon.add_account(TGT_USER, SECRET)
    daemon.bind_account(2, TGT_USER)
    return daemon.portal


@pytest.mark.peer
def test_tgtd_discover_json(tgtd_portal: str) -> None:
    ran = cli_run("discover", tgtd_portal, "--json", *NAME, *FAST)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["outcome"] == "ok"
    assert {t["iqn"]: t["portals"] for t in body["targets"]} == {
        TGT_OPEN: [f"{tgtd_portal},1"],
        TGT_CHAP: [f"{tgtd_portal},1"],
    }


@pytest.mark.peer
def test_tgtd_login_with_chap_from_a_file_and_a_wrong_one(
    tgtd_portal: str, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["login", tgtd_portal, TGT_CHAP, "--chap-user", TGT_USER, *NAME, *FAST]
    ran = cli_run(*argv, "--json", "--chap-secret-file", str(secret_file))
    assert ran.code == 0, ran
    assert (ran.json()["outcome"], ran.json()["auth_method"]) == ("ok", "CHAP")
    monkeypatch.setenv(cli.SECRET_ENV, WRONG_SECRET)
    wrong = cli_run(*argv)
    assert_fails(wrong, 1, "login refused: authentication failure (0x0201)")
    assert_no_secret(ran.out, ran.err, wrong.out, wrong.err)


@pytest.mark.peer
def test_tgtd_probe_fails_over_from_our_refusing_portal(tgtd_portal: str, targets: Targets) -> None:
    refused = targets.open.portals["refused"]
    argv = ["probe", "--json", "--iqn", TGT_OPEN, "--lun", "1", *NAME, *FAST]
    ran = cli_run(*argv, "--portal", refused, "--portal", tgtd_portal, "--portal", UNREACHABLE)
    assert ran.code == 0, ran
    body = ran.json()
    assert body["chosen"] == {"portal": tgtd_portal, "iqn": TGT_OPEN, "lun": 1}
    assert [a["outcome"] for a in body["attempts"]][:2] == ["refused", "ok"]
    assert body["attempts"][2]["outcome"] in {"cancelled", "not_tried", "unreachable"}


def test_detach_finds_a_record_attach_made_at_a_redirected_address(
    targets: Targets, tmp_path: Path, fake: FakeIscsiadm, state_file: Path
) -> None:
    # After a permanent redirect attach hands off an address that is not a candidate; the
    # ledger remembers it, so detach logs out of it and deletes that record too.
    refused, chap = targets.open.portals["refused"], targets.chap.portals["chap"]
    moved = "127.0.0.99:3261"
    key = f"{CHAP_IQN} {moved}"
    fake.preload(records=[key], sessions=[key])
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(
        json.dumps({"version": 1, "records": [{"iqn": CHAP_IQN, "portal": moved}]})
    )
    path = write_json(tmp_path / "ci.json", chap_info(targets))
    argv = ["detach", "-c", str(path), "--iscsiadm", str(fake.binary)]
    ran = cli_run(*argv, "--state-file", str(state_file), "--json")
    assert ran.code == 0, ran
    assert ran.json() == {
        "detached": [
            {"portal": refused, "iqn": CHAP_IQN, "record": "absent"},
            {"portal": chap, "iqn": CHAP_IQN, "record": "absent"},
            {"portal": moved, "iqn": CHAP_IQN, "record": "deleted"},
        ]
    }
    assert fake.saved() == {"records": [], "sessions": []}
    assert json.loads(state_file.read_text()) == {"version": 1, "records": []}


# --------------------------------------------------------------------------------------------
# --help: every option explained, library defaults mirrored, no heavy imports


def _subparsers(parser: Any) -> dict[str, Any]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


#: Options whose absence (a None default) still means a value, which their help must name.
NONE_MEANS_SOMETHING: Final = {
    "initiator_name",
    "chap_user",
    "chap_secret_file",
    "target_chap_user",
    "target_chap_secret_file",
    "chap_algorithms",
}


def test_every_option_has_a_one_line_help_and_shows_its_default() -> None:
    import argparse

    parser = cli.build_parser()
    parsers = {"(top)": parser, **_subparsers(parser)}
    assert set(parsers) == {"(top)", "discover", "login", "probe", "attach", "detach", "demo"}
    checked = 0
    for name, sub in parsers.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            where = (name, action.dest)
            if action.help == argparse.SUPPRESS:
                assert action.dest in {"chap_secret", "target_chap_secret"}, where
                continue
            assert action.help and "\n" not in action.help, where
            meaningful = action.default not in (None, False, [], argparse.SUPPRESS)
            if meaningful or action.dest in NONE_MEANS_SOMETHING:
                # A value the user leaves out is worth a word: the default, or what happens.
                assert "default" in action.help, where
            checked += 1
    assert checked > 60
    # The defaults are shown expanded, as the parser will use them.
    probe = " ".join(cli_run("probe", "--help").out.split())  # as one line, unwrapped
    for shown in ("(default ordered)", "(default login)", "(default 0.25)", "(default 16)"):
        assert shown in probe
    assert "(default 4)" in probe and "(default follow)" in probe
    assert "MD5,SHA1,SHA256,SHA3-256" in probe and "SHA256,MD5" in probe


def test_the_defaults_shown_are_the_librarys() -> None:
    from pyiscsi_failover import connection_info, iscsiadm, prober, transport
    from pyiscsi_failover.protocol import chap

    assert cli._DEFAULT_CONNECT_TIMEOUT == transport.DEFAULT_CONNECT_TIMEOUT
    assert cli._DEFAULT_LOGIN_TIMEOUT == transport.DEFAULT_LOGIN_TIMEOUT
    assert cli._MAX_REDIRECTS == transport.MAX_REDIRECTS
    assert tuple(m.value for m in transport.RedirectMode) == cli._REDIRECT_MODES
    assert cli._DEFAULT_STAGGER == prober.DEFAULT_STAGGER
    assert cli._DEFAULT_CONCURRENCY == prober.DEFAULT_CONCURRENCY
    assert tuple(p.value for p in prober.Policy) == cli._POLICIES
    assert tuple(c.value for c in prober.Check) == cli._CHECKS
    assert cli._MAX_LUN == connection_info.MAX_LUN
    assert cli._STATE_FILE == iscsiadm.DEFAULT_LEDGER_PATH
    assert tuple(cli._DELETE_CHOICES.values()) == iscsiadm.DELETE_MODES
    offer = ",".join(a.open_iscsi_name for a in chap.DEFAULT_ALGORITHMS)
    assert offer == cli._DEFAULT_CHAP_ALGORITHMS
    assert chap.parse_chap_algorithms(cli._DEFAULT_CHAP_ALGORITHMS) == chap.DEFAULT_ALGORITHMS
    assert {o.value for o in prober.Outcome} == OUTCOMES
    # The largest accepted --max-redirects is the largest the library accepts.
    transport.RedirectPolicy(max_redirects=cli._MAX_REDIRECTS_LIMIT)
    with pytest.raises(ISCSIError):
        transport.RedirectPolicy(max_redirects=cli._MAX_REDIRECTS_LIMIT + 1)


def test_building_the_parser_imports_no_trio_construct_or_protocol() -> None:
    code = (
        "import sys\n"
        "import pyiscsi_failover.cli as cli\n"
        "cli.build_parser().parse_args(['probe', '--portal', 'h', '--iqn', 'iqn.2024-01.x:y'])\n"
        "heavy = ('trio', 'construct', 'socket', 'subprocess', 'pyiscsi_failover.protocol',\n"
        "         'pyiscsi_failover.prober', 'pyiscsi_failover.transport')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "[]\n", done.stdout
    # And --help, as a process, gets as far as printing without them (the same module).
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pyiscsi_failover", "probe", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert shown.stdout.startswith("usage: pyiscsi-failover probe")
    imported = {line.split("|")[-1].strip() for line in shown.stderr.splitlines()}
    assert not {"trio", "construct", "pyiscsi_failover.protocol"} & imported


# --------------------------------------------------------------------------------------------
# Redirect and CHAP offer options


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--redirects", "sometimes"], "argument --redirects: invalid choice: 'sometimes'"),
        (["--redirect-allow", "10.0.0.0/33"], "'10.0.0.0/33' is not an IP network in CIDR"),
        (["--redirect-allow", "example.com"], "--redirect-allow"),
        (["--max-redirects", "-1"], "'-1' is not a number of redirects in 0..64"),
        (["--max-redirects", "65"], "0..64"),
        (["--max-redirects", "x"], "'x' is not an integer"),
        (["--chap-algorithms", "MD4"], "argument --chap-algorithms: "),
        (["--chap-algorithms", "MD5,MD5"], "--chap-algorithms"),
        (["--chap-algorithms", ""], "--chap-algorithms"),
    ],
)
@pytest.mark.parametrize("command", ["probe", "attach", "login", "discover"])
def test_bad_redirect_and_chap_offer_values_exit_2(
    command: str, argv: list[str], fragment: str
) -> None:
    head = {
        "probe": ["probe", "--portal", "127.0.0.1", "--iqn", OPEN_IQN],
        "attach": ["attach", "-c", "never-read.json", "--dry-run"],
        "login": ["login", "127.0.0.1", OPEN_IQN],
        "discover": ["discover", "127.0.0.1"],
    }[command]
    ran = cli_run(*head, *argv, *NAME)
    assert_fails(ran, 2, fragment)
    assert ran.out == ""


def test_redirect_and_chap_offer_options_reach_the_library() -> None:
    from pyiscsi_failover.prober import ProbeOptions
    from pyiscsi_failover.protocol.chap import ChapAlgorithm, ChapPolicy
    from pyiscsi_failover.transport import RedirectMode, RedirectPolicy

    parser = cli.build_parser()
    base = ["probe", "--portal", "h", "--iqn", OPEN_IQN, *NAME]
    options = cli._probe_options(parser.parse_args(base))
    defaults = ProbeOptions(initiator_name=INITIATOR)
    assert options.chap_policy == ChapPolicy() == defaults.chap_policy
    assert options.redirect_policy == RedirectPolicy() == defaults.redirect_policy
    args = parser.parse_args(
        [
            *base,
            *("--redirects", "never", "--max-redirects", "0"),
            *("--redirect-allow", "10.0.0.0/8", "--redirect-allow", "fd00::1"),
            *("--chap-algorithms", "sha256,5"),
        ]
    )
    options = cli._probe_options(args)
    assert options.redirects is RedirectMode.NEVER
    assert [str(n) for n in options.redirect_allow] == ["10.0.0.0/8", "fd00::1/128"]
    assert options.max_redirects == 0
    assert options.chap_policy.algorithms == (ChapAlgorithm.SHA256, ChapAlgorithm.MD5)
    login_args = parser.parse_args(
        ["login", "h", OPEN_IQN, "--chap-algorithms", "SHA3-256", "--redirects", "never"]
    )
    config = cli._login_config(login_args, target_name=OPEN_IQN, chap=None, target_chap=None)
    assert config.chap_policy.algorithms == (ChapAlgorithm.SHA3_256,)
    assert cli._redirect_policy(login_args).mode is RedirectMode.NEVER


def test_probe_refuses_a_redirect_when_told_never_and_names_the_address(
    targets: Targets,
) -> None:
    served = targets.open
    redirect, ok = served.portals["redirect"], served.portals["ok"]
    argv = ["probe", "--portal", redirect, "--iqn", OPEN_IQN, *NAME, *FAST]
    ran = cli_run(*argv, "--redirects", "never", "--json")
    line = assert_fails(ran, 1, "the only candidate does not work")
    (attempt,) = ran.json()["attempts"]
    assert attempt["outcome"] == "redirect_refused"
    assert attempt["redirect_refused"] == ok
    assert attempt["detail"].startswith(f"{redirect}: redirect to {ok} refused")
    assert f"redirect to {ok} refused: redirects are not followed" in line
    table = cli_run(*argv, "--redirects", "never")
    assert "redirect_refused" in table.out.splitlines()[1]
    # Outside the allowed networks: refused before anything is sent there.
    ran = cli_run(*argv, "--redirect-allow", "10.0.0.0/8", "--json")
    (attempt,) = ran.json()["attempts"]
    assert (attempt["outcome"], attempt["redirect_refused"]) == ("redirect_refused", ok)
    assert "not in the allowed networks 10.0.0.0/8" in attempt["detail"]
    # Allowed, and within --max-redirects: followed as before.
    ran = cli_run(*argv, "--redirect-allow", "127.0.0.0/8", "--max-redirects", "1", "--json")
    assert ran.code == 0, ran
    assert ran.json()["chosen"]["portal"] == ok
    # --max-redirects 0: the first redirect is one too many.
    ran = cli_run(*argv, "--max-redirects", "0", "--json")
    assert ran.json()["attempts"][0]["outcome"] == "redirect_loop"


def test_login_and_discover_json_describe_a_refused_redirect(targets: Targets) -> None:
    redirect, ok = targets.open.portals["redirect"], targets.open.portals["ok"]
    for argv in (["login", redirect, OPEN_IQN], ["discover", redirect]):
        ran = cli_run(*argv, "--redirects", "never", "--json", *NAME, *FAST)
        line = assert_fails(ran, 1, f"{redirect}: redirect to {ok} refused")
        body = ran.json()
        assert body["outcome"] == "redirect_refused"
        assert body["redirect_refused"] == ok
        assert body["detail"] == line.removeprefix("pyiscsi-failover: ")


# --------------------------------------------------------------------------------------------
# Failures: one clear line, naming the portal


@pytest.mark.parametrize("command", ["login", "discover"])
def test_login_and_discover_json_print_one_object_for_network_errors(
    targets: Targets, command: str
) -> None:
    refused = targets.open.portals["refused"]
    argv = [command, refused, *([OPEN_IQN] if command == "login" else [])]
    ran = cli_run(*argv, "--json", *NAME, *FAST)
    line = assert_fails(ran, 1, f"{refused}: connection refused")
    assert ran.json() == {
        "portal": refused,
        "outcome": "refused",
        "detail": f"{refused}: connection refused",
        "error": "ConnectRefused",
        "redirect_refused": None,
    }
    assert line == f"pyiscsi-failover: {refused}: connection refused"
    ran = cli_run(command, UNREACHABLE, *argv[2:], "--json", *NAME, *FAST)
    assert ran.code == 1 and ran.json()["outcome"] == "unreachable"
    # Input errors stay one line on stderr, with nothing on stdout.
    ran = cli_run(command, "127.0.0.1:0", *argv[2:], "--json", *NAME)
    assert_fails(ran, 2, "port")
    assert ran.out == ""


async def _http_ish(stream: trio.SocketStream) -> None:
    async with stream:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")


async def _cli_in_thread(*argv: str) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    code = await trio.to_thread.run_sync(
        lambda: cli.run(list(argv), stdout=out, stderr=err, stdin=io.StringIO())
    )
    return Ran(code, out.getvalue(), err.getvalue())


async def test_a_peer_that_is_not_iscsi_is_named_in_one_line() -> None:
    import functools

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, _http_ish, 0, host="127.0.0.1")
            )
            portal = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            said = f"{portal}: not an iSCSI target (its reply is not an iSCSI PDU)"
            ran = await _cli_in_thread("login", portal, OPEN_IQN, *NAME, *FAST)
            assert assert_fails(ran, 1) == f"pyiscsi-failover: {said}"
            ran = await _cli_in_thread("login", portal, OPEN_IQN, "--json", *NAME, *FAST)
            assert ran.json()["detail"] == said
            assert ran.json()["error"] == "NotAnISCSITarget"
            ran = await _cli_in_thread("discover", portal, *NAME, *FAST)
            assert assert_fails(ran, 1) == f"pyiscsi-failover: {said}"
            probe = ["probe", "--portal", portal, "--iqn", OPEN_IQN, *NAME, *FAST]
            ran = await _cli_in_thread(*probe, "--json")
            assert_fails(ran, 1, said)
            (attempt,) = ran.json()["attempts"]
            assert (attempt["outcome"], attempt["detail"]) == ("protocol_error", said)
            ran = await _cli_in_thread(*probe)
            row = ran.out.splitlines()[1]
            assert row.startswith(f" 0  {portal}")
            assert row.endswith("not an iSCSI target (its reply is not an iSCSI PDU)")
            nursery.cancel_scope.cancel()


def test_a_failed_mutual_chap_proof_names_the_portal(
    targets: Targets, secret_file: Path, tmp_path: Path
) -> None:
    chap = targets.chap.portals["chap"]
    wrong = tmp_path / "wrong-target-secret"
    wrong.write_text(WRONG_SECRET)
    argv = ["login", chap, CHAP_IQN, "--chap-user", USER, "--chap-secret-file", str(secret_file)]
    argv += ["--target-chap-user", TARGET_USER, "--target-chap-secret-file", str(wrong)]
    ran = cli_run(*argv, *NAME, *FAST)
    assert_fails(ran, 1, f"pyiscsi-failover: {chap}: ", "CHAP_R")
    assert_no_secret(ran.out, ran.err)
    ran = cli_run(*argv, "--json", *NAME, *FAST)
    assert ran.json()["outcome"] == "auth_failed"
    assert ran.json()["detail"].startswith(f"{chap}: ")


def test_a_target_that_requires_chap_says_so_when_none_was_given(targets: Targets) -> None:
    chap = targets.chap.portals["chap"]
    ran = cli_run("login", chap, CHAP_IQN, *NAME, *FAST)
    assert_fails(
        ran,
        1,
        f"{chap}: login refused: authentication failure (0x0201)",
        "target requires CHAP: give --chap-user and a secret",
    )
    ran = cli_run("login", chap, CHAP_IQN, "--json", *NAME, *FAST)
    assert ran.json()["hint"] == "target requires CHAP: give --chap-user and a secret"
    ran = cli_run("discover", chap, *NAME, *FAST)
    assert_fails(ran, 1, "discovery login refused", "target requires CHAP")
    refused = targets.open.portals["refused"]
    probe = ["probe", "--portal", refused, "--portal", chap, "--iqn", CHAP_IQN, *NAME, *FAST]
    assert_fails(cli_run(*probe), 1, "#1 ", "auth_failed; target requires CHAP: give --chap-user")


def test_a_wrong_secret_gets_no_chap_hint(targets: Targets, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text(WRONG_SECRET)
    chap = targets.chap.portals["chap"]
    argv = ["login", chap, CHAP_IQN, "--chap-user", USER, "--chap-secret-file", str(wrong)]
    line = assert_fails(cli_run(*argv, *NAME, *FAST), 1, "authentication failure (0x0201)")
    assert "requires CHAP" not in line


@pytest.mark.parametrize(
    "argv",
    [
        ["login", "127.0.0.1", OPEN_IQN],
        ["discover", "127.0.0.1"],
        ["probe", "--portal", "127.0.0.1", "--iqn", OPEN_IQN],
        ["attach", "-c", "never-read.json", "--dry-run"],
    ],
)
@pytest.mark.parametrize("env", [cli.SECRET_ENV, cli.TARGET_SECRET_ENV])
def test_a_secret_in_the_environment_without_its_user_exits_2(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str, tmp_path: Path
) -> None:
    monkeypatch.setenv(env, SECRET)
    argv = [a.replace("never-read.json", str(tmp_path / "ci.json")) for a in argv]
    write_json(tmp_path / "ci.json", {"target_portal": "127.0.0.1", "target_iqn": OPEN_IQN})
    user = "--chap-user" if env == cli.SECRET_ENV else "--target-chap-user"
    ran = cli_run(*argv, *NAME)
    assert_fails(ran, 2, f"${env} is set but {user} is not")
    assert_no_secret(ran.out, ran.err)


def test_the_short_secret_warning_is_shown_once_per_run(
    targets: Targets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = tmp_path / "short"
    short.write_text("tiny-secret")  # 11 bytes: below RFC 7143's 12
    chap = targets.chap.portals["chap"]
    argv = ["probe", "--all", "--policy", "sequential", "--iqn", CHAP_IQN, *NAME, *FAST]
    argv += ["--portal", chap, "--portal", targets.open.portals["ok"]]
    argv += ["--chap-user", USER, "--chap-secret-file", str(short)]
    with caplog.at_level(logging.WARNING, logger="pyiscsi_failover"):
        ran = cli_run(*argv)
    warned = [r for r in caplog.records if "shorter than 12 bytes" in r.getMessage()]
    assert len(warned) == 2, ran  # one per CHAP exchange, as the library logs it...
    assert ran.err.count("shorter than 12 bytes") == 1  # ...and once on the terminal
    # A new run warns again.
    assert cli_run(*argv).err.count("shorter than 12 bytes") == 1


# --------------------------------------------------------------------------------------------
# Inputs: empty, enormous, ambiguous


def test_an_empty_connection_info_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    assert_fails(
        cli_run("probe", "-c", str(empty)), 2, f"connection_info file '{empty}' is an empty file"
    )
    assert_fails(cli_run("probe", "-c", "-", stdin=" \n"), 2, "connection_info on stdin is empty")


def test_inputs_are_read_up_to_one_mib(tmp_path: Path) -> None:
    for argv in (
        ["probe", "-c", "/dev/zero"],
        ["attach", "-c", "/dev/zero", "--dry-run"],
        ["detach", "-c", "/dev/zero"],
        ["discover", "-c", "/dev/zero"],
    ):
        assert_fails(cli_run(*argv, *NAME), 2, "'/dev/zero' is larger than 1 MiB")
    huge = " " * MAX_INPUT_BYTES + "{}"
    assert_fails(cli_run("probe", "-c", "-", stdin=huge), 2, "on stdin is larger than 1 MiB")
    argv = ["login", "127.0.0.1", OPEN_IQN, "--chap-user", USER, "--chap-secret-file"]
    assert_fails(cli_run(*argv, "/dev/zero", *NAME), 2, "CHAP secret file '/dev/zero' is larger")
    # Just under the limit is read (and then judged on its content).
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_INPUT_BYTES - 2) + b"{}")
    assert_fails(cli_run("probe", "-c", str(big), *NAME), 2, "target_portal")


def test_an_unbracketed_ipv6_portal_with_a_port_gets_a_hint() -> None:
    ran = cli_run("login", "::1:99999", OPEN_IQN, *NAME)
    assert_fails(ran, 2, "an IPv6 address with a port is written [::1]:99999")
    # "::1:3260" is a valid address (port 3260 by default), but rarely what was meant.
    ran = cli_run("login", "::1:3260", OPEN_IQN, "--connect-timeout", "0.5", *NAME)
    assert "is read as the IPv6 address ::1:3260 on port 3260; for a port, write [::1]:3260" in (
        ran.err
    )
    # A plain IPv6 address draws no hint.
    assert cli._bracketed_hint("::1") is None
    assert cli._bracketed_hint("2001:db8::1") is None
    assert cli._bracketed_hint("2001:db8::5:1") == "[2001:db8::5]:1"
    assert cli._bracketed_hint("[::1]:3260") is None
    assert cli._bracketed_hint("fe80::1:3260,2") == "[fe80::1]:3260,2"


# --------------------------------------------------------------------------------------------
# Output: the new outcomes and notes, and output that cannot be written


def _one_attempt_result(**fields: Any) -> Any:
    from pyiscsi_failover.connection_info import parse_connection_info
    from pyiscsi_failover.prober import Attempt, Check, Policy, ProbeResult

    info = parse_connection_info({"target_portal": "127.0.0.1:3260", "target_iqn": OPEN_IQN})
    attempt = Attempt(candidate=info.candidates[0], elapsed_s=0.004, **fields)
    chosen = attempt if attempt.ok else None
    return ProbeResult(
        policy=Policy.ORDERED,
        check=Check.LOGIN,
        attempts=(attempt,),
        chosen=chosen,
        elapsed_s=0.005,
    )


def test_an_unanswered_logout_is_flagged_in_the_table_and_json() -> None:
    from pyiscsi_failover.prober import Outcome

    note = "no Logout Response within 2 s"
    result = _one_attempt_result(
        outcome=Outcome.OK, detail=f"login succeeded; logout unanswered: {note}", notes=(note,)
    )
    row = cli._probe_table(result)[1].split()
    assert row[4:7] == ["ok", "(logout", "unanswered)"]
    assert " ".join(row[8:]) == f"login succeeded; logout unanswered: {note}"
    body: Any = cli._probe_json(result)
    assert body["attempts"][0]["notes"] == [note]
    assert body["attempts"][0]["outcome"] == "ok"
    clean = _one_attempt_result(outcome=Outcome.OK, detail="login and logout succeeded")
    assert "unanswered" not in cli._probe_table(clean)[1]


def test_error_details_name_their_portal_in_json_only_once() -> None:
    from pyiscsi_failover.prober import Outcome

    named = _one_attempt_result(
        outcome=Outcome.REFUSED, detail="127.0.0.1:3260: connection refused"
    )
    shown: Any = cli._probe_json(named)
    assert shown["attempts"][0]["detail"] == "127.0.0.1:3260: connection refused"
    bare = _one_attempt_result(outcome=Outcome.NEGOTIATION_FAILED, detail="HeaderDigest=MD5?")
    shown = cli._probe_json(bare)
    assert shown["attempts"][0]["detail"] == "127.0.0.1:3260: HeaderDigest=MD5?"
    assert cli._probe_table(bare)[1].split()[4:] == ["negotiation_failed", "4", "HeaderDigest=MD5?"]


def test_output_to_a_closed_pipe_after_a_login_ends_quietly(targets: Targets) -> None:
    # `pyiscsi-failover login ... | head -1`: the reader is gone before the lines come.
    for argv in (
        ["login", targets.open.portals["ok"], OPEN_IQN, *NAME, *FAST],
        ["login", targets.open.portals["ok"], OPEN_IQN, "--json", *NAME, *FAST],
        ["--help"],
    ):
        process = subprocess.Popen(
            _command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        err = process.stderr.read()
        process.stderr.close()
        assert process.wait(timeout=60) == 0, err
        assert err == ""
    # A failure still says why on stderr and exits 1.
    argv = ["login", targets.open.portals["ok"], OTHER_IQN + "x", *NAME, *FAST]
    process = subprocess.Popen(
        _command(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) == 1
    assert err.endswith("login refused: target not found (0x0203)\n") and err.count("\n") == 1


def test_output_to_a_full_disk_is_one_line(targets: Targets) -> None:
    for argv in (
        ["login", targets.open.portals["ok"], OPEN_IQN, *NAME, *FAST],
        ["probe", "--json", "--portal", targets.open.portals["ok"], "--iqn", OPEN_IQN, *NAME],
        ["--help"],
        ["--version"],
    ):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                _command(*argv),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
        assert done.returncode == 1, (argv, done.stderr)
        assert done.stderr == "pyiscsi-failover: cannot write output: No space left on device\n"
