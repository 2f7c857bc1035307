"""The per-head logic of the model runner, once for every platform.

``HeadPagedRunnerMixin`` goes in front of vLLM's V1 runner (``CPUModelRunner``
in ``cpu.py``, ``GPUModelRunner`` in ``cuda.py``): it keeps the persistent
per-head tables in step with the scheduler's grants and vLLM's persistent
batch, hands the attention metadata builder what it needs, records token
positions and observation windows, and runs the compressions the scheduler
orders after the forward.
It only overrides V1 hooks; the compiled model around attention is vLLM's.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..attention.builder import StepInputs
from ..attention.pool_view import HeadBlockCache
from ..compression.compressor import CompressionJob, Compressor
from ..compression.policies import POLICIES
from ..compression.scorers.kvzap import LearnedScores
from ..compression.window import WindowStore
from ..config import KVCompressConfig
from ..kvzap.features import rotary_spec_of
from ..kvzap.scorer_file import load_scorer
from ..pool_shape import pool_shape
from ..protocol import (
    REPLY_ATTR, STEP_ATTR, CompressReply, PoolBooksError, StepMessage,
)
from ..ragged import token_rows
from .batch_tables import BatchHeadTables, RowFollower
from .rank_slice import RankSlice
from .reconstruction import ReconstructionScorer


def refuse_v2_runner(use_v2_model_runner: bool) -> None:
    """The per-head tables hook into the V1 runner only."""
    if use_v2_model_runner:
        raise RuntimeError(
            "KV compression runs on vLLM's V1 model runner; unset "
            "VLLM_USE_V2_MODEL_RUNNER.")


class HeadPagedRunnerMixin:
    """Mixed into a vLLM V1 model runner (listed before it)."""

    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.kv_compress = KVCompressConfig.from_additional_config(
            vllm_config.additional_config)
        self._step: StepMessage | None = None
        self._scheduler_output = None
        self._reply: CompressReply | None = None
        self._wants_window: dict[str, bool] = {}

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        shape = pool_shape(kv_cache_config)  # this rank's heads and memory
        self.rank_slice = RankSlice.of_this_worker(
            shape.num_layers, shape.num_kv_heads, shape.num_head_blocks)
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        layer_names = list(group.layer_names)
        context = self.compilation_config.static_forward_context
        impl = context[layer_names[0]].impl
        self.head_cache = HeadBlockCache(
            context[layer_names[0]].kv_cache, shape.num_head_blocks, shape.block_size,
            spec.head_size, spec.dtype)
        self.batch_tables = BatchHeadTables(
            shape.num_layers, shape.num_kv_heads, shape.block_size,
            self.input_batch.max_num_reqs, device=self.device)
        self.input_batch.block_table = RowFollower(
            self.input_batch.block_table, self.input_batch, self.batch_tables)
        # Beside every KV slot: its eviction metric and token position. They
        # live outside vLLM's KV budget (8 bytes per slot).
        slots = (shape.num_head_blocks, shape.block_size)
        self.kv_metric = torch.zeros(slots, dtype=torch.float32, device=self.device)
        self.kv_position = torch.full(slots, -1, dtype=torch.int32, device=self.device)
        self.compressor = Compressor(
            self.head_cache, self.kv_metric, self.kv_position,
            impl.ops.key_layout(shape.block_size, spec.head_size, spec.dtype),
            impl.scale, move_slots=impl.ops.move_slots,
            sum_over_ranks=self.rank_slice.sum_over_ranks,
            window_statistics=getattr(impl.ops, "window_statistics", None))
        self.windows = WindowStore(
            shape.num_layers, impl.num_heads, spec.head_size,
            self.kv_compress.window, spec.dtype, self.device)
        self.step_inputs = StepInputs(
            pool=self.head_cache, tables=self.batch_tables,
            layer_index={name: i for i, name in enumerate(layer_names)})
        self.reconstruction = ReconstructionScorer(
            self, self.head_cache, self.compressor.layout, impl.scale,
            self.step_inputs.layer_index, self.kv_compress.kvzip_chunk,
            self.kv_metric, self.kv_position)
        if self.kv_compress.scorer is not None:
            ranks = self.rank_slice
            learned = LearnedScores(load_scorer(self.kv_compress.scorer), self.device,
                                    ranks.heads, ranks.sum_over_ranks)
            learned.check(shape.num_layers, ranks.num_kv_heads * ranks.num_ranks,
                          spec.head_size, rotary_spec_of(self.model, spec.head_size))
            self.compressor.learned = learned
        for name in layer_names:
            context[name].impl.bind_pool(self.head_cache)
        for attn_group in self.attn_groups[0]:
            for builder in attn_group.metadata_builders:
                builder.bind(self.step_inputs)

    # ------------------------------------------------------------ a step
    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        step = getattr(scheduler_output, STEP_ATTR, None)
        if step is None:
            raise RuntimeError(
                "SchedulerOutput carries no head-block message: KV compression "
                "needs vllm_kvcompress's scheduler (--scheduler-cls was changed?)")
        self._step, self._scheduler_output = step, scheduler_output
        try:
            output = super().execute_model(scheduler_output, intermediate_tensors)
            self._compress(step)
            return output
        finally:
            self._step = self._scheduler_output = None
            self.step_inputs.capture = None

    def _update_states(self, scheduler_output):
        """vLLM's batch update (rows added, removed, moved), then this step's
        grants applied to the rows in place."""
        result = super()._update_states(scheduler_output)
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(scheduler_output.preempted_req_ids or ())
        for req_id in gone:
            self.batch_tables.drop(req_id)
            self.windows.drop(req_id)
            self.reconstruction.drop(req_id)
            if self.compressor.learned is not None:
                self.compressor.learned.drop(req_id)
            self._wants_window.pop(req_id, None)
        if self._step is not None:
            self.batch_tables.apply_grants(self.rank_slice.local_grants(self._step.grants))
        return result

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
        capture = self.step_inputs.capture
        if capture is not None:
            self.windows.absorb(capture)
        if not step.compress:
            return
        started = time.perf_counter()
        reply = CompressReply()
        jobs, copy_pairs = {}, []
        for req_id, order in step.compress.items():
            copied = None
            if order.copies is not None:  # copy-on-compress, before any change
                copied = self.rank_slice.local_copies(order.copies)
                copy_pairs.append(np.stack(copied).astype(np.int64))
                self.batch_tables.replace_ids(req_id, *copied)
            policy = POLICIES[order.settings.policy]
            window = self.windows.window(req_id)
            if window is None and policy.reads_window:
                raise RuntimeError(f"no observation window for request {req_id}")
            job = CompressionJob(self.batch_tables.snapshot(req_id), window, order,
                                 req_id=req_id)
            if policy.scorer.reconstructs:
                if copied is not None:  # on the device once, for adopt and publish
                    copied = tuple(torch.from_numpy(ids).to(self.device) for ids in copied)
                    job.publish = lambda pair=copied: self.reconstruction.publish(*pair)
                job.reconstruct = self._reconstruction_of(req_id, order, reply, copied)
            jobs[req_id] = job
        if copy_pairs:  # every request's copies in one call
            pairs = torch.from_numpy(np.concatenate(copy_pairs, axis=1)).to(self.device)
            self.compressor.copy_blocks(*pairs)
        evicted = self.compressor.compress_step(list(jobs.values()))
        for (req_id, job), count in zip(jobs.items(), evicted):
            reply.evicted[req_id] = count
            self.batch_tables.store_lengths(req_id, job.table)
            reply.new_lens[req_id] = job.table.lens.copy()
        reply.seconds = time.perf_counter() - started
        self._reply = self.rank_slice.gather_reply(reply)

    def _reconstruction_of(self, req_id: str, order, reply: CompressReply, copied):
        """The kvzip pass over the request's tokens so far, as the
        compressor's ``reconstruct`` hook; its cost goes on ``reply``. With
        ``copied`` (the prefix-cached blocks just copied: sources, copies)
        it first adopts their cached scores, if any (after the copies were
        made, so the hook runs inside the compression step)."""
        row = self.input_batch.req_id_to_index[req_id]
        context = self.input_batch.token_ids_cpu[row, : order.num_tokens].copy()

        def reconstruct(table, slots):
            started = time.perf_counter()
            if copied is not None:
                self.reconstruction.adopt(req_id, *copied, heads=table.lens.size)
            scores, fed = self.reconstruction.score(req_id, context, table, slots)
            reply.reconstruction_seconds += time.perf_counter() - started
            reply.reconstruction_tokens += fed
            return scores

        return reconstruct

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded,
                           num_tokens_unpadded, ubatch_slices=None):
        if ubatch_slices is not None:
            raise NotImplementedError("KV compression does not support micro-batching")
        if getattr(self, "batch_tables", None) is None:
            # Compile warm-up before the KV cache exists: vLLM writes nothing.
            return super()._get_slot_mappings(num_tokens_padded, num_reqs_padded,
                                              num_tokens_unpadded, ubatch_slices)
        shape = self.batch_tables
        slots = torch.full((shape.num_layers, num_tokens_padded, shape.num_kv_heads), -1,
                           dtype=torch.int64, device=self.device)
        if self._step is not None:  # else profiling / warm-up: nothing cached
            num_reqs = self.input_batch.num_reqs
            req_ids = self.input_batch.req_ids[:num_reqs]
            scheduled = self._scheduler_output.num_scheduled_tokens
            num_tokens = np.fromiter((scheduled[r] for r in req_ids), np.int64, num_reqs)
            written = self.batch_tables.advance(num_tokens)
            slots[:, : written.shape[1]] = written
            self._note_new_tokens(req_ids, num_tokens, written)
            if self._step.expected is not None:
                self._check_against_scheduler(self._step.expected)
        by_layer = {name: slots[i] for name, i in self.step_inputs.layer_index.items()}
        return {0: slots[0]}, by_layer

    def _note_new_tokens(self, req_ids, num_tokens: np.ndarray,
                         slots: torch.Tensor) -> None:
        """Record positions (and a zero metric) beside the new KVs, and name
        the query rows the observation windows keep."""
        first = torch.from_numpy(
            self.input_batch.num_computed_tokens_cpu[: len(req_ids)].astype(np.int64))
        row_of_token, offset = token_rows(torch.from_numpy(num_tokens))
        positions = (first[row_of_token] + offset).to(self.device)
        flat_slots = slots.reshape(-1)
        self.kv_position.view(-1)[flat_slots] = positions.to(torch.int32)[
            None, :, None].expand_as(slots).reshape(-1)
        self.kv_metric.view(-1)[flat_slots] = 0.0
        self.reconstruction.written(flat_slots)
        # A request whose compressions read its window keeps it at every step:
        # a compression can be ordered at any step (interval, pool running dry).
        self.step_inputs.capture = self.windows.plan(
            req_ids, num_tokens, first.numpy(), [self._wants_window_of(r) for r in req_ids])

    def _wants_window_of(self, req_id: str) -> bool:
        """Whether the request may be compressed by a policy that scores
        KVs from the observation window (kvzip, kvzap, streamingllm and random
        never read it, so their queries are not kept)."""
        known = self._wants_window.get(req_id)
        if known is None:
            params = self.requests[req_id].sampling_params
            settings = self.kv_compress.for_request(params.extra_args if params else None)
            known = settings.evicts and POLICIES[settings.policy].reads_window
            self._wants_window[req_id] = known
        return known

    def _check_against_scheduler(self, expected) -> None:
        """Debug mode: our tables equal the scheduler's, request by request
        (after this step's lengths advanced, both count the same tokens)."""
        for req_id, books in expected.items():
            books = self.rank_slice.local_books(books)
            if req_id not in self.batch_tables.row_of:
                raise PoolBooksError(f"worker has no head table for {req_id}")
            ours = self.batch_tables.snapshot(req_id)
            width = books.table.shape[2]
            mask = np.arange(width) < books.nblocks[..., None]
            if (not np.array_equal(ours.lens, books.lens)
                    or not np.array_equal(ours.nblocks, books.nblocks)
                    or ours.table.shape[2] < int(books.nblocks.max(initial=0))
                    or not np.array_equal(
                        _pad(ours.table, width)[mask], books.table[mask])):
                raise PoolBooksError(
                    f"scheduler and worker disagree on the head tables of {req_id}")


def _pad(table: np.ndarray, width: int) -> np.ndarray:
    if table.shape[2] >= width:
        return table[:, :, :width]
    out = np.zeros(table.shape[:2] + (width,), dtype=table.dtype)
    out[:, :, : table.shape[2]] = table
    return out
