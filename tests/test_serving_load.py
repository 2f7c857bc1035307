"""An operator's view of ``vllm serve --kv-compress-rate 8`` (SmolLM2, real
server process, real openai client, loopback only): the ``vllm:kv_compress_*``
metrics move as they should, 64 concurrent chat requests of 200-1,000-token
prompts, spread over every policy, complete while a third of the clients
hang up mid-stream, and bad input gets HTTP 400 while the server serves on.
Debug mode is on, so the scheduler checks its head-block books after every
step (a leak or a double free would crash the engine and fail every later
request)."""

import asyncio
import math
import random
import time

import pytest

from engine_helpers import mixed_texts
from vllm_kvcompress.config import POLICIES
from server_util import metric, vllm_server, wait_idle

pytestmark = pytest.mark.engine

RATE = 8
SERVER_ARGS = ["--max-model-len", "4096", "--kv-compress-rate", str(RATE),
               "--kv-compress-debug"]
LOAD_REQUESTS = 64


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serving") / "server.log"


@pytest.fixture(scope="module")
def server(smollm2, server_log):
    with vllm_server(smollm2, SERVER_ARGS, server_log) as base:
        yield base


def test_start_up_logs_the_effective_configuration_once(server, server_log):
    lines = [line for line in server_log.read_text().splitlines()
             if "KV compression on:" in line]
    assert len(lines) == 1, lines
    # The effective settings: SmolLM2's bundled scorer makes kvzap the default.
    assert f"rate={float(RATE)}" in lines[0] and "policy='kvzap'" in lines[0]
    assert "smollm2-135m-instruct.safetensors" in lines[0]
    assert "protected_window=32" in lines[0] and "head-block size 32" in lines[0]


def kvc(base: str, name: str) -> float:
    return metric(base, f"vllm:kv_compress_{name}")


def assert_nothing_held(base: str) -> None:
    """Every head-block back in the pool, as /metrics reports it."""
    wait_idle(base)
    assert kvc(base, "head_blocks_held") == 0
    assert kvc(base, "head_blocks_free") == kvc(base, "head_blocks_total") > 0
    assert metric(base, "vllm:kv_cache_usage_perc") == 0.0


def chat(base: str, model: str, content: str, **kwargs):
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}],
        temperature=0, **kwargs)


def test_metrics_move_with_a_compressed_request(server, smollm2):
    """Runs first, on a fresh server: the achieved ratio covers this request
    only."""
    assert_nothing_held(server)
    assert kvc(server, "achieved_ratio") == 1.0
    before = {name: kvc(server, name) for name in
              ("kvs_evicted_total", "compressions_total", "compression_seconds_total")}
    [text] = mixed_texts(smollm2, [3000], seed=11)
    reply = chat(server, smollm2, text, max_tokens=8)
    assert reply.usage.prompt_tokens >= 3000
    assert reply.choices[0].message.content

    # Held while generating is covered by the load test; here: the books.
    assert_nothing_held(server)
    assert kvc(server, "compressions_total") == before["compressions_total"] + 1
    assert kvc(server, "compression_seconds_total") > before["compression_seconds_total"]
    # 3000+ tokens at rate 8, the 32 newest protected: about 7/8 go.
    evicted = kvc(server, "kvs_evicted_total") - before["kvs_evicted_total"]
    layers, kv_heads = 30, 3  # SmolLM2-135M
    uncompressed = reply.usage.prompt_tokens * layers * kv_heads
    assert 0.8 * uncompressed < evicted < uncompressed * (1 - 1 / RATE)
    ratio = kvc(server, "achieved_ratio")
    assert abs(ratio - RATE) <= 0.1 * RATE, ratio


def test_a_kvzip_request_counts_its_reconstruction_pass(server, smollm2):
    names = ("reconstruction_tokens_total", "reconstruction_seconds_total",
             "compression_seconds_total")
    before = {name: kvc(server, name) for name in names}
    [text] = mixed_texts(smollm2, [700], seed=12)
    reply = chat(server, smollm2, text, max_tokens=4,
                 extra_body={"vllm_xargs": {"kv_compress_policy": "kvzip"}})
    assert reply.choices[0].message.content
    assert_nothing_held(server)
    after = {name: kvc(server, name) for name in names}
    # One pass after the prompt: every prompt token re-read once, plus each
    # 512-token chunk's instruction (at most 64 tokens).
    prompt = reply.usage.prompt_tokens
    fed = after["reconstruction_tokens_total"] - before["reconstruction_tokens_total"]
    assert prompt < fed <= prompt + 64 * math.ceil(prompt / 512)
    seconds = after["reconstruction_seconds_total"] - before["reconstruction_seconds_total"]
    total = after["compression_seconds_total"] - before["compression_seconds_total"]
    assert 0 < seconds <= total


async def one_chat(client, model: str, text: str, mode: str, policy: str,
                   rng: random.Random):
    """One client: 'plain' waits for the whole answer, 'stream' reads the
    whole stream, 'hang_up' closes the stream after a few chunks."""
    common = dict(model=model, messages=[{"role": "user", "content": text}],
                  temperature=0.7, extra_body={"vllm_xargs": {"kv_compress_policy": policy}})
    if mode == "plain":
        reply = await client.chat.completions.create(max_tokens=16, **common)
        assert reply.choices[0].finish_reason in ("length", "stop")
        return reply.usage.completion_tokens
    stream = await client.chat.completions.create(max_tokens=24, stream=True, **common)
    hang_up_after = rng.randint(1, 6) if mode == "hang_up" else None
    chunks, finish = 0, None
    async for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunks == hang_up_after:
            await stream.close()
            return chunks
    assert mode == "stream" and finish in ("length", "stop")
    return chunks


