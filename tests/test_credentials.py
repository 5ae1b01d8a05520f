"""The Secret wrapper and ChapCredentials never show a secret."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pyiscsi_failover.credentials import MASK, MAX_SECRET_BYTES, ChapCredentials, Secret
from pyiscsi_failover.errors import ConnectionInfoError, ISCSIError

RECOGNISABLE = "Zebra-Quartz-9137-secret"


def shown(value: object) -> list[str]:
    """Every way a value commonly ends up printed."""
    return [repr(value), str(value), f"{value}", f"{value!r}", str([value]), str({"k": value})]


def test_secret_is_masked_everywhere() -> None:
    secret = Secret(RECOGNISABLE)
    for text in shown(secret):
        assert RECOGNISABLE not in text
        assert MASK in text
    assert f"{secret:>40}" == MASK
    assert repr(secret) == "Secret('***')"
    assert str(secret) == MASK


def test_secret_reveals_only_on_request() -> None:
    secret = Secret(RECOGNISABLE)
    assert secret.reveal() == RECOGNISABLE.encode()
    assert secret.reveal_str() == RECOGNISABLE
    assert len(secret) == len(RECOGNISABLE)
    assert Secret(b"\xff\x00binary").reveal() == b"\xff\x00binary"
    assert Secret(bytearray(b"abc")).reveal() == b"abc"
    assert Secret(memoryview(b"abc")).reveal() == b"abc"
    # Non-UTF-8 bytes survive the str round trip (iscsiadm gets exactly what was configured).
    assert Secret(Secret(b"\xff").reveal_str()).reveal() == b"\xff"


def test_secret_equality_and_no_hashing() -> None:
    assert Secret("abc") == Secret(b"abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != "abc"
    with pytest.raises(TypeError):
        hash(Secret("abc"))


def test_secret_refuses_pickling_but_copies() -> None:
    secret = Secret(RECOGNISABLE)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(secret)
    assert copy.copy(secret) is secret
    assert copy.deepcopy(secret) is secret


def test_secret_refuses_non_text() -> None:
    # bytes(5) would be five NUL bytes: refuse rather than make a silent, guessable secret.
    with pytest.raises(TypeError, match="not int"):
        Secret(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not NoneType"):
        Secret(None)  # type: ignore[arg-type]


def test_credentials_repr_hides_the_secret() -> None:
    creds = ChapCredentials("alice", Secret(RECOGNISABLE))
    for text in shown(creds):
        assert RECOGNISABLE not in text
    assert repr(creds) == "ChapCredentials(username='alice', secret='***')"
    # asdict deep-copies fields; the copy is still a masked Secret.
    as_dict = dataclasses.asdict(creds)
    assert RECOGNISABLE not in repr(as_dict)
    assert as_dict["secret"] == Secret(RECOGNISABLE)
    replaced = dataclasses.replace(creds, username="bob")
    assert RECOGNISABLE not in repr(replaced)
    assert replaced.secret == creds.secret


def test_credentials_wrap_a_plain_secret() -> None:
    creds = ChapCredentials("alice", RECOGNISABLE)  # type: ignore[arg-type]
    assert isinstance(creds.secret, Secret)
    assert creds.secret.reveal_str() == RECOGNISABLE
    assert RECOGNISABLE not in repr(creds)
    assert creds == ChapCredentials("alice", Secret(RECOGNISABLE))
    assert ChapCredentials("alice", b"raw").secret == Secret(b"raw")  # type: ignore[arg-type]


def test_credentials_refuse_wrong_types() -> None:
    with pytest.raises(TypeError, match="username"):
        ChapCredentials(b"alice", Secret("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not int"):
        ChapCredentials("alice", 12)  # type: ignore[arg-type]


def test_credentials_are_frozen() -> None:
    creds = ChapCredentials("alice", Secret(RECOGNISABLE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.username = "mallory"  # type: ignore[misc]


@given(username=st.text(max_size=20), secret=st.text(min_size=4, max_size=40))
def test_no_secret_in_any_repr(username: str, secret: str) -> None:
    creds = ChapCredentials(username, Secret(secret))
    # A secret that happens to be part of the fixed text or of the username proves nothing.
    assume(secret not in "ChapCredentials(username=, secret='***')Secret()")
    assume(secret not in repr(username))
    for text in [*shown(creds), *shown(creds.secret)]:
        assert secret not in text


def test_a_secret_of_255_bytes_is_accepted_and_256_refused_without_showing_it() -> None:
    assert MAX_SECRET_BYTES == 255
    longest = "S" * 253 + "\u00e9"  # 255 bytes in UTF-8, 254 characters
    assert len(ChapCredentials("alice", Secret(longest)).secret) == 255
    assert len(ChapCredentials("alice", Secret(b"x" * 255)).secret) == 255
    for too_long in ("S" * 254 + "\u00e9", b"x" * 256, Secret(RECOGNISABLE * 11)):
        with pytest.raises(ConnectionInfoError) as info:
            ChapCredentials("alice", too_long)  # type: ignore[arg-type]
        error = info.value
        assert error.key == "secret"
        assert isinstance(error, ISCSIError) and isinstance(error, ValueError)
        assert "open-iscsi holds at most 255" in str(error)
        assert "'alice'" in str(error)
        assert RECOGNISABLE not in str(error) + repr(error)
        assert "SSSS" not in str(error) and "xxxx" not in str(error)
    with pytest.raises(ConnectionInfoError, match="is 264 bytes"):
        ChapCredentials("alice", Secret(RECOGNISABLE * 11))
