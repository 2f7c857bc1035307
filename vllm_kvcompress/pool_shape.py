"""The head-block pool's shape, read off vLLM's KV-cache config.

Shared by the scheduler (which owns the ids) and the worker (which owns the
memory), so both agree on how many head-blocks there are without the worker
importing the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolShape:
    num_head_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int

    @property
    def heads_per_token_block(self) -> int:
        """Head-blocks that one vLLM token block stands for (all layers, heads)."""
        return self.num_layers * self.num_kv_heads


def pool_shape(kv_cache_config) -> PoolShape:
    """The head-block pool over the memory vLLM sized for its token blocks."""
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
