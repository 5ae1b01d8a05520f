"""The ``pyiscsi-failover`` command: discover, login, probe, attach, detach, demo.

``run(argv) -> int`` does everything so tests can call it directly; only ``main`` exits. Exit
status: 0 success, 1 a target or network failure (or output that cannot be written), 2 bad usage
or input, 130 interrupted; each failure with a one-line reason on stderr and never a traceback.
A reader that closes the pipe early (``| head -1``) changes nothing: the rest of the output is
dropped quietly and the status is the command's own. CHAP secrets are read from files or the
environment, never from argv, and are printed nowhere (not in output, errors, JSON or debug
logs). This module is the only one that configures logging, and ``run`` puts the logging
configuration back as it found it, so calling it from tests or other programs leaves no handler
behind.

Start-up cost matters (a probe is often run from a script on every attach), so this module
imports only the standard library and ``errors`` at the top: building the parser and ``--help``
never load trio, construct or the protocol. Each command imports what it needs when it runs,
and the library defaults shown in ``--help`` are mirrored below (tests check they agree).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn, TypeVar

from pyiscsi_failover import __version__
from pyiscsi_failover.errors import (
    ConnectionInfoError,
    InvalidName,
    InvalidPortal,
    ISCSIError,
    LocalProtocolError,
)

if TYPE_CHECKING:
    import ipaddress

    from _typeshed import SupportsWrite

    from pyiscsi_failover.connection_info import ConnectionInfo
    from pyiscsi_failover.credentials import ChapCredentials, Secret
    from pyiscsi_failover.iscsiadm import DeleteMode
    from pyiscsi_failover.login_config import LoginConfig
    from pyiscsi_failover.names import Portal
    from pyiscsi_failover.prober import Attempt, ProbeOptions, ProbeResult, ProgressEvent
    from pyiscsi_failover.protocol.chap import ChapAlgorithm, ChapPolicy
    from pyiscsi_failover.transport import LoginReport, RedirectPolicy
    from pyiscsi_failover.volume import Handoff

__all__ = ["build_parser", "main", "run"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

SECRET_ENV: Final = "PYISCSI_CHAP_SECRET"  # noqa: S105 (a variable name, not a secret)
TARGET_SECRET_ENV: Final = "PYISCSI_TARGET_CHAP_SECRET"  # noqa: S105
_DEV_ROOT: Final = Path("/dev/disk/by-path")

# Library defaults shown in --help, mirrored so that building the parser imports no protocol
# code; tests/test_cli.py checks each one against the library.
_DEFAULT_CONNECT_TIMEOUT: Final = 3.0  # transport.DEFAULT_CONNECT_TIMEOUT
_DEFAULT_LOGIN_TIMEOUT: Final = 10.0  # transport.DEFAULT_LOGIN_TIMEOUT
_MAX_REDIRECTS: Final = 4  # transport.MAX_REDIRECTS
_MAX_REDIRECTS_LIMIT: Final = 64  # what transport.RedirectPolicy accepts
_REDIRECT_MODES: Final = ("follow", "never")  # transport.RedirectMode values
_DEFAULT_STAGGER: Final = 0.25  # prober.DEFAULT_STAGGER
_DEFAULT_CONCURRENCY: Final = 16  # prober.DEFAULT_CONCURRENCY
_POLICIES: Final = ("sequential", "ordered", "staggered")  # prober.Policy values
_CHECKS: Final = ("tcp", "login", "lun")  # prober.Check values
_MAX_LUN: Final = 16383  # connection_info.MAX_LUN
#: protocol.chap.DEFAULT_ALGORITHMS, in open-iscsi's names.
_DEFAULT_CHAP_ALGORITHMS: Final = "MD5,SHA1,SHA256,SHA3-256"
_DELETE_MODES: Final = ("if-ours", "always", "never")  # iscsiadm.DELETE_MODES, CLI spelling
#: ``--state-file``'s default (iscsiadm.DEFAULT_LEDGER_PATH), read when the parser is built
#: (tests point it elsewhere).
_STATE_FILE = Path("/var/lib/pyiscsi-failover/created-records.json")

#: The logger of protocol/chap.py, whose short-secret warning is shown once per run.
_CHAP_LOGGER: Final = "pyiscsi_failover.protocol.chap"
_CHAP_HINT: Final = "target requires CHAP: give --chap-user and a secret"
_INITIATOR_HELP: Final = (
    "our InitiatorName (default: open-iscsi's in /etc/iscsi/initiatorname.iscsi, else one made "
    "from the host name)"
)

#: The package's logger: the CLI configures it (and only it) for the duration of ``run``.
_package_logger = logging.getLogger("pyiscsi_failover")
logger = logging.getLogger(__name__)


_N = TypeVar("_N", int, float)


class _UsageError(Exception):
    """Bad command-line usage; becomes exit status 2 with its message."""


class _OutputError(Exception):
    """stdout cannot be written (a full disk); becomes exit status 1 with its message."""


#: Where ``--help``/``--version`` go during ``run``: its ``stdout``. A context variable rather
#: than ``redirect_stdout``, which swaps ``sys.stdout`` for every thread at once.
_help_out: contextvars.ContextVar[IO[str] | None] = contextvars.ContextVar(
    "_help_out", default=None
)


class _Parser(argparse.ArgumentParser):
    """Raises instead of exiting, prints help to ``run``'s stdout, and takes no abbreviations.

    With abbreviations, ``--chap-secret VALUE`` would silently mean ``--chap-secret-file VALUE``
    and the "cannot read" error would then print the secret.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        _write_help(self.format_help(), file)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


class _VersionAction(argparse.Action):
    """``--version``, written where ``--help`` goes (argparse's own always uses sys.stdout)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show the version and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        _write_help(f"{parser.prog} {__version__}\n")
        parser.exit()


def _write_help(text: str, file: SupportsWrite[str] | None = None) -> None:
    """Write ``--help``/``--version`` text: a reader that went away is not worth an error (as
    argparse has it), but a full disk is (argparse would swallow it and exit 0)."""
    out = file or _help_out.get() or sys.stdout
    try:
        out.write(text)
        flush = getattr(out, "flush", None)
        if flush is not None:
            flush()
    except BrokenPipeError:
        pass
    except OSError as exc:
        raise _OutputError(f"cannot write output: {exc.strerror or type(exc).__name__}") from None


# -- argument parsing ------------------------------------------------------------------------------


def _checked(
    cast: Callable[[str], _N], accept: Callable[[_N], bool], want: str
) -> Callable[[str], _N]:
    """An argparse type: ``cast`` the text, then require ``accept`` of the value."""
    kind = "an integer" if cast is int else "a number"

    def parse(text: str) -> _N:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} {want}")
        return value

    return parse


# NaN fails every comparison, so it is refused along with the out-of-range values.
_positive = _checked(float, lambda v: 0 < v < math.inf, "must be a positive number of seconds")
_non_negative = _checked(float, lambda v: 0 <= v < math.inf, "must be a number of seconds >= 0")
_count = _checked(int, lambda v: v >= 1, "must be at least 1")
_lun = _checked(int, lambda v: 0 <= v <= _MAX_LUN, f"is not a LUN in 0..{_MAX_LUN}")
_redirect_count = _checked(
    int,
    lambda v: 0 <= v <= _MAX_REDIRECTS_LIMIT,
    f"is not a number of redirects in 0..{_MAX_REDIRECTS_LIMIT}",
)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``--redirect-allow``: a CIDR (a bare address is a /32 or /128)."""
    import ipaddress

    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP network in CIDR form (10.0.0.0/8, fd00::/8)"
        ) from None


