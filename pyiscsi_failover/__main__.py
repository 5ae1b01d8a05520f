"""``python -m pyiscsi_failover`` is the ``pyiscsi-failover`` command."""

from pyiscsi_failover.cli import main

main()
