"""Rank-side code for tests/dist/test_comm_dispatch.py: dispatch + plain-torch experts + combine.

Every rank builds the same global problem from a seed (tokens, routing, expert weights, start ranks), holds
only the tokens that start on it, runs one MoE layer through a dispatcher, and returns what it anchored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from comm.counters import CommCounters
from comm.dispatchers import make_dispatcher
from comm.primitives import Collectives
from comm.strategy import Strategy
from placement.transport import Transport


@dataclass(frozen=True)
class Case:
    name: str
    strategy: Strategy
    tokens: int
    experts: int
    top_k: int
    hidden: int = 8
    seed: int = 0
    skew_to_rank: int | None = None   # every token picks only experts living on this rank
    empty_rank: int | None = None     # no token starts on this rank
    prefill_every: int = 0            # every n-th token is a prefill token (0: none)
    transport: Transport = Transport.A2A
    capacity: int | None = None       # fixed transport: rows per peer (None: from the step)


CASES = [
    Case("two_a2a top2", Strategy.TWO_A2A, tokens=23, experts=8, top_k=2, seed=1),
    Case("two_a2a top1", Strategy.TWO_A2A, tokens=17, experts=8, top_k=1, seed=2),
    Case("coherent top1", Strategy.COHERENT, tokens=19, experts=8, top_k=1, seed=3),
    Case("coherent top2 with prefill", Strategy.COHERENT, tokens=21, experts=8, top_k=2, seed=4, prefill_every=3),
    Case("coherent top3", Strategy.COHERENT, tokens=16, experts=16, top_k=3, seed=5),
    Case("coherent top1 with prefill", Strategy.COHERENT, tokens=12, experts=8, top_k=1, seed=6, prefill_every=2),
    Case("two_a2a all to rank 0, rank 1 holds none", Strategy.TWO_A2A, tokens=14, experts=8, top_k=2, seed=7,
         skew_to_rank=0, empty_rank=1),
    Case("coherent all to last rank", Strategy.COHERENT, tokens=9, experts=8, top_k=2, seed=8, skew_to_rank=-1),
    Case("no tokens at all", Strategy.COHERENT, tokens=0, experts=8, top_k=2, seed=9),
]
# every transport on the shapes that stress it: skew (one destination gets everything), prefill, top-3
_MOVED = [c for c in CASES if c.name in ("two_a2a top2", "coherent top2 with prefill", "coherent top3",
                                          "coherent all to last rank", "coherent top1", "no tokens at all")]
CASES += [Case(**{**c.__dict__, "name": f"{c.name} [{t.value}]", "transport": t,
                 "capacity": max(1, c.tokens) if t is Transport.FIXED else None})   # room for every row
          for t in (Transport.FIXED, Transport.NODE_AWARE) for c in _MOVED]
CASES += [Case("two_a2a top2 [fixed, capacity 1: overflows]", Strategy.TWO_A2A, tokens=23, experts=8, top_k=2, seed=1,
               transport=Transport.FIXED, capacity=1),
          Case("node_aware two_a2a top4", Strategy.TWO_A2A, tokens=20, experts=16, top_k=4, seed=10,
               transport=Transport.NODE_AWARE)]


def dispatch_cases(G: int, nodes: int = 1) -> list[Case]:
    """Every case that fits G ranks on ``nodes`` nodes, with 'the last rank' made concrete."""
    fix = lambda c: c if c.skew_to_rank != -1 else Case(**{**c.__dict__, "skew_to_rank": G - 1})  # noqa: E731
    return [fix(c) for c in CASES if nodes > 1 or c.transport is not Transport.NODE_AWARE]


def problem(case: Case, world_size: int):
    """The global inputs, identical on every rank and in the test process."""
    g = np.random.default_rng(case.seed)
    T, E, K, D, G = case.tokens, case.experts, case.top_k, case.hidden, world_size
    expert_to_rank_E = g.permutation(np.arange(E) // (E // G))
    ids_TK = np.array([g.choice(E, size=K, replace=False) for _ in range(T)], dtype=np.int64).reshape(T, K)
    if case.skew_to_rank is not None:
        mine = np.flatnonzero(expert_to_rank_E == case.skew_to_rank)
        ids_TK = np.array([g.choice(mine, size=K, replace=False) for _ in range(T)], dtype=np.int64).reshape(T, K)
    w_TK = np.sort(g.random((T, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    start_T = g.integers(0, G, size=T)
    if case.empty_rank is not None and G > 1:
        start_T[start_T == case.empty_rank] = (case.empty_rank + 1) % G
    prefill_T = np.zeros(T, dtype=bool)
    if case.prefill_every:
        prefill_T[:: case.prefill_every] = True
    x_TD = g.standard_normal((T, D)).astype(np.float32)
    w_EDD = (g.standard_normal((E, D, D)) / np.sqrt(D)).astype(np.float32)
    return expert_to_rank_E, ids_TK, w_TK, start_T, prefill_T, x_TD, w_EDD


def expert(w_DD: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x_ND @ w_DD)


def run_dispatch_cases(topology, cases: list[Case]) -> list[dict]:
    out = []
    for case in cases:
        e2r_E, ids_TK, w_TK, start_T, prefill_T, x_TD, w_EDD = problem(case, topology.world_size)
        counters = CommCounters()
        coll = Collectives(topology, counters)
        d = make_dispatcher(case.strategy, coll, torch.as_tensor(e2r_E)[None], top_k=case.top_k,
                            hidden_size=case.hidden, dtype=torch.float32, check_splits=True,
                            transport=case.transport, capacity=case.capacity)
        held = np.flatnonzero(start_T == topology.rank)
        t = torch.as_tensor
        work, handle = d.dispatch(t(x_TD[held]), t(held), t(ids_TK[held]), t(w_TK[held]), t(prefill_T[held]),
                                  layer=0, step_has_prefill=bool(prefill_T.any()), num_step_tokens=case.tokens)
        partial_MD = torch.zeros_like(work.x_MD)
        for k in range(case.top_k):
            for m in range(work.x_MD.shape[0]):
                if work.use_MK[m, k]:
                    e = int(work.topk_ids_MK[m, k])
                    partial_MD[m] += work.topk_weights_MK[m, k] * expert(t(w_EDD[e]), work.x_MD[m:m + 1])[0]
        # every expert this rank was asked to run must live here, and each row names the right token
        assert bool((t(e2r_E)[work.topk_ids_MK][work.use_MK] == topology.rank).all())
        anchored = d.combine(partial_MD, handle)
        out.append({"token": anchored.token_A.tolist(), "out": (anchored.x_AD + anchored.y_AD).numpy(),
                    "counters": counters.to_rows(),
                    "overflow": None if anchored.overflow is None else bool(anchored.overflow)})
    return out
