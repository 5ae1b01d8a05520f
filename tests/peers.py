"""Test harness for real peers from Debian: tgt's ``tgtd``/``tgtadm`` and libiscsi's ``iscsi-ls``.

Peer tests prove that what we build talks to implementations we did not write. This module finds
(or, as root, installs) the tools, hands out loopback addresses that do not clash between tests
or concurrent pytest processes, runs throw-away ``tgtd`` daemons on them and runs ``iscsi-ls``.
It is test code: it may import subprocess, socket and pytest, and it never touches anything but
loopback addresses, its own temporary files and the daemons it started.

Facts about tgt 1.0.85 (Debian 12) this relies on, checked by ``tests/test_peers.py``:

* ``tgtd -f -C N --iscsi portal=HOST:PORT`` runs in the foreground, listens only on that portal
  and takes its management requests on the Unix socket ``/var/run/tgtd/socket.N`` (``tgtadm -C
  N``). It prints no "ready" line, so readiness is polled with ``tgtadm --op show``.
* If the portal cannot be bound, tgtd logs ``failed to create/bind to portal`` and keeps running
  without it; if another tgtd holds control port N it exits (``another tgtd is using``).
* tgtd catches SIGTERM and ignores it. It exits on ``tgtadm --op delete --mode system``, which is
  refused while any target exists, so targets are force-deleted first; SIGKILL is the fallback.
  It leaves ``socket.N`` and ``socket.N.lock`` behind, which :meth:`Tgtd.stop` removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol

import pytest

__all__ = [
    "IscsiLsTarget",
    "PeerError",
    "Tgtd",
    "TgtdStarter",
    "iscsi_ls",
    "iscsi_url",
    "iter_ipc_files",
    "parse_iscsi_ls",
    "pid_alive",
    "require_tool",
    "unique_loopback",
]

#: Where tgt keeps its management sockets (compiled into tgtd and tgtadm).
TGT_IPC_DIR = Path("/var/run/tgtd")

_APT_TIMEOUT = 600.0
_TGTADM_TIMEOUT = 10.0
_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02
_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class PeerError(RuntimeError):
    """A real peer could not be started, configured or run (a harness failure, not a test one)."""


# --------------------------------------------------------------------------------------------
# Finding (and installing) the tools


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _which(binary: str) -> str | None:
    # tgtd and tgtadm live in /usr/sbin, which a non-login PATH may lack.
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    return shutil.which(binary, path=search)


@functools.cache
def _apt_update() -> bool:
    """Refresh the package lists at most once per session (cached): True when it worked."""
    return _apt(["apt-get", "update"])


def _apt(argv: list[str]) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_APT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.cache
def _resolve_tool(binary: str, package: str) -> str | None:
    """Where ``binary`` is, installing ``package`` first if we can; cached per session."""
    found = _which(binary)
    if found is not None or os.geteuid() != 0 or _which("apt-get") is None:
        return found
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if not _apt(install) and _apt_update():
        _apt(install)
    return _which(binary)


def require_tool(binary: str, package: str) -> str:
    """Return the path of ``binary``; install Debian ``package`` as root if it is missing.

    When it still cannot be found the test is skipped, loudly, or fails under ``CI=true``
    where a missing peer means a broken CI image rather than a developer's laptop.
    """
    found = _resolve_tool(binary, package)
    if found is not None:
        return found
    reason = (
        f"PEER TEST NOT RUN: {binary!r} not found. Install the Debian package {package!r} "
        f"(as root: apt-get install --no-install-recommends {package}) to run it."
    )
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------
# Loopback addresses


def _loopback_prefix(pid: int) -> tuple[int, int]:
    # 254 * 254 prefixes: two live processes share one only when their pids are congruent
    # modulo 64516, and then tgtd's bind check below still catches a clash.
    high, low = divmod(pid % (254 * 254), 254)
    return high + 1, low + 1


_loopback_counter = itertools.count(1)


def unique_loopback() -> str:
    """A fresh 127.A.B.C address: A.B from this process's pid, C counts 1..254 per process.

    Never 127.0.0.1 (A is at least 1) and never a 0 or 255 octet. Any 254 consecutive calls in
    one process return distinct addresses; after that C wraps round, which is safe once the
    earlier users closed their sockets (a clash shows as EADDRINUSE, and :class:`Tgtd` then
    moves on by itself). Linux routes all of 127/8 to ``lo`` with no setup.
    """
    index = (next(_loopback_counter) - 1) % 254 + 1
    high, low = _loopback_prefix(os.getpid())
    return f"127.{high}.{low}.{index}"


# --------------------------------------------------------------------------------------------
# tgtd

_control_ports = itertools.count()


def _control_port_candidate() -> int:
    # tgtd accepts -C 0..32767 (0 is the system daemon's). 40 per process from a pid-derived
    # base; two processes whose pids agree modulo 790 can meet, which the lock probe and tgtd's
    # own "another tgtd is using" exit catch, and the caller then tries the next one.
    return 1_000 + (os.getpid() % 790) * 40 + next(_control_ports) % 40


def _control_port_free(port: int) -> bool:
    """Whether no live tgtd holds ``socket.<port>.lock`` (tgtd takes a POSIX lock on it)."""
    lock = TGT_IPC_DIR / f"socket.{port}.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _proc_listen_address(hex_address: str) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # /proc/net/tcp{,6} prints each 32-bit word of the address in host byte order.
    words = [struct.unpack("=I", raw[i : i + 4])[0] for i in range(0, len(raw), 4)]
    packed = b"".join(struct.pack("!I", word) for word in words)
    return str(ipaddress.ip_address(packed)), int(port_hex, 16)


def _listening(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` itself owns a TCP socket listening on ``host:port``."""
    try:
        inodes = set()
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return False
    wanted = (str(ipaddress.ip_address(host)), port)
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            listening = fields[3] == "0A"  # TCP_LISTEN
            if listening and fields[9] in inodes and _proc_listen_address(fields[1]) == wanted:
                return True
    return False


