"""The kernel scenarios: each runs in the guest and records facts; tests/test_vm_kernel.py judges.

To add one: write ``@scenario(timeout=S) async def name(ctx: ScenarioContext) -> None`` here,
record what you observe with ``ctx.fact(key, json_value)``, clean up what you changed (or
``ctx.defer`` it), and write a host test decorated ``@uses_scenarios("name")`` that asserts on
``vm_guest.facts("name")``. Scenarios run in the order they are defined, one after another, in
one guest; each must leave no iSCSI session and no node record behind (the runner checks).

Import here whatever a scenario needs, at the top: the host byte-compiles what this module
imports, and a module first imported in the guest is compiled there, slowly.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import trio

from pyiscsi_failover.connection_info import parse_connection_info
from pyiscsi_failover.prober import Check, ProbeOptions, probe
from pyiscsi_failover.testing import Blackhole, PortalConfig, TargetConfig, TargetSpec, serve_target
from vm.guest import ScenarioContext, ScenarioError, scenario

__all__ = ["attach_cli_main_blackholed", "kernel_login", "runner_self_check"]

_MIB = 1024 * 1024
_BY_PATH = Path("/dev/disk/by-path")
_BY_ID = Path("/dev/disk/by-id")
_DEVICE_SECONDS = 30.0


def by_path_link(portal: str, iqn: str, lun: int) -> Path:
    """udev's name for an iSCSI disk (``path_id``), LUN in decimal below 256."""
    return _BY_PATH / f"ip-{portal}-iscsi-{iqn}-lun-{lun}"


def _present(*paths: Path) -> bool:
    return any(path.exists() for path in paths)


def _sha256_prefix(path: Path, size: int) -> str:
    with path.open("rb") as handle:
        return hashlib.sha256(handle.read(size)).hexdigest()


def _direct_io_roundtrip(device: Path, size: int) -> tuple[str, str]:
    """Write ``size`` random bytes at offset 0 with O_DIRECT, read them back the same way;
    return the SHA-256 of what was written and of what came back."""
    written = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    readback = mmap.mmap(-1, size)
    written.write(os.urandom(size))
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        if os.pwrite(fd, written, 0) != size:
            raise ScenarioError(f"short direct write to {device}")
        os.fsync(fd)
        if os.preadv(fd, [readback], 0) != size:
            raise ScenarioError(f"short direct read from {device}")
    finally:
        os.close(fd)
    return hashlib.sha256(written).hexdigest(), hashlib.sha256(readback).hexdigest()


def _disk_facts(ctx: ScenarioContext, link: Path, prefix: str) -> Path:
    """Record what the kernel and udev show for the disk behind ``link``; return /dev/sdX."""
    device = link.resolve()
    ctx.fact(f"{prefix}device", str(device))
    sysfs = Path("/sys/block") / device.name
    ctx.fact(f"{prefix}size_bytes", int((sysfs / "size").read_text()) * 512)
    ctx.fact(f"{prefix}wwid", (sysfs / "device" / "wwid").read_text().strip())
    ctx.fact(f"{prefix}vendor", (sysfs / "device" / "vendor").read_text().strip())
    ctx.fact(f"{prefix}model", (sysfs / "device" / "model").read_text().strip())
    by_id = sorted(p.name for p in _BY_ID.glob("*") if p.resolve() == device)
    ctx.fact(f"{prefix}by_id", by_id)
    return device


async def _sessions(ctx: ScenarioContext) -> list[str]:
    done = await ctx.sh("iscsiadm", "-m", "session", ok=(0, 21))
    return done.stdout.splitlines() if done.returncode == 0 else []


async def _records(ctx: ScenarioContext) -> list[str]:
    done = await ctx.sh("iscsiadm", "-m", "node", ok=(0, 21))
    return done.stdout.splitlines() if done.returncode == 0 else []


@scenario(timeout=2)
async def runner_self_check(ctx: ScenarioContext) -> None:
    """The runner's own guarantees, first so that the next scenarios show they hold: a
    scenario that overruns its deadline is stopped and keeps the facts it recorded, and a node
    record it leaves behind is reported and removed before the next scenario starts."""
    ctx.fact("before_the_hang", True)
    await ctx.sh(
        "iscsiadm", "-m", "node", "-o", "new", "-T", LEFT_BEHIND_IQN, "-p", LEFT_BEHIND_PORTAL
    )
    await trio.sleep_forever()  # until the runner's deadline for this scenario


#: The node record :func:`runner_self_check` leaves behind on purpose (never logged in to).
LEFT_BEHIND_IQN = "iqn.2026-12.org.pyiscsi-failover.vm:left-behind"
LEFT_BEHIND_PORTAL = "127.0.0.9:3260"


