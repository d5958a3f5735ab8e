"""TPRunner: the step under tensor-parallel attention (``--attention tp``: tp_two_a2a, or tp_speculative with a
predictor).

    StepPlan --> (as Runner) K/V slots on every rank (each rank caches every sequence, its own heads only)
      --> every rank embeds every step token
      --> for each decoder layer, the token chunks (placement/tp_shuffle.py): contiguous (tp_two_a2a, and dense
          layers), or for a MoE layer under tp_speculative each token on the rank the predictor names for that
          layer (token id table + n-gram over the previous MoE layers' top-1 ranks, which every rank learns from
          a small all-gather of the chunk's top-1 expert ids), balanced to C rows per rank:
            attention for ALL step tokens on this rank's heads (epserve/model/tp.py) --> partial outputs [T, D]
            --reduce-scatter (rows in chunk order, float32 for 16-bit models)--> this rank's chunk [C, D]
            residual add on the chunk; dense layer on the chunk, or MoE layer: router --> dispatch --> experts
            --> combine (the two_a2a policy: the chunk's rank is each token's home for the layer)
            --all-gather (inverse of the chunk order)--> every rank holds every token again (not after the
            last layer: the chunk's rank samples its sequences' last tokens, as Runner._finish does)

The reduce-scatter and the all-gather are the reduction TP attention needs anyway; they move (G - 1) hidden
states per token each and are counted (CollKind.REDUCE_SCATTER, ALL_GATHER) with the layer's MoE index.

Legend: T step tokens, C rows per rank's chunk, G ranks, D hidden, N tokens held here.
"""

from __future__ import annotations

import numpy as np
import torch

from epserve.engine.paged_attention import paged_attention
from epserve.engine.runner import Runner, _Attempt, _Held
from epserve.engine.step_batch import StepBatch
from epserve.model.tp import partial_output
from placement.tp_shuffle import balanced_chunks, chunk_rows, contiguous_chunks, real_rows_G