def _chap_algorithms(text: str) -> tuple[ChapAlgorithm, ...]:
    # Imported here: only a command line that gives the option pays for the protocol package.
    from pyiscsi_failover.protocol.chap import parse_chap_algorithms

    try:
        return parse_chap_algorithms(text)
    except LocalProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    # Accepted before and after the subcommand; the subcommand's copy only counts when given.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log more: -v info, -vv debug (default: warnings only)",
    )


def _refuse_secret(file_option: str, env: str) -> Callable[[str], str]:
    def refuse(_value: str) -> str:
        raise argparse.ArgumentTypeError(
            f"a secret on the command line is visible to every local user (ps); "
            f"use {file_option} or ${env}"
        )

    return refuse


def _add_credentials(parser: argparse.ArgumentParser, *, offer: bool = True) -> None:
    group = parser.add_argument_group(
        "CHAP",
        f"secrets come only from files or ${SECRET_ENV} / ${TARGET_SECRET_ENV}, never from argv",
    )
    group.add_argument(
        "--initiator-name",
        metavar="IQN",
        help=_INITIATOR_HELP,
    )
    group.add_argument(
        "--chap-user",
        metavar="USER",
        help="our CHAP username, checked by the target (default: none, or the file's)",
    )
    group.add_argument(
        "--chap-secret-file",
        type=Path,
        metavar="PATH",
        help=f"file holding our CHAP secret (default: ${SECRET_ENV})",
    )
    group.add_argument(
        "--target-chap-user",
        metavar="USER",
        help="the target's CHAP username, for mutual CHAP (default: none)",
    )
    group.add_argument(
        "--target-chap-secret-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the target's CHAP secret (default: ${TARGET_SECRET_ENV})",
    )
    if offer:
        group.add_argument(
            "--chap-algorithms",
            type=_chap_algorithms,
            metavar="LIST",
            help="CHAP_A offer in order of preference, names or numbers (default "
            f"{_DEFAULT_CHAP_ALGORITHMS}: MD5 first because tgt reads only the first "
            "algorithm offered; to prefer SHA-256 where the target has it: SHA256,MD5)",
        )
    # The obvious spellings of a secret on argv are refused without echoing the value.
    for option, file_option, env in (
        ("--chap-secret", "--chap-secret-file", SECRET_ENV),
        ("--target-chap-secret", "--target-chap-secret-file", TARGET_SECRET_ENV),
    ):
        group.add_argument(option, type=_refuse_secret(file_option, env), help=argparse.SUPPRESS)


def _add_timeouts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect-timeout",
        type=_positive,
        default=_DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="TCP connect deadline per portal (default %(default)g)",
    )
    parser.add_argument(
        "--login-timeout",
        "--timeout",
        dest="login_timeout",
        type=_positive,
        default=_DEFAULT_LOGIN_TIMEOUT,
        metavar="S",
        help="login deadline per hop after its connect; connect + login timeout is each"
        " candidate's whole budget, redirects included (default %(default)g)",
    )


def _add_redirects(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("redirects", "what a login does when a target redirects it")
    group.add_argument(
        "--redirects",
        choices=_REDIRECT_MODES,
        default="follow",
        help="follow a target's redirects, or refuse them (default %(default)s)",
    )
    group.add_argument(
        "--redirect-allow",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="follow redirects only into this network; repeatable (default: any address)",
    )
    group.add_argument(
        "--max-redirects",
        type=_redirect_count,
        default=_MAX_REDIRECTS,
        metavar="N",
        help="redirects one login may follow (default %(default)s)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout, nothing else"
    )


def _add_connection_info(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    parser.add_argument(
        "-c",
        "--connection-info",
        metavar="FILE",
        required=required,
        help=f"connection_info JSON file, - for stdin; {what}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyiscsi-failover",
        description="Find the first working iSCSI portal/target among a volume's alternatives "
        "and hand it to open-iscsi.",
    )
    parser.add_argument("--version", action=_VersionAction)
    _add_verbose(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("discover", help="SendTargets discovery: list targets and their portals")
    _add_verbose(p, argparse.SUPPRESS)
    p.add_argument("portal", nargs="?", help="HOST[:PORT], IPv6 as [ADDR]:PORT (port 3260)")
    _add_connection_info(
        p,
        required=False,
        what="its portals are tried, main first, under --policy, with its discovery CHAP",
    )
    _add_policy(p)
    _add_pacing(p)
    _add_json(p)
    _add_credentials(p)
    _add_timeouts(p)
    _add_redirects(p)

    p = sub.add_parser("login", help="one full login and logout; report outcome and parameters")
    _add_verbose(p, argparse.SUPPRESS)
    p.add_argument("portal", help="HOST[:PORT], IPv6 as [ADDR]:PORT (port 3260)")
    p.add_argument("iqn", help="target name")
    _add_json(p)
    _add_credentials(p)
    _add_timeouts(p)
    _add_redirects(p)

    p = sub.add_parser("probe", help="probe a volume's portals in order and choose one")
    _add_verbose(p, argparse.SUPPRESS)
    _add_candidates(p)
    _add_probe_options(p)
    _add_credentials(p)
    _add_redirects(p)

    p = sub.add_parser("attach", help="probe, then log in with open-iscsi (iscsiadm)")
    _add_verbose(p, argparse.SUPPRESS)
    _add_connection_info(p, required=True, what="the volume to attach")
    p.add_argument("--dry-run", action="store_true", help="print the iscsiadm commands, run none")
    p.add_argument(
        "--iscsiadm", default="iscsiadm", help="iscsiadm binary (default %(default)s, from PATH)"
    )
    p.add_argument(
        "--device-timeout",
        type=_positive,
        default=20.0,
        metavar="S",
        help="how long to wait for the disk to appear (default %(default)g)",
    )
    p.add_argument(
        "--dev-root",
        type=Path,
        default=_DEV_ROOT,
        metavar="DIR",
        help="where udev links disks by path (default %(default)s)",
    )
    _add_state_file(p)
    _add_probe_options(p)
    _add_credentials(p)
    _add_redirects(p)

    p = sub.add_parser(
        "detach",
        help="log out of the volume's targets and delete the node records attach created",
    )
    _add_verbose(p, argparse.SUPPRESS)
    _add_connection_info(p, required=True, what="the volume to detach")
    p.add_argument(
        "--iscsiadm", default="iscsiadm", help="iscsiadm binary (default %(default)s, from PATH)"
    )
    p.add_argument(
        "--delete",
        choices=_DELETE_MODES,
        default="if-ours",
        help="which node records to delete after the logout: those attach created (the "
        "ledger's), every one found, or none (default %(default)s)",
    )
    p.add_argument("--keep-record", action="store_true", help="log out only (--delete never)")
    _add_state_file(p)
    _add_json(p)
    _add_credentials(p, offer=False)

    p = sub.add_parser("demo", help="a self-contained failover demo on loopback (no root)")
    _add_verbose(p, argparse.SUPPRESS)
    _add_json(p)
    p.add_argument(
        "--initiator-name",
        metavar="IQN",
        help=_INITIATOR_HELP,
    )
    _add_policy(p)
    return parser


def _add_state_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-file",
        type=Path,
        default=_STATE_FILE,
        metavar="PATH",
        help="the ledger of node records attach created; detach deletes only those "
        "(default %(default)s)",
    )


def _add_candidates(parser: argparse.ArgumentParser) -> None:
    _add_connection_info(parser, required=False, what="or give --portal/--iqn/--lun")
    parser.add_argument(
        "--portal",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a candidate portal, IPv6 as [ADDR]:PORT; repeat for alternatives (default port 3260)",
    )
    parser.add_argument(
        "--iqn",
        action="append",
        default=[],
        help="target name; once, or once per --portal (no default)",
    )
    parser.add_argument(
        "--lun",
        action="append",
        type=_lun,
        default=[],
        metavar="N",
        help=f"LUN 0..{_MAX_LUN}; once, or once per --portal (default 0)",
    )


def _add_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        choices=_POLICIES,
        default="ordered",
        help="sequential: one after another; ordered: concurrently, the first working one in "
        "order wins; staggered: a new one every --stagger, the first to succeed wins (default "
        "%(default)s)",
    )


def _add_probe_options(parser: argparse.ArgumentParser) -> None:
    _add_policy(parser)
    parser.add_argument(
        "--check",
        choices=_CHECKS,
        default="login",
        help="what makes a candidate work: a TCP connect, a full iSCSI login and logout, or "
        "also its LUN (listed, a ready disk; size and WWID shown) (default %(default)s)",
    )
    parser.add_argument(
        "--expect-wwid",
        metavar="WWID",
        help="with --check lun: the volume's WWID (naa.6... or 36...); a candidate showing "
        "another is wrong_volume (default: the first that passes pins it)",
    )
    parser.add_argument(
        "--all", action="store_true", help="probe every candidate, as a health report"
    )
    _add_pacing(parser)
    _add_json(parser)
    _add_timeouts(parser)


def _add_pacing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stagger",
        type=_non_negative,
        default=_DEFAULT_STAGGER,
        metavar="S",
        help="staggered: seconds before starting the next candidate (default %(default)g)",
    )
    parser.add_argument(
        "--concurrency",
        type=_count,
        default=_DEFAULT_CONCURRENCY,
        metavar="N",
        help="ordered: candidates probed at once, at most (default %(default)s)",
    )


