"""libiscsi's synchronous API, driven in-process through ctypes, as the per-login baseline.

``iscsi-ls`` starts a process per discovery, so comparing it with our in-process login compares
process start-up, not iSCSI. Here libiscsi runs in our own process, in a loop, doing exactly the
steps our side does: create a context, connect, log in (Normal session; or Discovery session
and SendTargets), log out, disconnect, destroy the context. Its CPU time then counts in
``time.process_time`` like ours.

The prototypes are libiscsi 1.19's ``iscsi/iscsi.h``; only ``libiscsi.so.7`` (Debian package
libiscsi7, pulled in by libiscsi-bin) is needed, not the headers. CHAP secrets go to libiscsi
through ``iscsi_set_initiator_username_pwd`` and never appear in an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

from benchmarks.common import BenchError

__all__ = ["LIBRARY", "Libiscsi", "load"]

LIBRARY: Final = "libiscsi.so.7"
# enum iscsi_session_type and enum iscsi_header_digest (iscsi/iscsi.h).
_SESSION_DISCOVERY: Final = 1
_SESSION_NORMAL: Final = 2
_HEADER_DIGEST_NONE_CRC32C: Final = 1

_VOIDP = ctypes.c_void_p
_CHARP = ctypes.c_char_p
_INT = ctypes.c_int


class Libiscsi:
    """The handful of libiscsi calls a login, a discovery and a logout need."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library

        def bind(name: str, restype: object, *argtypes: object) -> Callable[..., object]:
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = list(argtypes)
            return function  # type: ignore[no-any-return]

        self._create = bind("iscsi_create_context", _VOIDP, _CHARP)
        self._destroy = bind("iscsi_destroy_context", _INT, _VOIDP)
        self._set_targetname = bind("iscsi_set_targetname", _INT, _VOIDP, _CHARP)
        self._set_session_type = bind("iscsi_set_session_type", _INT, _VOIDP, _INT)
        self._set_header_digest = bind("iscsi_set_header_digest", _INT, _VOIDP, _INT)
        self._set_chap = bind("iscsi_set_initiator_username_pwd", _INT, _VOIDP, _CHARP, _CHARP)
        self._connect = bind("iscsi_connect_sync", _INT, _VOIDP, _CHARP)
        self._login = bind("iscsi_login_sync", _INT, _VOIDP)
        self._discovery = bind("iscsi_discovery_sync", _VOIDP, _VOIDP)
        self._free_discovery = bind("iscsi_free_discovery_data", None, _VOIDP, _VOIDP)
        self._logout = bind("iscsi_logout_sync", _INT, _VOIDP)
        self._disconnect = bind("iscsi_disconnect", _INT, _VOIDP)
        self._error = bind("iscsi_get_error", _CHARP, _VOIDP)

    def _context(self, initiator: str) -> int:
        context = self._create(initiator.encode())
        if not context:
            raise BenchError("libiscsi: iscsi_create_context failed")
        assert isinstance(context, int)
        # HeaderDigest=None,CRC32C: the offer our initiator makes too (libiscsi's default).
        status = self._set_header_digest(context, _HEADER_DIGEST_NONE_CRC32C)
        self._check(context, "set_header_digest", status)
        return context

    def _check(self, context: int, step: str, status: object) -> None:
        if status != 0:
            message = self._error(context)
            text = message.decode(errors="replace") if isinstance(message, bytes) else "?"
            raise BenchError(f"libiscsi {step} failed: {text}")

    def _session(
        self,
        portal: str,
        initiator: str,
        target: str | None,
        chap: tuple[str, str] | None,
        send_targets: bool,
    ) -> None:
        context = self._context(initiator)
        try:
            if target is None:
                self._check(
                    context,
                    "set_session_type",
                    self._set_session_type(context, _SESSION_DISCOVERY),
                )
            else:
                status = self._set_targetname(context, target.encode())
                self._check(context, "set_targetname", status)
                self._check(
                    context, "set_session_type", self._set_session_type(context, _SESSION_NORMAL)
                )
            if chap is not None:
                status = self._set_chap(context, chap[0].encode(), chap[1].encode())
                self._check(context, "set_initiator_username_pwd", status)
            self._check(context, "connect", self._connect(context, portal.encode()))
            self._check(context, "login", self._login(context))
            if send_targets:
                found = self._discovery(context)
                if not found:
                    self._check(context, "discovery", -1)
                self._free_discovery(context, found)
            self._check(context, "logout", self._logout(context))
            self._disconnect(context)
        finally:
            self._destroy(context)

    def login_logout(
        self, portal: str, initiator: str, target: str, chap: tuple[str, str] | None = None
    ) -> None:
        """Connect, log in to ``target`` (Normal session), log out, disconnect."""
        self._session(portal, initiator, target, chap, send_targets=False)

    def discovery(self, portal: str, initiator: str) -> None:
        """Connect, Discovery-session login, SendTargets=All, log out, disconnect."""
        self._session(portal, initiator, None, None, send_targets=True)


def load() -> Libiscsi | None:
    """libiscsi.so.7, or None when it is not installed."""
    for name in (LIBRARY, ctypes.util.find_library("iscsi")):
        if not name:
            continue
        try:
            return Libiscsi(ctypes.CDLL(name))
        except OSError:
            continue
    return None
