"""refine: exact swap refinement of a placement against the coherent strategy's traffic on the fit tokens.

Shapes: T tokens, P (token, next token-layer) pairs, L MoE layers, K top-k, E experts, G GPUs.

The solvers maximise a pairwise surrogate (stats.py). Coherent traffic is not pairwise: a decode token at layer
l with expert ranks R_l, starting on rank c_l, costs |R_l \\ {c_l}| dispatch + |R_l| - 1 combine transfers, and
it is anchored on the rank of one of its experts, its lead expert, so c_{l+1} = rank of lead(l). So, exactly
(simulate.py, every token a decode token),

    transfers = sum over (t, l) of  2 |R_l| - 1 - [c_l in R_l]

    placement + fit trace --> sweep the layers; at layer l, with every other layer fixed:
        cnt_TG (experts of each token per GPU), start ranks c_T, next-layer ranks of each token's successor
        --> exact change of the transfers for EVERY pair swap (i on GPU a, j on GPU b), in matrix form:
            tokens with i (not j): |R| loses a if i was alone there, gains b if b was empty; [c in R] likewise
            tokens with both: unchanged;  tokens led by i or j: their next start moves between a and b
        --> apply the best swap while it saves at least one transfer; a changed layer dirties its neighbours
    --> the placement with the fewest fit transfers found (capacity per GPU unchanged)
    rounds: lead = the top-1 expert, or (anchored) the expert whose rank the anchor table fitted to the current
    placement picks; refit the table, re-pick the leads, sweep again (a lead is fixed within a round)

Layer 0 starts where the simulator starts it: the home rank, or, for a decode token that follows one of its
sequence in the trace, the lead rank of that token's last layer (so the last layer's swaps count it too).
The final anchor table (anchor.py) is fitted afterwards, on the refined placement. The fit transfers recorded
in ``solver["refine"]`` are under the top-1 rule and with an anchor table fitted to each, before and after.
"""

from __future__ import annotations

import time

import numpy as np

from placement.anchor import fit_anchor_table
from placement.placement import Placement
from placement.simulate import sequence_order
from placement.trace import RoutingTrace


def coherent_transfers(trace: RoutingTrace, expert_to_gpu_LE: np.ndarray, num_gpus: int,
                       lead_TL: np.ndarray | None = None) -> int:
    """Total coherent transfers of ``trace`` when each token is anchored on the rank of its lead expert
    ``lead_TL`` (default: the top-1 expert, where this equals simulate() with no prefill and no table)."""
    r = _Routing(trace, num_gpus, lead_TL)
    member_TLG, start_TL = r.member(expert_to_gpu_LE), r.starts(expert_to_gpu_LE)
    T, L = start_TL.shape
    hit_TL = np.take_along_axis(member_TLG, start_TL[..., None], axis=2)[..., 0]
    return int(2 * member_TLG.sum() - T * L - hit_TL.sum())


def refine_placement(trace: RoutingTrace, placement: Placement, *, anchored: bool = True, rounds: int = 3,
                     time_limit: float = 30.0, max_sweeps: int = 20) -> Placement:
    """``placement`` improved by exact swaps on ``trace`` (the fit part). With ``anchored``, each of ``rounds``
    rounds first fits an anchor table to the current placement and takes each token's lead expert to be the
    one whose rank the table picks (else: the top-1 expert, one round). Records the fit transfers before and
    after, rounds, sweeps and swaps in ``solver["refine"]``; drops any anchor table (refit it afterwards)."""
    if trace.num_layers < 2:   # one layer: a swap would move both a token's start and its ranks (not modelled)
        return placement
    wall0 = time.perf_counter()
    G, p_LE = placement.num_gpus, placement.expert_to_gpu_LE.copy()
    deadline = wall0 + time_limit
    before = coherent_transfers(trace, p_LE, G)
    before_table = coherent_transfers(trace, p_LE, G, _table_leads(trace, p_LE, G))
    swaps = sweeps = rounds_run = 0
    for _ in range(rounds if anchored else 1):
        if time.perf_counter() > deadline:
            break
        lead_TL = _table_leads(trace, p_LE, G) if anchored else None
        r = _Routing(trace, G, lead_TL)
        dirty, round_swaps = set(range(r.L)), 0
        while dirty and sweeps < max_sweeps * (rounds_run + 1) and time.perf_counter() < deadline:
            sweeps += 1
            for l in sorted(dirty):
                dirty.discard(l)
                n = r.improve_layer(p_LE, l, deadline)
                if n:
                    round_swaps += n
                    dirty.update({(l - 1) % r.L, (l + 1) % r.L})
        rounds_run += 1
        swaps += round_swaps
        if not round_swaps:
            break
    info = {"anchored": anchored, "fit_transfers_before": before, "fit_transfers_after": coherent_transfers(
                trace, p_LE, G), "fit_transfers_with_table_before": before_table,
            "fit_transfers_with_table_after": coherent_transfers(trace, p_LE, G, _table_leads(trace, p_LE, G)),
            "rounds": rounds_run, "swaps": swaps, "sweeps": sweeps,
            "time_s": round(time.perf_counter() - wall0, 3), "fit_tokens": trace.num_tokens}
    solver = {**{k: v for k, v in placement.solver.items() if k != "anchors"}, "refine": info}
    return Placement(p_LE, placement.cluster, solver, placement.objective, placement.trace)


