"""vLLM ``Scheduler`` whose KV memory is the head-block pool.

Plugged in through ``--scheduler-cls``. Each ``schedule()`` attaches a
``StepMessage`` with this step's head-block grants to the ``SchedulerOutput``;
in debug mode the pool's books are checked after every step.
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import RequestStatus

from ..compression.budget import peak_tokens_per_head
from ..config import KVCompressConfig
from ..pool_shape import pool_shape
from ..protocol import (
    REPLY_ATTR, STEP_ATTR, CompressOrder, HeadBooks, PoolBooksError, StepMessage,
)
from ..serving.stats import PATH_ENV, CompressionStats, StatsBoard
from .kv_cache_manager import HeadBlockKVCacheManager
from .pool import HeadBlockPool, NoRoomToCopy
from .triggers import CompressionTriggers

logger = init_logger(f"vllm.{__name__}")


class KVCompressScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.kv_compress = KVCompressConfig.from_additional_config(
            vllm_config.additional_config
        )
        # vLLM's config describes one rank; the pool spans all of them.
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.head_pool = HeadBlockPool(
            **vars(pool_shape(kv_cache_config).over_ranks(tp_size)))
        self.kv_cache_manager = HeadBlockKVCacheManager(
            self.kv_cache_manager, self.head_pool, self.peak_head_blocks,
            on_free=lambda req_id: self.triggers.forget(req_id),
            recomputed_tail=self._recomputed_tail)
        self.chunk_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.request_settings: dict[str, KVCompressConfig] = {}
        # Refused at arrival (they could never fit the pool); their error
        # outputs go out with the next step's outputs.
        self._refused: list = []
        self.triggers = CompressionTriggers(self.head_pool.block_size,
                                            self.kv_compress.cascade)
        self.step_count = 0
        board_path = os.environ.get(PATH_ENV)
        self.stats = CompressionStats(
            StatsBoard(board_path, writable=True) if board_path else None)
        self.stats.publish(self.head_pool)
        logger.info(
            "KV compression: %d head-blocks of %d tokens (%d layers x %d KV heads) "
            "on each of %d tensor-parallel rank(s).",
            self.head_pool.blocks_per_rank,
            self.head_pool.block_size,
            self.head_pool.num_layers,
            self.head_pool.heads_per_rank,
            self.head_pool.num_ranks,
        )

    def add_request(self, request) -> None:
        super().add_request(request)
        # Fields were validated in the front end (request_validation.py).
        extra = request.sampling_params.extra_args if request.sampling_params else None
        self.request_settings[request.request_id] = self.kv_compress.for_request(extra)
        need = self.peak_head_blocks(request)
        if need > self.head_pool.num_head_blocks:
            logger.warning(
                "KV compression: request %s needs %d head-blocks at its peak, "
                "more than the whole pool (%d), so it can never run; ended with "
                "an error. Its own settings (e.g. a lower per-request rate) "
                "compress less than the engine's, which the start-up check "
                "assumed.", request.request_id, need,
                self.head_pool.num_head_blocks)
            self._refused.extend(
                self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR))

    def _recomputed_tail(self, request) -> int:
        settings = self.request_settings.get(request.request_id, self.kv_compress)
        return settings.window if settings.evicts else 1

    def peak_head_blocks(self, request) -> int:
        """Head-blocks ``request`` holds at most while its prompt is read: all
        of it, or with cascading its budget plus one chunk."""
        pool = self.head_pool
        tokens = min(request.num_tokens, self.max_model_len)
        settings = self.request_settings.get(request.request_id, self.kv_compress)
        if self.kv_compress.cascade and settings.evicts:
            tokens = peak_tokens_per_head(settings, tokens, self.chunk_tokens,
                                          pool.block_size)
        return -(-tokens // pool.block_size) * pool.heads_per_token_block

    def _free_request(self, request, *args, **kwargs):
        """Finished or aborted (preemption frees through the cache manager)."""
        self.request_settings.pop(request.request_id, None)
        freed = super()._free_request(request, *args, **kwargs)
        self.stats.finished(request.request_id)
        self.stats.publish(self.head_pool)
        return freed

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        self.step_count += 1
        message = StepMessage(grants=self.head_pool.take_grants(),
                              compress=self._compress_orders(output))
        if self.kv_compress.debug:
            self.check_books()
            message.expected = {
                req_id: self._books_of(req_id)
                for req_id in output.num_scheduled_tokens
            }
        setattr(output, STEP_ATTR, message)
        return output

    def _compress_orders(self, output) -> dict[str, CompressOrder]:
        """Who compresses after this step (``triggers.py`` says when)."""
        pool = self.head_pool
        self.triggers.step = self.step_count
        step_need = len(self.running) * pool.heads_per_token_block // pool.num_ranks
        running_dry = bool((pool.free_by_rank < step_need).any())
        orders = {}
        for req_id in output.num_scheduled_tokens:
            request = self.requests[req_id]
            settings = self.request_settings.get(req_id)
            if settings is None:
                continue
            last = self.triggers.last_compressed.get(req_id)
            order = self.triggers.order(
                req_id, settings, pool.tables[req_id].lens,
                request.num_computed_tokens, request.num_tokens, running_dry)
            if order is None:
                continue
            try:
                order.copies = pool.prepare_compression(req_id)
            except NoRoomToCopy:
                self.triggers.postpone(req_id, last)
                continue
            orders[req_id] = order
        self.stats.low_memory_compressions = self.triggers.low_memory_orders
        return orders

    def update_from_output(self, scheduler_output, model_runner_output):
        reply = getattr(model_runner_output, REPLY_ATTR, None)
        if reply is not None:
            orders = getattr(scheduler_output, STEP_ATTR).compress
            for req_id, new_lens in reply.new_lens.items():
                if req_id not in self.head_pool.tables:
                    continue  # aborted while the worker compressed it
                self.head_pool.finish_copies(req_id)
                self.head_pool.shrink(req_id, new_lens)
                self.stats.compressed(req_id, orders[req_id].num_tokens, new_lens,
                                      reply.evicted[req_id])
            self.stats.compress_seconds += reply.seconds
            self.stats.reconstruction_seconds += reply.reconstruction_seconds
            self.stats.reconstruction_tokens += reply.reconstruction_tokens
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._send_refusals(outputs)
        self.stats.publish(self.head_pool)
        if self.kv_compress.debug:
            self.check_books()
        return outputs

    def _send_refusals(self, outputs: dict) -> None:
        refused, self._refused = self._refused, []
        for request in refused:
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(
                EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                 finish_reason=request.get_finished_reason()))

    def _books_of(self, req_id: str) -> HeadBooks:
        table = self.head_pool.tables[req_id]
        return HeadBooks(
            lens=table.lens.copy(),
            nblocks=table.nblocks.copy(),
            table=table.table.copy(),
        )

    def check_books(self) -> None:
        """Pool balanced, and only running requests hold head-blocks."""
        self.head_pool.check_books()
        running = {req.request_id for req in self.running}
        strays = set(self.head_pool.tables) - running
        if strays:
            raise PoolBooksError(
                f"requests that are not running hold head-blocks: {sorted(strays)}"
            )
