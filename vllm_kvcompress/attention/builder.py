"""The metadata builder of the per-head backend: one step's one-head-sequence
view, built from the runner's persistent per-head tables.

vLLM constructs builders itself; the model runner then binds each one to its
``StepInputs`` (the pool, the persistent tables and this step's query
capture). Building is cheap: block tables and lengths are views of the
persistent tensors; only the per-head query offsets (and, for prefill
chunks, one gather index) are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder

from .metadata import HeadPagedMetadata, QueryCapture
from .pool_view import HeadBlockCache


@dataclass
class StepInputs:
    """What the runner shares with the builder (one object per runner)."""

    pool: HeadBlockCache
    tables: object  # worker.batch_tables.BatchHeadTables
    layer_index: dict[str, int]
    capture: QueryCapture | None = None


def head_major_rows(num_tokens: np.ndarray, num_kv_heads: int) -> torch.Tensor:
    """For rows ordered (request, head, token): the row in the token-major
    ``[T * H]`` view, i.e. ``(start_r + j) * H + h``."""
    counts = torch.from_numpy(num_tokens.astype(np.int64))
    starts = torch.cumsum(counts, 0) - counts
    per_head = counts.repeat_interleave(num_kv_heads)  # [R*H]
    head = torch.arange(num_kv_heads).repeat(len(counts))
    row_start = starts.repeat_interleave(num_kv_heads)
    owner = torch.repeat_interleave(torch.arange(len(per_head)), per_head)
    first = torch.cumsum(per_head, 0) - per_head
    j = torch.arange(int(per_head.sum())) - first[owner]
    return (row_start[owner] + j) * num_kv_heads + head[owner]


class HeadPagedMetadataBuilder(AttentionMetadataBuilder[HeadPagedMetadata]):
    # Attention itself is never captured in a CUDA graph: vLLM then runs the
    # model piecewise, with attention eager between compiled pieces.
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.inputs: StepInputs | None = None

    def bind(self, inputs: StepInputs) -> None:
        self.inputs = inputs

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        inputs = self.inputs
        if inputs is None:
            raise RuntimeError(
                "the per-head attention metadata builder was never bound to "
                "the per-head tables: KV compression needs vllm_kvcompress's "
                "worker (--worker-cls was changed?)")
        cm = common_attn_metadata
        return build_metadata(inputs, cm.num_reqs, cm.query_start_loc_cpu)


def build_metadata(inputs: StepInputs, num_reqs: int,
                   query_start_loc: torch.Tensor) -> HeadPagedMetadata:
    """The one-head-sequence view of the first ``num_reqs`` batch rows, whose
    queries start at ``query_start_loc`` (token-major, per request)."""
    tables = inputs.tables
    heads = tables.num_kv_heads
    device = inputs.pool.kv.device
    request_starts = query_start_loc[: num_reqs + 1]
    starts = request_starts.numpy()
    num_tokens = np.diff(starts)
    per_head = np.repeat(num_tokens, heads)
    head_starts = np.zeros(len(per_head) + 1, dtype=np.int32)
    np.cumsum(per_head, out=head_starts[1:])
    block_tables, seq_lens = tables.layer_views(num_reqs)
    rows = (head_major_rows(num_tokens, heads).to(device)
            if num_tokens.size and num_tokens.max() > 1 else None)
    return HeadPagedMetadata(
        pool=inputs.pool,
        num_actual_tokens=int(starts[-1]),
        num_kv_heads=heads,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=torch.from_numpy(head_starts).to(device),
        request_query_start_loc=request_starts.to(device),
        head_major_rows=rows,
        layer_index=inputs.layer_index,
        max_query_len=int(num_tokens.max()) if num_tokens.size else 0,
        capture=inputs.capture,
        host_seq_lens=tables.host_lengths(num_reqs),
    )
