"""Inside the guest: the daemons, commands with deadlines, and what a scenario gets to work with.

A scenario is an async function registered with :func:`scenario`; the runner
(:mod:`vm.guest_runner`) calls it with a :class:`ScenarioContext` under its own deadline.
It records what it observes with :meth:`ScenarioContext.fact` (JSON values; the host test
asserts on them) and raises :class:`ScenarioError` only when it cannot go on. Whatever it
registered with :meth:`ScenarioContext.defer` (or :meth:`ScenarioContext.target`) is undone
afterwards, pass or fail.

This module runs only in the guest (it starts daemons and writes to /dev), but importing it is
harmless: the host imports it to check scenario names.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import trio

__all__ = [
    "SCENARIOS",
    "Completed",
    "Daemon",
    "GuestTgtd",
    "ScenarioContext",
    "ScenarioError",
    "ScenarioSpec",
    "TargetHandle",
    "TestTargetHandle",
    "run",
    "scenario",
    "until",
    "uptime",
]

_POLL = 0.05
#: How long a daemon may take to answer after it was started.
DAEMON_READY_S = 30.0


class ScenarioError(Exception):
    """A scenario (or the runner's setup) cannot go on; the message says what was seen."""


def uptime() -> float:
    """Seconds since the guest booted, as the init's and the runner's messages show them."""
    return float(Path("/proc/uptime").read_text().split()[0])


# --------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def outcome(self, limit: int = 600) -> str:
        """Its status, how long it took and its output, trimmed."""
        output = (self.stdout + self.stderr).strip()
        if len(output) > limit:
            output = output[:limit] + " [...]"
        return f"-> {self.returncode} ({self.elapsed_s:.2f} s)" + (f"\n{output}" if output else "")

    def summary(self) -> str:
        """The command and its outcome: for errors."""
        return f"$ {self.command} {self.outcome()}"


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    ok: Sequence[int] = (0,),
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run a command to its end; :class:`ScenarioError` if it cannot start or, with ``check``,
    if its status is not in ``ok``. The caller's deadline bounds it (a cancelled command is
    killed at once)."""
    args = tuple(os.fspath(a) for a in argv)
    started = time.monotonic()
    try:
        done = await trio.run_process(
            args,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            check=False,
            env=None if env is None else dict(env),
            deliver_cancel=_kill,
        )
    except OSError as exc:
        raise ScenarioError(f"$ {shlex.join(args)}: cannot run: {exc}") from None
    result = Completed(
        argv=args,
        returncode=done.returncode,
        stdout=done.stdout.decode(errors="replace"),
        stderr=done.stderr.decode(errors="replace"),
        elapsed_s=time.monotonic() - started,
    )
    if check and result.returncode not in ok:
        raise ScenarioError(result.summary())
    return result


async def _kill(process: trio.Process) -> None:
    # Our daemons and commands get no grace period: tgtd ignores SIGTERM anyway.
    process.kill()


async def until(predicate: Callable[[], bool] | Callable[[], Awaitable[bool]]) -> None:
    """Return once ``predicate`` is true, checking every 50 ms; the caller's deadline bounds it.

    Polling is the only way to wait here: udev and the SCSI layer tell a process nothing.
    """
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        await trio.sleep(_POLL)


# --------------------------------------------------------------------------------------------
# Daemons


class Daemon:
    """A daemon run in the foreground as our child, its output in a log file."""

    def __init__(self, name: str, process: trio.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> Daemon:
        with log.open("wb") as out:
            process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
            )
        return cls(name, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


async def wait_ready(daemon: Daemon, check: Callable[[], Awaitable[bool]]) -> None:
    """Return once ``check`` passes; :class:`ScenarioError` (with the daemon's log) if the
    daemon exits or is not ready within :data:`DAEMON_READY_S`."""

    async def ready() -> bool:
        if not daemon.alive():
            raise ScenarioError(
                f"{daemon.name} exited with status {daemon.process.returncode} while starting:"
                f"\n{daemon.log_tail()}"
            )
        return await check()

    try:
        with trio.fail_after(DAEMON_READY_S):
            await until(ready)
    except trio.TooSlowError:
        raise ScenarioError(
            f"{daemon.name} not ready after {DAEMON_READY_S:g} s:\n{daemon.log_tail()}"
        ) from None


async def _status_in(argv: Sequence[str], codes: Sequence[int]) -> bool:
    done = await run(argv, check=False)
    return done.returncode in codes


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


async def start_udevd(logs: Path, env: Mapping[str, str]) -> Daemon:
    daemon = await Daemon.start(
        "systemd-udevd", ["/lib/systemd/systemd-udevd", "--resolve-names=never"], logs, env
    )
    await wait_ready(daemon, lambda: _status_in(["udevadm", "control", "--ping"], (0,)))
    return daemon


async def start_iscsid(logs: Path) -> Daemon:
    daemon = await Daemon.start("iscsid", ["iscsid", "-f"], logs)
    # iscsiadm answers "no active sessions" (21) only once it can talk to iscsid.
    await wait_ready(daemon, lambda: _status_in(["iscsiadm", "-m", "session"], (0, 21)))
    return daemon


class GuestTgtd:
    """tgtd on 127.0.0.1:3260 in the guest. Its control socket is in the guest's own /run, so
    any control port would do; 7 is simply not tgt's default 0."""

    CONTROL = "7"
    TGTADM = ("tgtadm", "-C", CONTROL, "--lld", "iscsi")
    HOST = "127.0.0.1"
    PORT = 3260

    def __init__(self, daemon: Daemon, backing_dir: Path) -> None:
        self.daemon = daemon
        self.backing_dir = backing_dir

    @property
    def portal(self) -> str:
        return f"{self.HOST}:{self.PORT}"

    @classmethod
    async def start(cls, logs: Path, backing_dir: Path) -> GuestTgtd:
        portal = f"portal={cls.HOST}:{cls.PORT}"
        daemon = await Daemon.start(
            "tgtd", ["tgtd", "-f", "-C", cls.CONTROL, "--iscsi", portal], logs
        )
        show = [*cls.TGTADM, "--op", "show", "--mode", "target"]

        async def ready() -> bool:
            return await _status_in(show, (0,)) and _listening(cls.HOST, cls.PORT)

        await wait_ready(daemon, ready)
        await trio.Path(backing_dir).mkdir(parents=True, exist_ok=True)
        return cls(daemon, backing_dir)

    async def tgtadm(self, *args: str, check: bool = True) -> Completed:
        return await run([*self.TGTADM, *args], check=check)

    async def new_target(self, tid: int, iqn: str, luns: Mapping[int, int]) -> TargetHandle:
        """Target ``tid`` with a sparse file-backed LUN per ``{lun: size_bytes}``, open to all."""
        await self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        handle = TargetHandle(tid=tid, iqn=iqn, portal=self.portal)
        try:
            for lun, size in luns.items():
                backing = self.backing_dir / f"tid{tid}-lun{lun}.img"
                with backing.open("wb") as out:
                    out.truncate(size)
                handle.backing[lun] = backing
                unit = ("--tid", str(tid), "--lun", str(lun), "-b", str(backing))
                await self.tgtadm("--op", "new", "--mode", "logicalunit", *unit)
            await self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_target(handle)
            raise
        return handle

    async def delete_target(self, handle: TargetHandle) -> None:
        await self.tgtadm(
            "--op", "delete", "--force", "--mode", "target", "--tid", str(handle.tid), check=False
        )
        for backing in handle.backing.values():
            backing.unlink(missing_ok=True)

    async def new_portal(self, host: str, port: int = PORT) -> str:
        """Serve every target on ``host:port`` as well; the portal as iscsiadm writes it."""
        portal = f"{host}:{port}"
        await self.tgtadm("--op", "new", "--mode", "portal", "--param", f"portal={portal}")
        return portal

    async def delete_portal(self, portal: str) -> None:
        await self.tgtadm(
            "--op", "delete", "--mode", "portal", "--param", f"portal={portal}", check=False
        )

    async def new_account(self, tid: int, user: str, password: str, *, outgoing: bool) -> None:
        """A CHAP account bound to target ``tid``: one the initiator must prove (incoming), or
        the one the target answers a mutual challenge with (``outgoing``). The password is
        never written to a log: tgtadm runs through :func:`run`, not a scenario's ``sh``."""
        new = ["--op", "new", "--mode", "account", "--user", user, "--password", password]
        done = await self.tgtadm(*new, check=False)
        if done.returncode != 0:  # not done.summary(): it would show the password
            raise ScenarioError(
                f"tgtadm could not create CHAP account {user} (password ***): "
                f"{done.stdout.strip()} {done.stderr.strip()}"
            )
        bind = ["--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user]
        try:
            await self.tgtadm(*bind, *(["--outgoing"] if outgoing else []))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.delete_account(user)
            raise

    async def delete_account(self, user: str) -> None:
        await self.tgtadm("--op", "delete", "--mode", "account", "--user", user, check=False)


@dataclass(slots=True, kw_only=True)
class TargetHandle:
    tid: int
    iqn: str
    portal: str
    backing: dict[int, Path] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TestTargetHandle:
    """What a running test target said before ``ready``: its portals by name (``host:port``)
    and its LUNs, ``(iqn, lun) -> (bytes, naa.WWID)``."""

    __test__: ClassVar[bool] = False  # not a pytest test class, whatever its name says

    portals: Mapping[str, str]
    luns: Mapping[tuple[str, int], tuple[int, str]]

    @classmethod
    def parse(cls, output: str) -> TestTargetHandle:
        portals: dict[str, str] = {}
        luns: dict[tuple[str, int], tuple[int, str]] = {}
        for line in output.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "portal":
                portals[words[1]] = words[2].partition(",")[0]
            elif len(words) == 5 and words[0] == "lun":
                luns[(words[1], int(words[2]))] = (int(words[3]), words[4])
        return cls(portals=portals, luns=luns)


# --------------------------------------------------------------------------------------------
# Scenarios

Facts: TypeAlias = dict[str, Any]


class ScenarioContext:
    """What a scenario gets: the shared tgtd, a directory of its own, facts, notes, cleanup."""

    def __init__(self, name: str, *, tgtd: GuestTgtd, work: Path, python: str) -> None:
        self.name = name
        self.tgtd = tgtd
        self.work = work
        self.python = python
        self.facts: Facts = {}
        self.notes: list[str] = []
        self._undo: list[Callable[[], Awaitable[None]]] = []
        self._started = time.monotonic()

    def fact(self, key: str, value: Any) -> Any:
        """Record an observation for the host test (a JSON value) and return it."""
        self.facts[key] = value
        return value

    def note(self, text: str) -> None:
        self.notes.append(f"[{time.monotonic() - self._started:7.2f}] {text}")

    async def sh(
        self, *argv: str | os.PathLike[str], check: bool = True, ok: Sequence[int] = (0,)
    ) -> Completed:
        """:func:`run`, noted in this scenario's log (its start too: if the scenario's
        deadline strikes, the log shows which command was still running)."""
        self.note(f"$ {shlex.join(os.fspath(a) for a in argv)}")
        done = await run(argv, check=False)
        self.note(f"  {done.outcome()}")
        if check and done.returncode not in ok:
            raise ScenarioError(done.summary())
        return done

    async def until(
        self, predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], *, what: str
    ) -> None:
        """:func:`until`, with how long it took (or that it was given up) in the log."""
        started = time.monotonic()
        try:
            await until(predicate)
        except trio.Cancelled:
            self.note(f"{what}: not yet after {time.monotonic() - started:.2f} s, given up")
            raise
        self.note(f"{what}: after {time.monotonic() - started:.2f} s")

    def defer(self, undo: Callable[[], Awaitable[None]]) -> None:
        """Run ``undo`` after the scenario, pass or fail (last registered, first run)."""
        self._undo.append(undo)

    async def target(self, iqn: str, *, tid: int, luns: Mapping[int, int]) -> TargetHandle:
        """A tgtd target for this scenario only; deleted after it."""
        handle = await self.tgtd.new_target(tid, iqn, luns)
        self.defer(lambda: self.tgtd.delete_target(handle))
        self.note(f"tgtd target {tid} {iqn} at {handle.portal}, LUNs {dict(luns)}")
        return handle

    async def chap_account(
        self, target: TargetHandle, user: str, password: str, *, outgoing: bool = False
    ) -> None:
        """A tgtd CHAP account on ``target`` for this scenario only (see
        :meth:`GuestTgtd.new_account`); deleted after it."""
        await self.tgtd.new_account(target.tid, user, password, outgoing=outgoing)
        self.defer(lambda: self.tgtd.delete_account(user))
        direction = "outgoing (mutual)" if outgoing else "incoming"
        self.note(f"tgtd target {target.tid}: {direction} CHAP account {user} (password ***)")

    async def tgtd_portal(self, host: str) -> str:
        """tgtd serving on ``host`` too, for this scenario only; the portal ``host:3260``."""
        portal = await self.tgtd.new_portal(host)
        self.defer(lambda: self.tgtd.delete_portal(portal))
        self.note(f"tgtd portal {portal}")
        return portal

    async def loopback_address(self, address: str) -> None:
        """``address``/32 on ``lo`` for this scenario only: a portal address that can be taken
        away (``ip addr del``) while a session uses it, and nothing else answers for it."""
        await self.sh("ip", "addr", "add", f"{address}/32", "dev", "lo")

        async def remove() -> None:
            await self.sh("ip", "addr", "del", f"{address}/32", "dev", "lo", check=False)

        self.defer(remove)

    async def test_target(self, *args: str) -> TestTargetHandle:
        """Our own test target, ``python -m pyiscsi_failover.testing ARGS``, as a process of
        its own for this scenario (stopped after it), once it said ``ready``.

        A process, not :func:`~pyiscsi_failover.testing.serve_target` in the runner: the
        kernel's SCSI scan runs inside a write to sysfs, which blocks the writer's thread, and
        a target served by that same thread would never answer the scan."""
        log = self.work / "test-target.log"
        argv = [self.python, "-m", "pyiscsi_failover.testing", *args]
        self.note(f"$ {shlex.join(argv)} (output in {log})")
        daemon = await Daemon.start("test target", argv, log)
        self.defer(daemon.stop)

        async def ready() -> bool:
            return "ready" in daemon.log_tail(100_000).splitlines()

        await wait_ready(daemon, ready)
        handle = TestTargetHandle.parse(daemon.log_tail(100_000))
        self.note(f"test target ready: {handle}")
        return handle

    async def undo_all(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                await undo()
            except Exception as exc:  # every undo gets its turn
                self.note(f"cleanup failed: {exc!r}")


ScenarioFunction: TypeAlias = Callable[[ScenarioContext], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScenarioSpec:
    name: str
    run: ScenarioFunction
    timeout: float
    doc: str


#: Every scenario, by name, in the order they were defined (the order they run in).
SCENARIOS: dict[str, ScenarioSpec] = {}


def scenario(*, timeout: float) -> Callable[[ScenarioFunction], ScenarioFunction]:
    """Register an ``async def name(ctx)`` as scenario ``name``, with its own deadline."""

    def register(function: ScenarioFunction) -> ScenarioFunction:
        name = function.__name__
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is defined twice")
        SCENARIOS[name] = ScenarioSpec(
            name=name, run=function, timeout=timeout, doc=(function.__doc__ or "").strip()
        )
        return function

    return register
