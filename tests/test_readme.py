"""Every ```python block of README.md runs as written, against our own test target on loopback.

The README's examples name the documentation portals ``10.0.1.2:3260`` (the main portal) and
``10.0.2.2:3260`` (the alternative), and the IQN ``iqn.2010-10.org.openstack:volume-1``, as its
connection_info example does; the Library section says so. This test serves that IQN from
:func:`~pyiscsi_failover.testing.serve_target` on two fresh loopback addresses, the main portal
refusing connections (so the probes must fail over) and the alternative one working, and replaces
exactly those two portal strings in each block before running it. That substitution is the only
change: no other line is added, dropped or rewritten, and a block naming any other address that is
not loopback fails here rather than sending traffic off the machine.

Each block runs in a fresh interpreter (``python -I -W error -c BLOCK``, so no shared namespace
and no warning let through), under a deadline, while the target runs in this test's trio loop. A
block passes when it exits 0; one that names a portal must also have logged in to the target,
left no session behind, and printed the working portal's address or port.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
import trio
from peers import unique_loopback

from pyiscsi_failover.testing import Refuse, serve_target
from pyiscsi_failover.testing.target import PortalConfig, TargetConfig, TargetSpec

README: Final = Path(__file__).resolve().parent.parent / "README.md"
MAIN: Final = "10.0.1.2:3260"
ALTERNATIVE: Final = "10.0.2.2:3260"
IQN: Final = "iqn.2010-10.org.openstack:volume-1"
#: Generous: a probe of these two portals takes milliseconds; this only stops a hang.
BLOCK_DEADLINE: Final = 60.0

_FENCE: Final = re.compile(r"^```python\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_IPV4: Final = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) for each ```python block of ``text``."""
    blocks = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]
    # Every opening fence is matched, so a malformed block cannot be skipped silently.
    assert len(blocks) == len(re.findall(r"^```python\s*$", text, re.MULTILINE))
    return blocks


BLOCKS: Final = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_the_library_examples() -> None:
    """The four examples the Library section promises are there (and so are run below)."""
    code = "\n".join(block for _, block in BLOCKS)
    for needle in ("probe_sync(", "trio.run(main)", "asyncio.to_thread(probe_sync", "discover("):
        assert needle in code, needle


def test_block_extraction() -> None:
    text = "x\n```python\nprint(1)\n```\n\n```sh\nls\n```\n```python\na = 2\nprint(a)\n```\n"
    assert python_blocks(text) == [(2, "print(1)\n"), (9, "a = 2\nprint(a)\n")]


def localise(code: str, portals: dict[str, str]) -> str:
    """``code`` with each documentation portal replaced; any other non-loopback IPv4 fails."""
    for documented, real in portals.items():
        code = code.replace(documented, real)
    for literal in _IPV4.findall(code):
        address = ipaddress.ip_address(literal)
        assert address.is_loopback, f"README block names {literal}, which is not mapped"
    return code


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
async def test_readme_block_runs(line: int, code: str, tmp_path: Path) -> None:
    config = TargetConfig(
        portals=(
            PortalConfig(host=unique_loopback(), port=0, faults=(Refuse(),)),
            PortalConfig(host=unique_loopback(), port=0),
        ),
        targets=(TargetSpec(name=IQN),),
    )
    with trio.fail_after(BLOCK_DEADLINE + 10):
        async with serve_target(config) as running:
            main, alternative = running.portals
            local = localise(code, {MAIN: str(main), ALTERNATIVE: str(alternative)})
            with trio.fail_after(BLOCK_DEADLINE):
                done = await trio.run_process(
                    [sys.executable, "-I", "-W", "error", "-c", local],
                    cwd=tmp_path,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    stdin=subprocess.DEVNULL,
                )
            out = done.stdout.decode(errors="replace")
            err = done.stderr.decode(errors="replace")
            assert done.returncode == 0, f"README.md block at line {line} failed:\n{err}\n{out}"
            await running.wait_idle()
            assert not running.lingering_sessions
            if MAIN in code or ALTERNATIVE in code:
                assert any(record.succeeded for record in running.logins), out
                # As host:port, or in a repr (Portal(host='...', port=...)).
                named = alternative.host in out and f"port={alternative.port}" in out
                assert str(alternative) in out or named, out
