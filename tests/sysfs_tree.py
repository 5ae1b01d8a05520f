"""A small sysfs tree in a temporary directory: iSCSI sessions, their SCSI disks, and the files
the kernel would act on (``scan``, ``delete``, ``recovery_tmo``), laid out as Linux lays them out
(see pyiscsi_failover/sysfs.py). Tests read what our code wrote into those files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class FakeSysfs:
    root: Path

    def add_session(
        self,
        number: int,
        *,
        host: int,
        iqn: str,
        address: str,
        port: int,
        state: str = "LOGGED_IN",
        target: int = 0,
    ) -> None:
        device = self.root / "devices" / "platform" / f"host{host}" / f"session{number}"
        (device / f"target{host}:0:{target}").mkdir(parents=True)
        session = self.root / "class" / "iscsi_session" / f"session{number}"
        session.mkdir(parents=True)
        (session / "targetname").write_text(f"{iqn}\n")
        (session / "state").write_text(f"{state}\n")
        (session / "recovery_tmo").write_text("120\n")
        (session / "device").symlink_to(device)
        connection = self.root / "class" / "iscsi_connection" / f"connection{number}:0"
        connection.mkdir(parents=True)
        (connection / "persistent_address").write_text(f"{address}\n")
        (connection / "persistent_port").write_text(f"{port}\n")
        scan = self.root / "class" / "scsi_host" / f"host{host}"
        scan.mkdir(parents=True, exist_ok=True)
        (scan / "scan").write_text("")

    def add_disk(
        self, session: int, *, host: int, lun: int, block: str, wwid: str, target: int = 0
    ) -> None:
        device = self.root / "devices" / "platform" / f"host{host}" / f"session{session}"
        (device / f"target{host}:0:{target}" / f"{host}:0:{target}:{lun}" / "block" / block).mkdir(
            parents=True
        )
        disk = self.root / "block" / block / "device"
        disk.mkdir(parents=True)
        (disk / "wwid").write_text(f"{wwid}\n")
        (disk / "delete").write_text("")

    def written(self, *parts: str) -> str:
        return (self.root.joinpath(*parts)).read_text()
