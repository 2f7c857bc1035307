"""Compression counters, kept by the scheduler (EngineCore) and read by the
API server's ``/metrics``.

vLLM's ``SchedulerStats`` crosses the process boundary with a fixed msgspec
schema, so extra numbers cannot ride on it. Instead the front end creates a
small file of float64 values and names it in an environment variable that
the engine process inherits; the scheduler memory-maps it and writes after every change, and the Prometheus
collector (``prometheus.py``) reads it at scrape time, so ``/metrics`` is as
fresh as the last engine step, aborts between steps included.

Not in ``additional_config``: vLLM hashes that into its compile-cache key,
so a fresh file name at every start would make every start recompile the
model (about a minute for SmolLM2 on 2 cores) instead of loading the cache.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

# Set by the front end for the engine it starts; users never set it.
PATH_ENV = "VLLM_KVCOMPRESS_STATS_FILE"

FIELDS = (
    "head_blocks_total",
    "head_blocks_free",
    "head_blocks_held",
    "head_blocks_free_lowest_rank",
    "head_blocks_cached",
    "kvs_evicted",
    "compressions",
    "low_memory_compressions",
    "compress_seconds",
    "reconstruction_seconds",
    "reconstruction_tokens",
    # For the achieved ratio: the KVs compressed requests would hold without
    # compression, and what they held, each counted at its last compression.
    "uncompressed_kvs",
    "kept_kvs",
)


def create_board_file() -> str:
    """A zeroed board file (in /dev/shm when there is one), removed when this
    process exits."""
    folder = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="vllm-kvcompress-stats-", suffix=".f64",
                                dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(bytes(8 * len(FIELDS)))
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StatsBoard:
    """The board file as named float64 values (aligned 8-byte stores, so a
    reader never sees half a number)."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        self._values = np.memmap(path, dtype=np.float64, mode="r+" if writable else "r",
                                 shape=(len(FIELDS),))

    def read(self) -> dict[str, float]:
        return dict(zip(FIELDS, self._values.tolist()))

    def write(self, values: dict[str, float]) -> None:
        for i, name in enumerate(FIELDS):
            self._values[i] = values[name]


@dataclass
class CompressionStats:
    """One engine's counters; ``publish`` copies them to the board."""

    board: StatsBoard | None
    kvs_evicted: int = 0
    compressions: int = 0
    low_memory_compressions: int = 0
    compress_seconds: float = 0.0
    reconstruction_seconds: float = 0.0  # kvzip's passes (part of the above)
    reconstruction_tokens: int = 0
    # (uncompressed, kept) KVs of each live request at its last compression.
    _last: dict[str, tuple[int, int]] = field(default_factory=dict)
    _done_uncompressed: int = 0
    _done_kept: int = 0

    def compressed(self, req_id: str, num_tokens: int, new_lens: np.ndarray,
                   evicted: int) -> None:
        self.compressions += 1
        self.kvs_evicted += evicted
        self._last[req_id] = (num_tokens * new_lens.size, int(new_lens.sum()))

    def finished(self, req_id: str) -> None:
        uncompressed, kept = self._last.pop(req_id, (0, 0))
        self._done_uncompressed += uncompressed
        self._done_kept += kept

    @property
    def live_requests(self) -> int:
        """Requests compressed at least once and not finished yet."""
        return len(self._last)

    def ratio_totals(self) -> tuple[int, int]:
        """(uncompressed, kept) KVs over every request compressed so far; their
        quotient is the achieved compression ratio."""
        return (self._done_uncompressed + sum(u for u, _ in self._last.values()),
                self._done_kept + sum(k for _, k in self._last.values()))

    def publish(self, pool) -> None:
        if self.board is None:
            return
        uncompressed, kept = self.ratio_totals()
        self.board.write({
            "head_blocks_total": pool.num_head_blocks,
            "head_blocks_free": pool.num_free,
            "head_blocks_held": pool.num_held,
            "head_blocks_free_lowest_rank": int(pool.free_by_rank.min()),
            "head_blocks_cached": pool.num_cached,
            "kvs_evicted": self.kvs_evicted,
            "compressions": self.compressions,
            "low_memory_compressions": self.low_memory_compressions,
            "compress_seconds": self.compress_seconds,
            "reconstruction_seconds": self.reconstruction_seconds,
            "reconstruction_tokens": self.reconstruction_tokens,
            "uncompressed_kvs": uncompressed,
            "kept_kvs": kept,
        })
