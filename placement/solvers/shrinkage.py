"""Shrinkage strength by cross-validation inside the fit part (stats.py: ``StatsOptions.shrink``).

Shapes: T tokens of the fit trace, k folds.

    fit trace --k folds (whole sequences when the trace has seq_ids, else contiguous blocks of tokens)-->
    for each candidate strength a, for each fold f:
        stats of the other k-1 folds, shrunk by a --solve (local, one start, few rounds, same seed for every
        a: common random numbers)--> placement
        score = "objective": the objective the solver maximises on fold f's own (unshrunk) statistics, per
                token (higher is better), or "top1": fold f's top-1 cross-GPU rate (lower is better)
    --> the a with the best mean score (ties: the smaller a)

The held-out part of a trace is never seen here: only the fit part's tokens are split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from placement.cluster import ClusterShape
from placement.errors import InputError
from placement.solvers import SolveOptions, SolverKind, solve
from placement.stats import StatsOptions, compute_stats, objective
from placement.trace import RoutingTrace

CANDIDATES = (0.0, 0.1, 0.25, 0.5, 0.75)
FOLDS = 3
CV_SOLVE = SolveOptions(solver=SolverKind.LOCAL, restarts=1, rounds=20, time_limit=10.0)


@dataclass(frozen=True)
class ShrinkChoice:
    strength: float                 # the chosen a
    scores: dict[float, float]      # a -> mean over folds of the score
    fold_scores: dict[float, list[float]]
    folds: int
    fold_by: str                    # "sequences" or "token blocks"
    score: str                      # "objective" (per token, higher is better) or "top1" (lower is better)

    def to_dict(self) -> dict:
        what = "held-in objective per token" if self.score == "objective" else "held-in top-1 cross-GPU rate"
        return {"strength": self.strength, "chosen_by": f"{self.folds}-fold cross-validation over {self.fold_by} "
                                                        f"of the fit part ({what})", "score": self.score,
                "scores": {str(a): s for a, s in self.scores.items()},
                "fold_scores": {str(a): s for a, s in self.fold_scores.items()}}


def fold_rows(trace: RoutingTrace, k: int = FOLDS) -> tuple[list[np.ndarray], str]:
    """k boolean [T] masks partitioning the tokens: whole sequences dealt round robin in order of first
    appearance when the trace has seq_ids (so no sequence is split), else k contiguous blocks."""
    T = trace.num_tokens
    if trace.seq_ids_T is not None:
        _, first, inverse = np.unique(trace.seq_ids_T, return_index=True, return_inverse=True)
        order_of_seq = np.argsort(np.argsort(first))       # rank of each sequence by first appearance
        if len(first) >= k:
            fold_T = order_of_seq[inverse] % k
            return [fold_T == f for f in range(k)], "sequences"
    edges = np.linspace(0, T, k + 1).round().astype(int)
    rows = np.arange(T)
    return [(rows >= lo) & (rows < hi) for lo, hi in zip(edges, edges[1:])], "token blocks"


def choose_shrink(fit: RoutingTrace, cluster: ClusterShape, stats_options: StatsOptions = StatsOptions(), *,
                  candidates: tuple[float, ...] = CANDIDATES, folds: int = FOLDS,
                  solve_options: SolveOptions = CV_SOLVE, score: str = "top1") -> ShrinkChoice:
    """The shrinkage strength (one of ``candidates``) that generalises best across folds of ``fit``."""
    if folds < 2 or fit.num_tokens < 2 * folds:
        raise InputError(f"shrinkage cross-validation needs at least 2 folds of 2 tokens: {folds} folds of a "
                         f"{fit.num_tokens}-token fit part")
    if not candidates or any(not 0 <= a <= 1 for a in candidates):
        raise InputError(f"shrinkage candidates must be numbers in [0, 1], got {candidates!r}")
    if score not in ("objective", "top1"):
        raise InputError(f"shrinkage score must be 'objective' or 'top1', got {score!r}")
    masks, fold_by = fold_rows(fit, folds)
    raw = dataclasses.replace(stats_options, shrink=0.0)
    tests = [fit.select(m) for m in masks]
    held_in = [compute_stats(t, raw) for t in tests] if score == "objective" else tests
    trains = [fit.select(~m) for m in masks]
    fold_scores: dict[float, list[float]] = {}
    for a in candidates:
        fold_scores[a] = []
        for train, test in zip(trains, held_in):
            p = solve(compute_stats(train, dataclasses.replace(stats_options, shrink=float(a))), cluster, solve_options)
            if score == "objective":
                fold_scores[a].append(objective(test, p.expert_to_gpu_LE, cluster) / max(test.num_tokens, 1))
            else:
                fold_scores[a].append(top1_cross_gpu_rate(test, p.expert_to_gpu_LE))
    scores = {a: float(np.mean(s)) for a, s in fold_scores.items()}
    sign = 1.0 if score == "objective" else -1.0
    best = max(sorted(scores), key=lambda a: (sign * scores[a], -a))
    return ShrinkChoice(float(best), scores, fold_scores, folds, fold_by, score)


def top1_cross_gpu_rate(trace: RoutingTrace, expert_to_gpu_LE: np.ndarray) -> float:
    """Fraction of (token, l -> l+1) steps whose top-1 expert's GPU changes (simulate.py's figure, without
    replicas): [T, L] GPUs of the top-1 experts, compared along L."""
    L = trace.num_layers
    if L < 2 or trace.num_tokens == 0:
        return 0.0
    gpu_TL = np.asarray(expert_to_gpu_LE)[np.arange(L)[None, :], trace.experts_TLK[:, :, 0].astype(np.int64)]
    return float((gpu_TL[:, 1:] != gpu_TL[:, :-1]).mean())
