"""Runs one real vLLM engine in its own process and reports what happened.

Tests start this script once per engine configuration (stock or plugin), so
engines never share a process. The engine core runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the head-block pool can be read after
every step.

    python tests/engine_job.py SPEC.json OUT.json
SPEC: model, engine (LLM keyword arguments), prompts (token-id lists),
max_tokens, and optionally env (variables set first), cpu_attn_backend (a
backend class path the CPU worker registers instead of its own), abort (request
indices) with either abort_at_step or abort_during_compression.
"""

import json
import os
import sys

import torch


def run(spec: dict) -> dict:
    os.environ.update(spec.get("env", {}))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm_kvcompress  # noqa: F401  (LLM(kv_compress_rate=...) keyword)
    from vllm import LLM, SamplingParams

    if spec.get("cpu_attn_backend"):
        # The CPU worker serves CPU_ATTN with this backend class instead of
        # the CPU one (tests of the CUDA backend class in the CPU engine).
        import vllm_kvcompress.worker.cpu as cpu_worker

        cpu_worker.BACKEND_PATH = spec["cpu_attn_backend"]

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = getattr(scheduler, "head_pool", None)
    preemptions = []
    original_preempt = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        preemptions.append(request.request_id)
        return original_preempt(request, *args, **kwargs)

    scheduler._preempt_request = counting_preempt
    # Head-blocks each request holds right after scheduling, before the
    # step's compressions: its peak.
    peak_blocks = {}
    if pool is not None:
        original_schedule = scheduler.schedule

        def schedule_and_note_peaks(*args, **kwargs):
            output = original_schedule(*args, **kwargs)
            for rid, table in pool.tables.items():
                key = rid.rsplit("-", 1)[0]
                peak_blocks[key] = max(peak_blocks.get(key, 0), int(table.nblocks.sum()))
            return output

        scheduler.schedule = schedule_and_note_peaks
    aborted_in_compression = []
    if spec.get("abort_during_compression"):
        abort_while_compressing(engine, scheduler, spec["abort"], aborted_in_compression)

    prefix_hits = count_prefix_hits(scheduler)
    runner = in_process_runner(engine)
    watch = CachedBytesWatch(engine, pool) if spec.get("watch_cached") else None
    extra = spec.get("extra_args") or [None] * len(spec["prompts"])
    # Requests go in waves: each wave once the previous one has finished.
    waves = spec.get("waves") or [list(range(len(spec["prompts"])))]

    def add_wave():
        for i in waves.pop(0):
            params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0,
                                    ignore_eos=True, extra_args=extra[i])
            engine.add_request(str(i), {"prompt_token_ids": spec["prompts"][i]}, params)

    outputs, finish_reasons, trace, step = {}, {}, [], 0
    held_before = held_after = None
    abort = [str(i) for i in spec.get("abort", [])]
    add_wave()
    while engine.has_unfinished_requests() or waves:
        if not engine.has_unfinished_requests():
            add_wave()
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
                finish_reasons[out.request_id] = out.outputs[0].finish_reason
        step += 1
        if step == spec.get("abort_at_step"):
            held_before = pool.num_held if pool else None
            engine.abort_request(abort)
            held_after = pool.num_held if pool else None
        trace.append({
            "running": len(scheduler.running),
            "held": pool.num_held if pool else None,
            "free": pool.num_free if pool else None,
            "free_by_rank": pool.free_by_rank.tolist() if pool else None,
            "cached": pool.num_cached if pool else None,
            "usage": scheduler.kv_cache_manager.usage,
            "requests": {  # by the id given to add_request
                rid.rsplit("-", 1)[0]: {"kvs": int(t.lens.sum()), "blocks": int(t.nblocks.sum()),
                      "computed": scheduler.requests[rid].num_computed_tokens,
                      "layer_kvs": t.lens.sum(axis=1).tolist(),
                      # [layer][rank] KVs, and head-blocks per rank
                      "rank_layer_kvs": t.lens.reshape(pool.num_layers, pool.num_ranks,
                                                       -1).sum(axis=2).tolist(),
                      "rank_blocks": pool.held_by(rid).tolist(),
                      "head_kvs": t.lens.tolist(),  # [layer][head]
                      **({"kept": kept_positions(runner, t)}
                         if spec.get("kept_positions") else {}),
                      "max_head": int(t.lens.max()), "min_head": int(t.lens.min())}
                for rid, t in pool.tables.items()
            } if pool else {},
        })
        if pool is not None:
            scheduler.check_books()
        if watch is not None:
            watch.check()
    result = {
        "outputs": outputs,
        "finish_reasons": finish_reasons,
        "trace": trace,
        "preemptions": len(preemptions),
        "held_around_abort": [held_before, held_after],
        "aborted_in_compression": aborted_in_compression,
        "peak_blocks": peak_blocks,
        "prefix_hits": prefix_hits,
        "cached_blocks_watched": watch.watched if watch else 0,
        # vLLM compiled the model (no enforce_eager, compilation mode on).
        "compiled": compiled_mode(engine),
    }
    if pool is not None:
        result["evicted"] = scheduler.stats.kvs_evicted
        result["low_memory_compressions"] = scheduler.stats.low_memory_compressions
        result["reconstruction_tokens"] = scheduler.stats.reconstruction_tokens
        if runner is not None:  # observation-window slots the worker ever made
            result["window_slots"] = int(runner.windows.queries.shape[0])
            result["backend"] = runner.attn_groups[0][0].backend.__name__
        result["stats_live_requests"] = scheduler.stats.live_requests
        result["final"] = {
            "held": pool.num_held,
            "free": pool.num_free,
            "size": pool.num_head_blocks,
            "tables": sorted(pool.tables),
        }
    return result


