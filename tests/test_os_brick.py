"""The os-brick connector's parts that need no os-brick: the probe child and the property plans.

``pyiscsi_failover.os_brick.probe`` is checked against real probe children (``python -m
pyiscsi_failover probe``) probing our test target, run as a process on loopback with a
blackholed portal (listen(0), accept queue full), a refusing portal and working ones, CHAP, and
an initiator ACL that only the name handed to the probe passes. Broken children (a missing
interpreter, a crash, a hang past the deadline) give :class:`ProbeProcessError`.
``pyiscsi_failover.os_brick.plan`` is checked on every shape of ``connection_properties``.

The connector itself, against os-brick 7.1.1's real code under eventlet, is in
``tests/test_os_brick_real.py``; :func:`served_target` here is shared with it.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import unique_loopback

from pyiscsi_failover.errors import ConnectionInfoError, ISCSIError
from pyiscsi_failover.os_brick.plan import (
    SKIP_KEY,
    Target,
    cleanup_properties,
    connect_properties,
    explicit_paths,
    path_key,
    targets_of,
)
from pyiscsi_failover.os_brick.probe import (
    DEFAULT_TIMEOUT,
    ENV_ARGS,
    ENV_PYTHON,
    ENV_TIMEOUT,
    Health,
    ProbeProcessError,
    ProbeSettings,
    chosen_first,
    healthy,
    parse_verdict,
    probe_argv,
    run_probe,
)

CHAP_USER = "brick-user"
CHAP_SECRET = "Osprey-Lantern-4471-secret"


# --------------------------------------------------------------------------------------------
# A test target process, shared with test_os_brick_real.py


@dataclass(frozen=True)
class ServedTarget:
    """A running ``python -m pyiscsi_failover.testing``: its portals by name (``host:port``)."""

    iqn: str
    initiator: str
    portals: dict[str, str]
    process: subprocess.Popen[bytes]


@contextmanager
def served_target(tmp_path: Path, *, chap: bool = True) -> Iterator[ServedTarget]:
    """One target IQN on four fresh loopback portals: ``dead`` blackholed, ``refused`` bound but
    not listening, ``live`` and ``live2`` working. Only ``initiator`` may log in; with ``chap``
    it needs our CHAP account. The process is killed and reaped on exit."""
    iqn = f"iqn.2026-11.test.pyiscsi.brick:{uuid.uuid4().hex[:16]}"
    initiator = f"iqn.2026-11.test.pyiscsi.host:{uuid.uuid4().hex[:12]}"
    names = ("dead", "refused", "live", "live2")
    argv = [sys.executable, "-m", "pyiscsi_failover.testing", "--target", iqn]
    for name in names:
        argv += ["--portal", f"{name}={unique_loopback()}:0"]
    argv += ["--fault", "dead=blackhole", "--fault", "refused=refuse"]
    argv += ["--allow-initiator", initiator]
    if chap:
        chap_file = tmp_path / f"chap-{uuid.uuid4().hex[:8]}"
        chap_file.write_text(f"chap {CHAP_USER}:{CHAP_SECRET}\n", encoding="utf-8")
        argv += ["--chap-file", str(chap_file), "--no-discovery-chap"]
    stderr_path = tmp_path / f"target-{uuid.uuid4().hex[:8]}.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "the test target said nothing within 30 s"
        assert process.stdout.readline() == b"ready\n", stderr_path.read_text()
        portals: dict[str, str] = {}
        for line in stderr_path.read_text().splitlines():
            if line.startswith("portal "):
                _, name, address, *_ = line.split()
                portals[name] = address.split(",")[0]
        assert sorted(portals) == sorted(names)
        yield ServedTarget(iqn=iqn, initiator=initiator, portals=portals, process=process)
    finally:
        process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def chap_keys() -> dict[str, object]:
    return {"auth_method": "CHAP", "auth_username": CHAP_USER, "auth_password": CHAP_SECRET}


#: Short deadlines so that the blackholed portal costs 1 s, not the default 3 s.
FAST = ProbeSettings(extra_args=("--connect-timeout", "1", "--login-timeout", "5"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedTarget]:
    with served_target(tmp_path_factory.mktemp("brick-target")) as served:
        yield served


# --------------------------------------------------------------------------------------------
# run_probe against the test target


def test_probe_picks_the_first_working_candidate_in_order(target: ServedTarget) -> None:
    p = target.portals
    props = {
        "target_portal": p["dead"],
        "target_iqn": target.iqn,
        "target_lun": 0,
        "target_alternative_portals": [p["refused"], p["live"], p["live2"]],
        **chap_keys(),
    }
    started = time.monotonic()
    verdict = run_probe(
        props, FAST, initiator_name=target.initiator, every_candidate=False, expected=4
    )
    elapsed = time.monotonic() - started
    assert [row.portal for row in verdict.rows] == [p["dead"], p["refused"], p["live"], p["live2"]]
    assert [row.outcome for row in verdict.rows[:3]] == ["timeout", "refused", "ok"]
    assert verdict.rows[3].health is not Health.DEAD  # cancelled, or ok if it was quick
    assert verdict.chosen == 2
    assert list(chosen_first(verdict)) == [2, 3]
    # The blackhole costs its 1 s connect timeout; nothing near open-iscsi's retries.
    assert 1.0 <= elapsed < 10


def test_probe_every_candidate_for_multipath(target: ServedTarget) -> None:
    p = target.portals
    props = {
        "target_portals": [p["live"], p["dead"], p["live2"], p["refused"]],
        "target_iqns": [target.iqn] * 4,
        "target_luns": [0, 0, 0, 0],
        **chap_keys(),
    }
    verdict = run_probe(
        props, FAST, initiator_name=target.initiator, every_candidate=True, expected=4
    )
    assert [row.outcome for row in verdict.rows] == ["ok", "timeout", "ok", "refused"]
    assert list(healthy(verdict)) == [0, 2]
    assert verdict.chosen == 0


def test_probe_logs_in_under_the_initiator_name_it_is_given(target: ServedTarget) -> None:
    """The target's ACL admits only ``target.initiator``: another name is refused, so a pass
    proves the name reached the probe."""
    props = {"target_portal": target.portals["live"], "target_iqn": target.iqn, **chap_keys()}
    verdict = run_probe(
        props,
        FAST,
        initiator_name="iqn.2026-11.test.pyiscsi.host:somebody-else",
        every_candidate=False,
        expected=1,
    )
    assert verdict.chosen is None
    assert verdict.rows[0].outcome == "authorization_failed"
    assert (
        run_probe(
            props, FAST, initiator_name=target.initiator, every_candidate=False, expected=1
        ).chosen
        == 0
    )


def test_probe_takes_chap_from_the_properties_on_stdin(
    target: ServedTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong CHAP in the properties fails even with the right secret in the service's
    environment: the child does not inherit PYISCSI_CHAP_SECRET."""
    monkeypatch.setenv("PYISCSI_CHAP_SECRET", CHAP_SECRET)
    props = {
        "target_portal": target.portals["live"],
        "target_iqn": target.iqn,
        "auth_method": "CHAP",
        "auth_username": CHAP_USER,
        "auth_password": "Not-The-Right-Secret-123",
    }
    verdict = run_probe(
        props, FAST, initiator_name=target.initiator, every_candidate=False, expected=1
    )
    assert verdict.rows[0].outcome == "auth_failed"


