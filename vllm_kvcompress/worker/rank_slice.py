"""This worker's slice of a tensor-parallel head-block pool.

vLLM shards KV heads over the tensor-parallel ranks and broadcasts one
``SchedulerOutput`` to all of them; only rank 0's ``ModelRunnerOutput``
reaches the scheduler. The scheduler's messages therefore speak of every
rank's heads and ids (``pool_shape.PoolShape``); each worker keeps its own
heads' part, and after compressing, the ranks gather their new lengths over
vLLM's tensor-parallel group so rank 0 can reply for all. With one rank
everything here is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..protocol import BlockGrant, CompressReply, HeadBooks


@dataclass
class RankSlice:
    rank: int
    num_ranks: int
    num_layers: int
    num_kv_heads: int  # this rank's KV heads
    num_head_blocks: int  # this rank's head-blocks
    group: Any = None  # the TP group's CPU (gloo) process group

    @classmethod
    def of_this_worker(cls, num_layers: int, num_kv_heads: int,
                       num_head_blocks: int) -> "RankSlice":
        from vllm.distributed import get_tp_group

        tp = get_tp_group()
        return cls(tp.rank_in_group, tp.world_size, num_layers, num_kv_heads,
                   num_head_blocks, tp.cpu_group if tp.world_size > 1 else None)

    @property
    def heads(self) -> slice:
        """This rank's columns of a whole-pool ``[L, H]`` array."""
        return slice(self.rank * self.num_kv_heads, (self.rank + 1) * self.num_kv_heads)

    @property
    def first_id(self) -> int:
        return self.rank * self.num_head_blocks

    # ---------------------------------------------------- scheduler -> rank
    def local_grants(self, grants: dict[str, list[BlockGrant]]
                     ) -> dict[str, list[BlockGrant]]:
        """Each grant cut to this rank's heads, ids made local."""
        if self.num_ranks == 1:
            return grants
        mine = np.zeros((self.num_layers, self.num_ranks * self.num_kv_heads), bool)
        mine[:, self.heads] = True
        return {
            req_id: [BlockGrant(
                fresh=grant.fresh,
                counts=np.ascontiguousarray(grant.counts[:, self.heads]),
                block_ids=grant.block_ids[np.repeat(mine.reshape(-1),
                                                    grant.counts.reshape(-1))]
                - self.first_id,
                cached_tokens=grant.cached_tokens)
                for grant in request_grants]
            for req_id, request_grants in grants.items()
        }

    def local_copies(self, copies: tuple[np.ndarray, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The (source, copy) id pairs of this rank's heads, ids made local."""
        sources, targets = copies
        if self.num_ranks == 1:
            return sources, targets
        mine = sources // self.num_head_blocks == self.rank
        return sources[mine] - self.first_id, targets[mine] - self.first_id

    def local_books(self, books: HeadBooks) -> HeadBooks:
        """The scheduler's books of one request, for this rank's heads."""
        if self.num_ranks == 1:
            return books
        return HeadBooks(lens=books.lens[:, self.heads],
                         nblocks=books.nblocks[:, self.heads],
                         table=books.table[:, self.heads] - self.first_id)

    # ---------------------------------------------------- ranks -> scheduler
    def gather_reply(self, reply: CompressReply) -> CompressReply:
        """Every rank's lengths of the step's compressed requests, heads in
        rank order, evictions summed, the slowest rank's seconds: what
        rank 0 sends for all. Every rank compresses the same requests in
        the same order, so the gathered arrays line up."""
        if self.num_ranks == 1:
            return reply
        req_ids = list(reply.new_lens)
        mine = torch.from_numpy(np.concatenate(
            [reply.new_lens[r].reshape(-1).astype(np.int64) for r in req_ids]
            + [np.array([reply.evicted[r] for r in req_ids], dtype=np.int64),
               np.array([round(reply.seconds * 1e6),
                         round(reply.reconstruction_seconds * 1e6),
                         reply.reconstruction_tokens], dtype=np.int64)]))
        gathered = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        torch.distributed.all_gather(gathered, mine, group=self.group)
        per_rank = torch.stack(gathered).numpy()  # [ranks, n]
        heads = self.num_layers * self.num_kv_heads
        whole = CompressReply(
            seconds=float(per_rank[:, -3].max()) / 1e6,
            reconstruction_seconds=float(per_rank[:, -2].max()) / 1e6,
            reconstruction_tokens=int(per_rank[0, -1]))  # the same on every rank
        for i, req_id in enumerate(req_ids):
            lens = per_rank[:, i * heads:(i + 1) * heads].reshape(
                self.num_ranks, self.num_layers, self.num_kv_heads)
            whole.new_lens[req_id] = np.concatenate(list(lens), axis=1)
            whole.evicted[req_id] = int(per_rank[:, len(req_ids) * heads + i].sum())
        return whole

    def sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of a float array over the ranks (CAKE's layer
        statistics, which are sums over heads)."""
        if self.num_ranks == 1:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor.numpy()
