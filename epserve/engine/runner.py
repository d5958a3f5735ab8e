"""Runner: one rank's step executor. Every rank runs ``execute(plan)`` on the same plan, in lockstep.

    StepPlan --StepBatch (token metadata, identical on every rank)--> flush K/V copies, free released KV,
             reserve KV for the new positions (refused identically on every rank when full)
      --> start rank of every token (dispatcher policy) --> embed the tokens that start here
      --> for each decoder layer, on the tokens held here:
            wait for the K/V copies this layer reads (coherent)
            attention over the paged cache (their own new K/V written first)
            dense layer:  x += mlp(post_attn_norm(x))
            MoE layer:    router --> dispatch (counts carry the K/V row counts) --> launch K/V copies
                          --> experts on the rows received --> combine --> tokens now held on their anchor
      --> norm + lm_head + sampling where each sequence's last token ended
      --> all-gather of sampled ids (+ K/V row counts of the trailing layers) --> StepResult on every rank

Legend: T step tokens, N tokens held here, M rows computed here, A tokens anchored here, W work items,
D hidden, K top-k, V vocab, S cache keys, Hkv kv heads, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from comm.dispatchers import Dispatcher
from comm.primitives import Collectives
from epserve.engine.kv_cache import KVStats, KVStore
from epserve.engine.forced_routing import ForcedRouting
from epserve.engine.kv_coherence import KVCoherence
from epserve.engine.paged_attention import GatherScratch, StepAttention, paged_attention
from epserve.engine.plan import StepPlan, StepResult
from epserve.engine.recorder import RoutingRecorder
from epserve.engine.sampling import sample_rows
from epserve.engine.step_batch import StepBatch
from epserve.model.model import MoEModel
from placement.transport import Transport

NOT_HERE, HERE_UNSAMPLED = -1, -2   # entries of the sampled-id gather
MAX_STEP_TRIES = 40                 # a step reruns after a fixed-buffer overflow with twice the room: log2(T) at most


def kv_groups(num_layers: int, moe_layer_ids: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Runs of decoder layers during which no token moves: each ends at a MoE layer; a last run holds the
    layers after the last MoE layer (if any)."""
    groups, start = [], 0
    for layer in moe_layer_ids:
        groups.append(tuple(range(start, layer + 1)))
        start = layer + 1
    if start < num_layers:
        groups.append(tuple(range(start, num_layers)))
    return groups


@dataclass
class _Attempt:
    """What one run of a step collects before it is known to be kept (a fixed buffer may overflow)."""

    held_bound: int = 0
    overflow: torch.Tensor | None = None    # device bool: some fixed buffer overflowed on this rank
    routed: list = field(default_factory=list)   # (MoE layer, topk ids) for the live statistics
    tp_top1_rank_TL: np.ndarray | None = None    # --attention tp, s-TS: top-1 ranks seen so far (runner_tp.py)


@dataclass(frozen=True)
class _Held:
    """Tokens held on this rank, by step-local index (ascending), with their hidden states."""

    token_N: torch.Tensor
    x_ND: torch.Tensor


