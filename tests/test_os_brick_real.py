"""FailoverISCSIConnector against os-brick 7.1.1's real code, under ``eventlet.monkey_patch()``.

Run by the ``os_brick`` nox session, which installs os-brick 7.1.1 and eventlet from the package
index. Where os-brick is not installed (the main ``tests`` session) the test class here is not
collected (``__test__``); the ``os_brick`` session sets ``PYISCSI_OS_BRICK_TESTS=1``, under
which a missing os-brick is an import error rather than silence.

Each test runs one scenario in a child interpreter, ``tests/test_os_brick_runner.py``, which
monkey-patches first as Nova and Cinder do; its docstring says exactly what is real (os-brick's
code and locks, our connector and its probe child against our test target on loopback, every
``iscsiadm -m node`` command against the host's real node database) and what is faked (kernel
login and logout, sessions, SendTargets discovery, multipathd, device appearance).

Checked: the node records created, updated and deleted are those stock os-brick makes for the
chosen candidate only (stock os-brick is run on the same host, pointed at that candidate, and
its records compared setting by setting); no login is attempted at a dead portal; multipath
gets the healthy portals, also through SendTargets discovery; detach, extend and
``get_volume_paths`` see every candidate; every failure path maps to ``TargetPortalsNotFound``
or, when the probe gives no verdict, to a warning and stock os-brick; trio and construct stay
out of the patched process, and the probe does not stall other greenthreads.

The kernel-VM end-to-end row (main portal blackholed: os-brick with our connector attaches in
about a direct attach's time, os-brick alone pays its retries) is for the VM harness in
tests/vm/; ``test_os_brick_runner.build_connector`` builds the connector it needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import require_tool
from test_os_brick import CHAP_SECRET, ServedTarget, chap_keys, served_target

HAVE_OS_BRICK = (
    importlib.util.find_spec("os_brick") is not None
    and importlib.util.find_spec("eventlet") is not None
)
if not HAVE_OS_BRICK and os.environ.get("PYISCSI_OS_BRICK_TESTS") == "1":
    raise ImportError("PYISCSI_OS_BRICK_TESTS=1 but os-brick or eventlet is not installed")

RUNNER = Path(__file__).with_name("test_os_brick_runner.py")
ISCSIADM = "iscsiadm"
#: Keeps the blackholed portal at 1 s in the probe.
FAST_ARGS = "--connect-timeout 1 --login-timeout 5"


@pytest.fixture(scope="module")
def iscsiadm() -> str:
    """open-iscsi's iscsiadm (installed if missing); it writes /etc/iscsi/nodes, so root."""
    if os.geteuid() != 0:
        reason = "PEER TEST NOT RUN: iscsiadm writes /etc/iscsi/nodes, which needs root"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return require_tool("iscsiadm", "open-iscsi")


@pytest.fixture(scope="module")
def brick_target(tmp_path_factory: pytest.TempPathFactory, iscsiadm: str) -> Iterator[ServedTarget]:
    with served_target(tmp_path_factory.mktemp("brick-real")) as served:
        try:
            yield served
        finally:
            _forget(iscsiadm, served)


def _forget(iscsiadm: str, target: ServedTarget) -> None:
    """Delete every node record of the test's own IQN, whatever a failed test left."""
    subprocess.run(
        [iscsiadm, "-m", "node", "-T", target.iqn, "-o", "delete"],
        capture_output=True,
        check=False,
        timeout=60,
    )


def run(
    tmp_path: Path,
    target: ServedTarget,
    steps: list[dict[str, Any]],
    *,
    multipath: bool = False,
    kernel_live: tuple[str, ...] = ("live", "live2"),
    sendtargets: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    initiator: str | None = "",
) -> list[dict[str, Any]]:
    """Run the steps in a monkey-patched child; its report's steps (and the global checks)."""
    spec = {
        "steps": steps,
        "multipath": multipath,
        "initiator": target.initiator if initiator == "" else initiator,
        "kernel_live": [target.portals[name] for name in kernel_live],
        "sendtargets": [[target.portals[name], target.iqn] for name in sendtargets],
        "iqns": [target.iqn],
        "lock_dir": str(tmp_path / "locks"),
        "iscsiadm": require_tool("iscsiadm", "open-iscsi"),
        "env": {"PYISCSI_FAILOVER_PROBE_ARGS": FAST_ARGS, **(env or {})},
    }
    (tmp_path / "locks").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, str(RUNNER)],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert CHAP_SECRET not in done.stderr  # nothing os-brick or we logged shows the secret
    report = json.loads(done.stdout)
    assert report["loaded"] == [], "trio/construct loaded in the patched process"
    assert report["patched"]
    steps_done: list[dict[str, Any]] = report["steps"]
    for step in steps_done:
        assert step["props_untouched"], "the caller's connection_properties were changed"
        assert not any(CHAP_SECRET in " ".join(cmd) for cmd in step["commands"])
    return steps_done


