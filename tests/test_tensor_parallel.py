"""Tensor parallelism on CPU: two worker processes (vLLM's multiprocessing
executor, gloo and shared-memory communicators), each holding the
head-blocks of its own 2 of the model's 4 KV heads. Debug mode checks the
books after every step: every rank's ids balance, no head holds another
rank's id, and each worker's tables equal its columns of the scheduler's."""

import pytest

from engine_helpers import first_compressed, mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

RANKS, LAYERS, KV_HEADS, BLOCK = 2, 2, 4, 32
# One core per rank on a 2-core machine (vLLM's "auto" binding wants a NUMA
# node per rank).
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
BASE = dict(dtype="float32", max_model_len=2048, block_size=BLOCK,
            enable_prefix_caching=False, max_num_batched_tokens=512)
TP = {**BASE, "tensor_parallel_size": RANKS}
DEBUG = {"kv_compress_debug": True}


@pytest.fixture(scope="module")
def llama_4kv(smollm2) -> str:
    from vllm_kvcompress.assets import tiny_llama_path

    return tiny_llama_path(num_kv_heads=KV_HEADS)


@pytest.fixture(scope="module")
def scorer_4kv(llama_4kv, tmp_path_factory) -> str:
    """A kvzap scorer for the tiny model (seeded random weights: what is
    tested here is that every rank scores and evicts, not what it keeps)."""
    from vllm_kvcompress.kvzap.untrained import write_untrained_scorer

    return str(write_untrained_scorer(llama_4kv, tmp_path_factory.mktemp("scorer") / "s.st"))