@scenario(timeout=90)
async def kernel_login(ctx: ScenarioContext) -> None:
    """open-iscsi by hand against tgtd: discovery, login, the by-path disk, direct I/O,
    logout; our prober's LUN check on the same LU, for the WWID and size it predicts."""
    iqn = "iqn.2026-12.org.pyiscsi-failover.vm:kernel-login"
    size = 64 * _MIB
    target = await ctx.target(iqn, tid=1, luns={1: size})
    portal = target.portal
    ctx.fact("tid", target.tid)
    ctx.fact("backing_bytes", target.backing[1].stat().st_size)

    info = parse_connection_info({"target_portal": portal, "target_iqn": iqn, "target_lun": 1})
    probed = await probe(info, ProbeOptions(check=Check.LUN))
    ctx.fact("probe", probed.to_json())
    ctx.note(f"probe: {json.dumps(probed.to_json()['attempts'])}")

    discovered = await ctx.sh("iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal)
    ctx.fact("discovered", discovered.stdout.splitlines())
    ctx.defer(lambda: _forget(ctx, iqn))
    await ctx.sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login")
    link = by_path_link(portal, iqn, 1)
    with trio.move_on_after(_DEVICE_SECONDS):
        await ctx.until(link.exists, what=f"{link} appears")
    if not link.exists():
        raise ScenarioError(f"logged in, but {link} did not appear within {_DEVICE_SECONDS:g} s")
    await ctx.sh("udevadm", "settle", "-t", "20")
    device = _disk_facts(ctx, link, "kernel_")
    ctx.fact("sessions_while_attached", await _sessions(ctx))

    written, readback = await trio.to_thread.run_sync(_direct_io_roundtrip, device, _MIB)
    ctx.fact("written_sha256", written)
    ctx.fact("read_sha256", readback)

    await ctx.sh("udevadm", "settle", "-t", "20")  # a logout racing udev's probe logs I/O errors
    await ctx.sh("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout")
    with trio.move_on_after(_DEVICE_SECONDS):
        await ctx.until(lambda: not _present(link, device), what=f"{link} and {device} gone")
    ctx.fact("gone_after_logout", not _present(link, device))
    ctx.fact("sessions_after_logout", await _sessions(ctx))
    # What the target stored: the kernel's write went all the way to tgtd's backing file.
    ctx.fact("backing_sha256", _sha256_prefix(target.backing[1], _MIB))


async def _forget(ctx: ScenarioContext, iqn: str) -> None:
    """Delete the node records discovery made for ``iqn`` (every portal)."""
    await ctx.sh("iscsiadm", "-m", "node", "-T", iqn, "-o", "delete", ok=(0, 21))


@scenario(timeout=120)
async def attach_cli_main_blackholed(ctx: ScenarioContext) -> None:
    """``python -m pyiscsi_failover attach`` with the main portal blackholed and tgtd as the
    alternative, then ``detach``: the disk comes and goes, and nothing of ours is left."""
    iqn = "iqn.2026-12.org.pyiscsi-failover.vm:attach-cli"
    target = await ctx.target(iqn, tid=2, luns={1: 32 * _MIB})
    blackholed = "127.0.0.2:3260"
    connection_info = {
        "driver_volume_type": "iscsi",
        "data": {
            "target_portal": blackholed,
            "target_iqn": iqn,
            "target_lun": 1,
            "target_alternative_portals": [target.portal],
            "target_alternative_iqns": [iqn],
            "target_alternative_luns": [1],
        },
    }
    info_file = ctx.work / "connection_info.json"
    info_file.write_text(json.dumps(connection_info))
    ledger_dir = Path("/run/pyiscsi-failover-vm") / ctx.name
    ledger_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ledger = ledger_dir / "created-records.json"
    ctx.fact("backing_bytes", target.backing[1].stat().st_size)
    ctx.fact("alternative_portal", target.portal)
    ctx.fact("main_portal", blackholed)

    config = TargetConfig(
        portals=(PortalConfig(host="127.0.0.2", port=3260, name="main", faults=(Blackhole(),)),),
        targets=(TargetSpec(name=iqn),),
    )
    cli = [ctx.python, "-m", "pyiscsi_failover"]
    common = ["-c", str(info_file), "--json", "--state-file", str(ledger)]
    async with serve_target(config):
        attached = await ctx.sh(
            *cli,
            "attach",
            *common,
            "--check",
            "lun",
            "--device-timeout",
            "30",
            check=False,
        )
    ctx.fact("attach_status", attached.returncode)
    ctx.fact("attach_stderr", attached.stderr)
    ctx.fact("attach_seconds", attached.elapsed_s)
    try:
        ctx.fact("attach", json.loads(attached.stdout))
    except ValueError:
        ctx.fact("attach", None)
        ctx.fact("attach_stdout", attached.stdout)
    link = by_path_link(target.portal, iqn, 1)
    ctx.fact("link_after_attach", link.exists())
    if link.exists():
        await ctx.sh("udevadm", "settle", "-t", "20")
        _disk_facts(ctx, link, "kernel_")
    ctx.fact("sessions_after_attach", await _sessions(ctx))
    ctx.fact("records_after_attach", await _records(ctx))

    detached = await ctx.sh(*cli, "detach", *common, check=False)
    ctx.fact("detach_status", detached.returncode)
    ctx.fact("detach_stderr", detached.stderr)
    try:
        ctx.fact("detach", json.loads(detached.stdout))
    except ValueError:
        ctx.fact("detach", None)
        ctx.fact("detach_stdout", detached.stdout)
    if "kernel_device" in ctx.facts:
        device = Path(ctx.facts["kernel_device"])
        with trio.move_on_after(_DEVICE_SECONDS):
            await ctx.until(lambda: not _present(link, device), what=f"{link} and {device} gone")
        ctx.fact("gone_after_detach", not _present(link, device))
    ctx.fact("sessions_after_detach", await _sessions(ctx))
    ctx.fact("records_after_detach", await _records(ctx))
    ctx.fact("ledger_after_detach", ledger.read_text() if ledger.exists() else None)
