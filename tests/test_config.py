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


def test_cake_settings_default_and_override_per_request():
    assert (ENGINE.cake_tau1, ENGINE.cake_tau2, ENGINE.cake_gamma) == (1.0, 1.0, 200.0)
    mine = ENGINE.for_request({"kv_compress_policy": "cake", "kv_compress_cake_tau1": "1.6",
                               "kv_compress_cake_tau2": 0.4, "kv_compress_cake_gamma": 0})
    assert (mine.policy, mine.cake_tau1, mine.cake_tau2, mine.cake_gamma) == ("cake", 1.6, 0.4, 0.0)
    assert ENGINE.for_request({"kv_compress_policy": "pyramidkv"}).policy == "pyramidkv"
    engine = KVCompressConfig.from_additional_config(
        {"kv_compress_rate": 4, "kv_compress_cake_gamma": "50"})
    assert engine.cake_gamma == 50.0


def test_cake_settings_say_they_apply_to_cake_only():
    from vllm_kvcompress.config import SETTINGS_BY_KEY

    for key in ("kv_compress_cake_tau1", "kv_compress_cake_tau2", "kv_compress_cake_gamma"):
        assert SETTINGS_BY_KEY[key].help.startswith("cake only")


@pytest.mark.parametrize("extra, message", [
    ({"kv_compress_cake_tau1": 0}, "--kv-compress-cake-tau1 must be a finite number > 0"),
    ({"kv_compress_cake_tau1": "inf"}, "--kv-compress-cake-tau1 must be a finite number > 0"),
    ({"kv_compress_cake_tau2": -1.0}, "--kv-compress-cake-tau2 must be a finite number > 0"),
    ({"kv_compress_cake_tau2": True}, "--kv-compress-cake-tau2 must be"),
    ({"kv_compress_cake_gamma": -0.5}, "--kv-compress-cake-gamma must be a finite number >= 0"),
    ({"kv_compress_cake_gamma": float("nan")}, "--kv-compress-cake-gamma must be"),
    ({"kv_compress_cake_gamma": "lots"}, "--kv-compress-cake-gamma must be"),
])
def test_bad_cake_settings_name_the_flag(extra, message):
    with pytest.raises(KVCompressConfigError, match=message):
        ENGINE.for_request(extra)
