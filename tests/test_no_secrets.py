"""No CHAP secret ever shows: not in a log record, an exception, a repr, stdout, stderr or JSON.

Recognisable secrets (ours, the target's, discovery's, a wrong one) go through a broad set of
operations against our test target: successful and failing logins with one-way and mutual CHAP,
discovery, every fault the target can inject, the prober under every policy, the CLI (``probe``
as JSON, as a table and live on a "terminal", ``login``, ``discover``, ``attach --dry-run``, a real
``attach``/``detach`` with ``tests/fake_iscsiadm/iscsiadm`` echoing its argv, all at ``-vv``),
connection_info parse errors around the password, and the reprs of every object involved. A
handler on the root logger keeps every record at DEBUG (message, arguments, traceback); every
exception is kept with its chain, arguments and attributes. Then each secret is searched for in
all of it, as text, in hex (either case) and in base64 at every byte alignment.

A self-test first shows that the search finds each of those forms, so a clean result means
something.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import hashlib
import io
import json
import logging
import pickle
import pprint
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from pyiscsi_failover import cli
from pyiscsi_failover.connection_info import (
    ConnectionInfo,
    build_connection_info,
    parse_connection_info,
    redacted,
)
from pyiscsi_failover.credentials import ChapCredentials, Secret
from pyiscsi_failover.errors import ConnectionInfoError, ISCSIError, LocalProtocolError
from pyiscsi_failover.initiator import InitiatorConnection, LoginConfig, LoginSucceeded
from pyiscsi_failover.iscsiadm import (
    Iscsiadm,
    NodeTarget,
    by_path_name,
    dry_run_plan,
    handoff_plan,
)
from pyiscsi_failover.prober import Policy, ProbeOptions, probe
from pyiscsi_failover.protocol.chap import ChapAuthenticator, ChapInitiator
from pyiscsi_failover.testing import (
    ChapSettings,
    Fault,
    FaultKind,
    PortalConfig,
    RunningTarget,
    TargetConfig,
    TargetSpec,
    parse_fault,
    serve_target,
)
from pyiscsi_failover.testing.faults import FaultLayer
from pyiscsi_failover.transport import discover, login

HOST = "127.0.0.1"
IQN = "iqn.2026-11.test.pyiscsi:secrets"
ONE_WAY_IQN = "iqn.2026-11.test.pyiscsi:secrets-one-way"
INITIATOR = "iqn.2026-11.test.pyiscsi:secrets-initiator"

SECRET = "Zebra-Secret-7431"
TARGET_SECRET = "Tiger-Secret-8642"
DISCOVERY_SECRET = "Okapi-Secret-5309"
DISCOVERY_TARGET_SECRET = "Lemur-Secret-1188"
WRONG_SECRET = "Hyena-Secret-2077"
SECRETS = (SECRET, TARGET_SECRET, DISCOVERY_SECRET, DISCOVERY_TARGET_SECRET, WRONG_SECRET)

OURS = ChapCredentials("zebra-user", Secret(SECRET))
THEIRS = ChapCredentials("tiger-target", Secret(TARGET_SECRET))
DISCOVERY = ChapCredentials("okapi-user", Secret(DISCOVERY_SECRET))
DISCOVERY_THEIRS = ChapCredentials("lemur-target", Secret(DISCOVERY_TARGET_SECRET))
WRONG = ChapCredentials("zebra-user", Secret(WRONG_SECRET))

CONNECT_TIMEOUT = 0.2
LOGIN_TIMEOUT = 0.3
TEST_DEADLINE = 60.0

#: Every fault of the test target, in its command-line spelling (``redirect:good`` names the
#: working portal). The slow ones run into the short deadlines above.
FAULT_SPELLINGS = (
    "refuse",
    "blackhole",
    "silent",
    "reset-mid-login",
    "slow-drip:0.01",
    "delay:0.4",
    "malformed-pdu",
    "oversized-pdu",
    "wrong-opcode",
    "wrong-itt",
    "redirect:good",
    "redirect-loop",
    "reflect-challenge",
    "reflect-challenge:initiator-secret",
    "downgrade-to-none",
    "wrong-chap-response",
    "garbage-key-values:CHAP_C,CHAP_R,MaxRecvDataSegmentLength",
    "non-utf8-text",
    "split-text:16:continue:login",
    "service-unavailable",
    "digests-required",
    "reject-digests",
    "refuse-isid:random",
    "lun-missing@0",
    "hide-from-isid:random",
    "not-ready:04/03",
    "standby",
    "check-condition:4/44/00",
    "unit-attention:1:29/00",
    "reservation-conflict",
    "other-wwid",
    "slow-scsi:0.25",
    "split-data-in:8",
    "residual-overflow:512",
)
FAULTS: dict[str, Fault] = {spelling: parse_fault(spelling) for spelling in FAULT_SPELLINGS}
FAKE_ISCSIADM = Path(__file__).parent / "fake_iscsiadm" / "iscsiadm"
BAD_CORPUS = Path(__file__).parent / "data" / "bad_connection_info"


# --------------------------------------------------------------------------------------------
# The search


def _base64_cores(raw: bytes) -> set[str]:
    """The part of the base64 text of ``raw`` that does not depend on its neighbours, for each
    of the three byte alignments ``raw`` can have inside a longer value (standard and URL-safe
    alphabets)."""
    cores: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        start = -(-offset * 8 // 6)  # first character made only of our bits
        end = (offset + len(raw)) * 8 // 6  # characters before the first mixed one
        core = encoded[start:end]
        cores |= {core, core.replace("+", "-").replace("/", "_")}
    return cores


def secret_forms(secret: str) -> set[str]:
    raw = secret.encode()
    return {secret, secret.lower(), secret.upper(), raw.hex(), raw.hex().upper()} | _base64_cores(
        raw
    )


FORMS = {form: secret for secret in SECRETS for form in secret_forms(secret)}


def excerpt(text: str, form: str) -> str:
    at = text.find(form)
    return text[max(0, at - 60) : at + len(form) + 60]


class Sink(logging.Handler):
    """Everything a user, a log file or a crash report could ever see, to be searched."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.texts: list[tuple[str, str]] = []
        self.records = 0
        self.exceptions = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        where = f"log record of {record.name}"
        self.add(where, self.format(record))  # message, and traceback when there is one
        self.add(where, repr(record.msg))
        self.add(where, repr(record.args))

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def add_object(self, where: str, obj: object) -> None:
        self.add(where, repr(obj))
        self.add(where, str(obj))
        self.add(where, f"{obj}")
        self.add(where, pprint.pformat(obj))
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self.add(where, repr(dataclasses.asdict(obj)))

    def add_exception(self, where: str, exc: BaseException, _seen: set[int] | None = None) -> None:
        seen = set() if _seen is None else _seen
        if id(exc) in seen:
            return
        seen.add(id(exc))
        self.exceptions += 1
        where = f"{where}: {type(exc).__name__}"
        self.add(where, str(exc))
        self.add(where, repr(exc))
        self.add(where, repr(exc.args))
        for name, value in vars(exc).items():
            self.add(f"{where}.{name}", repr(value))
        for note in getattr(exc, "__notes__", ()):
            self.add(where, str(note))
        for inner in (exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())):
            if isinstance(inner, BaseException):
                self.add_exception(where, inner, seen)

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.texts:
            for form, secret in FORMS.items():
                if form in text:
                    found.append(f"{secret} (as {form!r}) in {where}: ...{excerpt(text, form)}...")
        return found

    def assert_clean(self) -> None:
        leaks = self.leaks()
        assert not leaks, "\n".join(leaks[:20])


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A Sink on the root logger, with the root and package loggers at DEBUG."""
    root, package = logging.getLogger(), logging.getLogger("pyiscsi_failover")
    saved = root.level, package.level
    handler = Sink()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    package.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        package.setLevel(saved[1])


@pytest.mark.parametrize("secret", SECRETS)
def test_the_search_finds_every_form(secret: str) -> None:
    raw = secret.encode()
    samples = [
        f"password={secret}",
        f"CHAP_R=0x{raw.hex()}",
        f"CHAP_R=0X{raw.hex().upper()}",
        repr(raw),
        *(
            "0b" + base64.b64encode(prefix + raw + b"tail").decode()
            for prefix in (b"", b"a", b"ab", b"abc")
        ),
        base64.urlsafe_b64encode(b"\xff" + raw).decode(),
    ]
    for sample in samples:
        found = Sink()
        found.add("sample", f"... {sample} ...")
        assert found.leaks(), sample
    clean = Sink()
    clean.add("sample", "secret=*** CHAP_R=0x00ff " + secret[:-1] + "X")
    assert not clean.leaks()


# --------------------------------------------------------------------------------------------
# Setup shared by the target-backed tests


def target_config() -> TargetConfig:
    portals = [PortalConfig(host=HOST, port=0, name="good")]
    portals += [
        PortalConfig(host=HOST, port=0, name=spelling, faults=(fault,))
        for spelling, fault in FAULTS.items()
    ]
    return TargetConfig(
        portals=tuple(portals),
        targets=(
            TargetSpec(name=IQN, chap=ChapSettings(accounts=(OURS,), mutual=THEIRS)),
            TargetSpec(name=ONE_WAY_IQN, chap=ChapSettings(accounts=(OURS,))),
        ),
        discovery_chap=ChapSettings(accounts=(DISCOVERY,), mutual=DISCOVERY_THEIRS),
    )


def connection_data(running: RunningTarget, portal_names: Sequence[str]) -> dict[str, object]:
    return build_connection_info(
        [str(running.portal(name)) for name in portal_names],
        IQN,
        0,
        auth=OURS,
        target_auth=THEIRS,
        discovery_auth=DISCOVERY,
        discovery_target_auth=DISCOVERY_THEIRS,
        extra={"volume_id": "c0ffee", "access_mode": "rw"},
    )


def test_every_fault_kind_is_used() -> None:
    assert {fault.kind for fault in FAULTS.values()} == set(FaultKind)


# --------------------------------------------------------------------------------------------
# The library


async def _login(
    sink: Sink, where: str, portal_name: str, running: RunningTarget, config: LoginConfig
) -> bool:
    """Log in and keep whatever came of it; True if the login succeeded."""
    try:
        report = await login(
            running.portal(portal_name),
            config,
            connect_timeout=CONNECT_TIMEOUT,
            login_timeout=LOGIN_TIMEOUT,
        )
    except ISCSIError as exc:
        sink.add_exception(where, exc)
        return False
    sink.add_object(where, report)
    return isinstance(report.outcome, LoginSucceeded)


async def test_library_never_shows_a_secret(sink: Sink) -> None:
    mutual = LoginConfig(initiator_name=INITIATOR, target_name=IQN, chap=OURS, target_chap=THEIRS)
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(target_config()) as running:
            # Successful logins: mutual, one-way, discovery with mutual CHAP.
            assert await _login(sink, "mutual login", "good", running, mutual)
            one_way = LoginConfig(initiator_name=INITIATOR, target_name=ONE_WAY_IQN, chap=OURS)
            assert await _login(sink, "one-way login", "good", running, one_way)
            discovery = LoginConfig(
                initiator_name=INITIATOR, chap=DISCOVERY, target_chap=DISCOVERY_THEIRS
            )
            found = await discover(running.portal("good"), discovery)
            sink.add_object("discovery", found)
            assert found.targets
            # Failing ones: our secret wrong, the target's secret wrong, discovery CHAP wrong.
            wrong = dataclasses.replace(mutual, chap=WRONG)
            assert not await _login(sink, "wrong secret", "good", running, wrong)
            wrong_target = dataclasses.replace(
                mutual, target_chap=ChapCredentials("tiger-target", Secret(WRONG_SECRET))
            )
            assert not await _login(sink, "wrong target secret", "good", running, wrong_target)
            bad_discovery = dataclasses.replace(discovery, chap=WRONG, target_chap=None)
            bad_found = await discover(running.portal("good"), bad_discovery)
            sink.add_object("bad discovery", bad_found)
            assert not bad_found.ok
            # Every fault by hand, and the prober under every policy with every fault before
            # the good portal: all at once, since the slow faults only wait.
            info = parse_connection_info(connection_data(running, [*FAULTS, "good"]))
            async with trio.open_nursery() as nursery:
                for spelling in FAULTS:
                    nursery.start_soon(_login, sink, f"fault {spelling}", spelling, running, mutual)
                for policy in Policy:
                    for probe_all in (False, True):
                        nursery.start_soon(_probe, sink, info, policy, probe_all)
            await running.wait_idle()
            add_target_state(sink, running)
    add_objects(sink, info, mutual)
    assert sink.records > 50, "the package logged (almost) nothing: is the capture working?"
    # SCSI faults do not fail a login (and refuse-isid is a refusal, not an error).
    login_faults = [f for f in FAULTS.values() if f.kind.layer is not FaultLayer.SCSI]
    assert sink.exceptions >= len(login_faults)
    sink.assert_clean()


async def _probe(sink: Sink, info: ConnectionInfo, policy: Policy, probe_all: bool) -> None:
    options = ProbeOptions(
        policy=policy,
        connect_timeout=CONNECT_TIMEOUT,
        login_timeout=LOGIN_TIMEOUT,
        stagger=0.05,
        probe_all=probe_all,
        initiator_name=INITIATOR,
    )
    result = await probe(info, options, on_progress=sink_progress(sink))
    assert result.chosen is not None
    sink.add_object(f"probe {policy.value}", result)
    sink.add(f"probe {policy.value} JSON", json.dumps(result.to_json()))
    for attempt in result.attempts:
        sink.add_object(f"attempt {attempt.candidate.index}", attempt)
        sink.add_object("its report", attempt.report)


def sink_progress(sink: Sink) -> functools.partial[None]:
    return functools.partial(sink.add_object, "progress event")


def add_target_state(sink: Sink, running: RunningTarget) -> None:
    sink.add_object("running target", running)
    sink.add_object("target config", running.config)
    for record in running.connections:
        sink.add_object("connection record", record)
        sink.add_object("login record", record.login)
        for event in record.events:
            sink.add_object("target event", event)


def add_objects(sink: Sink, info: ConnectionInfo, config: LoginConfig) -> None:
    """The reprs of every object that holds a secret, or sits next to one."""
    sink.add_object("connection info", info)
    for candidate in info.candidates:
        sink.add_object("candidate", candidate)
    for creds in (info.chap, info.target_chap, info.discovery_chap, info.discovery_target_chap):
        sink.add_object("credentials", creds)
        assert creds is not None
        sink.add_object("secret", creds.secret)
        sink.add_object("secret copy", copy.deepcopy(creds.secret))
    with pytest.raises(TypeError) as refused:
        pickle.dumps(info)  # a pickle would be the secret, written down
    sink.add_exception("pickle", refused.value)
    sink.add_object("login config", config)
    connection = InitiatorConnection(config)
    connection.start_login()
    sink.add_object("initiator connection", connection)
    chap = ChapInitiator(OURS, target_credentials=THEIRS)
    sink.add_object("chap initiator", chap)
    chap.offer()
    sink.add_object("chap initiator, offered", chap)
    authenticator = ChapAuthenticator({OURS.username: OURS.secret}, mutual=THEIRS)
    sink.add_object("chap authenticator", authenticator)
    sink.add_object("probe options", ProbeOptions(initiator_name=INITIATOR))
    node = NodeTarget(
        portal=info.main.portal, iqn=info.main.iqn, lun=0, chap=info.chap, target_chap=THEIRS
    )
    sink.add_object("node target", node)
    for command in handoff_plan(node):
        sink.add_object("iscsiadm command", command)
        sink.add(str(command), command.masked())
    plan = dry_run_plan(node)
    sink.add_object("dry-run plan", plan)
    assert sum("***" in line for line in plan) == 2  # password and password_in, masked
    sink.add_object("iscsiadm runner", Iscsiadm(binary=FAKE_ISCSIADM))
    sink.add_object("redacted", redacted(connection_info_with_secrets()))


def connection_info_with_secrets() -> dict[str, object]:
    return build_connection_info(
        ["192.0.2.1:3260", "[2001:db8::1]:3260"],
        IQN,
        [0, 1],
        auth=OURS,
        target_auth=THEIRS,
        discovery_auth=DISCOVERY,
        discovery_target_auth=DISCOVERY_THEIRS,
        multipath=True,
    )


# --------------------------------------------------------------------------------------------
# connection_info errors around the password


def _data(**changes: object) -> dict[str, object]:
    data = connection_info_with_secrets()["data"]
    assert isinstance(data, dict)
    data.update(changes)
    return {"driver_volume_type": "iscsi", "data": data}


BAD_INPUTS: list[tuple[str, object]] = [
    ("password with NUL", _data(auth_password=SECRET + "\x00")),
    ("password with lone surrogate", _data(auth_password=SECRET + "\ud800")),
    ("password in a list", _data(auth_password=[SECRET])),
    ("password in a dict", _data(auth_password={"value": SECRET})),
    ("password_in equal to ours", _data(auth_password_in=SECRET)),
    ("alias gives another secret", _data(target_auth_password=DISCOVERY_SECRET)),
    ("mutual without method", _data(auth_method=None)),
    ("discovery password with NUL", _data(discovery_auth_password="\x00" + DISCOVERY_SECRET)),
    ("discovery same secret both ways", _data(discovery_auth_password_in=DISCOVERY_SECRET)),
    ("unknown method", _data(auth_method="kerberos")),
    ("no username", _data(auth_username=None)),
    ("bad portal after the password", _data(target_portal="not a portal!")),
    ("data as a list of secrets", {"driver_volume_type": "iscsi", "data": [SECRET]}),
    ("JSON cut inside the password", f'{{"auth_method": "CHAP", "auth_password": "{SECRET}'),
    (
        "JSON with the password twice",
        f'{{"target_portal": "192.0.2.1", "auth_password": "{SECRET}", '
        f'"auth_password": "{TARGET_SECRET}"}}',
    ),
    ("JSON with NaN by the password", f'{{"auth_password": "{SECRET}", "target_lun": NaN}}'),
    ("not UTF-8 after the password", f'{{"auth_password": "{SECRET}'.encode() + b'\xff"}'),
    ("deep nesting after the password", f'{{"auth_password": "{SECRET}", "x": ' + "[" * 100000),
]


@pytest.mark.parametrize(("name", "document"), BAD_INPUTS, ids=[name for name, _ in BAD_INPUTS])
def test_connection_info_errors_never_show_a_secret(
    sink: Sink, name: str, document: object, tmp_path: Path
) -> None:
    with pytest.raises(ConnectionInfoError) as raised:
        parse_connection_info(document)  # type: ignore[arg-type]
    sink.add_exception(name, raised.value)
    assert raised.value.key
    # The same input through the CLI: exit 2, one line, no traceback, no secret.
    path = tmp_path / "connection_info.json"
    if isinstance(document, bytes):
        path.write_bytes(document)
    elif isinstance(document, str):
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(json.dumps(document), encoding="utf-8", errors="surrogatepass")
    for command in (["probe", "-c", str(path)], ["attach", "-c", str(path), "--dry-run"]):
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.run(["-vv", *command], stdout=stdout, stderr=stderr, stdin=io.StringIO())
        sink.add(f"{command[0]} stdout", stdout.getvalue())
        sink.add(f"{command[0]} stderr", stderr.getvalue())
        assert code == 2, stderr.getvalue()
        errors = [line for line in stderr.getvalue().splitlines() if "DEBUG" not in line]
        assert len(errors) == 1, errors
        assert "Traceback" not in stderr.getvalue()
    sink.assert_clean()


BUILD_ERRORS: list[tuple[str, dict[str, object]]] = [
    ("secret with NUL", {"auth": ChapCredentials("zebra-user", Secret(SECRET + "\x00"))}),
    (
        "secret not UTF-8",
        {"auth": ChapCredentials("zebra-user", Secret(SECRET.encode() + b"\xff"))},
    ),
    ("same secret both ways", {"auth": OURS, "target_auth": ChapCredentials("t", Secret(SECRET))}),
    ("mutual without ours", {"target_auth": THEIRS}),
    ("password in extra", {"auth": OURS, "extra": {"auth_password": SECRET}}),
]


# Regression: a non-UTF-8 secret once raised inside ``except UnicodeDecodeError``, so the
# error's __context__ carried the secret bytes.
@pytest.mark.parametrize(("name", "kwargs"), BUILD_ERRORS, ids=[name for name, _ in BUILD_ERRORS])
def test_build_connection_info_errors_never_show_a_secret(
    sink: Sink, name: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ConnectionInfoError) as raised:
        build_connection_info(["192.0.2.1"], IQN, 0, **kwargs)  # type: ignore[arg-type]
    sink.add_exception(name, raised.value)
    sink.assert_clean()


def test_a_secret_that_is_not_text_is_refused_without_showing_it(sink: Sink) -> None:
    # Regression: this once raised a builtin UnicodeEncodeError holding the whole secret.
    with pytest.raises(LocalProtocolError) as raised:
        ChapCredentials("zebra-user", Secret(SECRET + "\ud800"))
    sink.add_exception("lone surrogate", raised.value)
    sink.assert_clean()


def _planted_passwords(text: str) -> set[str]:
    """The password values written in a corpus file (strings and bare numbers)."""
    found = re.findall(r'password[a-z_]*"\s*:\s*\[?\s*"?([^"\\\s,\]\}]+)', text)
    return {value for value in found if len(value) >= 6}


def test_bad_corpus_through_the_cli_never_shows_a_password(sink: Sink) -> None:
    files = sorted(path for path in BAD_CORPUS.glob("*.json") if path.name != "expected.json")
    planted: set[str] = set()
    for path in files:
        passwords = _planted_passwords(path.read_text(encoding="utf-8", errors="replace"))
        planted |= passwords
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.run(["-vv", "probe", "-c", str(path)], stdout=stdout, stderr=stderr)
        assert code == 2, (path.name, stderr.getvalue())
        shown = stdout.getvalue() + stderr.getvalue()
        shown += "\n".join(text for _, text in sink.texts)
        for password in passwords:
            assert password not in shown, (path.name, password)
    assert len(planted) >= 2, "the corpus should plant passwords to look for"


# --------------------------------------------------------------------------------------------
# The command line


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, so the CLI shows its live progress."""

    def isatty(self) -> bool:
        return True


