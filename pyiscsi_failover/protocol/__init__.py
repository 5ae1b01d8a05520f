"""The pure iSCSI protocol core: PDU models and codec, framing, text keys, negotiation, CHAP.

Nothing under this package performs I/O; it must never import trio, socket or subprocess.
The names most callers need are re-exported here.
"""

from __future__ import annotations

from pyiscsi_failover.protocol.chap import ChapAlgorithm, ChapPolicy, chap_response
from pyiscsi_failover.protocol.framing import PDUBuffer
from pyiscsi_failover.protocol.wire import decode_pdu, encode_pdu

__all__ = ["ChapAlgorithm", "ChapPolicy", "PDUBuffer", "chap_response", "decode_pdu", "encode_pdu"]
