"""local: block coordinate ascent with an exact per-layer assignment, swap refinement and restarts.

Shapes: L layers, E experts, G GPUs, M = E/G experts per GPU per layer; p_LE = GPU of each expert.

    random start (seeded) --> climb:
        for each dirty layer l (neighbours l-1, l+1 fixed):
            assignment  benefit H[i, g] of expert i on GPU g = affinity to layers l-1 and l+1 at their current
                        GPUs (+ layer l's co-activation, linearised at the current placement) -> exact
                        linear_sum_assignment onto M slots per GPU; kept only if the true objective improves
            swaps       best-improvement pair swaps with exact deltas (co-activation included)
            a layer that changed makes its neighbours dirty
    --> iterated local search: pool two GPUs' experts over a run of layers, split them again at random,
        climb around them, keep the result unless it is worse
    --> best over restarts; stops early at the time limit. The rounds stop once the search has taken
        AUTO_CLIMBS times the first start's climb (never before AUTO_MIN_S), each start's rounds getting an
        equal share of what is left, so every start runs. On FLAME (8 x 64 x 8: 4 starts x 300 rounds in
        ~4 s) this never binds; at DeepSeek-V3's shape (58 x 256 x 64) a climb takes ~3 s, a round ~0.3 s,
        and a start's first 60 rounds gained 3e-4 of the objective (bench/results/placement_bench.md, scale).

With ``node_of_LE`` (hierarchical's second stage) every expert stays on a GPU of its node.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.cluster import ClusterShape
from placement.solvers import SolveOptions, SolverResult
from placement.stats import TraceStats, objective, objective_upper_bound, saving_GG

AUTO_CLIMBS = 4.0       # search budget: this many times the first start's climb (wall) ...
AUTO_MIN_S = 15.0       # ... but never below this many seconds; options.time_limit caps both


class _Chain:
    """The objective of stats.py, with the per-layer pieces the moves need."""

    def __init__(self, stats: TraceStats, cluster: ClusterShape, node_of_LE: np.ndarray | None):
        self.stats, self.cluster = stats, cluster
        self.A_LEE, self.C_LEE = stats.affinity_LEE, stats.coact_LEE
        self.L, self.E = stats.load_LE.shape
        self.G = cluster.num_gpus
        self.M = self.E // self.G
        self.S_GG = saving_GG(cluster)
        self.node_of_LE = node_of_LE
        scale = max(float(np.abs(self.A_LEE).max(initial=0)), float(np.abs(self.C_LEE).max(initial=0)), 1.0)
        self.tol = 1e-9 * scale * self.E

    # ---- values --------------------------------------------------------------------------------------------
    def total(self, p_LE: np.ndarray) -> float:
        return objective(self.stats, p_LE, self.cluster)

    def linear(self, p_LE: np.ndarray, l: int) -> np.ndarray:
        """[E, G] affinity of each expert of layer l to GPU g, given layers l-1 and l+1."""
        lin_EG = np.zeros((self.E, self.G))
        if l > 0:
            lin_EG += self.A_LEE[l - 1].T @ self.S_GG[p_LE[l - 1]]
        if l < self.L - 1:
            lin_EG += self.A_LEE[l] @ self.S_GG[p_LE[l + 1]]
        return lin_EG

    def layer_value(self, row_E: np.ndarray, l: int, lin_EG: np.ndarray) -> float:
        """Every term of the objective that involves layer l."""
        intra = 0.5 * float((self.C_LEE[l] * self.S_GG[row_E[:, None], row_E[None, :]]).sum())
        return float(lin_EG[np.arange(self.E), row_E].sum()) + intra

    # ---- moves ---------------------------------------------------------------------------------------------
    def assign(self, p_LE: np.ndarray, l: int, lin_EG: np.ndarray) -> float:
        H_EG = lin_EG + self.C_LEE[l] @ self.S_GG[p_LE[l]]
        new_E = np.empty(self.E, dtype=np.int64)
        for experts, gpus in self._groups(l):
            rows, cols = linear_sum_assignment(np.repeat(H_EG[np.ix_(experts, gpus)], self.M, axis=1), maximize=True)
            new_E[experts[rows]] = gpus[cols // self.M]
        gain = self.layer_value(new_E, l, lin_EG) - self.layer_value(p_LE[l], l, lin_EG)
        if gain > self.tol:
            p_LE[l] = new_E
            return gain
        return 0.0

    def swaps(self, p_LE: np.ndarray, l: int, lin_EG: np.ndarray) -> float:
        row_E, C_EE, S_GG = p_LE[l], self.C_LEE[l], self.S_GG
        H_EG = lin_EG + C_EE @ S_GG[row_E]
        forbidden_EE = None
        if self.node_of_LE is not None:
            forbidden_EE = self.node_of_LE[l][:, None] != self.node_of_LE[l][None, :]
        gain, ar = 0.0, np.arange(self.E)
        pair_saving_EE = S_GG[row_E][:, row_E]                     # S[gpu of i, gpu of j], kept current
        for _ in range(4 * self.E):
            M_EE = H_EG[:, row_E]                                   # M[i, j] = H[i, gpu of j]
            d_E = M_EE[ar, ar]
            # exact gain of swapping i and j (0 when they share a GPU, so those are never picked)
            delta_EE = M_EE + M_EE.T - d_E[:, None] - d_E[None, :] - 2.0 * C_EE * (1.0 - pair_saving_EE)
            if forbidden_EE is not None:
                delta_EE[forbidden_EE] = -np.inf
            k = int(np.argmax(delta_EE))
            i, j = divmod(k, self.E)
            if not delta_EE[i, j] > self.tol:
                break
            a, b = row_E[i], row_E[j]
            H_EG += np.outer(C_EE[:, i] - C_EE[:, j], S_GG[b] - S_GG[a])
            row_E[i], row_E[j] = b, a
            for x in (i, j):
                pair_saving_EE[x, :] = pair_saving_EE[:, x] = S_GG[row_E[x], row_E]
            gain += float(delta_EE[i, j])
        return gain

    def relabel(self, p_LE: np.ndarray, l: int) -> float:
        """Rename the GPUs of layers l..L-1 by the permutation that best joins layer l-1 to layer l. Only the
        (l-1, l) affinity changes, so this is an exact assignment over GPU pairs (within each node)."""
        P_prev_EG = np.eye(self.G)[p_LE[l - 1]]
        B_GG = P_prev_EG.T @ self.A_LEE[l - 1] @ np.eye(self.G)[p_LE[l]]   # B[g, h]: affinity of group g to h
        perm_G = np.arange(self.G)
        for _, gpus in self._groups(l, whole_nodes=True):
            rows, cols = linear_sum_assignment(B_GG[np.ix_(gpus, gpus)], maximize=True)
            perm_G[gpus[cols]] = gpus[rows]
        if np.array_equal(perm_G, np.arange(self.G)):
            return 0.0
        before = float((B_GG * self.S_GG).sum())
        after = float((B_GG * self.S_GG[:, perm_G]).sum())
        if after - before > self.tol:
            p_LE[l:] = perm_G[p_LE[l:]]
            return after - before
        return 0.0

    def climb(self, p_LE: np.ndarray, dirty: set[int], deadline: float = np.inf) -> float:
        """Improve until no move helps (or the deadline passes); returns the gain."""
        gain = 0.0
        while True:
            while dirty:
                for l in sorted(dirty):
                    if time.perf_counter() > deadline:
                        return gain
                    dirty.discard(l)
                    lin_EG = self.linear(p_LE, l)       # layer l's neighbours do not change during its moves
                    g = self.assign(p_LE, l, lin_EG) + self.swaps(p_LE, l, lin_EG)
                    if g > self.tol:
                        gain += g
                        dirty.update(k for k in (l - 1, l + 1) if 0 <= k < self.L)
            for l in range(1, self.L):
                g = self.relabel(p_LE, l)
                if g > self.tol:
                    gain += g
                    dirty.update((l - 1, l))
            if not dirty:
                return gain

    def perturb(self, p_LE: np.ndarray, rng: np.random.Generator) -> tuple[set[int], float]:
        """Pool the experts of two GPUs (of one node where nodes are fixed) over a random run of layers and
        split them again at random. Returns the layers to climb again and the change of the objective."""
        groups = self._groups(0, whole_nodes=self.node_of_LE is not None)
        gpus = groups[int(rng.integers(len(groups)))][1]
        if len(gpus) < 2:
            return set(), 0.0
        a, b = rng.choice(gpus, size=2, replace=False)
        first = int(rng.integers(self.L))
        last = int(rng.integers(first, self.L))
        before = self.total(p_LE)
        for l in range(first, last + 1):
            both = np.flatnonzero((p_LE[l] == a) | (p_LE[l] == b))
            p_LE[l, both] = p_LE[l, rng.permutation(both)]
        dirty = set(range(max(first - 1, 0), min(last + 2, self.L)))
        return dirty, self.total(p_LE) - before

    def random_start(self, rng: np.random.Generator) -> np.ndarray:
        p_LE = np.empty((self.L, self.E), dtype=np.int64)
        for l in range(self.L):
            for experts, gpus in self._groups(l):
                p_LE[l, experts] = rng.permutation(np.repeat(gpus, self.M))
        return p_LE

    def _groups(self, l: int, whole_nodes: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """(experts, GPUs they may use) per node group of layer l; one group without node constraints (on
        several nodes with ``whole_nodes``, still one group per node: GPU renaming keeps nodes)."""
        if self.node_of_LE is None and not (whole_nodes and self.cluster.nodes > 1):
            return [(np.arange(self.E), np.arange(self.G))]
        if self.node_of_LE is None:
            per = self.cluster.gpus_per_node
            return [(np.array([], dtype=np.int64), n * per + np.arange(per)) for n in range(self.cluster.nodes)]
        per = self.cluster.gpus_per_node
        return [(np.flatnonzero(self.node_of_LE[l] == n), n * per + np.arange(per)) for n in range(self.cluster.nodes)]


def solve_local(stats: TraceStats, cluster: ClusterShape, options: SolveOptions, *,
                node_of_LE: np.ndarray | None = None) -> SolverResult:
    chain = _Chain(stats, cluster, node_of_LE)
    rng = np.random.default_rng(options.seed)
    started = time.perf_counter()
    deadline = budget_end = started + options.time_limit
    best_p, best_value, rounds_run, restarts_run = None, -np.inf, 0, 0
    next_report = started + 5.0
    for restart in range(options.restarts):
        if restart and time.perf_counter() > deadline:
            break
        p_LE = chain.random_start(rng)
        value = chain.total(p_LE) + chain.climb(p_LE, set(range(chain.L)), deadline)
        now = time.perf_counter()
        if restart == 0:
            budget_end = min(deadline, started + max(AUTO_MIN_S, AUTO_CLIMBS * (now - started)))
        rounds_end = now + max(budget_end - now, 0.0) / (options.restarts - restart)   # this start's share
        for k in range(options.rounds):
            if time.perf_counter() > rounds_end:
                break
            if time.perf_counter() > next_report:
                options.report(f"local: start {restart + 1}/{options.restarts}, round {k}/{options.rounds}: "
                               f"objective {value:.1f}")
                next_report = time.perf_counter() + 5.0
            q_LE = p_LE.copy()
            dirty, delta = chain.perturb(q_LE, rng)
            delta += chain.climb(q_LE, dirty, deadline)
            rounds_run += 1
            if delta > -chain.tol:     # sideways moves too: they let the search drift along plateaus
                p_LE, value = q_LE, value + delta
        restarts_run += 1
        value = chain.total(p_LE)   # exact, no accumulated rounding
        if value > best_value:
            best_p, best_value = p_LE, value
        options.report(f"local: start {restart + 1}/{options.restarts}: objective {value:.1f} "
                       f"(best {best_value:.1f})")
    return SolverResult(best_p, objective_upper_bound(stats, cluster),
                        extra={"restarts_run": restarts_run, "rounds_run": rounds_run})
