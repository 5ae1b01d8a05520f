"""The scenario runner for ``tests/test_os_brick_real.py`` (a script; it holds no test).

``python tests/test_os_brick_runner.py < spec.json`` calls ``eventlet.monkey_patch()`` first, as
Nova and Cinder do, then imports os-brick and our connector, builds the connector through
os-brick's own factory (after :func:`pyiscsi_failover.os_brick.install`, or stock), runs the
spec's steps (``connect``, ``paths``, ``extend``, ``disconnect``) and prints one JSON report:
per step, the result or exception, the commands os-brick ran (CHAP secrets masked), the logins
it attempted, our IQN's node records in the real node database afterwards, the log lines, the
probe runs and how far a greenthread ticked meanwhile. It runs in its own interpreter because
monkey patching must come first and does not agree with pytest.

What is real and what is faked, on a host with open-iscsi's ``iscsiadm`` but no ``iscsid`` and
no ``iscsi_tcp`` kernel module (so no kernel login can happen here):

* real: os-brick 7.1.1's connector code, its locks (oslo.concurrency file locks in the spec's
  directory) and retries; our connector; the probe child and its logins to the test target;
  and every node-database command os-brick issues (``iscsiadm -m node`` show/new/update/delete
  and the node list), run by the real iscsiadm against the host's /etc/iscsi/nodes.
* faked, in the executor injected through os-brick's ``execute=`` (:class:`FakeKernel`): the
  kernel's part, i.e. ``iscsiadm --login``/``--logout`` (a login succeeds only at portals the
  spec lists as reachable by the kernel, and only where the node record exists, as with
  iscsiadm) and ``iscsiadm -m session``; SendTargets discovery (``-m discovery``: answered with
  the spec's portals, whose node records are made with the real iscsiadm, as iscsiadm's
  discovery does) and ``-m discoverydb -o show``; ``multipathd``/``multipath``; and the
  initiator name file (``cat /etc/iscsi/initiatorname.iscsi``). Device appearance
  (``get_hctl``, ``scan_iscsi``, ``device_name_by_hctl``, the WWN, the multipath device) is
  faked on the connector's ``_linuxscsi``.

For the kernel VM (tests/vm/), :func:`build_connector` with a real ``execute`` (os-brick's
default) is the connector an end-to-end scenario needs.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from typing import Any

ISCSIADM = "iscsiadm"

#: Node settings compared between our connector's records and stock os-brick's.
RECORD_KEYS = (
    "node.name",
    "node.tpgt",
    "node.startup",
    "node.session.scan",
    "node.session.auth.authmethod",
    "node.session.auth.username",
    "node.session.auth.password",
    "node.conn[0].address",
    "node.conn[0].port",
    "iface.iscsi_ifacename",
    "iface.transport_name",
)


# ============================================================================================
# The scenario runner (a child interpreter: python tests/test_os_brick_real.py < spec.json)


class FakeKernel:
    """The executor handed to os-brick: real iscsiadm for the node database, fakes for the
    kernel's part (see the module docstring). Records every command, secrets masked."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from oslo_concurrency import processutils

        self.putils = processutils
        self.iscsiadm: str = spec["iscsiadm"]
        self.initiator: str | None = spec["initiator"]  # None: the file cannot be read
        self.kernel_live: set[str] = set(spec["kernel_live"])
        self.sendtargets: list[list[str]] = spec.get("sendtargets", [])
        self.multipathd: bool = spec.get("multipath", False)
        self.sessions: dict[tuple[str, str], int] = {}
        self.next_sid = 1
        self.discovered: dict[str, list[tuple[str, str]]] = {}
        self.commands: list[list[str]] = []
        self.logins: list[list[str]] = []
        self.scans: list[list[str]] = []

    # -- helpers --------------------------------------------------------------------------

    def _fail(self, cmd: list[str], code: int, out: str, err: str, check: Any) -> tuple[str, str]:
        if check is False or (isinstance(check, (list, tuple)) and code in check):
            return out, err
        raise self.putils.ProcessExecutionError(
            exit_code=code, stdout=out, stderr=err, cmd=" ".join(_masked(cmd))
        )

    def _option(self, cmd: list[str], *names: str) -> str:
        for name in names:
            if name in cmd:
                return cmd[cmd.index(name) + 1]
        raise AssertionError(f"no {names} in {_masked(cmd)}")

    def real(self, cmd: list[str], **kwargs: Any) -> tuple[str, str]:
        kwargs.pop("root_helper", None)
        kwargs.pop("run_as_root", None)
        if cmd[0] == ISCSIADM:
            cmd = [self.iscsiadm, *cmd[1:]]
        out, err = self.putils.execute(*cmd, **kwargs)
        return str(out), str(err)

    # -- the executor ---------------------------------------------------------------------

    def __call__(self, *raw: Any, **kwargs: Any) -> tuple[str, str]:
        cmd = [str(part) for part in raw]
        self.commands.append(_masked(cmd))
        check = kwargs.get("check_exit_code", 0)
        if check is True or check == 0:
            check = [0]
        elif isinstance(check, int) and not isinstance(check, bool):
            check = [check]
        if cmd == ["cat", "/etc/iscsi/initiatorname.iscsi"]:
            if self.initiator is None:
                return self._fail(cmd, 1, "", "cat: Permission denied\n", check)
            return f"## fake\nInitiatorName={self.initiator}\n", ""
        if cmd[:3] == ["multipathd", "show", "status"]:
            if self.multipathd:
                return "path checker states:\n", ""
            return self._fail(cmd, 1, "", "multipathd not running", check)
        if cmd[0] == "multipath":
            return "", ""
        if cmd[0] != "iscsiadm":
            raise AssertionError(f"os-brick ran something the test does not expect: {cmd[:3]}")
        if cmd[1:3] == ["-m", "session"]:
            if not self.sessions:
                return self._fail(cmd, 21, "", "iscsiadm: No active sessions.\n", check)
            lines = [
                f"tcp: [{sid}] {portal},1 {iqn} (non-flash)"
                for (portal, iqn), sid in sorted(self.sessions.items(), key=lambda kv: kv[1])
            ]
            return "\n".join(lines) + "\n", ""
        if "--login" in cmd:
            return self._login(cmd, check)
        if "--logout" in cmd:
            return self._logout(cmd, check)
        if cmd[1:3] == ["-m", "discovery"] or (
            cmd[1:3] == ["-m", "discoverydb"] and "--discover" in cmd
        ):
            return self._discover(cmd)
        if cmd[1:3] == ["-m", "discoverydb"] and "show" in cmd:
            return self._discoverydb_show(), ""
        if cmd[1:3] == ["-m", "node"]:
            return self.real(cmd, **{**kwargs, "check_exit_code": check})
        raise AssertionError(f"os-brick ran an iscsiadm command the test does not expect: {cmd}")

    def _login(self, cmd: list[str], check: Any) -> tuple[str, str]:
        portal = self._option(cmd, "-p").split(",")[0]
        iqn = self._option(cmd, "-T")
        self.logins.append([portal, iqn])
        shown = self.real([ISCSIADM, "-m", "node", "-T", iqn, "-p", portal], check_exit_code=False)
        if not shown[0]:  # iscsiadm logs in only where a record exists
            return self._fail(cmd, 21, "", "iscsiadm: No records found\n", check)
        if portal not in self.kernel_live:
            err = (
                f"iscsiadm: Could not login to [iface: default, target: {iqn}, portal: {portal}]."
                "\niscsiadm: initiator reported error (8 - connection timed out)\n"
            )
            return self._fail(cmd, 8, "", err, check)
        if (portal, iqn) not in self.sessions:
            self.sessions[(portal, iqn)] = self.next_sid
            self.next_sid += 1
        return f"Login to [iface: default, target: {iqn}, portal: {portal}] successful.\n", ""

    def _logout(self, cmd: list[str], check: Any) -> tuple[str, str]:
        portal = self._option(cmd, "-p").split(",")[0]
        iqn = self._option(cmd, "-T")
        if self.sessions.pop((portal, iqn), None) is None:
            return self._fail(cmd, 21, "", "iscsiadm: No matching sessions found\n", check)
        return f"Logout of [sid: x, target: {iqn}, portal: {portal}] successful.\n", ""

    def _discover(self, cmd: list[str]) -> tuple[str, str]:
        address = self._option(cmd, "-p")
        found: list[tuple[str, str]] = []
        lines = []
        for portal, iqn in self.sendtargets:
            # As iscsiadm's discovery: one node record per portal, with the portal group tag.
            self.real(
                [
                    ISCSIADM,
                    "-m",
                    "node",
                    "-T",
                    iqn,
                    "-p",
                    f"{portal},1",
                    "-I",
                    "default",
                    "--op",
                    "new",
                ]
            )
            found.append((portal, iqn))
            lines.append(f"{portal},1 {iqn}")
        self.discovered[address] = found
        return "\n".join(lines) + "\n", ""

    def _discoverydb_show(self) -> str:
        out = ["SENDTARGETS:"]
        for address, found in self.discovered.items():
            host, port = address.rsplit(":", 1)
            out.append(f"DiscoveryAddress: {host},{port}")
            for portal, iqn in found:
                out += [f"Target: {iqn}", f"\tPortal: {portal},1", "\t\tIface Name: default"]
        out += ["iSNS:", "No targets found.", "STATIC:", "No targets found."]
        out += ["FIRMWARE:", "No targets found."]
        return "\n".join(out) + "\n"

    # -- devices (on the connector's _linuxscsi) ------------------------------------------

    def fake_devices(self, connector: Any) -> None:
        scsi = connector._linuxscsi

        def by_sid(sid: object) -> tuple[str, str] | None:
            return next(
                (key for key, value in self.sessions.items() if str(value) == str(sid)), None
            )

        def get_hctl(session: str, lun: Any) -> tuple[str, str, str, str] | None:
            return (
                None if by_sid(session) is None else (str(100 + int(session)), "0", "0", str(lun))
            )

        def scan_iscsi(*hctl: Any) -> None:
            self.scans.append([str(part) for part in hctl])

        def device_name_by_hctl(session: str, hctl: Any) -> str | None:
            return None if by_sid(session) is None else f"sd{chr(ord('a') + int(session))}"

        scsi.get_hctl = get_hctl
        scsi.scan_iscsi = scan_iscsi
        scsi.device_name_by_hctl = device_name_by_hctl
        scsi.get_sysfs_wwn = lambda devices, mpath=None: "36001405aabbccddeeff00112233445566"
        scsi.find_sysfs_multipath_dm = lambda devices: (
            "dm-7" if self.multipathd and devices else None
        )
        scsi.multipath_add_wwid = lambda wwid: True
        scsi.multipath_add_path = lambda path: None
        scsi.wait_for_mpath_device = lambda mpath: None


