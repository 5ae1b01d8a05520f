"""CHAP credentials and the wrapper that keeps secrets out of reprs, logs and exceptions.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Final

from pyiscsi_failover.errors import ConnectionInfoError, LocalProtocolError

__all__ = ["MASK", "MAX_SECRET_BYTES", "ChapCredentials", "Secret"]

#: What a secret looks like wherever it would otherwise be printed.
MASK = "***"

#: The longest CHAP secret open-iscsi can hold: its buffers are ``AUTH_STR_MAX_LEN`` (256)
#: bytes including the terminating NUL, and iscsiadm cuts record values at 255 bytes. A longer
#: secret could pass our own probe and then fail (or be cut) in the hand-off, so it is refused
#: up front.
MAX_SECRET_BYTES: Final = 255


def _encodable(text: str) -> bool:
    """Whether UTF-8 with surrogateescape can encode ``text`` (no lone surrogate outside it)."""
    return all(not "\ud800" <= ch <= "\udfff" or "\udc80" <= ch <= "\udcff" for ch in text)


class Secret:
    """A CHAP secret. ``repr``/``str``/``format`` give ``***``; only :meth:`reveal` gives the bytes.

    Equality compares contents in constant time so tests can compare credentials, but a Secret
    is deliberately unhashable: it must never become a dict key that a debugger would print.
    Pickling is refused (a pickle is a secret written to disk); copying returns the same object,
    which is safe because a Secret is immutable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes | bytearray | memoryview) -> None:
        if isinstance(value, str):
            # Never let UnicodeEncodeError escape: it would carry the whole secret.
            encoded = value.encode("utf-8", errors="surrogateescape") if _encodable(value) else None
            if encoded is None:
                raise LocalProtocolError(
                    "a CHAP secret must be valid text: it has a lone surrogate"
                )
            self._value = encoded
        elif isinstance(value, (bytes, bytearray, memoryview)):
            self._value = bytes(value)
        else:
            # bytes(5) would silently make five NUL bytes; say what was wrong, not the value.
            raise TypeError(f"a Secret is made from str or bytes, not {type(value).__name__}")

    def reveal(self) -> bytes:
        return self._value

    def reveal_str(self) -> str:
        """The secret as text, for the one place that must pass it on (iscsiadm's argv)."""
        return self._value.decode("utf-8", errors="surrogateescape")

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self

    def __reduce__(self) -> str:
        raise TypeError("Secret objects are not picklable")


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret: ours (checked by the target) or the target's (mutual CHAP).

    A plain ``str``/``bytes`` secret is wrapped in :class:`Secret` on construction, so a caller
    that forgets the wrapper still never gets the secret printed. A secret longer than
    :data:`MAX_SECRET_BYTES` is a :class:`~pyiscsi_failover.errors.ConnectionInfoError` with
    ``key="secret"`` that gives its length, never its content.
    """

    username: str
    secret: Secret = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str):
            raise TypeError(f"a CHAP username is a str, not {type(self.username).__name__}")
        secret: object = self.secret  # typed as Secret, but callers may pass str/bytes
        if isinstance(secret, (str, bytes, bytearray, memoryview)):
            object.__setattr__(self, "secret", Secret(secret))
        elif not isinstance(secret, Secret):
            raise TypeError(f"a CHAP secret is a Secret, not {type(secret).__name__}")
        if len(self.secret) > MAX_SECRET_BYTES:
            raise ConnectionInfoError(
                f"the CHAP secret of {self.username!r} is {len(self.secret)} bytes; open-iscsi "
                f"holds at most {MAX_SECRET_BYTES}",
                key="secret",
            )

    def __repr__(self) -> str:
        return f"ChapCredentials(username={self.username!r}, secret={MASK!r})"
