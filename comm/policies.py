"""Policies: where a token starts a step and where its expert outputs are summed (its anchor), per Strategy.

    two_a2a              start = home, anchor = home (the rank holding it): dispatch + combine every MoE layer
    coherent             decode: start = where its previous token was sampled, anchor = rank of its top-1 expert,
                         or the r_k an anchor table scores highest (placement/anchor.py); prefill: as two_a2a.
                         With top-1 routing and no prefill in the step: no combine at all.
    speculative          as coherent, but a decode token starts on the predictor's confident rank
    speculative_two_a2a  as two_a2a; new requests go to the home rank their prompt is predicted to use most

A policy is pure: start ranks from step metadata (numpy, identical on every rank), anchors from routing (device
tensors, no host sync). Transports (comm/transport_*.py) move what the policy decides.

Legend: T step tokens, N tokens held here, K top-k, L MoE layers, E experts, G ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from comm.routes import table_anchor_N
from comm.strategy import Strategy


class Policy:
    """two_a2a: tokens stay on their home rank; every expert output comes back there."""

    strategy = Strategy.TWO_A2A
    replicated_kv = False     # every rank holds every sequence's K/V (K/V copies between ranks)
    tokens_move = False       # a token can live on another rank after a MoE layer than before it

    def __init__(self, *, rank: int, top_k: int, predictor=None, anchor_score_LEG: torch.Tensor | None = None):
        self.rank, self.top_k, self.predictor, self.anchor_score_LEG = rank, top_k, predictor, anchor_score_LEG

    def start_ranks_T(self, *, home_T: np.ndarray, prev_rank_T: np.ndarray, is_prefill_T: np.ndarray,
                      token_ids_T: np.ndarray) -> np.ndarray:
        """Where each step token starts (identical on every rank: computed from step metadata only).
        ``prev_rank_T``: the rank where the sequence's previous token was sampled if it was a decode token,
        else -1."""
        return home_T.copy()

    def anchor_N(self, rank_NK: torch.Tensor, topk_ids_NK: torch.Tensor, is_prefill_N: torch.Tensor, *,
                 layer: int) -> torch.Tensor:
        return torch.full((rank_NK.shape[0],), self.rank, dtype=torch.long, device=rank_NK.device)

    def needs_combine(self, *, step_has_prefill: bool) -> bool:
        return True

    def preferred_home_rank(self, prompt_ids) -> int | None:
        return None


class CoherentPolicy(Policy):
    strategy = Strategy.COHERENT
    replicated_kv = True
    tokens_move = True

    def start_ranks_T(self, *, home_T, prev_rank_T, is_prefill_T, token_ids_T):
        return np.where(is_prefill_T | (prev_rank_T < 0), home_T, prev_rank_T)

    def anchor_N(self, rank_NK, topk_ids_NK, is_prefill_N, *, layer):
        decode_N = rank_NK[:, 0] if self.anchor_score_LEG is None else \
            table_anchor_N(self.anchor_score_LEG[layer], topk_ids_NK, rank_NK)
        return torch.where(is_prefill_N, torch.full_like(rank_NK[:, 0], self.rank), decode_N)

    def needs_combine(self, *, step_has_prefill):
        return self.top_k > 1 or step_has_prefill


class SpeculativePolicy(CoherentPolicy):
    strategy = Strategy.SPECULATIVE

    def start_ranks_T(self, *, home_T, prev_rank_T, is_prefill_T, token_ids_T):
        coherent_T = super().start_ranks_T(home_T=home_T, prev_rank_T=prev_rank_T, is_prefill_T=is_prefill_T,
                                           token_ids_T=token_ids_T)
        rank_T, confident_T = self.predictor.predict_start_ranks(np.asarray(token_ids_T))
        return np.where(confident_T & ~is_prefill_T, rank_T, coherent_T)


class SpeculativeTwoA2APolicy(Policy):
    strategy = Strategy.SPECULATIVE_TWO_A2A

    def preferred_home_rank(self, prompt_ids):
        rank = self.predictor.predict_home_rank(np.asarray(prompt_ids), default=-1)
        return None if rank < 0 else int(rank)


POLICIES = {cls.strategy: cls for cls in (Policy, CoherentPolicy, SpeculativePolicy, SpeculativeTwoA2APolicy)}
