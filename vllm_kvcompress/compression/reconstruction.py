"""Reconstruction scoring (KVzip, arXiv 2505.23416): how much the model
attends to each cached KV while it re-reads its own context.

After a request's context has been read, the worker feeds the model a short
"repeat the context" instruction followed by the context itself, chunk by
chunk (teacher-forced). In every layer the reconstruction's queries attend to
the request's held KVs plus the reconstruction's own KVs (causal); a held KV's
score is the largest probability any query of its GQA group gives it. A copy
of the context needs every KV it reads, so the scores do not depend on a
question that has not been asked yet.

The reconstruction's KVs are never written to the pool: they exist only as
the layer's key/value activations, so they never touch the books.

A later compression of the same request (decode-time, cascading) re-reads
only the tokens added since its last pass and raises the stored scores to
the new ones where higher, so over a request's life the passes read each
token once: the extra prefill stays one context long. With prefix caching,
the scores also stay with the cached blocks a request copied
(``publish_scores``), and a later request hitting them starts from them
(``adopt_scores``) instead of re-reading its cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# The instruction that precedes every chunk, and the words that name where a
# later chunk starts (followed by that chunk's predecessor's last tokens).
INSTRUCTION = "\n\nRepeat the previous context exactly."
CONTINUATION = " Start right after:"
OVERLAP_TOKENS = 8
# Positions a chunk's instruction, continuation, overlap and chat suffix may
# take beyond its context tokens (SmolLM2's template needs 21).
PROMPT_ROOM = 64


def chunk_start(context_len: int, chunk_len: int, max_position: int) -> int:
    """First position of a reconstruction chunk: right after the context,
    or, for a context near the model's last position, as late as RoPE
    allows (the chunk then overlaps the context's last positions, which
    blurs the scores of those last tokens; the worker logs it)."""
    return min(context_len, max_position - chunk_len)


def max_position_of(model_config) -> int:
    """The positions the model's RoPE covers (the model length without one)."""
    limit = getattr(model_config.hf_config, "max_position_embeddings", None)
    return limit or model_config.max_model_len


