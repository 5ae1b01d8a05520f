"""The exception tree: one root, drawn in the module docstring, with the promised builtin mixins."""

from __future__ import annotations

import pytest

from pyiscsi_failover import errors


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_rooted_and_drawn(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.ISCSIError)
    assert f"── {name}" in (errors.__doc__ or "") or name == "ISCSIError"


@pytest.mark.parametrize(
    ("cls", "mixin"),
    [
        (errors.PDUDecodeError, ValueError),
        (errors.PDUEncodeError, ValueError),
        (errors.TextError, ValueError),
        (errors.ConnectionInfoError, ValueError),
        (errors.InvalidName, ValueError),
        (errors.InvalidPortal, ValueError),
        (errors.NetworkError, OSError),
        (errors.ConnectTimeout, TimeoutError),
        (errors.ISCSITimeout, TimeoutError),
        (errors.DeviceTimeout, TimeoutError),
    ],
)
def test_builtin_mixins(cls: type[Exception], mixin: type[Exception]) -> None:
    assert issubclass(cls, mixin)
