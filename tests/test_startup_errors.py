"""Setups the plugin cannot serve are refused at start-up, before any model
load, with a message naming the flag and what is allowed; without the flag the
plugin changes nothing."""

import os
import shutil
import subprocess
import sys

import pytest
from vllm.config import CompilationMode, KVTransferConfig
from vllm.engine.arg_utils import EngineArgs

import vllm_kvcompress  # noqa: F401  (adds the LLM keyword)
from vllm_kvcompress.config import POLICIES, KVCompressConfigError
from vllm_kvcompress.engine_args import UnsupportedSetupError


def config_only_model(tmp_path_factory, tokenizer_from: str, name: str, config) -> str:
    """A model directory with a config and tokenizer but no weights: enough
    for vLLM to build and check its engine config."""
    path = tmp_path_factory.mktemp(name)
    config.save_pretrained(path)
    for f in os.listdir(tokenizer_from):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(tokenizer_from, f), path)
    return str(path)


SMALL = dict(vocab_size=49152, hidden_size=256, intermediate_size=256,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="module")
def unsupported_models(tiny_llama, tmp_path_factory):
    from transformers import DeepseekV2Config, JambaConfig, MistralConfig, WhisperConfig

    return {
        "sliding-window": config_only_model(
            tmp_path_factory, tiny_llama, "sw", MistralConfig(sliding_window=64, **SMALL)),
        "latent attention (MLA)": config_only_model(
            tmp_path_factory, tiny_llama, "mla", DeepseekV2Config(
                kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16,
                qk_nope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                first_k_dense_replace=10, **SMALL)),
        "hybrid": config_only_model(
            tmp_path_factory, tiny_llama, "hyb", JambaConfig(
                num_experts=1, attn_layer_period=2, attn_layer_offset=1,
                expert_layer_period=2, expert_layer_offset=1, **SMALL)),
        # Speech in, text out: an encoder-decoder and a multimodal model.
        "multimodal or encoder-decoder": config_only_model(
            tmp_path_factory, tiny_llama, "whisper", WhisperConfig(
                d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                decoder_ffn_dim=64, encoder_attention_heads=2,
                decoder_attention_heads=2)),
    }


def build(model: str, **kwargs):
    return EngineArgs(model=model, dtype="float32", **kwargs).create_engine_config()


@pytest.mark.parametrize("rate", [0.5, 0, -3, "fast", float("nan"), float("inf"), True])
def test_bad_rate_names_the_flag(tiny_llama, rate):
    with pytest.raises(KVCompressConfigError, match=r"--kv-compress-rate must be .*>= 1"):
        build(tiny_llama, kv_compress_rate=rate)


def test_bad_rate_through_additional_config(tiny_llama):
    with pytest.raises(KVCompressConfigError, match="--kv-compress-rate"):
        build(tiny_llama, additional_config={"kv_compress_rate": "x"})


def test_unknown_setting_is_named(tiny_llama):
    with pytest.raises(KVCompressConfigError, match="kv_compress_ratio.*allowed"):
        build(tiny_llama, additional_config={"kv_compress_ratio": 8})


