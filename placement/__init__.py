"""Offline expert placement: routing traces -> statistics -> Placement -> simulated traffic.

Pure numpy/scipy/PuLP; nothing here touches torch.distributed.
"""

from placement.cluster import ClusterShape
from placement.errors import InputError, PlacementError, TraceError
from placement.placement import Placement, contiguous_placement
from placement.trace import RoutingTrace

__all__ = ["ClusterShape", "InputError", "Placement", "PlacementError", "RoutingTrace", "TraceError",
           "contiguous_placement"]
