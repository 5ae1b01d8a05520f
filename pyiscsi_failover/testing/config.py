"""Configuration of the test target: portals, targets, their logical units, CHAP, limits.

Frozen data shared by the sans-IO state machine (:mod:`.target`), the logical units
(:mod:`.logical_unit`), the trio server (:mod:`.server`) and the command line (``python -m
pyiscsi_failover.testing``). Every class checks its own values when built and raises
:class:`~pyiscsi_failover.errors.LocalProtocolError` naming what is wrong, so a bad
configuration never reaches a connection.

Pure: never imports trio, socket or subprocess, and opens no file (a LUN's backing file is only
named here; the server opens it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyiscsi_failover.credentials import ChapCredentials
from pyiscsi_failover.errors import InvalidName, InvalidPortal, LocalProtocolError
from pyiscsi_failover.names import DEFAULT_PORT, Portal, validate_iscsi_name
from pyiscsi_failover.protocol.chap import DEFAULT_ALGORITHMS, ChapAlgorithm
from pyiscsi_failover.protocol.negotiation import Digest
from pyiscsi_failover.protocol.scsi import MAX_FLAT_LUN
from pyiscsi_failover.testing.faults import Fault, FaultKind, LunFault, Redirect, find_fault

__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_LUN_SIZE",
    "DEFAULT_TPGT",
    "ChapSettings",
    "LunSpec",
    "PortalConfig",
    "TargetConfig",
    "TargetSpec",
    "default_wwid",
    "normalize_wwid",
    "parse_size",
]

#: The target portal group tag of a portal that does not name one.
DEFAULT_TPGT = 1
#: The size of a LUN kept in memory when none is configured: enough for a partition table and
#: a small file system, and nothing is allocated until it is written.
DEFAULT_LUN_SIZE = 64 * 1024 * 1024
#: Logical block sizes a LUN may have (what Linux's sd driver accepts).
BLOCK_SIZES = (512, 1024, 2048, 4096)
_MAX_24BIT = 0xFFFFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------------------
# Logical units

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_PATTERN = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64M``, ``1G``, ``2TiB``: binary units, a byte count out."""
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise LocalProtocolError(f"size {text!r}: expected a number with an optional K/M/G/T")
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


def normalize_wwid(text: str) -> str:
    """An NAA identifier as lowercase hex: NAA 6 (32 digits) or NAA 5 (16 digits).

    Accepted spellings: the kernel's ``naa.6...``, udev scsi_id's ``36...``, ``0x6...`` or the
    bare hex digits.
    """
    value = text.strip().lower()
    for prefix in ("naa.", "0x"):
        value = value.removeprefix(prefix)
    if len(value) in (17, 33) and value.startswith("3"):
        value = value[1:]  # scsi_id's designator-type digit
    if not re.fullmatch(r"[0-9a-f]+", value) or (value[0], len(value)) not in (
        ("6", 32),
        ("5", 16),
    ):
        raise LocalProtocolError(
            f"WWID {text!r}: expected an NAA 6 identifier (32 hex digits starting with 6, "
            "e.g. naa.6... or 36...) or an NAA 5 one (16 hex digits starting with 5)"
        )
    return value


def default_wwid(target_name: str, lun: int) -> str:
    """A stable NAA 6 WWID for ``lun`` of ``target_name``: the same configuration gives the
    same WWID in every run, and distinct LUNs or targets get distinct ones."""
    digest = bytearray(hashlib.sha256(f"{target_name}\0{lun}".encode()).digest()[:16])
    digest[0] = 0x60 | (digest[0] & 0x0F)
    return digest.hex()