def _props(target: ServedTarget, main: str, *alternatives: str) -> dict[str, Any]:
    """The spec's form: a main target and ``target_alternative_*``."""
    p = target.portals
    props: dict[str, Any] = {
        "target_portal": p[main],
        "target_iqn": target.iqn,
        "target_lun": 0,
        "volume_id": "9c3f0f6e-0000-4000-8000-000000000001",
        **chap_keys(),
    }
    if alternatives:
        props["target_alternative_portals"] = [p[name] for name in alternatives]
        props["target_alternative_iqns"] = [target.iqn] * len(alternatives)
        props["target_alternative_luns"] = [0] * len(alternatives)
    return props


def _plural(target: ServedTarget, *names: str) -> dict[str, Any]:
    """os-brick's multipath form."""
    p = target.portals
    return {
        "target_portal": p[names[0]],
        "target_iqn": target.iqn,
        "target_lun": 0,
        "target_portals": [p[name] for name in names],
        "target_iqns": [target.iqn] * len(names),
        "target_luns": [0] * len(names),
        **chap_keys(),
    }


def _single(target: ServedTarget, name: str) -> dict[str, Any]:
    return {
        "target_portal": target.portals[name],
        "target_iqn": target.iqn,
        "target_lun": 0,
        **chap_keys(),
    }


def _node_writes(step: dict[str, Any]) -> list[str]:
    """The portals of every node-record write os-brick issued (new, update, delete)."""
    portals = []
    for cmd in step["commands"]:
        if cmd[:3] == [ISCSIADM, "-m", "node"] and ("--op" in cmd or "-o" in cmd) and "-p" in cmd:
            op = cmd[cmd.index("--op" if "--op" in cmd else "-o") + 1]
            if op in ("new", "update", "delete"):
                portals.append(cmd[cmd.index("-p") + 1].split(",")[0])
    return sorted(set(portals))


def _key(target: ServedTarget, name: str) -> str:
    return f"{target.portals[name]} {target.iqn}"


