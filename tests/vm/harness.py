"""The host side: find (or install) QEMU and a kernel, boot one guest, collect its results.

One guest serves the whole pytest session (the ``vm_guest`` fixture in tests/conftest.py calls
:func:`session_guest`): the scenarios that the session's collected tests name with
:func:`uses_scenarios` run in it one after another, and each test then asserts on its own
scenario's facts through :meth:`GuestRun.facts`.

The guest's root is the host's ``/``, read-only over 9p, so it runs the very Python, venv and
checkout the host runs. Only the work directory is shared read-write; it holds the request, the
results, the console log and the daemons' logs (kept after the session for a post-mortem).

Acceleration: ``VM_ACCEL=kvm|tcg`` forces it; by default KVM is used only where it can boot a
stock kernel (VMX or SVM in the CPU flags, and not the PVM flavour of KVM, whose /dev/kvm is
there but hangs such a guest), else TCG. ``VM_TIMEOUT`` overrides the guest's hard deadline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import peers
import pytest

from vm.image import ImageError, KernelImage, build_initramfs, find_static_busybox
from vm.protocol import (
    COMMAND,
    CONSOLE,
    EXIT,
    PYCACHE,
    REQUEST,
    RESULTS,
    Request,
    RunnerEvent,
    ScenarioResult,
    Status,
    parse_results,
)

__all__ = [
    "GuestRun",
    "VmTools",
    "boot",
    "choose_accel",
    "requested_scenarios",
    "require_vm",
    "session_guest",
    "uses_scenarios",
]

#: Guest time before the first scenario: boot, a cold interpreter and its imports under TCG,
#: and the daemons. Measured at 15-25 s on 2 busy cores; this is the hard limit's share.
BOOT_ALLOWANCE_S = 120.0
#: Added to each scenario's own deadline in the hard limit: its cleanup and leftover check.
CLEANUP_ALLOWANCE_S = 60.0
_PRECOMPILE_TIMEOUT = 300.0
_MEMORY_MB = 1024
_TAIL = 4000
_ATTRIBUTE = "vm_scenarios"
_CHECKOUT = Path(__file__).resolve().parents[2]
_TESTS = _CHECKOUT / "tests"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def uses_scenarios(*names: str) -> Callable[[F], F]:
    """Mark a test as judging these guest scenarios (and as a ``peer`` test): the session's
    guest runs them for it."""

    def mark(function: F) -> F:
        setattr(function, _ATTRIBUTE, (*getattr(function, _ATTRIBUTE, ()), *names))
        marked: F = pytest.mark.peer(function)
        return marked

    return mark


def requested_scenarios(items: Iterable[pytest.Item]) -> tuple[str, ...]:
    """The scenarios the collected tests ask for, in their registration order."""
    from vm import scenarios  # noqa: F401 (registers them)
    from vm.guest import SCENARIOS

    wanted: set[str] = set()
    for item in items:
        function = getattr(item, "function", None)
        wanted.update(getattr(function, _ATTRIBUTE, ()))
    unknown = sorted(wanted - SCENARIOS.keys())
    if unknown:
        pytest.fail(
            f"tests ask for unknown VM scenarios {unknown}; tests/vm/scenarios.py defines "
            f"{sorted(SCENARIOS)}",
            pytrace=False,
        )
    return tuple(name for name in SCENARIOS if name in wanted)


def _scenario_timeouts(names: Sequence[str]) -> float:
    from vm.guest import SCENARIOS

    return sum(SCENARIOS[name].timeout + CLEANUP_ALLOWANCE_S for name in names)


# --------------------------------------------------------------------------------------------
# What the host needs


@dataclass(frozen=True, slots=True, kw_only=True)
class VmTools:
    qemu: str
    kernel: KernelImage
    busybox: Path


def _require_package(package: str, find: Callable[[], T]) -> T:
    """``find()``, installing Debian ``package`` first (as root) when it raises ImageError; a
    loud skip, or under CI=true a failure, when it still does."""
    try:
        return find()
    except ImageError:
        pass
    if os.geteuid() == 0 and peers._which("apt-get") is not None:
        install = ["apt-get", "install", "-y", "--no-install-recommends", package]
        if not peers._apt(install) and peers._apt_update():
            peers._apt(install)
    try:
        return find()
    except ImageError as exc:
        reason = (
            f"VM TEST NOT RUN: {exc}. Install the Debian package {package!r} "
            f"(as root: apt-get install --no-install-recommends {package}) to run it."
        )
    if peers._in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_vm() -> VmTools:
    """Everything a guest needs from the host, installed as root when missing.

    The guest runs the host's own open-iscsi, tgt, udev and multipath-tools, so those are
    required here too.
    """
    qemu = peers.require_tool("qemu-system-x86_64", "qemu-system-x86")
    for binary, package in (
        ("iscsiadm", "open-iscsi"),
        ("iscsid", "open-iscsi"),
        ("tgtd", "tgt"),
        ("udevadm", "udev"),
        ("multipath", "multipath-tools"),
    ):
        peers.require_tool(binary, package)
    kernel = _require_package("linux-image-amd64", KernelImage.newest)
    busybox = _require_package("busybox-static", find_static_busybox)
    return VmTools(qemu=qemu, kernel=kernel, busybox=busybox)


def _kvm_works() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    if Path("/sys/module/kvm_pvm").exists():
        return False  # PVM's /dev/kvm cannot boot a stock kernel: the guest hangs early
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(re.findall(r"^flags\s*:(.*)$", cpuinfo, flags=re.MULTILINE)[0].split())
    return bool(flags & {"vmx", "svm"})


def choose_accel(environ: Mapping[str, str] = os.environ) -> str:
    """``kvm`` or ``tcg``: ``VM_ACCEL`` if set, else KVM only where it really works."""
    wanted = environ.get("VM_ACCEL", "auto").strip().lower()
    if wanted in ("kvm", "tcg"):
        return wanted
    if wanted != "auto":
        pytest.fail(f"VM_ACCEL={wanted!r}: give kvm, tcg or auto", pytrace=False)
    return "kvm" if _kvm_works() else "tcg"


def _accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]


# --------------------------------------------------------------------------------------------
# One guest run


@dataclass(slots=True, kw_only=True)
class GuestRun:
    """What one boot left behind: the scenario results, the runner's milestones, the console."""

    work: Path
    accel: str
    requested: tuple[str, ...]
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    events: list[RunnerEvent] = field(default_factory=list)
    broken_lines: list[str] = field(default_factory=list)
    exit_status: int | None = None
    qemu_status: int | None = None
    timed_out: bool = False
    timeout_s: float = 0.0
    host_timings: dict[str, float] = field(default_factory=dict)

    @property
    def console(self) -> str:
        try:
            return (self.work / CONSOLE).read_text(errors="replace")
        except OSError:
            return ""

    def event(self, name: str) -> RunnerEvent | None:
        return next((e for e in self.events if e.event == name), None)

    def diagnosis(self) -> str:
        """How the guest ended, and the tail of its console: for failure messages."""
        if self.timed_out:
            how = f"the guest was killed after its hard limit of {self.timeout_s:g} s"
        elif self.exit_status is None:
            how = f"the guest wrote no exit status (qemu exited with {self.qemu_status})"
        else:
            how = f"the guest runner exited with status {self.exit_status}"
        tail = self.console[-_TAIL:]
        broken = "".join(f"\nunparsed result line: {line[:200]}" for line in self.broken_lines)
        return (
            f"{how}; work directory {self.work} (logs/ has the daemons' output){broken}\n"
            f"--- guest console (last {_TAIL} characters) ---\n{tail}"
        )

    def result(self, name: str) -> ScenarioResult:
        """The scenario's result; the test fails, with the console, if there is none."""
        if name not in self.requested:
            pytest.fail(
                f"scenario {name!r} was not run: decorate the test with @uses_scenarios({name!r})",
                pytrace=False,
            )
        found = self.results.get(name)
        if found is None:
            setup = self.event("setup_failed")
            why = f" ({setup.details.get('error')})" if setup else ""
            pytest.fail(f"the guest reported nothing for {name!r}{why}; {self.diagnosis()}")
        return found

    def facts(self, name: str) -> Mapping[str, Any]:
        """The facts of a scenario that ran to its end and left nothing behind; otherwise the
        test fails with the scenario's error, its log and the console."""
        result = self.result(name)
        problems = []
        if result.status is not Status.COMPLETED:
            problems.append(f"scenario {name!r} {result.status.value}: {result.error}")
        if result.leftovers:
            problems.append(
                f"scenario {name!r} left behind (the runner removed them):\n  "
                + "\n  ".join(result.leftovers)
            )
        if problems:
            notes = "\n".join(result.notes)[-_TAIL:]
            facts = "\n".join(f"  {k} = {v!r}"[:300] for k, v in result.facts.items())
            pytest.fail(
                "\n".join(problems)
                + f"\n--- its facts ---\n{facts}\n--- its log ---\n{notes}\n{self.diagnosis()}"
            )
        return result.facts

    def timings(self) -> dict[str, float]:
        """Seconds: host preparation, QEMU's wall time, and the guest's milestones."""
        found = dict(self.host_timings)
        started, ready, finished = (self.event(e) for e in ("started", "ready", "finished"))
        if started is not None:
            python = float(started.details.get("python_started_uptime", started.uptime))
            found["guest_boot_to_python"] = python
            found["guest_imports"] = started.uptime - python
            if ready is not None:
                found["guest_daemons"] = ready.uptime - started.uptime
        if finished is not None:
            found["guest_uptime_at_end"] = finished.uptime
        for name, result in self.results.items():
            found[f"scenario:{name}"] = result.elapsed_s
        return {key: round(value, 2) for key, value in found.items()}


