"""Run the scriptable test target as a process: ``python -m pyiscsi_failover.testing``.

For shell scripts and for tests that want a target in another process (e.g. to point iscsiadm
or libiscsi at it). Run with ``--help`` for the options; :func:`run` takes argv and returns the
exit status so tests can call it directly.

The process prints exactly one line, ``ready``, on stdout once every portal is bound; before
it, one line per portal on stderr: ``portal NAME HOST:PORT,TPGT [FAULT...]`` (that is where an
ephemeral port shows up), then one per LUN: ``lun IQN LUN BYTES naa.WWID``. It serves until
SIGINT or SIGTERM and then exits 0.

IO layer: imports trio and socket through the server; never imports subprocess. Never prints
a CHAP secret, not even in an error message about one.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import ISCSIError
from pyiscsi_failover.testing.config import (
    ChapSettings,
    LunSpec,
    PortalConfig,
    TargetConfig,
    TargetSpec,
)
from pyiscsi_failover.testing.faults import Fault, format_fault, parse_fault
from pyiscsi_failover.testing.server import RunningTarget, serve_target

__all__ = ["build_parser", "load_config", "main", "run"]

_EPILOG = """\
output:
  stdout gets exactly one line, "ready", once every portal is bound. Before it, stderr gets
  one line per portal, in the order given:  portal NAME HOST:PORT,TPGT [FAULT...]
  so with port 0 read the bound port from there; then one line per LUN:
  lun IQN LUN BYTES naa.WWID. SIGINT or SIGTERM stops the target (exit 0).

portals and names:
  --portal [NAME=]HOST:PORT[,TPGT]; PORT 0 picks a free port. NAME defaults to HOST:PORT as
  written (e.g. 127.0.0.1:0); use it in --fault. IPv6 as [::1]:3260.

LUNs:
  every target has one LUN, 0, a 64 MiB disk kept in memory (sparse), unless --lun gives it
  others: --lun [IQN=]LUN[,KEY=VALUE...], repeatable; without IQN= it applies to every
  --target. KEYs: size (bytes, or with K/M/G/T: 1G), block-size (512, 1024, 2048, 4096),
  wwid (NAA 6: naa.6 + 31 hex digits, or 36 + 31; default derived from IQN and LUN), serial,
  vendor, product, revision, backing (a file to serve instead of memory; its size unless
  size says less). A write goes to the file at once.

faults (--fault NAME=FAULT, NAME a portal name or a target IQN):
  refuse, blackhole, silent, reset-mid-login, delay:SECONDS, slow-drip[:SECONDS],
  malformed-pdu, oversized-pdu[:LENGTH], wrong-opcode, wrong-itt, redirect:HOST:PORT[,TPGT],
  redirect-permanent:ADDRESS (ADDRESS may also be a portal name), redirect-loop[:permanent],
  wrong-chap-response, reflect-challenge[:0xHEX|:initiator-secret], downgrade-to-none,
  garbage-key-values[:KEY,...], non-utf8-text, split-text[:CHUNK[:continue|tgt[:login]]],
  service-unavailable, digests-required[:header|data|both], reject-digests,
  refuse-isid[:MATCH] (Normal logins whose ISID matches fail with 0x0202). Socket and timing
  faults (refuse, blackhole, silent, reset-mid-login, delay, slow-drip) can only be set on a
  portal. A portal or target may carry several faults of different kinds (repeat --fault),
  e.g. --fault A=delay:0.4 --fault A=redirect:B for a slow hop of a redirect chain.

SCSI faults (--fault NAME=FAULT[@LUN[,LUN...]]: on a portal, its sessions; on a target, all
its sessions; only the LUNs named, or every LUN):
  lun-missing, hide-from-isid[:MATCH] (missing for sessions whose ISID matches),
  not-ready[:ASC/ASCQ] (default 04/03), standby (ALUA: NOT READY 04/0B),
  check-condition[:KEY/ASC/ASCQ] (default 4/44/00), unit-attention[:COUNT[:ASC/ASCQ]] (the
  first COUNT commands of each session, default 1 and 29/00), reservation-conflict,
  other-wwid[:WWID] (default: one derived from IQN and LUN), slow-scsi:SECONDS,
  split-data-in[:BYTES] (Data-In segments, default 8), residual-overflow[:BYTES] (default
  512). Codes are hex. MATCH: open-iscsi (the default: OUI-format ISIDs 00023d..., the
  kernel initiator's), oui:0xHHHHHH, or random (random-format ISIDs: libiscsi's, this
  package's probes'). E.g. --fault B=lun-missing@1 --fault B=unit-attention@0
  --fault A=hide-from-isid@0.

