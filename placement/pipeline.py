"""fit_placement: a routing trace --> a placement ready to serve (with its anchor table and predictor), the
pipeline ``epserve place`` runs and the server re-runs on live routing (epserve/engine/replace.py).

    fit trace --[shrink auto: strength by cross-validation inside the fit part]--> stats --solve-->
        [refine: exact swaps against coherent transfers]
        [slots_per_gpu > experts / GPUs: replicas of hot experts within max_imbalance (E % G: spread primaries)]
        --> + anchor table (top-k > 1) + speculative predictor (trace with vocabulary ids) --> Fitted

Pure: arrays in, objects out; nothing is written (the caller names and saves the files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from placement.anchor import fit_anchor_table
from placement.cluster import ClusterShape
from placement.errors import InputError
from placement.placement import Placement
from placement.predictor import PredictorOptions, SpeculativePredictor
from placement.refine import refine_placement
from placement.solvers import SolveOptions, solve
from placement.solvers.replicate import DEFAULT_MAX_IMBALANCE, add_replicas, spread_primaries
from placement.solvers.shrinkage import choose_shrink
from placement.stats import StatsOptions, TraceStats, compute_stats, objective
from placement.trace import RoutingTrace


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    solve: SolveOptions = field(default_factory=SolveOptions)
    stats: StatsOptions = field(default_factory=StatsOptions)
    shrink: str | float = 0.0            # "auto": chosen by cross-validation; a number in [0, 1]: fixed
    slots_per_gpu: int | None = None     # None: experts / GPUs, no replicas
    max_imbalance: float = DEFAULT_MAX_IMBALANCE
    refine: bool = False
    anchors: bool = True                 # fit a coherent anchor table (top-k > 1)
    predictor: bool = True               # fit a speculative predictor (trace with vocabulary ids)

    def __post_init__(self) -> None:
        if self.shrink != "auto" and not (isinstance(self.shrink, (int, float)) and 0 <= self.shrink <= 1):
            raise InputError(f"shrink must be 'auto' or a number in [0, 1], got {self.shrink!r}")
        if self.slots_per_gpu is not None and self.slots_per_gpu < 1:
            raise InputError(f"slots_per_gpu must be >= 1, got {self.slots_per_gpu}")


@dataclass(frozen=True)
class Fitted:
    placement: Placement                       # anchors attached when fitted
    predictor: SpeculativePredictor | None
    stats: TraceStats                          # the statistics solved (shrunk as chosen)
    shrink: dict                               # {"strength", "chosen_by", ...}
    replicated: bool                           # slots_per_gpu x GPUs != experts


def fit_placement(fit: RoutingTrace, cluster: ClusterShape, options: FitOptions = FitOptions(),
                  progress: Callable[[str], None] | None = None) -> Fitted:
    progress = progress or (lambda message: None)
    shrink = {"strength": options.shrink, "chosen_by": "fixed"}
    if options.shrink == "auto":
        progress("shrink: choosing the strength by cross-validation on the fit part")
        shrink = choose_shrink(fit, cluster, options.stats).to_dict()
        progress(f"shrink: {shrink['strength']} ({shrink['chosen_by']})")
    stats = compute_stats(fit, dataclasses.replace(options.stats, shrink=shrink["strength"]))
    E, G, S = fit.num_experts, cluster.num_gpus, options.slots_per_gpu
    if S is not None and S * G < E:
        raise InputError(f"slots_per_gpu {S} x {G} GPUs < {E} experts: every expert needs a slot")
    replicate = S is not None and S * G != E
    if replicate and E % G:
        progress(f"{E} experts on {G} GPUs: primaries spread (expert e on GPU e x {G} // {E}), then replicas")
        solved = add_replicas(spread_primaries(fit.num_layers, E, G), fit, S, cluster=cluster,
                              max_imbalance=options.max_imbalance)
        solved = dataclasses.replace(solved, solver={**solved.solver, "name": "spread+replicas"})
    else:
        solved = solve(stats, cluster, options.solve)
        if options.refine:
            solved = _refine(fit, solved, stats, options)
        if replicate:
            progress(f"replicas: {S * G - E} extra slots per layer")
            solved = add_replicas(solved, fit, S, max_imbalance=options.max_imbalance)
    solved = dataclasses.replace(solved, solver={**solved.solver, "shrink": shrink})
    predictor = None
    if options.predictor and fit.has_token_ids:   # its digest covers the copies too
        predictor = SpeculativePredictor.build(fit, solved, PredictorOptions())
    if options.anchors and fit.top_k > 1:         # the digest covers the copies: refused for any other placement
        table = solved.copies_LEG if replicate else solved.expert_to_gpu_LE
        solved = solved.with_anchors(fit_anchor_table(fit, table, G))
    return Fitted(solved, predictor, stats, shrink, replicate)


def _refine(fit: RoutingTrace, solved: Placement, stats: TraceStats, options: FitOptions) -> Placement:
    """The exact swap refinement, with the surrogate objective (and its gap to the bound) recomputed."""
    refined = refine_placement(fit, solved, anchored=options.anchors and fit.top_k > 1,
                               time_limit=options.solve.time_limit)
    value, bound = objective(stats, refined.expert_to_gpu_LE, solved.cluster), solved.objective["upper_bound"]
    surrogate = {**solved.objective, "value": value, "gap": (bound - value) / bound if bound > 0 else 0.0,
                 "per_token": value / max(stats.num_tokens, 1)}
    return dataclasses.replace(refined, objective=surrogate)


@dataclass(frozen=True, kw_only=True)
class RefitOptions:
    """Live re-placement's solve (epserve/engine/replace_control.py runs it in a background process)."""

    time_limit: float = 10.0     # seconds of search
    min_gain: float = 0.02       # swap only when transfers per token-layer on the window drop by this fraction
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.time_limit > 0:
            raise InputError(f"re-placement time_limit must be > 0 seconds, got {self.time_limit!r}")
        if not 0 <= self.min_gain < 1:
            raise InputError(f"re-placement min_gain must be in [0, 1), got {self.min_gain!r}")


