"""Redirects under a budget and a policy, against our own test target on loopback.

A candidate's deadlines are one budget, ``connect_timeout + login_timeout``, across every
redirect hop: a chain of slow redirects, a chain that ends in silence, or a loop between two
addresses ends within that budget plus scheduling slack, under every probing policy, and the
good alternative is still chosen. The redirect policy (``never``, allowed networks, a maximum
count) refuses before anything is sent to the refused address: the refused portal never sees a
connection.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import pytest
import trio

from pyiscsi_failover.connection_info import ConnectionInfo, build_connection_info
from pyiscsi_failover.connection_info import parse_connection_info as parse_info
from pyiscsi_failover.errors import LocalProtocolError, RedirectLoopError, RedirectRefused
from pyiscsi_failover.initiator import LoginConfig, LoginSucceeded
from pyiscsi_failover.names import Portal
from pyiscsi_failover.prober import Outcome, Policy, ProbeOptions, ProbeResult, probe
from pyiscsi_failover.testing import (
    DelayPDUs,
    Fault,
    PortalConfig,
    Redirect,
    RunningTarget,
    Silent,
    TargetConfig,
    TargetSpec,
    serve_target,
)
from pyiscsi_failover.transport import (
    IPNetwork,
    RedirectMode,
    RedirectPolicy,
    login,
    parse_network,
)

HOST = "127.0.0.1"
#: Another loopback address, so that allow lists can tell the two apart.
OTHER_HOST = "127.0.0.2"
IQN = "iqn.2026-12.test.pyiscsi:redirects"
INITIATOR = "iqn.2026-12.test.pyiscsi:redirect-prober"
CONNECT_TIMEOUT = 0.3
LOGIN_TIMEOUT = 0.5
BUDGET = CONNECT_TIMEOUT + LOGIN_TIMEOUT
#: Scheduling allowance (a loaded machine, coverage tracing); far below what a restarted
#: deadline per hop would add (each case below would take at least 0.5 s longer).
SLACK = 0.3
TEST_DEADLINE = 15.0
GOOD = "good"


def nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(cidr) for cidr in cidrs)


def hop(index: int) -> str:
    return f"hop{index}"


@dataclass(frozen=True)
class Chain:
    """Portals ``hop0`` .. ``hopN-1``, each with its faults; ``hop0`` is the candidate."""

    id: str
    hops: tuple[tuple[Fault, ...], ...]
    outcome: Outcome
    detail: str
    #: The least the attempt can take (the delays it must sit through before failing).
    least: float
    #: What the attempt would take if each hop restarted the deadlines (for the docstring's
    #: claim that the bound below really tests the budget).
    without_budget: float


def redirect_to(index: int) -> Redirect:
    return Redirect(to=hop(index))


CHAINS = [
    Chain(
        "slow-chain",
        # Five redirects of 0.3 s each: under a per-hop deadline this takes 2 s.
        (*((DelayPDUs(seconds=0.3), redirect_to(i + 1)) for i in range(5)), (Silent(),)),
        Outcome.TIMEOUT,
        r"within the candidate's 0\.8 s budget \(2 redirects from",
        BUDGET,
        5 * 0.3 + LOGIN_TIMEOUT,
    ),
    Chain(
        "silent-end",
        ((DelayPDUs(seconds=0.35), redirect_to(1)), (Silent(),)),
        Outcome.TIMEOUT,
        r"did not finish within the candidate's 0\.8 s budget \(1 redirect from",
        BUDGET,
        0.35 + LOGIN_TIMEOUT,
    ),
    Chain(
        "loop-of-two",
        ((redirect_to(1),), (redirect_to(0),)),
        Outcome.REDIRECT_LOOP,
        r"redirect loop: .* -> .* -> ",
        0.0,
        0.0,
    ),
]


def chain_config(chain: Chain) -> TargetConfig:
    portals = [
        PortalConfig(host=HOST, port=0, name=hop(i), faults=faults)
        for i, faults in enumerate(chain.hops)
    ]
    portals.append(PortalConfig(host=HOST, port=0, name=GOOD))
    return TargetConfig(portals=tuple(portals), targets=(TargetSpec(name=IQN),))


def info_for(running: RunningTarget, *names: str) -> ConnectionInfo:
    portals = [str(running.portal(name)) for name in names]
    return parse_info(build_connection_info(portals, IQN, 0))


def describe(result: ProbeResult) -> str:
    return "; ".join(
        f"#{a.candidate.index} {a.outcome.value} at {a.started_at or 0:.3f}+{a.elapsed_s:.3f}s"
        f" ({a.detail})"
        for a in result.attempts
    )


@pytest.mark.parametrize("policy", list(Policy), ids=[p.value for p in Policy])
@pytest.mark.parametrize("chain", CHAINS, ids=[c.id for c in CHAINS])
async def test_a_redirect_chain_ends_within_one_budget(chain: Chain, policy: Policy) -> None:
    options = ProbeOptions(
        policy=policy,
        connect_timeout=CONNECT_TIMEOUT,
        login_timeout=LOGIN_TIMEOUT,
        stagger=10.0,  # so staggered waits for the chain to fail before it starts the next
        initiator_name=INITIATOR,
    )
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(chain_config(chain)) as running:
            result = await probe(info_for(running, hop(0), GOOD), options)
            await running.wait_idle()
    chained, good = result.attempts
    assert chained.outcome is chain.outcome, describe(result)
    assert re.search(chain.detail, chained.detail), describe(result)
    assert chain.least - 1e-3 <= chained.elapsed_s <= chain.least + SLACK, describe(result)
    assert chained.elapsed_s < chain.without_budget or chain.without_budget == 0.0
    assert result.chosen is good, describe(result)
    assert not running.violations, running.violations
    assert not running.lingering_sessions


def pair_config(*, to: str, other_host: str = OTHER_HOST) -> TargetConfig:
    """``entry`` redirects to ``to`` (a portal name or an address); ``other`` serves."""
    return TargetConfig(
        portals=(
            PortalConfig(host=HOST, port=0, name="entry", faults=(Redirect(to=to),)),
            PortalConfig(host=other_host, port=0, name="other"),
        ),
        targets=(TargetSpec(name=IQN),),
    )


async def login_with(running: RunningTarget, policy: RedirectPolicy) -> LoginSucceeded:
    report = await login(
        running.portal("entry"),
        LoginConfig(initiator_name=INITIATOR, target_name=IQN),
        connect_timeout=1.0,
        login_timeout=1.0,
        redirect_policy=policy,
    )
    assert isinstance(report.outcome, LoginSucceeded)
    assert report.final_portal == running.portal("other")
    return report.outcome


def connections_to(running: RunningTarget, name: str) -> int:
    return sum(1 for c in running.connections if c.portal_name == name)


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        (RedirectPolicy(mode=RedirectMode.NEVER), r"redirects are not followed"),
        (
            RedirectPolicy(allow=nets("127.0.0.1/32")),
            r"not in the allowed networks 127\.0\.0\.1/32",
        ),
        (RedirectPolicy(allow=nets("10.0.0.0/8", "::1/128")), r"not in the allowed networks 10\."),
    ],
    ids=["never", "outside-v4", "other-networks"],
)
async def test_a_refused_redirect_sends_nothing_there(policy: RedirectPolicy, reason: str) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(pair_config(to="other")) as running:
            with pytest.raises(RedirectRefused, match=reason) as caught:
                await login_with(running, policy)
            await running.wait_idle()
    assert caught.value.address == str(running.portal("other"))
    assert connections_to(running, "entry") == 1
    assert connections_to(running, "other") == 0


@pytest.mark.parametrize(
    "allow", [(), ("127.0.0.0/8",), ("127.0.0.2",), ("10.0.0.0/8", "127.0.0.2/31")]
)
async def test_an_allowed_redirect_is_followed(allow: tuple[str, ...]) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(pair_config(to="other")) as running:
            await login_with(running, RedirectPolicy(allow=nets(*allow)))
            await running.wait_idle()
    assert connections_to(running, "other") == 1


def free_port(host: str) -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind((host, 0))
        port: int = probe_socket.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("allow", "follows"),
    [
        (("127.0.0.0/8", "::1/128"), True),
        (("127.0.0.1/32",), "unless-v6"),
        (("127.0.0.2/32",), False),
    ],
    ids=["all-its-addresses", "v4-only", "none-of-them"],
)
async def test_a_host_name_must_resolve_only_to_allowed_addresses(
    allow: tuple[str, ...], follows: bool | str
) -> None:
    """``localhost`` resolves to 127.0.0.1, and on many hosts to ::1 as well: every address it
    resolves to must be allowed, and a refusal comes before any connection to it."""
    port = free_port(HOST)
    resolved = {info[4][0] for info in socket.getaddrinfo("localhost", port)}
    if follows == "unless-v6":
        follows = resolved <= {"127.0.0.1"}
    config = TargetConfig(
        portals=(
            PortalConfig(
                host=HOST, port=0, name="entry", faults=(Redirect(to=f"localhost:{port}"),)
            ),
            PortalConfig(host=HOST, port=port, name="other"),
        ),
        targets=(TargetSpec(name=IQN),),
    )
    policy = RedirectPolicy(allow=nets(*allow))
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(config) as running:
            if follows:
                report = await login(
                    running.portal("entry"),
                    LoginConfig(initiator_name=INITIATOR, target_name=IQN),
                    redirect_policy=policy,
                )
                assert isinstance(report.outcome, LoginSucceeded)
                assert report.final_portal == Portal(host="localhost", port=port)
            else:
                with pytest.raises(RedirectRefused, match=r"localhost:\d+ \(.*\) refused"):
                    await login_with(running, policy)
            await running.wait_idle()
    assert connections_to(running, "other") == (1 if follows else 0)


async def test_max_redirects_bounds_the_chain() -> None:
    config = TargetConfig(
        portals=tuple(
            PortalConfig(
                host=HOST, port=0, name=hop(i), faults=(redirect_to(i + 1),) if i < 3 else ()
            )
            for i in range(4)
        ),
        targets=(TargetSpec(name=IQN),),
    )
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(config) as running:
            config_ = LoginConfig(initiator_name=INITIATOR, target_name=IQN)
            with pytest.raises(RedirectLoopError, match="more than 2 redirects"):
                await login(
                    running.portal(hop(0)), config_, redirect_policy=RedirectPolicy(max_redirects=2)
                )
            report = await login(
                running.portal(hop(0)), config_, redirect_policy=RedirectPolicy(max_redirects=3)
            )
            await running.wait_idle()
    assert report.final_portal == running.portal(hop(3))
    assert len(report.redirects) == 3
    assert connections_to(running, hop(3)) == 1  # only the allowed chain got there


@pytest.mark.parametrize("address", ["0.0.0.0:3260", "[::]:3260", "224.0.0.1:3260"])
async def test_no_allow_list_still_refuses_addresses_no_target_has(address: str) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(pair_config(to=address)) as running:
            with pytest.raises(RedirectRefused, match=r"(unspecified|multicast) address"):
                await login_with(running, RedirectPolicy())
            await running.wait_idle()


async def test_the_prober_reports_a_refused_redirect_and_chooses_the_next() -> None:
    options = ProbeOptions(
        redirects=RedirectMode.NEVER,
        connect_timeout=1.0,
        login_timeout=1.0,
        initiator_name=INITIATOR,
    )
    with trio.fail_after(TEST_DEADLINE):
        async with serve_target(pair_config(to="other")) as running:
            result = await probe(info_for(running, "entry", "other"), options)
            await running.wait_idle()
    refused, other = result.attempts
    assert refused.outcome is Outcome.REDIRECT_REFUSED
    assert refused.redirect_refused == str(running.portal("other"))
    assert refused.to_json()["redirect_refused"] == str(running.portal("other"))
    assert refused.handoff_portal is None
    assert result.chosen is other
    assert connections_to(running, "other") == 1  # the alternative's own login only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"redirects": "sometimes"}, "'follow' or 'never'"),
        ({"redirect_allow": ("10.0.0.300/8",)}, "not an IP network in CIDR form"),
        ({"redirect_allow": ("",)}, "not an IP network"),
        ({"max_redirects": -1}, "max_redirects must be an integer 0..64"),
        ({"max_redirects": True}, "max_redirects"),
    ],
)
def test_bad_redirect_options_are_local_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=re.escape(message)):
        ProbeOptions(**kwargs)  # type: ignore[arg-type]


def test_probe_options_normalise_redirect_settings() -> None:
    options = ProbeOptions(redirects="never", redirect_allow=("10.1.2.3/8",))  # type: ignore[arg-type]
    assert options.redirects is RedirectMode.NEVER
    assert [str(n) for n in options.redirect_allow] == ["10.0.0.0/8"]
    assert options.redirect_policy.mode is RedirectMode.NEVER