CHAP:
  --chap USER:SECRET (repeatable) makes every target, and discovery unless
  --no-discovery-chap, require CHAP with one of these accounts; --mutual-chap USER:SECRET is
  what the target answers an initiator's own challenge with. Secrets on the command line are
  visible to other local users (ps); this is a test tool, but --chap-file PATH avoids it: one
  entry a line, "chap USER:SECRET" or "mutual-chap USER:SECRET", '#' starts a comment.
  Secrets are never printed.
"""


class _UsageError(Exception):
    """A bad command line; the message never contains a secret."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyiscsi_failover.testing",
        description=(
            "Scriptable userspace iSCSI test target: login, discovery, logout, and disk LUNs "
            "(SCSI) for real initiators."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--portal",
        action="append",
        required=True,
        metavar="[NAME=]HOST:PORT[,TPGT]",
        help="address to serve on (repeatable; port 0 = any free port)",
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="IQN",
        help="target name served on every portal (repeatable)",
    )
    parser.add_argument(
        "--chap",
        action="append",
        default=[],
        metavar="USER:SECRET",
        help="CHAP account the target accepts (repeatable)",
    )
    parser.add_argument(
        "--mutual-chap", metavar="USER:SECRET", help="target's credentials for mutual CHAP"
    )
    parser.add_argument(
        "--chap-file", type=Path, metavar="PATH", help="read chap/mutual-chap entries from PATH"
    )
    parser.add_argument(
        "--no-discovery-chap",
        action="store_true",
        help="discovery sessions need no CHAP even when --chap is given",
    )
    parser.add_argument(
        "--allow-initiator",
        action="append",
        default=[],
        metavar="IQN",
        help="only these initiators may log in to the targets (repeatable; default: anyone)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=FAULT",
        help="inject FAULT on the portal or target NAME (repeatable; FAULT[@LUNS] for SCSI "
        "faults; see below)",
    )
    parser.add_argument(
        "--lun",
        action="append",
        default=[],
        metavar="[IQN=]LUN[,KEY=VALUE...]",
        help="a LUN of the targets (or of IQN); repeatable (default: LUN 0, 64 MiB; see below)",
    )
    parser.add_argument(
        "--max-recv-data-segment-length",
        type=int,
        default=8192,
        metavar="BYTES",
        help="what the target declares it can receive (default 8192)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    return parser


def _credentials(option: str, text: str) -> ChapCredentials:
    username, sep, secret = text.partition(":")
    if not sep or not username or not secret:
        raise _UsageError(f"{option} needs USER:SECRET with both parts non-empty")
    return ChapCredentials(username, Secret(secret))


def _read_chap_file(
    path: Path,
) -> tuple[list[ChapCredentials], ChapCredentials | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read --chap-file {path}: {type(exc).__name__}") from None
    accounts: list[ChapCredentials] = []
    mutual: ChapCredentials | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, entry = line.partition(" ")
        if kind == "chap":
            accounts.append(_credentials(f"--chap-file line {number}", entry.strip()))
        elif kind == "mutual-chap":
            mutual = _credentials(f"--chap-file line {number}", entry.strip())
        else:
            raise _UsageError(
                f"--chap-file line {number}: expected 'chap USER:SECRET' or "
                "'mutual-chap USER:SECRET'"
            )
    return accounts, mutual


def load_config(args: argparse.Namespace) -> TargetConfig:
    """Turn parsed arguments into a TargetConfig (raises ISCSIError or _UsageError)."""
    portals: list[PortalConfig] = []
    for text in args.portal:
        name, sep, address = text.rpartition("=")
        portal = PortalConfig.parse(address)
        if sep:
            portal = PortalConfig(host=portal.host, port=portal.port, tpgt=portal.tpgt, name=name)
        portals.append(portal)

    accounts = [_credentials("--chap", text) for text in args.chap]
    mutual = _credentials("--mutual-chap", args.mutual_chap) if args.mutual_chap else None
    if args.chap_file is not None:
        file_accounts, file_mutual = _read_chap_file(args.chap_file)
        accounts.extend(file_accounts)
        mutual = file_mutual or mutual
    chap = ChapSettings(accounts=tuple(accounts), mutual=mutual)

    allowed = frozenset(args.allow_initiator) if args.allow_initiator else None
    target_names = [TargetSpec(name=name).name for name in args.target]
    luns = _luns(args.lun, target_names)
    portal_faults: dict[str, list[Fault]] = {portal.name: [] for portal in portals}
    target_faults: dict[str, list[Fault]] = {name: [] for name in target_names}
    for text in args.fault:
        where, sep, spec = text.partition("=")
        if not sep:
            raise _UsageError(f"--fault {text!r}: expected NAME=FAULT")
        fault = parse_fault(spec)
        if where in portal_faults:
            portal_faults[where].append(fault)
        elif where.lower() in target_faults:
            target_faults[where.lower()].append(fault)
        else:
            raise _UsageError(
                f"--fault {text!r}: {where!r} is neither a portal name "
                f"({', '.join(portal_faults)}) nor a --target"
            )
    return TargetConfig(
        portals=tuple(
            PortalConfig(
                host=portal.host,
                port=portal.port,
                tpgt=portal.tpgt,
                name=portal.name,
                faults=tuple(portal_faults[portal.name]),
            )
            for portal in portals
        ),
        targets=tuple(
            TargetSpec(
                name=name,
                allowed_initiators=allowed,
                chap=chap,
                faults=tuple(target_faults[name]),
                luns=luns.get(name, (0,)),
            )
            for name in target_names
        ),
        discovery_chap=ChapSettings() if args.no_discovery_chap else chap,
        max_recv_data_segment_length=args.max_recv_data_segment_length,
    )


def _luns(texts: Sequence[str], target_names: Sequence[str]) -> dict[str, tuple[LunSpec, ...]]:
    """``--lun`` options, per target (targets not named keep the default LUN 0)."""
    chosen: dict[str, list[LunSpec]] = {}
    for text in texts:
        first, _, rest = text.partition(",")
        where, sep, number = first.rpartition("=")
        if sep:
            if where.lower() not in target_names:
                raise _UsageError(f"--lun {text!r}: {where!r} is not a --target")
            names = [where.lower()]
        else:
            names, number = list(target_names), first
        if not names:
            raise _UsageError(f"--lun {text!r}: there is no --target to give it to")
        spec = LunSpec.parse(f"{number},{rest}" if rest else number)
        for name in names:
            chosen.setdefault(name, []).append(spec)
    return {name: tuple(specs) for name, specs in chosen.items()}


def _describe(running: RunningTarget) -> list[str]:
    lines = []
    for portal in running.config.portals:
        faults = "".join(f" {format_fault(fault)}" for fault in portal.faults)
        lines.append(f"portal {portal.name} {portal.portal.with_tpgt()}{faults}")
    for target in running.config.targets:
        for spec in target.logical_units:
            unit = running.logical_unit(target.name, spec.lun)
            size = unit.blocks * unit.block_size
            lines.append(f"lun {target.name} {spec.lun} {size} {spec.linux_wwid}")
    return lines


async def _serve(config: TargetConfig, stdout: TextIO, stderr: TextIO) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve_target(config) as running:
            for line in _describe(running):
                print(line, file=stderr, flush=True)
            print("ready", file=stdout, flush=True)
            async for _ in signals:
                break


def run(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Parse ``argv``, serve until SIGINT/SIGTERM; the exit status (2 for a bad command line)."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=err)
    try:
        config = load_config(args)
    except (ISCSIError, _UsageError) as exc:
        print(f"{parser.prog}: error: {exc}", file=err)
        return 2
    try:
        trio.run(_serve, config, out, err)
    except ISCSIError as exc:  # a LUN's backing file cannot be used
        print(f"{parser.prog}: error: {exc}", file=err)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: cannot serve: {exc}", file=err)
        return 1
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
