"""The MoE block: router, the experts this rank holds, optional shared expert.

Legend: T tokens, N rows (tokens sent to this rank), D hidden, E experts, K top-k.

One process runs it as (``forward``):

    x_TD --router.route--> topk_weights_TK, topk_ids_TK
         --local_weighted_sum (every k used)--> y_TD  (+ shared_output(x_TD) for Qwen2-MoE)

An EP rank runs the same pieces on the rows it received, with ``use_NK`` marking the (row, k) choices whose
expert it holds. The weighted sum runs in k order (y = t_0 + t_1 + ...). Adding per-rank partial sums gives
the one-process bits for top-k <= 2 only (two terms commute; zeros add exactly); for k >= 3 float addition
is not associative, so a caller wanting the same bits collects the K terms of ``weighted_expert_outputs``
and sums them with ``sum_in_k_order``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epserve.model.config import ModelConfig
from epserve.model.layers import ExpertMLP


class ExpertNotLoadedError(LookupError):
    """A token needs an expert that this rank did not load: a placement / dispatch bug, never user input."""


class Router(nn.Module):
    """Top-k softmax router, exactly the family's transformers rule: logits in the model dtype, softmax over
    all E experts in float32, top-k (ids ordered by weight, highest first), renormalised iff the family says."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.top_k = config.top_k
        self.renormalise = config.renormalise_topk

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights_TK float32, topk_ids_TK int64)."""
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        topk_weights_TK, topk_ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalise:
            topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
        return topk_weights_TK, topk_ids_TK


class MoEBlock(nn.Module):
    def __init__(self, config: ModelConfig, *, moe_index: int, layer: int, expert_ids) -> None:
        super().__init__()
        self.moe_index, self.layer = moe_index, layer
        self.router = Router(config)
        self.experts = nn.ModuleDict({str(e): ExpertMLP(config.hidden_size, config.moe_intermediate_size)
                                      for e in sorted(expert_ids)})
        self.weights_in_model_dtype = config.weights_in_model_dtype
        if config.shared_expert_intermediate_size:
            self.shared_expert = ExpertMLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    @property
    def expert_ids(self) -> tuple[int, ...]:
        """Global ids of the experts held here, ascending."""
        return tuple(sorted(int(e) for e in self.experts))

    def weighted_expert_outputs(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                                topk_weights_NK: torch.Tensor, use_NK: torch.Tensor) -> torch.Tensor:
        """y_NKD[n, k] = w_nk * expert[id_nk](x_n) where use_NK, else 0 (in x's dtype).

        Raises ExpertNotLoadedError naming the expert if a used choice needs one not held here."""
        N, K = topk_ids_NK.shape
        use_NK = use_NK.to(torch.bool)  # an integer 0/1 mask would index instead of masking
        y_NKD = x_ND.new_zeros(N, K, x_ND.shape[-1])
        ids_used = torch.unique(topk_ids_NK[use_NK]).tolist()  # host sync: which experts run
        for e in ids_used:
            expert = self.experts[str(e)] if str(e) in self.experts else None
            if expert is None:
                raise ExpertNotLoadedError(f"MoE layer {self.moe_index} (decoder layer {self.layer}): expert {e} "
                                           f"is needed but not loaded here (loaded: {list(self.expert_ids)})")
            n_M, k_M = torch.nonzero((topk_ids_NK == e) & use_NK, as_tuple=True)
            out_MD = expert(x_ND[n_M])
            w_M = topk_weights_NK[n_M, k_M]
            if self.weights_in_model_dtype:
                w_M = w_M.to(out_MD.dtype)
            y_NKD[n_M, k_M] = (out_MD * w_M[:, None]).to(x_ND.dtype)
        return y_NKD

    def local_weighted_sum(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor,
                           use_NK: torch.Tensor) -> torch.Tensor:
        """y_ND = sum over k (in k order) with use_NK of w_nk * expert[id_nk](x_n)."""
        return sum_in_k_order(self.weighted_expert_outputs(x_ND, topk_ids_NK, topk_weights_NK, use_NK))

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """sigmoid(gate(x)) * shared_expert(x) (Qwen2-MoE), or None when the model has no shared expert."""
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)

    def forward(self, x_TD: torch.Tensor, routing_out: list | None = None) -> torch.Tensor:
        """One-process MoE output (every expert must be held). Appends (topk_ids_TK, topk_weights_TK) to
        ``routing_out`` when given."""
        topk_weights_TK, topk_ids_TK = self.router.route(x_TD)
        if routing_out is not None:
            routing_out.append((topk_ids_TK, topk_weights_TK))
        use_TK = torch.ones_like(topk_ids_TK, dtype=torch.bool)
        y_TD = self.local_weighted_sum(x_TD, topk_ids_TK, topk_weights_TK, use_TK)
        shared_TD = self.shared_output(x_TD)
        return y_TD if shared_TD is None else y_TD + shared_TD


def sum_in_k_order(y_NKD: torch.Tensor) -> torch.Tensor:
    """t_0 + t_1 + ... + t_{K-1}, left to right: the one order every rank and the reference use."""
    y_ND = y_NKD[:, 0]
    for k in range(1, y_NKD.shape[1]):
        y_ND = y_ND + y_NKD[:, k]
    return y_ND