def _masked(cmd: list[str]) -> list[str]:
    """A command with every value set for a password key replaced by ***."""
    out = list(cmd)
    for i, part in enumerate(cmd):
        if part == "-n" and i + 3 < len(cmd) and "password" in cmd[i + 1] and cmd[i + 2] == "-v":
            out[i + 3] = "***"
    return out


def _records(iscsiadm: str, iqns: list[str]) -> dict[str, dict[str, str]]:
    """Our IQNs' node records in the real node database: ``"portal iqn"`` -> chosen settings."""
    done = subprocess.run([iscsiadm, "-m", "node"], capture_output=True, text=True, check=False)
    records: dict[str, dict[str, str]] = {}
    wanted = {iqn.lower() for iqn in iqns}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[1].lower() not in wanted:
            continue
        portal = parts[0].split(",")[0]
        shown = subprocess.run(
            [iscsiadm, "-m", "node", "-T", parts[1], "-p", portal],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        values = {}
        for row in shown.splitlines():
            key, _, value = row.partition(" = ")
            if key in RECORD_KEYS:
                values[key] = value.strip()
        records[f"{portal} {parts[1]}"] = values
    return records


def build_connector(kind: str, *, multipath: bool, execute: Any) -> Any:
    """os-brick's connector factory, as Nova calls it, after our install() (for ``ours``)."""
    from os_brick.initiator import connector as brick_connector

    from pyiscsi_failover.os_brick import install, uninstall

    if kind == "ours":
        assert install() >= 1
    else:
        uninstall()
    return brick_connector.InitiatorConnector.factory(
        "ISCSI", "sudo", use_multipath=multipath, execute=execute, transport="default"
    )


def run_scenario(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    import eventlet
    import os_brick
    from oslo_config import cfg

    from pyiscsi_failover.os_brick import connector as ours
    from pyiscsi_failover.os_brick import probe

    cfg.CONF([], project="pyiscsi-failover-test", default_config_files=[])
    os_brick.setup(cfg.CONF)
    cfg.CONF.set_override("lock_path", spec["lock_dir"], group="os_brick")

    logged: list[dict[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith("pyiscsi_failover") or record.levelno >= logging.WARNING:
                logged.append(
                    {
                        "logger": record.name,
                        "level": record.levelname,
                        "message": record.getMessage(),
                    }
                )

    root = logging.getLogger()
    root.addHandler(Keep())
    root.setLevel(logging.INFO)

    ticks = [0]

    def ticker() -> None:
        while True:
            ticks[0] += 1
            eventlet.sleep(0.01)

    eventlet.spawn(ticker)

    probes: list[dict[str, Any]] = []
    real_run_probe = probe.run_probe

    def counting_run_probe(*args: Any, **kwargs: Any) -> Any:
        before = ticks[0]
        started = time.monotonic()
        outcomes: list[str] = []
        try:
            verdict = real_run_probe(*args, **kwargs)
            outcomes = [row.outcome for row in verdict.rows]
            return verdict
        finally:
            probes.append(
                {
                    "initiator_name": kwargs.get("initiator_name"),
                    "every_candidate": kwargs.get("every_candidate"),
                    "outcomes": outcomes,
                    "ticks": ticks[0] - before,
                    "seconds": time.monotonic() - started,
                }
            )

    vars(ours)["run_probe"] = counting_run_probe  # the name the connector calls
    for key, value in spec.get("env", {}).items():
        os.environ[key] = value

    kernel = FakeKernel(spec)
    steps = []
    for step in spec["steps"]:
        connector = build_connector(
            step.get("connector", "ours"), multipath=spec.get("multipath", False), execute=kernel
        )
        kernel.fake_devices(connector)
        potential: list[list[str]] = []
        real_potential = connector._get_potential_volume_paths

        def spy(props: Any, real: Any = real_potential, into: Any = potential) -> Any:
            paths = real(props)
            into.append(sorted(paths))
            return paths

        connector._get_potential_volume_paths = spy
        kernel.commands.clear()
        kernel.logins.clear()
        logged.clear()
        probes.clear()
        props = step["props"]
        before = copy.deepcopy(props)
        outcome: dict[str, Any] = {"op": step["op"], "connector": type(connector).__name__}
        started = time.monotonic()
        try:
            if step["op"] == "connect":
                outcome["result"] = connector.connect_volume(props)
            elif step["op"] == "disconnect":
                connector.disconnect_volume(props, step.get("device_info"), force=False)
            elif step["op"] == "paths":
                outcome["result"] = connector.get_volume_paths(props)
            elif step["op"] == "extend":
                outcome["result"] = connector.extend_volume(props)
            else:
                raise AssertionError(step["op"])
        except Exception as exc:
            outcome["error"] = type(exc).__name__
            outcome["error_kwargs"] = {
                key: value for key, value in getattr(exc, "kwargs", {}).items() if key != "code"
            }
            outcome["error_text"] = str(exc)
        outcome["seconds"] = time.monotonic() - started
        outcome["props_untouched"] = props == before
        outcome["commands"] = [list(cmd) for cmd in kernel.commands]
        outcome["logins"] = [list(login) for login in kernel.logins]
        outcome["sessions"] = sorted(f"{p} {i}" for p, i in kernel.sessions)
        outcome["records"] = _records(spec["iscsiadm"], spec["iqns"])
        outcome["logged"] = list(logged)
        outcome["probes"] = list(probes)
        outcome["potential_paths"] = potential
        steps.append(outcome)
    return {
        "steps": steps,
        "loaded": sorted(m for m in ("trio", "construct") if m in sys.modules),
        "patched": bool(eventlet.patcher.is_monkey_patched("socket")),
    }


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")  # eventlet's deprecation notice
    import eventlet

    eventlet.monkey_patch()
    spec = json.load(sys.stdin)
    report = run_scenario(spec)
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main()
