"""Benchmarks for pyiscsi-failover, run with ``nox -s bench`` (never part of CI gating)."""
