"""The LUN check (``--check lun``) against the real tgtd: the LUN is part of the answer.

A login alone passes for a LUN that is not there; the LUN check must not. Against tgtd: a LUN
that is not mapped, tgtd's LUN 0 (a controller, no disk), and a real disk, whose size and WWID
must be what tgtd serves and what Linux would show (``naa.6...`` from VPD 0x83, and udev's
``36...``). Then the same-volume rules: ``expect_wwid`` refuses another volume, and without it
the chosen candidate pins the WWID for the others.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import Tgtd, TgtdStarter

from pyiscsi_failover.connection_info import build_connection_info, parse_connection_info
from pyiscsi_failover.prober import Check, Outcome, Policy, ProbeOptions, ProbeResult, probe

pytestmark = pytest.mark.peer

INITIATOR = "iqn.2026-12.test.pyiscsi:lun-check"
IQN = "iqn.2026-12.test.pyiscsi:luns"
DEADLINE = 30
SIZE_MB = 4
#: tgtd's WWIDs for tid 1 LUNs 1 and 2, as the kernel and udev render them (PROTOCOL.md).
WWID_1 = "naa.60000000000000000e00000000010001"
UDEV_1 = "360000000000000000e00000000010001"
WWID_2 = "naa.60000000000000000e00000000010002"
IQN_2 = "iqn.2026-12.test.pyiscsi:luns-2"
#: tgtadm's scsi_id rewrites NAA 6 (top nibble forced to 6), as PROTOCOL.md worked out.
SCSI_ID = "0123456789abcdef0123456789abcdef"
SCSI_ID_WWID = "naa.6123456789abcdef0123456789abcdef"


@pytest.fixture
def tgtd(tgtd_factory: TgtdStarter) -> Tgtd:
    daemon = tgtd_factory()
    daemon.add_target(1, IQN, luns=2, size_mb=SIZE_MB)
    daemon.allow(1)
    return daemon


async def probe_luns(
    tgtd: Tgtd, luns: list[int], policy: Policy = Policy.SEQUENTIAL, **options: object
) -> ProbeResult:
    portals = [tgtd.portal] * len(luns)
    info = parse_connection_info(build_connection_info(portals, [IQN] * len(luns), luns))
    opts = ProbeOptions(
        policy=policy,
        check=Check.LUN,
        initiator_name=INITIATOR,
        **options,  # type: ignore[arg-type]
    )
    with trio.fail_after(DEADLINE):
        return await probe(info, opts)


@pytest.mark.parametrize("policy", list(Policy), ids=[p.value for p in Policy])
async def test_missing_and_controller_luns_fail_and_the_disk_is_chosen(
    tgtd: Tgtd, policy: Policy
) -> None:
    result = await probe_luns(tgtd, [5, 0, 1], policy, stagger=5.0)
    missing, controller, disk = result.attempts
    assert missing.outcome is Outcome.LUN_MISSING, missing.detail
    assert "LUN 5 is not in REPORT LUNS (it lists 0, 1, 2)" in missing.detail
    assert controller.outcome is Outcome.LUN_MISSING, controller.detail
    assert "controller" in controller.detail
    assert result.chosen is disk and disk.outcome is Outcome.OK, disk.detail
    info = disk.lun_info
    assert info is not None
    assert (info.wwid, info.wwid_udev) == (WWID_1, UDEV_1)
    assert (info.size_bytes, info.block_size) == (SIZE_MB << 20, 512)
    assert (info.vendor, info.product, info.device_type) == ("IET", "VIRTUAL-DISK", 0)
    assert disk.to_json()["lun_info"] == info.to_json()
    assert WWID_1 in disk.detail and "4.0 MiB" in disk.detail
    assert missing.handoff_portal is None and controller.handoff_portal is None


async def test_a_login_alone_passes_a_missing_lun(tgtd: Tgtd) -> None:
    """Why the LUN check exists: the same candidate passes ``--check login``."""
    info = parse_connection_info(build_connection_info([tgtd.portal], IQN, 5))
    with trio.fail_after(DEADLINE):
        result = await probe(info, ProbeOptions(check=Check.LOGIN, initiator_name=INITIATOR))
    assert result.attempts[0].outcome is Outcome.OK
    assert result.attempts[0].lun_info is None


@pytest.mark.parametrize("form", [WWID_2, "360000000000000000e00000000010002", WWID_2.upper()])
async def test_expect_wwid_refuses_another_volume(tgtd: Tgtd, form: str) -> None:
    result = await probe_luns(tgtd, [1, 2], expect_wwid=form)
    wrong, right = result.attempts
    assert wrong.outcome is Outcome.WRONG_VOLUME
    assert f"shows {WWID_1}, expected {form}" in wrong.detail
    assert result.chosen is right
    assert right.lun_info is not None and right.lun_info.wwid == WWID_2


async def test_the_chosen_candidate_pins_the_volume(tgtd: Tgtd) -> None:
    """Three candidates, probed to the end: the same volume under a second target (both LUs
    given one scsi_id) passes, another LUN of the first target is ``wrong_volume``."""
    tgtd.add_target(2, IQN_2, luns=1, size_mb=SIZE_MB)
    tgtd.allow(2)
    for tid in (1, 2):
        set_scsi_id(tgtd, tid, 1, SCSI_ID)
    info = parse_connection_info(
        build_connection_info([tgtd.portal] * 3, [IQN, IQN, IQN_2], [1, 2, 1])
    )
    options = ProbeOptions(check=Check.LUN, initiator_name=INITIATOR, probe_all=True)
    with trio.fail_after(DEADLINE):
        result = await probe(info, options)
    chosen, other, same = result.attempts
    assert result.chosen is chosen and chosen.outcome is Outcome.OK, chosen.detail
    assert other.outcome is Outcome.WRONG_VOLUME
    assert f"shows {WWID_2}, not {SCSI_ID_WWID}" in other.detail
    assert other.handoff_portal is None
    assert same.outcome is Outcome.OK, same.detail
    assert same.lun_info is not None and same.lun_info.wwid == SCSI_ID_WWID


def set_scsi_id(tgtd: Tgtd, tid: int, lun: int, scsi_id: str) -> None:
    tgtd.tgtadm(
        "--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun),
        "--params", f"scsi_id={scsi_id}",
    )  # fmt: skip


async def test_the_wwid_follows_tgtadm_scsi_id(tgtd: Tgtd) -> None:
    set_scsi_id(tgtd, 1, 1, SCSI_ID)
    result = await probe_luns(tgtd, [1])
    info = result.attempts[0].lun_info
    assert info is not None
    assert info.wwid == SCSI_ID_WWID
    assert info.wwid_udev == "36123456789abcdef0123456789abcdef"


def add_lun(tgtd: Tgtd, tid: int, lun: int, backing: Path) -> None:
    with backing.open("wb") as handle:
        handle.truncate(SIZE_MB << 20)
    tgtd.tgtadm(
        "--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun),
        "--backing-store", str(backing),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("SAM2", Outcome.OK), ("SAM3-flat", Outcome.OK), ("SAM", Outcome.LUN_MISSING)],
)
async def test_lun_256_needs_flat_addressing_as_os_brick_says(
    tgtd: Tgtd, tmp_path: Path, mode: str, outcome: Outcome
) -> None:
    """tgt encodes LUN 256 with flat addressing (``41 00``), as Linux numbers it 16640. With
    os-brick's SAM2 (or SAM3-flat) we address that LU; with plain SAM, LUN 256 is ``01 00``,
    which is not in REPORT LUNS, exactly what the kernel would be told to look for."""
    add_lun(tgtd, 1, 256, tmp_path / "lun256.img")
    data = build_connection_info([tgtd.portal], IQN, 256, addressing_mode=mode)
    info = parse_connection_info(data)
    with trio.fail_after(DEADLINE):
        result = await probe(info, ProbeOptions(check=Check.LUN, initiator_name=INITIATOR))
    (attempt,) = result.attempts
    assert attempt.outcome is outcome, attempt.detail
    if outcome is Outcome.OK:
        assert attempt.lun_info is not None
        assert attempt.lun_info.wwid == "naa.60000000000000000e00000000010100"
    else:
        assert "16640" in attempt.detail  # REPORT LUNS lists it under its Linux number
        assert "addressing_mode 'SAM2'?" in attempt.detail


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    maps=st.lists(st.sets(st.integers(1, 3), max_size=3), min_size=2, max_size=3),
    wanted=st.integers(1, 3),
)
def test_the_first_candidate_whose_lun_exists_is_chosen(
    tgtd_factory: TgtdStarter,
    tmp_path_factory: pytest.TempPathFactory,
    maps: list[set[int]],
    wanted: int,
) -> None:
    """Generated LUN maps, one target per 'portal': each candidate asks for the same LUN
    number; the chosen one is the first whose target maps it, and every earlier one is
    ``lun_missing``, under every policy."""
    tgtd = tgtd_factory()
    directory = tmp_path_factory.mktemp("luns")
    iqns = [f"{IQN}-map{index}" for index in range(len(maps))]
    for tid, (iqn, luns) in enumerate(zip(iqns, maps, strict=True), start=1):
        tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "--targetname", iqn)
        tgtd.allow(tid)
        for lun in sorted(luns):
            add_lun(tgtd, tid, lun, directory / f"t{tid}-l{lun}.img")
    info = parse_connection_info(
        build_connection_info([tgtd.portal] * len(maps), iqns, [wanted] * len(maps))
    )
    first = next((i for i, luns in enumerate(maps) if wanted in luns), None)
    for policy in Policy:
        options = ProbeOptions(
            policy=policy, check=Check.LUN, initiator_name=INITIATOR, stagger=5.0
        )

        async def run(options: ProbeOptions = options) -> ProbeResult:
            with trio.fail_after(DEADLINE):
                return await probe(info, options)

        result = trio.run(run)
        chosen = None if result.chosen is None else result.chosen.candidate.index
        assert chosen == first, (policy, maps, wanted, [a.detail for a in result.attempts])
        for attempt in result.attempts[: first if first is not None else len(maps)]:
            assert attempt.outcome is Outcome.LUN_MISSING, attempt.detail
