"""The one exception hierarchy of pyiscsi-failover.

Every error this package raises on purpose derives from :class:`ISCSIError`, so a caller can
catch one class. Errors split as in h11: *local* ones mean we (or our caller) asked for something
impossible; *remote* ones mean the peer sent something wrong or refused us. Builtin mixins
(``ValueError``, ``TimeoutError``...) let callers that do not know us still catch sensibly.

    ISCSIError
    ├── LocalProtocolError                 we were asked to build or do something invalid
    │   └── PDUEncodeError (ValueError)     a PDU field cannot be encoded
    ├── ProtocolError                      the peer broke RFC 7143
    │   ├── PDUDecodeError (ValueError)     bytes that are not a valid PDU (field, offset, value)
    │   ├── TextError (ValueError)          malformed key=value data
    │   ├── NegotiationError                an unacceptable answer to a key
    │   ├── SCSIReplyError (ValueError)     a SCSI reply (INQUIRY data, sense...) that is malformed
    │   └── NotAnISCSITarget                the peer's very first reply is not an iSCSI PDU
    ├── AuthenticationError                CHAP failed or the target tried to weaken it
    │   ├── ChapDowngradeError              the target chose no CHAP or an algorithm not offered
    │   ├── ChapReflectionError             a challenge or response reflected back at us
    │   └── TargetAuthenticationError       mutual CHAP: the target failed to prove itself
    ├── LoginFailed                        the target answered the login with a non-success status
    ├── RedirectLoopError                  redirects went round in a circle or too deep
    ├── RedirectRefused                    a redirect our redirect policy does not allow
    ├── NetworkError (OSError)             TCP-level failure
    │   ├── ConnectRefused
    │   ├── ConnectTimeout (TimeoutError)
    │   ├── Unreachable
    │   └── ConnectionLost                  reset or EOF mid-exchange
    ├── ISCSITimeout (TimeoutError)         a deadline passed after connecting
    ├── ConnectionInfoError (ValueError)    bad connection_info / provider_location input
    ├── InvalidName (ValueError)            not a well-formed iqn./eui./naa. iSCSI name
    ├── InvalidPortal (ValueError)          not a well-formed host[:port][,tpgt] portal
    ├── IscsiadmError                      open-iscsi's iscsiadm reported a failure
    │   └── IscsiadmUnavailable             iscsiadm cannot be run at all
    ├── LedgerError                        our list of node records we created is unusable
    ├── DeviceTimeout (TimeoutError)        logged in, but the disk never appeared
    └── WrongVolume                         the kernel's disk shows another WWID than the volume

No message of any of these ever contains a CHAP secret: they are built from names, fields and
values that never include :class:`~pyiscsi_failover.credentials.Secret` contents.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ChapDowngradeError",
    "ChapReflectionError",
    "ConnectRefused",
    "ConnectTimeout",
    "ConnectionInfoError",
    "ConnectionLost",
    "DeviceTimeout",
    "ISCSIError",
    "ISCSITimeout",
    "InvalidName",
    "InvalidPortal",
    "IscsiadmError",
    "IscsiadmUnavailable",
    "LedgerError",
    "LocalProtocolError",
    "LoginFailed",
    "NegotiationError",
    "NetworkError",
    "NotAnISCSITarget",
    "PDUDecodeError",
    "PDUEncodeError",
    "ProtocolError",
    "RedirectLoopError",
    "RedirectRefused",
    "SCSIReplyError",
    "TargetAuthenticationError",
    "TextError",
    "Unreachable",
    "WrongVolume",
]


class ISCSIError(Exception):
    """Root of every error pyiscsi-failover raises on purpose."""


class LocalProtocolError(ISCSIError):
    """We were asked to produce something RFC 7143 does not allow."""


class PDUEncodeError(LocalProtocolError, ValueError):
    """A PDU field is out of range or of the wrong type, so it cannot be encoded."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class ProtocolError(ISCSIError):
    """The peer sent something that breaks RFC 7143."""


