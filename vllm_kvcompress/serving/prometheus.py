"""``vllm:kv_compress_*`` metrics on the API server's ``/metrics``.

A Prometheus collector in the front-end process reads the scheduler's stats
board (``serving/stats.py``) at every scrape. It is registered in the process
default registry, the one ``/metrics`` serves when vLLM runs a single API
server process (the only setup compression supports).
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .stats import StatsBoard

LABELS = ["model_name", "engine"]

GAUGES = {
    "head_blocks_total": "Head-blocks in the pool (token blocks x layers x KV heads).",
    "head_blocks_free": "Head-blocks free to be given to requests.",
    "head_blocks_held": "Head-blocks held by requests (0 when idle).",
    "head_blocks_free_lowest_rank": (
        "Free head-blocks of the tensor-parallel rank with the fewest; a "
        "request is admitted only when every rank has room."),
    "head_blocks_cached": (
        "Head-blocks of cached prompt blocks (prefix caching), held by "
        "requests or idle; idle ones count as free."),
}
COUNTERS = {
    "kvs_evicted": ("kvs_evicted", "KVs evicted, over all layers and KV heads."),
    "compressions": ("compressions", "Compressions run (one request each)."),
    "low_memory_compressions": (
        "low_memory_compressions",
        "Compressions run because the pool could not cover one more step."),
    "compress_seconds": ("compression_seconds",
                         "Worker time spent scoring, evicting and compacting."),
    "reconstruction_seconds": (
        "reconstruction_seconds",
        "Of the compression seconds, the kvzip reconstruction passes' (extra "
        "forwards of the model)."),
    "reconstruction_tokens": (
        "reconstruction_tokens",
        "Tokens the kvzip reconstruction passes fed the model (extra prefill)."),
}


class KVCompressCollector:
    def __init__(self):
        self._board: StatsBoard | None = None
        self._label_values: list[str] = []

    def watch(self, path: str, model_name: str) -> None:
        """Serve the board of the engine this process just configured."""
        self._board = StatsBoard(path, writable=False)
        self._label_values = [model_name, "0"]

    def collect(self):
        if self._board is None:
            return
        values = self._board.read()
        for key, doc in GAUGES.items():
            yield self._family(GaugeMetricFamily, key, doc, values[key])
        for key, (name, doc) in COUNTERS.items():
            yield self._family(CounterMetricFamily, name, doc, values[key])
        kept = values["kept_kvs"]
        ratio = values["uncompressed_kvs"] / kept if kept else 1.0
        yield self._family(
            GaugeMetricFamily, "achieved_ratio",
            "KVs compressed requests would hold uncompressed / KVs they kept, "
            "each request counted at its last compression (1 before any).", ratio)

    def _family(self, kind, name: str, doc: str, value: float):
        family = kind(f"vllm:kv_compress_{name}", doc, labels=LABELS)
        family.add_metric(self._label_values, value)
        return family


_collector: KVCompressCollector | None = None


def serve_board(path: str, model_name: str) -> None:
    """Expose ``path``'s counters on /metrics (registered once per process;
    a later engine in the same process takes over the collector)."""
    global _collector
    if _collector is None:
        _collector = KVCompressCollector()
        REGISTRY.register(_collector)
    _collector.watch(path, model_name)
