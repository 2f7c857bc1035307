"""vLLM's ``KVCacheManager`` interface answered from the head-block pool.

vLLM's scheduler keeps calling its manager as usual; this stand-in answers the
calls that allocate, free and measure memory from the ``HeadBlockPool`` and
hands vLLM empty token-block lists (the worker never reads them). Everything
else falls through to the wrapped stock manager, which stays idle.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm.v1.core.kv_cache_manager import KVCacheBlocks

from ..protocol import PoolBooksError
from .pool import HeadBlockPool


class NoTokenBlocks(KVCacheBlocks):
    """A successful allocation whose ids live in the head-block pool.

    vLLM's scheduler sends a resumed request's block ids even when empty, so
    this never collapses to None the way an empty stock result does.
    """

    def get_block_ids(self, allow_none: bool = False, *, group_ids=None):
        count = len(self.blocks) if group_ids is None else len(group_ids)
        return tuple([] for _ in range(count))


class HeadBlockKVCacheManager:
    def __init__(self, stock_manager: Any, pool: HeadBlockPool,
                 peak_head_blocks: Callable[[Any], int],
                 on_free: Callable[[str], None] = lambda req_id: None,
                 recomputed_tail: Callable[[Any], int] = lambda request: 1):
        self._stock = stock_manager
        # Prompt tokens a request computes even on a full prefix hit: its
        # last (for the logits), or its whole observation window when it
        # will be compressed (the window's queries score the KVs).
        self._recomputed_tail = recomputed_tail
        self.pool = pool
        # vLLM built its manager with prefix caching on or off; so do we.
        self._prefix_caching = bool(stock_manager.enable_caching)
        # Head-blocks a request holds at its peak (vLLM admits a new request
        # only if that fits; with cascading it is less than the prompt).
        self._peak_head_blocks = peak_head_blocks
        self._on_free = on_free  # told whenever a request gives all back
        per_token_block = pool.heads_per_token_block
        self._watermark = stock_manager.watermark_blocks * per_token_block
        self._granted = NoTokenBlocks(stock_manager.empty_kv_cache_blocks.blocks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stock, name)

    def allocate_slots(
        self,
        request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks=None,
        num_lookahead_tokens: int = 0,
        num_external_computed_tokens: int = 0,
        delay_cache_blocks: bool = False,
        num_encoder_tokens: int = 0,
        full_sequence_must_fit: bool = False,
        reserved_blocks: int = 0,
        has_scheduled_reqs: bool = True,
        skip_zeroing_group_ids: tuple[int, ...] = (),
    ):
        """Room for ``num_new_tokens`` more tokens in every head, or None
        (when any rank is short)."""
        if num_lookahead_tokens or num_external_computed_tokens or num_encoder_tokens:
            raise NotImplementedError(
                "KV compression does not support lookahead, external (connector) "
                "or encoder tokens"
            )
        from vllm.v1.request import RequestStatus

        req_id = request.request_id
        # Token blocks held back stand for the same share of every rank.
        held_back = reserved_blocks * self.pool.heads_per_token_block
        if has_scheduled_reqs and request.status in (
            RequestStatus.WAITING,
            RequestStatus.PREEMPTED,
        ):
            held_back += self._watermark
        free = self.pool.free_by_rank - held_back // self.pool.num_ranks
        if full_sequence_must_fit:
            peak = self._peak_head_blocks(request) // self.pool.num_ranks
            if (peak - self.pool.held_by(req_id) > free).any():
                return None
        target = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        hits = self._hit_hashes(request, num_new_computed_tokens)
        if (self.pool.blocks_to_grow(req_id, target, hits) > free).any():
            return None
        if hits:
            self.pool.attach_prefix(req_id, hits)
        if not self.pool.grow(req_id, target):
            raise PoolBooksError(f"{req_id} did not fit after the room check")
        if self._prefix_caching:
            self.pool.register_prefix(req_id, request.block_hashes,
                                      min(target, request.num_tokens))
        return self._granted

    # ------------------------------------------------------------ prefixes
    def get_computed_blocks(self, request):
        """The longest cached prefix of ``request``'s full blocks, leaving
        at least its recomputed tail to compute."""
        if not self._stock.prefix_cache_lookup_enabled(request):
            return self._stock.empty_kv_cache_blocks, 0, 0
        tail = max(self._recomputed_tail(request), 1)
        max_blocks = max(request.num_tokens - tail, 0) // self.pool.block_size
        hits = self.pool.prefix.longest_hit(request.block_hashes, max_blocks)
        return self._granted, len(hits) * self.pool.block_size, 0

    def _hit_hashes(self, request, num_new_computed_tokens: int) -> list:
        if num_new_computed_tokens == 0:
            return []
        if num_new_computed_tokens % self.pool.block_size or request.request_id in self.pool.tables:
            raise PoolBooksError(
                f"{num_new_computed_tokens} cached tokens for {request.request_id} "
                "are not a prefix hit of whole blocks on a new request")
        return list(request.block_hashes[: num_new_computed_tokens // self.pool.block_size])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM does: only when no request
        holds one (False otherwise)."""
        if any(self.pool.prefix.holders.values()):
            return False
        self.pool.clear_prefix_cache()
        return self._stock.reset_prefix_cache()

    def free(self, request) -> None:
        self.pool.free(request.request_id)
        self._on_free(request.request_id)

    def pop_blocks_for_free(self, request) -> list:
        # Deferred frees only happen with async KV connectors, which are
        # refused; free at once.
        self.free(request)
        return []

    def get_blocks(self, request_id: str):
        return self._granted

    def get_block_ids(self, request_id: str):
        return self._stock.empty_kv_cache_blocks.get_block_ids()

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        """Blocks are cached in ``allocate_slots``; vLLM calls this only for
        KV connectors and speculative decoding, which are refused."""

    def remove_skipped_blocks(self, *args, **kwargs) -> None:
        """No sliding-window layers with compression: nothing to skip."""

    def get_num_common_prefix_blocks(self, running_request_id: str) -> list[int]:
        return [0] * len(self._stock.kv_cache_config.kv_cache_groups)

    @property
    def usage(self) -> float:
        return self.pool.usage