@pytest.mark.parametrize("kwargs, flag", [
    # tiny_llama has 2 KV heads: 4 ranks would replicate them.
    ({"tensor_parallel_size": 4}, "--tensor-parallel-size 4 with a model of 2 KV heads"
                                  ".*Allowed: --tensor-parallel-size up to 2"),
    ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size 2.*Allowed: --pipeline-parallel-size 1"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                             "prompt_lookup_max": 3}}, "--speculative-config"),
    ({"block_size": 48}, "--block-size 48.*multiple of 32"),
    ({"kv_transfer_config": KVTransferConfig(kv_connector="ExampleConnector",
                                             kv_role="kv_both")},
     "--kv-transfer-config.*Remove --kv-transfer-config"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8.*Allowed: --kv-cache-dtype auto"),
    ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype fp8_e5m2"),
])
def test_unsupported_engine_options(tiny_llama, kwargs, flag):
    with pytest.raises(UnsupportedSetupError, match=f"--kv-compress-rate does not support .*{flag}"):
        build(tiny_llama, kv_compress_rate=1, **kwargs)


def test_unsupported_models(unsupported_models):
    for kind, model in unsupported_models.items():
        with pytest.raises(UnsupportedSetupError, match="--kv-compress-rate does not support") as e:
            build(model, kv_compress_rate=1)
        assert kind.split()[0] in str(e.value)


@pytest.mark.parametrize("key, value, wanted", [
    ("kv_compress_policy", "best", "one of " + ", ".join(POLICIES)),
    ("kv_compress_protected_window", -1, "an integer >= 0"),
    ("kv_compress_sinks", 2.5, "an integer >= 0"),
    ("kv_compress_window", 0, "an integer >= 1"),
    ("kv_compress_interval", "often", "an integer >= 0"),
    ("kv_compress_max_tokens", 0, "an integer >= 1"),
])
def test_bad_settings_name_their_flag(tiny_llama, key, value, wanted):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(KVCompressConfigError, match=f"{flag} must be {wanted}"):
        build(tiny_llama, additional_config={"kv_compress_rate": 8, key: value})


def test_settings_without_a_rate_are_refused(tiny_llama):
    with pytest.raises(KVCompressConfigError,
                       match="--kv-compress-policy needs --kv-compress-rate"):
        build(tiny_llama, additional_config={"kv_compress_policy": "snapkv"})


def test_compression_rewrites_engine_config(tiny_llama):
    config = build(tiny_llama, kv_compress_rate=8, kv_compress_policy="snapkv")
    assert config.additional_config["kv_compress_rate"] == 8
    assert config.additional_config["kv_compress_policy"] == "snapkv"
    assert config.scheduler_config.scheduler_cls.endswith("KVCompressScheduler")
    assert config.parallel_config.worker_cls.endswith("KVCompressCPUWorker")
    assert config.cache_config.block_size == 32
    # vLLM's compiled model is kept (attention runs between compiled pieces).
    assert config.model_config.enforce_eager is False
    assert config.compilation_config.mode != CompilationMode.NONE
    assert config.scheduler_config.async_scheduling is False


@pytest.mark.parametrize("flag, wanted", [(None, True), (True, True), (False, False)])
def test_prefix_caching_follows_vllm(tiny_llama, flag, wanted):
    """vLLM's default (on) unless the user says otherwise."""
    kwargs = {} if flag is None else {"enable_prefix_caching": flag}
    config = build(tiny_llama, kv_compress_rate=8, **kwargs)
    assert config.cache_config.enable_prefix_caching is wanted


def test_without_the_flag_nothing_changes(tiny_llama):
    plain = build(tiny_llama)
    assert "KVCompress" not in str(plain.scheduler_config.scheduler_cls)
    assert "kvcompress" not in plain.parallel_config.worker_cls
    assert plain.additional_config == {}


def test_kvzap_without_a_scorer_for_the_model_is_refused(tiny_llama):
    from vllm_kvcompress.kvzap.scorer_file import ScorerFileError

    with pytest.raises(ScorerFileError, match="kvzap needs a trained scorer for .*"
                                              "train_scorer .* --kv-compress-scorer FILE"):
        build(tiny_llama, kv_compress_rate=8, kv_compress_policy="kvzap")
    # Without a policy named the default is kvzip; a per-request kvzap is
    # then refused (HTTP 400).
    config = build(tiny_llama, kv_compress_rate=8)
    assert config.additional_config["kv_compress_policy"] == "kvzip"
    assert "kv_compress_scorer" not in {k for k, v in config.additional_config.items()
                                        if v is not None}
    from vllm import SamplingParams

    from vllm_kvcompress.request_validation import KVCompressRequestValidator

    with pytest.raises(KVCompressConfigError, match="kvzap needs a trained scorer"):
        KVCompressRequestValidator.validate_params(
            SamplingParams(extra_args={"kv_compress_policy": "kvzap"}))


def test_a_scorer_for_another_model_is_refused(tiny_llama, smollm2):
    from vllm_kvcompress.kvzap.scorer_file import BUNDLED_DIR, ScorerFileError

    bundled = next(BUNDLED_DIR.glob("*.safetensors"))  # SmolLM2-135M's
    with pytest.raises(ScorerFileError, match="--kv-compress-scorer .* differs from .* in: "
                                              "model_type|num_hidden_layers"):
        build(tiny_llama, kv_compress_rate=8, kv_compress_policy="kvzap",
              kv_compress_scorer=str(bundled))
    with pytest.raises(ScorerFileError, match="--kv-compress-scorer .*cannot read"):
        build(tiny_llama, kv_compress_rate=8, kv_compress_policy="kvzap",
              kv_compress_scorer="/nonexistent/scorer.safetensors")


def test_the_bundled_scorer_is_found_by_config_not_path(smollm2, tmp_path_factory):
    """SmolLM2-135M's config (no weights) in another folder, served in
    another dtype, finds the scorer that ships with the plugin."""
    from transformers import AutoConfig

    from vllm_kvcompress.kvzap.scorer_file import BUNDLED_DIR

    elsewhere = config_only_model(tmp_path_factory, smollm2, "copy",
                                  AutoConfig.from_pretrained(smollm2))
    config = EngineArgs(model=elsewhere, dtype="bfloat16", kv_compress_rate=8,
                        kv_compress_policy="kvzap").create_engine_config()
    found = config.additional_config["kv_compress_scorer"]
    assert found is not None and found.startswith(str(BUNDLED_DIR))
    # With a scorer found, kvzap is the default policy.
    default = EngineArgs(model=elsewhere, dtype="float32",
                         kv_compress_rate=8).create_engine_config()
    assert default.additional_config["kv_compress_policy"] == "kvzap"
    assert default.additional_config["kv_compress_scorer"] == found


def vllm_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    return subprocess.run([vllm_bin, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_help_lists_the_flags():
    proc = vllm_cli("serve", "--help=KVCompress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("rate", "max-tokens", "policy", "head-floor", "cake-tau1", "cake-tau2",
                 "cake-gamma", "protected-window", "sinks", "window", "interval",
                 "cascade", "debug"):
        assert f"--kv-compress-{flag}" in proc.stdout


def test_serve_refuses_a_bad_rate_before_loading(tiny_llama):
    proc = vllm_cli("serve", tiny_llama, "--kv-compress-rate", "0.5")
    assert proc.returncode != 0
    assert "--kv-compress-rate" in proc.stderr and ">= 1" in proc.stderr


def test_additional_config_works_without_importing_the_plugin(tiny_llama):
    """vLLM loads the plugin through its entry point; no import needed."""
    code = (
        "import sys\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "assert 'vllm_kvcompress' not in sys.modules\n"
        f"c = EngineArgs(model={tiny_llama!r}, dtype='float32', "
        "additional_config={'kv_compress_rate': 1}).create_engine_config()\n"
        "print(c.scheduler_config.scheduler_cls, c.parallel_config.worker_cls)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KVCompressScheduler" in proc.stdout and "KVCompressCPUWorker" in proc.stdout