def _guest_command(work: Path, python: str) -> str:
    env = {
        "PYTHONPATH": f"{_TESTS}:{_CHECKOUT}",
        "PYTHONPYCACHEPREFIX": str(work / PYCACHE),
        "PYTHONDONTWRITEBYTECODE": "1",  # the cache is read-only in the guest
        "PYTHONUNBUFFERED": "1",
        "SYSTEMD_IGNORE_CHROOT": "1",  # else udevadm settle returns at once in a chroot
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return (
        "# written by tests/vm/harness.py; run by the guest's init (tests/vm/init)\n"
        f"cd {shlex.quote(str(work))} || exit 111\n"
        f"export {exports}\n"
        f"exec {shlex.quote(python)} -m vm.guest_runner {shlex.quote(str(work))}\n"
    )


def _precompile(work: Path, python: str) -> None:
    """Byte-compile what the guest imports into its cache (see vm.guest_runner.precompile)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONDONTWRITEBYTECODE", "COVERAGE_PROCESS_START")
    }
    env["PYTHONPYCACHEPREFIX"] = str(work / PYCACHE)
    env["PYTHONPATH"] = f"{_TESTS}:{_CHECKOUT}"
    done = subprocess.run(
        [python, "-m", "vm.guest_runner", "--precompile"],
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_PRECOMPILE_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"byte-compiling for the guest failed (status {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-_TAIL:]}",
            pytrace=False,
        )


#: Lines "TAG PATH" in the work directory: host directories under /tmp the guest mounts.
HOST_TMP = "host-tmp"


def _under_tmp(paths: Sequence[Path], work: Path) -> list[Path]:
    """The top directories under /tmp (``/tmp/ci``) that hold ``paths``: the guest's /tmp is
    its own tmpfs, so a checkout or virtualenv there comes into it as a share of its own. The
    work directory has its share already."""
    tops: set[Path] = set()
    for path in paths:
        for p in (Path(os.path.abspath(path)), path.resolve()):
            if Path("/tmp") in p.parents:
                top = Path("/tmp") / p.relative_to("/tmp").parts[0]
                if top != work and top not in work.parents:
                    tops.add(top)
    return sorted(tops)


def boot(
    tools: VmTools,
    work: Path,
    scenarios: Sequence[str],
    *,
    accel: str,
    timeout: float,
    python: str = sys.executable,
) -> GuestRun:
    """Boot one guest that runs ``scenarios`` in order; return once it has powered off or
    been killed at ``timeout`` seconds."""
    work = work.resolve()
    if re.search(r"[\s,]", str(work)):  # the kernel command line and -virtfs split there
        pytest.fail(f"the VM work directory {work!r} has a space or comma in it", pytrace=False)
    shared = _under_tmp((Path(python), Path(sys.prefix), _CHECKOUT), work)
    for top in shared:
        if re.search(r"[\s,]", str(top)):
            pytest.fail(f"{top} (shared with the guest) has a space or comma in it", pytrace=False)
    (work / HOST_TMP).write_text("".join(f"tmp{i} {top}\n" for i, top in enumerate(shared)))
    run = GuestRun(work=work, accel=accel, requested=tuple(scenarios), timeout_s=timeout)
    (work / PYCACHE).mkdir(exist_ok=True)
    (work / REQUEST).write_text(Request(scenarios=tuple(scenarios)).dumps())
    (work / COMMAND).write_text(_guest_command(work, python))
    for stale in (RESULTS, EXIT):
        (work / stale).unlink(missing_ok=True)

    started = time.monotonic()
    _precompile(work, python)
    compiled = time.monotonic()
    initramfs = work / "initramfs.cpio"
    build_initramfs(initramfs, tools.kernel, busybox=tools.busybox)
    built = time.monotonic()
    run.host_timings.update(precompile=compiled - started, initramfs=built - compiled)

    argv = [
        tools.qemu,
        *_accel_args(accel),
        "-smp", str(min(2, os.cpu_count() or 1)),
        "-m", str(_MEMORY_MB),
        "-no-user-config", "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(tools.kernel.vmlinuz),
        "-initrd", str(initramfs),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=4 vmh.work={work}",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={work},mount_tag=work,security_model=none,multidevs=remap",
        "-virtfs",
        f"local,path={work / PYCACHE},mount_tag=pycache,security_model=none,readonly=on,"
        "multidevs=remap",
    ]  # fmt: skip
    for i, top in enumerate(shared):
        argv += [
            "-virtfs",
            f"local,path={top},mount_tag=tmp{i},security_model=none,readonly=on,multidevs=remap",
        ]
    with (work / CONSOLE).open("wb") as console:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console)
        try:
            run.qemu_status = qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            qemu.kill()
            run.qemu_status = qemu.wait()
        except BaseException:
            qemu.kill()
            qemu.wait()
            raise
    run.host_timings["qemu_wall"] = time.monotonic() - built
    try:
        run.exit_status = int((work / EXIT).read_text().strip())
    except (OSError, ValueError):
        run.exit_status = None
    try:
        lines = (work / RESULTS).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    run.events, run.results, run.broken_lines = parse_results(lines)
    return run


def session_guest(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GuestRun:
    """The ``vm_guest`` fixture's body: one boot for every scenario this session asks for."""
    scenarios = requested_scenarios(request.session.items)
    work = tmp_path_factory.mktemp("vm")
    if not scenarios:  # nothing to run: each result() says how to ask for a scenario
        return GuestRun(work=work, accel="none", requested=())
    tools = require_vm()
    accel = choose_accel()
    default_timeout = BOOT_ALLOWANCE_S + _scenario_timeouts(scenarios)
    timeout = float(os.environ.get("VM_TIMEOUT", default_timeout))
    run = boot(tools, work, scenarios, accel=accel, timeout=timeout)
    timings = run.timings()
    (work / "timings.json").write_text(json.dumps(timings, indent=1))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        shown = ", ".join(f"{k} {v:g} s" for k, v in timings.items())
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nVM guest ({accel}, {len(scenarios)} scenarios): {shown}")
    return run