def test_the_command_line_never_holds_a_secret() -> None:
    argv = probe_argv(FAST, initiator_name="iqn.2026-11.test:host", every_candidate=True)
    assert argv[:7] == [sys.executable, "-m", "pyiscsi_failover", "probe", "-c", "-", "--json"]
    assert "--all" in argv
    assert argv[argv.index("--initiator-name") + 1] == "iqn.2026-11.test:host"
    assert not any(CHAP_SECRET in arg for arg in argv)
    single = probe_argv(ProbeSettings(), initiator_name=None, every_candidate=False)
    assert "--all" not in single
    assert "--initiator-name" not in single


# --------------------------------------------------------------------------------------------
# Children that give no verdict


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / f"fake-python-{uuid.uuid4().hex[:8]}"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


PROPS = {"target_portal": "127.0.0.1:3260", "target_iqn": "iqn.2026-11.test:x", **chap_keys()}


def test_a_probe_past_its_deadline_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    python = _script(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60")
    settings = ProbeSettings(python=python, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ProbeProcessError, match=r"did not finish within 0\.5 s"):
        run_probe(PROPS, settings, initiator_name=None, every_candidate=False, expected=1)
    assert time.monotonic() - started < 5
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def test_a_crashing_probe_is_no_verdict(tmp_path: Path) -> None:
    python = _script(tmp_path, "cat > /dev/null; echo 'Traceback: boom' >&2; exit 1")
    with pytest.raises(ProbeProcessError, match="printed no JSON verdict: Traceback: boom"):
        run_probe(
            PROPS,
            ProbeSettings(python=python),
            initiator_name=None,
            every_candidate=False,
            expected=1,
        )
    python = _script(tmp_path, "cat > /dev/null; echo 'usage: bad option' >&2; exit 2")
    with pytest.raises(ProbeProcessError, match="exited 2: usage: bad option"):
        run_probe(
            PROPS,
            ProbeSettings(python=python),
            initiator_name=None,
            every_candidate=False,
            expected=1,
        )


def test_a_missing_interpreter_is_no_verdict(tmp_path: Path) -> None:
    settings = ProbeSettings(python=str(tmp_path / "no-such-python"))
    with pytest.raises(ProbeProcessError, match="cannot start the probe"):
        run_probe(PROPS, settings, initiator_name=None, every_candidate=False, expected=1)


def test_the_secret_travels_on_stdin_only(tmp_path: Path) -> None:
    """A fake interpreter records its argv and stdin: the secret is in the JSON on stdin."""
    seen = tmp_path / "seen"
    python = _script(tmp_path, f'echo "$@" > {seen}.argv\ncat > {seen}.stdin\nexit 2')
    with pytest.raises(ProbeProcessError):
        run_probe(
            {**PROPS, "volume_id": uuid.uuid4()},  # not JSON: sent as its text
            ProbeSettings(python=python),
            initiator_name="iqn.2026-11.test:host",
            every_candidate=False,
            expected=1,
        )
    argv = Path(f"{seen}.argv").read_text()
    assert CHAP_SECRET not in argv
    assert "-m pyiscsi_failover probe -c - --json --initiator-name iqn.2026-11.test:host" in argv
    sent = json.loads(Path(f"{seen}.stdin").read_text())
    assert sent["auth_password"] == CHAP_SECRET
    assert isinstance(sent["volume_id"], str)


# --------------------------------------------------------------------------------------------
# parse_verdict and settings


def _row(index: int, outcome: str, portal: str = "", **extra: object) -> dict[str, object]:
    return {
        "index": index,
        "portal": portal or f"10.0.0.{index + 1}:3260",
        "iqn": "iqn.2026-11.test:x",
        "lun": 0,
        "outcome": outcome,
        "detail": "",
        **extra,
    }


def _out(chosen: dict[str, object] | None, *rows: dict[str, object]) -> bytes:
    return json.dumps({"chosen": chosen, "elapsed_ms": 1500.0, "attempts": list(rows)}).encode()


def test_parse_verdict_reads_rows_and_the_chosen_one() -> None:
    chosen = {"portal": "10.0.0.3:3260", "iqn": "iqn.2026-11.test:x", "lun": 0}
    verdict = parse_verdict(
        _out(chosen, _row(0, "timeout"), _row(1, "ok"), _row(2, "ok"), _row(3, "cancelled")),
        0,
        expected=4,
    )
    # The probe's own choice (here a staggered winner), not the first ok in order.
    assert verdict.chosen == 2
    assert [row.health for row in verdict.rows] == [
        Health.DEAD,
        Health.OK,
        Health.OK,
        Health.UNKNOWN,
    ]
    assert list(chosen_first(verdict)) == [2, 1, 3]
    assert list(healthy(verdict)) == [1, 2]
    assert verdict.elapsed_s == 1.5
    assert verdict.summary().startswith("#0 10.0.0.1:3260 timeout, #1 10.0.0.2:3260 ok")


def test_parse_verdict_follows_a_permanent_redirect_to_its_candidate() -> None:
    chosen = {"portal": "10.9.9.9:3260", "iqn": "iqn.2026-11.test:x", "lun": 0}
    rows = (_row(0, "refused"), _row(1, "ok", redirected_to="10.9.9.9:3260"))
    assert parse_verdict(_out(chosen, *rows), 0, expected=2).chosen == 1


def test_parse_verdict_none_works() -> None:
    verdict = parse_verdict(_out(None, _row(0, "timeout"), _row(1, "auth_failed")), 1, expected=2)
    assert verdict.chosen is None
    assert list(chosen_first(verdict)) == []
    assert list(healthy(verdict)) == []


@pytest.mark.parametrize(
    ("stdout", "code", "match"),
    [
        (b"", 1, "printed no JSON verdict"),
        (b"\xff", 0, "printed no JSON verdict"),
        (b"[]", 0, "no 'attempts' list"),
        (_out(None, _row(0, "timeout")), 0, "exited 0 but chose none"),
        (_out(None, _row(0, "ok")), 1, "chose none but a candidate passed"),
        (_out(None, _row(0, "timeout"), _row(0, "ok")), 1, r"reported candidates \[0, 0\]"),
        (_out(None, _row(1, "timeout")), 1, "expected 0..0"),
        (_out(None, {"index": "0"}), 1, "lacks index"),
        (_out(None, "row"), 1, "is not an object"),  # type: ignore[arg-type]
        (_out({"portal": "x", "iqn": "y", "lun": 0}, _row(0, "ok")), 0, "has no 'ok' row"),
        (json.dumps({"chosen": 3, "attempts": [_row(0, "ok")]}).encode(), 0, "not an object"),
        (b"{}", -9, "killed by signal 9"),
        (b"{}", 130, "exited 130"),
        (b" " * (2 << 20), 0, "more than"),
    ],
)
def test_parse_verdict_refuses_what_is_not_a_verdict(stdout: bytes, code: int, match: str) -> None:
    with pytest.raises(ProbeProcessError, match=match):
        parse_verdict(stdout, code, expected=1)


def test_probe_process_error_is_ours() -> None:
    assert issubclass(ProbeProcessError, ISCSIError)


def test_settings_from_the_environment() -> None:
    assert ProbeSettings.from_environ({}) == ProbeSettings(
        python=sys.executable, timeout=DEFAULT_TIMEOUT, extra_args=()
    )
    settings = ProbeSettings.from_environ(
        {
            ENV_PYTHON: "/opt/venv/bin/python3",
            ENV_TIMEOUT: "12.5",
            ENV_ARGS: "--connect-timeout 2 --check 'lun'",
        }
    )
    assert settings == ProbeSettings(
        python="/opt/venv/bin/python3",
        timeout=12.5,
        extra_args=("--connect-timeout", "2", "--check", "lun"),
    )


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({ENV_TIMEOUT: "soon"}, "PYISCSI_FAILOVER_PROBE_TIMEOUT must be a number"),
        ({ENV_TIMEOUT: "0"}, "seconds > 0"),
        ({ENV_TIMEOUT: "nan"}, "seconds > 0"),
        ({ENV_ARGS: "--check 'lun"}, "not shell-quoted"),
        ({ENV_ARGS: "--all"}, "may not set --all"),
        ({ENV_ARGS: "--initiator-name=iqn.x:y"}, "may not set --initiator-name"),
        ({ENV_ARGS: "--chap-secret-file /tmp/s"}, "may not set --chap-secret-file"),
    ],
)
def test_unusable_settings_are_named(environ: dict[str, str], match: str) -> None:
    with pytest.raises(ProbeProcessError, match=match):
        ProbeSettings.from_environ(environ)


