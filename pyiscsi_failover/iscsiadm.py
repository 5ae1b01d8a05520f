"""Hand a chosen portal and target over to open-iscsi: ``iscsiadm`` node records, login, logout.

Once the prober has picked a working portal, the kernel initiator does the real work. This module
turns a :class:`NodeTarget` into the exact ``iscsiadm`` commands (pure builders, golden-tested),
runs them (:class:`Iscsiadm`, the only IO part, below the builders) and waits for the disk to show
up under ``/dev/disk/by-path``.

Facts this module relies on, checked against open-iscsi 2.1.8 (Debian 12) and its sources:

* Exit codes are open-iscsi's ``include/iscsi_err.h`` (0..31) plus 32
  (``ISCSI_ERR_SESSION_NOT_CONNECTED``) from the 2.1.8 ``iscsiadm(8)`` page; see
  :class:`IscsiadmExit`. A missing record or session is 21 (``ISCSI_ERR_NO_OBJS_FOUND``), a
  login to an already logged-in node is 15 (``ISCSI_ERR_SESS_EXISTS``).
* Node-record operations (``-o new/update/delete`` and showing a record) work without iscsid;
  ``--login``/``--logout`` need it. ``-o new`` on an existing record *resets* it to the defaults
  of ``iscsid.conf``, so a record we did not create is updated in place instead.
* The record file is line based and iscsiadm strips blanks around values and truncates them at
  255 bytes, so values with control characters, edge blanks or more than 255 bytes are refused
  here rather than silently changed (a newline would even inject another record line).
* ``-p`` takes ``host:port[,tpgt]`` with IPv6 in brackets; the record stores the bare address.
  udev's ``path_id`` names the disk ``ip-ADDR:PORT-iscsi-IQN-lun-N`` from the connection's
  ``persistent_address``, which iscsid copies from the record: so IPv6 appears *unbracketed*
  (``ip-fd00::1:3260-...``) and a host name appears as given. ``lun-N`` is the kernel's LUN,
  which is connection_info's LUN after os-brick's ``addressing_mode``
  (:func:`~pyiscsi_failover.protocol.scsi.lun_for_addressing`): tgt's LUN 256 with ``SAM2`` is
  ``lun-0x4100000000000000``, as ``path_id`` writes LUNs of 256 and more.
* Records are matched by IQN, address and port only: ``-p host:port,TPGT`` shows, updates and
  deletes *every* record of that IQN at ``host:port``, whatever its tpgt.

Which records are ours: :class:`RecordLedger` keeps a small JSON file of the node records
:func:`attach` created, so that :func:`detach` deletes those and never a record an operator made
(open-iscsi's record has no field we could mark it with). The ledger holds IQNs and portals only.
Both use the ledger at :data:`DEFAULT_LEDGER_PATH` unless given another, so that the library's
defaults are as safe as the CLI's.

Known open-iscsi limit: iscsiadm takes the CHAP password on its command line, so while the
``-o update`` runs it is in ``/proc/PID/cmdline``, which any local user can read unless ``/proc``
is mounted with ``hidepid=2`` (not the default; os-brick has the same exposure). That is why each
password travels in its own short ``-o update`` and nowhere else. We mask it in every command, log
line, result and error we produce; the record file under ``/etc/iscsi/nodes`` (root only) holds it
in clear, as open-iscsi always does.

The builders are pure; the runner and :func:`attach`/:func:`detach` use trio and subprocesses,
the ledger plain files. This module imports neither socket nor construct itself (the digest and
CHAP enums come from the pure protocol modules), and the runner never uses ``check=True``:
``CalledProcessError`` would carry the unmasked argv.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import math
import os
import re
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Final, Literal, TypeVar

import trio

from pyiscsi_failover.connection_info import AddressingMode
from pyiscsi_failover.credentials import MASK, ChapCredentials, Secret
from pyiscsi_failover.errors import (
    ConnectionInfoError,
    DeviceTimeout,
    InvalidName,
    InvalidPortal,
    IscsiadmError,
    IscsiadmUnavailable,
    LedgerError,
    LocalProtocolError,
    PDUEncodeError,
    WrongVolume,
)
from pyiscsi_failover.names import Portal, validate_iscsi_name
from pyiscsi_failover.protocol.chap import ChapAlgorithm
from pyiscsi_failover.protocol.negotiation import Digest
from pyiscsi_failover.protocol.scsi import by_path_lun, lun_for_addressing
from pyiscsi_failover.sysfs import (
    SYS_ROOT,
    KernelSession,
    block_device_of,
    delete_disk,
    disk_wwid,
    find_session,
    scan_lun,
    session_disks,
    set_recovery_timeout,
)

__all__ = [
    "DEFAULT_LEDGER_PATH",
    "DELETE_MODES",
    "DETACH_RECOVERY_TIMEOUT",
    "DEVICE_POLL_INTERVAL",
    "LEDGER_LOCK_TIMEOUT",
    "AttachResult",
    "Command",
    "DeleteMode",
    "DetachResult",
    "Iscsiadm",
    "IscsiadmExit",
    "LedgerEntry",
    "NodeTarget",
    "RecordFate",
    "RecordLedger",
    "Result",
    "attach",
    "by_path_name",
    "detach",
    "dry_run_plan",
    "exit_meaning",
    "handoff_plan",
    "node_delete",
    "node_login",
    "node_logout",
    "node_new",
    "node_show",
    "node_update",
    "portal_argument",
    "session_list",
]

logger = logging.getLogger(__name__)

#: Seconds between checks for the disk's by-path link (we wait on the kernel and udev).
DEVICE_POLL_INTERVAL: Final = 0.05
#: iscsiadm truncates record values longer than this many bytes (seen with open-iscsi 2.1.8).
_MAX_VALUE_BYTES: Final = 255
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+(?:\[[0-9]+\])?(?:\.[A-Za-z0-9_]+(?:\[[0-9]+\])?)*")


# --------------------------------------------------------------------------------------------
# Exit codes
# --------------------------------------------------------------------------------------------


class IscsiadmExit(IntEnum):
    """iscsiadm's exit status: member ``X`` is open-iscsi's ``ISCSI_ERR_X``.

    Source: ``include/iscsi_err.h`` in open-iscsi/open-iscsi (0..31) and the ``EXIT STATUS``
    section of ``iscsiadm(8)`` from open-iscsi 2.1.8 (adds 32). ``SUCCESS`` is
    ``ISCSI_SUCCESS`` and ``GENERIC`` is the bare ``ISCSI_ERR``.
    """

    SUCCESS = 0
    GENERIC = 1
    SESS_NOT_FOUND = 2
    NOMEM = 3
    TRANS = 4
    LOGIN = 5
    IDBM = 6
    INVAL = 7
    TRANS_TIMEOUT = 8
    INTERNAL = 9
    LOGOUT = 10
    PDU_TIMEOUT = 11
    TRANS_NOT_FOUND = 12
    ACCESS = 13
    TRANS_CAPS = 14
    SESS_EXISTS = 15
    INVALID_MGMT_REQ = 16
    ISNS_UNAVAILABLE = 17
    ISCSID_COMM_ERR = 18
    FATAL_LOGIN = 19
    ISCSID_NOTCONN = 20
    NO_OBJS_FOUND = 21
    SYSFS_LOOKUP = 22
    HOST_NOT_FOUND = 23
    LOGIN_AUTH_FAILED = 24
    ISNS_QUERY = 25
    ISNS_REG_FAILED = 26
    OP_NOT_SUPP = 27
    BUSY = 28
    AGAIN = 29
    UNKNOWN_DISCOVERY_TYPE = 30
    CHILD_TERMINATED = 31
    SESSION_NOT_CONNECTED = 32

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS: Final[dict[IscsiadmExit, str]] = {
    IscsiadmExit.SUCCESS: "success",
    IscsiadmExit.GENERIC: "generic iscsiadm error",
    IscsiadmExit.SESS_NOT_FOUND: "session not found",
    IscsiadmExit.NOMEM: "out of memory or resources",
    IscsiadmExit.TRANS: "transport (connection) error",
    IscsiadmExit.LOGIN: "iSCSI login failed",
    IscsiadmExit.IDBM: "cannot read or write the iSCSI node database",
    IscsiadmExit.INVAL: "invalid argument",
    IscsiadmExit.TRANS_TIMEOUT: "connection timed out",
    IscsiadmExit.INTERNAL: "internal iscsid or kernel failure",
    IscsiadmExit.LOGOUT: "iSCSI logout failed",
    IscsiadmExit.PDU_TIMEOUT: "iSCSI PDU timed out",
    IscsiadmExit.TRANS_NOT_FOUND: "iSCSI transport module not loaded in the kernel or iscsid",
    IscsiadmExit.ACCESS: "permission denied (iscsiadm usually needs root)",
    IscsiadmExit.TRANS_CAPS: "the transport does not support this operation",
    IscsiadmExit.SESS_EXISTS: "a session is already logged in",
    IscsiadmExit.INVALID_MGMT_REQ: "invalid management request to iscsid",
    IscsiadmExit.ISNS_UNAVAILABLE: "iSNS service not supported",
    IscsiadmExit.ISCSID_COMM_ERR: "reading from or writing to iscsid failed",
    IscsiadmExit.FATAL_LOGIN: "fatal iSCSI login error (the target refused the login)",
    IscsiadmExit.ISCSID_NOTCONN: "cannot connect to iscsid (is it running?)",
    IscsiadmExit.NO_OBJS_FOUND: "no matching records, targets, sessions or portals",
    IscsiadmExit.SYSFS_LOOKUP: "object not found in sysfs",
    IscsiadmExit.HOST_NOT_FOUND: "SCSI host not found",
    IscsiadmExit.LOGIN_AUTH_FAILED: "iSCSI login failed: authentication (CHAP) failure",
    IscsiadmExit.ISNS_QUERY: "iSNS query failed",
    IscsiadmExit.ISNS_REG_FAILED: "iSNS registration or deregistration failed",
    IscsiadmExit.OP_NOT_SUPP: "operation not supported",
    IscsiadmExit.BUSY: "device or resource busy",
    IscsiadmExit.AGAIN: "operation failed; retrying later may succeed",
    IscsiadmExit.UNKNOWN_DISCOVERY_TYPE: "unknown discovery type",
    IscsiadmExit.CHILD_TERMINATED: "child process terminated",
    IscsiadmExit.SESSION_NOT_CONNECTED: "session likely not connected",
}


def exit_meaning(code: int | None) -> str:
    """A human description of an iscsiadm exit status (``None``: it never finished)."""
    if code is None:
        return "iscsiadm did not finish"
    if code < 0:
        return f"iscsiadm was killed by signal {-code}"
    try:
        status = IscsiadmExit(code)
    except ValueError:
        return f"unknown iscsiadm exit status {code}"
    return f"{status.meaning} ({status.name})"


# --------------------------------------------------------------------------------------------
# The target and the pure argv builders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTarget:
    """What to hand to open-iscsi: one portal, one target, one LUN and its credentials.

    ``lun`` is connection_info's ``target_lun`` and ``addressing_mode`` its os-brick
    ``addressing_mode`` (a spelling such as ``"SAM2"`` is accepted and normalised): together they
    give :attr:`linux_lun`, the kernel's LUN that the by-path name shows. ``lun`` is 0..2**32-1,
    and at most 16383 where the mode makes it a flat LUN (``SAM3-flat``, ``SAM2`` from 256).
    ``tpgt`` defaults to ``portal.tpgt``; giving both with different values is an error.
    ``chap`` is our CHAP identity; ``target_chap`` the target's, for mutual CHAP
    (``node.session.auth.username_in``/``password_in``) and only together with ``chap``.

    What the probe proved can be handed on too, so that the kernel negotiates what was tested
    rather than what ``iscsid.conf`` says: ``header_digest``/``data_digest`` become
    ``node.conn[0].iscsi.HeaderDigest``/``DataDigest``, and ``chap_algorithms`` (only with
    ``chap``; non-empty, no repeats, in order of preference) ``node.session.auth.chap_algs``.
    ``None`` leaves the record's value alone (``iscsid.conf``'s default for a new record).
    """

    portal: Portal
    iqn: str
    lun: int
    addressing_mode: AddressingMode = AddressingMode.SAM
    tpgt: int | None = None
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    header_digest: Digest | None = None
    data_digest: Digest | None = None
    chap_algorithms: tuple[ChapAlgorithm, ...] | None = None

    def __post_init__(self) -> None:
        portal: object = self.portal
        if not isinstance(portal, Portal):
            raise ConnectionInfoError(
                f"portal must be a Portal, not {type(portal).__name__}", key="portal"
            )
        object.__setattr__(self, "iqn", validate_iscsi_name(self.iqn))
        lun: object = self.lun
        if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= 0xFFFFFFFF:
            raise ConnectionInfoError(f"lun {lun!r} is not an integer 0..4294967295", key="lun")
        self._check_addressing_mode(lun)
        tpgt: object = self.tpgt
        if tpgt is not None and (
            isinstance(tpgt, bool) or not isinstance(tpgt, int) or not 0 <= tpgt <= 65535
        ):
            raise ConnectionInfoError(f"tpgt {tpgt!r} is not None or 0..65535", key="tpgt")
        if tpgt is None:
            object.__setattr__(self, "tpgt", portal.tpgt)
        elif portal.tpgt is not None and portal.tpgt != tpgt:
            raise ConnectionInfoError(
                f"tpgt {tpgt} disagrees with the portal's tpgt {portal.tpgt}", key="tpgt"
            )
        for key in ("chap", "target_chap"):
            creds: object = getattr(self, key)
            if creds is not None and not isinstance(creds, ChapCredentials):
                raise ConnectionInfoError(
                    f"{key} must be ChapCredentials or None, not {type(creds).__name__}", key=key
                )
        if self.target_chap is not None and self.chap is None:
            raise ConnectionInfoError(
                "target_chap (mutual CHAP) needs chap as well", key="target_chap"
            )
        for key in ("header_digest", "data_digest"):
            digest: object = getattr(self, key)
            if digest is not None and not isinstance(digest, Digest):
                raise ConnectionInfoError(
                    f"{key} must be a Digest or None, not {type(digest).__name__}", key=key
                )
        self._check_chap_algorithms()

    def _check_addressing_mode(self, lun: int) -> None:
        mode: object = self.addressing_mode
        spellings = ", ".join(repr(m.value) for m in AddressingMode)
        if not isinstance(mode, str) or mode not in {m.value for m in AddressingMode}:
            raise ConnectionInfoError(
                f"addressing_mode {mode!r} is not one of {spellings}", key="addressing_mode"
            )
        mode = AddressingMode(mode)
        object.__setattr__(self, "addressing_mode", mode)
        try:
            lun_for_addressing(lun, mode)
        except PDUEncodeError:
            raise ConnectionInfoError(
                f"lun {lun} is above 16383: {mode.value} makes it a flat LUN, which has 14 bits",
                key="lun",
            ) from None

    @property
    def linux_lun(self) -> int:
        """The LUN as the kernel numbers it (its H:C:T:L), after the addressing mode."""
        return lun_for_addressing(self.lun, self.addressing_mode)

    def _check_chap_algorithms(self) -> None:
        algorithms: object = self.chap_algorithms
        if algorithms is None:
            return
        key = "chap_algorithms"
        if not isinstance(algorithms, (tuple, list)):
            raise ConnectionInfoError(
                f"{key} must be a tuple of ChapAlgorithm or None, not {type(algorithms).__name__}",
                key=key,
            )
        if not algorithms:
            raise ConnectionInfoError(f"{key} is empty: give at least one, or None", key=key)
        for algorithm in algorithms:
            if not isinstance(algorithm, ChapAlgorithm):
                raise ConnectionInfoError(
                    f"{key} must hold ChapAlgorithm members, not {algorithm!r}", key=key
                )
        if len(set(algorithms)) != len(algorithms):
            raise ConnectionInfoError(f"{key} lists an algorithm twice", key=key)
        if self.chap is None:
            raise ConnectionInfoError(f"{key} needs chap: without CHAP none is used", key=key)
        object.__setattr__(self, key, tuple(algorithms))


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One iscsiadm invocation. Secrets stay wrapped until :attr:`argv` is asked for.

    ``repr``/``str``/:meth:`masked` show every secret as ``***``; only :attr:`argv`, for running
    the command, reveals them.
    """

    parts: tuple[str | Secret, ...]

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(p.reveal_str() if isinstance(p, Secret) else p for p in self.parts)

    @property
    def secrets(self) -> tuple[Secret, ...]:
        return tuple(p for p in self.parts if isinstance(p, Secret))

    def masked(self) -> str:
        """The command line, shell-quoted, with each secret shown as a bare ``***``."""
        return " ".join(MASK if isinstance(p, Secret) else shlex.quote(p) for p in self.parts)

    def __repr__(self) -> str:
        return f"Command({self.masked()!r})"

    def __str__(self) -> str:
        return self.masked()


