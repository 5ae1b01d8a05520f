"""The VM harness's host side (tests/vm/): initramfs, result records, failure reports, deadline.

Most of these need no guest. The last one boots one and kills it at its hard limit, to show
that a guest that overruns is stopped and reported with its console.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peers
import pytest
from vm.harness import GuestRun, boot, choose_accel, require_vm, uses_scenarios
from vm.image import ImageError, KernelImage, build_initramfs, find_static_busybox, load_order
from vm.protocol import CONSOLE, RunnerEvent, ScenarioResult, Status, parse_results

MODULES_DEP = """\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/virtio/virtio-pci.ko: kernel/drivers/virtio/virtio.ko
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/loop.ko:
kernel/fs/overlayfs/overlay.ko:
"""


def test_load_order_puts_every_module_after_its_dependencies() -> None:
    order = [name for name, _ in load_order(MODULES_DEP, ["9p", "virtio_pci"])]
    assert order == ["9pnet", "netfs", "fscache", "9p", "virtio", "virtio_pci"]


def test_load_order_names_a_module_that_is_not_there() -> None:
    with pytest.raises(ImageError, match=r"'virtio_blk' is not in modules\.dep"):
        load_order(MODULES_DEP, ["virtio_blk"])


def test_a_dynamically_linked_busybox_is_refused() -> None:
    with pytest.raises(ImageError, match="busybox-static"):
        find_static_busybox([Path(sys.executable).resolve()])


def _fake_kernel(root: Path) -> KernelImage:
    modules = root / "lib" / "modules" / "9.9.9-test"
    for line in MODULES_DEP.splitlines():
        path = modules / line.split(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"module {path.name}".encode())
    (modules / "modules.dep").write_text(MODULES_DEP)
    vmlinuz = root / "boot" / "vmlinuz-9.9.9-test"
    vmlinuz.parent.mkdir()
    vmlinuz.write_bytes(b"kernel")
    return KernelImage.newest(boot=root / "boot", lib=root / "lib" / "modules")


def test_initramfs_is_a_newc_archive_that_cpio_reads(tmp_path: Path) -> None:
    cpio = peers.require_tool("cpio", "cpio")
    kernel = _fake_kernel(tmp_path / "root")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF not really")
    image = tmp_path / "initramfs.cpio"
    loaded = build_initramfs(image, kernel, busybox=busybox)
    assert loaded == [
        "virtio", "virtio_pci", "9pnet", "9pnet_virtio", "netfs", "fscache", "9p", "overlay"
    ]  # fmt: skip

    def extract(*names: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [cpio, "-i", "--quiet", "--to-stdout", *names],
            input=image.read_bytes(),
            capture_output=True,
            check=True,
        )

    listing = subprocess.run(
        [cpio, "-t", "--quiet"], input=image.read_bytes(), capture_output=True, check=True
    )
    names = listing.stdout.decode().split()
    assert {"init", "bin/busybox", "modules/order", "modules/9p.ko", "dev", "proc"} <= set(names)
    assert extract("init").stdout == (Path(__file__).parent / "vm" / "init").read_bytes()
    assert extract("modules/order").stdout.decode().split() == loaded
    assert extract("modules/virtio_pci.ko").stdout == b"module virtio-pci.ko"
    assert extract("bin/busybox").stdout == busybox.read_bytes()


def test_results_round_trip_and_a_cut_off_line_is_set_aside() -> None:
    result = ScenarioResult(
        name="s",
        status=Status.TIMED_OUT,
        error="did not finish",
        facts={"device": "/dev/sda", "sizes": [1, 2]},
        notes=("a", "b"),
        leftovers=("node record: x",),
        started_uptime=12.5,
        elapsed_s=3.25,
    )
    event = RunnerEvent(event="ready", uptime=10.0, details={"daemons": ["tgtd"]})
    lines = [
        '{"kind": "runner", "event": "started", "uptime": 8.5}',
        json.dumps(event.to_json()),
        json.dumps(result.to_json()),
        '{"kind": "scenario", "name": "t", "sta',
    ]
    events, results, broken = parse_results(lines)
    assert [e.event for e in events] == ["started", "ready"]
    assert events[1] == event
    assert results == {"s": result}
    assert broken == [lines[-1]]


def _run_with(tmp_path: Path, *results: ScenarioResult, console: str = "") -> GuestRun:
    (tmp_path / CONSOLE).write_text(console)
    return GuestRun(
        work=tmp_path,
        accel="tcg",
        requested=(*(r.name for r in results), "silent"),
        results={r.name: r for r in results},
        exit_status=0,
    )


def test_facts_of_a_failed_scenario_fail_the_test_with_its_log_and_the_console(
    tmp_path: Path,
) -> None:
    failed = ScenarioResult(
        name="broken", status=Status.FAILED, error="tgtd said no", notes=("$ tgtadm -> 22",)
    )
    run = _run_with(tmp_path, failed, console="vm-init: started\nkernel says hello\n")
    with pytest.raises(pytest.fail.Exception) as raised:
        run.facts("broken")
    message = str(raised.value)
    assert "scenario 'broken' failed: tgtd said no" in message
    assert "$ tgtadm -> 22" in message
    assert "kernel says hello" in message


def test_facts_of_a_scenario_that_left_a_session_fail_the_test(tmp_path: Path) -> None:
    leaky = ScenarioResult(
        name="leaky", status=Status.COMPLETED, facts={"ok": True}, leftovers=("session: tcp",)
    )
    with pytest.raises(pytest.fail.Exception, match="left behind"):
        _run_with(tmp_path, leaky).facts("leaky")


def test_a_scenario_the_guest_never_reported_fails_with_the_console(tmp_path: Path) -> None:
    run = _run_with(tmp_path, console="Kernel panic - not syncing\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)reported nothing.*Kernel panic"):
        run.result("silent")


def test_a_scenario_not_asked_for_says_how_to_ask(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"@uses_scenarios\('other'\)"):
        _run_with(tmp_path).result("other")


def test_uses_scenarios_records_the_names_and_marks_a_peer_test() -> None:
    @uses_scenarios("a", "b")
    def test_something() -> None:
        pass

    assert getattr(test_something, "vm_scenarios", None) == ("a", "b")
    assert [mark.name for mark in getattr(test_something, "pytestmark", [])] == ["peer"]


@pytest.mark.parametrize(("setting", "accel"), [("tcg", "tcg"), ("KVM", "kvm"), (" tcg ", "tcg")])
def test_vm_accel_forces_the_accelerator(setting: str, accel: str) -> None:
    assert choose_accel({"VM_ACCEL": setting}) == accel


def test_an_unknown_vm_accel_is_refused() -> None:
    with pytest.raises(pytest.fail.Exception, match="VM_ACCEL='hvf'"):
        choose_accel({"VM_ACCEL": "hvf"})


@pytest.mark.peer
def test_a_guest_past_its_hard_limit_is_killed_and_reported(tmp_path: Path) -> None:
    tools = require_vm()
    run = boot(tools, tmp_path, ["kernel_login"], accel=choose_accel(), timeout=1.0)
    assert run.timed_out
    assert run.exit_status is None
    assert run.results == {}
    with pytest.raises(pytest.fail.Exception, match="killed after its hard limit of 1 s"):
        run.result("kernel_login")
