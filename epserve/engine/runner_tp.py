"""TPRunner: the step under tensor-parallel attention (``--attention tp``, strategy tp_two_a2a).

    StepPlan --> (as Runner) K/V slots on every rank (each rank caches every sequence, its own heads only)
      --> every rank embeds every step token; the token chunks of this step (placement/tp_shuffle.py)
      --> for each decoder layer:
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
from placement.tp_shuffle import contiguous_chunks, real_rows_G


class TPRunner(Runner):
    @property
    def strategy_label(self) -> str:
        return f"tp_{self.strategy.value}"

    def _start(self, batch: StepBatch, attempt: _Attempt) -> _Held:
        T, G = batch.num_tokens, self.topology.world_size
        attempt.tp_order = contiguous_chunks(T, G)
        attempt.held_bound = attempt.tp_order.shape[1]
        ids_T = torch.as_tensor(batch.token_T, device=self.topology.device)
        return _Held(torch.arange(T), self.model.embed_tokens(ids_T))

    def _layer(self, layer, batch: StepBatch, held: _Held, slot_T: torch.Tensor, attempt: _Attempt) -> _Held:
        m, dev = layer.moe_index, self.topology.device
        order_GC = attempt.tp_order
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
        out_CD = chunk.x_ND.new_zeros(C, chunk.x_ND.shape[1])
        out_CD[: reals[me]] = chunk.x_ND
        all_XD = self.coll.all_gather_rows(out_CD, phase="tp_gather", layer=m, real_rows=reals[me])
        all_XD = all_XD.reshape(G * C, -1)
        x_TD = torch.empty_like(held.x_ND)
        x_TD[rows] = all_XD[torch.as_tensor(np.flatnonzero(valid), device=dev)]
        return _Held(held.token_N, x_TD)

    def _attention_partial(self, layer, held: _Held) -> torch.Tensor:
        """This rank's heads' share of the layer's attention output for every step token (their own K/V
        written first; paged attention over this rank's heads of the cache)."""
        ctx = self._step_attention.context(held.token_N)
        q_NHd, k_NHd, v_NHd = layer.attn.project_qkv(layer.input_norm(held.x_ND), ctx.pos_N)
        self.kv.cache.write(layer.layer, ctx.slot_N, k_NHd, v_NHd)
        o_NHv = paged_attention(q_NHd, *self.kv.cache.layer(layer.layer), ctx, scale=layer.attn.softmax_scale,
                                value_dim=layer.attn.value_dim, scratch=self._gather_scratch)
        return partial_output(layer.attn, o_NHv)