def test_no_interpreter_is_named() -> None:
    with pytest.raises(ProbeProcessError, match="no interpreter"):
        ProbeSettings(python="")


# --------------------------------------------------------------------------------------------
# plan


IQN = "iqn.2026-11.test.pyiscsi:Vol-1"  # mixed case: os-brick gets it back as spelled


def test_targets_single() -> None:
    props = {"target_portal": "10.0.0.1:3260", "target_iqn": IQN, "target_lun": "1"}
    assert targets_of(props) == (Target(portal="10.0.0.1:3260", iqn=IQN, lun="1"),)
    assert not explicit_paths(props)


def test_targets_alternatives_keep_their_spelling_and_order() -> None:
    props = {
        "target_portal": "10.0.0.1:3260",
        "target_iqn": IQN,
        "target_lun": 1,
        "target_alternative_portals": ["10.0.0.2:3260", "[fd00::3]:3260"],
        "target_alternative_iqns": [IQN, "iqn.2026-11.test.pyiscsi:other"],
        "target_alternative_luns": [1, 7],
    }
    assert [t.as_tuple() for t in targets_of(props)] == [
        ("10.0.0.1:3260", IQN, 1),
        ("10.0.0.2:3260", IQN, 1),
        ("[fd00::3]:3260", "iqn.2026-11.test.pyiscsi:other", 7),
    ]