# Scratch elements of one tile of reconstruction probabilities. On a CPU a
# tile should stay in cache (16 MB: 1.3-1.5x faster than one [H, G*T, M]
# matrix at 2-8K held KVs on the project's 2-core machine); on a GPU it only
# has to bound the pass's transient memory (256 MB) whatever the context,
# group size or chunk, while leaving each matmul big enough to fill the chip.
TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def reconstruction_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             held_keys: torch.Tensor, held_values: torch.Tensor,
                             held_lens: torch.Tensor, scale: float,
                             tile_elements: int | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a reconstruction chunk, and the best probability of each
    held KV.

    query [T, H, G, D], key / value [T, H, D] (the chunk's own, causal);
    held_keys / held_values [H, M, D], head h holding its first
    ``held_lens[h]`` (the rest is padding).
    One softmax per query over the held KVs and the chunk's visible KVs.
    Returns the output [T, H, G, D] (query dtype) and the score [H, M]
    (float32, 0 on padding): max over the T queries and G group heads.

    The probabilities must be materialised (the scores are made of them),
    so this is batched matmuls over [H, queries, ...], a tile of query
    positions at a time (``tile_elements`` probabilities at most, default
    per device in ``TILE_ELEMENTS``). A tile's softmax is split in place
    across the held and own parts (no concatenated copy), and its own part
    stops at the tile's last position (causal). The CUDA path's ops use the
    Triton kernels of ``kernels/reconstruction.py`` instead, which keep no
    probability matrix at all.
    """
    t, h, g, d = query.shape
    m = held_keys.shape[1]
    device = query.device
    budget = tile_elements or TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cuda"])
    step = max(1, budget // (h * g * (m + t)))
    # Rows ordered (position, group head), so a tile is a range of positions.
    q = (query.float() * scale).permute(1, 0, 2, 3).reshape(h, t * g, d)
    held_keys_t = held_keys.float().transpose(1, 2)  # [H, D, M]
    held_values = held_values.float()
    own_keys_t = key.float().permute(1, 2, 0)  # [H, D, T]
    own_values = value.float().transpose(0, 1)  # [H, T, D]
    held = torch.arange(m, device=device) < held_lens.to(device)[:, None]
    padding = None if bool(held.all()) else ~held[:, None, :]
    own_positions = torch.arange(t, device=device)
    out = torch.empty(h, t * g, d, dtype=torch.float32, device=device)
    best = torch.zeros(h, m, dtype=torch.float32, device=device)
    for first in range(0, t, step):
        last = min(first + step, t)
        rows = slice(first * g, last * g)
        on_held = torch.bmm(q[:, rows], held_keys_t)  # [H, rows, M]
        if padding is not None:
            on_held.masked_fill_(padding, float("-inf"))
        on_own = torch.bmm(q[:, rows], own_keys_t[:, :, :last])  # [H, rows, last]
        row_positions = torch.arange(first, last, device=device).repeat_interleave(g)
        on_own.masked_fill_(own_positions[:last] > row_positions[:, None], float("-inf"))
        top = torch.maximum(on_held.amax(-1, keepdim=True), on_own.amax(-1, keepdim=True))
        on_held.sub_(top).exp_()
        on_own.sub_(top).exp_()
        total = on_held.sum(-1, keepdim=True).add_(on_own.sum(-1, keepdim=True))
        on_held.div_(total)
        on_own.div_(total)
        tile_out = out[:, rows]
        torch.bmm(on_held, held_values, out=tile_out)
        tile_out.baddbmm_(on_own, own_values[:, :last])
        torch.maximum(best, on_held.amax(1), out=best)
    return out.view(h, t, g, d).permute(1, 0, 2, 3).to(query.dtype), best


@dataclass
class ReconstructionMetadata:
    """What the attention backend needs during one reconstruction chunk, in
    place of the step's metadata: each layer's held KVs (gathered on demand)
    and the score buffer every layer maxes its scores into."""

    num_kv_heads: int
    scale: float
    layer_index: dict[str, int]
    # layer -> (keys [H, M, D], values [H, M, D], held lengths [H])
    gather: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scores: torch.Tensor  # [L, H, M] float32, maxed over chunks

    def attend(self, layer_name: str, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, output: torch.Tensor, attention: Callable) -> None:
        """One layer's reconstruction attention with ``attention``, the
        layer's ops' implementation (same signature as
        ``reconstruction_attention``); no default, so a GPU layer can never
        fall back to the torch form unnoticed."""
        layer = self.layer_index[layer_name]
        t, h = query.shape[0], self.num_kv_heads
        keys, values, held_lens = self.gather(layer)
        out, best = attention(
            query.view(t, h, -1, keys.shape[-1]), key.view(t, h, -1),
            value.view(t, h, -1), keys, values, held_lens, self.scale)
        output.view(t, -1).copy_(out.reshape(t, -1))
        torch.maximum(self.scores[layer], best, out=self.scores[layer])


def reconstruction_chunks(context: list[int], chunk: int, instruction: list[int],
                          continuation: list[int], suffix: list[int],
                          start: int = 0) -> list[list[int]]:
    """The token ids fed to the model, one list per chunk of
    ``context[start:]``: instruction (+ where to continue: ``continuation``
    and the tokens just before the chunk) + ``suffix`` (the chat template's
    turn change) + the chunk itself."""
    inputs = []
    for begin in range(start, len(context), chunk):
        head = list(instruction)
        if begin:
            head += continuation + context[max(0, begin - OVERLAP_TOKENS):begin]
        inputs.append(head + suffix + context[begin:begin + chunk])
    return inputs


def publish_scores(slot_metric: torch.Tensor, scored: torch.Tensor,
                   sources: torch.Tensor, copies: torch.Tensor) -> None:
    """Store a request's fresh kvzip scores with the prefix-cached blocks it
    copied this step (``copies`` still hold the same tokens as ``sources``:
    compaction comes later), and mark those blocks scored. ``slot_metric``
    is the per-slot metric [P, block_size]; ``scored`` [P] bool."""
    slot_metric[sources] = slot_metric[copies]
    scored[sources] = True


def adopt_scores(slot_metric: torch.Tensor, slot_position: torch.Tensor,
                 scored: torch.Tensor, sources: torch.Tensor, copies: torch.Tensor,
                 heads: int) -> int:
    """A request's first compression copied the prefix-cached blocks it
    holds (``sources``, ordered layer, head, block; ``heads`` = layers x KV
    heads of this rank): give the copies the scores an earlier request's
    pass stored with them, for the longest run of leading blocks that every
    head has scored and that holds the request's first tokens in order;
    returns how many tokens that run covers (0: nothing changed). Those
    scores came from a pass over the earlier request's context, which need
    not go on as this one does: the same approximation as a decode-time
    pass that re-reads only new tokens."""
    if len(sources) == 0:
        return 0
    ids = sources.view(heads, -1)  # [heads, k]
    block_size = slot_position.shape[1]
    expected = torch.arange(ids.shape[1] * block_size, dtype=slot_position.dtype,
                            device=slot_position.device).view(-1, block_size)
    usable = scored[ids].all(0) & (slot_position[ids] == expected).all(-1).all(0)
    blocks = int(usable.long().cumprod(0).sum())
    if blocks:
        taken = copies.view(heads, -1)[:, :blocks]
        slot_metric[taken] = slot_metric[ids[:, :blocks]]
    return blocks * block_size