def portal_argument(t: NodeTarget) -> str:
    """iscsiadm's ``-p`` value: ``host:port[,tpgt]``, IPv6 in brackets."""
    return f"{t.portal}" if t.tpgt is None else f"{t.portal},{t.tpgt}"


def _node(t: NodeTarget, *rest: str | Secret) -> Command:
    return Command(parts=("iscsiadm", "-m", "node", "-T", t.iqn, "-p", portal_argument(t), *rest))


def node_new(t: NodeTarget) -> Command:
    """Create the node record (``-o new``); on an existing record this resets it."""
    return _node(t, "-o", "new")


def node_show(t: NodeTarget) -> Command:
    """Print the node record; exit 21 (``NO_OBJS_FOUND``) when there is none."""
    return _node(t)


def _check_value(name: str, raw: bytes) -> None:
    """Refuse values the line-based record file would silently change or be injected by."""
    if any(b < 0x20 or b == 0x7F for b in raw):
        raise ConnectionInfoError(
            f"the value for {name} contains a control character (newline, tab, NUL...)", key=name
        )
    if raw != raw.strip(b" "):
        raise ConnectionInfoError(
            f"the value for {name} starts or ends with a space, which iscsiadm would strip",
            key=name,
        )
    if len(raw) > _MAX_VALUE_BYTES:
        raise ConnectionInfoError(
            f"the value for {name} is {len(raw)} bytes; iscsiadm keeps only {_MAX_VALUE_BYTES}",
            key=name,
        )


