"""vLLM ``Scheduler`` whose KV memory is the head-block pool.

Plugged in through ``--scheduler-cls``. Each ``schedule()`` attaches a
``StepMessage`` with this step's head-block grants to the ``SchedulerOutput``;
in debug mode the pool's books are checked after every step.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .block_manager import HeadBlockPool, PoolBooksError
from .config import KVCompressConfig
from .kv_cache_manager import HeadBlockKVCacheManager
from .protocol import STEP_ATTR, HeadBooks, StepMessage

logger = init_logger(f"vllm.{__name__}")


def pool_from_kv_cache_config(kv_cache_config) -> HeadBlockPool:
    """The head-block pool over the memory vLLM sized for its token blocks."""
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if not isinstance(spec, FullAttentionSpec) or spec.sliding_window is not None:
        raise ValueError(
            "KV compression needs one KV-cache group of full attention layers; "
            f"got {[type(g.kv_cache_spec).__name__ for g in groups]}"
        )
    num_layers = len(groups[0].layer_names)
    per_token_block = num_layers * spec.num_kv_heads
    # vLLM keeps one token block aside as its null block; leaving it out too
    # makes the pool hold exactly what stock vLLM holds at rate 1.
    return HeadBlockPool(
        num_head_blocks=(kv_cache_config.num_blocks - 1) * per_token_block,
        num_layers=num_layers,
        num_kv_heads=spec.num_kv_heads,
        block_size=spec.block_size,
    )


class KVCompressScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.kv_compress = KVCompressConfig.from_additional_config(
            vllm_config.additional_config
        )
        self.head_pool = pool_from_kv_cache_config(kv_cache_config)
        self.kv_cache_manager = HeadBlockKVCacheManager(
            self.kv_cache_manager, self.head_pool
        )
        logger.info(
            "KV compression: %d head-blocks of %d tokens (%d layers x %d KV heads).",
            self.head_pool.num_head_blocks,
            self.head_pool.block_size,
            self.head_pool.num_layers,
            self.head_pool.num_kv_heads,
        )

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        message = StepMessage(grants=self.head_pool.take_grants())
        if self.kv_compress.debug:
            self.check_books()
            message.expected = {
                req_id: self._books_of(req_id)
                for req_id in output.num_scheduled_tokens
            }
        setattr(output, STEP_ATTR, message)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.kv_compress.debug:
            self.check_books()
        return outputs

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
