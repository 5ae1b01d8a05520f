"""Tests for key=value text: encoding, decoding, reassembly and value codecs (RFC 7143 6.1)."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyiscsi_failover.errors import LocalProtocolError, TextError
from pyiscsi_failover.protocol.text import (
    IRRELEVANT,
    NOT_UNDERSTOOD,
    REJECT,
    TextReassembler,
    decode_keys,
    decode_text,
    encode_text,
    format_binary,
    format_boolean,
    parse_binary,
    parse_boolean,
    parse_number,
)

# -- strategies ------------------------------------------------------------------------------

keys = st.from_regex(r"\A(X#)?[A-Za-z0-9.+@_-]{1,61}\Z")
values = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=255).filter(
    lambda value: len(value.encode()) <= 255
)
pair_lists = st.lists(st.tuples(keys, values), max_size=12)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


# -- encode/decode ---------------------------------------------------------------------------


def test_special_answers_are_the_rfc_constants() -> None:
    assert (NOT_UNDERSTOOD, IRRELEVANT, REJECT) == ("NotUnderstood", "Irrelevant", "Reject")


def test_each_pair_is_nul_terminated() -> None:
    data = encode_text([("InitiatorName", "iqn.2024-01.org.example:a"), ("SendTargets", "")])
    assert data == b"InitiatorName=iqn.2024-01.org.example:a\x00SendTargets=\x00"


@settings(max_examples=200)
@given(pair_lists)
def test_round_trip_keeps_order_and_repeats(pairs: list[tuple[str, str]]) -> None:
    assert decode_text(encode_text(pairs)) == pairs


@settings(max_examples=100)
@given(st.dictionaries(keys, values, max_size=12))
def test_decode_keys_round_trip(keys_and_values: dict[str, str]) -> None:
    assert decode_keys(encode_text(keys_and_values.items())) == keys_and_values


def test_sendtargets_answer_keeps_repeated_keys_in_order() -> None:
    data = (
        b"TargetName=iqn.2024-01.org.example:one\x00TargetAddress=10.0.0.1:3260,1\x00"
        b"TargetAddress=[fd00::1]:3260,1\x00TargetName=iqn.2024-01.org.example:two\x00"
    )
    assert decode_text(data) == [
        ("TargetName", "iqn.2024-01.org.example:one"),
        ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetAddress", "[fd00::1]:3260,1"),
        ("TargetName", "iqn.2024-01.org.example:two"),
    ]


def test_value_may_contain_equals_sign() -> None:
    assert decode_text(b"X-com.example.opt=a=b\x00") == [("X-com.example.opt", "a=b")]


@pytest.mark.parametrize(
    "data",
    [b"\x00A=1\x00B=2\x00", b"A=1\x00\x00\x00B=2\x00", b"A=1\x00B=2\x00\x00\x00\x00"],
)
def test_extra_nuls_are_tolerated(data: bytes) -> None:
    assert decode_text(data) == [("A", "1"), ("B", "2")]


def test_empty_and_all_nul_data_hold_no_pairs() -> None:
    assert decode_text(b"") == []
    assert decode_text(b"\x00\x00\x00\x00") == []


def test_longest_key_and_value_are_accepted() -> None:
    key, value = "K" * 63, "v" * 255
    assert decode_text(encode_text([(key, value)])) == [(key, value)]


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        (b"HeaderDigest=\xffNone\x00", "HeaderDigest", "UTF-8"),
        (b"HeaderDigestNone\x00", "HeaderDigestNone", "'='"),
        (b"=None\x00", "", "empty key"),
        (b"K" * 64 + b"=1\x00", "K" * 64, "64 bytes"),
        (b"Bad Key=1\x00", "Bad Key", "characters"),
        (b"Cl\xc3\xa9=1\x00", "Cl\xe9", "characters"),
        (b"TargetAlias=" + b"a" * 256 + b"\x00", "TargetAlias", "256 bytes"),
        (b"MaxBurstLength=512\x00DataDigest=None", "DataDigest", "NUL"),
        (b"A=1\x00MaxBurst", "MaxBurst", "NUL"),
        (b"CHAP_N=" + b"n" * 256 + b"\x00", "CHAP_N", "256 bytes"),
        (b"CHAP_C=0x" + b"ab" * 1025 + b"\x00", "CHAP_C", "too long"),
        (b"CHAP_R=0b" + base64.b64encode(bytes(1025)) + b"\x00", "CHAP_R", "1025 binary"),
        (b"CHAP_C=0x" + b"zz" * 200 + b"\x00", "CHAP_C", "non-hex"),
        (b"CHAP_C=" + b"9" * 300 + b"\x00", "CHAP_C", "0x or 0b"),
    ],
)
def test_decode_errors_name_the_key(data: bytes, key: str, fragment: str) -> None:
    with pytest.raises(TextError) as caught:
        decode_text(data)
    assert caught.value.key == key
    assert key in str(caught.value)
    assert fragment in str(caught.value)


def test_framing_errors_give_the_offset() -> None:
    with pytest.raises(TextError, match="offset 8"):
        decode_text(b"A=1\x00B=2\x00Cxx\x00")
    with pytest.raises(TextError, match="offset 4"):
        decode_text(b"A=1\x00B=2")


def test_repeated_key_in_one_round_is_an_error() -> None:
    with pytest.raises(TextError, match="repeated") as caught:
        decode_keys(b"MaxBurstLength=512\x00MaxBurstLength=1024\x00")
    assert caught.value.key == "MaxBurstLength"


@pytest.mark.parametrize(
    "encoded", ["0x" + "ab" * 1024, "0b" + base64.b64encode(bytes(1024)).decode()]
)
@pytest.mark.parametrize("key", ["CHAP_C", "CHAP_R"])
def test_long_chap_binary_values_are_allowed(key: str, encoded: str) -> None:
    data = encode_text([(key, encoded)])
    assert decode_text(data) == [(key, encoded)]
    assert len(parse_binary(key, encoded)) == 1024


def test_binary_values_never_appear_in_messages() -> None:
    secretish = "0x" + "5ec2e7" * 100 + "zz"
    with pytest.raises(TextError) as caught:
        decode_text(f"CHAP_R={secretish}\x00".encode())
    assert "5ec2e7" not in str(caught.value)
    with pytest.raises(TextError) as caught:
        parse_binary("CHAP_R", secretish)
    assert "5ec2e7" not in str(caught.value)


@pytest.mark.parametrize(
    ("pairs", "key"),
    [
        ([("Bad Key", "1")], "Bad Key"),
        ([("", "1")], ""),
        ([("K" * 64, "1")], "K" * 64),
        ([("Clé", "1")], "Clé"),
        ([("TargetAlias", "a\x00b")], "TargetAlias"),
        ([("TargetAlias", "a" * 256)], "TargetAlias"),
        ([("TargetAlias", "\udcff")], "TargetAlias"),
        ([("CHAP_R", "0x" + "ab" * 1025)], "CHAP_R"),
    ],
)
def test_encode_errors_name_the_key(pairs: list[tuple[str, str]], key: str) -> None:
    with pytest.raises(TextError) as caught:
        encode_text(pairs)
    assert caught.value.key == key


# -- totality --------------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.binary(max_size=400))
@example(b"\xff\x00")
@example(b"=\x00")
@example(b"CHAP_C=0b====\x00")
def test_arbitrary_bytes_raise_only_text_error(data: bytes) -> None:
    try:
        pairs = decode_text(data)
    except TextError:
        return
    assert encode_text(pairs) == b"".join(f"{k}={v}\x00".encode() for k, v in pairs)


@settings(max_examples=300)
@given(pair_lists.filter(bool), st.data())
def test_mutated_streams_raise_only_text_error(
    pairs: list[tuple[str, str]], data: st.DataObject
) -> None:
    raw = bytearray(encode_text(pairs))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_text(bytes(raw))
    except TextError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in decoded)


# -- reassembly ------------------------------------------------------------------------------


@settings(max_examples=200)
@given(pair_lists, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_any_split_reassembles_to_the_same_pairs(
    pairs: list[tuple[str, str]], cuts: list[int]
) -> None:
    data = encode_text(pairs)
    segments = _split(data, cuts)
    reassembler = TextReassembler()
    for segment in segments[:-1]:
        assert reassembler.feed(segment, more=True) is None
        assert reassembler.in_progress
    whole = reassembler.feed(segments[-1], more=False)
    assert whole == data
    assert decode_text(whole) == pairs
    assert not reassembler.in_progress


def test_pair_split_inside_key_and_value_comes_out_whole() -> None:
    reassembler = TextReassembler()
    assert reassembler.feed(b"TargetAddress=10.0", more=True) is None
    assert reassembler.feed(b".0.1:3260,1\x00Target", more=True) is None
    whole = reassembler.feed(b"Name=iqn.2024-01.org.example:t\x00", more=False)
    assert whole is not None
    assert decode_text(whole) == [
        ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetName", "iqn.2024-01.org.example:t"),
    ]


def test_reassembly_limit_is_enforced_and_the_buffer_reusable() -> None:
    reassembler = TextReassembler(limit=10)
    assert reassembler.feed(b"A=12345", more=True) is None
    with pytest.raises(TextError, match="10 bytes"):
        reassembler.feed(b"6789\x00", more=True)
    assert not reassembler.in_progress
    assert reassembler.feed(b"A=1\x00", more=False) == b"A=1\x00"
    assert reassembler.feed(b"", more=False) == b""


def test_reassembly_limit_counts_exactly() -> None:
    reassembler = TextReassembler(limit=8)
    assert reassembler.feed(b"A=1\x00", more=True) is None
    assert reassembler.feed(b"B=2\x00", more=False) == b"A=1\x00B=2\x00"
    assert reassembler.feed(b"A=1\x00", more=True) is None
    with pytest.raises(TextError):
        reassembler.feed(b"B=22\x00", more=False)


def test_reset_drops_partial_text() -> None:
    reassembler = TextReassembler()
    reassembler.feed(b"A=", more=True)
    reassembler.reset()
    assert reassembler.feed(b"B=1\x00", more=False) == b"B=1\x00"


def test_reassembler_refuses_a_useless_limit() -> None:
    with pytest.raises(LocalProtocolError):
        TextReassembler(limit=0)


# -- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("0", 0),
        ("8192", 8192),
        ("007", 7),
        ("0x2000", 8192),
        ("0X2000", 8192),
        ("0xfF", 255),
        ("0bIAA=", 8192),
        ("0BIAA", 8192),
        ("18446744073709551615", 2**64 - 1),
    ],
)
def test_parse_number_forms(value: str, number: int) -> None:
    assert parse_number("K", value) == number


@pytest.mark.parametrize(
    "value",
    ["", "-1", "+5", " 5", "5 ", "1_000", "1e3", "\u0661\u0662", "0x", "0xg", "0b", "0b@@", "abc"],
)
def test_parse_number_refuses_garbage(value: str) -> None:
    with pytest.raises(TextError, match="MaxBurstLength") as caught:
        parse_number("MaxBurstLength", value)
    assert caught.value.key == "MaxBurstLength"


def test_parse_number_checks_range() -> None:
    assert parse_number("ErrorRecoveryLevel", "2", low=0, high=2) == 2
    with pytest.raises(TextError, match=r"ErrorRecoveryLevel=3 is outside 0\.\.2"):
        parse_number("ErrorRecoveryLevel", "3", low=0, high=2)
    with pytest.raises(TextError, match="outside"):
        parse_number("MaxBurstLength", "511", low=512)
    with pytest.raises(TextError, match="outside"):
        parse_number("K", str(2**64))


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_parse_number_round_trips_every_form(number: int) -> None:
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    assert parse_number("K", str(number)) == number
    assert parse_number("K", hex(number)) == number
    assert parse_number("K", "0b" + base64.b64encode(raw).decode()) == number


@settings(max_examples=300)
@given(st.text(max_size=40) | st.from_regex(r"\A0[xXbB][0-9A-Za-z+/=]{0,20}\Z"))
def test_parse_number_raises_only_text_error(value: str) -> None:
    try:
        number = parse_number("K", value)
    except TextError as exc:
        error: TextError | None = exc
    else:
        error = None
        assert 0 <= number < 2**64
    assert error is None or error.key == "K"


# -- binary and boolean ----------------------------------------------------------------------


@given(st.binary(min_size=1, max_size=1024))
def test_binary_round_trip(data: bytes) -> None:
    text = format_binary(data)
    assert text == "0x" + data.hex()
    assert parse_binary("CHAP_C", text) == data
    assert parse_binary("CHAP_C", "0B" + base64.b64encode(data).decode()) == data
    assert parse_binary("CHAP_C", "0b" + base64.b64encode(data).decode().rstrip("=")) == data


def test_odd_hex_has_an_implied_leading_zero() -> None:
    assert parse_binary("CHAP_C", "0xabc") == b"\x0a\xbc"
    assert parse_binary("CHAP_C", "0XABCD") == b"\xab\xcd"


@pytest.mark.parametrize(
    "value", ["", "1234", "abcd", "0x", "0xzz", "0b", "0b!!", "0bA", "0bAB=C", "0bA===", "0b\u00e9"]
)
def test_parse_binary_refuses_garbage(value: str) -> None:
    with pytest.raises(TextError, match="CHAP_R") as caught:
        parse_binary("CHAP_R", value)
    assert caught.value.key == "CHAP_R"


@settings(max_examples=300)
@given(st.text(max_size=40) | st.from_regex(r"\A0[xXbB][0-9A-Za-z+/=]{0,20}\Z"))
def test_parse_binary_raises_only_text_error(value: str) -> None:
    try:
        data = parse_binary("CHAP_C", value)
    except TextError as exc:
        error: TextError | None = exc
    else:
        error = None
        assert data
    assert error is None or error.key == "CHAP_C"


def test_format_binary_refuses_empty() -> None:
    with pytest.raises(TextError):
        format_binary(b"")


def test_booleans() -> None:
    assert parse_boolean("InitialR2T", "Yes") is True
    assert parse_boolean("InitialR2T", "No") is False
    assert format_boolean(True) == "Yes"
    assert format_boolean(False) == "No"
    for bad in ("yes", "NO", "", "True", "1"):
        with pytest.raises(TextError, match="InitialR2T"):
            parse_boolean("InitialR2T", bad)


# -- the cache of valid keys -----------------------------------------------------------------


def test_key_cache_keeps_only_valid_keys_and_stays_bounded() -> None:
    from pyiscsi_failover.protocol import text

    text._VALID_KEYS.clear()
    decode_text(b"HeaderDigest=None\x00")
    assert text._VALID_KEYS[b"HeaderDigest"] == "HeaderDigest"
    for bad in (b"Bad Key=1\x00", b"=1\x00", b"K" * 64 + b"=1\x00"):
        with pytest.raises(TextError):
            decode_text(bad)
        # Refused again on the second sight: an invalid key is never remembered.
        with pytest.raises(TextError):
            decode_text(bad)
        assert bad.partition(b"=")[0] not in text._VALID_KEYS
    # A peer sending endless distinct (valid) keys cannot grow the cache past its bound.
    many = b"".join(b"X-%d=1\x00" % i for i in range(3 * text._VALID_KEYS_MAX))
    assert len(decode_text(many)) == 3 * text._VALID_KEYS_MAX
    assert len(text._VALID_KEYS) <= text._VALID_KEYS_MAX
    # ...nor keep a common key out: it is remembered again once seen.
    decode_text(b"HeaderDigest=None\x00")
    assert text._VALID_KEYS[b"HeaderDigest"] == "HeaderDigest"


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = b"MaxBurstLength=262144\x00DataDigest=None\x00"
    expected = [("MaxBurstLength", "262144"), ("DataDigest", "None")]
    assert decode_text(bytearray(raw)) == expected
    assert decode_text(memoryview(raw)) == expected