def refit(window: RoutingTrace, current: Placement, strategy, options: RefitOptions = RefitOptions()
          ) -> tuple[Placement | None, object | None, dict]:
    """Solve a placement for the live routing ``window`` with ``current``'s cluster and slots, and judge it
    against ``current`` on the same window under ``strategy``'s traffic (the speculative strategies are judged
    as their non-speculative twins: the predictor is refitted with the placement). Returns (placement,
    predictor, report); placement is None when it does not cut transfers by ``min_gain``."""
    import time

    from placement.simulate import Strategy, simulate
    started = time.monotonic()
    predictor_wanted = strategy.needs_predictor and window.has_token_ids
    fitted = fit_placement(window, current.cluster, FitOptions(
        solve=SolveOptions(time_limit=options.time_limit, seed=options.seed),
        slots_per_gpu=current.slots_per_gpu, anchors=strategy.coherent, predictor=predictor_wanted))
    judge = Strategy.COHERENT if strategy.coherent else Strategy.TWO_A2A
    before = simulate(window, current, judge).transfers_per_token_layer
    after = simulate(window, fitted.placement, judge).transfers_per_token_layer
    gain = 1.0 - after / before if before > 0 else 0.0
    report = {"window_tokens": window.num_tokens, "judged_as": judge.value,
              "transfers_per_token_layer_before": before, "transfers_per_token_layer_after": after,
              "gain": gain, "min_gain": options.min_gain, "solve_seconds": time.monotonic() - started,
              "solver": fitted.placement.solver.get("name")}
    if gain < options.min_gain:
        return None, None, report
    solver = {**fitted.placement.solver, "live": report}
    return dataclasses.replace(fitted.placement, solver=solver, trace={"source": "live routing window",
                                                                       "tokens": window.num_tokens}), \
        fitted.predictor, report


def refit_niced(window: RoutingTrace, current: Placement, strategy, options: RefitOptions):
    """``refit`` at a lower priority than serving: the entry point of the server's background solve process
    (a spawned process that imports placement/ only, no torch)."""
    import os
    try:
        os.nice(10)
    except OSError:
        pass
    return refit(window, current, strategy, options)