# -- inputs -------------------------------------------------------------------------------


def _read_secret(path: Path | None, env: str, what: str) -> Secret | None:
    from pyiscsi_failover.connection_info import read_limited
    from pyiscsi_failover.credentials import Secret

    if path is not None:
        # At most 1 MiB is read (`--chap-secret-file /dev/zero`); the secret's own limit
        # (255 bytes, open-iscsi's) is checked when the credentials are made.
        secret = read_limited(path, what=f"{what} secret file").rstrip(b"\r\n")
        if not secret:
            raise _UsageError(f"{what} secret file {str(path)!r} is empty")
        logger.debug("%s secret read from %s (%d bytes)", what, path, len(secret))
        return Secret(secret)
    value = os.environ.get(env)
    if not value:
        return None
    logger.debug("%s secret taken from $%s", what, env)
    return Secret(value)


def _credentials(args: argparse.Namespace) -> tuple[ChapCredentials | None, ChapCredentials | None]:
    from pyiscsi_failover.credentials import ChapCredentials

    chap = target_chap = None
    if args.chap_user:
        secret = _read_secret(args.chap_secret_file, SECRET_ENV, "CHAP")
        if secret is None:
            raise _UsageError(f"--chap-user needs --chap-secret-file or ${SECRET_ENV}")
        chap = ChapCredentials(args.chap_user, secret)
    elif args.chap_secret_file:
        raise _UsageError("--chap-secret-file needs --chap-user")
    elif os.environ.get(SECRET_ENV):
        # A secret the user meant to use would otherwise be silently ignored.
        raise _UsageError(f"${SECRET_ENV} is set but --chap-user is not: give --chap-user")
    if args.target_chap_user:
        if chap is None:
            raise _UsageError("--target-chap-user (mutual CHAP) needs --chap-user too")
        secret = _read_secret(args.target_chap_secret_file, TARGET_SECRET_ENV, "target CHAP")
        if secret is None:
            raise _UsageError(
                f"--target-chap-user needs --target-chap-secret-file or ${TARGET_SECRET_ENV}"
            )
        target_chap = ChapCredentials(args.target_chap_user, secret)
    elif args.target_chap_secret_file:
        raise _UsageError("--target-chap-secret-file needs --target-chap-user")
    elif os.environ.get(TARGET_SECRET_ENV):
        raise _UsageError(
            f"${TARGET_SECRET_ENV} is set but --target-chap-user is not: give --target-chap-user"
        )
    return chap, target_chap


def _initiator_name(args: argparse.Namespace) -> str:
    from pyiscsi_failover.host import default_initiator_name
    from pyiscsi_failover.names import validate_iscsi_name

    if args.initiator_name:
        try:
            return validate_iscsi_name(args.initiator_name)
        except InvalidName as exc:
            raise _UsageError(f"--initiator-name: {exc}") from None
    name = default_initiator_name()
    logger.debug("using InitiatorName %s", name)
    return name


def _bracketed_hint(text: str) -> str | None:
    """``[ADDR]:PORT`` when ``text`` reads as an unbracketed IPv6 address followed by a port."""
    import ipaddress

    rest, comma, tpgt = text.partition(",")
    if rest.startswith("[") or rest.count(":") < 2:
        return None
    address, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return None
    return f"[{address}]:{port}{comma}{tpgt}"


def _portal(text: str, what: str = "portal") -> Portal:
    from pyiscsi_failover.names import Portal

    hint = _bracketed_hint(text)
    try:
        portal = Portal.parse(text)
    except InvalidPortal as exc:
        more = f"; an IPv6 address with a port is written {hint}" if hint else ""
        raise _UsageError(f"{what}: {exc}{more}") from None
    if hint is not None:
        # Valid, but rarely what was meant: "::1:3260" is the address ::1:3260 on port 3260.
        logger.warning(
            "%s %r is read as the IPv6 address %s on port %d; for a port, write %s",
            what,
            text,
            portal.host,
            portal.port,
            hint,
        )
    return portal