def test_targets_alternatives_default_to_the_main_iqn_and_lun() -> None:
    props = {
        "target_portal": "10.0.0.1:3260",
        "target_iqn": IQN,
        "target_lun": 4,
        "target_alternative_portals": ["10.0.0.2:3260"],
    }
    assert targets_of(props)[1] == Target(portal="10.0.0.2:3260", iqn=IQN, lun=4)


def test_targets_plural_after_main_and_alternatives_without_repeats() -> None:
    props = {
        "target_portal": "10.0.0.1:3260",
        "target_iqn": IQN,
        "target_lun": 0,
        "target_alternative_portals": ["10.0.0.2:3260"],
        "target_portals": ["10.0.0.1:3260", "10.0.0.3:3260", "10.0.0.2"],  # .2 = .2:3260
        "target_iqns": [IQN, IQN, IQN.lower()],
        "target_luns": [0, 0, 0],
    }
    assert [t.portal for t in targets_of(props)] == [
        "10.0.0.1:3260",
        "10.0.0.2:3260",
        "10.0.0.3:3260",
    ]
    assert explicit_paths(props)


def test_targets_refused_by_our_parser() -> None:
    with pytest.raises(ConnectionInfoError):
        targets_of({"target_portal": "10.0.0.1:3260", "target_iqn": IQN, "target_lun": 16640})


