"""The test target's newer behaviours judged by a real initiator: libiscsi's ``iscsi-ls``.

Our target must misbehave the way real arrays do, and behave where they behave; an initiator
we did not write is the referee. Each ``iscsi-ls`` runs as a trio subprocess (the target is
served by the same trio loop) under a deadline of its own, because libiscsi has no login or
command timeout and would otherwise hang the test.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import trio
from peers import iscsi_url, parse_iscsi_ls, require_tool, unique_loopback

from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.pdu import LoginStatus
from pyiscsi_failover.testing import (
    Fault,
    FaultKind,
    PortalConfig,
    RunningTarget,
    TargetConfig,
    TargetSpec,
    parse_fault,
    serve_target,
)
from pyiscsi_failover.testing.target import Rejected, SendTargetsAnswered

pytestmark = pytest.mark.peer

INITIATOR = "iqn.2024-01.com.example:peer-initiator"
DISK = "iqn.2024-01.com.example:peer-disk"
#: Deadline of one whole test, target and initiator together.
TEST_DEADLINE = 30
#: What a terminating iscsi-ls needs at most on loopback (it takes milliseconds); a looping
#: one is killed when this runs out.
ISCSI_LS_DEADLINE = 15


def config(*faults: Fault) -> TargetConfig:
    return TargetConfig(
        portals=(PortalConfig(host=unique_loopback(), port=0, faults=faults),),
        targets=(TargetSpec(name=DISK),),
    )


async def iscsi_ls(
    where: Portal, *options: str, query: str = ""
) -> subprocess.CompletedProcess[bytes] | None:
    """``iscsi-ls OPTIONS URL``; None when it was still running at the deadline (and killed).

    ``query`` is appended to the URL (libiscsi reads ``?header_digest=...`` from there).
    """
    binary = require_tool("iscsi-ls", "libiscsi-bin")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIBISCSI_")}
    argv = [binary, *options, "-i", INITIATOR, iscsi_url(where.host, where.port) + query]
    with trio.move_on_after(ISCSI_LS_DEADLINE):
        return await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    return None


def listed(done: subprocess.CompletedProcess[bytes]) -> set[tuple[str, str]]:
    return {(found.name, found.portal) for found in parse_iscsi_ls(done.stdout.decode())}


# --------------------------------------------------------------------------------------------
# Digests


@pytest.mark.parametrize(
    ("fault", "query"),
    [
        # libiscsi offers HeaderDigest=CRC32C when asked to: the target agrees and from then on
        # both sides check each other's CRC32C header digests, so the listing proves ours right.
        ("digests-required:header", "?header_digest=crc32c"),
        # A Reject for a digest key leaves it at None, which libiscsi accepts.
        ("reject-digests", "?header_digest=crc32c"),
        ("reject-digests", ""),
    ],
)
async def test_iscsi_ls_through_digest_faults(fault: str, query: str) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(config(parse_fault(fault))) as running:
            where = running.portals[0]
            done = await iscsi_ls(where, query=query)
            assert done is not None, "iscsi-ls hung"
            assert done.returncode == 0, done.stderr.decode()
            assert listed(done) == {(DISK, f"{where},{where.tpgt}")}
            await running.wait_idle()
    [record] = running.connections
    assert record.logged_out
    assert record.violations == []
    assert record.faults == [parse_fault(fault).kind]


async def test_iscsi_ls_offering_no_digest_to_a_target_that_requires_one_gets_no_answer() -> None:
    """The arrays of the issue: HeaderDigest=None is rejected, and then nothing is understood.

    libiscsi carries on after the Reject and sends SendTargets without a digest; the target
    waits for the 4 digest bytes that never come, and libiscsi (no timeout of its own) waits for
    an answer that never comes. We watch the request arrive, then stop iscsi-ls.
    """
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(config(parse_fault("digests-required:header"))) as running:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(iscsi_ls, running.portals[0])
                await running.wait_for(_request_after_login)
                nursery.cancel_scope.cancel()  # kills iscsi-ls
            await running.wait_idle()
    [record] = running.connections
    assert record.login is not None
    assert record.login.status is LoginStatus.SUCCESS
    assert not any(isinstance(event, SendTargetsAnswered) for event in record.events)
    assert not record.logged_out
    assert record.faults == [FaultKind.DIGESTS_REQUIRED]


def _request_after_login(running: RunningTarget) -> bool:
    """The first connection logged in and then received part of a PDU (bytes left waiting)."""
    if not running.connections:
        return False
    record = running.connections[0]
    return record.login is not None and record.bytes_buffered > 0


# --------------------------------------------------------------------------------------------
# SCSI


async def test_iscsi_ls_s_lists_the_luns_with_their_sizes() -> None:
    """``iscsi-ls -s`` logs in to each target, sends REPORT LUNS, then INQUIRY and READ
    CAPACITY to each LUN, and prints one line per LUN; one login per target, no retry loop."""
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(config()) as running:
            where = running.portals[0]
            done = await iscsi_ls(where, "-s")
            assert done is not None, "iscsi-ls -s still running at its deadline (re-login loop?)"
            await running.wait_idle()
    assert done.returncode == 0, done.stderr
    assert listed(done) == {(DISK, f"{where},{where.tpgt}")}
    [target] = parse_iscsi_ls(done.stdout.decode())
    # libiscsi prints (last LBA) x (block length), one block short: 64 MiB shows as 63M.
    assert target.luns == {0: "DIRECT_ACCESS (Size:63M)"}
    normal = [
        record
        for record in running.connections
        if record.login is not None and record.login.target_name == DISK
    ]
    assert len(normal) == 1, running.connections
    assert [event for event in normal[0].events if isinstance(event, Rejected)] == []
    assert running.violations == []
