"""Shared helpers of the benchmarks: timing, medians, result files, tables, and the peers.

The peers are the ones a benchmark talks to on loopback: our own test target run as a separate
process (``python -m pyiscsi_failover.testing``), Debian's ``tgtd`` configured with ``tgtadm``,
and libiscsi's ``iscsi-ls``. Every address is in 127.255.0.0/16 on port :data:`BENCH_PORT`, a
block and port the test suite never uses, so benchmarks and tests can run side by side.

This is IO code outside the package: it may import subprocess and socket. It imports nothing
from ``tests/`` (the few tgt commands it needs are written out here).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = [
    "BENCH_INITIATOR",
    "BENCH_IQN_PREFIX",
    "BENCH_PORT",
    "RESULTS_DIR",
    "BenchError",
    "Clock",
    "PortalSpec",
    "Summary",
    "TargetProcess",
    "Tgtd",
    "ToolRun",
    "WorkerRuns",
    "children_cpu",
    "find_tool",
    "load_average",
    "loopback",
    "machine_facts",
    "print_table",
    "process_cpu",
    "raise_nofile",
    "results_header",
    "results_path",
    "run_iscsi_ls",
    "run_worker",
    "section",
    "self_cpu",
    "utc_now",
    "warn_if_busy",
    "write_json",
]

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
#: The checkout: worker processes run from here, so ``-m benchmarks...`` finds the package.
_ROOT: Final = Path(__file__).resolve().parent.parent
BENCH_PORT: Final = 23260
BENCH_INITIATOR: Final = "iqn.2026-11.org.pyiscsi-failover.bench:initiator"
BENCH_IQN_PREFIX: Final = "iqn.2026-11.org.pyiscsi-failover.bench"
TGT_IPC_DIR: Final = Path("/var/run/tgtd")
# tgtd and tgtadm live in /usr/sbin, which a non-login PATH may lack.
_EXTRA_PATH: Final = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# Control ports (tgtd -C, at most 32767) the benchmarks try; the tests use 1000..32599.
_CONTROL_PORTS: Final = range(32600, 32768)


class BenchError(RuntimeError):
    """A peer could not be started or driven: a harness failure, not a measurement."""


# --------------------------------------------------------------------------------------------
# Numbers


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """The median of repeated measurements, with the spread kept next to it."""

    n: int
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise BenchError("no measurements to summarise")
        return cls(
            n=len(values), median=statistics.median(values), low=min(values), high=max(values)
        )

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "median": self.median, "min": self.low, "max": self.high}


def self_cpu() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def children_cpu() -> float:
    """user+sys CPU seconds of every child this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """user+sys CPU seconds of another (running) process, from /proc; 0.0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Clock:
    """Wall and CPU time of this process over a ``with`` block."""

    __slots__ = ("_cpu0", "_wall0", "sys_s", "user_s", "wall_s")

    def __init__(self) -> None:
        self.wall_s = self.user_s = self.sys_s = 0.0
        self._wall0 = 0.0
        self._cpu0 = (0.0, 0.0)

    def __enter__(self) -> Clock:
        self._cpu0 = self_cpu()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wall_s = time.perf_counter() - self._wall0
        user, sys_ = self_cpu()
        self.user_s = user - self._cpu0[0]
        self.sys_s = sys_ - self._cpu0[1]

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


# --------------------------------------------------------------------------------------------
# Output


def results_path(name: str, *, quick: bool, suffix: str = ".json") -> Path:
    """benchmarks/results/NAME[-quick].json: a quick run never overwrites a full one."""
    return RESULTS_DIR / f"{name}{'-quick' if quick else ''}{suffix}"


def write_json(name: str, payload: Mapping[str, object], *, quick: bool) -> Path:
    path = results_path(name, quick=quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def results_header(
    name: str, *, quick: bool, started_at: str, started: float, machine: Mapping[str, object]
) -> dict[str, object]:
    """The keys every results JSON starts with: which benchmark, how long, on what machine.
    ``started`` is the ``time.monotonic()`` reading taken with ``started_at``."""
    return {
        "benchmark": name,
        "mode": "quick" if quick else "full",
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "load_average_at_end": load_average(),
    }


def run_worker(module: str, spec: Mapping[str, object], *, timeout: float) -> dict[str, object]:
    """Run ``python -m MODULE --worker`` from the checkout with ``spec`` as JSON on stdin, in a
    fresh process (so each measurement starts from a clean interpreter); its JSON result."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        cwd=_ROOT,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        name = module.rpartition(".")[2]
        raise BenchError(f"{name} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


class WorkerRuns:
    """Summaries over ``runs``, the JSON results of :func:`run_worker` processes (wall and CPU
    seconds, peak RSS, outcome counts), for the dataclasses that collect them."""

    __slots__ = ()
    runs: list[dict[str, object]]

    def values(self, key: str) -> list[float]:
        out: list[float] = []
        for run in self.runs:
            value = run[key]
            assert isinstance(value, int | float)
            out.append(float(value))
        return out

    @property
    def wall(self) -> Summary:
        return Summary.of(self.values("wall_s"))

    @property
    def cpu(self) -> Summary:
        return Summary.of(
            [u + s for u, s in zip(self.values("user_s"), self.values("sys_s"), strict=True)]
        )

    @property
    def rss_mib(self) -> float:
        return max(self.values("maxrss_kib")) / 1024

    def all_succeeded(self, candidates: int) -> bool:
        """Whether every run's probe had all ``candidates`` end ``ok``."""
        for run in self.runs:
            outcomes = run["outcomes"]
            assert isinstance(outcomes, dict)
            if outcomes.get("ok", 0) != candidates:
                return False
        return True


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table; numbers (and 'n/a') are right-aligned, text left-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def numeric(text: str) -> bool:
        stripped = text.replace(".", "").replace(",", "").replace("-", "").replace("+", "")
        return stripped.replace(" ", "").isdigit() or text == "n/a"

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if numeric(cell) else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    print()
    print(title)
    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _debian_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _memory_total() -> str | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine inflates wall times."""
    return [round(x, 2) for x in os.getloadavg()]


def warn_if_busy() -> None:
    one_minute = os.getloadavg()[0]
    cpus = len(os.sched_getaffinity(0))
    if one_minute > 0.5 * cpus:
        print(
            f"  note: load average {one_minute:.2f} on {cpus} CPUs before starting: other work "
            "is running, so wall times (and to a lesser degree CPU times) are inflated",
            flush=True,
        )


def _source_state() -> dict[str, object]:
    """The commit measured, and which tracked files differed from it (editable install)."""
    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None:
        return {"commit": None}

    def git(*args: str) -> str | None:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
        return done.stdout if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no")
    commit = git("rev-parse", "HEAD")
    return {
        "commit": None if commit is None else commit.strip(),
        "uncommitted_changes": sorted(line[3:] for line in (changed or "").splitlines()),
    }


def machine_facts() -> dict[str, object]:
    """What a reader needs to compare these numbers with theirs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_total": _memory_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {
            name: _version(name)
            for name in ("pyiscsi-failover", "trio", "construct", "google-crc32c", "matplotlib")
        },
        "debian_packages": {
            name: _debian_version(name) for name in ("tgt", "libiscsi-bin", "open-iscsi")
        },
        "load_average_at_start": load_average(),
        "rlimit_nofile": [soft, hard],
        "source": _source_state(),
    }


