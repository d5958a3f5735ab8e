"""Placement solvers, picked once by Enum: ``solve(stats, cluster, options) -> Placement``.

    TraceStats + ClusterShape + SolveOptions(solver=SolverKind.X)
        --> _SOLVERS[X](stats, cluster, options) -> SolverResult (expert_to_gpu_LE, upper bound, status)
        --> objective() of the result, gap = (upper bound - objective) / upper bound
        --> Placement(solver={name, options, status, time_s, cpu_s, ...}, objective={value, upper_bound, gap})

Every solver maximises the same objective (stats.py) and reports an upper bound valid for every placement,
so its optimality gap is known. A bound below the objective of the placement it came with is a bug in that
solver: ``solve`` raises ``BoundError`` (naming the solver, the value and the bound) instead of hiding it.
Shapes: L layers, E experts, G GPUs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np

from placement.cluster import ClusterShape
from placement.errors import InputError, parse_enum
from placement.placement import Placement
from placement.stats import TraceStats, objective


class SolverKind(Enum):
    CONTIGUOUS = "contiguous"
    ROUND_ROBIN = "round_robin"
    BALANCED = "balanced"
    LOCAL = "local"
    ILP = "ilp"
    HIERARCHICAL = "hierarchical"

    @classmethod
    def parse(cls, name: str) -> "SolverKind":
        return parse_enum(cls, name, "solver")


@dataclass(frozen=True, kw_only=True)
class SolveOptions:
    solver: SolverKind = SolverKind.LOCAL
    time_limit: float = 60.0        # seconds of wall time for the search (local/ilp/hierarchical)
    seed: int = 0
    restarts: int = 4               # local: independent random starts
    rounds: int = 100               # local: perturbation rounds per start (iterated local search)
    gap_tolerance: float = 1e-4     # ilp: stop once (bound - objective) / bound is below this
    progress: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.solver, SolverKind):
            raise InputError(f"solver must be a SolverKind, got {self.solver!r}")
        if not np.isfinite(self.time_limit) or self.time_limit <= 0:
            raise InputError(f"time limit must be a positive number of seconds, got {self.time_limit!r}")
        for name in ("restarts", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "restarts" else 0):
                raise InputError(f"solver option {name} must be an integer >= {1 if name == 'restarts' else 0}, "
                                 f"got {value!r}")
        if not 0 <= self.gap_tolerance < 1:
            raise InputError(f"gap tolerance must be in [0, 1), got {self.gap_tolerance!r}")

    def to_dict(self) -> dict:
        return {"time_limit": self.time_limit, "seed": self.seed, "restarts": self.restarts,
                "rounds": self.rounds, "gap_tolerance": self.gap_tolerance}

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class BoundError(RuntimeError):
    """A solver reported an upper bound below the objective of its own placement (a bug, never clamped)."""


# Rounding allowance when comparing a bound with the objective: both are float64 sums of the same weights.
BOUND_RTOL = 1e-9


@dataclass(frozen=True)
class SolverResult:
    expert_to_gpu_LE: np.ndarray
    upper_bound: float
    status: str = "heuristic"       # "optimal" only when the bound proves it
    extra: dict = field(default_factory=dict)


def solve(stats: TraceStats, cluster: ClusterShape, options: SolveOptions = SolveOptions()) -> Placement:
    """Run the chosen solver and return a validated Placement carrying its objective, bound and gap."""
    E = stats.num_experts
    if E % cluster.num_gpus:
        raise InputError(f"{E} experts cannot be split evenly over {cluster.num_gpus} GPUs "
                         f"({cluster.nodes} node(s) x {cluster.gpus_per_node})")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = _solver_function(options.solver)(stats, cluster, options)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    value = objective(stats, result.expert_to_gpu_LE, cluster)
    bound = float(result.upper_bound)
    check_bound(options.solver.value, value, bound)
    gap = (bound - value) / bound if bound > 0 else 0.0
    solver = {"name": options.solver.value, "options": options.to_dict(), "status": result.status,
              "time_s": round(wall, 3), "cpu_s": round(cpu, 3), **result.extra}
    objective_dict = {"value": value, "upper_bound": bound, "gap": gap, "per_token": value / max(stats.num_tokens, 1),
                      "surrogate": stats.options.to_dict()}
    return Placement(np.asarray(result.expert_to_gpu_LE, dtype=np.int64), cluster, solver, objective_dict)


def check_bound(name: str, value: float, bound: float) -> None:
    """Raise ``BoundError`` unless ``bound`` >= ``value`` (up to float64 rounding of sums of the same weights)."""
    if not np.isfinite(bound) or bound < value - BOUND_RTOL * max(abs(value), 1.0):
        raise BoundError(f"solver {name} reported upper bound {bound!r} below its objective {value!r} "
                         f"(by {value - bound:.6g}): the bound is wrong")


def _solver_function(kind: SolverKind) -> Callable[[TraceStats, ClusterShape, SolveOptions], SolverResult]:
    from placement.solvers import baseline, hierarchical, ilp, local
    return {
        SolverKind.CONTIGUOUS: baseline.solve_contiguous,
        SolverKind.ROUND_ROBIN: baseline.solve_round_robin,
        SolverKind.BALANCED: baseline.solve_balanced,
        SolverKind.LOCAL: local.solve_local,
        SolverKind.ILP: ilp.solve_ilp,
        SolverKind.HIERARCHICAL: hierarchical.solve_hierarchical,
    }[kind]