async def run_load(base: str, model: str, texts: list[str], modes: list[str],
                   policies: list[str]):
    """Every client at once; returns their results and the most head-blocks
    /metrics showed held meanwhile."""
    import httpx
    from openai import AsyncOpenAI

    rng = random.Random(5)
    limits = httpx.Limits(max_connections=len(texts) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        client = AsyncOpenAI(base_url=base + "/v1", api_key="unused",
                             http_client=http, max_retries=0)
        clients = asyncio.gather(*(one_chat(client, model, text, mode, policy, rng)
                                   for text, mode, policy in zip(texts, modes, policies)))
        most_held = 0.0
        while not clients.done():
            most_held = max(most_held, await asyncio.to_thread(
                kvc, base, "head_blocks_held"))
            await asyncio.wait([clients], timeout=0.5)
        return clients.result(), most_held


def test_64_concurrent_chats_with_hang_ups_leave_nothing_held(server, smollm2):
    rng = random.Random(0)
    # Prompts long enough to be compressed and chunked, short enough that 64
    # of them are read in minutes on 2 CPU cores.
    lengths = [rng.randint(200, 1000) for _ in range(LOAD_REQUESTS)]
    texts = mixed_texts(smollm2, lengths, seed=1)
    modes = ["hang_up"] * 24 + ["stream"] * 20 + ["plain"] * 20
    rng.shuffle(modes)
    # Every policy at once in the same steps (kvzip for 7 of them: its
    # extra pass would otherwise be most of the run).
    policies = [POLICIES[i % len(POLICIES)] for i in range(LOAD_REQUESTS)]
    rng.shuffle(policies)
    evicted_before = kvc(server, "kvs_evicted_total")
    reread_before = kvc(server, "reconstruction_tokens_total")

    started = time.time()
    results, most_held = asyncio.run(run_load(server, smollm2, texts, modes, policies))
    print(f"{LOAD_REQUESTS} chats, {sum(lengths)} prompt tokens: "
          f"{time.time() - started:.0f} s; most head-blocks held {most_held:.0f}")

    assert all(r > 0 for r in results)
    assert most_held > 0
    assert kvc(server, "kvs_evicted_total") > evicted_before
    assert kvc(server, "reconstruction_tokens_total") > reread_before  # kvzip ran
    assert_nothing_held(server)
    # ... and the next request is served as usual.
    assert chat(server, smollm2, "Name a colour.", max_tokens=5).choices[0].message.content
    assert_nothing_held(server)


GOOD = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def with_xargs(**xargs) -> dict:
    return {**GOOD, "vllm_xargs": xargs}


BAD_BODIES = [
    # (what, body, text the error must contain); compression fields first.
    ("rate 0", with_xargs(kv_compress_rate=0), "kv_compress_rate"),
    ("negative rate", with_xargs(kv_compress_rate=-2), "kv_compress_rate"),
    ("NaN rate", with_xargs(kv_compress_rate="NaN"), "kv_compress_rate"),
    ("infinite rate", with_xargs(kv_compress_rate="inf"), "kv_compress_rate"),
    ("string rate", with_xargs(kv_compress_rate="fast"), "kv_compress_rate"),
    ("unknown policy", with_xargs(kv_compress_policy="h2o"), "kv_compress_policy"),
    ("zero max tokens", with_xargs(kv_compress_max_tokens=0), "kv_compress_max_tokens"),
    ("fractional max tokens", with_xargs(kv_compress_max_tokens=2.5),
     "kv_compress_max_tokens"),
    ("negative protected window", with_xargs(kv_compress_protected_window=-1),
     "kv_compress_protected_window"),
    ("string protected window", with_xargs(kv_compress_protected_window="all"),
     "kv_compress_protected_window"),
    ("head floor above 1", with_xargs(kv_compress_head_floor=2), "kv_compress_head_floor"),
    ("engine-only window", with_xargs(kv_compress_window=8), "kv_compress_window"),
    ("unknown field", with_xargs(kv_compress_ratio=4), "kv_compress_ratio"),
    # Malformed bodies: whatever stock vLLM answers (400 for all of these).
    ("no messages", {"max_tokens": 4}, "messages"),
    ("messages not a list", {**GOOD, "messages": "hi"}, "messages"),
    ("negative max_tokens", {**GOOD, "max_tokens": -1}, "max_tokens"),
    ("temperature a word", {**GOOD, "temperature": "hot"}, "temperature"),
    ("vllm_xargs not an object", {**GOOD, "vllm_xargs": [1, 2]}, "vllm_xargs"),
]


@pytest.mark.parametrize("what, body, named", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_body_gets_400_and_the_next_request_is_served(server, smollm2, what, body, named):
    import httpx

    url = server + "/v1/chat/completions"
    bad = httpx.post(url, json={"model": smollm2, **body}, timeout=60)
    assert bad.status_code == 400, (what, bad.status_code, bad.text)
    assert named in bad.text, (what, bad.text)
    good = httpx.post(url, json={"model": smollm2, **GOOD}, timeout=60)
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["message"]["content"]


def test_body_that_is_not_json_gets_400(server, smollm2):
    import httpx

    bad = httpx.post(server + "/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"}, timeout=60)
    assert bad.status_code == 400, bad.text
    good = httpx.post(server + "/v1/chat/completions", json={"model": smollm2, **GOOD},
                      timeout=60)
    assert good.status_code == 200, good.text