def node_update(t: NodeTarget, name: str, value: str | Secret) -> Command:
    """Set one record field (``-o update -n NAME -v VALUE``); a :class:`Secret` stays masked."""
    if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
        raise ConnectionInfoError(f"{name!r} is not an iscsiadm parameter name", key="name")
    if isinstance(value, Secret):
        if not len(value):
            raise ConnectionInfoError(f"the secret for {name} is empty", key=name)
        _check_value(name, value.reveal())
    elif isinstance(value, str):
        _check_value(name, value.encode("utf-8", errors="surrogateescape"))
    else:
        raise ConnectionInfoError(
            f"the value for {name} must be a str or Secret, not {type(value).__name__}", key=name
        )
    return _node(t, "-o", "update", "-n", name, "-v", value)


def node_login(t: NodeTarget) -> Command:
    return _node(t, "--login")


def node_logout(t: NodeTarget) -> Command:
    return _node(t, "--logout")


def node_delete(t: NodeTarget) -> Command:
    return _node(t, "-o", "delete")


def session_list() -> Command:
    """List the active sessions; exit 21 when there are none."""
    return Command(parts=("iscsiadm", "-m", "session"))


def _digest_updates(t: NodeTarget) -> list[Command]:
    # Digest.value is the RFC 7143 text ("None", "CRC32C"), which is also open-iscsi's spelling.
    pairs = (("HeaderDigest", t.header_digest), ("DataDigest", t.data_digest))
    return [
        node_update(t, f"node.conn[0].iscsi.{name}", digest.value)
        for name, digest in pairs
        if digest is not None
    ]


def _auth_updates(t: NodeTarget) -> list[Command]:
    # authmethod is always set, so iscsid.conf's defaults cannot add or drop CHAP behind our back.
    if t.chap is None:
        return [node_update(t, "node.session.auth.authmethod", "None")]
    commands = [node_update(t, "node.session.auth.authmethod", "CHAP")]
    if t.chap_algorithms is not None:
        names = ",".join(a.open_iscsi_name for a in t.chap_algorithms)
        commands.append(node_update(t, "node.session.auth.chap_algs", names))
    pairs = [("", t.chap)]
    if t.target_chap is not None:
        pairs.append(("_in", t.target_chap))
    for suffix, creds in pairs:
        if not creds.username:
            raise ConnectionInfoError(
                f"the CHAP username for node.session.auth.username{suffix} is empty",
                key=f"node.session.auth.username{suffix}",
            )
        commands.append(node_update(t, f"node.session.auth.username{suffix}", creds.username))
        commands.append(node_update(t, f"node.session.auth.password{suffix}", creds.secret))
    return commands


def _setup_plan(t: NodeTarget, *, create: bool) -> list[Command]:
    first = [node_new(t)] if create else []
    return [
        *first,
        node_update(t, "node.startup", "manual"),
        node_update(t, "node.session.scan", "manual"),
        *_digest_updates(t),
        *_auth_updates(t),
    ]


