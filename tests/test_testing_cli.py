"""``python -m pyiscsi_failover.testing``: the test target as a process.

Process tests start it for real, wait for its ``ready`` line (never a sleep), talk to it over
loopback and stop it with a signal. Argument handling is tested in-process through ``run()`` and
``load_config()``.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from peers import require_tool, unique_loopback

from pyiscsi_failover.names import Portal
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.pdu import ISID, LoginRequest, LoginResponse, LoginStatus, Stage
from pyiscsi_failover.protocol.text import decode_keys, encode_text
from pyiscsi_failover.protocol.wire import encode_pdu
from pyiscsi_failover.testing import (
    Blackhole,
    DelayPDUs,
    DigestsRequired,
    FaultKind,
    Redirect,
    Refuse,
    RejectDigests,
    ServiceUnavailable,
    SplitStyle,
    SplitText,
)
from pyiscsi_failover.testing.__main__ import build_parser, load_config, run

INITIATOR = "iqn.2024-01.com.example:cli-initiator"
DISK = "iqn.2024-01.com.example:cli-disk"
SECRET = "cli-secret-never-shown"
TIMEOUT = 20


_loopback = unique_loopback


# --------------------------------------------------------------------------------------------
# Running the process


class _Lines:
    """Reads lines from a trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.seen: list[str] = []

    async def readline(self) -> str:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise EOFError(f"stream ended; read so far: {self.seen!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        text = line.decode()
        self.seen.append(text)
        return text

    async def rest(self) -> str:
        while chunk := await self.stream.receive_some(4096):
            self.buffer += chunk
        return self.buffer.decode()


@dataclass
class Served:
    process: trio.Process
    stdout: _Lines
    stderr: _Lines
    portals: dict[str, Portal]


@asynccontextmanager
async def target_process(*args: str) -> AsyncIterator[Served]:
    """Start the target; yield once it said ``ready``. Always reaped."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pyiscsi_failover.testing", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        served = Served(process, _Lines(process.stdout), _Lines(process.stderr), {})
        assert await served.stdout.readline() == "ready"
        # The portal lines precede "ready" and are already in the pipe.
        for _ in range(args.count("--portal")):
            kind, name, address, *_faults = (await served.stderr.readline()).split()
            assert kind == "portal"
            served.portals[name] = Portal.parse(address)
        yield served
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()


async def _stop(served: Served, signum: signal.Signals) -> tuple[int, str, str]:
    served.process.send_signal(signum)
    code = await served.process.wait()
    return code, await served.stdout.rest(), await served.stderr.rest()


async def _discovery_login(where: Portal) -> LoginResponse:
    stream = await trio.open_tcp_stream(where.host, where.port)
    async with stream:
        request = LoginRequest(
            transit=True,
            cont=False,
            csg=Stage.SECURITY_NEGOTIATION,
            nsg=Stage.FULL_FEATURE_PHASE,
            isid=ISID(t=2, a=0, b=1, c=2, d=3),
            itt=1,
            cmdsn=1,
            expstatsn=0,
            data=encode_text(
                [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]
            ),
        )
        await stream.send_all(encode_pdu(request))
        buffer = PDUBuffer()
        while (answer := buffer.next_pdu()) is None:
            data = await stream.receive_some(65536)
            assert data, "target closed before answering"
            buffer.feed(data)
    assert isinstance(answer, LoginResponse)
    return answer


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_process_prints_ready_serves_and_stops_on_signal(signum: signal.Signals) -> None:
    host = _loopback()
    with trio.fail_after(TIMEOUT):
        async with target_process(
            "--portal", f"{host}:0", "--portal", f"far={_loopback()}:0,7", "--target", DISK
        ) as served:
            assert set(served.portals) == {f"{host}:0", "far"}
            bound = served.portals[f"{host}:0"]
            assert bound.host == host
            assert bound.port != 0
            assert bound.tpgt == 1
            assert served.portals["far"].tpgt == 7
            answer = await _discovery_login(bound)
            assert answer.status is LoginStatus.SUCCESS
            assert answer.tsih != 0
            assert decode_keys(answer.data)["TargetPortalGroupTag"] == "1"
            code, out, _ = await _stop(served, signum)
    assert code == 0
    assert out == ""  # nothing after the one "ready" line


async def test_process_applies_faults_from_the_command_line() -> None:
    with trio.fail_after(TIMEOUT):
        async with target_process(
            "--portal",
            f"dead={_loopback()}:0",
            "--portal",
            f"busy={_loopback()}:0",
            "--target",
            DISK,
            "--fault",
            "dead=refuse",
            "--fault",
            "busy=service-unavailable",
        ) as served:
            dead = served.portals["dead"]
            assert dead.port != 0
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream(dead.host, dead.port)
            answer = await _discovery_login(served.portals["busy"])
            assert answer.status is LoginStatus.SERVICE_UNAVAILABLE
            code, _, _ = await _stop(served, signal.SIGTERM)
    assert code == 0


async def test_process_serves_a_slow_redirect_hop_and_a_redirect_loop() -> None:
    """Several faults on one portal (--fault repeated): a -> b slowly, then b <-> c forever."""
    with trio.fail_after(TIMEOUT):
        async with target_process(
            "--portal",
            f"a={_loopback()}:0",
            "--portal",
            f"b={_loopback()}:0",
            "--portal",
            f"c={_loopback()}:0",
            "--target",
            DISK,
            "--fault",
            "a=delay:0.1",
            "--fault",
            "a=redirect:b",
            "--fault",
            "b=redirect:c",
            "--fault",
            "c=redirect-permanent:b",
        ) as served:
            start = trio.current_time()
            answer = await _discovery_login(served.portals["a"])
            assert trio.current_time() - start >= 0.1
            hops = [answer]
            for _ in range(3):
                moved = Portal.parse(decode_keys(hops[-1].data)["TargetAddress"])
                hops.append(await _discovery_login(moved))
            addresses = [decode_keys(hop.data)["TargetAddress"] for hop in hops]
            code, _, _ = await _stop(served, signal.SIGTERM)
    b, c = served.portals["b"], served.portals["c"]
    assert addresses == [f"{b},{b.tpgt}", f"{c},{c.tpgt}", f"{b},{b.tpgt}", f"{c},{c.tpgt}"]
    assert [hop.status for hop in hops] == [
        LoginStatus.TARGET_MOVED_TEMPORARILY,  # a
        LoginStatus.TARGET_MOVED_TEMPORARILY,  # b
        LoginStatus.TARGET_MOVED_PERMANENTLY,  # c
        LoginStatus.TARGET_MOVED_TEMPORARILY,  # b again
    ]
    assert code == 0
    portal_lines = [line for line in served.stderr.seen if line.startswith("portal a ")]
    assert portal_lines[0].endswith(" delay:0.1 redirect:b")


def test_digest_faults_parse_on_portals_and_targets() -> None:
    config = _config(
        "--portal",
        "a=127.0.0.1:0",
        "--target",
        DISK,
        "--fault",
        "a=reject-digests",
        "--fault",
        f"{DISK}=digests-required:header",
    )
    assert config.portals[0].faults == (RejectDigests(),)
    assert config.targets[0].faults == (DigestsRequired(data=False),)


async def test_process_never_prints_a_secret(tmp_path: Path) -> None:
    chap_file = tmp_path / "chap"
    chap_file.write_text(f"# test accounts\nchap alice:{SECRET}\nmutual-chap tgt:{SECRET}-2\n")
    with trio.fail_after(TIMEOUT):
        async with target_process(
            "--portal",
            f"{_loopback()}:0",
            "--target",
            DISK,
            "--chap-file",
            str(chap_file),
            "--verbose",
        ) as served:
            [where] = served.portals.values()
            answer = await _discovery_login(where)  # no CHAP offered: refused and logged
            assert answer.status is LoginStatus.AUTHENTICATION_FAILURE
            code, out, err = await _stop(served, signal.SIGTERM)
    assert code == 0
    everything = "\n".join([*served.stdout.seen, out, *served.stderr.seen, err])
    assert "AUTHENTICATION_FAILURE" in everything  # --verbose logged the refused login
    assert SECRET not in everything


@pytest.mark.peer
async def test_iscsi_ls_against_the_process_with_chap(tmp_path: Path) -> None:
    iscsi_ls = require_tool("iscsi-ls", "libiscsi-bin")
    chap_file = tmp_path / "chap"
    chap_file.write_text(f"chap alice:{SECRET}\n")
    with trio.fail_after(TIMEOUT):
        async with target_process(
            "--portal", f"{_loopback()}:0", "--target", DISK, "--chap-file", str(chap_file)
        ) as served:
            [where] = served.portals.values()
            done = await trio.run_process(
                [iscsi_ls, "-i", INITIATOR, f"iscsi://alice%{SECRET}@{where}/"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout.decode().split() == [f"Target:{DISK}", f"Portal:{where},1"]
            refused = await trio.run_process(
                [iscsi_ls, "-i", INITIATOR, f"iscsi://{where}/"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert refused.returncode != 0
            code, _, _ = await _stop(served, signal.SIGTERM)
    assert code == 0


# --------------------------------------------------------------------------------------------
# Arguments, in-process


def _config(*argv: str) -> Any:
    return load_config(build_parser().parse_args(list(argv)))


def test_faults_go_to_portals_and_targets(tmp_path: Path) -> None:
    config = _config(
        "--portal",
        "127.0.0.1:0",
        "--portal",
        "b=[::1]:3260,5",
        "--target",
        DISK,
        "--fault",
        "127.0.0.1:0=blackhole",
        "--fault",
        "b=delay:0.25",
        "--fault",
        f"{DISK.upper()}=split-text:16:tgt",
        "--fault",
        "b=redirect:127.0.0.1:0",
        "--fault",
        f"{DISK}=service-unavailable",
    )
    first, second = config.portals
    assert (first.name, first.port, first.faults) == ("127.0.0.1:0", 0, (Blackhole(),))
    assert (second.name, second.host, second.port, second.tpgt) == ("b", "::1", 3260, 5)
    assert second.faults == (DelayPDUs(seconds=0.25), Redirect(to="127.0.0.1:0"))
    [target] = config.targets
    assert target.faults == (SplitText(chunk=16, style=SplitStyle.TGT), ServiceUnavailable())
    assert target.chap.accounts == ()


def test_chap_options_and_file(tmp_path: Path) -> None:
    chap_file = tmp_path / "chap"
    chap_file.write_text("\n# comment\nchap bob:bob-secret-1234\nmutual-chap tgt:tgt-secret-5678\n")
    config = _config(
        "--portal",
        "127.0.0.1:0",
        "--target",
        DISK,
        "--chap",
        "alice:alice-secret-123",
        "--chap-file",
        str(chap_file),
        "--no-discovery-chap",
        "--allow-initiator",
        INITIATOR,
    )
    [target] = config.targets
    assert [a.username for a in target.chap.accounts] == ["alice", "bob"]
    assert target.chap.mutual is not None
    assert target.chap.mutual.username == "tgt"
    assert target.allowed_initiators == frozenset({INITIATOR})
    assert not config.discovery_chap.required
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--chap", f"no-colon-{SECRET}"], "--chap needs USER:SECRET"),
        (["--chap", f":{SECRET}"], "--chap needs USER:SECRET"),
        (["--mutual-chap", f"user-only{SECRET}"], "--mutual-chap needs USER:SECRET"),
        (["--fault", "nowhere=refuse"], "neither a portal name"),
        (["--fault", "127.0.0.1:0=bogus"], "unknown fault"),
        (["--fault", f"{DISK}=refuse"], "only be set on a portal"),
        (["--target", "not-an-iqn"], "invalid iSCSI name"),
        (["--portal", "[::1:0"], "invalid portal"),
    ],
)
def test_bad_arguments_exit_2_without_echoing_secrets(argv: list[str], complaint: str) -> None:
    err = io.StringIO()
    out = io.StringIO()
    code = run(["--portal", "127.0.0.1:0", "--target", DISK, *argv], stdout=out, stderr=err)
    assert code == 2
    assert complaint in err.getvalue()
    assert SECRET not in err.getvalue()
    assert out.getvalue() == ""


def test_unreadable_chap_file(tmp_path: Path) -> None:
    err = io.StringIO()
    code = run(
        ["--portal", "127.0.0.1:0", "--chap-file", str(tmp_path / "missing")],
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == 2
    assert "cannot read --chap-file" in err.getvalue()


def test_port_in_use_exits_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = io.StringIO()
        code = run(["--portal", f"127.0.0.1:{port}"], stdout=io.StringIO(), stderr=err)
    assert code == 1
    assert "cannot serve" in err.getvalue()


def test_help_documents_the_output_and_the_chap_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert '"ready"' in text
    assert "portal NAME HOST:PORT,TPGT" in text
    assert "--chap-file" in text
    assert "never printed" in text


def test_help_and_readme_name_every_fault(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    for kind in FaultKind:
        assert kind.value in help_text, kind
    for spelling in ("digests-required[:header|data|both]", "reject-digests"):
        assert spelling in help_text
        assert f"`{spelling}`" in readme


def test_refuse_fault_is_accepted_on_a_portal() -> None:
    config = _config("--portal", "127.0.0.1:0", "--fault", "127.0.0.1:0=refuse")
    assert config.portals[0].faults == (Refuse(),)