def _check_ascii(owner: str, name: str, value: object, size: int) -> None:
    if not isinstance(value, str) or not value or len(value) > size:
        raise LocalProtocolError(f"{owner}: {name} must be 1..{size} characters, not {value!r}")
    if not value.isascii() or not value.isprintable():
        raise LocalProtocolError(f"{owner}: {name} must be printable ASCII, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LunSpec:
    """One logical unit of a target: a direct-access disk (SCSI peripheral device type 0).

    ``size`` is in bytes, a multiple of ``block_size``. Without ``backing`` the LU keeps its
    blocks in memory, sparse (unwritten blocks read as zeros), and ``None`` means
    :data:`DEFAULT_LUN_SIZE`; with ``backing`` the server opens that file, ``None`` means the
    file's own size, and a larger ``size`` than the file is refused. ``wwid`` is an NAA
    identifier (see :func:`normalize_wwid`); ``None`` lets :class:`TargetSpec` derive a stable
    one from the target name and the LUN (:func:`default_wwid`). ``serial`` (VPD page 0x80)
    defaults to the WWID's last 16 digits. ``vendor``, ``product`` and ``revision`` are the
    standard INQUIRY identity (8, 16 and 4 ASCII characters at most).
    """

    lun: int
    size: int | None = None
    block_size: int = 512
    wwid: str | None = None
    serial: str | None = None
    vendor: str = "PYISCSI"
    product: str = "TEST DISK"
    revision: str = "0001"
    backing: Path | None = None

    def __post_init__(self) -> None:
        lun: object = self.lun
        if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_FLAT_LUN:
            raise LocalProtocolError(f"LUN must be 0..{MAX_FLAT_LUN}, not {lun!r}")
        owner = f"LUN {lun}"
        if self.block_size not in BLOCK_SIZES:
            raise LocalProtocolError(
                f"{owner}: block size must be one of {BLOCK_SIZES}, not {self.block_size!r}"
            )
        if self.size is not None:
            size: object = self.size
            if isinstance(size, bool) or not isinstance(size, int) or size < self.block_size:
                raise LocalProtocolError(
                    f"{owner}: size must be at least one block ({self.block_size} bytes), "
                    f"not {size!r}"
                )
            if size % self.block_size:
                raise LocalProtocolError(
                    f"{owner}: size {size} is not a multiple of the block size {self.block_size}"
                )
            if size // self.block_size > _U64:
                raise LocalProtocolError(f"{owner}: size {size} has more blocks than SCSI counts")
        if self.wwid is not None:
            object.__setattr__(self, "wwid", normalize_wwid(self.wwid))
        if self.serial is not None:
            _check_ascii(owner, "serial", self.serial, 64)
        _check_ascii(owner, "vendor", self.vendor, 8)
        _check_ascii(owner, "product", self.product, 16)
        _check_ascii(owner, "revision", self.revision, 4)
        if self.backing is not None:
            object.__setattr__(self, "backing", Path(self.backing))

    @property
    def blocks(self) -> int | None:
        """The number of logical blocks, when the size is known from the configuration."""
        size = self.size if self.size is not None or self.backing else DEFAULT_LUN_SIZE
        return None if size is None else size // self.block_size

    @property
    def linux_wwid(self) -> str | None:
        """The WWID as the kernel shows it (``naa.6...``), once it is set."""
        return None if self.wwid is None else f"naa.{self.wwid}"

    @property
    def scsi_id(self) -> str | None:
        """The WWID as udev's scsi_id prints it (``36...``), once it is set."""
        return None if self.wwid is None else f"3{self.wwid}"

    @classmethod
    def parse(cls, text: str) -> LunSpec:
        """Read ``LUN[,KEY=VALUE...]``; keys: size (64M, 1G...), block-size, wwid, serial,
        vendor, product, revision, backing (a file path)."""
        number, *options = text.split(",")
        try:
            lun = int(number.strip())
        except ValueError:
            raise LocalProtocolError(f"LUN {text!r}: expected LUN[,KEY=VALUE...]") from None
        values: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            key = key.strip().lower()
            if not sep or key not in _LUN_KEYS:
                raise LocalProtocolError(
                    f"LUN {text!r}: {option!r} is not KEY=VALUE with KEY one of "
                    f"{', '.join(_LUN_KEYS)}"
                )
            if key in values:
                raise LocalProtocolError(f"LUN {text!r}: {key} is given twice")
            values[key] = value
        block_size = values.get("block-size", "512")
        if not block_size.isdigit():
            raise LocalProtocolError(f"LUN {text!r}: block-size {block_size!r} is not a number")
        return cls(
            lun=lun,
            size=parse_size(values["size"]) if "size" in values else None,
            block_size=int(block_size),
            wwid=values.get("wwid"),
            serial=values.get("serial"),
            vendor=values.get("vendor", "PYISCSI"),
            product=values.get("product", "TEST DISK"),
            revision=values.get("revision", "0001"),
            backing=Path(values["backing"]) if "backing" in values else None,
        )


_LUN_KEYS = ("size", "block-size", "wwid", "serial", "vendor", "product", "revision", "backing")


# ---------------------------------------------------------------------------------------------
# Portals, CHAP, targets


def _check_faults(owner: str, faults: object, *, per_target: bool) -> tuple[Fault, ...]:
    if not isinstance(faults, tuple):
        raise LocalProtocolError(f"{owner}: faults must be a tuple")
    for fault in faults:
        kind = getattr(fault, "kind", None)
        if not isinstance(kind, FaultKind):
            raise LocalProtocolError(f"{owner}: {fault!r} is not a fault")
        if per_target and not kind.per_target:
            raise LocalProtocolError(
                f"{owner}: fault {kind.value} acts on sockets or timing and can only be set on "
                "a portal"
            )
    for index, fault in enumerate(faults):
        for other in faults[:index]:
            if other.kind is fault.kind and not _disjoint_luns(other, fault):
                raise LocalProtocolError(
                    f"{owner}: the same fault kind ({fault.kind.value}) is given twice"
                    + (" for the same LUNs" if isinstance(fault, LunFault) else "")
                )
    return faults


def _disjoint_luns(one: Fault, other: Fault) -> bool:
    """Two SCSI faults of one kind may share a place if they act on different LUNs."""
    if not isinstance(one, LunFault) or not isinstance(other, LunFault):
        return False
    return one.luns is not None and other.luns is not None and not one.luns & other.luns


def _check_fault_luns(owner: str, faults: tuple[Fault, ...], luns: set[int]) -> None:
    for fault in faults:
        if isinstance(fault, LunFault) and fault.luns is not None and not fault.luns <= luns:
            missing = ", ".join(str(lun) for lun in sorted(fault.luns - luns))
            served = ", ".join(str(lun) for lun in sorted(luns)) or "none"
            raise LocalProtocolError(
                f"{owner}: fault {fault.kind.value} names LUN {missing}, which no target "
                f"served there has (LUNs: {served})"
            )


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True, kw_only=True)
class PortalConfig:
    """One listening address of the test target.

    ``port`` 0 asks the server for a free port; the server's resolved config (and
    :attr:`RunningTarget.portals`) carry the port it got. ``name`` is how targets, faults and the
    command line refer to the portal; it defaults to ``host:port`` as configured (so
    ``127.0.0.1:0`` for an ephemeral port) and never changes when the port is resolved.
    """

    host: str
    port: int = DEFAULT_PORT
    tpgt: int = DEFAULT_TPGT
    name: str = ""
    faults: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        port: object = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise LocalProtocolError(f"portal port must be 0..65535, not {port!r}")
        tpgt: object = self.tpgt
        if isinstance(tpgt, bool) or not isinstance(tpgt, int) or not 0 <= tpgt <= 65535:
            raise LocalProtocolError(f"portal tpgt must be 0..65535, not {tpgt!r}")
        # Portal normalises the host (and refuses nonsense); port 0 is not a Portal's business.
        host = Portal(host=self.host, port=self.port or DEFAULT_PORT).host
        object.__setattr__(self, "host", host)
        if not self.name:
            object.__setattr__(self, "name", f"{_format_host(host)}:{self.port}")
        _check_faults(f"portal {self.name}", self.faults, per_target=False)

    @classmethod
    def parse(cls, text: str, *, faults: tuple[Fault, ...] = ()) -> PortalConfig:
        """Read ``host:port[,tpgt]`` (IPv6 as ``[addr]:port``); port 0 means "any free port"."""
        address, comma, tpgt_text = text.partition(",")
        ephemeral = address.endswith(":0") and (address.startswith("[") or address.count(":") == 1)
        portal = Portal.parse(address[:-2] if ephemeral else address)
        tpgt = DEFAULT_TPGT
        if comma:
            tpgt = Portal.parse(f"{_format_host(portal.host)},{tpgt_text}").tpgt or 0
        return cls(
            host=portal.host,
            port=0 if ephemeral else portal.port,
            tpgt=tpgt,
            name=address,
            faults=faults,
        )

    @property
    def portal(self) -> Portal:
        """The address as a :class:`Portal` (with the tpgt). Fails while the port is still 0."""
        if self.port == 0:
            raise LocalProtocolError(f"portal {self.name} has no port yet (it is not bound)")
        return Portal(host=self.host, port=self.port, tpgt=self.tpgt)

    def has(self, kind: FaultKind) -> bool:
        return find_fault(self.faults, kind) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChapSettings:
    """CHAP as the target demands it: no accounts means no authentication.

    ``accounts`` are the initiators' credentials the target accepts; ``mutual`` is what the
    target answers with when an initiator challenges it back.
    """

    accounts: tuple[ChapCredentials, ...] = ()
    mutual: ChapCredentials | None = None
    algorithms: tuple[ChapAlgorithm, ...] = DEFAULT_ALGORITHMS

    def __post_init__(self) -> None:
        names = [account.username for account in self.accounts]
        if len(set(names)) != len(names):
            raise LocalProtocolError("CHAP accounts name the same user twice")
        for account in (*self.accounts, *(() if self.mutual is None else (self.mutual,))):
            if not account.username or not len(account.secret):
                raise LocalProtocolError(
                    f"CHAP account {account.username!r} needs a username and a non-empty secret"
                )
        if not self.algorithms:
            raise LocalProtocolError("CHAP needs at least one algorithm")
        if self.mutual is not None and not self.accounts:
            raise LocalProtocolError("mutual CHAP credentials need at least one CHAP account")

    @property
    def required(self) -> bool:
        return bool(self.accounts)


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetSpec:
    """One target: its name, where it is served, who may log in and how, and its LUNs.

    ``portals`` names the portals that serve it (``None``: all of them); ``allowed_initiators``
    is its ACL (``None``: anyone). ``luns`` are its logical units: :class:`LunSpec` s, or plain
    numbers as shorthand for a default :class:`LunSpec` (a 64 MiB disk in memory). The default
    is one disk at LUN 0, the LUN an initiator sends REPORT LUNS to; unlike tgtd, LUN 0 is not a
    controller. After construction every entry is a :class:`LunSpec` with its WWID and serial
    set (see :attr:`logical_units`). ``faults`` may hold protocol faults only; they apply to
    Normal sessions with this target.
    """

    name: str
    portals: tuple[str, ...] | None = None
    luns: tuple[LunSpec | int, ...] = (0,)
    allowed_initiators: frozenset[str] | None = None
    chap: ChapSettings = ChapSettings()
    faults: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", validate_iscsi_name(self.name))
        if self.allowed_initiators is not None:
            object.__setattr__(
                self,
                "allowed_initiators",
                frozenset(validate_iscsi_name(name) for name in self.allowed_initiators),
            )
        _check_faults(f"target {self.name}", self.faults, per_target=True)
        if not isinstance(self.luns, tuple):
            raise LocalProtocolError(f"target {self.name}: luns must be a tuple")
        specs: list[LunSpec] = []
        for entry in self.luns:
            spec = entry if isinstance(entry, LunSpec) else LunSpec(lun=entry)
            wwid = spec.wwid or default_wwid(self.name, spec.lun)
            specs.append(replace(spec, wwid=wwid, serial=spec.serial or wwid[-16:]))
        numbers = [spec.lun for spec in specs]
        if len(set(numbers)) != len(numbers):
            raise LocalProtocolError(f"target {self.name}: the same LUN is given twice")
        object.__setattr__(self, "luns", tuple(sorted(specs, key=lambda spec: spec.lun)))

    @property
    def logical_units(self) -> tuple[LunSpec, ...]:
        """The LUNs, in ascending order, each with its WWID and serial resolved."""
        return tuple(spec for spec in self.luns if isinstance(spec, LunSpec))

    def find_lun(self, lun: int) -> LunSpec | None:
        return next((spec for spec in self.logical_units if spec.lun == lun), None)

    def admits(self, initiator_name: str) -> bool:
        return self.allowed_initiators is None or initiator_name in self.allowed_initiators


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetConfig:
    """Everything the test target serves: portals, targets, discovery authentication, limits.

    ``max_recv_data_segment_length`` is what the target declares it can receive;
    ``cmd_window`` sets MaxCmdSN = ExpCmdSN + cmd_window - 1. ``initial_r2t``,
    ``immediate_data``, ``first_burst_length`` and ``max_burst_length`` are the target's side
    of those keys' negotiation (RFC 7143 13.10-13.14): by default the target lets the
    initiator choose InitialR2T (it answers ``No`` unless the initiator says ``Yes``) and
    accepts immediate data, as Linux and libiscsi expect.
    """

    portals: tuple[PortalConfig, ...]
    targets: tuple[TargetSpec, ...] = ()
    discovery_chap: ChapSettings = ChapSettings()
    max_recv_data_segment_length: int = 8192
    cmd_window: int = 32
    digests: tuple[Digest, ...] = (Digest.NONE, Digest.CRC32C)
    initial_r2t: bool = False
    immediate_data: bool = True
    first_burst_length: int = 65536
    max_burst_length: int = 262144
    #: (host, port) -> portal, built once: the server looks a portal up per connection, and a
    #: linear scan cost half the target's CPU with hundreds of portals (benchmarks/scale.py).
    _by_address: dict[tuple[str, int], PortalConfig] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not self.portals:
            raise LocalProtocolError("a test target needs at least one portal")
        for portal in self.portals:
            self._by_address.setdefault((portal.host, portal.port), portal)
        names = [portal.name for portal in self.portals]
        if len(set(names)) != len(names):
            raise LocalProtocolError("two portals have the same name; give them distinct names")
        targets = [target.name for target in self.targets]
        if len(set(targets)) != len(targets):
            raise LocalProtocolError("two targets have the same name")
        for target in self.targets:
            for portal_name in target.portals or ():
                if portal_name not in names:
                    raise LocalProtocolError(
                        f"target {target.name} names portal {portal_name!r}, which is not "
                        f"configured (portals: {', '.join(names)})"
                    )
            for fault in target.faults:
                if isinstance(fault, Redirect):
                    self._check_redirect(fault)
            _check_fault_luns(
                f"target {target.name}",
                target.faults,
                {spec.lun for spec in target.logical_units},
            )
        for portal in self.portals:
            for fault in portal.faults:
                if isinstance(fault, Redirect):
                    self._check_redirect(fault)
            _check_fault_luns(
                f"portal {portal.name}",
                portal.faults,
                {
                    spec.lun
                    for target in self.targets
                    if target.portals is None or portal.name in target.portals
                    for spec in target.logical_units
                },
            )
        if not 512 <= self.max_recv_data_segment_length <= _MAX_24BIT:
            raise LocalProtocolError("max_recv_data_segment_length must be 512..16777215")
        if not 1 <= self.cmd_window <= 0x7FFFFFFF:
            raise LocalProtocolError("cmd_window must be positive")
        if Digest.NONE not in self.digests:
            raise LocalProtocolError("the target must accept digest None")
        for name in ("first_burst_length", "max_burst_length"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (512 <= value <= _MAX_24BIT)
            ):
                raise LocalProtocolError(f"{name} must be 512..16777215, not {value!r}")
        if self.first_burst_length > self.max_burst_length:
            raise LocalProtocolError("first_burst_length must not exceed max_burst_length")

    def _check_redirect(self, fault: Redirect) -> None:
        if self.find_portal(fault.to) is None:
            try:
                Portal.parse(fault.to)
            except InvalidPortal as exc:
                raise LocalProtocolError(
                    f"redirect target {fault.to!r} is neither a portal name nor an address"
                ) from exc

    def find_portal(self, name: str) -> PortalConfig | None:
        return next((portal for portal in self.portals if portal.name == name), None)

    def find_target(self, name: str) -> TargetSpec | None:
        try:
            wanted = validate_iscsi_name(name)
        except InvalidName:
            return None
        return next((target for target in self.targets if target.name == wanted), None)

    def portals_of(self, target: TargetSpec) -> tuple[PortalConfig, ...]:
        """The portals serving ``target``, in configuration order."""
        if target.portals is None:
            return self.portals
        return tuple(portal for portal in self.portals if portal.name in target.portals)

    def portal_at(self, portal: Portal) -> PortalConfig:
        """The configured portal listening at ``portal``'s address (its tpgt is ignored)."""
        # Both sides are normalised by names.Portal, so an exact match is the common case.
        found = self._by_address.get((portal.host, portal.port))
        if found is not None:
            return found
        for candidate in self.portals:
            if candidate.port == portal.port and _same_host(candidate.host, portal.host):
                return candidate
        raise LocalProtocolError(f"no portal of this config listens at {portal}")


def _same_host(one: str, other: str) -> bool:
    try:
        return ipaddress.ip_address(one) == ipaddress.ip_address(other)
    except ValueError:
        return one.lower() == other.lower()