def handoff_plan(t: NodeTarget, *, create: bool = True) -> list[Command]:
    """The commands that hand ``t`` to open-iscsi, in order, ending with the login.

    ``create=False`` leaves out ``-o new``, for a record that already exists (``-o new`` would
    reset it). ``node.startup`` is set to ``manual``: failover, not boot, decides what to log in.
    ``node.session.scan`` is ``manual`` too: the kernel then makes a disk of no LUN by itself,
    and :func:`attach` scans the volume's LUN alone (as os-brick does), so that a target shared
    by many volumes gives this host only the disks it attached. The digests and CHAP algorithms
    are written when ``t`` carries them (see :class:`NodeTarget`).
    """
    return [*_setup_plan(t, create=create), node_login(t)]


def dry_run_plan(t: NodeTarget) -> list[str]:
    """What ``attach --dry-run`` prints: the plan for a new record, secrets masked."""
    return [command.masked() for command in handoff_plan(t)]


def by_path_name(t: NodeTarget) -> str:
    """The ``/dev/disk/by-path`` entry udev creates for the disk (IPv6 unbracketed).

    A host name portal appears as written, because iscsid hands the record's address to the
    kernel as the persistent address. The LUN is :attr:`NodeTarget.linux_lun`, written as
    udev's ``path_id`` writes it (``lun-1``; ``lun-0x4100000000000000`` for flat LUN 256).
    """
    return f"ip-{t.portal.host}:{t.portal.port}-iscsi-{t.iqn}-{by_path_lun(t.linux_lun)}"


