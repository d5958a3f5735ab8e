"""The MoE block: router, the experts this rank holds (stacked, one grouped computation), optional shared expert.

Legend: T tokens, N rows (tokens sent to this rank), D hidden, E experts, K top-k, G expert groups.

One process runs it as (``forward``):

    x_TD --router.route--> topk_weights_TK, topk_ids_TK
         --local_weighted_sum (every k used)--> y_TD  (+ shared_output(x_TD): Qwen2-MoE gated, DeepSeek plain)

An EP rank runs the same pieces on the rows it received, with ``use_NK`` marking the (row, k) choices whose
expert it holds. The weighted sum runs in k order (y = t_0 + t_1 + ...). Adding per-rank partial sums gives
the one-process bits for top-k <= 2 only (two terms commute; zeros add exactly); for k >= 3 float addition
is not associative, so a caller wanting the same bits collects the K terms of ``weighted_expert_outputs``
and sums them with ``sum_in_k_order``.

Routers (transformers' rules, per family):

    scoring  topk_method            choice                                              weights
    softmax  greedy                 top-k of softmax(logits)                            renormalised iff the config
    softmax  group_limited_greedy   top groups by their best expert, others -> 0, top-k  (DeepSeek-V2: never)
    sigmoid  noaux_tc               sigmoid + e_score_correction_bias; top groups by     unbiased sigmoid scores,
                                    the sum of their top-2, others -> -inf, top-k        / (sum + 1e-20) iff norm
    every weight then x routed_scaling_factor; DeepSeek computes the logits from float32 x and weight.

Ids come back ordered by weight, highest first, ties by lower id (transformers' DeepSeek routers use
``sorted=False``: the same set and weights, another order). The weights are computed exactly as transformers
does (the same ops in the same order, normalisation before the reordering), so they carry its bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epserve.model.config import ModelConfig, RouterScoring, TopkMethod
from epserve.model.experts import ExpertNotLoadedError, GroupedExperts
from epserve.model.layers import ExpertMLP

__all__ = ["ExpertNotLoadedError", "MoEBlock", "Router", "sum_in_k_order"]


class Router(nn.Module):
    """Top-k router of every supported family (table in the module docstring). ``weight`` [E, D] is float32
    when the family routes in float32 (DeepSeek keeps ``gate.weight`` in float32); V3's
    ``e_score_correction_bias`` [E] is a float32 buffer loaded from the checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E = config.num_experts   # (ModelConfig checks the groups: they divide E and hold top_k experts)
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        if config.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.empty(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.top_k, self.scoring, self.topk_method = config.top_k, config.scoring, config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.renormalise = config.renormalise_topk
        self.scaling = config.routed_scaling_factor
        self.in_float32 = config.router_in_float32

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights_TK float32, topk_ids_TK int64), ids by weight, highest first (ties: lower id)."""
        if self.in_float32:
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        else:
            logits_TE = F.linear(x_TD, self.weight)
        if self.scoring is RouterScoring.SOFTMAX:
            scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        else:
            scores_TE = logits_TE.float().sigmoid()
        choice_TE = scores_TE if self.e_score_correction_bias is None else scores_TE + self.e_score_correction_bias
        if self.topk_method is TopkMethod.GREEDY:
            # sorted=True: the plain families' transformers code, whose renormalising sum runs in this order
            topk_w_TK, topk_ids_TK = torch.topk(choice_TE, self.top_k, dim=-1)
        else:
            choice_TE = self._limit_groups(choice_TE)
            topk_w_TK, topk_ids_TK = torch.topk(choice_TE, self.top_k, dim=-1, sorted=False)
        if self.topk_method is TopkMethod.NOAUX_TC or self.e_score_correction_bias is not None:
            topk_w_TK = scores_TE.gather(1, topk_ids_TK)   # the bias picks, the unbiased scores weigh
        if self.renormalise:
            total_T1 = topk_w_TK.sum(dim=-1, keepdim=True)
            topk_w_TK = topk_w_TK / (total_T1 if self.scoring is RouterScoring.SOFTMAX else total_T1 + 1e-20)
        topk_w_TK = topk_w_TK * self.scaling
        return _by_weight(topk_w_TK, topk_ids_TK)

    def _limit_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Experts outside the token's ``topk_group`` best groups masked out: groups ranked by their best
        score (V2, masked to 0) or by the sum of their top-2 scores (V3, masked to -inf)."""
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, self.n_group, E // self.n_group)
        if self.topk_method is TopkMethod.GROUP_LIMITED_GREEDY:
            group_TG, fill = choice_TGe.max(dim=-1).values, 0.0
        else:
            group_TG, fill = choice_TGe.topk(2, dim=-1)[0].sum(dim=-1), float("-inf")
        group_idx_TJ = torch.topk(group_TG, k=self.topk_group, dim=-1, sorted=False)[1]
        keep_TG = torch.zeros_like(group_TG).scatter_(1, group_idx_TJ, 1).bool()
        keep_TE = keep_TG[:, :, None].expand(T, self.n_group, E // self.n_group).reshape(T, E)
        return choice_TE.masked_fill(~keep_TE, fill)


def _by_weight(w_TK: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row's k choices by weight, highest first, ties by lower id (two stable sorts)."""
    ids_TK, perm_TK = torch.sort(ids_TK, dim=-1, stable=True)
    w_TK = w_TK.gather(1, perm_TK)
    w_TK, perm_TK = torch.sort(w_TK, dim=-1, descending=True, stable=True)
    return w_TK, ids_TK.gather(1, perm_TK)


class MoEBlock(nn.Module):
    """Router + the routed experts held here (``experts``: GroupedExperts) + optional shared expert.

    A choice with ``use_NK`` whose expert is not held gives 0 on the hot path (no host sync to look);
    ``check_loaded`` (a host sync, run by the Runner when the dispatcher's ``check_splits`` debug mode is on)
    raises ExpertNotLoadedError naming the MoE layer, the decoder layer and the expert."""

    def __init__(self, config: ModelConfig, *, moe_index: int, layer: int, expert_ids) -> None:
        super().__init__()
        self.moe_index, self.layer = moe_index, layer
        self.router = Router(config)
        self.experts = GroupedExperts(config.hidden_size, config.moe_intermediate_size, expert_ids,
                                      config.num_experts)
        self.weights_in_model_dtype = config.weights_in_model_dtype
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = ExpertMLP(config.hidden_size, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    @property
    def expert_ids(self) -> tuple[int, ...]:
        """Global ids of the experts held here, ascending."""
        return self.experts.expert_ids

    def check_loaded(self, topk_ids_NK: torch.Tensor, use_NK: torch.Tensor) -> None:
        """Debug: raise ExpertNotLoadedError if a used choice needs an expert not held here (host sync)."""
        e = self.experts.missing_expert(topk_ids_NK, use_NK)
        if e is not None:
            raise ExpertNotLoadedError(f"MoE layer {self.moe_index} (decoder layer {self.layer}): expert {e} "
                                       f"is needed but not loaded here (loaded: {list(self.expert_ids)})")

    def weighted_expert_outputs(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor,
                                topk_weights_NK: torch.Tensor, use_NK: torch.Tensor) -> torch.Tensor:
        """y_NKD[n, k] = w_nk * expert[id_nk](x_n) where use_NK (and the expert is held here), else 0 (in x's
        dtype). One grouped computation, no host sync."""
        return self.experts.weighted_outputs(x_ND, topk_ids_NK, topk_weights_NK, use_NK,
                                             weights_in_model_dtype=self.weights_in_model_dtype)

    def local_weighted_sum(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor,
                           use_NK: torch.Tensor) -> torch.Tensor:
        """y_ND (float32) = sum over k (in k order) with use_NK of w_nk * expert[id_nk](x_n)."""
        return sum_in_k_order(self.weighted_expert_outputs(x_ND, topk_ids_NK, topk_weights_NK, use_NK))

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """sigmoid(gate(x)) * shared_expert(x) (Qwen2-MoE), shared_expert(x) (DeepSeek's ungated shared
        experts, one MLP of width moe_intermediate_size x n_shared_experts), or None without one."""
        if self.shared_expert is None:
            return None
        if self.shared_expert_gate is None:
            return self.shared_expert(x_TD)
        return torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)

    def forward(self, x_TD: torch.Tensor, routing_out: list | None = None) -> torch.Tensor:
        """One-process MoE output (every expert must be held). Appends (topk_ids_TK, topk_weights_TK) to
        ``routing_out`` when given."""
        topk_weights_TK, topk_ids_TK = self.router.route(x_TD)
        if routing_out is not None:
            routing_out.append((topk_ids_TK, topk_weights_TK))
        use_TK = torch.ones_like(topk_ids_TK, dtype=torch.bool)
        y_TD = self.local_weighted_sum(x_TD, topk_ids_TK, topk_weights_TK, use_TK).to(x_TD.dtype)
        shared_TD = self.shared_output(x_TD)
        return y_TD if shared_TD is None else y_TD + shared_TD


def sum_in_k_order(y_NKD: torch.Tensor) -> torch.Tensor:
    """t_0 + t_1 + ... + t_{K-1} accumulated in float32, left to right; the caller rounds once to the model
    dtype. The terms are model-dtype values (bfloat16: 8 significant bits), so their float32 sum is exact unless
    they span more than ~2^13 in magnitude: the result then does not depend on how the k terms are split into
    partial sums on different ranks (comm/partial_sums.py sends float32 partials for k >= 3)."""
    y_ND = y_NKD[:, 0].float()
    for k in range(1, y_NKD.shape[1]):
        y_ND = y_ND + y_NKD[:, k].float()
    return y_ND
