"""Per-request overrides of the engine's compression settings."""

import pytest

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError

ENGINE = KVCompressConfig(rate=8.0, protected_window=32)


def test_request_overrides_win():
    mine = ENGINE.for_request({"kv_compress_rate": "2", "kv_compress_policy": "snapkv",
                               "kv_compress_protected_window": 64, "other": 1})
    assert (mine.rate, mine.policy, mine.protected_window) == (2.0, "snapkv", 64)
    assert ENGINE.for_request(None) is ENGINE


@pytest.mark.parametrize("extra, message", [
    ({"kv_compress_rate": 0}, "--kv-compress-rate must be"),
    ({"kv_compress_rate": float("nan")}, "--kv-compress-rate must be"),
    ({"kv_compress_policy": "h2o"}, "--kv-compress-policy must be one of"),
    ({"kv_compress_max_tokens": -5}, "--kv-compress-max-tokens must be"),
    ({"kv_compress_head_floor": 1.5}, "--kv-compress-head-floor must be a number between 0 and 1"),
    ({"kv_compress_head_floor": float("nan")}, "--kv-compress-head-floor must be"),
    ({"kv_compress_window": 8}, "'kv_compress_window' cannot be set per request"),
    ({"kv_compress_typo": 1}, "'kv_compress_typo' cannot be set per request"),
])
def test_bad_request_settings_name_the_field(extra, message):
    with pytest.raises(KVCompressConfigError, match=message):
        ENGINE.for_request(extra)