class Runner:
    def __init__(self, *, model: MoEModel, coll: Collectives, dispatcher: Dispatcher, kv: KVStore,
                 recorder: RoutingRecorder | None = None, window: RoutingRecorder | None = None,
                 load_report=None, placement=None, forced_routing: ForcedRouting | None = None) -> None:
        config = model.config
        self.model, self.coll, self.dispatcher, self.kv = model, coll, dispatcher, kv
        self.recorder, self.load_report, self.placement = recorder, load_report, placement
        self.window = window   # the latest routing (a ring recorder): what live re-placement solves on
        self._recorders = tuple(r for r in (recorder, window) if r is not None)
        self.forced_routing = forced_routing   # benchmarks: routing replayed from a trace
        self.topology = coll.topology
        self.counters = coll.counters
        self.groups = kv_groups(config.num_layers, config.moe_layer_ids)
        self._group_of_layer = {l: g for g, layers in enumerate(self.groups) for l in layers}
        self._trailing_group = len(config.moe_layer_ids) if len(self.groups) > len(config.moe_layer_ids) else None
        moe_of_group = list(range(len(config.moe_layer_ids))) + [None] * (len(self.groups) - len(config.moe_layer_ids))
        self.coherence = None if not dispatcher.replicated_kv else KVCoherence(
            coll, kv.cache, self.groups, moe_of_group, node_dedup=dispatcher.transport_kind is Transport.NODE_AWARE)
        self._prev_rank: dict[int, int] = {}   # seq_id -> rank where its last decode token was sampled
        self.retried_steps = 0                 # steps run again after a fixed buffer overflowed
        self.live_stats = None   # epserve.engine.live_stats.LiveStats, attached by the engine
        self._step_attention: StepAttention | None = None   # this step's attention contexts (per held-token set)
        self._gather_scratch = GatherScratch()              # reused K/V gather buffers (host allocations)

    # ---- queries for the scheduler --------------------------------------------------------------------
    @property
    def strategy(self):
        return self.dispatcher.strategy

    @property
    def strategy_label(self) -> str:
        """What reports call the strategy (TPRunner: tp_<strategy>)."""
        return self.strategy.value

    def kv_stats(self) -> KVStats:
        return self.kv.stats()

    def preferred_home_rank(self, prompt_ids) -> int | None:
        """speculative_two_a2a: the rank the prompt is predicted to use most; None for other strategies."""
        return self.dispatcher.preferred_home_rank(prompt_ids)

    # ---- the step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, *, return_logits: bool = False) -> StepResult:
        if self.coherence is not None:
            self.coherence.wait()   # the last step's copies: before blocks are freed or the cache is read
        if plan.release:
            self.kv.release(plan.release)
            for s in plan.release:
                self._prev_rank.pop(s, None)
        if not plan.work:
            return StepResult(step=plan.step)
        batch = StepBatch.from_plan(plan, world_size=self.topology.world_size,
                                    vocab_size=self.model.config.vocab_size)
        new_slots = self.kv.reserve_step(plan.work)
        slot_T = self._slot_T(batch, new_slots)
        # block tables are fixed until the next step: attention contexts are built once per held-token set
        self._step_attention = StepAttention(self.kv.cache.ledger, batch.seq_T, batch.pos_T, slot_T,
                                             self.topology.device)
        for recorder in self._recorders:
            recorder.begin_step(batch)
        for _ in range(MAX_STEP_TRIES):
            attempt = _Attempt()
            held = self._start(batch, attempt)
            for layer in self.model.layers:
                held = self._layer(layer, batch, held, slot_T, attempt)
            result = self._finish(batch, held, slot_T, return_logits, attempt)
            if result is not None:
                return result
            # some fixed buffer overflowed on some rank (every rank saw it in the same gather): run the step
            # again with more room; K/V rows, recorder rows and logits are all overwritten by the rerun
            self.dispatcher.grow_capacity()
            self.retried_steps += 1
            if self.coherence is not None:
                self.coherence.discard()
        raise RuntimeError(f"step {plan.step}: fixed buffers still overflowed after {MAX_STEP_TRIES} runs with "
                           f"doubling capacity (a capacity as large as the step's tokens cannot overflow: a bug)")

    def _slot_T(self, batch: StepBatch, new_slots: dict[int, np.ndarray]) -> torch.Tensor:
        """Cache slot of every step token (-1 where this rank does not hold the sequence's KV), on the host."""
        slot_T = np.full(batch.num_tokens, -1, dtype=np.int64)
        start = 0
        for work in batch.plan.work:   # a work's tokens are contiguous in the step
            end = start + len(work.token_ids)
            if work.seq_id in new_slots:
                slot_T[start:end] = new_slots[work.seq_id]
            start = end
        return torch.from_numpy(slot_T)

    def _start(self, batch: StepBatch, attempt: "_Attempt") -> _Held:
        prev_W = np.array([self._prev_rank.get(w.seq_id, -1) for w in batch.plan.work], dtype=np.int64)
        prev_T = prev_W[batch.work_T]   # one look-up per sequence, not per token (prefill chunks are long)
        start_T = self.dispatcher.start_ranks_T(home_T=batch.home_T, prev_rank_T=prev_T,
                                                is_prefill_T=batch.is_prefill_T, token_ids_T=batch.token_T)
        # no rank can hold more tokens than this at any MoE layer (identical on every rank: step metadata)
        attempt.held_bound = batch.num_tokens if self.dispatcher.tokens_move else \
            int(np.bincount(start_T, minlength=self.topology.world_size).max())
        token_N = torch.as_tensor(np.flatnonzero(start_T == self.topology.rank), dtype=torch.long)
        ids_N = torch.as_tensor(batch.token_T, device=self.topology.device)[token_N.to(self.topology.device)]
        return _Held(token_N, self.model.embed_tokens(ids_N))

    def _layer(self, layer, batch: StepBatch, held: _Held, slot_T: torch.Tensor, attempt: "_Attempt") -> _Held:
        x_ND = held.x_ND + self._attention(layer, batch, held, slot_T)
        if layer.moe_index is None:
            return _Held(held.token_N, x_ND + layer.mlp(layer.post_attn_norm(x_ND)))
        if self.coherence is not None:   # the K/V of this group's layers were computed here for these tokens
            self.coherence.note(self._group_of_layer[layer.layer], held.token_N)
        return self._moe(layer, batch, _Held(held.token_N, x_ND), attempt)

    def _attention(self, layer, batch: StepBatch, held: _Held, slot_T: torch.Tensor) -> torch.Tensor:
        """The held tokens' own K/V written first, then paged attention over the cache (no host sync: the
        context's indices are host metadata, copied to the device once per held-token set)."""
        if len(held.token_N) == 0:
            return torch.zeros_like(held.x_ND)
        ctx = self._step_attention.context(held.token_N)
        q_NHd, k_NHd, v_NHd = layer.attn.project_qkv(layer.input_norm(held.x_ND), ctx.pos_N)
        self.kv.cache.write(layer.layer, ctx.slot_N, k_NHd, v_NHd)
        o_NHv = paged_attention(q_NHd, *self.kv.cache.layer(layer.layer), ctx, scale=layer.attn.softmax_scale,
                                value_dim=layer.attn.value_dim, scratch=self._gather_scratch)
        return layer.attn.output(o_NHv)

    def _moe(self, layer, batch: StepBatch, held: _Held, attempt: "_Attempt") -> _Held:
        mlp, m, dev = layer.mlp, layer.moe_index, self.topology.device
        h_ND = layer.post_attn_norm(held.x_ND)
        if self.forced_routing is None:
            topk_w_NK, topk_ids_NK = mlp.router.route(h_ND)
        else:
            t_N = held.token_N
            topk_w_NK, topk_ids_NK = self.forced_routing.route(m, torch.as_tensor(batch.seq_T)[t_N],
                                                               torch.as_tensor(batch.pos_T)[t_N], dev)
        for recorder in self._recorders:
            recorder.record(m, held.token_N, topk_ids_NK, topk_w_NK)
        attempt.routed.append((m, topk_ids_NK))
        is_prefill_N = torch.as_tensor(batch.is_prefill_T)[held.token_N].to(dev)
        work, handle = self.dispatcher.dispatch(held.x_ND, held.token_N, topk_ids_NK, topk_w_NK, is_prefill_N,
                                                layer=m, step_has_prefill=batch.has_prefill,
                                                num_step_tokens=batch.num_tokens, held_bound=attempt.held_bound)
        if self.dispatcher.check_splits:   # debug (tests): a host sync naming any expert not loaded here
            mlp.check_loaded(work.topk_ids_MK, work.use_MK)
        partial_MD = mlp.local_weighted_sum(layer.post_attn_norm(work.x_MD), work.topk_ids_MK,
                                            work.topk_weights_MK, work.use_MK)
        anchored = self.dispatcher.combine(partial_MD, handle)
        if anchored.overflow is not None:
            attempt.overflow = anchored.overflow if attempt.overflow is None else attempt.overflow | anchored.overflow
        y_AD = anchored.y_AD.to(anchored.x_AD.dtype)   # float32 sums of the routed experts, rounded once
        shared_AD = mlp.shared_output(layer.post_attn_norm(anchored.x_AD))
        if shared_AD is not None:
            y_AD = y_AD + shared_AD
        return _Held(anchored.token_A, anchored.x_AD + y_AD)   # token_A: host metadata from the transport

    def _finish(self, batch: StepBatch, held: _Held, slot_T: torch.Tensor, return_logits: bool,
                attempt: "_Attempt") -> StepResult | None:
        """The step's result, or None when a fixed buffer overflowed on some rank (then nothing is kept)."""
        works, dev = batch.plan.work, self.topology.device
        W = len(works)
        row_of_token = {t: n for n, t in enumerate(held.token_N.tolist())}
        mine_W = [w for w in range(W) if int(batch.last_W[w]) in row_of_token]
        rows = torch.tensor([row_of_token[int(batch.last_W[w])] for w in mine_W], dtype=torch.long)
        logits_RV = self.model.lm_head(self.model.norm(held.x_ND[rows.to(dev)]))
        sample_W = [w for w in mine_W if works[w].sample]
        sampled = sample_rows(logits_RV[[mine_W.index(w) for w in sample_W]],
                              [works[w].sampling for w in sample_W],
                              [int(batch.pos_T[batch.last_W[w]]) + 1 for w in sample_W])
        if self.coherence is not None and self._trailing_group is not None:
            self.coherence.note(self._trailing_group, held.token_N)
        Y = 0 if self.coherence is None else self.coherence.num_groups
        mine_vec = torch.full((W + Y,), NOT_HERE, dtype=torch.int64)
        mine_vec[mine_W] = HERE_UNSAMPLED
        mine_vec[sample_W] = torch.tensor(sampled, dtype=torch.int64)
        if Y:
            mine_vec[W:] = torch.tensor(self.coherence.counts_Y())   # K/V rows computed here, per group
        overflow = torch.zeros(1, dtype=torch.int64, device=dev) if attempt.overflow is None else \
            attempt.overflow.long().reshape(1)
        gathered_GX = self.coll.all_gather_rows(torch.cat([mine_vec.to(dev), overflow]),
                                                phase="sampled_ids").cpu()   # host sync (once per step)
        if bool(gathered_GX[:, -1].any()):
            return None
        gathered_GW = gathered_GX[:, :W]
        holder_W = self._holders(gathered_GW, batch.plan.step)
        if self.coherence is not None:
            self.coherence.launch(gathered_GX[:, W:W + Y].numpy(), slot_T)
        if self.live_stats is not None:
            for m, ids_NK in attempt.routed:
                self.live_stats.record(m, ids_NK)
        next_ids = {}
        for w, work in enumerate(works):
            value = int(gathered_GW[holder_W[w], w])
            if work.sample:
                next_ids[work.seq_id] = value
            self._prev_rank[work.seq_id] = -1 if work.is_prefill else int(holder_W[w])
        result = StepResult(step=batch.plan.step, next_token_ids=next_ids)
        if return_logits:
            result = replace(result, last_logits=self._gather_logits(logits_RV, mine_W, holder_W, works))
        return result

    @staticmethod
    def _holders(gathered_GW: torch.Tensor, step: int) -> list[int]:
        here_GW = gathered_GW != NOT_HERE
        if not bool((here_GW.sum(0) == 1).all()):
            raise RuntimeError(f"step {step}: a sequence's last token ended on {here_GW.sum(0).tolist()} ranks")
        return here_GW.int().argmax(0).tolist()

    def _gather_logits(self, logits_RV, mine_W, holder_W, works) -> dict[int, torch.Tensor]:
        """Tests only: each sequence's last-token logits, on every rank."""
        W, V = len(works), self.model.config.vocab_size
        mine_WV = torch.zeros(W, V, dtype=logits_RV.dtype, device=logits_RV.device)
        mine_WV[mine_W] = logits_RV
        all_GWV = self.coll.all_gather_rows(mine_WV, phase="logits").cpu()
        return {work.seq_id: all_GWV[holder_W[w], w].clone() for w, work in enumerate(works)}
