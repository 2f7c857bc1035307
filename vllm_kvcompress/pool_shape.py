"""The head-block pool's shape, read off vLLM's KV-cache config.

Shared by the scheduler (which owns the ids) and the worker (which owns the
memory), so both agree on how many head-blocks there are without the worker
importing the scheduler.

With tensor parallelism every rank holds the KV heads of its own shard in
its own memory, and vLLM gives every rank the same number of token blocks.
The scheduler's pool is then ``num_ranks`` equal slices: rank r owns KV
heads ``[r * H_r, (r + 1) * H_r)`` and head-block ids
``[r * N_r, (r + 1) * N_r)``; a worker sees only its own slice (one rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PoolShape:
    num_head_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    num_ranks: int = 1

    @property
    def heads_per_token_block(self) -> int:
        """Head-blocks that one vLLM token block stands for (all layers, heads)."""
        return self.num_layers * self.num_kv_heads

    def over_ranks(self, num_ranks: int) -> "PoolShape":
        """The whole pool of ``num_ranks`` ranks shaped like this one."""
        return replace(self, num_head_blocks=self.num_head_blocks * num_ranks,
                       num_kv_heads=self.num_kv_heads * num_ranks,
                       num_ranks=self.num_ranks * num_ranks)


def pool_shape(kv_cache_config) -> PoolShape:
    """One rank's head-block pool over the memory vLLM sized for its token
    blocks (the spec's ``num_kv_heads`` is already per rank)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if not isinstance(spec, FullAttentionSpec) or spec.sliding_window is not None:
        raise ValueError(
            "KV compression needs one KV-cache group of full attention layers; "
            f"got {[type(g.kv_cache_spec).__name__ for g in groups]}"
        )
    num_layers = len(groups[0].layer_names)
    # vLLM keeps one token block aside as its null block; leaving it out too
    # makes the pool hold exactly what stock vLLM holds at rate 1.
    return PoolShape(
        num_head_blocks=(kv_cache_config.num_blocks - 1) * num_layers * spec.num_kv_heads,
        num_layers=num_layers,
        num_kv_heads=spec.num_kv_heads,
        block_size=spec.block_size,
    )