def _four() -> tuple[dict[str, object], tuple[Target, ...]]:
    props: dict[str, object] = {
        "target_portal": "10.0.0.1:3260",
        "target_iqn": IQN,
        "target_lun": 2,
        "target_alternative_portals": ["10.0.0.2:3260", "10.0.0.3:3260", "10.0.0.4:3260"],
        "addressing_mode": "SAM2",
        "volume_id": "v-1",
        **chap_keys(),
    }
    return props, targets_of(props)


def test_connect_single_path_one_candidate() -> None:
    props, targets = _four()
    out = connect_properties(props, targets, [2], multipath=False)
    assert (out["target_portal"], out["target_iqn"], out["target_lun"]) == (
        "10.0.0.3:3260",
        IQN,
        2,
    )
    assert "target_portals" not in out
    assert out["auth_password"] == CHAP_SECRET
    assert out["addressing_mode"] == "SAM2"
    assert out["volume_id"] == "v-1"
    assert props["target_portal"] == "10.0.0.1:3260"  # the caller's dict is untouched


def test_connect_single_path_chosen_then_the_rest() -> None:
    props, targets = _four()
    out = connect_properties(props, targets, [2, 3], multipath=False)
    assert out["target_portal"] == "10.0.0.3:3260"
    assert out["target_portals"] == ["10.0.0.3:3260", "10.0.0.4:3260"]
    assert out["target_iqns"] == [IQN, IQN]
    assert out["target_luns"] == [2, 2]


