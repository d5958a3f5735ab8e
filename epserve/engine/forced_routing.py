"""ForcedRouting: take each token's experts and weights from a recorded routing trace instead of the router.

Benchmarks only. A random-weight model has no inter-layer affinity of its own, so to measure traffic on real
routing the runner replays a real trace (e.g. FLAME-MoE's): token (seq_id, position) at MoE layer l uses the
trace row of the same (seq_id, position). Everything else (attention, experts, sampling) runs for real, and
every strategy sees the same routing, so their output tokens must still be equal.

Legend: N tokens, K top-k, L MoE layers, R trace rows.
"""

from __future__ import annotations

import numpy as np
import torch

from placement.errors import TraceError
from placement.trace import RoutingTrace


class ForcedRouting:
    def __init__(self, trace: RoutingTrace, *, num_experts: int, top_k: int, num_moe_layers: int) -> None:
        if trace.seq_ids_T is None or trace.positions_T is None:
            raise TraceError("forced routing needs a trace with seq_ids and positions")
        if (trace.num_experts, trace.top_k, trace.num_layers) != (num_experts, top_k, num_moe_layers):
            raise TraceError(f"trace routes {trace.num_layers} layers x {trace.num_experts} experts, top-"
                             f"{trace.top_k}; the model has {num_moe_layers} x {num_experts}, top-{top_k}")
        self.trace = trace
        self._row = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(trace.seq_ids_T, trace.positions_T))}

    def route(self, moe_index: int, seq_N: torch.Tensor, pos_N: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights_NK float32, topk_ids_NK int64) of the trace rows of these tokens."""
        keys = zip(seq_N.tolist(), pos_N.tolist())
        try:
            rows = np.array([self._row[k] for k in keys], dtype=np.int64)
        except KeyError as exc:
            raise TraceError(f"forced routing: (seq_id, position) {exc.args[0]} is not in the trace") from None
        rows = rows.reshape(-1)
        w_NK = torch.from_numpy(self.trace.weights_TLK[rows, moe_index].copy()).to(device)
        ids_NK = torch.from_numpy(self.trace.experts_TLK[rows, moe_index].astype(np.int64)).to(device)
        return w_NK, ids_NK
