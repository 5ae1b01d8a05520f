"""iSCSI name validation and portal parsing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.errors import InvalidName, InvalidPortal, ISCSIError
from pyiscsi_failover.names import DEFAULT_PORT, MAX_NAME_LENGTH, Portal, validate_iscsi_name

# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("iqn.2001-04.com.example", "iqn.2001-04.com.example"),
        ("iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",) * 2,
        ("iqn.2004-10.com.ubuntu:01:c0ffee42", "iqn.2004-10.com.ubuntu:01:c0ffee42"),
        ("iqn.2010-10.org.openstack:volume-1b2c", "iqn.2010-10.org.openstack:volume-1b2c"),
        ("iqn.1992-08.com.netapp:sn.1234:vs.3", "iqn.1992-08.com.netapp:sn.1234:vs.3"),
        ("IQN.2001-04.COM.Example:Disk1", "iqn.2001-04.com.example:disk1"),
        (
            "iqn.2003-01.org.linux-iscsi.host.x8664:sn.abc",
            "iqn.2003-01.org.linux-iscsi.host.x8664:sn.abc",
        ),
        ("eui.02004567A425678D", "eui.02004567a425678d"),
        ("naa.52004567BA64678D", "naa.52004567ba64678d"),
        ("naa.62004567BA64678D0123456789ABCDEF", "naa.62004567ba64678d0123456789abcdef"),
    ],
)
def test_valid_names_are_normalised(name: str, normalised: str) -> None:
    assert validate_iscsi_name(name) == normalised
    # Normalising is idempotent.
    assert validate_iscsi_name(normalised) == normalised


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("iqn", "start with"),
        ("target0", "start with"),
        ("iqn.2001-04", "iqn.YYYY-MM"),
        ("iqn.01-04.com.example", "iqn.YYYY-MM"),
        ("iqn.2001-4.com.example", "iqn.YYYY-MM"),
        ("iqn.2001-13.com.example", "month 13"),
        ("iqn.2001-00.com.example", "month 00"),
        ("iqn.2001-04.", "naming authority"),
        ("iqn.2001-04.:disk", "naming authority"),
        ("iqn.2001-04.com..example", "naming authority"),
        ("iqn.2001-04.com.-example", "naming authority"),
        ("iqn.2001-04.com.example:", "nothing follows"),
        ("iqn.2001-04.com.example:disk_1", "'_'"),
        ("iqn.2001-04.com.example:disk 1", "' '"),
        (" iqn.2001-04.com.example", "' '"),
        ("iqn.2001-04.com.exämple", "ASCII"),
        ("eui.02004567A425678", "16 hex"),
        ("eui.02004567A425678DD", "16 hex"),
        ("eui.02004567A425678G", "16 hex"),
        ("naa.52004567BA64678D01", "16 or 32"),
        ("naa.", "16 or 32"),
    ],
)
def test_invalid_names_say_what_is_wrong(name: str, problem: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_iscsi_name(name)
    assert problem in str(info.value)
    assert repr(name[:80]) in str(info.value)
    assert info.value.name == name
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ISCSIError)


def test_name_length_limit_is_223_bytes() -> None:
    prefix = "iqn.2001-04.com.example:"
    longest = prefix + "a" * (MAX_NAME_LENGTH - len(prefix))
    assert len(longest) == 223
    assert validate_iscsi_name(longest) == longest
    with pytest.raises(InvalidName, match="224 bytes"):
        validate_iscsi_name(longest + "a")


def test_name_must_be_a_string() -> None:
    with pytest.raises(InvalidName, match="not bytes"):
        validate_iscsi_name(b"iqn.2001-04.com.example")  # type: ignore[arg-type]


def test_huge_name_message_is_cut_short() -> None:
    with pytest.raises(InvalidName) as info:
        validate_iscsi_name("x" * 10_000)
    assert len(str(info.value)) < 300


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text_is_a_valid_name_or_invalid_name(text: str) -> None:
    try:
        normalised = validate_iscsi_name(text)
    except InvalidName:
        return
    assert normalised == text.lower()
    assert validate_iscsi_name(normalised) == normalised


@settings(max_examples=200)
@given(
    year=st.integers(1000, 9999),
    month=st.integers(1, 12),
    labels=st.lists(
        st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True),
        min_size=1,
        max_size=4,
    ),
    unique=st.none() | st.from_regex(r"[a-zA-Z0-9.:-]{1,40}", fullmatch=True),
)
def test_generated_iqns_validate(
    year: int, month: int, labels: list[str], unique: str | None
) -> None:
    name = f"iqn.{year:04d}-{month:02d}.{'.'.join(labels)}"
    if unique is not None:
        name += ":" + unique
    assert validate_iscsi_name(name) == name.lower()


# --- portals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", Portal(host="10.0.0.1")),
        ("10.0.0.1:3261", Portal(host="10.0.0.1", port=3261)),
        ("10.0.0.1:3260,1", Portal(host="10.0.0.1", port=3260, tpgt=1)),
        ("10.0.0.1,7", Portal(host="10.0.0.1", tpgt=7)),
        ("10.0.0.1:03260", Portal(host="10.0.0.1")),
        ("storage.example.com", Portal(host="storage.example.com")),
        ("Storage.Example.COM:860", Portal(host="storage.example.com", port=860)),
        ("san_a-1:3260,0", Portal(host="san_a-1", tpgt=0)),
        ("localhost", Portal(host="localhost")),
        ("[::1]", Portal(host="::1")),
        ("[::1]:3261", Portal(host="::1", port=3261)),
        ("[fd00::1]:3260,65535", Portal(host="fd00::1", tpgt=65535)),
        ("[FD00:0:0::1],2", Portal(host="fd00::1", tpgt=2)),
        ("[fe80::1%eth0]:3260", Portal(host="fe80::1%eth0")),
        # Bare IPv6: the whole thing is the address, never address + port.
        ("fd00::1", Portal(host="fd00::1")),
        ("fd00::1:3260", Portal(host="fd00::1:3260")),
        ("::1,1", Portal(host="::1", tpgt=1)),
        ("[::ffff:10.0.0.1]:3260", Portal(host="::ffff:a00:1")),
    ],
)
def test_parse_valid_portals(text: str, expected: Portal) -> None:
    assert Portal.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "host is empty"),
        (":3260", "host is empty"),
        ("[]:3260", "host is empty"),
        ("10.0.0.1:", "port ''"),
        ("10.0.0.1:0", "port '0'"),
        ("10.0.0.1:65536", "port '65536'"),
        ("10.0.0.1:+80", "port '+80'"),
        ("10.0.0.1:3_260", "port '3_260'"),
        ("10.0.0.1:\u0663\u0662\u0666\u0660", "port"),
        ("10.0.0.1:3260,", "tpgt ''"),
        ("10.0.0.1:3260,-1", "tpgt '-1'"),
        ("10.0.0.1:3260,65536", "tpgt '65536'"),
        ("10.0.0.1:3260,1,2", "tpgt '1,2'"),
        ("10.0.0.256", "not a valid IPv4"),
        ("10.0.0", "not a valid IPv4"),
        ("010.0.0.1", "not a valid IPv4"),
        ("host name", "characters"),
        (" 10.0.0.1", "characters"),
        ("example.com.", "not a valid host name"),
        ("-bad.example.com", "not a valid host name"),
        ("bad..example", "not a valid host name"),
        ("[fd00::1", "without a closing"),
        ("[fd00::1]3260", "after ']'"),
        ("[10.0.0.1]:3260", "not a valid IPv6"),
        ("[fd00::1]:", "port ''"),
        ("fd00::g", "not a valid IPv6"),
        ("fd00:::1", "not a valid IPv6"),
        ("h\u00f6st:3260", "characters"),
    ],
)
def test_parse_invalid_portals(text: str, problem: str) -> None:
    with pytest.raises(InvalidPortal) as info:
        Portal.parse(text)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)
    assert info.value.text == text
    assert isinstance(info.value, ValueError)


def test_default_port() -> None:
    assert DEFAULT_PORT == 3260
    assert Portal.parse("10.0.0.1", default_port=860).port == 860
    assert Portal.parse("10.0.0.1:3261", default_port=860).port == 3261
    assert Portal.parse("[::1]", default_port=860).port == 860
    with pytest.raises(InvalidPortal, match="default_port"):
        Portal.parse("10.0.0.1", default_port=0)


def test_str_and_with_tpgt() -> None:
    v4 = Portal(host="10.0.0.1", tpgt=1)
    assert str(v4) == "10.0.0.1:3260"
    assert v4.with_tpgt() == "10.0.0.1:3260,1"
    v6 = Portal(host="fd00::1", port=3261, tpgt=0)
    assert str(v6) == "[fd00::1]:3261"
    assert v6.with_tpgt() == "[fd00::1]:3261,0"
    # Without a known tag, with_tpgt is just host:port (what iscsiadm -p accepts).
    assert Portal(host="fd00::1").with_tpgt() == "[fd00::1]:3260"


def test_address_and_is_ipv6() -> None:
    assert Portal.parse("[fd00::1]:3261").address == ("fd00::1", 3261)
    assert Portal.parse("[fd00::1]:3261").is_ipv6
    assert Portal.parse("10.0.0.1").address == ("10.0.0.1", 3260)
    assert not Portal.parse("10.0.0.1").is_ipv6
    assert not Portal.parse("example.com").is_ipv6


def test_constructor_normalises_and_validates() -> None:
    assert Portal(host="FD00:0::1") == Portal(host="fd00::1")
    assert Portal(host="Example.COM").host == "example.com"
    assert hash(Portal(host="FD00::1")) == hash(Portal(host="fd00::1"))
    for kwargs, problem in [
        ({"host": "[::1]"}, "characters"),
        ({"host": ""}, "host is empty"),
        ({"host": "10.0.0.1", "port": 0}, "port"),
        ({"host": "10.0.0.1", "port": True}, "port"),
        ({"host": "10.0.0.1", "port": "3260"}, "port"),
        ({"host": "10.0.0.1", "tpgt": 65536}, "tpgt"),
        ({"host": "10.0.0.1", "tpgt": -1}, "tpgt"),
        ({"host": 10}, "str"),
    ]:
        with pytest.raises(InvalidPortal, match=problem):
            Portal(**kwargs)  # type: ignore[arg-type]


def test_portal_is_frozen() -> None:
    portal = Portal(host="10.0.0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        portal.port = 1  # type: ignore[misc]


_hostnames = st.lists(
    st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,10}[a-zA-Z0-9_])?", fullmatch=True),
    min_size=1,
    max_size=4,
).filter(lambda labels: not all(label.isdigit() for label in labels))
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    _hostnames.map(".".join),
)
_portals = st.builds(
    Portal,
    host=_hosts,
    port=st.integers(1, 65535),
    tpgt=st.none() | st.integers(0, 65535),
)


@settings(max_examples=300)
@given(_portals)
def test_portal_round_trips(portal: Portal) -> None:
    assert Portal.parse(portal.with_tpgt()) == portal
    assert Portal.parse(str(portal)) == dataclasses.replace(portal, tpgt=None)
    assert str(Portal.parse(str(portal))) == str(portal)


@settings(max_examples=300)
@given(
    st.text(max_size=60)
    | st.from_regex(r"\[?[0-9a-fA-F:.%]{0,40}\]?(:[0-9]{0,6})?(,[0-9-]{0,6})?", fullmatch=True)
)
def test_any_text_parses_or_raises_invalid_portal(text: str) -> None:
    try:
        portal = Portal.parse(text)
    except InvalidPortal as exc:
        error = exc
    else:
        # Whatever parsed must print back to something that parses to the same portal.
        assert Portal.parse(portal.with_tpgt()) == portal
        return
    assert error.text == text


def test_portal_text_must_be_a_string() -> None:
    with pytest.raises(InvalidPortal, match="not bytes"):
        Portal.parse(b"10.0.0.1")  # type: ignore[arg-type]