class _RetryWithOtherControlPort(Exception):
    pass


class _RetryWithOtherAddress(Exception):
    pass


def _masked(argv: Sequence[str]) -> str:
    """The argv as text with the value after ``--password`` hidden (it is a CHAP secret)."""
    shown = list(argv)
    for index, arg in enumerate(shown[:-1]):
        if arg == "--password":
            shown[index + 1] = "***"
    return " ".join(shown)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Instance:
    process: subprocess.Popen[bytes]
    control_port: int
    host: str
    log_path: Path


class Tgtd:
    """One foreground ``tgtd`` on a loopback portal with its own control port.

    Starting blocks until tgtadm answers and the portal is listening (or raises
    :class:`PeerError`). Use it as a context manager, or through the ``tgtd_factory`` fixture,
    so :meth:`stop` always runs; several instances may run at once.
    """

    def __init__(
        self,
        portal_host: str | None = None,
        port: int = 3260,
        *,
        ready_timeout: float = _READY_TIMEOUT,
    ) -> None:
        self._tgtd = require_tool("tgtd", "tgt")
        self._tgtadm = require_tool("tgtadm", "tgt")
        self.port = port
        self._workdir = Path(tempfile.mkdtemp(prefix="pyiscsi-tgtd-"))
        self._stopped = False
        self._backing: dict[int, list[Path]] = {}
        try:
            self._instance = self._launch(portal_host, ready_timeout)
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.host = self._instance.host
        self.control_port = self._instance.control_port
        self.pid = self._instance.process.pid

    # -- lifecycle ----------------------------------------------------------------------------

    def _launch(self, portal_host: str | None, ready_timeout: float) -> _Instance:
        last: Exception | None = None
        for _attempt in range(16):
            host = portal_host if portal_host is not None else unique_loopback()
            control_port = _control_port_candidate()
            if not _control_port_free(control_port):
                continue
            try:
                return self._start_once(host, control_port, ready_timeout)
            except _RetryWithOtherControlPort as exc:
                last = exc
            except _RetryWithOtherAddress as exc:
                if portal_host is not None:
                    raise PeerError(str(exc)) from None
                last = exc
        raise PeerError(f"tgtd did not start after several attempts: {last}")

    def _start_once(self, host: str, control_port: int, ready_timeout: float) -> _Instance:
        log_path = self._workdir / f"tgtd-{control_port}.log"
        argv = [
            self._tgtd,
            "-f",
            "-C",
            str(control_port),
            "--iscsi",
            f"portal={_portal_literal(host)}:{self.port}",
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        instance = _Instance(
            process=process, control_port=control_port, host=host, log_path=log_path
        )
        try:
            self._wait_ready(instance, ready_timeout)
        except BaseException:
            _kill(process)
            _remove_ipc_files(control_port)
            raise
        return instance

    def _wait_ready(self, instance: _Instance, ready_timeout: float) -> None:
        deadline = time.monotonic() + ready_timeout
        while True:
            code = instance.process.poll()
            log = instance.log_path.read_text(errors="replace")
            if code is not None:
                if "another tgtd is using" in log:
                    raise _RetryWithOtherControlPort(f"control port {instance.control_port} busy")
                raise PeerError(f"tgtd exited with status {code} while starting:\n{log}")
            if "failed to create/bind to portal" in log:
                raise _RetryWithOtherAddress(
                    f"tgtd could not bind {instance.host}:{self.port}:\n{log}"
                )
            probe = self._run_tgtadm(
                instance.control_port, ["--op", "show", "--mode", "target"], timeout=2.0
            )
            answered = probe is not None and probe.returncode == 0
            if answered and _listening(instance.process.pid, instance.host, self.port):
                return
            if time.monotonic() > deadline:
                raise PeerError(
                    f"tgtd on {instance.host}:{self.port} (control port "
                    f"{instance.control_port}) not ready after {ready_timeout} s:\n{log}"
                )
            time.sleep(_POLL_INTERVAL)  # polling a readiness check, not standing in for one

    def stop(self) -> None:
        """Shut tgtd down (gracefully, then SIGKILL) and remove its files. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        process = self._instance.process
        try:
            if process.poll() is None:
                for tid in self.target_ids():
                    self.tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", str(tid))
                self.tgtadm("--op", "delete", "--mode", "system", check=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_STOP_TIMEOUT)
        except PeerError:
            pass  # the fallback below still ends it
        finally:
            _kill(process)
            _remove_ipc_files(self.control_port)
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Tgtd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<Tgtd pid={self.pid} portal={self.portal} control_port={self.control_port}"
            f"{' stopped' if self._stopped else ''}>"
        )

    @property
    def portal(self) -> str:
        """``host:port`` as iSCSI writes it (IPv6 in brackets)."""
        return f"{_portal_literal(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._instance.process.poll() is None

    @property
    def log(self) -> str:
        """What tgtd printed so far (for failure messages)."""
        try:
            return self._instance.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- tgtadm -------------------------------------------------------------------------------

    def _run_tgtadm(
        self, control_port: int, args: Sequence[str], *, timeout: float = _TGTADM_TIMEOUT
    ) -> subprocess.CompletedProcess[str] | None:
        argv = [self._tgtadm, "-C", str(control_port), "--lld", "iscsi", *args]
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return None

    def tgtadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``tgtadm -C <ours> --lld iscsi *args``; raise PeerError on failure if ``check``."""
        done = self._run_tgtadm(self.control_port, args)
        if done is None:
            raise PeerError(f"tgtadm {_masked(args)} timed out after {_TGTADM_TIMEOUT} s")
        if check and done.returncode != 0:
            raise PeerError(
                f"tgtadm -C {self.control_port} {_masked(args)} failed with status "
                f"{done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def show(self, tid: int | None = None) -> str:
        """``--op show --mode target``: all targets, or one target's parameters."""
        args = ["--op", "show", "--mode", "target"]
        if tid is not None:
            args += ["--tid", str(tid)]
        return self.tgtadm(*args).stdout

    def target_ids(self) -> list[int]:
        return [int(m) for m in re.findall(r"^Target (\d+): ", self.show(), flags=re.MULTILINE)]

    def add_target(self, tid: int, iqn: str, luns: int = 1, size_mb: int = 1) -> None:
        """A target with ``luns`` disk LUNs (1..luns), each a sparse ``size_mb`` MiB file.

        tgt adds LUN 0 (a controller) to every target by itself.
        """
        self.tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "--targetname", iqn)
        for lun in range(1, luns + 1):
            backing = self._workdir / f"tid{tid}-lun{lun}.img"
            with backing.open("wb") as handle:
                handle.truncate(size_mb * 1024 * 1024)
            self._backing.setdefault(tid, []).append(backing)
            lun_args = ["--tid", str(tid), "--lun", str(lun), "--backing-store", str(backing)]
            self.tgtadm("--op", "new", "--mode", "logicalunit", *lun_args)

    def allow(self, tid: int, initiator: str = "ALL") -> None:
        """Open the target's ACL to ``ALL``, an address/CIDR (-I), or an iSCSI name (-Q)."""
        option = "--initiator-name" if re.match(r"(iqn|eui|naa)\.", initiator) else "-I"
        self.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), option, initiator)

    def add_account(self, user: str, secret: str) -> None:
        """A CHAP account (tgt keeps one global list; bind it to targets afterwards)."""
        self.tgtadm("--op", "new", "--mode", "account", "--user", user, "--password", secret)

    def bind_account(self, tid: int, user: str, outgoing: bool = False) -> None:
        """Require CHAP as ``user`` for ``tid``; ``outgoing`` = the target's own mutual name."""
        args = ["--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user]
        if outgoing:
            args.append("--outgoing")
        self.tgtadm(*args)

    def set_param(self, tid: int, name: str, value: str) -> None:
        """``--op update --mode target -n name -v value`` (e.g. MaxRecvDataSegmentLength)."""
        self.tgtadm(
            "--op", "update", "--mode", "target", "--tid", str(tid), "-n", name, "-v", value
        )

    def redirect(
        self,
        tid: int,
        address: str,
        port: int,
        reason: Literal["Temporary", "Permanent"] = "Temporary",
    ) -> None:
        """Answer every Normal login to ``tid`` with status 0x0101/0x0102 and this address.

        tgt's parameter names are RedirectAddress, RedirectPort and RedirectReason; it then
        sends ``TargetAddress=<address>:<port>`` (no portal group tag) and leaves discovery and
        SendTargets untouched.
        """
        self.set_param(tid, "RedirectAddress", address)
        self.set_param(tid, "RedirectPort", str(port))
        self.set_param(tid, "RedirectReason", reason)

    def clear_redirect(self, tid: int) -> None:
        """Serve ``tid`` here again (tgt drops the redirect when RedirectAddress is empty)."""
        self.set_param(tid, "RedirectAddress", "")

    def delete_target(self, tid: int) -> None:
        """Remove the target even if sessions are open, and its backing files."""
        self.tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", str(tid))
        for backing in self._backing.pop(tid, []):
            backing.unlink(missing_ok=True)


class TgtdStarter(Protocol):
    """The type of the ``tgtd_factory`` fixture (see ``tests/conftest.py``)."""

    def __call__(self, portal_host: str | None = None, port: int = 3260) -> Tgtd: ...


def _portal_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _remove_ipc_files(control_port: int) -> None:
    for suffix in ("", ".lock"):
        (TGT_IPC_DIR / f"socket.{control_port}{suffix}").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# iscsi-ls (libiscsi)

_ISCSI_LS_TIMEOUT = 20.0


def iscsi_url(
    host: str,
    port: int = 3260,
    *,
    user: str | None = None,
    password: str | None = None,
) -> str:
    """A libiscsi portal URL: ``iscsi://[user[%password]@]host[:port]``.

    libiscsi splits the credentials at the first ``%`` and ``@``, so test secrets should avoid
    those; :func:`iscsi_ls` can pass them in the environment instead (kept out of argv).
    """
    credentials = ""
    if user is not None:
        credentials = (user if password is None else f"{user}%{password}") + "@"
    return f"iscsi://{credentials}{_portal_literal(host)}:{port}"


def iscsi_ls(
    *args: str,
    chap: tuple[str, str] | None = None,
    mutual: tuple[str, str] | None = None,
    timeout: float = _ISCSI_LS_TIMEOUT,
) -> tuple[int, str, str]:
    """Run ``iscsi-ls *args``; return (exit status, stdout, stderr).

    ``chap``/``mutual`` are (user, secret) pairs given to libiscsi through
    LIBISCSI_CHAP_USERNAME/PASSWORD and LIBISCSI_CHAP_TARGET_USERNAME/PASSWORD. libiscsi has
    no login timeout of its own, so a hang becomes a PeerError after ``timeout`` seconds.
    """
    binary = require_tool("iscsi-ls", "libiscsi-bin")
    env: dict[str, str] = {
        key: value for key, value in os.environ.items() if not key.startswith("LIBISCSI_")
    }
    if chap is not None:
        env["LIBISCSI_CHAP_USERNAME"], env["LIBISCSI_CHAP_PASSWORD"] = chap
    if mutual is not None:
        env["LIBISCSI_CHAP_TARGET_USERNAME"], env["LIBISCSI_CHAP_TARGET_PASSWORD"] = mutual
    argv = [binary, *args]
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"iscsi-ls {_url_masked(args)} hung for {timeout} s") from exc
    return done.returncode, done.stdout, done.stderr