def raise_nofile(needed: int) -> dict[str, object]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (children inherit it) if lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    report: dict[str, object] = {"needed": needed, "soft_before": soft, "hard": hard}
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    report["soft_after"] = soft
    report["raised"] = soft != report["soft_before"]
    report["enough"] = soft == resource.RLIM_INFINITY or soft >= needed
    return report


def loopback(block: int, index: int) -> str:
    """127.255.BLOCK.(INDEX+1): up to 254 addresses per block, each benchmark its own block."""
    if not 1 <= block <= 254 or not 0 <= index < 254:
        raise BenchError(f"no benchmark address for block {block}, index {index}")
    return f"127.255.{block}.{index + 1}"


def find_tool(name: str) -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    return shutil.which(name, path=search)


def _wait_for_line(process: subprocess.Popen[str], wanted: str, deadline: float) -> bool:
    """Read lines of a child's stdout until ``wanted``; False on EOF, exit or the deadline."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not selector.select(remaining):
                continue
            line = process.stdout.readline()
            if not line:
                return False
            if line.strip() == wanted:
                return True


def _stop(process: subprocess.Popen[str], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps the child."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# Our test target, as a separate process


@dataclass(frozen=True, slots=True, kw_only=True)
class PortalSpec:
    name: str
    host: str
    port: int
    faults: tuple[str, ...] = ()


class TargetProcess:
    """``python -m pyiscsi_failover.testing`` serving ``portals`` and ``targets``.

    Started in its own process so that its CPU does not count as ours. It prints its portals on
    stderr (a file here: thousands of lines would fill a pipe before ``ready``) and ``ready``
    on stdout; SIGTERM stops it. ``chap`` is (user, secret), written to a 0600 file.
    """

    def __init__(
        self,
        *,
        portals: Sequence[PortalSpec],
        targets: Sequence[str],
        chap: tuple[str, str] | None = None,
        ready_timeout: float = 60.0,
        launcher: Sequence[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.portals = tuple(portals)
        self.targets = tuple(targets)
        self._chap = chap
        self._ready_timeout = ready_timeout
        # What runs the target's command line (e.g. a profiling wrapper); cwd for that wrapper.
        self._launcher = (
            tuple(launcher)
            if launcher is not None
            else (sys.executable, "-m", "pyiscsi_failover.testing")
        )
        self._cwd = cwd
        self._workdir: Path | None = None
        self._process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError("the test target is not running")
        return self._process.pid

    def address(self, name: str) -> str:
        for portal in self.portals:
            if portal.name == name:
                return f"{portal.host}:{portal.port}"
        raise BenchError(f"no portal named {name!r}")

    def portal_addresses(self) -> list[str]:
        """Every portal as HOST:PORT, in the order given."""
        return [f"{portal.host}:{portal.port}" for portal in self.portals]

    def start(self) -> TargetProcess:
        if self._process is not None:
            raise BenchError("this test target is already running")
        self._workdir = Path(tempfile.mkdtemp(prefix="pyiscsi-bench-target-"))
        argv = list(self._launcher)
        for portal in self.portals:
            argv += ["--portal", f"{portal.name}={portal.host}:{portal.port}"]
            argv += [
                arg for fault in portal.faults for arg in ("--fault", f"{portal.name}={fault}")
            ]
        for target in self.targets:
            argv += ["--target", target]
        if self._chap is not None:
            chap_file = self._workdir / "chap"
            descriptor = os.open(chap_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(f"chap {self._chap[0]}:{self._chap[1]}\n")
            argv += ["--chap-file", str(chap_file)]
        log_path = self._workdir / "stderr.log"
        with log_path.open("w", encoding="utf-8") as log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=self._cwd,
            )
        deadline = time.monotonic() + self._ready_timeout
        if not _wait_for_line(self._process, "ready", deadline):
            log_text = log_path.read_text(errors="replace")[-2000:]
            self.stop()
            raise BenchError(f"the test target did not get ready:\n{log_text}")
        return self

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process, grace_s=10.0)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TargetProcess:
        return self if self._process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# tgtd


def _control_port_free(port: int) -> bool:
    """tgtd holds a POSIX lock on socket.PORT.lock while it runs; a free port has none."""
    lock = TGT_IPC_DIR / f"socket.{port}.lock"
    try:
        descriptor = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.lockf(descriptor, fcntl.LOCK_UN)
        return True
    finally:
        os.close(descriptor)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Tgtd:
    """A throw-away ``tgtd -f -C N --iscsi portal=HOST:PORT`` and its ``tgtadm`` commands.

    tgt 1.0.85 facts this relies on: tgtd prints no ready line (we poll ``tgtadm --op show``
    and the portal); it ignores SIGTERM and leaves on ``--op delete --mode system`` once no
    target is left, so targets are force-deleted first and SIGKILL is the fallback; it leaves
    ``socket.N`` and ``socket.N.lock`` behind, which :meth:`stop` removes.
    """

    def __init__(self, host: str, port: int = BENCH_PORT, *, ready_timeout: float = 15.0) -> None:
        tgtd, tgtadm = find_tool("tgtd"), find_tool("tgtadm")
        if tgtd is None or tgtadm is None:
            raise BenchError("tgtd/tgtadm not found (Debian package tgt)")
        self.host = host
        self.port = port
        self._tgtd = tgtd
        self._tgtadm = tgtadm
        self._ready_timeout = ready_timeout
        self._workdir: Path | None = None
        self._process: subprocess.Popen[str] | None = None
        self.control_port = -1
        self._target_ids: list[int] = []

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchError("tgtd is not running")
        return self._process.pid

    def start(self) -> Tgtd:
        if self._process is not None:
            raise BenchError("this tgtd is already running")
        self._workdir = Path(tempfile.mkdtemp(prefix="pyiscsi-bench-tgtd-"))
        for port in _CONTROL_PORTS:
            if not _control_port_free(port):
                continue
            if self._launch(port):
                return self
        self.stop()
        raise BenchError("no free tgtd control port in 32600..32767")

    def _launch(self, control_port: int) -> bool:
        assert self._workdir is not None
        log_path = self._workdir / f"tgtd-{control_port}.log"
        argv = [self._tgtd, "-f", "-C", str(control_port), "--iscsi"]
        argv.append(f"portal={self.host}:{self.port}")
        with log_path.open("w", encoding="utf-8") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True
            )
        self._process, self.control_port = process, control_port
        deadline = time.monotonic() + self._ready_timeout
        while True:
            log_text = log_path.read_text(errors="replace")
            if process.poll() is not None:
                self._forget_ipc()
                self._process = None
                if "another tgtd is using" in log_text:
                    return False  # lost a race for the control port: try the next one
                raise BenchError(f"tgtd exited while starting:\n{log_text}")
            if "failed to create/bind to portal" in log_text:
                self.stop()
                raise BenchError(f"tgtd could not bind {self.host}:{self.port}:\n{log_text}")
            shown = self._run(["--op", "show", "--mode", "target"], timeout=2.0)
            if shown is not None and shown.returncode == 0 and _accepts(self.host, self.port):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"tgtd not ready after {self._ready_timeout} s:\n{log_text}")
            time.sleep(0.02)  # polling tgtd's readiness, which it does not announce

    def _run(
        self, args: Sequence[str], *, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str] | None:
        argv = [self._tgtadm, "-C", str(self.control_port), "--lld", "iscsi", *args]
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return None

    def tgtadm(self, *args: str) -> str:
        done = self._run(args)
        if done is None or done.returncode != 0:
            # Only account commands carry a secret, and those are never shown.
            shown = "account command" if "account" in args else " ".join(args)
            why = "timed out" if done is None else (done.stderr or done.stdout).strip()
            raise BenchError(f"tgtadm {shown} failed: {why}")
        return done.stdout

    def add_target(self, tid: int, iqn: str) -> None:
        """A target open to every initiator; tgt gives it LUN 0 (a controller) by itself."""
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "--targetname", iqn)
        self._target_ids.append(tid)
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")

    def add_disk(
        self, tid: int, lun: int, *, size_mib: int = 1, backing: Path | None = None
    ) -> Path:
        """LUN ``lun`` of ``tid`` as a disk (type 0x00) on a sparse file; returns the file.

        Pass the ``backing`` of an earlier disk to put the same volume under another target.
        The file lives in this tgtd's work directory and goes with :meth:`stop`.
        """
        if self._workdir is None:
            raise BenchError("tgtd is not running")
        if backing is None:
            backing = self._workdir / f"tid{tid}-lun{lun}.img"
            with backing.open("wb") as handle:
                handle.truncate(size_mib * 1024 * 1024)
        where = ("--tid", str(tid), "--lun", str(lun))
        self.tgtadm("--op", "new", "--mode", "logicalunit", *where, "--backing-store", str(backing))
        return backing

    def set_scsi_id(self, tid: int, lun: int, scsi_id: str) -> None:
        """Give an LU tgt's ``scsi_id`` (its T10 and NAA 6 designators, hence its WWID)."""
        where = ("--tid", str(tid), "--lun", str(lun))
        self.tgtadm(
            "--op", "update", "--mode", "logicalunit", *where, "--params", f"scsi_id={scsi_id}"
        )

    def add_portal(self, host: str, port: int = BENCH_PORT) -> None:
        self.tgtadm("--op", "new", "--mode", "portal", "--param", f"portal={host}:{port}")

    def require_chap(self, tid: int, user: str, secret: str) -> None:
        """Create the account (once) and bind it to ``tid``: logins to it then need CHAP."""
        accounts = self.tgtadm("--op", "show", "--mode", "account")
        if user not in accounts.split():
            self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", secret)
        self.tgtadm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user)

    def _forget_ipc(self) -> None:
        for suffix in ("", ".lock"):
            (TGT_IPC_DIR / f"socket.{self.control_port}{suffix}").unlink(missing_ok=True)

    def stop(self) -> None:
        process = self._process
        if process is not None:
            try:
                if process.poll() is None:
                    for tid in self._target_ids:
                        self._run(
                            ["--op", "delete", "--force", "--mode", "target", "--tid", str(tid)]
                        )
                    self._run(["--op", "delete", "--mode", "system"])
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=5.0)
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
                self._forget_ipc()
                self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Tgtd:
        return self if self._process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# iscsi-ls (libiscsi)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolRun:
    """One run of an external tool. ``returncode`` None: killed at the cap."""

    returncode: int | None
    wall_s: float
    cpu_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_iscsi_ls(
    iscsi_ls: str,
    portal: str,
    *,
    cap_s: float,
    chap: tuple[str, str] | None = None,
    initiator_name: str = BENCH_INITIATOR,
    extra: Sequence[str] = (),
) -> ToolRun:
    """``iscsi-ls -i NAME iscsi://PORTAL/`` (a discovery login, SendTargets, logout).

    libiscsi has no connect or login timeout of its own, so the run is killed after ``cap_s``
    (what ``timeout CAP iscsi-ls ...`` would do, without a second process to account for).
    CHAP goes through libiscsi's environment variables, never argv. ``cpu_s`` is the child's
    user+sys time (RUSAGE_CHILDREN), process start-up included.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIBISCSI_")}
    if chap is not None:
        env["LIBISCSI_CHAP_USERNAME"], env["LIBISCSI_CHAP_PASSWORD"] = chap
    argv = [iscsi_ls, *extra]
    if not extra:
        argv += ["-i", initiator_name, f"iscsi://{portal}/"]
    cpu0 = children_cpu()
    wall0 = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=cap_s,
            check=False,
        )
        code: int | None = done.returncode
    except subprocess.TimeoutExpired:
        code = None  # subprocess.run killed and reaped it
    wall = time.perf_counter() - wall0
    return ToolRun(returncode=code, wall_s=wall, cpu_s=children_cpu() - cpu0)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    """Print a heading and, at the end, how long the section took."""
    print(f"\n=== {title} ===", flush=True)
    started = time.monotonic()
    try:
        yield
    finally:
        print(f"=== {title}: {time.monotonic() - started:.1f} s ===", flush=True)