@dataclasses.dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


async def run_cli(sink: Sink, argv: list[str], *, stdin: str = "", terminal: bool = False) -> Ran:
    """``cli.run`` in a worker thread (it runs its own trio loop), output kept for the search."""
    stdout = Terminal() if terminal else io.StringIO()
    stderr = io.StringIO()
    call = functools.partial(cli.run, argv, stdout=stdout, stderr=stderr, stdin=io.StringIO(stdin))
    code = await trio.to_thread.run_sync(call)
    ran = Ran(code, stdout.getvalue(), stderr.getvalue())
    where = " ".join(argv[:3])
    sink.add(f"stdout of {where}", ran.stdout)
    sink.add(f"stderr of {where}", ran.stderr)
    if "--json" in argv and ran.stdout:
        sink.add(f"JSON of {where}", json.dumps(json.loads(ran.stdout)))
    assert "Traceback" not in ran.stderr, ran.stderr
    return ran


async def test_cli_never_shows_a_secret(
    sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_file = tmp_path / "chap-secret"
    secret_file.write_text(SECRET + "\n")
    target_secret_file = tmp_path / "target-chap-secret"
    target_secret_file.write_text(TARGET_SECRET)
    discovery_file = tmp_path / "discovery-secret"
    discovery_file.write_text(DISCOVERY_SECRET)
    wrong_file = tmp_path / "wrong-secret"
    wrong_file.write_text(WRONG_SECRET)
    dev_root = tmp_path / "by-path"
    dev_root.mkdir()
    iscsiadm_log = tmp_path / "iscsiadm.log"
    monkeypatch.setenv("FAKE_ISCSIADM_LOG", str(iscsiadm_log))
    monkeypatch.setenv("FAKE_ISCSIADM_ECHO", "1")  # it echoes its argv, secret included
    monkeypatch.delenv("FAKE_ISCSIADM_STATE", raising=False)
    monkeypatch.delenv("FAKE_ISCSIADM_EXIT", raising=False)
    name = ["--initiator-name", INITIATOR]
    deadlines = ["--connect-timeout", str(CONNECT_TIMEOUT), "--login-timeout", str(LOGIN_TIMEOUT)]
    mutual = ["--chap-user", OURS.username, "--chap-secret-file", str(secret_file)]
    mutual += ["--target-chap-user", THEIRS.username]
    mutual += ["--target-chap-secret-file", str(target_secret_file)]

    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(target_config()) as running:
            good = str(running.portal("good"))
            everything = tmp_path / "everything.json"
            everything.write_text(json.dumps(connection_data(running, [*FAULTS, "good"])))
            short_data = connection_data(running, ["refuse", "reset-mid-login", "good"])
            short = tmp_path / "short.json"
            short.write_text(json.dumps(short_data))
            good_only = tmp_path / "good.json"
            good_only.write_text(json.dumps(connection_data(running, ["good"])))

            # probe: JSON under every policy, a table, live progress, stdin, argv credentials.
            for policy in Policy:
                ran = await run_cli(
                    sink,
                    [
                        *["-vv", "probe", "-c", str(everything), "--json", "--all"],
                        *["--policy", policy.value, "--stagger", "0.05", *deadlines, *name],
                    ],
                )
                assert ran.code == 0, ran.stderr
                assert json.loads(ran.stdout)["chosen"] is not None
            ran = await run_cli(sink, ["-vv", "probe", "-c", str(everything), *deadlines, *name])
            assert ran.code == 0 and "chosen:" in ran.stdout
            ran = await run_cli(
                sink, ["-vv", "probe", "-c", str(short), *deadlines, *name], terminal=True
            )
            assert ran.code == 0 and "probing..." in ran.stdout
            ran = await run_cli(
                sink, ["-vv", "probe", "-c", "-", "--json", *name], stdin=short.read_text()
            )
            assert ran.code == 0
            ran = await run_cli(
                sink, ["-vv", "probe", "--portal", good, "--iqn", IQN, *mutual, *name]
            )
            assert ran.code == 0
            # login: success, table and JSON; a wrong secret; every fault.
            for extra in ([], ["--json"]):
                ran = await run_cli(sink, ["-vv", "login", good, IQN, *mutual, *name, *extra])
                assert ran.code == 0 and "ok" in ran.stdout
            monkeypatch.setenv("PYISCSI_CHAP_SECRET", SECRET)
            ran = await run_cli(
                sink, ["-vv", "login", good, ONE_WAY_IQN, "--chap-user", OURS.username, *name]
            )
            assert ran.code == 0, ran.stderr
            monkeypatch.delenv("PYISCSI_CHAP_SECRET")
            wrong = ["--chap-user", OURS.username, "--chap-secret-file", str(wrong_file)]
            ran = await run_cli(sink, ["-vv", "login", good, ONE_WAY_IQN, *wrong, *name])
            assert ran.code == 1 and "authentication failure" in ran.stderr
            for spelling in FAULTS:
                portal = str(running.portal(spelling))
                ran = await run_cli(
                    sink, ["-vv", "login", portal, IQN, *mutual, *name, *deadlines, "--json"]
                )
                assert ran.code in (0, 1), (spelling, ran.stderr)
            # discover: mutual discovery CHAP from the file, and from argv.
            ran = await run_cli(sink, ["-vv", "discover", "-c", str(good_only), "--json", *name])
            assert ran.code == 0, ran.stderr
            disc = ["--chap-user", DISCOVERY.username, "--chap-secret-file", str(discovery_file)]
            ran = await run_cli(sink, ["-vv", "discover", good, *disc, *name])
            assert ran.code == 0 and IQN in ran.stdout
            # attach --dry-run: the commands, secrets masked.
            fake = ["--iscsiadm", str(FAKE_ISCSIADM)]
            for extra in ([], ["--json"]):
                ran = await run_cli(
                    sink, ["-vv", "attach", "-c", str(short), "--dry-run", *fake, *name, *extra]
                )
                assert ran.code == 0, ran.stderr
                assert "node.session.auth.password -v ***" in ran.stdout
                assert "node.session.auth.password_in -v ***" in ran.stdout
            assert not iscsiadm_log.exists(), "a dry run ran iscsiadm"
            # A real attach with the fake iscsiadm, which echoes every argv on stderr...
            info = parse_connection_info(short_data)
            node = NodeTarget(portal=info.candidates[2].portal, iqn=IQN, lun=0)
            monkeypatch.setenv("FAKE_ISCSIADM_DEVICE", str(dev_root / by_path_name(node)))
            ledger = ["--state-file", str(tmp_path / "ledger.json")]
            attach = [
                "-vv",
                "attach",
                "-c",
                str(short),
                *fake,
                "--dev-root",
                str(dev_root),
                *ledger,
            ]
            ran = await run_cli(sink, [*attach, *name, "--json"])
            assert ran.code == 0, ran.stderr
            # ...and one that fails on the password update: the error quotes its stderr.
            monkeypatch.setenv("FAKE_ISCSIADM_EXIT", json.dumps({"update": 8}))
            monkeypatch.setenv("FAKE_ISCSIADM_DEVICE", str(tmp_path / "never"))
            ran = await run_cli(sink, [*attach, *name])
            assert ran.code == 1 and "exit 8" in ran.stderr, ran.stderr
            monkeypatch.delenv("FAKE_ISCSIADM_EXIT")
            detach = ["-vv", "detach", "-c", str(good_only), *fake, *ledger, "--json"]
            ran = await run_cli(sink, detach)
            assert ran.code == 0, ran.stderr
            await running.wait_idle()
            add_target_state(sink, running)

    # The secrets did reach iscsiadm's argv (the fake logs their SHA-256, never the text).
    log = iscsiadm_log.read_text()
    assert hashed(SECRET) in log and hashed(TARGET_SECRET) in log
    assert sink.records > 100
    assert any(where.startswith("log record") and "DEBUG" in text for where, text in sink.texts)
    sink.assert_clean()


def hashed(secret: str) -> str:
    """How the fake iscsiadm logs a password it was given."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()
