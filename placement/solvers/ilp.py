"""ilp: an exact column model of the placement problem, with a proven upper bound.

Shapes: L layers, E experts, G GPUs, M = E/G; a "subset" is M experts of one layer (S = C(E, M) of them);
a column is what one GPU holds: one subset per layer (c_L). Its value v(c) is the objective earned inside it.

    local search (warm start, part of the time)                     -> incumbent, first columns
    Lagrangian dual (set partitioning: every (layer, expert) in exactly one chosen column, G columns):
        UB(pi) = sum(pi) + G * max(0, max_c v(c) - pi(c))            valid for every pi
        pricing  max_c v(c) - pi(c) is a chain over layers: dynamic programming over subsets with
                 [S, S] pair values per layer pair (exact, vectorised)
        box-step bundle: min sum(pi) + G t  s.t. pi(c) + t >= v(c) for known columns, |pi - centre| <= delta
                 (HiGHS LP via scipy); price at its solution, add the best columns, move the centre when
                 UB drops enough, shrink/grow the box
    the reported bound: UB(pi) at the best pi, priced once more in float64 (the search prices with float32
                 tables to save memory, whose rounding could put a bound a hair below the optimum)
    integer master over all generated columns (PuLP: HiGHS through highspy, else CBC)   -> incumbent
    status "optimal" when (UB - incumbent) / UB <= gap_tolerance, else "gap"

Why not x/y variables: GPU labels are interchangeable, so the naive linearisation has a useless LP bound and a
G!-fold symmetric search tree. Columns carry no labels (no symmetry), and the set-partitioning relaxation
sees whole GPUs, so its bound is tight (bench/placement_bench.py: optimal, gap < 0.01%, on four 8 x 16 x 4
instances in 16-33 s wall; a plain x/y model left a 99.8% gap after 60 s on the same instances).
The column model needs the saving of one node (a pair earns only on the same GPU) and at most
MAX_SUBSETS subsets per layer; otherwise the result is local search with the cheap bound, and says so.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_matrix

from placement.cluster import ClusterShape
from placement.solvers import SolveOptions, SolverResult
from placement.solvers.local import solve_local
from placement.stats import TraceStats, objective, objective_upper_bound

MAX_SUBSETS = 2500          # [S, S] float32 pair tables per layer pair stay under ~25 MB
COLUMNS_PER_PRICING = 30


class _ColumnModel:
    def __init__(self, stats: TraceStats, G: int):
        self.L, self.E = stats.load_LE.shape
        self.G, self.M = G, self.E // G
        self.subsets_SM = np.array(list(itertools.combinations(range(self.E), self.M)), dtype=np.int64)
        S = len(self.subsets_SM)
        member_SE = np.zeros((S, self.E), dtype=np.float32)
        member_SE[np.repeat(np.arange(S), self.M), self.subsets_SM.ravel()] = 1.0
        self.member_SE = member_SE
        self.index_of = {int(code): k for k, code in enumerate(member_SE.astype(np.int64) @ (1 << np.arange(self.E)))}
        self.pair_LSS = [member_SE @ stats.affinity_LEE[l].astype(np.float32) @ member_SE.T for l in range(self.L - 1)]
        self.node_LS = [0.5 * np.einsum("se,ef,sf->s", member_SE, stats.coact_LEE[l].astype(np.float32), member_SE)
                        for l in range(self.L)]

    def columns_of(self, p_LE: np.ndarray) -> list[tuple[int, ...]]:
        weights_E = 1 << np.arange(self.E)
        return [tuple(self.index_of[int(((p_LE[l] == g) * weights_E).sum())] for l in range(self.L))
                for g in range(self.G)]

    def value(self, col: tuple[int, ...]) -> float:
        v = sum(float(self.node_LS[l][col[l]]) for l in range(self.L))
        return v + sum(float(self.pair_LSS[l][col[l], col[l + 1]]) for l in range(self.L - 1))

    def rows(self, col: tuple[int, ...]) -> np.ndarray:
        """Indices l * E + e of the (layer, expert) cells a column covers."""
        return np.concatenate([l * self.E + self.subsets_SM[col[l]] for l in range(self.L)])

    def price(self, pi_LE: np.ndarray, count: int) -> tuple[float, list[tuple[int, ...]]]:
        """max_c v(c) - pi(c), and the best column ending in each of the ``count`` best last subsets."""
        node_LS = [self.node_LS[l] - self.member_SE @ pi_LE[l].astype(np.float32) for l in range(self.L)]
        best_S, back = node_LS[0].astype(np.float64), []
        for l in range(self.L - 1):
            total_SS = best_S[:, None] + self.pair_LSS[l]
            arg_S = np.argmax(total_SS, axis=0)
            back.append(arg_S)
            best_S = total_SS[arg_S, np.arange(len(arg_S))] + node_LS[l + 1]
        cols = []
        for end in np.argsort(-best_S)[:count]:
            col = [int(end)]
            for l in range(self.L - 2, -1, -1):
                col.append(int(back[l][col[-1]]))
            cols.append(tuple(col[::-1]))
        return float(best_S.max()), cols

    def price_exact(self, pi_LE: np.ndarray, stats: TraceStats) -> float:
        """max_c v(c) - pi(c) in float64, one [S, S] pair table at a time (the bound's last evaluation)."""
        member_SE = self.member_SE.astype(np.float64)
        node_LS = [0.5 * np.einsum("se,ef,sf->s", member_SE, stats.coact_LEE[l], member_SE) - member_SE @ pi_LE[l]
                   for l in range(self.L)]
        best_S = node_LS[0]
        for l in range(self.L - 1):
            pair_SS = member_SE @ stats.affinity_LEE[l] @ member_SE.T
            best_S = (best_S[:, None] + pair_SS).max(axis=0) + node_LS[l + 1]
        return float(best_S.max())


def solve_ilp(stats: TraceStats, cluster: ClusterShape, options: SolveOptions) -> SolverResult:
    start = time.perf_counter()
    deadline = start + options.time_limit
    warm = solve_local(stats, cluster, _share(options, 0.2))
    L, E = stats.load_LE.shape
    G = cluster.num_gpus
    n_subsets = math.comb(E, E // G)
    why_not = None
    if cluster.nodes > 1:
        why_not = "the column model needs one node (a pair earns only on the same GPU); use hierarchical"
    elif n_subsets > MAX_SUBSETS:
        why_not = f"C({E}, {E // G}) = {n_subsets} expert subsets per layer exceed {MAX_SUBSETS}"
    if why_not:
        options.report(f"ilp: no exact model ({why_not}); returning local search")
        return SolverResult(warm.expert_to_gpu_LE, objective_upper_bound(stats, cluster), "heuristic",
                            {"exact_model": why_not})

    model = _ColumnModel(stats, G)
    columns: dict[tuple[int, ...], float] = {}
    for col in model.columns_of(warm.expert_to_gpu_LE):
        columns[col] = model.value(col)
    incumbent = sum(columns.values())
    options.report(f"ilp: {n_subsets} subsets per layer; warm start objective {incumbent:.1f}")
    _, pi_LE, iterations = _bundle(model, columns, incumbent, options, deadline - 0.15 * options.time_limit)
    bound = min(_exact_bound(model, stats, pi_LE), objective_upper_bound(stats, cluster))
    p_LE, master_value, master_status = _integer_master(model, columns, max(deadline - time.perf_counter(), 1.0))
    if master_value > incumbent + 1e-9:
        incumbent = master_value
    else:
        p_LE = warm.expert_to_gpu_LE
    incumbent = objective(stats, p_LE, cluster)     # exact (the column values are float32 sums)
    gap = (bound - incumbent) / bound if bound > 0 else 0.0
    status = "optimal" if gap <= options.gap_tolerance + 1e-12 else "gap"
    options.report(f"ilp: objective {incumbent:.1f}, upper bound {bound:.1f}, gap {100 * gap:.3f}% ({status})")
    return SolverResult(p_LE, bound, status, {"columns": len(columns), "bundle_iterations": iterations,
                                              "master": master_status, "subsets_per_layer": n_subsets})


def _exact_bound(model: _ColumnModel, stats: TraceStats, pi_LE: np.ndarray) -> float:
    """UB(pi) = sum(pi) + G * max(0, max_c v(c) - pi(c)), priced in float64, plus a margin for float64
    rounding (1e-12 of the magnitudes summed), so it holds for every placement."""
    best = model.price_exact(pi_LE, stats)
    magnitude = float(np.abs(pi_LE).sum() + model.G * abs(best) + stats.affinity_LEE.sum() + stats.coact_LEE.sum())
    return float(pi_LE.sum() + model.G * max(best, 0.0)) + 1e-12 * magnitude


def _bundle(model: _ColumnModel, columns: dict, incumbent: float, options: SolveOptions,
            deadline: float) -> tuple[float, np.ndarray, int]:
    """Box-step bundle method on the Lagrangian dual; returns the best upper bound found (float32 pricing),
    the multipliers pi [L, E] that gave it, and the iterations run."""
    L, E, G = model.L, model.E, model.G
    centre_LE = np.zeros((L, E))
    for col, v in columns.items():            # start: each column's value shared by the cells it covers
        centre_LE.ravel()[model.rows(col)] = v / (L * model.M)

    def evaluate(pi_LE: np.ndarray) -> float:
        best, cols = model.price(pi_LE, COLUMNS_PER_PRICING)
        for col in cols:
            if col not in columns:
                columns[col] = model.value(col)
        return float(pi_LE.sum() + G * max(best, 0.0))

    best_ub = evaluate(centre_LE)
    delta = max(float(np.abs(centre_LE).mean()), 1e-3)
    iterations = 0
    while time.perf_counter() < deadline and best_ub - incumbent > options.gap_tolerance * best_ub:
        iterations += 1
        pi_LE, model_value = _box_lp(model, columns, centre_LE, delta)
        ub = evaluate(pi_LE)
        predicted = best_ub - model_value
        if predicted <= 1e-7 * max(abs(best_ub), 1.0):
            break                                  # the LP bound is reached: only branching could go lower
        if ub < best_ub - 0.1 * predicted:         # serious step: move the centre
            if ub < best_ub - 0.5 * predicted:
                delta *= 2.0
            centre_LE, best_ub = pi_LE, ub
        elif ub > best_ub:
            delta = max(delta / 2.0, 1e-9)
        if iterations % 10 == 0:
            options.report(f"ilp: bound {best_ub:.1f} vs objective {incumbent:.1f} after {iterations} "
                           f"iterations, {len(columns)} columns")
    return best_ub, centre_LE, iterations


def _box_lp(model: _ColumnModel, columns: dict, centre_LE: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    """min sum(pi) + G t  s.t.  pi(c) + t >= v(c) for every known column, |pi - centre| <= delta, t >= 0."""
    LE = model.L * model.E
    cols = list(columns)
    rows = [np.r_[model.rows(c), LE] for c in cols]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    A = csr_matrix((-np.ones(indptr[-1]), np.concatenate(rows), indptr), shape=(len(cols), LE + 1))
    b = -np.array([columns[c] for c in cols])
    bounds = [(c - delta, c + delta) for c in centre_LE.ravel()] + [(0, None)]
    cost = np.r_[np.ones(LE), model.G]
    res = linprog(cost, A_ub=A, b_ub=b, bounds=bounds, method="highs")
    if res.status != 0:
        return centre_LE, float(cost[:-1] @ centre_LE.ravel())
    return res.x[:LE].reshape(model.L, model.E), float(res.fun)


def _integer_master(model: _ColumnModel, columns: dict, time_limit: float) -> tuple[np.ndarray | None, float, str]:
    """Best set of G columns covering every (layer, expert) once, over the generated columns (PuLP)."""
    import pulp

    cols = list(columns)
    prob = pulp.LpProblem("placement_master", pulp.LpMaximize)
    new_var = getattr(prob, "add_variable", None)     # PuLP >= 3.3; LpVariable(...) before
    use = [new_var(f"c{k}", 0, 1, cat="Binary") if new_var else pulp.LpVariable(f"c{k}", cat="Binary")
           for k in range(len(cols))]
    prob += pulp.lpSum(columns[c] * u for c, u in zip(cols, use))
    cover: list[list] = [[] for _ in range(model.L * model.E)]
    for u, c in zip(use, cols):
        for cell in model.rows(c):
            cover[cell].append(u)
    for cell, users in enumerate(cover):
        prob += pulp.lpSum(users) == 1, f"cell_{cell}"
    solver = _pulp_solver(time_limit)
    prob.solve(solver)
    status = f"{solver.name}: {pulp.LpStatus[prob.status]}"
    chosen = [c for c, u in zip(cols, use) if (u.value() or 0) > 0.5]
    if len(chosen) != model.G:
        return None, -np.inf, status
    p_LE = np.empty((model.L, model.E), dtype=np.int64)
    for g, col in enumerate(chosen):
        for l in range(model.L):
            p_LE[l, model.subsets_SM[col[l]]] = g
    return p_LE, sum(columns[c] for c in chosen), status


def _pulp_solver(time_limit: float):
    import pulp

    highs = pulp.HiGHS(msg=False, timeLimit=time_limit, threads=1)
    if highs.available():
        _swallow_highs_banner()
        return highs
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(int(time_limit), 1), threads=1)


_BANNER_SWALLOWED = False


def _swallow_highs_banner() -> None:
    """highspy prints its banner ("Running HiGHS ...") on file descriptor 1 when the first ``Highs`` of the
    process is made, before PuLP can set ``output_flag`` (its ``msg=False``): make that first one here, with
    fd 1 pointed at /dev/null, so ``epserve place --solver ilp`` prints only our own lines (the gap and bound
    are ours, on stderr and in the table)."""
    global _BANNER_SWALLOWED
    if _BANNER_SWALLOWED:
        return
    _BANNER_SWALLOWED = True
    import ctypes
    import os
    import sys

    try:
        import highspy
    except ImportError:
        return
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs().setOptionValue("output_flag", False)
        libc.fflush(None)                    # C stdio may hold the banner in its buffer (stdout not a terminal)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _share(options: SolveOptions, fraction: float) -> SolveOptions:
    import dataclasses
    return dataclasses.replace(options, time_limit=options.time_limit * fraction)