def blocks_per_rank(tokens: int) -> int:
    """Head-blocks one rank holds for ``tokens`` uncompressed KVs per head."""
    return -(-tokens // BLOCK) * LAYERS * (KV_HEADS // RANKS)


def test_rate_1_is_stock_and_rate_8_frees_blocks_on_every_rank(llama_4kv, scorer_4kv,
                                                              tmp_path):
    """Both engines in vLLM's default compiled mode. Requests 0-2 are sent at
    rate 1 (per-request setting), 3-5 at the engine's rate 8: 3 and 4 with
    the default policy, kvzap (the scorer is given), whose ranks sum their
    shares of each prediction; 5 with kvzip (per-request setting)."""
    lengths = [300, 900, 150, 1000, 600, 450]
    prompts = mixed_prompts(llama_4kv, lengths, seed=5)
    spec = {"model": llama_4kv, "prompts": prompts, "max_tokens": 48, "env": ENV}
    stock = run_engine_job({**spec, "engine": TP}, tmp_path, "tp-stock")
    rate_1 = {"kv_compress_rate": 1}
    plugin = run_engine_job({**spec, "engine": {**TP, **DEBUG, "kv_compress_rate": 8,
                                                "kv_compress_scorer": scorer_4kv},
                             "extra_args": [rate_1] * 3 + [None] * 2
                             + [{"kv_compress_policy": "kvzip"}]},
                            tmp_path, "tp-plugin")
    assert plugin["compiled"] and stock["compiled"]
    # Only request 5's context was re-read (kvzip); kvzap re-reads nothing.
    assert 0 < plugin["reconstruction_tokens"] < lengths[4]
    for i in "012":
        assert plugin["outputs"][i] == stock["outputs"][i]
    for i in "345":
        assert len(plugin["outputs"][i]) == 48
    assert plugin["evicted"] > 0
    for i, length in zip("012345", lengths):
        held = first_compressed(plugin["trace"], i, length)["requests"][i]["rank_blocks"]
        if i in "012":  # uncompressed: the whole prompt on each rank
            assert held == [blocks_per_rank(length + 1)] * RANKS
        else:  # 1/8 of the prompt plus the protected window, per rank
            kept = (length - 32) / 8 + 32
            assert all(h <= blocks_per_rank(kept) + LAYERS * KV_HEADS // RANKS
                       for h in held), (i, held)
    size = plugin["final"]["size"] // RANKS
    assert all(min(step["free_by_rank"]) < size for step in plugin["trace"][:-1])
    assert plugin["trace"][-1]["free_by_rank"] == [size] * RANKS


def test_abort_and_preemption_leak_nothing_on_any_rank(llama_4kv, tmp_path):
    """A pool too small for everyone: vLLM preempts, two requests are aborted
    mid-generation, and when the engine is idle every rank has all its
    head-blocks back."""
    prompts = mixed_prompts(llama_4kv, [250] * 6, seed=6)
    engine = {**TP, **DEBUG, "kv_compress_rate": 8, "enforce_eager": True,
              "num_gpu_blocks_override": 40, "max_model_len": 1024}
    rate_1 = {"kv_compress_rate": 1}
    result = run_engine_job(
        {"model": llama_4kv, "prompts": prompts, "max_tokens": 150, "env": ENV,
         "engine": engine, "extra_args": [rate_1] * 4 + [None] * 2,
         "abort_at_step": 12, "abort": [1, 4]},
        tmp_path, "tp-pressure")
    assert result["preemptions"] > 0
    before, after = result["held_around_abort"]
    assert before > after
    assert sorted(result["outputs"]) == ["0", "2", "3", "5"]
    assert all(len(out) == 150 for out in result["outputs"].values())
    size = 39 * LAYERS * KV_HEADS  # (token blocks - null block) x layers x heads
    assert result["final"] == {"held": 0, "free": size, "size": size, "tables": []}
    assert result["trace"][-1]["free_by_rank"] == [size // RANKS] * RANKS


@pytest.fixture(scope="module")
def contrast_llama(smollm2) -> str:
    """Layer 0 attends sharply with rank 0's heads and diffusely with rank
    1's; layer 1 the other way round. Each rank alone would give its sharp
    layer few KVs; the whole model has one sharp and one diffuse half in
    every layer."""
    from vllm_kvcompress.assets import tiny_llama_path

    sharp, diffuse = [4.0] * 4, [0.05] * 4  # 8 query heads, 4 per rank
    return tiny_llama_path(num_kv_heads=KV_HEADS,
                           query_scales=[sharp + diffuse, diffuse + sharp])


def test_cake_splits_layers_as_one_rank_would(contrast_llama, tmp_path):
    """CAKE's layer statistics are summed over the ranks, so with TP=2 every
    rank splits its budget over layers as TP=1 splits the whole (within
    block rounding); from its own heads alone each rank would give nearly
    everything to its diffuse layer."""
    lengths = [1500, 1100]
    spec = {"model": contrast_llama, "prompts": mixed_prompts(contrast_llama, lengths, seed=4),
            "max_tokens": 4, "env": ENV}
    engine = {**BASE, **DEBUG, "enforce_eager": True, "max_num_batched_tokens": 2048,
              "kv_compress_rate": 4, "kv_compress_policy": "cake"}
    one = run_engine_job({**spec, "engine": engine}, tmp_path, "cake-tp1")
    two = run_engine_job({**spec, "engine": {**engine, "tensor_parallel_size": RANKS}},
                         tmp_path, "cake-tp2")
    for i, length in zip("01", lengths):
        whole = first_compressed(one["trace"], i, length)["requests"][i]["layer_kvs"]
        split = first_compressed(two["trace"], i, length)["requests"][i]["rank_layer_kvs"]
        for layer in range(LAYERS):
            # Each head keeps its layer share plus less than one block.
            assert abs(sum(split[layer]) - whole[layer]) <= KV_HEADS * BLOCK, (i, whole, split)
            for rank_kvs in split[layer]:
                assert abs(rank_kvs - whole[layer] / RANKS) <= KV_HEADS // RANKS * BLOCK, (
                    i, whole, split)


def test_serve_with_two_ranks_answers_the_openai_client(llama_4kv, tmp_path):
    """``vllm serve --tensor-parallel-size 2 --kv-compress-rate 8``: plain and
    streamed completions of a long prompt are answered, KVs are evicted,
    the second request hits the prefix cache, and once idle both ranks have
    every head-block back (cached blocks count as free)."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from server_util import metric, vllm_server, wait_idle

    text = AutoTokenizer.from_pretrained(llama_4kv).decode(
        mixed_prompts(llama_4kv, [900], seed=7)[0])
    args = ["--tensor-parallel-size", str(RANKS), "--kv-compress-rate", "8",
            "--kv-compress-debug", "--max-model-len", "2048", "--enforce-eager"]
    with vllm_server(llama_4kv, args, tmp_path / "server.log", env=ENV) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        common = dict(model=llama_4kv, prompt=text, max_tokens=24, temperature=0)
        plain = client.completions.create(**common)
        assert plain.usage.completion_tokens == 24 and plain.choices[0].text
        # Prefix caching is on (vLLM's default): the second request reuses
        # the first one's cached prompt blocks, so its prompt is computed in
        # a different chunk and its greedy text may drift; it must still be
        # answered in full.
        chunks = list(client.completions.create(stream=True, **common))
        assert "".join(c.choices[0].text for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert metric(base, "vllm:kv_compress_kvs_evicted_total") > 0
        assert metric(base, "vllm:prefix_cache_hits_total") > 0
        assert wait_idle(base) == 0
        total = metric(base, "vllm:kv_compress_head_blocks_total")
        assert metric(base, "vllm:kv_compress_head_blocks_free") == total
        assert metric(base, "vllm:kv_compress_head_blocks_free_lowest_rank") == total / RANKS
