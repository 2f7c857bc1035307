"""vllm_kvcompress: per-head KV-cache compression for vLLM, as a plugin.

Importing the package lets ``LLM(model, kv_compress_rate=R)`` accept the
keyword; ``vllm serve --kv-compress-rate R`` and
``LLM(model, additional_config={"kv_compress_rate": R})`` need no import.
"""

from .plugin import register

register()

__all__ = ["register"]
