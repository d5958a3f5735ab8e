"""Token dispatchers: one mechanism (comm/route_plan.py), four policies, picked once by Enum in a factory.

    held tokens (x, routing) --anchor policy--> counts exchange (+ side counts) --> ONE all_to_all (dispatch)
        --> ExpertWork (rows this rank computes) --experts (caller)--> partials
        --> [combine all_to_all, skipped when no token can need one] --> tokens anchored here

Policies (DESIGN.md traffic model): where a token starts a step, and which rank is its anchor a.
  two_a2a              start = home, a = home (the rank holding it): dispatch + combine every MoE layer
  coherent             decode: start = where its previous token was sampled, a = rank of its top-1 expert,
                       or the r_k an anchor table scores highest (placement/anchor.py); prefill: as
                       two_a2a. With top-1 routing and no prefill in the step: no combine at all.
  speculative          as coherent, but a decode token starts on the predictor's confident rank
  speculative_two_a2a  as two_a2a; new requests go to the home rank their prompt is predicted to use most

``dispatch`` returns a frozen ``CombineHandle`` that ``combine`` consumes; nothing about a call is kept on the
dispatcher. Every rank calls every collective in the same order, with zero rows where it has none.

Legend: T step tokens, N tokens held here, M rows computed here, A tokens anchored here, D hidden, K top-k,
G ranks, L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from comm.counters import CollKind
from comm.primitives import Collectives
from comm.route_plan import CombinePlan, expert_ranks_NK, plan_combine, plan_dispatch, table_anchor_N
from comm.wire import dispatch_codec
from placement.errors import InputError
from comm.strategy import Strategy


@dataclass(frozen=True)
class ExpertWork:
    """The rows this rank runs its experts on at one MoE layer (held tokens first, then received ones)."""

    x_MD: torch.Tensor              # residual hidden states (the caller applies post_attention_layernorm)
    token_M: torch.Tensor           # step-local token indices
    topk_ids_MK: torch.Tensor
    topk_weights_MK: torch.Tensor   # float32
    use_MK: torch.Tensor            # bool: expert k of this row lives on this rank


@dataclass(frozen=True)
class CombineHandle:
    layer: int
    plan: CombinePlan
    anchored_token_A: torch.Tensor
    anchored_x_AD: torch.Tensor     # residuals of the tokens anchored here
    run_collective: bool            # False only when every rank knows no token needs a combine
    peer_side_counts_GC: torch.Tensor  # side counts each rank sent this one with the dispatch counts


@dataclass(frozen=True)
class Anchored:
    """Tokens that live on this rank after a MoE layer, by step-local token index."""

    token_A: torch.Tensor
    x_AD: torch.Tensor              # residual
    y_AD: torch.Tensor              # sum of the routed experts' weighted outputs


class Dispatcher:
    """The shared mechanism with the two_a2a policy (subclasses override the policy hooks only)."""

    strategy = Strategy.TWO_A2A
    replicated_kv = False

    def __init__(self, coll: Collectives, expert_to_rank_LE: torch.Tensor, *, top_k: int, hidden_size: int,
                 dtype: torch.dtype, predictor=None, anchors=None, check_splits: bool = False) -> None:
        G = coll.world_size
        if expert_to_rank_LE.ndim != 2 or int(expert_to_rank_LE.max()) >= G or int(expert_to_rank_LE.min()) < 0:
            raise InputError(f"expert_to_rank must be a [layers, experts] table of ranks in [0, {G})")
        self.coll = coll
        self.expert_to_rank_LE = expert_to_rank_LE.to(device=coll.topology.device, dtype=torch.long)
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.predictor = predictor
        self.anchor_score_LEG = None          # int64 [L, E, G] (an AnchorTable's scores), or the top-1 rule
        if anchors is not None:
            anchors.check_fits(self.expert_to_rank_LE.cpu().numpy(), G)
            self.anchor_score_LEG = torch.as_tensor(anchors.score_LEG, dtype=torch.long,
                                                    device=coll.topology.device)
        self.check_splits = check_splits
        self.codec = dispatch_codec(hidden_size, top_k, dtype)
        self.payload_row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()

    # ---- policy hooks ------------------------------------------------------------------------------------
    def start_ranks_T(self, *, home_T: np.ndarray, prev_rank_T: np.ndarray, is_prefill_T: np.ndarray,
                      token_ids_T: np.ndarray) -> np.ndarray:
        """Where each step token starts (identical on every rank: computed from step metadata only).
        ``prev_rank_T``: the rank where the sequence's previous token was sampled if it was a decode token,
        else -1."""
        return home_T.copy()

    def anchor_N(self, rank_NK: torch.Tensor, topk_ids_NK: torch.Tensor, is_prefill_N: torch.Tensor, *,
                 layer: int) -> torch.Tensor:
        return torch.full((rank_NK.shape[0],), self.coll.rank, dtype=torch.long, device=rank_NK.device)

    def needs_combine(self, *, step_has_prefill: bool) -> bool:
        return True

    def preferred_home_rank(self, prompt_ids) -> int | None:
        return None

    # ---- mechanism ---------------------------------------------------------------------------------------
    def dispatch(self, x_ND: torch.Tensor, token_N: torch.Tensor, topk_ids_NK: torch.Tensor,
                 topk_weights_NK: torch.Tensor, is_prefill_N: torch.Tensor, *, layer: int,
                 step_has_prefill: bool, side_counts: tuple[int, ...] = ()) -> tuple[ExpertWork, CombineHandle]:
        """Send the held tokens to their expert ranks. ``side_counts`` ride on the counts exchange (sent to
        every other rank; the handle returns what each rank sent)."""
        coll, me, G = self.coll, self.coll.rank, self.coll.world_size
        dev = x_ND.device
        rank_NK = expert_ranks_NK(self.expert_to_rank_LE[layer], topk_ids_NK)
        anchor_N = self.anchor_N(rank_NK, topk_ids_NK, is_prefill_N, layer=layer)
        # debug check (tests run with check_splits): a host sync per layer, kept off the serving path
        if self.check_splits and not bool(((anchor_N[:, None] == rank_NK).any(1) | (anchor_N == me)).all()):
            raise RuntimeError(f"layer {layer}: an anchor rank holds neither the token nor one of its experts")
        plan = plan_dispatch(rank_NK, token_N, me=me, world_size=G)

        counts_GC = torch.zeros(G, 1 + len(side_counts), dtype=torch.int64)
        counts_GC[:, 0] = torch.tensor(plan.send_counts)
        counts_GC[:, 1:] = torch.tensor(side_counts, dtype=torch.int64)
        counts_GC[me, 1:] = 0
        peer_GC = coll.exchange_counts(counts_GC.to(dev), phase="dispatch", layer=layer).cpu()  # host sync
        recv_counts = peer_GC[:, 0].tolist()

        i = plan.send_index_S
        send = self.codec.pack(dev, x=x_ND[i], topk_ids=topk_ids_NK[i], topk_weights=topk_weights_NK[i],
                               token=token_N[i, None], anchor=anchor_N[i, None])
        recv, _ = coll.all_to_all_rows(send, plan.send_counts, recv_counts, kind=CollKind.ALL_TO_ALL,
                                       phase="dispatch", layer=layer, payload_bytes_per_row=self.payload_row_bytes)
        got = self.codec.unpack(recv)

        x_HD = torch.cat([x_ND, got["x"]])
        token_H = torch.cat([token_N.long(), got["token"][:, 0].long()])
        ids_HK = torch.cat([topk_ids_NK.long(), got["topk_ids"].long()])
        w_HK = torch.cat([topk_weights_NK.float(), got["topk_weights"]])
        anchor_H = torch.cat([anchor_N, got["anchor"][:, 0].long()])
        rank_HK = expert_ranks_NK(self.expert_to_rank_LE[layer], ids_HK)
        batch_M, cplan = plan_combine(rank_HK, token_H, anchor_H, me=me, world_size=G)
        work = ExpertWork(x_HD[batch_M], token_H[batch_M], ids_HK[batch_M], w_HK[batch_M],
                          rank_HK[batch_M] == me)
        handle = CombineHandle(layer, cplan, token_H[cplan.anchored_A], x_HD[cplan.anchored_A],
                               self.needs_combine(step_has_prefill=step_has_prefill), peer_GC[:, 1:])
        return work, handle

    def combine(self, partial_MD: torch.Tensor, handle: CombineHandle) -> Anchored:
        """Sum each anchored token's partials (its own first, then by source rank)."""
        p = handle.plan
        if handle.run_collective:
            if self.check_splits:
                self._check_combine_splits(p, handle.layer)
            recv_RD, _ = self.coll.all_to_all_rows(partial_MD[p.send_index_S], p.send_counts, p.recv_counts,
                                                   kind=CollKind.ALL_TO_ALL, phase="combine", layer=handle.layer,
                                                   payload_bytes_per_row=self.payload_row_bytes)
        elif sum(p.send_counts) or sum(p.recv_counts):
            raise RuntimeError(f"layer {handle.layer}: the combine was skipped but partials need to move")
        else:
            recv_RD = partial_MD[:0]
        A = p.anchored_A.numel()
        y_AD = torch.zeros(A, partial_MD.shape[1], dtype=partial_MD.dtype, device=partial_MD.device)
        own = p.own_slot_A >= 0
        y_AD[own] = partial_MD[p.own_slot_A[own]]
        y_AD.index_add_(0, p.recv_slot_R, recv_RD)
        return Anchored(handle.anchored_token_A, handle.anchored_x_AD, y_AD)

    def _check_combine_splits(self, p: CombinePlan, layer: int) -> None:
        """Debug check (tests): the sizes each anchor derived equal what the senders will send."""
        sent_GC = torch.tensor(p.send_counts, dtype=torch.int64)[:, None]
        told = self.coll.exchange_counts(sent_GC.to(self.coll.topology.device), phase="combine_check",
                                         layer=layer).cpu()[:, 0].tolist()
        ok = torch.tensor([int(told == p.recv_counts)], dtype=torch.int64, device=self.coll.topology.device)
        flags = self.coll.all_gather_rows(ok, phase="combine_check").flatten().tolist()
        if not all(flags):
            raise RuntimeError(f"layer {layer}: combine split sizes disagree on ranks "
                               f"{[g for g, f in enumerate(flags) if not f]} (rank {self.coll.rank}: "
                               f"derived {p.recv_counts}, senders say {told})")


