"""What one forward step needs to attend per head, built by the metadata
builder (``builder.py``) from the runner's persistent per-head tables.

Every (request, KV head) is a one-head sequence: its own block-table row and
length in the pool of head-blocks. Row ``r * H + h`` is request r's KV head h.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pool_view import HeadBlockCache


@dataclass
class HeadPagedMetadata:
    pool: HeadBlockCache
    num_actual_tokens: int
    num_kv_heads: int
    # [L, R*H, max_blocks] int32: per-layer block-table rows.
    block_tables: torch.Tensor
    # [L, R*H] int32: KVs per head after this step's tokens are written.
    seq_lens: torch.Tensor
    # [R*H + 1] int32: query offsets of the one-head sequences.
    query_start_loc: torch.Tensor
    # [R + 1] int32: query offsets of the requests (token-major).
    request_query_start_loc: torch.Tensor
    # Maps head-major query rows (r, h, token) to rows of the [T*H, G, D]
    # token-major view; None when every request has one query (decode).
    head_major_rows: torch.Tensor | None
    layer_index: dict[str, int]
    # Most queries any request has this step (a host int, so kernels need
    # not read it back from the device).
    max_query_len: int = 1
    # Query rows to keep for the observation windows (None: none this step).
    capture: "QueryCapture | None" = None
    # Per-layer values derived lazily by the attention path (e.g. the C++
    # kernel's work split), shared by layers whose lengths are equal.
    layer_cache: dict = field(default_factory=dict)
    # The host books' copy of ``seq_lens`` (None: read ``seq_lens``).
    host_seq_lens: torch.Tensor | None = None

    def max_seq_len(self, layer: int) -> int:
        """The longest head of ``layer`` (at least 1), from the host copy of
        the lengths when there is one (no device read), each layer's once
        per step."""
        longest = self.layer_cache.get("max_seq_lens")
        if longest is None:
            lens = self.seq_lens if self.host_seq_lens is None else self.host_seq_lens
            longest = lens.amax(dim=1).tolist() if lens.shape[1] else [0] * lens.shape[0]
            self.layer_cache["max_seq_lens"] = longest
        return max(longest[layer], 1)

    def to_head_major(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H*G, D] token-major -> [T*H, G, D] grouped by (request, head)."""
        t = self.num_actual_tokens
        rows = x[:t].reshape(t * self.num_kv_heads, -1, x.shape[-1])
        return rows if self.head_major_rows is None else rows[self.head_major_rows]

    def store_token_major(self, out: torch.Tensor, heads: torch.Tensor) -> None:
        """Write head-major results ``heads`` back into ``out`` [T, H*G, D]."""
        t = self.num_actual_tokens
        rows = out[:t].view(t * self.num_kv_heads, -1, out.shape[-1])
        if self.head_major_rows is None:
            rows.copy_(heads)
        else:
            rows[self.head_major_rows] = heads


@dataclass
class QueryCapture:
    """Token rows whose queries the observation windows keep this step, and
    the buffer the backend copies each layer's rows into."""

    rows: torch.Tensor  # [rows] int64 token rows of this step
    queries: torch.Tensor  # [L, rows, Hq, D]

    def take(self, layer: int, query: torch.Tensor) -> None:
        torch.index_select(query, 0, self.rows, out=self.queries[layer])
