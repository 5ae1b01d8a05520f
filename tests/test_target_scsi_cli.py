"""The test target's command line for LUNs: ``--lun [IQN=]LUN[,KEY=VALUE...]``, the ``lun``
lines before ``ready``, and a backing file the process serves (and the error when it cannot);
SCSI faults (``--fault NAME=FAULT[@LUN,...]``) and the process serving them to our probe.
"""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from peers import unique_loopback

from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.prober import Check, Outcome, ProbeOptions, probe
from pyiscsi_failover.testing import (
    Fault,
    FaultKind,
    HideFromIsid,
    IsidMatch,
    LunMissing,
    LunSpec,
    NotReady,
    RefuseIsid,
    Standby,
)
from pyiscsi_failover.testing.__main__ import build_parser, load_config, run
from pyiscsi_failover.testing.config import default_wwid

A = "iqn.2024-01.com.example:a"
B = "iqn.2024-01.com.example:b"
WWID = "6" + "0123456789abcdef" * 2
WWID = WWID[:32]
READY_DEADLINE = 20


def parse(*argv: str) -> dict[str, tuple[LunSpec, ...]]:
    args = build_parser().parse_args(["--portal", "127.0.0.1:0", *argv])
    return {target.name: target.logical_units for target in load_config(args).targets}


def test_default_is_lun_0_of_64_mib_on_every_target() -> None:
    luns = parse("--target", A, "--target", B)
    assert [spec.lun for spec in luns[A]] == [0] and [spec.lun for spec in luns[B]] == [0]
    assert luns[A][0].wwid == default_wwid(A, 0) != luns[B][0].wwid


