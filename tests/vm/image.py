"""The guest's initramfs: static busybox, the modules that reach the 9p shares, and ``init``.

Built on the host in pure Python (a ``newc`` cpio archive, left uncompressed: the kernel unpacks
it faster than it would inflate it under emulation) in about a tenth of a second, so each
session builds its own into its work directory and nothing is cached between sessions.

The archive holds only what runs before the host's root is mounted: everything after that (udev,
iscsid, tgtd, Python) comes from the host's own ``/`` over 9p.
"""

from __future__ import annotations

import lzma
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["BOOT_MODULES", "ImageError", "KernelImage", "build_initramfs", "load_order"]

#: What the guest loads before it mounts its root: 9p over virtio-pci, and overlayfs for a
#: writable /etc (dependencies are added).
BOOT_MODULES: tuple[str, ...] = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

_INIT_SCRIPT = Path(__file__).with_name("init")


class ImageError(RuntimeError):
    """The kernel, its modules or busybox are missing or unusable (a harness failure)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelImage:
    """A bootable kernel and its module tree, as ``linux-image-amd64`` installs them."""

    release: str
    vmlinuz: Path
    modules: Path

    @classmethod
    def newest(cls, boot: Path = Path("/boot"), lib: Path = Path("/lib/modules")) -> KernelImage:
        """The newest release that has both ``vmlinuz-R`` and ``/lib/modules/R``."""
        releases = sorted(
            (p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*")),
            key=_version_key,
        )
        for release in reversed(releases):
            if (lib / release / "modules.dep").is_file():
                return cls(
                    release=release, vmlinuz=boot / f"vmlinuz-{release}", modules=lib / release
                )
        raise ImageError(
            f"no kernel with modules: {boot}/vmlinuz-* and {lib}/<release>/modules.dep "
            "(Debian package linux-image-amd64)"
        )


def _version_key(release: str) -> list[tuple[int, str]]:
    parts = release.replace("-", ".").split(".")
    return [(int(p), "") if p.isdigit() else (-1, p) for p in parts]


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def load_order(modules_dep: str, wanted: Iterable[str]) -> list[tuple[str, str]]:
    """(name, path relative to the module tree) for ``wanted`` and their dependencies, each
    after everything it depends on (``modules.dep``: ``path: dependency-path ...``)."""
    depends: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        name = _module_name(path)
        where[name] = path
        depends[name] = [_module_name(dep) for dep in rest.split()]
    order: list[tuple[str, str]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise ImageError(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name not in where:
            raise ImageError(f"kernel module {name!r} is not in modules.dep (built in, or absent?)")
        for dep in depends[name]:
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, where[name]))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        done = subprocess.run(
            ["zstd", "-dcq"], input=data, capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise ImageError(f"zstd could not decompress {path}: {done.stderr.decode().strip()}")
        return done.stdout
    return data


def _is_static_elf(data: bytes) -> bool:
    """An ELF executable with no PT_INTERP program header (so no dynamic loader needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only: this harness boots x86_64
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def find_static_busybox(candidates: Sequence[Path] = (Path("/bin/busybox"),)) -> Path:
    """busybox-static's binary (the dynamic one cannot run before the root is mounted)."""
    for candidate in candidates:
        try:
            if _is_static_elf(candidate.read_bytes()):
                return candidate
        except OSError:
            continue
    raise ImageError(
        "no statically linked busybox at "
        + ", ".join(map(str, candidates))
        + " (Debian package busybox-static)"
    )


# --------------------------------------------------------------------------------------------
# newc cpio


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""


def _newc(entries: Iterable[_Entry]) -> Iterator[bytes]:
    def record(ino: int, entry: _Entry) -> bytes:
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, 0, 0, len(name), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        head = header + name
        return head + b"\0" * (-len(head) % 4) + entry.data + b"\0" * (-len(entry.data) % 4)

    ino = 0
    for ino, entry in enumerate(entries, start=1):
        yield record(ino, entry)
    yield record(ino + 1, _Entry("TRAILER!!!", 0))


def build_initramfs(
    destination: Path,
    kernel: KernelImage,
    *,
    busybox: Path | None = None,
    init_script: Path = _INIT_SCRIPT,
    extra_modules: Sequence[str] = (),
) -> list[str]:
    """Write the initramfs to ``destination``; return the module names in load order."""
    busybox = busybox or find_static_busybox()
    order = load_order(
        (kernel.modules / "modules.dep").read_text(), (*BOOT_MODULES, *extra_modules)
    )
    directory = stat.S_IFDIR | 0o755
    entries = [_Entry(d, directory) for d in ("bin", "dev", "proc", "sys", "mnt", "modules")]
    entries.append(_Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(_Entry("init", stat.S_IFREG | 0o755, init_script.read_bytes()))
    for name, relative in order:
        data = _module_bytes(kernel.modules / relative)
        entries.append(_Entry(f"modules/{name}.ko", stat.S_IFREG | 0o644, data))
    listing = "".join(f"{name}\n" for name, _ in order).encode()
    entries.append(_Entry("modules/order", stat.S_IFREG | 0o644, listing))
    partial = destination.with_name(destination.name + ".part")
    with partial.open("wb") as out:
        for chunk in _newc(entries):
            out.write(chunk)
    os.replace(partial, destination)
    return [name for name, _ in order]
