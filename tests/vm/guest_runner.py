"""The guest's one Python process: start the daemons, run the requested scenarios, report each.

``python -m vm.guest_runner WORKDIR`` (in the guest, from the command the harness wrote) reads
``WORKDIR/request.json``, starts udevd, iscsid and tgtd, then runs each scenario under its own
deadline and appends its :class:`~vm.protocol.ScenarioResult` to ``WORKDIR/results.jsonl``.
After every scenario it checks that no iSCSI session and no node record is left over (and
removes any, so that the next scenario starts clean).

``python -m vm.guest_runner --precompile`` (on the host, with PYTHONPYCACHEPREFIX set) imports
and byte-compiles everything the guest will import, because compiling under emulation, where
the guest cannot even keep the result, costs seconds.
"""

from __future__ import annotations

import compileall
import importlib
import json
import os
import pkgutil
import runpy  # noqa: F401 (python -m pyiscsi_failover needs it: precompiled with us)
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import trio

import pyiscsi_failover
from vm import scenarios  # noqa: F401 (registers the scenarios)
from vm.guest import (
    SCENARIOS,
    Daemon,
    GuestTgtd,
    ScenarioContext,
    ScenarioError,
    run,
    start_iscsid,
    start_udevd,
    uptime,
)
from vm.protocol import REQUEST, RESULTS, Request, RunnerEvent, ScenarioResult, Status

_CLEANUP_SECONDS = 60.0
_KERNEL_MODULES = ("iscsi_tcp", "sd_mod")
#: Imported at run time by the standard library (seen in the "uncached_modules" report).
_LAZY_STDLIB = ("encodings.idna", "stringprep")


class Reporter:
    """Appends one JSON line per record to the results file, flushed at once (a guest that
    dies later still leaves it), and says the same on the console."""

    def __init__(self, path: Path) -> None:
        self._out = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())

    def event(self, event: str, **details: Any) -> None:
        self.write(RunnerEvent(event=event, uptime=uptime(), details=details).to_json())
        print(f"vm-runner: {event} [uptime {uptime():.2f}]", flush=True)

    def scenario(self, result: ScenarioResult) -> None:
        self.write(result.to_json())
        print(
            f"vm-runner: scenario {result.name}: {result.status.value} in "
            f"{result.elapsed_s:.2f} s" + (f" ({result.error})" if result.error else ""),
            flush=True,
        )

    def close(self) -> None:
        self._out.close()


def _process_started_uptime() -> float:
    """When this interpreter was started, in guest uptime (field 22 of /proc/self/stat)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


async def _listed(*args: str) -> list[str]:
    """``iscsiadm -m ARGS``' lines; none when it says there are none (exit 21)."""
    done = await run(["iscsiadm", "-m", *args], check=False)
    return done.stdout.splitlines() if done.returncode == 0 else []


async def _leftovers() -> list[str]:
    """Sessions and node records still there; removed, so that the next scenario starts clean
    (whatever could not be removed is reported as well)."""
    found = [f"session: {line}" for line in await _listed("session")]
    if found:
        await run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False)
        await run(["udevadm", "settle", "-t", "20"], check=False)
    records = await _listed("node")
    found += [f"node record: {line}" for line in records]
    if records:
        await run(["iscsiadm", "-m", "node", "-o", "delete"], check=False)
    if found:
        found += [f"NOT REMOVED: session: {line}" for line in await _listed("session")]
        found += [f"NOT REMOVED: node record: {line}" for line in await _listed("node")]
    return found


