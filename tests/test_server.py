"""Through ``vllm serve`` with the real openai client: with rate 1 the plugin
answers exactly as stock vLLM on /v1/completions and /v1/chat/completions,
streaming or not, and a client that disconnects mid-stream leaves nothing
held."""

import pytest

from engine_helpers import mixed_prompts
from server_util import metric, vllm_server, wait_idle

pytestmark = pytest.mark.engine

SERVER_ARGS = ["--max-model-len", "4096", "--max-num-batched-tokens", "512",
               "--enforce-eager", "--block-size", "32", "--no-enable-prefix-caching"]
PLUGIN_ARGS = ["--kv-compress-rate", "1", "--kv-compress-debug"]
MAX_TOKENS = 40


def ask_everything(base: str, model: str, long_prompt: list[int]) -> dict:
    """The same set of greedy requests, as answered by one server."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused")
    common = dict(model=model, max_tokens=MAX_TOKENS, temperature=0)
    answers = {}
    texts = ["The three primary colours are", "Write a haiku about the sea.\n"]
    for i, prompt in enumerate(texts + [long_prompt]):
        answers[f"completion-{i}"] = client.completions.create(
            prompt=prompt, **common).choices[0].text
        stream = client.completions.create(prompt=prompt, stream=True, **common)
        answers[f"completion-stream-{i}"] = "".join(c.choices[0].text for c in stream)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "You answer in one sentence."},
              {"role": "user", "content": "Why is the sky blue?"}]]
    for i, messages in enumerate(chats):
        answers[f"chat-{i}"] = client.chat.completions.create(
            messages=messages, **common).choices[0].message.content
        stream = client.chat.completions.create(messages=messages, stream=True, **common)
        answers[f"chat-stream-{i}"] = "".join(
            c.choices[0].delta.content or "" for c in stream if c.choices)
    return answers


@pytest.fixture(scope="module")
def long_prompt(smollm2):
    return mixed_prompts(smollm2, [1800], seed=3)[0]


@pytest.fixture(scope="module")
def stock_answers(smollm2, long_prompt, tmp_path_factory):
    log = tmp_path_factory.mktemp("stock") / "server.log"
    with vllm_server(smollm2, SERVER_ARGS, log) as base:
        return ask_everything(base, smollm2, long_prompt)


@pytest.fixture(scope="module")
def plugin_server(smollm2, tmp_path_factory):
    log = tmp_path_factory.mktemp("plugin") / "server.log"
    with vllm_server(smollm2, SERVER_ARGS + PLUGIN_ARGS, log) as base:
        yield base


def test_answers_equal_stock_vllm(plugin_server, stock_answers, smollm2, long_prompt):
    answers = ask_everything(plugin_server, smollm2, long_prompt)
    assert answers.keys() == stock_answers.keys()
    for key, text in stock_answers.items():
        assert text, f"stock gave an empty answer for {key}"
        assert answers[key] == text, f"{key} differs from stock vLLM"
    # Streaming and non-streaming agree (same greedy decode).
    assert answers["chat-0"] == answers["chat-stream-0"]


def test_disconnect_mid_stream_frees_everything(plugin_server, smollm2, long_prompt):
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=plugin_server + "/v1", api_key="unused",
                    http_client=httpx.Client(timeout=60))
    usage_while_streaming = []
    for _ in range(3):
        stream = client.completions.create(
            model=smollm2, prompt=long_prompt, max_tokens=400, temperature=0,
            stream=True)
        received = 0
        for chunk in stream:
            received += 1
            if received == 5:
                break
        usage_while_streaming.append(metric(plugin_server, "vllm:kv_cache_usage_perc"))
        stream.close()  # the client goes away mid-generation
        assert received == 5
    # vLLM's KV-usage metric reads the head-block pool: busy, then empty.
    assert min(usage_while_streaming) > 0
    assert wait_idle(plugin_server) == 0.0
    # The server still serves (and its debug checks found nothing wrong).
    after = client.completions.create(model=smollm2, prompt="Hello", max_tokens=5)
    assert after.choices[0].text
    assert wait_idle(plugin_server) == 0.0


def usage_while_streaming(base: str, model: str, prompt, extra_body=None) -> float:
    """KV usage after a few streamed tokens of one request (then hang up)."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused")
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=400,
                                       temperature=0, stream=True,
                                       extra_body=extra_body)
    for i, _ in enumerate(stream):
        if i == 4:
            break
    usage = metric(base, "vllm:kv_cache_usage_perc")
    stream.close()
    wait_idle(base)
    return usage


def test_per_request_rate_over_vllm_xargs(plugin_server, smollm2, long_prompt):
    full = usage_while_streaming(plugin_server, smollm2, long_prompt)
    compressed = usage_while_streaming(plugin_server, smollm2, long_prompt,
                                       {"vllm_xargs": {"kv_compress_rate": 8}})
    assert 0 < compressed < full / 4