def _iqn(text: str, what: str) -> str:
    from pyiscsi_failover.names import validate_iscsi_name

    try:
        return validate_iscsi_name(text)
    except InvalidName as exc:
        raise _UsageError(f"{what}: {exc}") from None


def _load_connection_info(source: str, stdin: IO[str]) -> ConnectionInfo:
    from pyiscsi_failover.connection_info import (
        MAX_INPUT_BYTES,
        parse_connection_info,
        read_limited,
    )

    raw: str | bytes
    if source == "-":
        try:
            raw = stdin.read(MAX_INPUT_BYTES + 1)  # at most 1 MiB, as from a file
        except UnicodeDecodeError as exc:
            raise _UsageError(
                f"connection_info on stdin is not UTF-8 text (bad byte at offset {exc.start})"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _UsageError(f"cannot read connection_info from stdin: {reason}") from None
        if len(raw) > MAX_INPUT_BYTES:
            raise _UsageError(
                f"connection_info on stdin is larger than {MAX_INPUT_BYTES >> 20} MiB"
            )
        if not raw.strip():
            raise _UsageError("connection_info on stdin is empty")
        where = "stdin"
    else:
        # Bytes, at most 1 MiB (`-c /dev/zero`): the parser decodes them itself (UTF-8, BOM
        # allowed) and names a bad byte.
        raw = read_limited(source, what="connection_info file")
        if not raw.strip():
            raise _UsageError(f"connection_info file {source!r} is empty (white space only)")
        where = repr(source)
    info = parse_connection_info(raw)
    logger.debug("connection_info from %s: %r", where, info)
    return info


def _candidates_from_args(args: argparse.Namespace, stdin: IO[str]) -> ConnectionInfo:
    import dataclasses

    from pyiscsi_failover.connection_info import parse_connection_info

    if args.connection_info:
        if args.portal or args.iqn or args.lun:
            raise _UsageError("give either -c FILE or --portal/--iqn/--lun, not both")
        info = _load_connection_info(args.connection_info, stdin)
    else:
        if not args.portal or not args.iqn:
            raise _UsageError("give -c FILE, or at least one --portal and one --iqn")
        n = len(args.portal)
        for name, values in (("--iqn", args.iqn), ("--lun", args.lun)):
            if len(values) not in (0, 1, n):
                raise _UsageError(f"{name} must be given once or once per --portal ({n})")
        # Checked here so that the message names the option, not a connection_info key.
        portals = [str(_portal(text, "--portal")) for text in args.portal]
        iqns = [_iqn(text, "--iqn") for text in args.iqn]
        iqns = iqns * n if len(iqns) == 1 else iqns
        luns = (args.lun * n if len(args.lun) == 1 else args.lun) or [0] * n
        data: dict[str, object] = {
            "target_portal": portals[0],
            "target_iqn": iqns[0],
            "target_lun": luns[0],
        }
        if n > 1:
            data["target_alternative_portals"] = portals[1:]
            data["target_alternative_iqns"] = iqns[1:]
            data["target_alternative_luns"] = luns[1:]
        info = parse_connection_info(data)
    chap, target_chap = _credentials(args)
    if chap is not None:
        # The command line replaces the file's credentials as a whole (mutual ones included).
        info = dataclasses.replace(info, chap=chap, target_chap=target_chap)
    logger.debug("candidates: %r", info)
    return info


def _redirect_policy(args: argparse.Namespace) -> RedirectPolicy:
    from pyiscsi_failover.transport import RedirectMode, RedirectPolicy

    return RedirectPolicy(
        mode=RedirectMode(args.redirects),
        allow=tuple(args.redirect_allow),
        max_redirects=args.max_redirects,
    )


def _login_config(
    args: argparse.Namespace,
    *,
    target_name: str | None,
    chap: ChapCredentials | None,
    target_chap: ChapCredentials | None,
) -> LoginConfig:
    from pyiscsi_failover.login_config import LoginConfig

    return LoginConfig(
        initiator_name=_initiator_name(args),
        target_name=target_name,
        chap=chap,
        target_chap=target_chap,
        chap_policy=_chap_policy(args),
    )


def _chap_policy(args: argparse.Namespace) -> ChapPolicy:
    """``--chap-algorithms``' offer, or the library's default policy."""
    from pyiscsi_failover.protocol.chap import DEFAULT_POLICY, ChapPolicy

    if args.chap_algorithms is None:
        return DEFAULT_POLICY
    return ChapPolicy(algorithms=args.chap_algorithms)


def _probe_options(args: argparse.Namespace, *, discovery: bool = False) -> ProbeOptions:
    """The options of ``probe``/``attach``; ``discovery``: of ``discover -c``, which has no
    --check, --all or --expect-wwid."""
    import dataclasses

    from pyiscsi_failover.prober import Check, Policy, ProbeOptions
    from pyiscsi_failover.transport import RedirectMode

    options = ProbeOptions(
        policy=Policy(args.policy),
        connect_timeout=args.connect_timeout,
        login_timeout=args.login_timeout,
        concurrency=args.concurrency,
        stagger=args.stagger,
        initiator_name=_initiator_name(args),
        chap_policy=_chap_policy(args),
        redirects=RedirectMode(args.redirects),
        redirect_allow=tuple(args.redirect_allow),
        max_redirects=args.max_redirects,
    )
    if discovery:
        return options
    return dataclasses.replace(
        options, check=Check(args.check), probe_all=args.all, expect_wwid=args.expect_wwid
    )


# -- output --------------------------------------------------------------------------------------


def _jsonable(value: object) -> object:
    import dataclasses
    import enum

    from pyiscsi_failover.credentials import Secret
    from pyiscsi_failover.names import Portal

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Secret):
        return "***"
    if isinstance(value, Portal | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _names_a_portal(message: str) -> bool:
    """Whether ``message`` starts with ``HOST:PORT: `` (or ``[ADDR]:PORT: ``)."""
    head, sep, _ = message.partition(": ")
    if not sep or " " in head:
        return False
    host, colon, port = head.rpartition(":")
    return bool(colon and host and port.isdigit())


def _named(portal: object, message: str) -> str:
    """``message`` led by the portal it is about, unless it already names one.

    The transport names the portal in most of its errors, not in all (a redirect loop lists
    the chain instead); every line the user sees should lead with it.
    """
    return message if _names_a_portal(message) else f"{portal}: {message}"


def _is_auth_failure(outcome: object) -> bool:
    """A login refused with 0x0201 (authentication failure)."""
    from pyiscsi_failover.initiator import LoginRejected
    from pyiscsi_failover.protocol.pdu import LoginStatus

    return (
        isinstance(outcome, LoginRejected) and outcome.status is LoginStatus.AUTHENTICATION_FAILURE
    )


def _login_json(report: LoginReport) -> dict[str, object]:
    from pyiscsi_failover.initiator import LoginSucceeded

    outcome = report.outcome
    body: dict[str, object] = {
        "portal": str(report.portal),
        "final_portal": str(report.final_portal),
        "redirects": [
            {"from": str(r.source), "to": str(r.address), "permanent": r.permanent}
            for r in report.redirects
        ],
        "connect_ms": _ms(report.connect_s),
        "login_ms": _ms(report.login_s),
        "elapsed_ms": _ms(report.total_s),
        "logged_out": report.logout is not None,
        "notes": list(report.notes),
    }
    if isinstance(outcome, LoginSucceeded):
        body["outcome"] = "ok"
        body["tsih"] = outcome.tsih
        body["target_portal_group_tag"] = outcome.target_portal_group_tag
        body["auth_method"] = outcome.auth_method
        body["negotiated"] = _jsonable(outcome.parameters)
    else:
        body["outcome"] = "rejected"
        body["status"] = f"0x{outcome.status_class:02x}{outcome.status_detail:02x}"
        body["detail"] = outcome.describe()
        body["retryable"] = outcome.retryable
    return body


def _error_json(portal: Portal, exc: ISCSIError) -> dict[str, object]:
    """What ``login``/``discover --json`` print when the login ended in an error, not an answer."""
    from pyiscsi_failover.errors import RedirectRefused
    from pyiscsi_failover.prober import outcome_of

    return {
        "portal": str(portal),
        "outcome": outcome_of(exc).value,
        "detail": _named(portal, str(exc)),
        "error": type(exc).__name__,
        "redirect_refused": exc.address if isinstance(exc, RedirectRefused) else None,
    }


class _Output:
    def __init__(self, stdout: IO[str], stderr: IO[str]) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.reader_gone = False

    def _write(self, text: str) -> None:
        if self.reader_gone:
            return
        try:
            print(text, file=self.stdout, flush=True)
        except BrokenPipeError:
            # The reader has what it wanted (`| head -1`): drop the rest quietly; the exit
            # status still says how the command went.
            self.reader_gone = True
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _OutputError(f"cannot write output: {reason}") from None

    def out(self, text: str = "") -> None:
        self._write(text)

    def json(self, obj: object) -> None:
        import json

        self._write(json.dumps(obj, indent=2, sort_keys=False))

    def error(self, text: str) -> None:
        # A stderr that is gone cannot be told about it; the exit status still says it.
        with contextlib.suppress(OSError):
            print(f"pyiscsi-failover: {text}", file=self.stderr, flush=True)

    @property
    def live(self) -> bool:
        isatty = getattr(self.stdout, "isatty", None)
        return bool(isatty and isatty())


def _detail(attempt: Attempt) -> str:
    """The attempt's detail without a leading "PORTAL: ", which the table already shows."""
    prefix = f"{attempt.candidate.portal}: "
    detail = attempt.detail
    return detail[len(prefix) :] if detail.startswith(prefix) else detail


def _outcome_text(attempt: Attempt) -> str:
    """The outcome column: ``ok (logout unanswered)`` flags a login whose logout went wrong."""
    if attempt.ok and attempt.notes:
        return f"{attempt.outcome.value} (logout unanswered)"
    return attempt.outcome.value


def _from_error(attempt: Attempt) -> bool:
    """Whether the attempt's detail is an error's message (rather than a target's answer)."""
    from pyiscsi_failover.prober import Outcome

    finished = attempt.outcome not in (Outcome.OK, Outcome.NOT_TRIED, Outcome.CANCELLED)
    return finished and attempt.report is None


def _probe_json(result: ProbeResult) -> dict[str, object]:
    """``ProbeResult.to_json`` with every error's detail naming its portal."""
    body = result.to_json()
    rows = body["attempts"]
    assert isinstance(rows, list)
    for row, attempt in zip(rows, result.attempts, strict=True):
        if _from_error(attempt):
            row["detail"] = _named(attempt.candidate.portal, attempt.detail)
    return body


def _chap_missing(result: ProbeResult, info: ConnectionInfo) -> bool:
    """Some candidate refused us for authentication while we offered no CHAP at all."""
    return info.chap is None and any(
        a.report is not None and _is_auth_failure(a.report.outcome) for a in result.attempts
    )


def _none_works(result: ProbeResult, info: ConnectionInfo) -> str:
    """One line naming every candidate's outcome (and the reason, when there is only one)."""
    attempts = result.attempts
    if len(attempts) == 1:
        a = attempts[0]
        line = f"the only candidate does not work: #0 {a.candidate.portal}: {_detail(a)}"
    else:
        parts = ", ".join(
            f"#{a.candidate.index} {a.candidate.portal} {a.outcome.value}" for a in attempts
        )
        line = f"none of the {len(attempts)} candidates works: {parts}"
    if _chap_missing(result, info):
        line += f"; {_CHAP_HINT}"
    return line


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _probe_table(result: ProbeResult) -> list[str]:
    from pyiscsi_failover.prober import Outcome

    rows = [["#", "portal", "iqn", "lun", "outcome", "ms", "detail"]]
    for a in result.attempts:
        c = a.candidate
        mark = "*" if result.chosen is not None and a is result.chosen else " "
        detail = _detail(a)
        if a.redirected_to is not None:
            detail = f"via {a.redirected_to}; {detail}"
        rows.append(
            [
                f"{mark}{c.index}",
                str(c.portal),
                c.iqn,
                str(c.lun),
                _outcome_text(a),
                "" if a.outcome is Outcome.NOT_TRIED else f"{a.elapsed_s * 1000:.0f}",
                detail,
            ]
        )
    lines = _table(rows)
    if result.chosen is None:
        lines.append(
            f"no candidate works ({result.policy.value}, {result.elapsed_s * 1000:.0f} ms)"
        )
    else:
        c = result.chosen.candidate
        portal = result.chosen.handoff_portal or c.portal
        lines.append(
            f"chosen: #{c.index} {portal} {c.iqn} lun {c.lun} "
            f"({result.policy.value}, {result.elapsed_s * 1000:.0f} ms)"
        )
    return lines


def _log_progress(event: ProgressEvent) -> None:
    from pyiscsi_failover.prober import AttemptFinished, AttemptStarted

    match event:
        case AttemptStarted(candidate=c, at=at):
            logger.debug(
                "#%d %s %s lun %d: probe started at %.3f s", c.index, c.portal, c.iqn, c.lun, at
            )
        case AttemptFinished(attempt=a):
            c = a.candidate
            logger.debug(
                "#%d %s: %s after %.3f s: %s",
                c.index,
                c.portal,
                a.outcome.value,
                a.elapsed_s,
                a.detail,
            )


def _progress_printer(output: _Output, *, live: bool) -> Callable[[ProgressEvent], None]:
    """Progress goes to the debug log always, and to stdout when ``live`` (a terminal)."""
    from pyiscsi_failover.prober import AttemptFinished, AttemptStarted

    def show(event: ProgressEvent) -> None:
        _log_progress(event)
        if not live:
            return
        match event:
            case AttemptStarted(candidate=c, at=at):
                output.out(f"  [{at * 1000:7.0f} ms] #{c.index} {c.portal} {c.iqn}: probing...")
            case AttemptFinished(attempt=a):
                c = a.candidate
                at = (a.started_at or 0.0) + a.elapsed_s
                output.out(
                    f"  [{at * 1000:7.0f} ms] #{c.index} {c.portal}: {_outcome_text(a)} "
                    f"{_detail(a)}"
                )

    return show


# -- commands -----------------------------------------------------------------------------


class _Reported(Exception):
    """The command already printed its failure (JSON and the stderr line); exit status 1."""


async def _login_or_report(
    portal: Portal, output: _Output, as_json: bool, attempt: Callable[[], Any]
) -> LoginReport:
    """Await ``attempt()``; an error that ends the login is reported here, JSON included."""
    try:
        report: LoginReport = await attempt()
    except _USAGE_ERRORS:
        raise
    except ISCSIError as exc:
        if as_json:
            output.json(_error_json(portal, exc))
        output.error(_named(portal, str(exc)))
        raise _Reported from None
    return report


def _refusal_line(report: LoginReport, what: str, chap: ChapCredentials | None) -> str:
    outcome = report.outcome
    assert not report.ok
    line = f"{report.final_portal}: {what} refused: {outcome.describe()}"  # type: ignore[union-attr]
    if chap is None and _is_auth_failure(outcome):
        line += f": {_CHAP_HINT}"
    return line


def _refusal_json(report: LoginReport, chap: ChapCredentials | None) -> dict[str, object]:
    body = _login_json(report)
    if chap is None and _is_auth_failure(report.outcome):
        body["hint"] = _CHAP_HINT
    return body


async def _cmd_discover(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    from pyiscsi_failover.transport import discover

    if args.connection_info and args.portal:
        raise _UsageError("give either a portal or -c FILE, not both")
    chap = target_chap = None
    if args.connection_info:
        return await _discover_volume(args, output, stdin)
    if args.portal:
        portal = _portal(args.portal)
    else:
        raise _UsageError("give a portal HOST[:PORT] or -c FILE")
    cli_chap, cli_target_chap = _credentials(args)
    if cli_chap is not None:
        chap, target_chap = cli_chap, cli_target_chap
    config = _login_config(args, target_name=None, chap=chap, target_chap=target_chap)
    policy = _redirect_policy(args)
    report = await _login_or_report(
        portal,
        output,
        args.json,
        lambda: discover(
            portal,
            config,
            connect_timeout=args.connect_timeout,
            login_timeout=args.login_timeout,
            redirect_policy=policy,
        ),
    )
    if not report.ok:
        if args.json:
            output.json(_refusal_json(report, chap))
        output.error(_refusal_line(report, "discovery login", chap))
        return EXIT_FAILURE
    targets = _targets_json(report)
    if args.json:
        body = _login_json(report)
        body["targets"] = targets
        output.json(body)
        return EXIT_OK
    output.out(
        f"{len(targets)} target(s) at {report.final_portal} ({report.total_s * 1000:.1f} ms)"
    )
    _print_targets(output, targets)
    return EXIT_OK


async def _discover_volume(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    """``discover -c FILE``: the main portal first, then the alternatives, under --policy."""
    import dataclasses

    from pyiscsi_failover.prober import discover_first

    info = _load_connection_info(args.connection_info, stdin)
    cli_chap, cli_target_chap = _credentials(args)
    if cli_chap is not None:
        info = dataclasses.replace(
            info, discovery_chap=cli_chap, discovery_target_chap=cli_target_chap
        )
    live = output.live and not args.json
    options = _probe_options(args, discovery=True)
    result = await discover_first(info, options, on_progress=_progress_printer(output, live=live))
    chosen = result.chosen
    if chosen is None or chosen.report is None:
        if args.json:
            output.json({"answered": None, **_probe_json(result)})
        else:
            for line in _probe_table(result):
                output.out(line)
        output.error(f"{_none_works(result, info)}; no portal answered SendTargets")
        return EXIT_FAILURE
    report = chosen.report
    answered = str(chosen.candidate.portal)
    targets = _targets_json(report)
    if args.json:
        body = _login_json(report)
        body["targets"] = targets
        body["answered"] = answered
        body["attempts"] = _probe_json(result)["attempts"]
        output.json(body)
        return EXIT_OK
    output.out(
        f"{len(targets)} target(s) at {report.final_portal}, which answered "
        f"(#{chosen.candidate.index} of {len(result.attempts)} portals, "
        f"{result.elapsed_s * 1000:.1f} ms)"
    )
    _print_targets(output, targets)
    return EXIT_OK


def _targets_json(report: LoginReport) -> list[dict[str, object]]:
    return [
        {
            "iqn": t.iqn,
            "portals": [p.with_tpgt() if p.tpgt is not None else str(p) for p in t.portals],
        }
        for t in report.targets
    ]


def _print_targets(output: _Output, targets: list[dict[str, object]]) -> None:
    for target in targets:
        output.out(str(target["iqn"]))
        portals = target["portals"]
        assert isinstance(portals, list)
        for p in portals:
            output.out(f"    {p}")


async def _cmd_login(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    from pyiscsi_failover.initiator import LoginSucceeded
    from pyiscsi_failover.transport import login

    portal = _portal(args.portal)
    iqn = _iqn(args.iqn, "iqn")
    chap, target_chap = _credentials(args)
    config = _login_config(args, target_name=iqn, chap=chap, target_chap=target_chap)
    policy = _redirect_policy(args)
    report = await _login_or_report(
        portal,
        output,
        args.json,
        lambda: login(
            portal,
            config,
            connect_timeout=args.connect_timeout,
            login_timeout=args.login_timeout,
            redirect_policy=policy,
        ),
    )
    body = _login_json(report) if report.ok else _refusal_json(report, chap)
    if args.json:
        output.json(body)
    else:
        for r in report.redirects:
            kind = "permanently" if r.permanent else "temporarily"
            output.out(f"redirected {kind}: {r.source} -> {r.address}")
        if isinstance(report.outcome, LoginSucceeded):
            o = report.outcome
            output.out(
                f"login ok: {iqn} at {report.final_portal} (TSIH {o.tsih}, TPGT "
                f"{o.target_portal_group_tag}, AuthMethod {o.auth_method}); "
                f"{'logged out' if report.logout else 'logout: ' + '; '.join(report.notes)}"
            )
            output.out(
                f"timings: connect {report.connect_s * 1000:.1f} ms, "
                f"login {report.login_s * 1000:.1f} ms, "
                f"total {report.total_s * 1000:.1f} ms"
            )
            output.out("negotiated:")
            negotiated = body["negotiated"]
            assert isinstance(negotiated, dict)
            for key, value in negotiated.items():
                output.out(f"    {key} = {value}")
    if not report.ok:
        output.error(_refusal_line(report, "login", chap))
        return EXIT_FAILURE
    return EXIT_OK


async def _run_probe(
    info: ConnectionInfo, options: ProbeOptions, output: _Output, as_json: bool
) -> ProbeResult:
    from pyiscsi_failover.prober import probe

    live = output.live and not as_json  # piped output stays a clean table, --json one object
    if live:
        output.out(
            f"probing {len(info.candidates)} candidate(s), policy {options.policy.value}, "
            f"check {options.check.value}"
        )
    logger.debug("probe options: %r", options)
    return await probe(info, options, on_progress=_progress_printer(output, live=live))


async def _cmd_probe(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    info = _candidates_from_args(args, stdin)
    result = await _run_probe(info, _probe_options(args), output, args.json)
    if args.json:
        output.json(_probe_json(result))
    else:
        for line in _probe_table(result):
            output.out(line)
    if result.chosen is None:
        output.error(_none_works(result, info))
        return EXIT_FAILURE
    return EXIT_OK


async def _cmd_attach(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    from pyiscsi_failover.iscsiadm import Iscsiadm, RecordLedger, dry_run_plan
    from pyiscsi_failover.volume import attach_volume, node_target

    args.portal, args.iqn, args.lun = [], [], []
    info = _candidates_from_args(args, stdin)
    options = _probe_options(args)
    if args.dry_run:
        result = await _run_probe(info, options, output, args.json)
        if result.chosen is None:
            return _nothing_attached(output, args.json, info, [result], [])
        commands = dry_run_plan(node_target(info, result.chosen, options))
        if args.json:
            output.json({"probe": _probe_json(result), "dry_run": commands})
        else:
            for line in _probe_table(result):
                output.out(line)
            output.out("would run:")
            for command in commands:
                output.out(f"    {command}")
        return EXIT_OK
    live = output.live and not args.json

    def shown(handoff: Handoff) -> None:
        if live:
            output.out(_handoff_line(handoff))

    # The ledger is touched only here, past --dry-run, which leaves it alone.
    attachment = await attach_volume(
        info,
        options,
        iscsiadm=Iscsiadm(binary=args.iscsiadm),
        device_timeout=args.device_timeout,
        dev_root=args.dev_root,
        ledger=RecordLedger(args.state_file),
        on_progress=_progress_printer(output, live=live),
        on_handoff=shown,
    )
    attached = attachment.attached
    if attached is None or attached.result is None:
        return _nothing_attached(output, args.json, info, attachment.probes, attachment.handoffs)
    if args.json:
        output.json(
            {
                "probe": _probe_json(attachment.probes[0]),
                "probes": [_probe_json(p) for p in attachment.probes],
                "handoffs": [h.to_json() for h in attachment.handoffs],
                "attach": _jsonable(attached.result),
            }
        )
        return EXIT_OK
    _print_rounds(output, attachment.probes, attachment.handoffs)
    output.out(f"attached: {attached.result.device}")
    if attached.result.created_record:
        output.out(f"node record: created (noted in {args.state_file}; detach deletes it)")
    else:
        output.out(
            "node record: already there (detach deletes it only if pyiscsi-failover made it)"
        )
    return EXIT_OK


def _handoff_line(handoff: Handoff) -> str:
    return (
        f"hand-off #{handoff.index} {handoff.portal} {handoff.iqn} lun {handoff.lun}: "
        f"{handoff.outcome.value} ({handoff.elapsed_s * 1000:.0f} ms): {handoff.detail}"
    )


def _print_rounds(
    output: _Output, probes: Sequence[ProbeResult], handoffs: Sequence[Handoff]
) -> None:
    """Each probe round's table, then the hand-off that followed it."""
    for number, result in enumerate(probes):
        if number:
            output.out(f"probe again ({len(result.attempts)} candidates left):")
        for line in _probe_table(result):
            output.out(line)
        if number < len(handoffs):
            output.out(_handoff_line(handoffs[number]))


def _nothing_attached(
    output: _Output,
    as_json: bool,
    info: ConnectionInfo,
    probes: Sequence[ProbeResult],
    handoffs: Sequence[Handoff],
) -> int:
    if as_json:
        output.json(
            {
                "probe": _probe_json(probes[0]),
                "probes": [_probe_json(p) for p in probes],
                "handoffs": [h.to_json() for h in handoffs],
                "attach": None,
            }
        )
    else:
        _print_rounds(output, probes, handoffs)
    if handoffs:
        failed = "; ".join(f"#{h.index} {h.portal} {h.outcome.value}: {h.detail}" for h in handoffs)
        output.error(f"no candidate could be attached: {failed}")
    else:
        output.error(f"{_none_works(probes[0], info)}; nothing attached")
    return EXIT_FAILURE


async def _cmd_detach(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    from pyiscsi_failover.iscsiadm import (
        Iscsiadm,
        NodeTarget,
        RecordFate,
        RecordLedger,
        detach,
    )
    from pyiscsi_failover.names import Portal

    info = _load_connection_info(args.connection_info, stdin)
    if args.keep_record and args.delete != "if-ours":
        raise _UsageError("give --keep-record or --delete, not both")
    mode: DeleteMode = "never" if args.keep_record else _DELETE_CHOICES[args.delete]
    iscsiadm = Iscsiadm(binary=args.iscsiadm)
    ledger = RecordLedger(args.state_file)
    nodes = [
        NodeTarget(portal=c.portal, iqn=c.iqn, lun=c.lun, addressing_mode=info.addressing_mode)
        for c in info.candidates
    ]
    # A permanent redirect made attach hand off an address that is not a candidate: the
    # ledger remembers it, so records we created for these IQNs elsewhere are detached too.
    iqns = {node.iqn for node in nodes}
    for entry in [] if mode == "never" else ledger.entries():
        if entry.iqn in iqns and not any(entry.matches(node) for node in nodes):
            nodes.append(NodeTarget(portal=Portal.parse(entry.portal), iqn=entry.iqn, lun=0))
    done = []
    lines = []
    for node in nodes:
        result = await detach(node, iscsiadm=iscsiadm, delete=mode, ledger=ledger)
        portal = str(node.portal)
        done.append({"portal": portal, "iqn": node.iqn, "record": result.record.value})
        if result.record is RecordFate.ABSENT:
            lines.append(f"{node.iqn} at {portal}: {result.record.description}")
        else:
            lines.append(f"detached {node.iqn} at {portal}: {result.record.description}")
    if args.json:
        output.json({"detached": done})
    else:
        for line in lines:
            output.out(line)
    return EXIT_OK


#: ``--delete``'s spellings and the library's modes.
_DELETE_CHOICES: Final[dict[str, DeleteMode]] = {
    "if-ours": "if_ours",
    "always": "always",
    "never": "never",
}


def _policy_words(policy: str) -> str:
    if policy == "sequential":
        return "policy sequential (one candidate after another)"
    if policy == "ordered":
        return "policy ordered (concurrently, but the first working one in order wins)"
    return (
        f"policy staggered (a new candidate every {_DEFAULT_STAGGER:g} s, the first to succeed "
        "wins)"
    )


async def _cmd_demo(args: argparse.Namespace, output: _Output, stdin: IO[str]) -> int:
    import json

    from pyiscsi_failover.demo import demo_target, explain, shown_connection_info
    from pyiscsi_failover.prober import Policy, ProbeOptions, probe

    options = ProbeOptions(policy=Policy(args.policy), initiator_name=_initiator_name(args))
    async with demo_target() as (running, info):
        if args.json:
            result = await probe(info, options)
            output.json(_probe_json(result))
        else:
            output.out(
                "pyiscsi-failover demo: one volume on three loopback portals (our test target)"
            )
            output.out("connection_info returned by the (simulated) backend:")
            for line in json.dumps(shown_connection_info(running), indent=2).splitlines():
                output.out(f"    {line}")
            output.out(
                f"probing in the given order, {_policy_words(args.policy)}; connect timeout "
                f"{options.connect_timeout:g} s, login timeout {options.login_timeout:g} s:"
            )
            result = await probe(info, options, on_progress=_progress_printer(output, live=True))
            output.out()
            for line in _probe_table(result):
                output.out(line)
            output.out()
            for line in explain(result):
                output.out(line)
    return EXIT_OK if result.chosen is not None else EXIT_FAILURE


_COMMANDS: Final = {
    "discover": _cmd_discover,
    "login": _cmd_login,
    "probe": _cmd_probe,
    "attach": _cmd_attach,
    "detach": _cmd_detach,
    "demo": _cmd_demo,
}


class _LoggingState:
    """The package logger's level while CLI runs are active, shared by concurrent runs.

    Each run adds its own handler (filtered to its own thread: trio runs a command's tasks on the
    thread that called ``run``), the logger's level is lowered (never raised: an embedding
    program may want more) to the lowest any active run asked for, and the original level comes
    back when the last run ends, whatever the order they end in.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.levels: list[int] = []
        self.saved = logging.NOTSET
        self.effective = logging.WARNING

    def _apply(self) -> None:
        if self.levels:
            _package_logger.setLevel(min(*self.levels, self.effective))
        else:
            _package_logger.setLevel(self.saved)

    def enter(self, handler: logging.Handler, level: int) -> None:
        with self.lock:
            if not self.levels:
                self.saved = _package_logger.level
                self.effective = _package_logger.getEffectiveLevel()
            self.levels.append(level)
            self._apply()
            _package_logger.addHandler(handler)

    def exit(self, handler: logging.Handler, level: int) -> None:
        with self.lock:
            _package_logger.removeHandler(handler)
            self.levels.remove(level)
            self._apply()


_logging_state: Final = _LoggingState()


def _this_run_once(thread: int) -> Callable[[logging.LogRecord], bool]:
    """A handler filter: records of this run's thread only, and each CHAP warning only once.

    The weak-secret warning comes from every CHAP exchange, so a probe of five candidates would
    say it five times; the user needs it once per run.
    """
    seen: set[str] = set()

    def keep(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return False
        if record.name == _CHAP_LOGGER and record.levelno >= logging.WARNING:
            message = record.getMessage()
            if message in seen:
                return False
            seen.add(message)
        return True

    return keep


@contextlib.contextmanager
def _logging_to(verbosity: int, stderr: IO[str]) -> Iterator[None]:
    """Send this run's log records to ``stderr`` while the command runs, then undo it.

    Records still propagate, so an embedding program (or pytest's ``caplog``) sees them too.
    """
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("pyiscsi-failover: %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_this_run_once(threading.get_ident()))
    _logging_state.enter(handler, level)
    try:
        yield
    finally:
        _logging_state.exit(handler, level)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups, else ``exc`` itself."""
    # Duck-typed: the builtin BaseExceptionGroup only exists from Python 3.11 on.
    while True:
        inner = getattr(exc, "exceptions", None)
        if not (isinstance(inner, tuple) and len(inner) == 1):
            return exc
        if not isinstance(inner[0], BaseException):
            return exc
        exc = inner[0]


#: Errors that mean the input (argv, a file, stdin) was wrong: exit status 2.
_USAGE_ERRORS: Final = (
    _UsageError,
    ConnectionInfoError,
    LocalProtocolError,
    InvalidName,
    InvalidPortal,
)


def _failure(output: _Output, exc: BaseException) -> int:
    """Map an exception that ended a command to its exit status and one line on stderr."""
    leaf = _leaf(exc)
    if isinstance(leaf, KeyboardInterrupt):
        output.error("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(leaf, _Reported):
        return EXIT_FAILURE  # already said, on stdout (JSON) and stderr
    if isinstance(leaf, BrokenPipeError):
        return EXIT_FAILURE  # stderr went away (stdout's loss is handled where it is written)
    if isinstance(leaf, _OutputError):
        output.error(str(leaf))
        return EXIT_FAILURE
    if isinstance(leaf, _USAGE_ERRORS):
        output.error(str(leaf))
        return EXIT_USAGE
    if isinstance(leaf, ISCSIError):
        output.error(str(leaf))
        return EXIT_FAILURE
    if not isinstance(leaf, Exception):
        raise exc  # SystemExit, GeneratorExit and the like are not ours to swallow
    # A bug of ours. Its message might quote a value we did not mean to print (a secret), so
    # stderr gets only its type; -vv logs the traceback.
    logger.debug("internal error", exc_info=exc)
    output.error(f"internal error ({type(leaf).__name__}); run with -vv for details")
    return EXIT_FAILURE


def _unrecognized(extra: Sequence[str]) -> str:
    """Name unknown options but not the values around them: one might be a mistyped secret."""
    options = [word.partition("=")[0] for word in extra if word.startswith("-")]
    values = len(extra) - len(options)
    parts = [f"unrecognized option(s) {' '.join(options)}"] if options else []
    if values:
        parts.append(f"{values} unexpected argument(s), not shown")
    return "; ".join(parts)


def run(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> int:
    """Run the CLI and return its exit status; never raises for bad input or a failing target.

    ``--help`` and ``--version`` are written to ``stdout`` too, so tests can capture them.
    """
    output = _Output(
        sys.stdout if stdout is None else stdout, sys.stderr if stderr is None else stderr
    )
    token = _help_out.set(output.stdout)
    try:
        args, extra = build_parser().parse_known_args(argv)
    except _UsageError as exc:
        output.error(str(exc))
        return EXIT_USAGE
    except _OutputError as exc:
        output.error(str(exc))
        return EXIT_FAILURE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    finally:
        _help_out.reset(token)
    if extra:
        output.error(_unrecognized(extra))
        return EXIT_USAGE
    command = _COMMANDS[args.command]
    with _logging_to(args.verbose, output.stderr):
        logger.debug("pyiscsi-failover %s, command %s", __version__, args.command)
        try:
            import trio

            return trio.run(command, args, output, sys.stdin if stdin is None else stdin)
        except BaseException as exc:
            return _failure(output, exc)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit has nothing to say."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main() -> NoReturn:
    code = run()
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _discard_stdout()  # the reader left (`| head`): nothing more to say
        except OSError as exc:
            _discard_stdout()
            if code == EXIT_OK:  # else the failure was already told (or is the first news)
                reason = exc.strerror or type(exc).__name__
                with contextlib.suppress(OSError):
                    print(f"pyiscsi-failover: cannot write output: {reason}", file=sys.stderr)
                code = EXIT_FAILURE
    sys.exit(code)
