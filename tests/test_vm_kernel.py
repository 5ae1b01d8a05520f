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

from vm.harness import GuestRun, uses_scenarios
from vm.protocol import Status
from vm.scenarios import LEFT_BEHIND_IQN, LEFT_BEHIND_PORTAL

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
