"""One rank: every expert is local, so nothing moves. What ``make_dispatcher`` returns at world size 1.

    held tokens --dispatch--> ExpertWork (the same rows, every choice used) --experts--> partials
        --combine--> Anchored (the same tokens, the partials as their sums)

No collective, no counts exchange, no host sync, no policy tables: at world size 1 the a2a machinery cost a
fifth of a decode step (bench/vs_transformers.py profile) for rows that never leave the rank. Every strategy
and transport means the same thing on one rank; the strategy's questions (where KV lives, where tokens start)
are still answered by its policy (comm/dispatchers.py's Dispatcher, which this transport plugs into).

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


class LocalTransport:
    """The transport of a group of one rank: dispatch hands the held rows to the experts, combine hands the
    partials back as the sums."""

    def grow_capacity(self) -> None:
        """Nothing to grow: no buffer can overflow on one rank."""

    @staticmethod
    def dispatch_local(x_ND: torch.Tensor, token_N_host: torch.Tensor, topk_ids_NK: torch.Tensor,
                       topk_weights_NK: torch.Tensor) -> tuple[ExpertWork, LocalHandle]:
        token_N = token_N_host.to(x_ND.device)
        use_NK = torch.ones_like(topk_ids_NK, dtype=torch.bool)
        return ExpertWork(x_ND, token_N, topk_ids_NK, topk_weights_NK, use_NK), LocalHandle(token_N_host, x_ND)

    @staticmethod
    def combine(partial_ND: torch.Tensor, handle: LocalHandle) -> Anchored:
        return Anchored(handle.token_N_host, handle.x_ND, partial_ND)