def in_process_runner(engine):
    """The model runner when the only worker runs in this process, else None."""
    executor = engine.engine_core.engine_core.model_executor
    worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
    return getattr(worker, "model_runner", None)


def kept_positions(runner, table) -> list:
    """The token positions each (layer, head) of a request holds, sorted:
    which KVs survived (single worker in this process only)."""
    positions = runner.kv_position
    kept = []
    for layer_blocks, layer_lens in zip(table.table, table.lens):
        kept.append([])
        for blocks, n in zip(layer_blocks, layer_lens.tolist()):
            ids = torch.from_numpy(blocks[:-(-n // table.block_size)].astype("int64"))
            kept[-1].append(sorted(positions[ids].reshape(-1)[:n].tolist()))
    return kept


class CachedBytesWatch:
    """The bytes (K, V and the positions beside them) of every head-block
    in the prefix cache, checked unchanged after every step for as long as
    the block stays cached (single worker in this process only)."""

    def __init__(self, engine, pool):
        self.runner = in_process_runner(engine)
        self.pool = pool
        self.seen = {}  # (hash, id) -> bytes
        self.watched = 0

    def check(self) -> None:
        kv, positions = self.runner.head_cache.kv, self.runner.kv_position
        now = {}
        for block_hash, ids in self.pool.prefix.ids.items():
            for block in ids.reshape(-1).tolist():
                key = (block_hash, block)
                data = kv[block].clone(), positions[block].clone()
                before = self.seen.get(key)
                if before is not None and not (torch.equal(before[0], data[0])
                                               and torch.equal(before[1], data[1])):
                    raise AssertionError(f"cached head-block {block} changed")
                now[key] = before or data
        self.watched += len(set(now) - set(self.seen))
        self.seen = now


def count_prefix_hits(scheduler) -> dict:
    """Cached tokens found per request id at its last prefix-cache lookup (for
    stock and plugin alike), filled in as the engine runs."""
    manager = scheduler.kv_cache_manager
    original = manager.get_computed_blocks
    hits = {}

    def get_computed_blocks(request):
        found = original(request)
        key = request.request_id.rsplit("-", 1)[0]
        hits[key] = found[1]  # the last lookup (a request may wait and look again)
        return found

    manager.get_computed_blocks = get_computed_blocks
    return hits


def compiled_mode(engine) -> bool:
    from vllm.config import CompilationMode

    config = engine.vllm_config
    return (not config.model_config.enforce_eager
            and config.compilation_config.mode != CompilationMode.NONE)


def abort_while_compressing(engine, scheduler, indices, aborted: list) -> None:
    """Abort the given requests in the step that compresses them, after the
    worker ran the compression and before the scheduler applies its reply:
    the abort lands while the compression is in flight."""
    from vllm_kvcompress.protocol import STEP_ATTR

    targets = {str(i) for i in indices}
    original_update = scheduler.update_from_output

    def update_from_output(scheduler_output, runner_output):
        ordered = getattr(scheduler_output, STEP_ATTR).compress
        victims = [rid.rsplit("-", 1)[0] for rid in ordered
                   if rid.rsplit("-", 1)[0] in targets - set(aborted)]
        if victims:
            engine.abort_request(victims)
            aborted.extend(victims)
        return original_update(scheduler_output, runner_output)

    scheduler.update_from_output = update_from_output


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
