"""Typed models of the PDUs an initiator meets during login, discovery and logout.

These are what the rest of the package sees: frozen dataclasses and IntEnums. The wire format
lives in :mod:`pyiscsi_failover.protocol.wire` alone (the only module that imports construct).
Fields are named after RFC 7143. Pure: never imports trio, socket or subprocess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from pyiscsi_failover.protocol.isid import ISID

__all__ = [
    "ISID",
    "PDU",
    "RESERVED_TAG",
    "LoginRequest",
    "LoginResponse",
    "LoginStatus",
    "LogoutReason",
    "LogoutRequest",
    "LogoutResponse",
    "LogoutResponseCode",
    "NopIn",
    "NopOut",
    "Opcode",
    "Reject",
    "RejectReason",
    "Stage",
    "StatusClass",
    "TextRequest",
    "TextResponse",
]

#: The "no tag" value of ITT and TTT fields.
RESERVED_TAG = 0xFFFFFFFF


class Opcode(enum.IntEnum):
    NOP_OUT = 0x00
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    LOGOUT_REQUEST = 0x06
    NOP_IN = 0x20
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    LOGOUT_RESPONSE = 0x26
    REJECT = 0x3F


class Stage(enum.IntEnum):
    """Login stages (CSG/NSG). 2 is reserved by the RFC and never valid."""

    SECURITY_NEGOTIATION = 0
    LOGIN_OPERATIONAL_NEGOTIATION = 1
    FULL_FEATURE_PHASE = 3


class StatusClass(enum.IntEnum):
    SUCCESS = 0
    REDIRECTION = 1
    INITIATOR_ERROR = 2
    TARGET_ERROR = 3


class LoginStatus(enum.IntEnum):
    """Known (Status-Class << 8 | Status-Detail) codes of a Login Response."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    TARGET_NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANNOT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def retryable(self) -> bool:
        """Whether trying again, later or on another portal, can help."""
        return (
            self.value >> 8 == StatusClass.TARGET_ERROR or self is LoginStatus.TOO_MANY_CONNECTIONS
        )


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class LogoutResponseCode(enum.IntEnum):
    CLOSED = 0
    CID_NOT_FOUND = 1
    RECOVERY_NOT_SUPPORTED = 2
    CLEANUP_FAILED = 3


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRequest:
    transit: bool
    cont: bool
    csg: Stage
    nsg: Stage
    isid: ISID
    itt: int
    cmdsn: int
    expstatsn: int
    tsih: int = 0
    cid: int = 0
    version_max: int = 0
    version_min: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResponse:
    transit: bool
    cont: bool
    csg: Stage
    nsg: Stage
    isid: ISID
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    status_class: StatusClass
    status_detail: int
    tsih: int = 0
    version_max: int = 0
    version_active: int = 0
    data: bytes = b""

    @property
    def status(self) -> LoginStatus | None:
        """The known status code, or None for a detail this package does not name."""
        try:
            return LoginStatus(self.status_class << 8 | self.status_detail)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TextRequest:
    final: bool
    cont: bool
    itt: int
    cmdsn: int
    expstatsn: int
    ttt: int = RESERVED_TAG
    lun: int = 0
    immediate: bool = False
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class TextResponse:
    final: bool
    cont: bool
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutRequest:
    reason: LogoutReason
    itt: int
    cmdsn: int
    expstatsn: int
    cid: int = 0
    immediate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LogoutResponse:
    response: LogoutResponseCode
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    time2wait: int = 0
    time2retain: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """A target's refusal of one PDU; ``data`` holds the rejected PDU's header (48 bytes)."""

    reason: RejectReason
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    datasn: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class NopOut:
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    lun: int = 0
    immediate: bool = True
    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class NopIn:
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    lun: int = 0
    data: bytes = b""


PDU: TypeAlias = (
    LoginRequest
    | LoginResponse
    | TextRequest
    | TextResponse
    | LogoutRequest
    | LogoutResponse
    | Reject
    | NopOut
    | NopIn
)
