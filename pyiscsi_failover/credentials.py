"""CHAP credentials and the wrapper that keeps secrets out of reprs, logs and exceptions.

Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MASK", "ChapCredentials", "Secret"]

#: What a secret looks like wherever it would otherwise be printed.
MASK = "***"


class Secret:
    """A CHAP secret. ``repr``/``str``/``format`` give ``***``; only :meth:`reveal` gives the bytes.

    Equality compares contents in constant time so tests can compare credentials, but a Secret
    is deliberately unhashable: it must never become a dict key that a debugger would print.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        self._value = value.encode("utf-8") if isinstance(value, str) else bytes(value)

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
        import hmac

        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> str:
        raise TypeError("Secret objects are not picklable")


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret: ours (checked by the target) or the target's (mutual CHAP)."""

    username: str
    secret: Secret = field(repr=False)

    def __repr__(self) -> str:
        return f"ChapCredentials(username={self.username!r}, secret={MASK!r})"