class _BadBytes(ProtocolError, ValueError):
    """Bytes that do not parse, located: ``field`` names the offending field, ``offset`` its
    byte offset (when known) and ``value`` the value found there."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        offset: int | None = None,
        value: object = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.offset = offset
        self.value = value


class PDUDecodeError(_BadBytes):
    """Bytes that do not decode as a PDU (``offset`` counts from the start of the PDU)."""


class TextError(ProtocolError, ValueError):
    """Malformed key=value text: bad UTF-8, missing ``=``, bad key, over-long value, duplicate."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class NegotiationError(ProtocolError):
    """The peer answered a key with a value we cannot accept."""

    def __init__(self, message: str, *, key: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class SCSIReplyError(_BadBytes):
    """A SCSI reply from a logical unit (INQUIRY or REPORT LUNS data, sense...) does not parse
    (``offset`` counts from the start of the reply): the PDU was fine, its payload not."""


class NotAnISCSITarget(ProtocolError):
    """The peer answered, but its first reply does not decode as an iSCSI PDU (an HTTP or SSH
    server on the portal's port, say)."""


class AuthenticationError(ISCSIError):
    """CHAP failed, or the target tried to reflect, weaken or skip it."""


class ChapDowngradeError(AuthenticationError):
    """The target chose ``AuthMethod=None`` (or anything but CHAP) or a CHAP algorithm we did not
    offer: accepting either would silently weaken or skip authentication."""


class ChapReflectionError(AuthenticationError):
    """A peer sent back a challenge we issued, or answered with a response computed from our own
    secret: the classic CHAP reflection attack, or the same secret configured in both directions."""


class TargetAuthenticationError(AuthenticationError):
    """Mutual CHAP: the target's name or response was missing or wrong."""


class LoginFailed(ISCSIError):
    """The target ended the login with a non-success Status-Class.

    ``status_class``/``status_detail`` are the raw bytes 36-37 of the Login Response;
    ``retryable`` says whether trying again (later or elsewhere) can help.
    """

    def __init__(
        self, message: str, *, status_class: int, status_detail: int, retryable: bool
    ) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail
        self.retryable = retryable


class RedirectLoopError(ISCSIError):
    """Redirects visited an address twice or went deeper than allowed."""


class RedirectRefused(ISCSIError):
    """The target redirected us to an address the redirect policy does not allow.

    Raised before anything is sent there. ``address`` is the redirect's TargetAddress as the
    target wrote it; ``reason`` says which rule refused it.
    """

    def __init__(self, message: str, *, address: str, reason: str) -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


class NetworkError(ISCSIError, OSError):
    """TCP-level failure talking to a portal."""


class ConnectRefused(NetworkError):
    """The portal actively refused the TCP connection (RST)."""


class ConnectTimeout(NetworkError, TimeoutError):
    """The TCP connection was not established before its deadline (blackholed portal)."""


class Unreachable(NetworkError):
    """No route to the portal, or its name does not resolve."""


class ConnectionLost(NetworkError):
    """The peer reset or closed the connection in the middle of an exchange."""


class ISCSITimeout(ISCSIError, TimeoutError):
    """A connected peer did not finish login, discovery or logout before its deadline."""


class ConnectionInfoError(ISCSIError, ValueError):
    """Bad connection_info or provider_location input; names the key and the (masked) value."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidName(ISCSIError, ValueError):
    """Not a well-formed iSCSI name; ``name`` is the offending value."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class InvalidPortal(ISCSIError, ValueError):
    """Not a well-formed portal (``host[:port][,tpgt]``); ``text`` is the offending value."""

    def __init__(self, message: str, *, text: str) -> None:
        super().__init__(message)
        self.text = text


class IscsiadmError(ISCSIError):
    """iscsiadm failed; ``exit_code`` is its status, ``command`` the argv with secrets masked."""

    def __init__(self, message: str, *, exit_code: int | None, command: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.command = command


class IscsiadmUnavailable(IscsiadmError):
    """iscsiadm cannot be run at all (not installed, not executable): no candidate can be
    handed off, so attach stops rather than trying the next one."""


class LedgerError(ISCSIError):
    """The ledger of node records pyiscsi-failover created cannot be read, parsed or written.

    ``path`` is the ledger file. Without a trustworthy ledger we cannot tell our records from
    an operator's, so nothing is deleted (or created) until it is repaired.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class DeviceTimeout(ISCSIError, TimeoutError):
    """open-iscsi logged in, but the disk's ``/dev/disk/by-path`` entry did not appear in time.

    ``path`` is the entry we waited for.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class WrongVolume(ISCSIError):
    """The kernel's disk shows another WWID than the volume's: the wrong LUN was attached.

    ``expected`` is the WWID the probe pinned, ``found`` what sysfs shows for ``path``.
    """

    def __init__(self, message: str, *, expected: str, found: str, path: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found
        self.path = path
