"""Offline expert placement: routing traces -> statistics -> Placement -> simulated traffic.

Pure numpy/scipy/PuLP; nothing here touches torch.distributed.

    RoutingTrace (trace.py) --compute_stats--> TraceStats (stats.py) --solve--> Placement (solvers/)
    RoutingTrace + Placement (+ SpeculativePredictor, predictor.py) --simulate--> CommReport (simulate.py)
"""

from placement.cluster import ClusterShape
from placement.errors import InputError, PlacementError, TraceError
from placement.placement import Placement, contiguous_placement
from placement.predictor import PredictorOptions, SpeculativePredictor
from placement.simulate import CommReport, SimOptions, Strategy, simulate
from placement.solvers import SolveOptions, SolverKind, solve
from placement.stats import StatsOptions, TraceStats, compute_stats
from placement.trace import RoutingTrace

__all__ = ["ClusterShape", "CommReport", "InputError", "Placement", "PlacementError", "PredictorOptions",
           "RoutingTrace", "SimOptions", "SolveOptions", "SolverKind", "SpeculativePredictor", "StatsOptions",
           "Strategy", "TraceError", "TraceStats", "compute_stats", "contiguous_placement", "simulate", "solve"]
