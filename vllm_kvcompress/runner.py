"""Model runner that mirrors the scheduler's per-head tables, prepares the
per-head slot mappings and attention metadata of every step, and runs the
compressions the scheduler orders (after the forward pass)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from .attention.metadata import current, set_current
from .attention.pool import HeadBlockCache
from .block_manager import PoolBooksError
from .config import KVCompressConfig
from .head_table import HeadTable
from .compression.compaction import probe_layout
from .compression.compressor import Compressor
from .compression.window import WindowStore
from .protocol import REPLY_ATTR, STEP_ATTR, CompressReply, StepMessage
from .scheduler import pool_from_kv_cache_config
from .step_builder import build_step


class KVCompressModelRunner(CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.kv_compress = KVCompressConfig.from_additional_config(
            vllm_config.additional_config
        )
        self.head_tables: dict[str, HeadTable] = {}
        self.head_cache: HeadBlockCache | None = None
        self._step: StepMessage | None = None
        self._scheduler_output = None
        self._reply: CompressReply | None = None
        self._compressing: dict[str, bool] = {}

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        pool = pool_from_kv_cache_config(kv_cache_config)
        group = kv_cache_config.kv_cache_groups[0]
        self.kv_layer_names = list(group.layer_names)
        self.layer_index = {name: i for i, name in enumerate(self.kv_layer_names)}
        self.num_kv_layers, self.num_kv_heads = pool.num_layers, pool.num_kv_heads
        self.head_block_size = pool.block_size
        spec = group.kv_cache_spec
        context = self.compilation_config.static_forward_context
        first_layer = context[self.kv_layer_names[0]]
        self.head_cache = HeadBlockCache(
            first_layer.kv_cache, pool.num_head_blocks, pool.block_size,
            spec.head_size, spec.dtype,
        )
        # Beside every KV slot: its eviction metric and token position. They
        # live outside vLLM's KV budget (8 bytes per slot).
        slots = (pool.num_head_blocks, pool.block_size)
        self.kv_metric = torch.zeros(slots, dtype=torch.float32)
        self.kv_position = torch.full(slots, -1, dtype=torch.int32)
        impl = first_layer.impl
        self.compressor = Compressor(
            self.head_cache, self.kv_metric, self.kv_position,
            probe_layout(impl.isa, pool.block_size, spec.head_size, spec.dtype),
            impl.scale,
        )
        self.windows = WindowStore(
            pool.num_layers, impl.num_heads, spec.head_size,
            self.kv_compress.window, spec.dtype,
        )

    # ------------------------------------------------------------ a step
    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        step = getattr(scheduler_output, STEP_ATTR, None)
        if step is None:
            raise RuntimeError(
                "SchedulerOutput carries no head-block message: KV compression "
                "needs vllm_kvcompress's scheduler (--scheduler-cls was changed?)"
            )
        self._apply_grants(scheduler_output, step)
        self._step, self._scheduler_output = step, scheduler_output
        try:
            output = super().execute_model(scheduler_output, intermediate_tensors)
            self._compress(step)
            return output
        finally:
            self._step = self._scheduler_output = None
            set_current(None)

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        if self._reply is not None:
            output = copy.copy(output)  # never touch vLLM's shared empty output
            setattr(output, REPLY_ATTR, self._reply)
            self._reply = None
        return output

    def _compress(self, step: StepMessage) -> None:
        """Run this step's ordered compressions; their reply rides on the
        step's ModelRunnerOutput."""
        metadata = current()
        if metadata is not None:
            self.windows.absorb(metadata.captured)
        if not step.compress:
            return
        started = time.perf_counter()
        reply = CompressReply()
        for req_id, order in step.compress.items():
            table = self.head_tables[req_id]
            window = self.windows.windows.get(req_id)
            if window is None:
                raise RuntimeError(f"no observation window for request {req_id}")
            reply.evicted[req_id] = self.compressor.compress(table, window, order)
            reply.new_lens[req_id] = table.lens.copy()
        reply.seconds = time.perf_counter() - started
        self._reply = reply

    def _apply_grants(self, scheduler_output, step: StepMessage) -> None:
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(scheduler_output.preempted_req_ids or ())
        for req_id in gone:
            self.head_tables.pop(req_id, None)
            self.windows.drop(req_id)
            self._compressing.pop(req_id, None)
        for req_id, grants in step.grants.items():
            for grant in grants:
                if grant.fresh:
                    self.head_tables[req_id] = HeadTable(
                        self.num_kv_layers, self.num_kv_heads, self.head_block_size
                    )
                self.head_tables[req_id].append_blocks(grant.counts, grant.block_ids)

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded,
                           num_tokens_unpadded, ubatch_slices=None):
        if ubatch_slices is not None:
            raise NotImplementedError("KV compression does not support micro-batching")
        if self._step is None:
            # Profiling or warm-up: the model runs, but nothing is cached.
            slots = torch.full(
                (self.num_kv_layers, num_tokens_padded, self.num_kv_heads), -1,
                dtype=torch.int64,
            )
        else:
            num_reqs = self.input_batch.num_reqs
            req_ids = self.input_batch.req_ids[:num_reqs]
            scheduled = self._scheduler_output.num_scheduled_tokens
            num_tokens = [scheduled[r] for r in req_ids]
            metadata, slots = build_step(
                [self.head_tables[r] for r in req_ids],
                num_tokens,
                num_tokens_padded,
                self.head_cache,
                self.layer_index,
            )
            self._note_new_tokens(req_ids, num_tokens, slots, metadata)
            set_current(metadata)
            if self._step.expected is not None:
                self._check_against_scheduler(self._step.expected)
        by_layer = {name: slots[i] for i, name in enumerate(self.kv_layer_names)}
        return {0: slots[0]}, by_layer

    def _note_new_tokens(self, req_ids, num_tokens, slots, metadata) -> None:
        """Record positions (and a zero metric) beside the new KVs, and name
        the query rows the observation windows keep."""
        first = self.input_batch.num_computed_tokens_cpu[: len(req_ids)].astype(np.int64)
        positions = np.concatenate(
            [f + np.arange(n) for f, n in zip(first, num_tokens)]
        ).astype(np.int32)
        written = slots[:, : len(positions)]  # [L, T, H]
        valid = written >= 0
        flat_slots = written[valid]
        token_of = torch.arange(len(positions))[None, :, None].expand_as(written)[valid]
        self.kv_position.view(-1)[flat_slots] = torch.from_numpy(positions)[token_of]
        self.kv_metric.view(-1)[flat_slots] = 0.0
        # A request that may be compressed keeps its window at every step: a
        # compression can be ordered at any step (interval, pool running dry).
        metadata.capture_rows = self.windows.plan(
            list(req_ids), num_tokens, [int(f) for f in first],
            [self._may_compress(r) for r in req_ids])

    def _may_compress(self, req_id: str) -> bool:
        known = self._compressing.get(req_id)
        if known is None:
            params = self.requests[req_id].sampling_params
            extra = params.extra_args if params else None
            known = self.kv_compress.for_request(extra).evicts
            self._compressing[req_id] = known
        return known

    def _check_against_scheduler(self, expected) -> None:
        """Debug mode: our tables equal the scheduler's, request by request."""
        for req_id, books in expected.items():
            table = self.head_tables.get(req_id)
            if table is None:
                raise PoolBooksError(f"worker has no head table for {req_id}")
            mask = np.arange(books.table.shape[2]) < books.nblocks[..., None]
            width = books.table.shape[2]
            ours = table.table[:, :, :width] if table.table.shape[2] >= width else None
            if (
                not np.array_equal(table.lens, books.lens)
                or not np.array_equal(table.nblocks, books.nblocks)
                or ours is None
                or not np.array_equal(ours[mask], books.table[mask])
            ):
                raise PoolBooksError(
                    f"scheduler and worker disagree on the head tables of {req_id}"
                )
