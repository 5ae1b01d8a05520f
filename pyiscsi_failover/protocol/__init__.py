"""The pure iSCSI protocol core: PDU models and codec, framing, text keys, negotiation, CHAP.

Nothing under this package performs I/O; it must never import trio, socket or subprocess.
"""
