"""What Linux's sysfs says about iSCSI sessions and their SCSI disks, and the few writes we make.

open-iscsi logs in; the kernel makes the disks. A hand-off of one LUN of a target that other
volumes share (one IQN, many LUNs) must scan that LUN only and, on detach, delete that LUN's
disk only, logging out only when no other disk of the session is left. These are the sysfs
paths for that:

* ``class/iscsi_session/sessionN/targetname`` and ``state``; ``recovery_tmo`` (writable: how
  long a session whose connection is gone waits for it before failing its commands);
* ``class/iscsi_connection/connectionN:0/persistent_address`` and ``persistent_port``;
* ``class/iscsi_session/sessionN/device`` -> ``.../hostH/sessionN``, which holds
  ``targetH:C:T/H:C:T:L/block/sdX`` for each disk;
* ``class/scsi_host/hostH/scan``: write ``"C T L"`` to scan one LUN;
* ``block/sdX/device/wwid`` (the WWID) and ``block/sdX/device/delete`` (write ``1``).

Every function takes the sysfs root (``/sys``) so that tests can build a tree of their own.
Plain, synchronous file reads and writes. Reads answer at once; a write to ``scan`` or
``delete`` returns only when the kernel is done, which waits on the target, so async callers
run those in a thread.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pyiscsi_failover.names import Portal

__all__ = [
    "SYS_ROOT",
    "KernelSession",
    "block_device_of",
    "delete_disk",
    "disk_wwid",
    "find_session",
    "scan_lun",
    "session_disks",
    "set_recovery_timeout",
]

logger = logging.getLogger(__name__)

SYS_ROOT: Final = Path("/sys")
_SESSION: Final = re.compile(r"session(\d+)")
_HOST: Final = re.compile(r"host(\d+)")
_TARGET: Final = re.compile(r"target(\d+):(\d+):(\d+)")
_DEVICE: Final = re.compile(r"(\d+):(\d+):(\d+):(\d+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelSession:
    """One iSCSI session the kernel holds: its sysfs name, target and SCSI address."""

    name: str  # "session7"
    targetname: str
    address: str
    port: int
    state: str
    host: int
    channel: int
    target: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _same_address(one: str, other: str) -> bool:
    return one.strip("[]").lower() == other.strip("[]").lower()


def _session(sys_root: Path, name: str) -> KernelSession | None:
    match = _SESSION.fullmatch(name)
    if match is None:
        return None
    number = match.group(1)
    session = sys_root / "class" / "iscsi_session" / name
    connection = sys_root / "class" / "iscsi_connection" / f"connection{number}:0"
    targetname = _read(session / "targetname")
    address = _read(connection / "persistent_address")
    port = _read(connection / "persistent_port")
    try:
        device = (session / "device").resolve(strict=True)
    except OSError:
        return None
    hosts = [m for part in device.parts if (m := _HOST.fullmatch(part))]
    targets = [m for entry in _entries(device) if (m := _TARGET.fullmatch(entry))]
    if targetname is None or address is None or port is None or not port.isdigit() or not hosts:
        return None
    host = int(hosts[-1].group(1))
    channel, target = (int(targets[0].group(2)), int(targets[0].group(3))) if targets else (0, 0)
    return KernelSession(
        name=name,
        targetname=targetname,
        address=address,
        port=int(port),
        state=_read(session / "state") or "unknown",
        host=host,
        channel=channel,
        target=target,
    )


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def find_session(portal: Portal, iqn: str, *, sys_root: Path = SYS_ROOT) -> KernelSession | None:
    """The kernel's session with target ``iqn`` at ``portal``, if there is one."""
    for name in _entries(sys_root / "class" / "iscsi_session"):
        session = _session(sys_root, name)
        if (
            session is not None
            and session.targetname == iqn
            and session.port == portal.port
            and _same_address(session.address, portal.host)
        ):
            return session
    return None


def session_disks(session: KernelSession, *, sys_root: Path = SYS_ROOT) -> dict[int, str]:
    """The session's SCSI disks: the kernel's LUN number -> block device name (``sdb``)."""
    device = sys_root / "class" / "iscsi_session" / session.name / "device"
    disks: dict[int, str] = {}
    for target in _entries(device):
        if _TARGET.fullmatch(target) is None:
            continue
        for entry in _entries(device / target):
            match = _DEVICE.fullmatch(entry)
            if match is None:
                continue
            blocks = _entries(device / target / entry / "block")
            if blocks:
                disks[int(match.group(4))] = blocks[0]
    return disks


def scan_lun(session: KernelSession, lun: int, *, sys_root: Path = SYS_ROOT) -> None:
    """Ask the kernel to scan ``lun`` of the session's target, and nothing else."""
    scan = sys_root / "class" / "scsi_host" / f"host{session.host}" / "scan"
    scan.write_text(f"{session.channel} {session.target} {lun}", encoding="ascii")


def block_device_of(device: Path) -> str:
    """``sdb`` for ``/dev/disk/by-path/...`` (a link to ``../../sdb``) or ``/dev/sdb``."""
    return os.path.basename(os.path.realpath(device))


def disk_wwid(block: str, *, sys_root: Path = SYS_ROOT) -> str | None:
    """The WWID the kernel shows for the disk (``naa.6...``), None when it shows none."""
    return _read(sys_root / "block" / block / "device" / "wwid") or None


def delete_disk(block: str, *, sys_root: Path = SYS_ROOT) -> None:
    """Remove the SCSI disk from the kernel (its session stays)."""
    (sys_root / "block" / block / "device" / "delete").write_text("1", encoding="ascii")


def set_recovery_timeout(
    session: KernelSession, seconds: int, *, sys_root: Path = SYS_ROOT
) -> None:
    """Shorten how long a session whose portal is gone waits before it fails (``recovery_tmo``,
    open-iscsi's replacement timeout), so that a logout from a dead portal ends."""
    path = sys_root / "class" / "iscsi_session" / session.name / "recovery_tmo"
    path.write_text(str(seconds), encoding="ascii")
