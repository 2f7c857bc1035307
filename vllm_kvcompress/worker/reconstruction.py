"""The worker's reconstruction pass (policy ``kvzip``): vLLM's own model run
over "repeat the context" chunks against one request's head-blocks.

Each chunk is one extra forward of the model the runner already holds
(compiled, on the runner's device), with ``ReconstructionMetadata`` in place
of the step's attention metadata and no slot mapping, so attention layers
score the request's KVs and nothing is written to the pool. With tensor
parallelism every rank runs the same chunks (the model's collectives need
it) and scores its own heads.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger

from ..attention.pool_view import HeadBlockCache
from ..compression.reconstruction import (
    CONTINUATION, INSTRUCTION, OVERLAP_TOKENS, PROMPT_ROOM, ReconstructionMetadata,
    adopt_scores, chunk_start, max_position_of, publish_scores, reconstruction_chunks,
)
from ..head_table import HeadTable

logger = init_logger(__name__)


def chat_suffix(tokenizer) -> str:
    """What the chat template puts between a user's words and the
    assistant's reply ("\\n" without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True,
        tokenize=False)
    return text.split(marker, 1)[1]


class ReconstructionScorer:
    """Runs kvzip passes for the compressor and remembers how far each
    request's context has been re-read.

    With prefix caching, a request's first compression copies the cached
    blocks it holds (copy-on-compress); its pass's scores are then also
    stored with those cached blocks, so a later request that hits them
    (the next turn of a chat, another chat with the same system prompt)
    starts from those scores and re-reads only what follows them.
    ``scored`` marks the head-blocks whose metric holds such scores; a
    block loses the mark when new tokens are written into it (a block joins
    the prefix cache only after its tokens were written, so a mark left on
    a block reused as a copy is never read)."""

    def __init__(self, runner, pool: HeadBlockCache, layout: str, scale: float,
                 layer_index: dict[str, int], chunk: int,
                 slot_metric: torch.Tensor, slot_position: torch.Tensor):
        self.runner = runner
        self.pool = pool
        self.slot_metric, self.slot_position = slot_metric, slot_position  # [P, bs]
        self.scored = torch.zeros(slot_metric.shape[0], dtype=torch.bool,
                                  device=slot_metric.device)
        self._any_scored = False  # no mark to clear until the first publish
        self.layout = layout
        self.scale = scale
        self.layer_index = layer_index
        self.chunk = chunk  # engine-wide, so fixed here
        self._prompt_ids: tuple[list[int], list[int], list[int]] | None = None
        # Context tokens each request's passes have re-read so far.
        self.reread: dict[str, int] = {}
        self.max_position = max_position_of(runner.model_config)
        if chunk + PROMPT_ROOM > self.max_position:
            raise ValueError(
                f"--kv-compress-kvzip-chunk {chunk} plus {PROMPT_ROOM} tokens of "
                f"instruction passes the model's {self.max_position} positions; "
                "use a smaller chunk")

    def prompt_ids(self) -> tuple[list[int], list[int], list[int]]:
        """Instruction, continuation and chat-suffix ids (tokenized once)."""
        if self._prompt_ids is None:
            from transformers import AutoTokenizer

            config = self.runner.model_config
            tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer, trust_remote_code=config.trust_remote_code)
            encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
            ids = (encode(INSTRUCTION), encode(CONTINUATION),
                   encode(chat_suffix(tokenizer)))
            room = sum(map(len, ids)) + OVERLAP_TOKENS
            if room > PROMPT_ROOM:  # the start-up check assumed less
                raise RuntimeError(
                    f"kvzip: this tokenizer's reconstruction prompt takes {room} "
                    f"tokens, more than the {PROMPT_ROOM} reserved for it")
            self._prompt_ids = ids
        return self._prompt_ids

    def drop(self, req_id: str) -> None:
        """The request finished or lost its KVs (preempted): start over."""
        self.reread.pop(req_id, None)

    def written(self, slots: torch.Tensor) -> None:
        """New tokens went into ``slots``: their blocks hold no cached scores
        (every step; nothing to do before anything was published)."""
        if self._any_scored:
            self.scored[slots // self.pool.block_size] = False

    def adopt(self, req_id: str, sources: torch.Tensor, copies: torch.Tensor,
              heads: int) -> None:
        """Before a request's first pass: take the cached scores of the
        prefix blocks it just copied (ids on the device), as far as they
        have them (``adopt_scores``)."""
        if req_id in self.reread or not self._any_scored:
            return
        tokens = adopt_scores(self.slot_metric, self.slot_position, self.scored,
                              sources, copies, heads)
        if tokens:
            self.reread[req_id] = tokens

    def publish(self, sources: torch.Tensor, copies: torch.Tensor) -> None:
        """After a pass: store its scores with the cached blocks copied."""
        publish_scores(self.slot_metric, self.scored, sources, copies)
        self._any_scored = True

    def score(self, req_id: str, context: np.ndarray, table: HeadTable,
              slots: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Reconstruction scores [L, H, M] of the KVs at ``slots`` (the
        request's logical slots, as the compressor lays them out) from
        re-reading the context tokens not re-read before, and the number of
        tokens the pass fed the model (0 when there is nothing new)."""
        instruction, continuation, suffix = self.prompt_ids()
        device = slots.device
        lens = torch.from_numpy(table.lens).to(device)
        width = slots.shape[-1]
        held = torch.arange(width, device=device)[None, None, :] < lens[..., None]  # [L, H, M]

        def gather(layer: int):
            return (*self.pool.gather(slots[layer], self.layout), lens[layer])

        scores = torch.zeros(held.shape, dtype=torch.float32, device=device)
        meta = ReconstructionMetadata(
            num_kv_heads=table.lens.shape[1], scale=self.scale,
            layer_index=self.layer_index, gather=gather, scores=scores)
        by_layer = {name: meta for name in self.layer_index}
        start = len(context)
        fed = 0
        for ids in reconstruction_chunks(context.tolist(), self.chunk, instruction,
                                         continuation, suffix,
                                         start=self.reread.get(req_id, 0)):
            # The runner's own dtypes: the compiled model drops its guards,
            # so int64 ids would be read as int32 data, not recompiled.
            input_ids = torch.tensor(ids, dtype=self.runner.input_ids.gpu.dtype,
                                     device=self.pool.kv.device)
            first = chunk_start(start, len(ids), self.max_position)
            if first < start:
                logger.warning(
                    "kvzip: request %s's %d-token context leaves no room for a "
                    "%d-token reconstruction chunk before position %d; the "
                    "chunk overlaps the context's last %d positions, so their "
                    "scores are approximate.", req_id, start, len(ids),
                    self.max_position, start - first)
            positions = first + torch.arange(len(ids), dtype=self.runner.positions.dtype,
                                             device=input_ids.device)
            with set_forward_context(by_layer, self.runner.vllm_config,
                                     num_tokens=len(ids), slot_mapping={}):
                self.runner.model(input_ids=input_ids, positions=positions,
                                  intermediate_tensors=None, inputs_embeds=None)
            fed += len(ids)
        self.reread[req_id] = len(context)
        return scores.masked_fill(~held, 0.0), fed
