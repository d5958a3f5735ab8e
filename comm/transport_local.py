"""One rank: every expert is local, so nothing moves. What ``make_dispatcher`` returns at world size 1.

    held tokens --dispatch--> ExpertWork (the same rows, every choice used) --experts--> partials
        --combine--> Anchored (the same tokens, the partials as their sums)

No collective, no counts exchange, no host sync, no policy tables: at world size 1 the a2a machinery cost a
fifth of a decode step (bench/vs_transformers.py profile) for rows that never leave the rank. Every strategy
and transport means the same thing on one rank, so the strategy's questions (where KV lives, where tokens
start) are still answered by its policy.

Legend: N tokens held here, K top-k, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm.transport_base import Anchored, ExpertWork


@dataclass(frozen=True)
class LocalHandle:
    token_N_host: torch.Tensor
    x_ND: torch.Tensor


class SingleRankDispatcher:
    """The Dispatcher interface (comm/dispatchers.py) for a group of one rank."""

    def __init__(self, policy, transport_kind, coll, expert_to_rank_LE: torch.Tensor) -> None:
        if coll.world_size != 1:
            raise ValueError(f"SingleRankDispatcher is for one rank, the group has {coll.world_size}")
        self.policy, self.transport_kind, self.coll = policy, transport_kind, coll
        self.expert_to_rank_LE = expert_to_rank_LE
        self.check_splits = False

    @property
    def strategy(self):
        return self.policy.strategy

    @property
    def replicated_kv(self) -> bool:
        return self.policy.replicated_kv

    @property
    def tokens_move(self) -> bool:
        return self.policy.tokens_move

    def start_ranks_T(self, **kw):
        return self.policy.start_ranks_T(**kw)

    def preferred_home_rank(self, prompt_ids) -> int | None:
        return self.policy.preferred_home_rank(prompt_ids)

    def grow_capacity(self) -> None:
        """Nothing to grow: no buffer can overflow on one rank."""

    def dispatch(self, x_ND: torch.Tensor, token_N_host: torch.Tensor, topk_ids_NK: torch.Tensor,
                 topk_weights_NK: torch.Tensor, is_prefill_N: torch.Tensor, **_) -> tuple[ExpertWork, LocalHandle]:
        token_N = token_N_host.to(x_ND.device)
        use_NK = torch.ones_like(topk_ids_NK, dtype=torch.bool)
        return ExpertWork(x_ND, token_N, topk_ids_NK, topk_weights_NK, use_NK), LocalHandle(token_N_host, x_ND)

    def combine(self, partial_ND: torch.Tensor, handle: LocalHandle) -> Anchored:
        return Anchored(handle.token_N_host, handle.x_ND, partial_ND)