def test_lun_options_for_all_targets_and_for_one() -> None:
    luns = parse(
        "--target",
        A,
        "--target",
        B,
        "--lun",
        "1,size=1G,block-size=4096",
        "--lun",
        f"{B}=7,wwid=naa.{WWID},serial=S7,vendor=V,product=P,revision=R,backing=/tmp/x.img",
    )
    assert [(spec.lun, spec.size, spec.block_size) for spec in luns[A]] == [(1, 1 << 30, 4096)]
    assert [spec.lun for spec in luns[B]] == [1, 7]
    seven = luns[B][1]
    assert (seven.wwid, seven.serial, seven.vendor, seven.product, seven.revision) == (
        WWID,
        "S7",
        "V",
        "P",
        "R",
    )
    assert seven.backing == Path("/tmp/x.img")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", A, "--lun", f"{B}=1"], "is not a --target"),
        (["--lun", "1"], "no --target"),
        (["--target", A, "--lun", "1,colour=blue"], "KEY=VALUE"),
        (["--target", A, "--lun", "1,wwid=naa.7000"], "WWID"),
        (["--target", A, "--lun", "1", "--lun", "1"], "same LUN"),
        (["--target", A, "--lun", "70000"], "LUN must be"),
    ],
)
def test_bad_lun_options_exit_2_naming_the_problem(argv: list[str], message: str) -> None:
    err = io.StringIO()
    code = run(["--portal", "127.0.0.1:0", *argv], stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert message in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_an_unusable_backing_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    for path, reason in ((missing, "No such file"), (empty, "less than one")):
        err = io.StringIO()
        argv = ["--portal", "127.0.0.1:0", "--target", A, "--lun", f"0,backing={path}"]
        assert run(argv, stdout=io.StringIO(), stderr=err) == 2
        assert str(path) in err.getvalue() and reason in err.getvalue()


async def test_process_prints_a_line_per_lun_and_serves_the_backing_file(tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(3 << 20))
    host = unique_loopback()
    argv = [
        sys.executable,
        "-m",
        "pyiscsi_failover.testing",
        "--portal",
        f"{host}:0",
        "--target",
        A,
        "--lun",
        f"0,backing={backing}",
        "--lun",
        f"2,size=8M,wwid={WWID}",
    ]
    with trio.fail_after(READY_DEADLINE):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            assert process.stdout is not None and process.stderr is not None
            received = b""
            while not received.endswith(b"ready\n"):
                chunk = await process.stdout.receive_some(64)
                assert chunk, "the target exited before ready"
                received += chunk
            assert received == b"ready\n"
            process.terminate()
            errors = b""
            while chunk := await process.stderr.receive_some(4096):
                errors += chunk
    assert process.returncode == 0
    lines = errors.decode().splitlines()
    assert lines[0].startswith(f"portal {host}:0 {host}:")
    assert lines[1:3] == [
        f"lun {A} 0 {3 << 20} naa.{default_wwid(A, 0)}",
        f"lun {A} 2 {8 << 20} naa.{WWID}",
    ]


# --------------------------------------------------------------------------------------------
# SCSI faults on the command line


def faults_of(*argv: str) -> tuple[tuple[Fault, ...], tuple[Fault, ...]]:
    """(the portal's faults, the target's) for a command line with portal p and target A."""
    args = build_parser().parse_args(["--portal", "p=127.0.0.1:0", "--target", A, *argv])
    config = load_config(args)
    return config.portals[0].faults, config.targets[0].faults


def test_scsi_faults_go_on_portals_and_targets_with_their_luns() -> None:
    portal, target = faults_of(
        "--lun",
        "0",
        "--lun",
        "1",
        "--fault",
        "p=lun-missing@1",
        "--fault",
        "p=not-ready:3a/00@0",
        "--fault",
        "p=refuse-isid",
        "--fault",
        f"{A}=standby",
        "--fault",
        f"{A}=hide-from-isid:random@0,1",
    )
    assert portal == (
        LunMissing(luns=frozenset({1})),
        NotReady(asc=0x3A, ascq=0, luns=frozenset({0})),
        RefuseIsid(),
    )
    assert target == (Standby(), HideFromIsid(isid=IsidMatch(oui=None), luns=frozenset({0, 1})))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault", "p=not-ready@7"], "fault not-ready names LUN 7, which no target"),
        (["--fault", f"{A}=standby@3"], "fault standby names LUN 3"),
        (["--fault", "p=delay:1@0"], "takes no @LUN"),
        (["--fault", "p=lun-missing@zero"], "decimal LUN numbers"),
        (["--fault", "p=unit-attention:0"], "at least 1"),
        (["--fault", "p=standby", "--fault", "p=standby"], "twice for the same LUNs"),
    ],
)
def test_bad_scsi_faults_exit_2_naming_the_problem(argv: list[str], message: str) -> None:
    err = io.StringIO()
    code = run(["--portal", "p=127.0.0.1:0", "--target", A, *argv], stderr=err)
    assert code == 2
    assert message in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_help_spells_every_scsi_fault(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spelling in (
        "NAME=FAULT[@LUN[,LUN...]]",
        "refuse-isid[:MATCH]",
        "lun-missing",
        "hide-from-isid[:MATCH]",
        "not-ready[:ASC/ASCQ]",
        "standby",
        "check-condition[:KEY/ASC/ASCQ]",
        "unit-attention[:COUNT[:ASC/ASCQ]]",
        "reservation-conflict",
        "other-wwid[:WWID]",
        "slow-scsi:SECONDS",
        "split-data-in[:BYTES]",
        "residual-overflow[:BYTES]",
        "open-iscsi",
        "oui:0xHHHHHH",
        "random",
    ):
        assert spelling in text, spelling
    for kind in FaultKind:
        assert kind.value in text, kind


async def test_process_serves_its_scsi_faults_to_our_probe() -> None:
    """End to end: the faults given on the command line reach the LUNs, and the portal line
    names them as they were given."""
    host = unique_loopback()
    argv = [
        sys.executable,
        "-m",
        "pyiscsi_failover.testing",
        "--portal",
        f"a={host}:0",
        "--target",
        A,
        "--lun",
        "1",
        "--lun",
        "2",
        "--fault",
        "a=hide-from-isid@1",
        "--fault",
        "a=not-ready@2",
        "--fault",
        "a=refuse-isid",
    ]
    with trio.fail_after(READY_DEADLINE):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            assert process.stdout is not None and process.stderr is not None
            received = b""
            while not received.endswith(b"ready\n"):
                chunk = await process.stdout.receive_some(64)
                assert chunk, "the target exited before ready"
                received += chunk
            errors = b""
            while errors.count(b"\n") < 3:  # the portal line and two lun lines
                chunk = await process.stderr.receive_some(4096)
                assert chunk, "the target closed stderr"
                errors += chunk
            portal_line = errors.decode().splitlines()[0]
            address = portal_line.split()[2].rpartition(",")[0]
            info = parse_connection_info(
                json.dumps(build_connection_info([address, address], A, [2, 1]))
            )
            result = await probe(info, ProbeOptions(check=Check.LUN, initiator_name=A + "-host"))
            process.terminate()
    assert process.returncode == 0
    assert portal_line.endswith(
        " hide-from-isid:open-iscsi@1 not-ready:04/03@2 refuse-isid:open-iscsi"
    )
    not_ready, hidden = result.attempts
    assert not_ready.outcome is Outcome.LUN_NOT_READY, not_ready.detail
    assert "NOT READY 04/03" in not_ready.detail
    assert hidden.outcome is Outcome.OK, hidden.detail  # our ISID is random-format
    assert result.chosen is hidden