async def _run_one(name: str, tgtd: GuestTgtd, work: Path) -> ScenarioResult:
    spec = SCENARIOS.get(name)
    started_uptime = uptime()
    started = time.monotonic()
    if spec is None:
        return ScenarioResult(
            name=name,
            status=Status.FAILED,
            error=f"no scenario named {name!r} (known: {', '.join(SCENARIOS)})",
            started_uptime=started_uptime,
        )
    directory = work / "scenarios" / name
    directory.mkdir(parents=True, exist_ok=True)
    ctx = ScenarioContext(name, tgtd=tgtd, work=directory, python=sys.executable)
    status, error = Status.COMPLETED, None
    try:
        with trio.fail_after(spec.timeout):
            await spec.run(ctx)
    except trio.TooSlowError:
        status, error = Status.TIMED_OUT, f"did not finish within its {spec.timeout:g} s"
    except ScenarioError as exc:
        status, error = Status.FAILED, str(exc)
    except Exception as exc:  # a bug in a scenario is reported, not fatal
        status, error = Status.FAILED, "".join(traceback.format_exception(exc)).strip()
    elapsed = time.monotonic() - started
    leftovers: list[str] = []
    with trio.move_on_after(_CLEANUP_SECONDS) as cleanup:
        cleanup.shield = True
        await ctx.undo_all()
        leftovers = await _leftovers()
    if cleanup.cancelled_caught:
        leftovers.append(f"cleanup did not finish within {_CLEANUP_SECONDS:g} s")
    return ScenarioResult(
        name=name,
        status=status,
        error=error,
        facts=ctx.facts,
        notes=tuple(ctx.notes),
        leftovers=tuple(leftovers),
        started_uptime=started_uptime,
        elapsed_s=elapsed,
    )


async def _start_services(work: Path, reporter: Reporter) -> tuple[list[Daemon], GuestTgtd]:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    await run(["modprobe", "-a", *_KERNEL_MODULES])
    env = {**os.environ, "SYSTEMD_IGNORE_CHROOT": "1"}
    daemons: list[Daemon] = []
    try:
        daemons.append(await start_udevd(logs / "udevd.log", env))
        daemons.append(await start_iscsid(logs / "iscsid.log"))
        tgtd = await GuestTgtd.start(logs / "tgtd.log", Path("/run/vm-tgtd"))
        daemons.append(tgtd.daemon)
    except BaseException:
        with trio.CancelScope(shield=True):
            for daemon in daemons:
                await daemon.stop()
        raise
    reporter.event("ready", daemons=[d.name for d in daemons])
    return daemons, tgtd


def _uncached_modules() -> list[str]:
    """Modules imported from source with no byte code in the cache: the host's precompile
    missed them, and the guest compiled each one (slowly) in memory."""
    missing = []
    for name, module in list(sys.modules.items()):
        cached = getattr(module, "__cached__", None)
        if cached and not Path(cached).exists():
            missing.append(name)
    return sorted(missing)


async def main(work: Path) -> int:
    python_started = _process_started_uptime()
    reporter = Reporter(work / RESULTS)
    try:
        reporter.event("started", python_started_uptime=python_started)
        return await _run_request(Request.loads((work / REQUEST).read_text()), work, reporter)
    finally:
        reporter.event("finished", uncached_modules=_uncached_modules())
        reporter.close()


async def _run_request(request: Request, work: Path, reporter: Reporter) -> int:
    try:
        daemons, tgtd = await _start_services(work, reporter)
    except Exception as exc:  # reported for every scenario
        error = f"runner setup failed: {exc}"
        reporter.event("setup_failed", error=error)
        for name in request.scenarios:
            reporter.scenario(ScenarioResult(name=name, status=Status.FAILED, error=error))
        return 1
    try:
        for name in request.scenarios:
            reporter.scenario(await _run_one(name, tgtd, work))
    finally:
        with trio.CancelScope(shield=True):
            for daemon in reversed(daemons):
                await daemon.stop()
    return 0


def precompile() -> None:
    """Import (so byte-compile) every module of the package and of these tests, and what
    ``python -m pyiscsi_failover`` needs: run on the host into the guest's pycache prefix."""
    if sys.pycache_prefix is None:
        raise SystemExit("--precompile needs PYTHONPYCACHEPREFIX")
    # The standard library's own lazy imports: name resolution loads the IDNA codec.
    for name in _LAZY_STDLIB:
        importlib.import_module(name)
    package = Path(pyiscsi_failover.__file__).parent
    for info in pkgutil.walk_packages([str(package)], prefix="pyiscsi_failover."):
        # The os-brick connector needs the optional os-brick extra; the guest never runs it.
        if not info.name.endswith("__main__") and not info.name.startswith(
            "pyiscsi_failover.os_brick"
        ):
            importlib.import_module(info.name)
    for directory in (package, Path(__file__).parent):
        compileall.compile_dir(directory, quiet=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--precompile"]:
        precompile()
        sys.exit(0)
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m vm.guest_runner WORKDIR | --precompile")
    sys.exit(trio.run(main, Path(sys.argv[1])))
