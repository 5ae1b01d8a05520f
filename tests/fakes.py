"""The fake iscsiadm (tests/fake_iscsiadm) as a fixture: one installation per test, in tmp_path.

conftest.py imports the ``fake`` fixture from here, so every test module can ask for it.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyiscsi_failover.iscsiadm import Iscsiadm, NodeTarget, by_path_name

FAKE = Path(__file__).parent / "fake_iscsiadm" / "iscsiadm"


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