class CoherentDispatcher(Dispatcher):
    strategy = Strategy.COHERENT
    replicated_kv = True

    def start_ranks_T(self, *, home_T, prev_rank_T, is_prefill_T, token_ids_T):
        return np.where(is_prefill_T | (prev_rank_T < 0), home_T, prev_rank_T)

    def anchor_N(self, rank_NK, topk_ids_NK, is_prefill_N, *, layer):
        decode_N = rank_NK[:, 0] if self.anchor_score_LEG is None else \
            table_anchor_N(self.anchor_score_LEG[layer], topk_ids_NK, rank_NK)
        return torch.where(is_prefill_N, torch.full_like(rank_NK[:, 0], self.coll.rank), decode_N)

    def needs_combine(self, *, step_has_prefill):
        return self.top_k > 1 or step_has_prefill


class SpeculativeDispatcher(CoherentDispatcher):
    strategy = Strategy.SPECULATIVE

    def start_ranks_T(self, *, home_T, prev_rank_T, is_prefill_T, token_ids_T):
        coherent_T = super().start_ranks_T(home_T=home_T, prev_rank_T=prev_rank_T, is_prefill_T=is_prefill_T,
                                           token_ids_T=token_ids_T)
        rank_T, confident_T = self.predictor.predict_start_ranks(np.asarray(token_ids_T))
        return np.where(confident_T & ~is_prefill_T, rank_T, coherent_T)