def _url_masked(args: Sequence[str]) -> str:
    return " ".join(re.sub(r"(iscsi://[^%@/]*)%[^@]*@", r"\1%***@", arg) for arg in args)


@dataclass(frozen=True, slots=True, kw_only=True)
class IscsiLsTarget:
    """One ``Target:`` line of iscsi-ls output and the ``Lun:`` lines under it (with ``-s``)."""

    name: str
    portal: str
    luns: dict[int, str] = field(default_factory=dict)


def parse_iscsi_ls(stdout: str) -> list[IscsiLsTarget]:
    """Parse ``Target:<iqn> Portal:<host>:<port>,<tpgt>`` and ``Lun:<n> Type:<type>`` lines."""
    targets: list[IscsiLsTarget] = []
    for line in stdout.splitlines():
        if match := re.fullmatch(r"Target:(\S+) Portal:(\S+)", line.strip()):
            targets.append(IscsiLsTarget(name=match[1], portal=match[2]))
        elif (match := re.fullmatch(r"Lun:(\d+)\s+Type:(.*)", line.strip())) and targets:
            targets[-1].luns[int(match[1])] = match[2].strip()
    return targets


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (a zombie counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def iter_ipc_files(control_port: int) -> Iterator[Path]:
    """tgt's management files for ``control_port`` that exist right now."""
    for suffix in ("", ".lock"):
        path = TGT_IPC_DIR / f"socket.{control_port}{suffix}"
        if path.exists():
            yield path
