"""Compression metrics: the scheduler's stats board and the front end's
Prometheus collector."""