def _table_leads(trace: RoutingTrace, p_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    """[T, L] the expert whose rank the anchor table fitted to ``p_LE`` picks for each token-layer."""
    experts_TLK = trace.experts_TLK.astype(np.int64)
    ranks_TLK = p_LE[np.arange(trace.num_layers)[None, :, None], experts_TLK]
    slots_TL = fit_anchor_table(trace, p_LE, num_gpus).slots_TL(experts_TLK, ranks_TLK)
    return np.take_along_axis(experts_TLK, slots_TL[..., None], axis=2)[..., 0]


class _Routing:
    """The fit tokens' routing in the forms the swap deltas need."""

    def __init__(self, trace: RoutingTrace, num_gpus: int, lead_TL: np.ndarray | None = None):
        self.experts_TLK = trace.experts_TLK.astype(np.int64)
        T, self.L, self.K = self.experts_TLK.shape
        self.lead_TL = self.experts_TLK[:, :, 0] if lead_TL is None else np.asarray(lead_TL, dtype=np.int64)
        self.T, self.E, self.G = T, trace.num_experts, num_gpus
        seq_T, _, prev_T = sequence_order(trace)
        self.home_T = seq_T % num_gpus
        self.chained_T = np.flatnonzero(prev_T >= 0)        # decode tokens that start where prev_T ended
        self.prev_of_chained = prev_T[self.chained_T]
        self.X_LTE = np.zeros((self.L, T, self.E))
        for l in range(self.L):
            np.put_along_axis(self.X_LTE[l], self.experts_TLK[:, l], 1.0, axis=1)

    def member(self, p_LE: np.ndarray) -> np.ndarray:
        """[T, L, G] bool: rank g serves one of the token's experts at layer l."""
        ranks_TLK = p_LE[np.arange(self.L)[None, :, None], self.experts_TLK]
        member_TLG = np.zeros((self.T, self.L, self.G), dtype=bool)
        np.put_along_axis(member_TLG, ranks_TLK, True, axis=2)
        return member_TLG

    def starts(self, p_LE: np.ndarray) -> np.ndarray:
        """[T, L] start rank of every token-layer when each token is anchored on its lead expert's rank."""
        lead_rank_TL = p_LE[np.arange(self.L)[None, :], self.lead_TL]
        start_T = self.home_T.copy()
        start_T[self.chained_T] = lead_rank_TL[self.prev_of_chained, self.L - 1]
        return np.concatenate([start_T[:, None], lead_rank_TL[:, :-1]], axis=1)

    def _successors(self, p_LE: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(lead expert at l of each source token [P], ranks of its successor's next layer [P, G])."""
        if l < self.L - 1:
            src, nxt, dst = np.arange(self.T), l + 1, np.arange(self.T)
        else:
            src, nxt, dst = self.prev_of_chained, 0, self.chained_T
        member_PG = np.zeros((len(dst), self.G))
        np.put_along_axis(member_PG, p_LE[nxt][self.experts_TLK[dst, nxt]], 1.0, axis=1)
        return self.lead_TL[src, l], member_PG

    def improve_layer(self, p_LE: np.ndarray, l: int, deadline: float) -> int:
        """Best-improvement swaps at layer l with exact deltas; returns how many were applied."""
        applied = 0
        for _ in range(4 * self.E):
            if time.perf_counter() > deadline:
                break
            delta_EE = self.swap_deltas(p_LE, l)
            i, j = divmod(int(np.argmin(delta_EE)), self.E)
            if not delta_EE[i, j] < -0.5:                               # integer counts: saves >= 1 transfer
                break
            p_LE[l, i], p_LE[l, j] = p_LE[l, j], p_LE[l, i]
            applied += 1
        return applied

    def swap_deltas(self, p_LE: np.ndarray, l: int) -> np.ndarray:
        """[E, E] exact change of the total transfers if experts i and j of layer l swapped GPUs (0 on one GPU)."""
        X_TE, p_E, ar = self.X_LTE[l], p_LE[l], np.arange(self.E)
        lead_P, next_PG = self._successors(p_LE, l)
        N_EG = np.zeros((self.E, self.G))
        np.add.at(N_EG, lead_P, next_PG)                            # successors of tokens led by e using g next
        c_T = self.starts(p_LE)[:, l]
        cnt_TG = X_TE @ np.eye(self.G)[p_E]
        alone_TE = X_TE * (cnt_TG[:, p_E] == 1)                     # e is its token's only expert on its GPU
        Q_TE = -2.0 * alone_TE + alone_TE * (c_T[:, None] == p_E[None, :])   # cost change when e leaves
        empty_TG = (cnt_TG == 0).astype(np.float64)
        join_EG = X_TE.T @ (2.0 * empty_TG - empty_TG * (c_T[:, None] == np.arange(self.G)[None, :]))
        q_E = Q_TE.sum(axis=0)
        both_EE = Q_TE.T @ X_TE
        both_EE += both_EE.T                                        # tokens with i and j: no change
        nxt_EE = N_EG[:, p_E]                                       # nxt[i, j] = N[i, gpu of j]
        n_own_E = nxt_EE[ar, ar]
        delta_EE = (q_E[:, None] + join_EG[:, p_E] + q_E[None, :] + join_EG[:, p_E].T - both_EE
                    - (nxt_EE - n_own_E[:, None]) - (nxt_EE.T - n_own_E[None, :]))
        delta_EE[p_E[:, None] == p_E[None, :]] = 0.0
        return delta_EE
