"""The ``.pth`` hook: install the connector the moment os-brick's connector module loads.

``contrib/os-brick/pyiscsi-failover-os-brick.pth``, copied into the service's virtualenv, runs
at every interpreter start::

    import os; os.environ.get("PYISCSI_FAILOVER_OS_BRICK") == "1" and __import__(...).enable()

:func:`enable` does not import os-brick (a ``.pth`` line runs in every Python process of the
virtualenv, rootwrap and privsep helpers included, and before eventlet's monkey patching): it
puts a finder on ``sys.meta_path`` that waits for ``os_brick.initiator.connector`` to be
imported, lets it load as usual, then calls :func:`~pyiscsi_failover.os_brick.hook.install`.
Nova and Cinder import that module before they build their connector, so the factory sees ours.
If ``install`` fails, the failure is logged and os-brick stays stock: a broken hook must not
stop the service from attaching volumes.

Imports only ``os``, ``sys`` and ``importlib``'s machinery at interpreter start.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Final

__all__ = ["ENV_ENABLE", "TRIGGER", "enable", "enabled_by_environment"]

#: Set to ``1`` in a service's environment (the systemd drop-in does) to turn the hook on.
ENV_ENABLE: Final = "PYISCSI_FAILOVER_OS_BRICK"
#: The module whose import triggers :func:`~pyiscsi_failover.os_brick.hook.install`.
TRIGGER: Final = "os_brick.initiator.connector"


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_ENABLE) == "1"


def _install_quietly() -> None:
    try:
        from pyiscsi_failover.os_brick.hook import install

        install()
    except Exception:
        logging.getLogger(__name__).exception(
            "pyiscsi-failover: installing the os-brick connector failed; os-brick stays stock"
        )


class _InstallAfterExec(importlib.abc.Loader):
    """Wraps the trigger module's loader: run it, then install."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader (inspect.getsource and friends use it).
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        _install_quietly()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for the trigger module, hands back the spec the path-based finder
    gives, with its loader wrapped. Leaves ``sys.meta_path`` after its one use."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRIGGER:
            return None
        _remove_finder()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _InstallAfterExec(spec.loader)
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Finder)]


def enable() -> None:
    """Install now if os-brick's connector module is loaded, else when it is; idempotent."""
    if TRIGGER in sys.modules:
        _install_quietly()
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