class TPRunner(Runner):
    def __init__(self, *, shuffle_predictor=None, capacity_factor: float = 2.0, **kw) -> None:
        """``shuffle_predictor``: a SpeculativePredictor (tp_speculative), or None (tp_two_a2a).
        ``capacity_factor``: tp_speculative's chunk rows per rank, ceil(factor x T / G): room for the predicted
        ranks of a skewed batch (a decode step of G tokens has one row per rank at factor 1), paid in padding
        rows of the reduce-scatter and all-gather."""
        super().__init__(**kw)
        self.shuffle_predictor, self.capacity_factor = shuffle_predictor, capacity_factor
        self._primary_LE = np.asarray(self.placement.expert_to_gpu_LE) if self.placement is not None else None

    @property
    def strategy_label(self) -> str:
        return "tp_speculative" if self.shuffle_predictor is not None else f"tp_{self.strategy.value}"

    def _start(self, batch: StepBatch, attempt: _Attempt) -> _Held:
        T, G = batch.num_tokens, self.topology.world_size
        factor = self.capacity_factor if self.shuffle_predictor is not None else 1.0
        attempt.held_bound = min(T, chunk_rows(int(np.ceil(factor * T)), G)) if T else 1
        attempt.tp_top1_rank_TL = np.full((T, self.model.config.num_moe_layers), -1, dtype=np.int64)
        ids_T = torch.as_tensor(batch.token_T, device=self.topology.device)
        return _Held(torch.arange(T), self.model.embed_tokens(ids_T))

    def _chunks(self, m: int | None, batch: StepBatch, attempt: _Attempt) -> np.ndarray:
        """This layer's token chunks [G, C]: contiguous, or balanced over the predicted ranks (MoE, s-TS)."""
        T, G = batch.num_tokens, self.topology.world_size
        if m is None or self.shuffle_predictor is None:
            return contiguous_chunks(T, G)
        rank_T = self.shuffle_predictor.predict_layer(batch.token_T, attempt.tp_top1_rank_TL, m)   # host metadata
        return balanced_chunks(rank_T, G, capacity_factor=self.capacity_factor)

    def _layer(self, layer, batch: StepBatch, held: _Held, slot_T: torch.Tensor, attempt: _Attempt) -> _Held:
        m, dev = layer.moe_index, self.topology.device
        order_GC = self._chunks(m, batch, attempt)
        G, C = order_GC.shape
        me = self.topology.rank
        partial_TD = self._attention_partial(layer, held)
        valid = order_GC.reshape(-1) >= 0
        rows = torch.as_tensor(order_GC.reshape(-1)[valid], device=dev)
        send_XD = partial_TD.new_zeros(G * C, partial_TD.shape[1])
        send_XD[torch.as_tensor(np.flatnonzero(valid), device=dev)] = partial_TD[rows]
        reals = real_rows_G(order_GC)
        mine_CD = self.coll.reduce_scatter_rows(send_XD.view(G, C, -1), phase="tp_attention", layer=m,
                                                real_rows_G=reals)
        token_C = torch.as_tensor(order_GC[me][: reals[me]])
        x_ND = held.x_ND[token_C.to(dev)] + mine_CD[: reals[me]].to(held.x_ND.dtype)
        if m is None:
            chunk = _Held(token_C, x_ND + layer.mlp(layer.post_attn_norm(x_ND)))
        else:
            chunk = self._moe(layer, batch, _Held(token_C, x_ND), attempt)
        if layer is self.model.layers[-1]:
            return chunk   # the last tokens are sampled where their chunk is (Runner._finish)
        if m is not None and self.shuffle_predictor is not None and m + 1 < self.model.config.num_moe_layers:
            self._share_top1(m, order_GC, reals, attempt)
        out_CD = chunk.x_ND.new_zeros(C, chunk.x_ND.shape[1])
        out_CD[: reals[me]] = chunk.x_ND
        all_XD = self.coll.all_gather_rows(out_CD, phase="tp_gather", layer=m, real_rows=reals[me])
        all_XD = all_XD.reshape(G * C, -1)
        x_TD = torch.empty_like(held.x_ND)
        x_TD[rows] = all_XD[torch.as_tensor(np.flatnonzero(valid), device=dev)]
        return _Held(held.token_N, x_TD)

    def _share_top1(self, m: int, order_GC: np.ndarray, reals: list[int], attempt: _Attempt) -> None:
        """Every rank learns the top-1 expert's (primary) rank of every step token at MoE layer m: the n-gram
        context of the next layers' predictions (one all-gather of C int64 per rank; a host sync: s-TS only)."""
        me, C = self.topology.rank, order_GC.shape[1]
        ids_C = torch.full((C,), -1, dtype=torch.int64, device=self.topology.device)
        ids_C[: reals[me]] = attempt.routed[-1][1][:, 0].long()   # this layer's chunk, in order
        all_GC = self.coll.all_gather_rows(ids_C, phase="tp_routes", layer=m, real_rows=reals[me]).cpu().numpy()
        valid = order_GC >= 0
        attempt.tp_top1_rank_TL[order_GC[valid], m] = self._primary_LE[m][all_GC[valid]]

    def _attention_partial(self, layer, held: _Held) -> torch.Tensor:
        """This rank's heads' share of the layer's attention output for every step token (their own K/V
        written first; paged attention over this rank's heads of the cache)."""
        ctx = self._step_attention.context(held.token_N)
        q_NHd, k_NHd, v_NHd = layer.attn.project_qkv(layer.input_norm(held.x_ND), ctx.pos_N)
        self.kv.cache.write(layer.layer, ctx.slot_N, k_NHd, v_NHd)
        o_NHv = paged_attention(q_NHd, *self.kv.cache.layer(layer.layer), ctx, scale=layer.attn.softmax_scale,
                                value_dim=layer.attn.value_dim, scratch=self._gather_scratch)
        return partial_output(layer.attn, o_NHv)
