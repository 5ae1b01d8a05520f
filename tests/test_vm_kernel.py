"""The Linux kernel's own iSCSI initiator, in a QEMU guest, against tgtd and our attach.

Every test here judges the facts of one scenario from tests/vm/scenarios.py; the session's one
guest (the ``vm_guest`` fixture) runs them all after a single boot. A scenario that failed in
the guest, or left a session or node record behind, fails its tests with its log and the
guest's console.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pytest
from vm.harness import GuestRun, uses_scenarios
from vm.protocol import Status
from vm.scenarios import (
    CHAP_TARGET_USER,
    CHAP_USERS,
    DEAD_PORTAL,
    DETACH_BOUND_S,
    FOREIGN_IQN,
    FOREIGN_PORTAL,
    LEFT_BEHIND_IQN,
    LEFT_BEHIND_PORTAL,
)

#: PROTOCOL.md section 5: what tgt's VPD page 0x83 makes the kernel show for tid 1, LUN 1.
TGT_TID1_LUN1_WWID = "naa.60000000000000000e00000000010001"
KERNEL_LOGIN_IQN = "iqn.2026-12.org.pyiscsi-failover.vm:kernel-login"
ATTACH_IQN = "iqn.2026-12.org.pyiscsi-failover.vm:attach-cli"
GUEST_PORTAL = "127.0.0.1:3260"


def _only_attempt(facts: Mapping[str, Any]) -> Mapping[str, Any]:
    attempts = facts["probe"]["attempts"]
    assert len(attempts) == 1, attempts
    attempt: Mapping[str, Any] = attempts[0]
    assert attempt["outcome"] == "ok", attempt
    return attempt


# --------------------------------------------------------------------------------------------
# The runner's own guarantees


@uses_scenarios("runner_self_check")
def test_runner_stops_an_overrunning_scenario_and_keeps_its_facts(vm_guest: GuestRun) -> None:
    result = vm_guest.result("runner_self_check")
    assert result.status is Status.TIMED_OUT
    assert result.error == "did not finish within its 2 s"
    assert result.facts == {"before_the_hang": True}


@uses_scenarios("runner_self_check")
def test_runner_reports_and_removes_a_record_left_behind(vm_guest: GuestRun) -> None:
    [leftover] = vm_guest.result("runner_self_check").leftovers  # none "NOT REMOVED"
    pattern = rf"node record: {re.escape(LEFT_BEHIND_PORTAL)},\d+ {re.escape(LEFT_BEHIND_IQN)}"
    assert re.fullmatch(pattern, leftover)


# --------------------------------------------------------------------------------------------
# open-iscsi by hand against tgtd


@uses_scenarios("kernel_login")
def test_sendtargets_discovery_lists_the_target(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    assert f"{GUEST_PORTAL},1 {KERNEL_LOGIN_IQN}" in facts["discovered"]


@uses_scenarios("kernel_login")
def test_login_makes_a_scsi_disk_behind_the_by_path_link(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    assert re.fullmatch(r"/dev/sd[a-z]+", facts["kernel_device"])
    assert (facts["kernel_vendor"], facts["kernel_model"]) == ("IET", "VIRTUAL-DISK")
    [session] = facts["sessions_while_attached"]
    assert f"{GUEST_PORTAL},1 {KERNEL_LOGIN_IQN}" in session


@uses_scenarios("kernel_login")
def test_kernel_disk_size_is_the_lu_size_our_probe_read(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    lun_info = _only_attempt(facts)["lun_info"]
    assert facts["kernel_size_bytes"] == facts["backing_bytes"] == 64 * 1024 * 1024
    assert lun_info["size_bytes"] == facts["kernel_size_bytes"]


@uses_scenarios("kernel_login")
def test_kernel_wwid_is_the_one_our_probe_predicts(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    lun_info = _only_attempt(facts)["lun_info"]
    assert facts["tid"] == 1
    assert facts["kernel_wwid"] == lun_info["wwid"] == TGT_TID1_LUN1_WWID


@uses_scenarios("kernel_login")
def test_udev_by_id_link_is_named_by_our_udev_wwid(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    lun_info = _only_attempt(facts)["lun_info"]
    assert f"scsi-{lun_info['wwid_udev']}" in facts["kernel_by_id"]


@uses_scenarios("kernel_login")
def test_direct_io_reaches_the_target_and_reads_back(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    assert facts["read_sha256"] == facts["written_sha256"]
    assert facts["backing_sha256"] == facts["written_sha256"]


@uses_scenarios("kernel_login")
def test_logout_removes_the_disk_and_the_session(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("kernel_login")
    assert facts["gone_after_logout"] is True
    assert facts["sessions_after_logout"] == []


# --------------------------------------------------------------------------------------------
# pyiscsi-failover attach / detach


@uses_scenarios("attach_cli_main_blackholed")
def test_attach_passes_over_the_blackholed_main_portal(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_cli_main_blackholed")
    assert facts["attach_status"] == 0, facts["attach_stderr"]
    probe = facts["attach"]["probe"]
    outcomes = [(a["portal"], a["outcome"]) for a in probe["attempts"]]
    assert outcomes == [(facts["main_portal"], "timeout"), (facts["alternative_portal"], "ok")]
    assert probe["chosen"] == {"portal": GUEST_PORTAL, "iqn": ATTACH_IQN, "lun": 1}


@uses_scenarios("attach_cli_main_blackholed")
def test_attach_reports_the_kernel_disk_its_probe_checked(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_cli_main_blackholed")
    link = f"/dev/disk/by-path/ip-{GUEST_PORTAL}-iscsi-{ATTACH_IQN}-lun-1"
    assert facts["attach"]["attach"]["device"] == link
    assert facts["link_after_attach"] is True
    assert re.fullmatch(r"/dev/sd[a-z]+", facts["kernel_device"])
    lun_info = facts["attach"]["probe"]["attempts"][1]["lun_info"]
    assert facts["kernel_wwid"] == lun_info["wwid"]
    assert facts["kernel_size_bytes"] == lun_info["size_bytes"] == facts["backing_bytes"]


@uses_scenarios("attach_cli_main_blackholed")
def test_attach_leaves_one_session_and_one_record_of_the_alternative(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_cli_main_blackholed")
    [session] = facts["sessions_after_attach"]
    assert f"{GUEST_PORTAL},1 {ATTACH_IQN}" in session
    [record] = facts["records_after_attach"]
    # A record made with -o new has no portal group yet: open-iscsi shows tpgt -1 unsigned.
    assert re.fullmatch(rf"{re.escape(GUEST_PORTAL)},\d+ {re.escape(ATTACH_IQN)}", record)


@uses_scenarios("attach_cli_main_blackholed")
def test_detach_removes_the_disk_the_session_and_our_record(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_cli_main_blackholed")
    assert facts["detach_status"] == 0, facts["detach_stderr"]
    fates = {entry["portal"]: entry["record"] for entry in facts["detach"]["detached"]}
    assert fates == {facts["main_portal"]: "absent", GUEST_PORTAL: "deleted"}
    assert facts["gone_after_detach"] is True
    assert facts["sessions_after_detach"] == []
    assert facts["records_after_detach"] == []
    ledger = facts["ledger_after_detach"]
    assert ledger is None or json.loads(ledger)["records"] == []


# --------------------------------------------------------------------------------------------
# attach_volume and detach in the guest's runner (the library, as Nova or Cinder call it)

_IQN = "iqn.2026-12.org.pyiscsi-failover.vm"
_DISK = re.compile(r"/dev/sd[a-z]+")


def _outcomes(probe: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(a["portal"], a["outcome"]) for a in probe["attempts"]]


def _handoffs(handoffs: list[Mapping[str, Any]]) -> list[tuple[str, str, int, str]]:
    return [(h["portal"], h["iqn"], h["lun"], h["outcome"]) for h in handoffs]


def _chosen_lun_info(probe: Mapping[str, Any]) -> Mapping[str, Any]:
    chosen = probe["chosen"]
    [attempt] = [
        a
        for a in probe["attempts"]
        if (a["portal"], a["iqn"], a["lun"]) == (chosen["portal"], chosen["iqn"], chosen["lun"])
    ]
    info: Mapping[str, Any] = attempt["lun_info"]
    return info


def _assert_kernel_disk_is_the_probed_one(facts: Mapping[str, Any], prefix: str = "") -> None:
    """The device attach reports is the kernel's: a by-path link to /dev/sdX whose size is
    what the probe's READ CAPACITY said and whose WWID (sysfs) is the probe's."""
    [probe] = facts[f"{prefix}probes"][-1:]
    lun_info = _chosen_lun_info(probe)
    assert facts[f"{prefix}attached"].startswith("/dev/disk/by-path/ip-")
    assert _DISK.fullmatch(facts[f"{prefix}kernel_device"])
    assert facts[f"{prefix}kernel_wwid"] == lun_info["wwid"]
    assert facts[f"{prefix}kernel_size_bytes"] == lun_info["size_bytes"]


def _foreign_record(line: str) -> bool:
    return bool(re.fullmatch(rf"{re.escape(FOREIGN_PORTAL)},\S+ {re.escape(FOREIGN_IQN)}", line))


@uses_scenarios("attach_detach_auth")
@pytest.mark.parametrize("mode", ["chap", "mutual"])
def test_attach_then_detach_with_chap(vm_guest: GuestRun, mode: str) -> None:
    facts = vm_guest.facts("attach_detach_auth")
    iqn = f"{_IQN}:auth-{mode}"
    assert _handoffs(facts[f"{mode}_handoffs"]) == [(GUEST_PORTAL, iqn, 1, "attached")]
    _assert_kernel_disk_is_the_probed_one(facts, f"{mode}_")
    assert facts[f"{mode}_kernel_size_bytes"] == 16 * 1024 * 1024
    # While attached: our session and record, and the record that is not ours, untouched.
    [session] = facts[f"{mode}_attached_sessions"]
    assert f"{GUEST_PORTAL},1 {iqn}" in session
    ours, foreign = sorted(facts[f"{mode}_attached_records"], key=_foreign_record)
    assert ours.endswith(f" {iqn}") and ours.startswith(f"{GUEST_PORTAL},")
    assert _foreign_record(foreign)
    # Detached: disk, session and our record gone; the other record kept.
    assert facts[f"{mode}_detach_record"] == "deleted"
    assert facts[f"{mode}_gone_after_detach"] is True
    assert facts[f"{mode}_detached_sessions"] == []
    [kept] = facts[f"{mode}_detached_records"]
    assert _foreign_record(kept)


@uses_scenarios("attach_detach_auth")
@pytest.mark.parametrize("mode", ["chap", "mutual"])
def test_chap_targets_refuse_a_login_without_credentials(vm_guest: GuestRun, mode: str) -> None:
    facts = vm_guest.facts("attach_detach_auth")
    assert facts[f"{mode}_without_credentials"] == "auth_failed"


@uses_scenarios("attach_detach_auth")
def test_handoff_writes_chap_and_mutual_chap_into_the_record_masked(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_detach_auth")
    chap, mutual = facts["chap_record_auth"], facts["mutual_record_auth"]
    for mode, record in (("chap", chap), ("mutual", mutual)):
        assert record["node.session.auth.authmethod"] == "CHAP"
        assert record["node.session.auth.username"] == CHAP_USERS[mode]
        assert record["node.session.auth.password"] == "********"
    assert chap["node.session.auth.username_in"] in ("", "<empty>")
    assert mutual["node.session.auth.username_in"] == CHAP_TARGET_USER
    assert mutual["node.session.auth.password_in"] == "********"
    assert facts["secret_in_facts"] is False
    assert facts["ledger_at_end"] == []


@uses_scenarios("attach_past_refused_and_wrong_volume")
def test_attach_passes_over_a_refusing_main_portal(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_past_refused_and_wrong_volume")
    [probe] = facts["probes"]
    assert _outcomes(probe) == [
        (DEAD_PORTAL, "refused"),
        (GUEST_PORTAL, "wrong_volume"),
        (GUEST_PORTAL, "ok"),
    ]
    iqn = f"{_IQN}:wwid-volume"
    assert _handoffs(facts["handoffs"]) == [(GUEST_PORTAL, iqn, 1, "attached")]
    _assert_kernel_disk_is_the_probed_one(facts)
    assert facts["kernel_size_bytes"] == facts["backing_bytes"]


@uses_scenarios("attach_past_refused_and_wrong_volume")
def test_a_candidate_showing_another_wwid_is_never_handed_to_the_kernel(
    vm_guest: GuestRun,
) -> None:
    facts = vm_guest.facts("attach_past_refused_and_wrong_volume")
    [probe] = facts["probes"]
    _, wrong, right = probe["attempts"]
    assert wrong["iqn"] == f"{_IQN}:wwid-other" and right["iqn"] == f"{_IQN}:wwid-volume"
    assert wrong["lun_info"]["wwid"] != facts["volume_wwid"] == right["lun_info"]["wwid"]
    assert [h["iqn"] for h in facts["handoffs"]] == [right["iqn"]]
    assert facts["kernel_wwid"] == facts["volume_wwid"]
    # The other target never had a record or a session.
    for line in facts["attached_records"] + facts["attached_sessions"]:
        assert "wwid-other" not in line


@uses_scenarios("attach_past_refused_and_wrong_volume")
def test_attach_then_detach_without_authentication(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("attach_past_refused_and_wrong_volume")
    iqn = f"{_IQN}:wwid-volume"
    [session] = facts["attached_sessions"]
    assert f"{GUEST_PORTAL},1 {iqn}" in session
    [record] = facts["attached_records"]
    assert record.startswith(f"{GUEST_PORTAL},") and record.endswith(f" {iqn}")
    assert facts["detach_record"] == "deleted"
    assert facts["gone_after_detach"] is True
    assert facts["detached_records"] == facts["detached_sessions"] == []


@uses_scenarios("two_luns_detach_one")
def test_two_luns_of_one_target_share_a_session_each_scanned_alone(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("two_luns_detach_one")
    iqn = f"{_IQN}:two-luns"
    assert facts["scan_mode"] == {"node.session.scan": "manual"}
    assert facts["luns_after_first_attach"] == [1]  # LUN 2 not scanned with LUN 1
    assert facts["luns_after_second_attach"] == [1, 2]
    for lun, size in ((1, 16), (2, 24)):
        assert _handoffs(facts[f"lun{lun}_handoffs"]) == [(GUEST_PORTAL, iqn, lun, "attached")]
        _assert_kernel_disk_is_the_probed_one(facts, f"lun{lun}_")
        assert facts[f"lun{lun}_kernel_size_bytes"] == size * 1024 * 1024
    assert facts["lun1_kernel_device"] != facts["lun2_kernel_device"]
    assert len(facts["both_attached_sessions"]) == len(facts["both_attached_records"]) == 1


@uses_scenarios("two_luns_detach_one")
def test_detaching_one_lun_leaves_the_other_usable(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("two_luns_detach_one")
    assert facts["lun1_detach_record"] == "kept_in_use"
    assert facts["lun1_detach_removed_disk"] == facts["lun1_kernel_device"].removeprefix("/dev/")
    assert facts["lun1_gone"] is True
    assert facts["luns_after_first_detach"] == [2]
    assert facts["one_detached_sessions"] == facts["both_attached_sessions"]
    assert facts["one_detached_records"] == facts["both_attached_records"]
    assert facts["lun2_read_sha256"] == facts["lun2_written_sha256"]
    assert facts["lun2_backing_sha256"] == facts["lun2_written_sha256"]
    # The last LUN's detach logs out and deletes the record attach created.
    assert facts["lun2_detach_record"] == "deleted"
    assert facts["lun2_detach_removed_disk"] is None
    assert facts["lun2_gone"] is True
    assert facts["both_detached_sessions"] == facts["both_detached_records"] == []
    assert facts["ledger_at_end"] == []


@uses_scenarios("detach_portal_blackholed")
def test_detach_ends_in_bounded_time_when_the_portal_is_gone(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("detach_portal_blackholed")
    assert facts["session_state_at_detach"] != []
    assert facts["detach_finished"] is True
    assert facts["detach_seconds"] <= DETACH_BOUND_S
    assert facts["detach_record"] == "deleted"
    assert facts["gone_after_detach"] is True
    assert facts["detached_records"] == facts["detached_sessions"] == []


_OUR_IQN = f"{_IQN}:test-target"


@uses_scenarios("our_target_isid_faults")
def test_kernel_attaches_our_test_target(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("our_target_isid_faults")
    clean = facts["served_portals"]["clean"]
    assert _handoffs(facts["handoffs"])[-1] == (clean, _OUR_IQN, 1, "attached")
    _assert_kernel_disk_is_the_probed_one(facts)
    assert facts["kernel_wwid"] == facts["served_wwid"]
    assert facts["kernel_size_bytes"] == facts["served_bytes"] == 8 * 1024 * 1024
    assert (facts["kernel_vendor"], facts["kernel_model"]) == ("PYISCSI", "TEST DISK")
    assert facts["read_sha256"] == facts["written_sha256"] == facts["backing_sha256"]
    [record] = facts["attached_records"]
    assert record.startswith(f"{clean},") and record.endswith(f" {_OUR_IQN}")
    assert facts["detach_record"] == "deleted"
    assert facts["gone_after_detach"] is True
    assert facts["detached_records"] == facts["detached_sessions"] == []


@uses_scenarios("our_target_isid_faults")
def test_a_failed_kernel_login_and_a_disk_that_never_appears_go_on_to_the_next(
    vm_guest: GuestRun,
) -> None:
    facts = vm_guest.facts("our_target_isid_faults")
    portals = facts["served_portals"]
    assert _handoffs(facts["handoffs"]) == [
        (portals["refused"], _OUR_IQN, 1, "login_failed"),
        (portals["hidden"], _OUR_IQN, 1, "no_device"),
        (portals["clean"], _OUR_IQN, 1, "attached"),
    ]
    # Each failed hand-off was undone: once attached, only the clean portal's session and
    # record are left (the runner also found nothing left over after the scenario).
    [session] = facts["attached_sessions"]
    assert f"{portals['clean']},1 {_OUR_IQN}" in session
    assert len(facts["attached_records"]) == 1
    # Every probe round passed the faulty portals: only the kernel (open-iscsi's ISID) fails.
    first = facts["probes"][0]
    assert _outcomes(first)[0] == (portals["refused"], "ok")


@uses_scenarios("our_target_isid_faults")
def test_the_first_passing_wwid_keeps_another_lu_from_the_kernel(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("our_target_isid_faults")
    other = f"{_IQN}:test-target-other-lu"
    seen = [a for probe in facts["probes"] for a in probe["attempts"] if a["iqn"] == other]
    assert [a["outcome"] for a in seen] == ["wrong_volume"]  # once, then never probed again
    assert seen[0]["lun_info"]["wwid"] != facts["served_wwid"]
    assert all(h["iqn"] != other for h in facts["handoffs"])


@uses_scenarios("discovery_fails_over")
def test_discovery_goes_on_past_a_blackholed_main_portal(vm_guest: GuestRun) -> None:
    facts = vm_guest.facts("discovery_fails_over")
    assert [(a["portal"], a["outcome"]) for a in facts["attempts"]] == [
        (DEAD_PORTAL, "timeout"),
        (GUEST_PORTAL, "ok"),
    ]
    assert facts["answered"] == GUEST_PORTAL
    assert f"{GUEST_PORTAL},1 {_IQN}:discovery" in facts["ours"]
    # What our SendTargets got is what open-iscsi's own discovery gets from the same portal.
    assert facts["ours"] == facts["open_iscsi"]