class SpeculativeTwoA2ADispatcher(Dispatcher):
    strategy = Strategy.SPECULATIVE_TWO_A2A

    def preferred_home_rank(self, prompt_ids):
        rank = self.predictor.predict_home_rank(np.asarray(prompt_ids), default=-1)
        return None if rank < 0 else int(rank)


_DISPATCHERS = {cls.strategy: cls for cls in
                (Dispatcher, CoherentDispatcher, SpeculativeDispatcher, SpeculativeTwoA2ADispatcher)}


def make_dispatcher(strategy: Strategy, coll: Collectives, expert_to_rank_LE: torch.Tensor, *, top_k: int,
                    hidden_size: int, dtype: torch.dtype, predictor=None, anchors=None,
                    check_splits: bool = False) -> Dispatcher:
    """The one place a strategy is turned into behaviour. ``anchors``: an AnchorTable (coherent strategies)."""
    if strategy.needs_predictor and predictor is None:
        raise InputError(f"strategy {strategy.value} needs a predictor (build one with the placement tools from "
                         f"a trace with vocabulary ids)")
    return _DISPATCHERS[strategy](coll, expert_to_rank_LE, top_k=top_k, hidden_size=hidden_size, dtype=dtype,
                                  predictor=predictor, anchors=anchors, check_splits=check_splits)
