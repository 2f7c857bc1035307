"""KVzip's reconstruction attention against a per-query loop written from
the definition, the token layout of the reconstruction chunks, and the
scores kept with prefix-cached blocks for reuse."""

import pytest
import torch

from vllm_kvcompress.compression.reconstruction import (
    OVERLAP_TOKENS, adopt_scores, chunk_start, publish_scores, reconstruction_attention,
    reconstruction_chunks,
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


def cached_prefix(heads=2, blocks=3, bs=4, pool=20):
    """A pool where head-blocks 0..heads*blocks-1 hold the first
    ``blocks * bs`` tokens of every head (layer, head, block order) and the
    next as many ids are a request's fresh copies of them."""
    position = torch.full((pool, bs), -1, dtype=torch.int32)
    sources = torch.arange(heads * blocks)
    copies = sources + heads * blocks
    position[sources] = (torch.arange(blocks * bs, dtype=torch.int32)
                         .view(blocks, bs).repeat(heads, 1))
    position[copies] = position[sources]
    metric = torch.zeros(pool, bs)
    return metric, position, torch.zeros(pool, dtype=torch.bool), sources, copies


def test_a_later_request_adopts_the_scores_an_earlier_one_published():
    metric, position, scored, sources, copies = cached_prefix()
    assert adopt_scores(metric, position, scored, sources, copies, heads=2) == 0
    metric[copies] = torch.rand(len(copies), 4)  # the first request's pass
    publish_scores(metric, scored, sources, copies)
    assert scored[sources].all() and not scored[copies].any()
    assert torch.equal(metric[sources], metric[copies])
    published = metric[sources].clone()

    later = copies + len(copies)  # the next request's copies start unscored
    position[later] = position[sources]
    assert adopt_scores(metric, position, scored, sources, later, heads=2) == 12
    assert torch.equal(metric[later], published)


def test_only_the_leading_blocks_every_head_has_scored_in_order_are_adopted():
    metric, position, scored, sources, copies = cached_prefix()
    metric[copies] = torch.rand(len(copies), 4)
    publish_scores(metric, scored, sources, copies)
    later = copies + len(copies)
    # The request holds blocks 0 and 2 of the cache (block 1 was uncached
    # and is its own): only tokens 0-3 come scored in order.
    assert adopt_scores(metric, position, scored, sources[[0, 2, 3, 5]],
                        later[:4], heads=2) == 4
    assert torch.equal(metric[later[[0, 2]]], metric[sources[[0, 3]]])
    assert not metric[later[[1, 3]]].any()
    # New tokens went into head 1's second block: one block column left.
    metric[later] = 0
    scored[sources[4]] = False
    assert adopt_scores(metric, position, scored, sources, later, heads=2) == 4
    scored[sources[0]] = False  # and into head 0's first: nothing
    metric[later] = 0
    assert adopt_scores(metric, position, scored, sources, later, heads=2) == 0
    assert not metric[later].any()
