"""The engine runs on every ops implementation: the Triton kernels of
``kernels/`` (the CUDA path's, here in Triton's interpreter), the CUDA
path's FlashAttention view (with a torch stand-in for vLLM's compiled
FlashAttention, which cannot run here) and the plain-torch oracle give stock vLLM's greedy tokens at rate 1 on the tiny GQA
Llama, through the same runner, tables and builder as the C++ CPU ops, and
compress with balanced books at rate 4. Small shapes: the interpreter is
slow."""

import pytest

from engine_helpers import mixed_prompts, run_engine_job

pytestmark = pytest.mark.engine

ENGINE = dict(dtype="float32", max_model_len=512, block_size=32, enforce_eager=True,
              max_num_batched_tokens=64, max_num_seqs=8)
LENGTHS = [90, 5, 37, 64]  # 90 is read in two chunks


def run(tiny_llama, tmp_path, name, ops=None, kept_positions=False, backend=None, **plugin):
    spec = {"model": tiny_llama, "prompts": mixed_prompts(tiny_llama, LENGTHS, seed=31),
            "max_tokens": 24, "engine": {**ENGINE, **plugin}, "kept_positions": kept_positions,
            "cpu_attn_backend": backend}
    if ops:
        spec["env"] = {"VLLM_KVCOMPRESS_OPS": ops, "TRITON_INTERPRET": "1"}
    return run_engine_job(spec, tmp_path, name)


@pytest.fixture(scope="module")
def stock(tiny_llama, tmp_path_factory):
    return run(tiny_llama, tmp_path_factory.mktemp("ops"), "stock")


@pytest.mark.parametrize("ops", ["torch", "triton", "flash-reference"])
def test_rate_one_gives_stock_tokens(tiny_llama, tmp_path, stock, ops):
    plugin = run(tiny_llama, tmp_path, ops, ops, kv_compress_rate=1, kv_compress_debug=True)
    assert len(stock["outputs"]) == len(LENGTHS)
    assert plugin["outputs"] == stock["outputs"]
    assert plugin["final"]["held"] == 0


def kept_sets(result) -> list:
    """The positions every (layer, head) of every request held after every step."""
    return [{rid: r["kept"] for rid, r in step["requests"].items()}
            for step in result["trace"]]


@pytest.fixture(scope="module")
def cpu_at_rate_8(tiny_llama, tiny_llama_scorer, tmp_path_factory):
    """vLLM's CPU kernels with torch statistics at rate 8, per policy (run once)."""
    runs = {}

    def run_policy(policy):
        if policy not in runs:
            runs[policy] = run(tiny_llama, tmp_path_factory.mktemp("cpu"), f"cpu-{policy}",
                               kept_positions=True, **rate_8(policy, tiny_llama_scorer))
        return runs[policy]

    return run_policy


def rate_8(policy, scorer=None):
    settings = dict(kv_compress_rate=8, kv_compress_policy=policy,
                    kv_compress_protected_window=8, kv_compress_debug=True)
    if policy == "kvzap":
        settings["kv_compress_scorer"] = scorer
    return settings


@pytest.mark.parametrize("ops, policy", [("triton", "kvcompress"), ("triton", "cake"),
                                         ("triton", "kvzip"), ("triton", "kvzap"),
                                         ("flash-reference", "kvcompress")])
def test_cuda_path_ops_evict_as_the_cpu_path(tiny_llama, tiny_llama_scorer, tmp_path,
                                             cpu_at_rate_8, ops, policy):
    """At rate 8 the CUDA path's ops (the Triton statistics kernel scores
    the window, or the reconstruction kernels run kvzip's pass, or kvzap
    reads the K and V from the row-major pool the Triton ops keep; Triton or
    the FlashAttention view attends, Triton compacts)
    keep, step by step, the same KVs in every head as vLLM's CPU kernels with
    torch statistics, and answer the same. (snapkv differs from kvcompress
    only in the planner, which is the same code on every ops.)"""
    cpu = cpu_at_rate_8(policy)
    ours = run(tiny_llama, tmp_path, f"{ops}-{policy}", ops, kept_positions=True,
               **rate_8(policy, tiny_llama_scorer))
    assert cpu["evicted"] > 0
    # kvzip scores by its reconstruction pass (the Triton kernels here),
    # kvzap by neither pass nor window, the others by the observation window
    # (the statistics kernel).
    passes = ("reconstruction_tokens", "window_slots")
    if policy == "kvzap":
        assert [cpu[k] for k in passes] == [ours[k] for k in passes] == [0, 0]
    else:
        scored_by = passes[0] if policy == "kvzip" else passes[1]
        assert cpu[scored_by] > 0 and ours[scored_by] == cpu[scored_by]
    assert ours["evicted"] == cpu["evicted"]
    assert kept_sets(ours) == kept_sets(cpu)
    assert ours["outputs"] == cpu["outputs"]
    assert ours["final"]["held"] == 0


def test_triton_ops_compress_with_balanced_books(tiny_llama, tmp_path):
    result = run(tiny_llama, tmp_path, "triton-rate4", "triton", kv_compress_rate=4,
                 kv_compress_protected_window=8, kv_compress_debug=True)
    assert result["evicted"] > 0
    assert all(len(t) == 24 for t in result["outputs"].values())
    assert result["final"]["held"] == 0 and result["final"]["tables"] == []


def test_cuda_backend_class_serves_the_engine(tiny_llama, tmp_path, cpu_at_rate_8):
    """The CUDA path's backend class (``CUSTOM`` on CUDA: its impl, declared
    layout and block sizes) in place of the CPU one, with the FlashAttention
    view's stand-in, keeps the same KVs at rate 8 as vLLM's CPU kernels and
    answers the same. The CPU runner stands in for vLLM's GPU runner, whose
    hooks it shares (test_cuda_setup.py)."""
    from vllm_kvcompress.attention.cuda_backend import CUDA_BACKEND_PATH

    cpu = cpu_at_rate_8("kvcompress")
    ours = run(tiny_llama, tmp_path, "cuda-backend", "flash-reference", kept_positions=True,
               backend=CUDA_BACKEND_PATH, **rate_8("kvcompress"))
    assert ours["backend"] == "HeadPagedCudaBackend"
    assert ours["evicted"] == cpu["evicted"] > 0
    assert kept_sets(ours) == kept_sets(cpu)
    assert ours["outputs"] == cpu["outputs"]