@pytest.mark.peer
class TestConnectorOnOsBrick:
    """Collected only where os-brick and eventlet are installed (the ``os_brick`` session)."""

    __test__ = HAVE_OS_BRICK

    def test_single_path_attaches_through_the_working_alternative(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        """Main portal blackholed, first alternative refusing, second working: os-brick makes
        and logs in to the working one's record only, exactly as stock os-brick does when
        given that candidate; detach removes it."""
        t = brick_target
        props = _props(t, "dead", "refused", "live", "live2")
        ours_connect, paths, ours_detach, stock_connect, stock_detach = run(
            tmp_path,
            t,
            [
                {"op": "connect", "props": props},
                {"op": "paths", "props": props},
                {"op": "disconnect", "props": props},
                {"op": "connect", "connector": "stock", "props": _single(t, "live")},
                {"op": "disconnect", "connector": "stock", "props": _single(t, "live")},
            ],
        )
        assert ours_connect["connector"] == "FailoverISCSIConnector"
        assert "error" not in ours_connect, ours_connect
        assert ours_connect["result"]["type"] == "block"
        assert ours_connect["result"]["path"].startswith("/dev/sd")
        assert ours_connect["logins"] == [[t.portals["live"], t.iqn]]
        assert _node_writes(ours_connect) == [t.portals["live"]]
        assert list(ours_connect["records"]) == [_key(t, "live")]
        record = ours_connect["records"][_key(t, "live")]
        assert record["node.session.scan"] == "manual"
        assert record["node.startup"] == "automatic"
        assert record["node.session.auth.authmethod"] == "CHAP"
        assert record["node.session.auth.username"] == "brick-user"
        # The same settings as stock os-brick's record for that candidate alone.
        assert stock_connect["connector"] == "ISCSIConnector"
        assert stock_connect["records"] == ours_connect["records"]
        assert stock_connect["logins"] == ours_connect["logins"]
        # The probe ran once, with the host's initiator name, without blocking greenthreads.
        (probe,) = ours_connect["probes"]
        assert probe["initiator_name"] == t.initiator
        assert probe["every_candidate"] is False
        assert probe["ticks"] > 10
        assert 1.0 <= probe["seconds"] < 15
        info = [r["message"] for r in ours_connect["logged"] if r["level"] == "INFO"]
        assert any("FailoverISCSIConnector handles iSCSI attaches" in m for m in info)
        assert any("#0 " + t.portals["dead"] + " timeout" in m for m in info)
        # get_volume_paths looked at every candidate with a session: the alternative's path.
        assert paths["probes"] == []
        assert any(
            f"ip-{t.portals['live']}-iscsi-{t.iqn}-lun-0" in p for p in paths["potential_paths"][0]
        )
        # Detach: logout and record deletion at the alternative; nothing left.
        assert ours_detach["probes"] == []
        assert "error" not in ours_detach, ours_detach
        assert ours_detach["sessions"] == []
        assert ours_detach["records"] == {}
        assert _node_writes(ours_detach) == [t.portals["live"]]
        assert stock_detach["records"] == {}

    def test_stock_detach_leaks_what_ours_removes(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        """Why detach names every candidate: stock os-brick, given the same properties, looks
        only at the main portal and leaves the alternative's session and record behind."""
        t = brick_target
        props = _props(t, "dead", "live")
        connect, stock_detach, ours_detach = run(
            tmp_path,
            t,
            [
                {"op": "connect", "props": props},
                {"op": "disconnect", "connector": "stock", "props": props},
                {"op": "disconnect", "props": props},
            ],
        )
        assert list(connect["records"]) == [_key(t, "live")]
        assert stock_detach["sessions"] == [_key(t, "live")]
        assert list(stock_detach["records"]) == [_key(t, "live")]
        assert ours_detach["sessions"] == []
        assert ours_detach["records"] == {}

    def test_single_path_plural_form_falls_back_in_os_brick_order(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        """``target_portals`` form: dead ones dropped, chosen first, the rest after it. The
        kernel cannot reach the chosen portal here, so os-brick itself moves on to the next
        one, cleaning each failed record up as it does.

        The probe stops at the first candidate that works in order, so a later candidate may
        be undecided (cancelled) rather than dead, and os-brick is then allowed to try it."""
        t = brick_target
        names = ("dead", "live", "refused", "live2")
        props = _plural(t, *names)
        (connect, detach) = run(
            tmp_path,
            t,
            [{"op": "connect", "props": props}, {"op": "disconnect", "props": props}],
            kernel_live=("live2",),
        )
        assert "error" not in connect, connect
        (probe,) = connect["probes"]
        assert probe["outcomes"][:2] == ["timeout", "ok"]
        assert probe["outcomes"][2] in ("refused", "cancelled")
        tried = (
            ["live", "live2"] if probe["outcomes"][2] == "refused" else ["live", "refused", "live2"]
        )
        assert connect["logins"] == [[t.portals[name], t.iqn] for name in tried]
        assert _node_writes(connect) == sorted(t.portals[name] for name in tried)
        assert list(connect["records"]) == [_key(t, "live2")]
        assert detach["records"] == {}
        assert detach["sessions"] == []

    def test_multipath_logs_in_to_the_healthy_portals(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        t = brick_target
        props = _plural(t, "dead", "live", "refused", "live2")
        connect, extend, detach = run(
            tmp_path,
            t,
            [
                {"op": "connect", "props": props},
                {"op": "extend", "props": props},
                {"op": "disconnect", "props": props},
            ],
            multipath=True,
        )
        assert "error" not in connect, connect
        assert connect["result"]["path"] == "/dev/dm-7"
        assert sorted(map(tuple, connect["logins"])) == sorted(
            [(t.portals["live"], t.iqn), (t.portals["live2"], t.iqn)]
        )
        assert sorted(connect["records"]) == sorted([_key(t, "live"), _key(t, "live2")])
        assert _node_writes(connect) == sorted([t.portals["live"], t.portals["live2"]])
        (probe,) = connect["probes"]
        assert probe["every_candidate"] is True
        # extend looks at every candidate's path (none exists on this host, so os-brick says so)
        assert extend["error"] == "VolumePathsNotFound"
        (looked,) = extend["potential_paths"]
        assert len(looked) == 4
        assert detach["records"] == {}
        assert detach["sessions"] == []

    def test_multipath_discovery_goes_through_a_healthy_portal(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        """No ``target_portals``: os-brick discovers, through the first healthy candidate
        instead of the dead main portal, and the discovered paths the probe found dead get no
        login. Detach finds every discovered record through the discovery database and removes
        them all; stock os-brick, which looks there only for the main portal, keeps them."""
        t = brick_target
        props = _props(t, "dead", "live")
        connect, stock_detach, detach = run(
            tmp_path,
            t,
            [
                {"op": "connect", "props": props},
                {"op": "disconnect", "connector": "stock", "props": props},
                {"op": "disconnect", "props": props},
            ],
            multipath=True,
            sendtargets=("dead", "refused", "live", "live2"),
        )
        assert "error" not in connect, connect
        discoveries = [cmd for cmd in connect["commands"] if cmd[1:3] == ["-m", "discovery"]]
        assert [cmd[cmd.index("-p") + 1] for cmd in discoveries] == [t.portals["live"]]
        logged_in = sorted(portal for portal, _ in connect["logins"])
        # "refused" is not a candidate, so the probe knows nothing of it: os-brick tries it.
        assert logged_in == sorted([t.portals["live"], t.portals["live2"], t.portals["refused"]])
        assert t.portals["dead"] not in logged_in
        assert any("left out" in r["message"] for r in connect["logged"])
        # discovery made a record per discovered portal, as iscsiadm does
        assert len(connect["records"]) == 4
        assert connect["sessions"] == sorted([_key(t, "live"), _key(t, "live2")])
        # stock detach finds nothing in the discovery database for the main portal, so it
        # removes only the main portal's record and keeps every session it did not look for
        kept = sorted([_key(t, "live"), _key(t, "live2"), _key(t, "refused")])
        assert sorted(stock_detach["records"]) == kept
        assert stock_detach["sessions"] == connect["sessions"]
        assert detach["records"] == {}
        assert detach["sessions"] == []

    def test_no_working_candidate_raises_before_any_record(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        t = brick_target
        wrong_iqn = {**_single(t, "live"), "target_iqn": t.iqn + "-missing"}
        steps: list[dict[str, Any]] = [
            {"op": "connect", "props": _props(t, "dead", "refused")},
            {"op": "connect", "props": wrong_iqn},
            {"op": "connect", "props": {**_single(t, "live"), "auth_password": "Wrong-9x-secret"}},
        ]
        for multipath in (False, True):
            for step, asked in zip(
                run(tmp_path, t, steps, multipath=multipath), steps, strict=True
            ):
                props = asked["props"]
                assert step["error"] == "TargetPortalsNotFound", step
                expected = [props["target_portal"], *props.get("target_alternative_portals", [])]
                assert step["error_kwargs"] == {"target_portals": expected}
                assert step["logins"] == []
                assert _node_writes(step) == []
                assert step["records"] == {}
                assert any("no portal of this volume works" in r["message"] for r in step["logged"])

    def test_a_probe_without_verdict_leaves_the_attach_to_os_brick(
        self, tmp_path: Path, brick_target: ServedTarget
    ) -> None:
        """The probe's interpreter crashes, hangs past the deadline, the properties are
        something our parser refuses (a LUN above 16383 under SAM, which os-brick passes on),
        or os-brick cannot read the host's initiator name (a probe under another name would be
        refused by every ACL): a warning, then stock os-brick with the properties as given."""
        t = brick_target
        crash = tmp_path / "crash"
        crash.write_text("#!/bin/sh\ncat >/dev/null\necho 'Fatal Python error' >&2\nexit 1\n")
        crash.chmod(0o755)
        hang = tmp_path / "hang"
        hang.write_text("#!/bin/sh\nexec sleep 60\n")
        hang.chmod(0o755)
        props = _props(t, "live", "dead")
        cases: list[tuple[dict[str, str], dict[str, Any], str, str | None]] = [
            ({"PYISCSI_FAILOVER_PYTHON": str(crash)}, props, "Fatal Python error", ""),
            (
                {"PYISCSI_FAILOVER_PYTHON": str(hang), "PYISCSI_FAILOVER_PROBE_TIMEOUT": "1"},
                props,
                "did not finish within 1 s",
                "",
            ),
            ({}, {**_single(t, "live"), "target_lun": 16640}, "cannot read them", ""),
            ({}, props, "initiator name could not be read", None),
        ]
        for env, case_props, reason, initiator in cases:
            connect, detach = run(
                tmp_path,
                t,
                [{"op": "connect", "props": case_props}, {"op": "disconnect", "props": case_props}],
                env=env,
                initiator=initiator,
            )
            if initiator is None:
                assert connect["probes"] == []  # no probe under a guessed name
            warnings = [r["message"] for r in connect["logged"] if r["level"] == "WARNING"]
            assert any("no probe for this attach" in m and reason in m for m in warnings), warnings
            # stock os-brick: the main portal's record and login (it is reachable here)
            assert connect["logins"][0] == [t.portals["live"], case_props["target_iqn"]]
            assert list(connect["records"]) == [_key(t, "live")]
            assert "error" not in connect, connect
            assert detach["records"] == {}

    def test_install_replaces_iscsi_only_and_the_pth_hook(self, tmp_path: Path) -> None:
        """The ``.pth`` line, in a site directory of a fresh interpreter: with the variable set,
        importing os-brick's connector module after monkey patching installs ours on every
        architecture for ``ISCSI`` and leaves ``ISER`` alone; without it nothing changes."""
        pth = Path(__file__).parents[1] / "contrib" / "os-brick" / "pyiscsi-failover-os-brick.pth"
        site_dir = tmp_path / "site"
        site_dir.mkdir()
        (site_dir / pth.name).write_text(pth.read_text())
        code = (
            "import site, sys, warnings\n"
            "warnings.simplefilter('ignore')\n"
            f"site.addsitedir({str(site_dir)!r})\n"
            "early = 'os_brick' in sys.modules\n"
            "import eventlet; eventlet.monkey_patch()\n"
            "from os_brick.initiator import connector as c\n"
            "m = {a: c.get_connector_mapping(a) for a in ('x86_64', 's390x', 'ppc64le')}\n"
            "built = c.InitiatorConnector.factory('iscsi', 'sudo')\n"
            "iser = c.InitiatorConnector.factory('ISER', 'sudo')\n"
            "import json\n"
            "print(json.dumps({'early': early, 'iscsi': {a: v['ISCSI'] for a, v in m.items()},\n"
            "  'iser': m['ppc64le']['ISER'], 'built': type(built).__name__,\n"
            "  'iser_built': type(iser).__name__, 'iser_transport': iser.transport,\n"
            "  'loaded': [x for x in ('trio', 'construct') if x in sys.modules]}))\n"
        )
        ours = "pyiscsi_failover.os_brick.connector.FailoverISCSIConnector"
        stock = "os_brick.initiator.connectors.iscsi.ISCSIConnector"
        for value, expected in (("1", ours), ("0", stock), (None, stock)):
            env = {k: v for k, v in os.environ.items() if k != "PYISCSI_FAILOVER_OS_BRICK"}
            if value is not None:
                env["PYISCSI_FAILOVER_OS_BRICK"] = value
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            out = json.loads(done.stdout)
            assert out["early"] is False  # the hook imports no os-brick at start-up
            assert out["iscsi"] == dict.fromkeys(("x86_64", "s390x", "ppc64le"), expected)
            assert out["iser"] == stock
            assert out["built"] == expected.rpartition(".")[2]
            assert out["iser_built"] == "ISCSIConnector"
            assert out["iser_transport"] == "iser"
            assert out["loaded"] == []
