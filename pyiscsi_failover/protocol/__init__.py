"""The pure iSCSI protocol core: PDU models and codec, framing, text keys, negotiation, CHAP.

Nothing under this package performs I/O; it must never import trio, socket or subprocess.
The names most callers need are re-exported here, loaded on first use: importing one light
submodule (``protocol.chap`` for a ChapPolicy, say) must not load the construct codec, which
a command line needs only once its first connection is up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyiscsi_failover.protocol.chap import ChapAlgorithm, ChapPolicy, chap_response
    from pyiscsi_failover.protocol.framing import PDUBuffer
    from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu

__all__ = ["ChapAlgorithm", "ChapPolicy", "PDUBuffer", "chap_response", "decode_pdu", "encode_pdu"]

_HOMES = {
    "ChapAlgorithm": "chap",
    "ChapPolicy": "chap",
    "chap_response": "chap",
    "PDUBuffer": "framing",
    "decode_pdu": "wire",
    "encode_pdu": "wire",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