def test_connect_multipath_explicit_lists() -> None:
    props: dict[str, object] = {
        "target_portals": ["10.0.0.1:3260", "10.0.0.2:3260", "10.0.0.3:3260"],
        "target_iqns": [IQN] * 3,
        "target_luns": [5, 5, 5],
        "target_portal": "10.0.0.1:3260",
        "target_iqn": IQN,
        "target_lun": 5,
    }
    out = connect_properties(props, targets_of(props), [1, 2], multipath=True, dead=[0])
    assert out["target_portals"] == ["10.0.0.2:3260", "10.0.0.3:3260"]
    assert out["target_portal"] == "10.0.0.2:3260"
    assert SKIP_KEY not in out


def test_connect_multipath_by_discovery_through_the_first_healthy() -> None:
    props, targets = _four()
    out = connect_properties(props, targets, [1, 3], multipath=True, dead=[0, 2])
    assert out["target_portal"] == "10.0.0.2:3260"
    assert "target_portals" not in out
    assert out[SKIP_KEY] == [f"10.0.0.1:3260 {IQN.lower()}", f"10.0.0.3:3260 {IQN.lower()}"]


def test_connect_needs_a_candidate() -> None:
    props, targets = _four()
    with pytest.raises(ValueError, match="no candidate"):
        connect_properties(props, targets, [], multipath=False)


def test_cleanup_names_every_candidate_and_what_discovery_found() -> None:
    props, targets = _four()
    out = cleanup_properties(
        props,
        targets,
        [("10.0.0.2:3260", IQN.lower(), 2), ("10.0.0.9:3260", IQN, 2)],  # .2 already listed
    )
    assert out["target_portal"] == "10.0.0.1:3260"
    assert out["target_portals"] == [
        "10.0.0.1:3260",
        "10.0.0.2:3260",
        "10.0.0.3:3260",
        "10.0.0.4:3260",
        "10.0.0.9:3260",
    ]
    assert out["target_luns"] == [2] * 5


def test_path_key() -> None:
    assert path_key("10.0.0.1", "IQN.x") == "10.0.0.1:3260 iqn.x"
    assert path_key("[FD00::1]:3261", "iqn.y") == "[fd00::1]:3261 iqn.y"
    assert path_key("not a portal at all", "iqn.y") is None


# --------------------------------------------------------------------------------------------
# Layers: nothing here may load trio or construct inside Nova or Cinder


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("pyiscsi_failover.os_brick", ("trio", "construct", "os_brick", "subprocess", "socket")),
        ("pyiscsi_failover.os_brick.autoload", ("trio", "construct", "os_brick", "subprocess")),
        ("pyiscsi_failover.os_brick.plan", ("trio", "construct", "os_brick", "subprocess")),
        ("pyiscsi_failover.os_brick.probe", ("trio", "construct", "os_brick")),
    ],
)
def test_what_the_connector_side_imports(module: str, forbidden: tuple[str, ...]) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        f"print(','.join(sorted(m for m in {forbidden!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} pulls in {done.stdout.strip()}"