# --------------------------------------------------------------------------------------------
# IO: running iscsiadm (everything below uses trio and subprocesses)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """A finished iscsiadm run: masked command, exit status and masked output."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def status(self) -> IscsiadmExit | None:
        """The exit status as :class:`IscsiadmExit`, or ``None`` when it is not one."""
        try:
            return IscsiadmExit(self.exit_code)
        except ValueError:
            return None

    @property
    def last_stderr_line(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def error(self) -> IscsiadmError:
        """The error describing this run: meaning, masked command and last stderr line."""
        message = f"{exit_meaning(self.exit_code)} [exit {self.exit_code}]: {self.command}"
        if self.last_stderr_line:
            message += f": {self.last_stderr_line}"
        return IscsiadmError(message, exit_code=self.exit_code, command=self.command)


def _mask_output(data: bytes, secrets: Sequence[Secret]) -> str:
    # Masked on bytes, before decoding, so a secret that is not valid UTF-8 still matches.
    for secret in sorted(secrets, key=len, reverse=True):
        data = data.replace(secret.reveal(), MASK.encode())
    return data.decode("utf-8", errors="replace")


class Iscsiadm:
    """Runs :class:`Command` objects with one iscsiadm binary.

    ``timeout`` bounds each command (a hung iscsiadm is killed and reported with
    ``exit_code=None``); ``env`` replaces the environment when given. Every command is logged at
    INFO in its masked form only.
    """

    def __init__(
        self,
        *,
        binary: str | os.PathLike[str] = "iscsiadm",
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.binary = os.fspath(binary)
        self.timeout = timeout
        self.env = env

    def __repr__(self) -> str:
        return f"Iscsiadm(binary={self.binary!r}, timeout={self.timeout!r})"

    async def run(self, cmd: Command) -> Result:
        """Run ``cmd`` to completion and return its result whatever its exit status.

        Raises :class:`IscsiadmError` (``exit_code=None``) only when iscsiadm cannot be started
        or does not finish within the timeout.
        """
        masked = cmd.masked()
        logger.info("running %s", masked)
        argv = [self.binary, *cmd.argv[1:]]
        try:
            with trio.fail_after(self.timeout):
                done: subprocess.CompletedProcess[bytes] = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False, env=self.env
                )
        except trio.TooSlowError:
            raise IscsiadmError(
                f"iscsiadm did not finish within {self.timeout:g} s and was killed: {masked}",
                exit_code=None,
                command=masked,
            ) from None
        except OSError as exc:
            # No chaining: the OSError is harmless, but nothing here needs to travel with argv.
            raise IscsiadmUnavailable(
                f"cannot run {self.binary!r}: {exc.strerror or type(exc).__name__}: {masked}",
                exit_code=None,
                command=masked,
            ) from None
        secrets = cmd.secrets
        result = Result(
            command=masked,
            exit_code=done.returncode,
            stdout=_mask_output(done.stdout, secrets),
            stderr=_mask_output(done.stderr, secrets),
        )
        logger.debug(
            "iscsiadm exit %d (%s)%s",
            result.exit_code,
            exit_meaning(result.exit_code),
            f": {result.last_stderr_line}" if result.last_stderr_line else "",
        )
        return result

    async def check(self, cmd: Command, *, ok: Iterable[int] = (IscsiadmExit.SUCCESS,)) -> Result:
        """Run ``cmd``; raise its :class:`IscsiadmError` unless the exit status is in ``ok``."""
        result = await self.run(cmd)
        if result.exit_code not in set(ok):
            raise result.error()
        return result


# --------------------------------------------------------------------------------------------
# The ledger: which node records are ours (plain files, no subprocesses)
# --------------------------------------------------------------------------------------------

#: Where the CLI keeps its ledger unless told otherwise (``--state-file``).
DEFAULT_LEDGER_PATH: Final = Path("/var/lib/pyiscsi-failover/created-records.json")
_LEDGER_VERSION: Final = 1
#: A ledger lists a handful of records; a file this large is not one we wrote.
_MAX_LEDGER_BYTES: Final = 1 << 20
#: Seconds a ledger change waits for another process's lock before it fails.
LEDGER_LOCK_TIMEOUT: Final = 5.0
#: Seconds between attempts to take a busy ledger lock.
_LOCK_POLL_INTERVAL: Final = 0.01


_T = TypeVar("_T")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One node record we created: its IQN and the ``-p`` argument we created it with.

    iscsiadm finds a record by IQN, address and port, ignoring the tpgt (checked with
    open-iscsi 2.1.8), so :meth:`matches` does the same.
    """

    iqn: str
    portal: str

    def __post_init__(self) -> None:
        # Raises InvalidName/InvalidPortal; the ledger turns them into a LedgerError.
        object.__setattr__(self, "iqn", validate_iscsi_name(self.iqn))
        object.__setattr__(self, "portal", Portal.parse(self.portal).with_tpgt())

    @classmethod
    def of(cls, t: NodeTarget) -> LedgerEntry:
        return cls(iqn=t.iqn, portal=portal_argument(t))

    def matches(self, t: NodeTarget) -> bool:
        """Whether iscsiadm would take ``-T t.iqn -p portal_argument(t)`` to mean this record."""
        mine = Portal.parse(self.portal)
        return (self.iqn, mine.host, mine.port) == (t.iqn, t.portal.host, t.portal.port)


class RecordLedger:
    """The node records pyiscsi-failover created, kept in a small JSON file at ``path``.

    The file is ``{"version": 1, "records": [{"iqn": IQN, "portal": "HOST:PORT[,TPGT]"}]}``;
    a missing file is an empty ledger. It never holds a secret. Changes are read-modify-write
    under an exclusive ``flock`` on ``PATH.lock``, so concurrent attaches lose no entry, and land
    atomically (temporary file in the same directory, fsync, ``os.replace``): a crash leaves the
    old ledger or the new one, never part of one. A directory we create gets mode 0700, the file
    always 0600. Every failure to read, parse or write it is a :class:`LedgerError`.

    The ledger decides which records get deleted, so it is trusted only as ssh trusts its own
    files: the file is opened with ``O_NOFOLLOW`` (a symlink is refused), and it and its directory
    must belong to us (the effective uid) or root and must not be writable by group or others;
    anything else is a :class:`LedgerError` naming the path and the problem.

    ``RecordLedger()`` is the one at :data:`DEFAULT_LEDGER_PATH`, which :func:`attach` and
    :func:`detach` use unless given another.

    The lock is taken without blocking (``LOCK_EX | LOCK_NB``) and retried every few
    milliseconds; a lock still held by someone else after ``lock_timeout`` seconds is a
    :class:`LedgerError` naming the lock file, never an endless wait. Reading needs no lock
    (a write replaces the file whole). :meth:`add`/:meth:`remove` wait with ``time.sleep`` for
    synchronous callers; :meth:`add_async`/:meth:`remove_async` wait with ``trio.sleep``, so the
    event loop never blocks, and once they hold the lock they read, write and return without a
    checkpoint. That is what :func:`attach` relies on: a cancellation can land while it waits for
    the lock (and undoes the attach like any failure), never between the note and its success.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = LEDGER_LOCK_TIMEOUT,
    ) -> None:
        # Looked up at call time, so that tests can point the default somewhere harmless.
        self.path = Path(DEFAULT_LEDGER_PATH if path is None else path)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"RecordLedger({str(self.path)!r})"

    def entries(self) -> tuple[LedgerEntry, ...]:
        """Every entry, read afresh from the file."""
        return self._read()

    def is_ours(self, t: NodeTarget) -> bool:
        """Whether we created the node record that iscsiadm would find for ``t``."""
        return any(entry.matches(t) for entry in self._read())

    def add(self, t: NodeTarget) -> None:
        """Note that we created ``t``'s record (replacing any entry for the same record).

        Blocks the calling thread while another process holds the lock (at most
        ``lock_timeout`` seconds); async code uses :meth:`add_async`.
        """
        self._make_directory()
        self._with_lock(self._lock_sync(), self._add_locked, t)

    async def add_async(self, t: NodeTarget) -> None:
        """:meth:`add` for trio code: waits for a busy lock without blocking the event loop."""
        self._make_directory()
        self._with_lock(await self._lock_async(), self._add_locked, t)

    def remove(self, t: NodeTarget) -> bool:
        """Forget ``t``'s record; return whether there was an entry. Writes only if there was.

        Blocks like :meth:`add`; async code uses :meth:`remove_async`.
        """
        if not self.is_ours(t):
            return False
        return self._with_lock(self._lock_sync(), self._remove_locked, t)

    async def remove_async(self, t: NodeTarget) -> bool:
        """:meth:`remove` for trio code: waits for a busy lock without blocking the event loop."""
        if not self.is_ours(t):
            return False
        return self._with_lock(await self._lock_async(), self._remove_locked, t)

    def _add_locked(self, t: NodeTarget) -> None:
        entry = LedgerEntry.of(t)
        others = [e for e in self._read() if not e.matches(t)]
        self._write([*others, entry])
        logger.debug(
            "noted in %s: we created the record of %s at %s", self.path, t.iqn, entry.portal
        )

    def _remove_locked(self, t: NodeTarget) -> bool:
        entries = self._read()
        others = [e for e in entries if not e.matches(t)]
        if len(others) == len(entries):
            return False  # another process removed it meanwhile
        self._write(others)
        logger.debug("dropped from %s: the record of %s at %s", self.path, t.iqn, t.portal)
        return True

    # -- the file ----------------------------------------------------------------------------

    def _error(self, problem: str) -> LedgerError:
        return LedgerError(
            f"node-record ledger {str(self.path)!r}: {problem}; it lists the iSCSI node records "
            "pyiscsi-failover created, so repair it (or remove it: then none counts as ours)",
            path=str(self.path),
        )

    def _refuse_unsafe(self, st: os.stat_result, what: str) -> None:
        """Refuse a file or directory someone else could have written (as ssh does its own)."""
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise self._error(
                f"{what} belongs to uid {st.st_uid}; only we (uid {euid}) or root may own it"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise self._error(
                f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
            )

    def _open_directory(self) -> int | None:
        """The ledger's directory, opened and checked; ``None`` when it does not exist."""
        directory = self.path.parent
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(f"cannot open its directory: {_reason(exc)}") from None
        try:
            self._refuse_unsafe(os.fstat(fd), f"its directory {str(directory)!r}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read(self) -> tuple[LedgerEntry, ...]:
        dir_fd = self._open_directory()
        if dir_fd is None:
            return ()
        try:
            # O_NOFOLLOW: a symlink planted in place of the ledger is refused, not followed;
            # O_NONBLOCK: a FIFO there cannot hang the open (fstat then refuses it).
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(self.path.name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            return ()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._error("it is a symbolic link, which is never followed") from None
            raise self._error(f"cannot read it: {_reason(exc)}") from None
        finally:
            os.close(dir_fd)
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise self._error("it is not a regular file")
                self._refuse_unsafe(st, "it")
                raw = f.read(_MAX_LEDGER_BYTES + 1)
        except OSError as exc:
            raise self._error(f"cannot read it: {_reason(exc)}") from None
        if len(raw) > _MAX_LEDGER_BYTES:
            raise self._error(f"it is larger than {_MAX_LEDGER_BYTES} bytes")
        try:
            document = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise self._error(f"it is not UTF-8 (bad byte at offset {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise self._error(
                f"it is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            raise self._error(f"it is not usable JSON ({type(exc).__name__})") from None
        return self._parse(document)

    def _parse(self, document: object) -> tuple[LedgerEntry, ...]:
        if not isinstance(document, dict):
            raise self._error("it is not a JSON object")
        version = document.get("version")
        if type(version) is not int or version != _LEDGER_VERSION:
            raise self._error(f"unknown version {version!r} (expected {_LEDGER_VERSION})")
        records = document.get("records")
        if not isinstance(records, list):
            raise self._error('"records" is not a list')
        entries = []
        for index, record in enumerate(records):
            if not (
                isinstance(record, dict)
                and isinstance(record.get("iqn"), str)
                and isinstance(record.get("portal"), str)
            ):
                raise self._error(f'record #{index} is not {{"iqn": STRING, "portal": STRING}}')
            try:
                entries.append(LedgerEntry(iqn=record["iqn"], portal=record["portal"]))
            except (InvalidName, InvalidPortal) as exc:
                raise self._error(f"record #{index}: {exc}") from None
        return tuple(entries)

    def _make_directory(self) -> None:
        """Create the directory if needed and check it, before the lock file is made there."""
        try:
            # Only a directory we create gets 0700; an existing one is left as it is (and must
            # then pass _refuse_unsafe: /tmp, say, does not).
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create its directory: {_reason(exc)}") from None
        dir_fd = self._open_directory()
        if dir_fd is not None:
            os.close(dir_fd)

    # -- the lock ----------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        """The file whose ``flock`` serialises changes: ``PATH.lock`` beside the ledger."""
        return self.path.with_name(self.path.name + ".lock")

    def _try_lock(self) -> int | None:
        """One attempt: the locked descriptor, or ``None`` when someone else holds the lock."""
        try:
            # O_NOFOLLOW: a planted symlink must not make us create a file elsewhere.
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise self._error(f"cannot open its lock file: {_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise self._error(f"cannot lock it: {_reason(exc)}") from None
        return fd

    def _busy(self) -> LedgerError:
        return self._error(
            f"its lock file {str(self.lock_path)!r} is still held by another process after "
            f"{self.lock_timeout:g} s"
        )

    def _lock_sync(self) -> int:
        deadline = time.monotonic() + self.lock_timeout
        while (fd := self._try_lock()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._busy()
            time.sleep(min(_LOCK_POLL_INTERVAL, left))
        return fd

    async def _lock_async(self) -> int:
        deadline = trio.current_time() + self.lock_timeout
        while (fd := self._try_lock()) is None:
            left = deadline - trio.current_time()
            if left <= 0:
                raise self._busy()
            await trio.sleep(min(_LOCK_POLL_INTERVAL, left))
        return fd

    @staticmethod
    def _with_lock(fd: int, change: Callable[[NodeTarget], _T], t: NodeTarget) -> _T:
        """Run ``change(t)`` holding the lock ``fd``, then release it (closing drops the flock)."""
        try:
            return change(t)
        finally:
            os.close(fd)

    def _write(self, entries: Sequence[LedgerEntry]) -> None:
        document = {
            "version": _LEDGER_VERSION,
            "records": [{"iqn": e.iqn, "portal": e.portal} for e in entries],
        }
        data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        directory = self.path.parent
        temporary: str | None = None
        try:
            # mkstemp creates the file with mode 0600, whatever the umask.
            fd, temporary = tempfile.mkstemp(
                dir=directory, prefix=f".{self.path.name}.", suffix=".tmp"
            )
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
            temporary = None
        except OSError as exc:
            raise self._error(f"cannot write it: {_reason(exc)}") from None
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
        # The rename is durable once the directory is synced; failing that is not worth an error.
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# attach and detach
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachResult:
    """A successful hand-off.

    ``created_record`` says whether we created the node record (and so noted it in the ledger);
    ``session_existed`` whether the login found a session already there (exit 15); ``commands``
    are the masked commands run.
    """

    device: Path
    created_record: bool
    session_existed: bool
    commands: tuple[str, ...] = field(default=())


class RecordFate(enum.Enum):
    """What :func:`detach` did with the node record; the values are the CLI's JSON strings."""

    DELETED = "deleted"
    ALREADY_GONE = "already_gone"
    ABSENT = "absent"
    KEPT_NOT_OURS = "kept_not_ours"
    KEPT_SHARED = "kept_shared"
    KEPT_ON_REQUEST = "kept_on_request"
    KEPT_IN_USE = "kept_in_use"

    @property
    def description(self) -> str:
        return _FATES[self]


_FATES: Final[dict[RecordFate, str]] = {
    RecordFate.DELETED: "record deleted",
    RecordFate.ALREADY_GONE: "record already gone",
    RecordFate.ABSENT: "nothing to detach: no node record and no session",
    RecordFate.KEPT_NOT_OURS: "record kept: not created by pyiscsi-failover",
    RecordFate.KEPT_SHARED: "record kept: another record has the same IQN and address, and "
    "iscsiadm would delete both",
    RecordFate.KEPT_ON_REQUEST: "record kept, as asked",
    RecordFate.KEPT_IN_USE: "session and record kept: other LUNs of the target are in use; "
    "only this LUN's disk was removed",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class DetachResult:
    """A finished detach: what became of the node record, the disk removed on its own (when the
    session stays for other LUNs), and the masked commands run."""

    record: RecordFate
    commands: tuple[str, ...] = field(default=())
    removed_disk: str | None = None


async def _wait_for_device(
    t: NodeTarget, path: Path, *, seconds: float, sys_root: Path
) -> KernelSession | None:
    """Return once ``path`` exists, scanning ``t``'s LUN in its session once the session is in
    sysfs; :class:`DeviceTimeout` after ``seconds``. Returns the session scanned, if any."""
    scanned: KernelSession | None = None
    with trio.move_on_after(seconds) as waiting:
        # Polling is deliberate: the kernel and udev give us nothing to await. A stat on
        # devtmpfs does not block in practice, so it runs in the event loop, not in a thread.
        while not path.exists():  # noqa: ASYNC240
            if scanned is None:
                scanned = await _scan(t, sys_root)
            await trio.sleep(DEVICE_POLL_INTERVAL)
    if waiting.cancelled_caught:
        raise DeviceTimeout(
            f"logged in, but {path} did not appear within {seconds:g} s", path=str(path)
        )
    return scanned


async def _scan(t: NodeTarget, sys_root: Path) -> KernelSession | None:
    """Ask the kernel for ``t``'s LUN (``node.session.scan`` is manual); None until its session
    shows in sysfs."""
    session = find_session(t.portal, t.iqn, sys_root=sys_root)
    if session is None:
        return None
    try:
        # In a thread: the write returns only once the kernel has scanned, which takes the
        # target's answers (one served by this very event loop would never come).
        await trio.to_thread.run_sync(
            lambda: scan_lun(session, t.linux_lun, sys_root=sys_root), abandon_on_cancel=True
        )
    except OSError as exc:
        logger.warning("cannot scan LUN %d of %s: %s", t.linux_lun, session.name, _reason(exc))
    return session


def _check_volume(device: Path, expect_wwid: str | None, sys_root: Path) -> None:
    """The kernel's disk must be the volume the probe saw (:class:`WrongVolume`)."""
    if expect_wwid is None:
        return
    found = disk_wwid(block_device_of(device), sys_root=sys_root)
    if found is None:
        logger.warning("%s shows no WWID; cannot check it is %s", device, expect_wwid)
        return
    if found.lower() != expect_wwid.lower():
        raise WrongVolume(
            f"{device} is {found}, not the volume {expect_wwid}: wrong LUN at this portal?",
            expected=expect_wwid,
            found=found,
            path=str(device),
        )


#: The record's login bounds a hand-off sets for its own login, then puts back.
_LOGIN_TIMEOUT: Final = "node.conn[0].timeo.login_timeout"
_LOGIN_RETRIES: Final = "node.session.initial_login_retry_max"
_RECORD_LINE: Final = re.compile(r"^\s*(\S+)\s*=\s*(.*?)\s*$")


def _record_values(text: str) -> dict[str, str]:
    """``name = value`` lines of ``iscsiadm -m node -T ... -p ...`` (the first record's)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# END RECORD"):
            break
        match = _RECORD_LINE.match(line)
        if match is not None:
            values.setdefault(match.group(1), match.group(2))
    return values


def _login_bounds(
    t: NodeTarget, record: str, seconds: float
) -> tuple[list[Command], list[Command]]:
    """The updates that make the next login one try of at most ``seconds`` (rounded up, as the
    record holds whole seconds), and those that put the record's values back afterwards, so
    that later recovery logins keep open-iscsi's settings."""
    values = _record_values(record)
    bound = [
        node_update(t, _LOGIN_TIMEOUT, str(max(1, math.ceil(seconds)))),
        node_update(t, _LOGIN_RETRIES, "1"),
    ]
    restore = [
        node_update(t, name, values[name])
        for name in (_LOGIN_TIMEOUT, _LOGIN_RETRIES)
        if values.get(name, "").isdigit()
    ]
    return bound, restore


async def _run_quietly(
    iscsiadm: Iscsiadm,
    commands: Sequence[Command],
    ran: list[str],
    *,
    ok: Iterable[int] = (IscsiadmExit.SUCCESS,),
    failed: str,
) -> list[Command]:
    """Best effort, shielded: failures are logged (after ``failed``), never raised. Returns the
    commands whose exit status was in ``ok``."""
    accepted = set(ok)
    done: list[Command] = []
    with trio.CancelScope(shield=True):
        for cmd in commands:
            try:
                result = await iscsiadm.run(cmd)
            except IscsiadmError as exc:
                logger.warning("%s: %s", failed, exc)
                continue
            ran.append(result.command)
            if result.exit_code in accepted:
                done.append(cmd)
            else:
                logger.warning("%s: %s", failed, result.error())
    return done


_GONE_OK: Final = (IscsiadmExit.SUCCESS, IscsiadmExit.NO_OBJS_FOUND)


async def _undo(
    t: NodeTarget, iscsiadm: Iscsiadm, *, logout: bool, delete: bool, ran: list[str]
) -> bool:
    """Best-effort cleanup after a failed attach; failures are logged, never raised.

    Returns whether the record is now known to be gone (only ever true with ``delete``).
    """
    delete_cmd = node_delete(t)
    steps = ([node_logout(t)] if logout else []) + ([delete_cmd] if delete else [])
    done = await _run_quietly(iscsiadm, steps, ran, ok=_GONE_OK, failed="cleanup failed")
    return any(cmd is delete_cmd for cmd in done)


async def _settle_ledger(ledger: RecordLedger, t: NodeTarget, *, gone: bool) -> None:
    """After a failed attach that created ``t``'s record: make the ledger tell the truth.

    A record we could not delete again is noted, so that a later detach removes it; one that is
    gone must not stay listed (an operator might create it by hand later). Never raises: the
    attach's own error is the one to report.
    """
    try:
        # Shielded: this runs while a cancellation unwinds; the lock's own deadline bounds it.
        with trio.CancelScope(shield=True):
            if gone:
                await ledger.remove_async(t)
            else:
                await ledger.add_async(t)
                logger.warning(
                    "the node record of %s at %s we created could not be deleted; noted in %s "
                    "so that detach removes it",
                    t.iqn,
                    portal_argument(t),
                    ledger.path,
                )
    except LedgerError as exc:
        logger.warning("%s", exc)


async def attach(
    t: NodeTarget,
    *,
    iscsiadm: Iscsiadm,
    device_timeout: float = 20.0,
    dev_root: Path = Path("/dev/disk/by-path"),
    ledger: RecordLedger | None = None,
    login_timeout: float | None = None,
    expect_wwid: str | None = None,
    sys_root: Path = SYS_ROOT,
) -> AttachResult:
    """Create or update the node record, log in, scan the LUN and wait for its disk.

    A login that finds the session already there (exit 15) counts as success: another volume of
    the same target uses it, and only this LUN is scanned (the record's ``node.session.scan`` is
    manual; see :func:`handoff_plan`). ``login_timeout`` bounds this login to one try of that
    many seconds (``node.conn[0].timeo.login_timeout``, ``node.session.initial_login_retry_max``
    = 1), and the record's own values are put back after it. ``expect_wwid`` is the WWID the
    probe saw (``naa.6...``): a disk that shows another in sysfs is :class:`WrongVolume`.

    On any failure (or cancellation) we undo only what we did: remove a disk we scanned into a
    session that was already there, log out a session we logged in, delete a record we created.
    A record that existed before is left in place (with our settings applied).

    A record we created is noted in the ``ledger`` (by default ``RecordLedger()``, at
    :data:`DEFAULT_LEDGER_PATH`) when the attach succeeds, after the disk appeared, so that
    :func:`detach` knows it is ours. Waiting for a busy ledger lock is the only checkpoint in
    between; once the note is written nothing can cancel the success. The ledger is read before
    any iscsiadm command runs, so a broken one changes nothing; one that cannot be written at the
    end (or whose lock stays busy) undoes the attach like any other failure.
    Raises :class:`IscsiadmError`, :class:`DeviceTimeout` when the disk does not appear,
    :class:`WrongVolume`, or :class:`LedgerError`.
    """
    ledger = RecordLedger() if ledger is None else ledger
    ledger.entries()  # a broken ledger stops us before anything changes
    ran: list[str] = []
    shown = await iscsiadm.run(node_show(t))
    ran.append(shown.command)
    if shown.exit_code == IscsiadmExit.SUCCESS:
        created = False
    elif shown.exit_code == IscsiadmExit.NO_OBJS_FOUND:
        created = True
    else:
        raise shown.error()
    # Set from the moment we send --login: a login that failed late or was killed by our
    # timeout may still leave a session behind, and logging out of none is harmless (exit 21).
    may_have_session = False
    scanned_into: str | None = None  # a disk we added to a session that was already there
    try:
        for cmd in _setup_plan(t, create=created):
            ran.append((await iscsiadm.check(cmd)).command)
        restore: list[Command] = []
        if login_timeout is not None:
            record = shown.stdout if not created else (await iscsiadm.check(node_show(t))).stdout
            bound, restore = _login_bounds(t, record, login_timeout)
            for cmd in bound:
                ran.append((await iscsiadm.check(cmd)).command)
        may_have_session = True
        try:
            login = await iscsiadm.check(
                node_login(t), ok=(IscsiadmExit.SUCCESS, IscsiadmExit.SESS_EXISTS)
            )
            ran.append(login.command)
        finally:
            await _run_quietly(
                iscsiadm, restore, ran, failed="cannot put the record's login bounds back"
            )
        session_existed = login.exit_code == IscsiadmExit.SESS_EXISTS
        # Never log out of a session someone else made.
        may_have_session = not session_existed
        device = Path(dev_root) / by_path_name(t)
        existed = device.exists()
        await _wait_for_device(t, device, seconds=device_timeout, sys_root=sys_root)
        if session_existed and not existed:
            scanned_into = block_device_of(device)
        _check_volume(device, expect_wwid, sys_root)
        if created:
            await ledger.add_async(t)
    except BaseException:
        if scanned_into is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(device_timeout):
                await _delete_disk_quietly(scanned_into, sys_root)
        gone = await _undo(t, iscsiadm, logout=may_have_session, delete=created, ran=ran)
        if created:
            await _settle_ledger(ledger, t, gone=gone)
        raise
    logger.info("attached %s at %s as %s", t.iqn, portal_argument(t), device)
    return AttachResult(
        device=device, created_record=created, session_existed=session_existed, commands=tuple(ran)
    )


async def _delete_disk_quietly(block: str, sys_root: Path) -> None:
    try:
        await _delete_disk(block, sys_root)
    except OSError as exc:
        logger.warning("cannot remove disk %s: %s", block, _reason(exc))


async def _delete(t: NodeTarget, iscsiadm: Iscsiadm, ran: list[str]) -> RecordFate:
    deleted = await iscsiadm.check(node_delete(t), ok=_GONE_OK)
    ran.append(deleted.command)
    if deleted.exit_code == IscsiadmExit.NO_OBJS_FOUND:
        return RecordFate.ALREADY_GONE
    return RecordFate.DELETED


#: Seconds a session whose portal is gone may still wait for it once detach logs it out.
DETACH_RECOVERY_TIMEOUT: Final = 5


async def _delete_disk(block: str, sys_root: Path) -> None:
    """In a thread: the kernel flushes the disk's cache first, which can wait on the target."""
    await trio.to_thread.run_sync(
        lambda: delete_disk(block, sys_root=sys_root), abandon_on_cancel=True
    )


async def _detach_one_disk(t: NodeTarget, block: str | None, sys_root: Path) -> DetachResult:
    """Remove ``t``'s disk from a session other LUNs still use; keep session and record."""
    if block is not None:
        try:
            await _delete_disk(block, sys_root)
        except OSError as exc:
            raise IscsiadmError(
                f"cannot remove disk {block} of {t.iqn} LUN {t.linux_lun}: {_reason(exc)}",
                exit_code=None,
                command=f"echo 1 > /sys/block/{block}/device/delete",
            ) from None
    fate = RecordFate.KEPT_IN_USE
    logger.info("detached %s LUN %d at %s: %s", t.iqn, t.linux_lun, portal_argument(t), fate)
    return DetachResult(record=fate, removed_disk=block)


#: Type of :func:`detach`'s ``delete``: which node records it deletes.
DeleteMode = Literal["if_ours", "always", "never"]
DELETE_MODES: Final[tuple[DeleteMode, ...]] = ("if_ours", "always", "never")


def _delete_mode(delete: object, delete_record: object) -> DeleteMode:
    if delete_record is not None:
        if not isinstance(delete_record, bool):
            raise LocalProtocolError(f"detach: delete_record={delete_record!r} is not a bool")
        if delete != "if_ours":
            raise LocalProtocolError("detach: give delete= or delete_record=, not both")
        return "if_ours" if delete_record else "never"
    for mode in DELETE_MODES:
        if delete == mode:
            return mode
    allowed = ", ".join(repr(m) for m in DELETE_MODES)
    raise LocalProtocolError(f"detach: delete={delete!r} is not one of {allowed}")


async def detach(
    t: NodeTarget,
    *,
    iscsiadm: Iscsiadm,
    delete: DeleteMode = "if_ours",
    ledger: RecordLedger | None = None,
    delete_record: bool | None = None,
    sys_root: Path = SYS_ROOT,
    recovery_timeout: int = DETACH_RECOVERY_TIMEOUT,
) -> DetachResult:
    """Log out of ``t``, then delete its node record as ``delete`` says.

    When the kernel's session to ``t`` also carries other LUNs (volumes that share the target),
    only this LUN's disk is removed (``/sys/block/sdX/device/delete``); the session and the
    record stay (:attr:`RecordFate.KEPT_IN_USE`). A session whose portal is gone (not
    ``LOGGED_IN``) first gets its ``recovery_tmo`` cut to ``recovery_timeout`` seconds, so that
    the logout does not wait out open-iscsi's replacement timeout (120 s by default).

    ``delete="if_ours"`` (the default) deletes the record only if the ``ledger`` (by default
    ``RecordLedger()``) says :func:`attach` created it; any other record is kept
    (:attr:`RecordFate.KEPT_NOT_OURS`). iscsiadm deletes every record of the IQN at that address
    and port whatever its tpgt, so a record of ours that now shares them with another one is kept
    as well (:attr:`RecordFate.KEPT_SHARED`, still listed). ``delete="always"`` deletes whatever
    record iscsiadm finds (every tpgt), ours or not; ``delete="never"`` only logs out.

    A record found gone is dropped from the ledger. When there was neither a record nor a
    session, nor a ledger entry, the fate is :attr:`RecordFate.ABSENT` ("nothing to detach").
    The ledger is read before anything runs, so a broken one (:class:`LedgerError`) changes
    nothing. Both steps are idempotent: no session (exit 21, or 2) and no record (exit 21) are
    fine. An unknown ``delete`` is a :class:`LocalProtocolError`.

    ``delete_record`` is the older spelling, kept for existing callers: ``True`` is
    ``delete="if_ours"``, ``False`` is ``delete="never"``.
    """
    mode = _delete_mode(delete, delete_record)
    ledger = RecordLedger() if ledger is None else ledger
    listed = ledger.is_ours(t)  # a broken ledger stops us before anything changes
    session = find_session(t.portal, t.iqn, sys_root=sys_root)
    if session is not None:
        disks = session_disks(session, sys_root=sys_root)
        if any(lun != t.linux_lun for lun in disks):
            return await _detach_one_disk(t, disks.get(t.linux_lun), sys_root)
        if session.state != "LOGGED_IN":
            try:
                set_recovery_timeout(session, recovery_timeout, sys_root=sys_root)
            except OSError as exc:
                logger.warning("cannot shorten %s's recovery timeout: %s", session.name, exc)
    logout = await iscsiadm.check(
        node_logout(t),
        ok=(IscsiadmExit.SUCCESS, IscsiadmExit.NO_OBJS_FOUND, IscsiadmExit.SESS_NOT_FOUND),
    )
    ran = [logout.command]
    fate = RecordFate.ALREADY_GONE  # until a record is seen
    if mode == "always":
        fate = await _delete(t, iscsiadm, ran)
    else:
        shown = await iscsiadm.check(node_show(t), ok=_GONE_OK)
        ran.append(shown.command)
        if shown.exit_code == IscsiadmExit.NO_OBJS_FOUND:
            pass
        elif mode == "never":
            fate = RecordFate.KEPT_ON_REQUEST
        elif not listed:
            fate = RecordFate.KEPT_NOT_OURS
        elif shown.stdout.count("# BEGIN RECORD") > 1:
            fate = RecordFate.KEPT_SHARED
            logger.warning(
                "kept the node record of %s at %s: %s", t.iqn, portal_argument(t), fate.description
            )
        else:
            fate = await _delete(t, iscsiadm, ran)
    if fate is RecordFate.ALREADY_GONE:
        # Say "gone" only if something of it was there to detach: a session or our ledger entry.
        had_session = logout.exit_code == IscsiadmExit.SUCCESS
        fate = RecordFate.ALREADY_GONE if listed or had_session else RecordFate.ABSENT
    if listed and fate in (RecordFate.DELETED, RecordFate.ALREADY_GONE):
        await ledger.remove_async(t)
    logger.info("detached %s at %s: %s", t.iqn, portal_argument(t), fate.description)
    return DetachResult(record=fate, commands=tuple(ran))
