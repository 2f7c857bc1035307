"""KVzip's reconstruction attention against a per-query loop written from
the definition, and the token layout of the reconstruction chunks."""

import pytest
import torch

from vllm_kvcompress.compression.reconstruction import (
    OVERLAP_TOKENS, chunk_start, reconstruction_attention, reconstruction_chunks,
)
from vllm_kvcompress.worker.reconstruction import chat_suffix


def naive(query, key, value, held_keys, held_values, held, scale):
    """One query at a time: softmax over its head's held KVs and the chunk's
    KVs up to itself; a held KV's score is its best probability."""
    t, h, g, d = query.shape
    out = torch.zeros(t, h, g, d, dtype=torch.float64)
    best = torch.zeros(held.shape, dtype=torch.float64)
    for head in range(h):
        keep = held[head].nonzero().flatten()
        keys = torch.cat([held_keys[head, keep], key[:, head]]).double()
        values = torch.cat([held_values[head, keep], value[:, head]]).double()
        for i in range(t):
            visible = len(keep) + i + 1
            for j in range(g):
                logits = keys[:visible] @ query[i, head, j].double() * scale
                probs = logits.softmax(0)
                out[i, head, j] = probs @ values[:visible]
                best[head, keep] = torch.maximum(best[head, keep], probs[:len(keep)])
    return out, best


@pytest.mark.parametrize("t, h, g, m", [(5, 2, 4, 9), (1, 1, 1, 3), (7, 3, 3, 16)])
# One position per tile, a few (the last tile shorter), and all in one tile.
@pytest.mark.parametrize("tile_elements", [1, 3 * 4 * 25, None])
def test_attention_and_scores_match_the_definition(t, h, g, m, tile_elements):
    torch.manual_seed(t * 100 + m)
    d = 8
    query = torch.randn(t, h, g, d) * 2
    key, value = torch.randn(t, h, d), torch.randn(t, h, d)
    held_keys, held_values = torch.randn(h, m, d), torch.randn(h, m, d)
    held_lens = torch.full((h,), m)
    held_lens[0] = m // 2  # a shorter head (padding after its KVs)
    held = torch.arange(m) < held_lens[:, None]
    held_keys[0, m // 2:] = 1e4  # padding must not leak into the softmax
    out, best = reconstruction_attention(query, key, value, held_keys, held_values,
                                         held_lens, scale=d ** -0.5,
                                         tile_elements=tile_elements)
    ref_out, ref_best = naive(query, key, value, held_keys, held_values, held, d ** -0.5)
    assert out.shape == query.shape and best.shape == held.shape
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(best.double(), ref_best, rtol=1e-4, atol=1e-6)
    assert bool((best[~held] == 0).all())
    assert bool((best[held] > 0).all())


def test_chunks_carry_instruction_overlap_and_suffix():
    context = list(range(100, 125))
    chunks = reconstruction_chunks(context, 10, [1, 2], [3], [9])
    assert len(chunks) == 3
    assert chunks[0] == [1, 2, 9] + context[:10]
    # Later chunks say where to go on: the previous chunk's last tokens.
    assert chunks[1] == [1, 2, 3] + context[10 - OVERLAP_TOKENS:10] + [9] + context[10:20]
    assert chunks[2][-5:] == context[20:]
    # Every context token is re-read exactly once as chunk text.
    assert sum(len(c) - c.index(9) - 1 for c in chunks) == len(context)
    # A later pass starts where the last one stopped, with the overlap.
    later = reconstruction_chunks(context, 10, [1, 2], [3], [9], start=20)
    assert later == [[1, 2, 3] + context[20 - OVERLAP_TOKENS:20] + [9] + context[20:]]
    assert reconstruction_chunks(context, 10, [1], [3], [9], start=25) == []


def test_chunks_go_after_the_context_while_the_positions_last():
    assert chunk_start(1000, 300, 4096) == 1000
    assert chunk_start(3900, 300, 4096) == 3796  # moved back, overlapping


def test_chat_suffix_is_the_template_turn_change(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    suffix = chat_suffix(tokenizer)
    assert suffix.startswith("<|im_end|>") and "assistant" in suffix

    class Plain:
        chat_template = None

    assert chat_suffix(Plain()) == "\n"
