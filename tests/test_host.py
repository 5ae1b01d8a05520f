"""The host's InitiatorName: open-iscsi's file when present, a derived name otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyiscsi_failover.host import FALLBACK_PREFIX, default_initiator_name, read_initiator_name
from pyiscsi_failover.names import validate_iscsi_name


def test_reads_open_iscsi_file(tmp_path: Path) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_text("## DO NOT EDIT\n  InitiatorName=iqn.1993-08.org.debian:01:ABCDEF  \n")
    assert read_initiator_name(path) == "iqn.1993-08.org.debian:01:abcdef"
    assert default_initiator_name(path) == "iqn.1993-08.org.debian:01:abcdef"


@pytest.mark.parametrize(
    "content", ["", "# only a comment\n", "InitiatorName=not a name\n", "InitiatorName=\n"]
)
def test_unusable_file_falls_back_to_a_valid_derived_name(tmp_path: Path, content: str) -> None:
    path = tmp_path / "initiatorname.iscsi"
    path.write_text(content)
    assert read_initiator_name(path) is None
    name = default_initiator_name(path)
    assert name.startswith(FALLBACK_PREFIX + ":")
    assert validate_iscsi_name(name) == name


def test_missing_file(tmp_path: Path) -> None:
    assert read_initiator_name(tmp_path / "absent") is None
    assert default_initiator_name(tmp_path / "absent").startswith(FALLBACK_PREFIX)
