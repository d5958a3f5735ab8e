"""Cost model for tensor-parallel attention: TPReport (placement/simulate_tp.py) + hardware profile -> modelled
time of the MoE layers' collectives, priced as cost_model.py prices the DP strategies (``_Net.call``: per link
class alpha + alpha_per_peer x peers + bottleneck bytes / beta, the slowest class sets the call, + host seconds).

Shapes: L MoE layers of the trace, G ranks, C rows per rank's chunk (mean over the trace's steps).

    per MoE layer l, per step (the trace's mean: totals / steps):
        rs        ring reduce-scatter: rank r sends rank (r + 1) % G (G - 1) messages of C rows each, i.e.
                  (G - 1) / G of the G x C rows (padding included: rs wire rows / (steps x G) per edge), rows of
                  hidden x partial_bytes; 1 peer per class the ring crosses
        counts    the a2a transport's counts exchange: counts_per_peer(a2a, tokens stay home) int64 to every peer
        dispatch  dispatch_flows_LGG[l] / steps rows of model.dispatch_row_bytes (hidden x dtype + metadata, or
                  hidden x dtype without a ModelShape), every pair a message (gloo/NCCL all-to-all)
        combine   the transposed flows, rows of model.combine_row_bytes (hidden x dtype without a ModelShape)
        ag        ring all-gather as rs, rows of hidden x dtype; none after the last MoE layer
    layer_s = the sum over phases and layers / L (the mean MoE layer, comparable to CostBreakdown.layer_s)

Not priced here: the step plan broadcast and the sampled-id all-gather (the same under DP and TP attention), a
dense layer's rs/ag, compute. The rings' alpha is paid once per call (the profile's alpha is per collective
call, as cost_model.py's gloo all-gather); ring steps show as (G - 1) messages per edge for message overheads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from placement.cost_model import (COUNT_BYTES, CURRENT_WIRE, ModelShape, RuntimeWire, _Net, _Tally,
                                  counts_per_peer)
from placement.errors import InputError
from placement.hardware import HardwareProfile
from placement.simulate_tp import TPReport
from placement.transport import Transport


@dataclass(frozen=True, kw_only=True)
class TPCost:
    strategy: str
    hardware: str
    tokens_per_step: int
    phase_s: dict            # per step, all MoE layers: rs, counts, dispatch, combine, ag -> seconds
    layer_s: float           # the mean MoE layer's collectives
    bottleneck: str          # the link class that set most of the time
    class_s: dict
    bytes_per_step: dict     # class -> link bytes per step (payload + overheads), all ranks
    payload_bytes_per_step: dict
    collectives_per_step: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def ring_edges_GG(G: int) -> np.ndarray:
    """[G, G] 1.0 on the ring's edges r -> (r + 1) % G (none for one rank)."""
    edges = np.zeros((G, G))
    if G > 1:
        edges[np.arange(G), (np.arange(G) + 1) % G] = 1.0
    return edges


def tp_step_time(report: TPReport, hardware: HardwareProfile, *, model: ModelShape | None = None,
                 wire: RuntimeWire = CURRENT_WIRE) -> TPCost:
    """Modelled collective time of one step (the report's tokens_per_step; the trace's mean step) under
    ``report``'s TP strategy on ``hardware`` (module docstring). ``model`` gives the dispatch/combine rows'
    metadata; without it rows are hidden_size x dtype_bytes (the report's)."""
    H = model.hidden_size if model is not None else report.hidden_size
    if H is None:
        raise InputError("the TP cost model needs the hidden size (a ModelShape, or simulate_tp(hidden_size=...))")
    net = _Net(report, hardware)
    ring = copy.copy(net)                                  # each rank talks to one peer of each class it crosses
    ring.peers = {c: min(1, p) for c, p in net.peers.items()}
    acc = _Tally()
    G, L, steps = net.G, report.num_layers, report.steps
    dispatch_row = model.dispatch_row_bytes if model is not None else H * report.dtype_bytes
    combine_row = model.combine_row_bytes if model is not None else H * report.dtype_bytes
    rows_bytes = {"rs": H * report.partial_bytes, "ag": H * report.dtype_bytes}
    edges_GG = ring_edges_GG(G)
    counts = counts_per_peer(Transport.A2A, tokens_move=False, needs_combine=True, gpus_per_node=net.gpn,
                             world_size=G, tokens_per_step=report.tokens_per_step, wire=wire)
    counts_call = net.call(np.where(net.eye, 0.0, counts * COUNT_BYTES), net.pairs["world"])
    for l in range(L):
        for phase in ("rs", "counts", "dispatch", "combine", "ag"):
            if phase in ("rs", "ag"):
                per_edge_rows = report.wire_rows_L[phase][l] / (steps * G)   # (G - 1) x C
                if per_edge_rows == 0:
                    continue
                call = ring.call(edges_GG * per_edge_rows * rows_bytes[phase], edges_GG * (G - 1))
            elif phase == "counts":
                call = counts_call
            else:
                flows_GG = report.dispatch_flows_LGG[l] / steps
                payload_GG = flows_GG * dispatch_row if phase == "dispatch" else flows_GG.T * combine_row
                call = net.call(payload_GG, net.pairs["world"])
            acc.add(phase, call, 1.0)
    phase_s = dict(acc.phase_s)
    total = sum(phase_s.values())
    return TPCost(strategy=report.strategy, hardware=hardware.name, tokens_per_step=report.tokens_per_step,
                  phase_s=phase_s, layer_s=total / L, bottleneck=max(acc.class_s, key=acc.class_s.get),
                  class_s=acc.class_s, bytes_per_step=acc.link_bytes, payload_bytes_per_step=acc.payload_bytes,
                  collectives_per_step=round(acc.calls))
