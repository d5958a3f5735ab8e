"""RoutingRecorder: write the routing of live traffic as a routing trace (.npz, DESIGN.md "Data formats").

    begin_step(batch): the step's tokens take the next rows (identical on every rank: step metadata):
                       the first ``max_tokens`` tokens of the run, or (``ring=True``, the live window that
                       re-placement solves on) the latest ``max_tokens``, oldest rows overwritten
    record(moe layer, tokens, topk ids, weights): on the rank where the router ran for those tokens; written
                       into device buffers (no host sync on the step path)
    gather(coll) (collective): every rank's rows --all-gather--> one RoutingTrace, oldest token first (each
                       (token, layer) must have been routed on exactly one rank)
    save(coll, path) (collective): rank 0 writes the trace, with vocabulary ids, seq ids, positions and an
                       extra ``is_prefill`` array (load it with :func:`load_is_prefill`)

Legend: R recorded rows, L MoE layers, K top-k, G ranks, N tokens held here, T step tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from comm.primitives import Collectives
from epserve.engine.step_batch import StepBatch
from placement.trace import RoutingTrace


class RoutingRecorder:
    def __init__(self, *, max_tokens: int, num_moe_layers: int, top_k: int, num_experts: int,
                 meta: dict | None = None, ring: bool = False, device: torch.device | str = "cpu") -> None:
        if max_tokens < 1:
            raise ValueError(f"recorder max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.num_experts, self.meta, self.ring = max_tokens, num_experts, dict(meta or {}), ring
        self.experts_RLK = torch.full((max_tokens, num_moe_layers, top_k), -1, dtype=torch.int32, device=device)
        self.weights_RLK = torch.zeros((max_tokens, num_moe_layers, top_k), dtype=torch.float32, device=device)
        self.token_ids_R = np.zeros(max_tokens, dtype=np.int32)
        self.seq_ids_R = np.zeros(max_tokens, dtype=np.int32)
        self.positions_R = np.zeros(max_tokens, dtype=np.int32)
        self.is_prefill_R = np.zeros(max_tokens, dtype=bool)
        self.seen = 0          # tokens offered to the recorder so far (ring: rows wrap round)
        self._row_T = np.zeros(0, dtype=np.int64)

    @property
    def count(self) -> int:
        """Rows holding a recorded token."""
        return min(self.seen, self.max_tokens)

    @property
    def full(self) -> bool:
        return not self.ring and self.seen >= self.max_tokens

    def begin_step(self, batch: StepBatch) -> None:
        T, R = batch.num_tokens, self.max_tokens
        self._row_T = np.full(T, -1, dtype=np.int64)
        if self.ring:          # the step's latest R tokens take the next rows, wrapping round
            first = max(0, T - R)
            rows_T = (self.seen + np.arange(T - first)) % R
            self._row_T[first:] = rows_T
            self.experts_RLK[torch.as_tensor(rows_T, device=self.experts_RLK.device)] = -1   # stale rows
            self.seen += T - first
        else:                  # the run's first R tokens
            n = min(T, R - min(self.seen, R))
            self._row_T[:n] = np.arange(self.seen, self.seen + n)
            self.seen += n
        keep = self._row_T >= 0
        rows = self._row_T[keep]
        self.token_ids_R[rows] = batch.token_T[keep]
        self.seq_ids_R[rows] = batch.seq_T[keep]
        self.positions_R[rows] = batch.pos_T[keep]
        self.is_prefill_R[rows] = batch.is_prefill_T[keep]

    def record(self, moe_layer: int, token_N: torch.Tensor, topk_ids_NK: torch.Tensor,
               topk_weights_NK: torch.Tensor) -> None:
        """``token_N``: step-local indices on the host; ids and weights stay on their device (no host sync)."""
        row_N = self._row_T[token_N.cpu().numpy()]
        keep_N = row_N >= 0
        if not keep_N.any():
            return
        dev = self.experts_RLK.device
        rows = torch.as_tensor(row_N[keep_N], device=dev)
        picked = torch.as_tensor(np.flatnonzero(keep_N), device=dev)
        self.experts_RLK[rows, moe_layer] = topk_ids_NK[picked].to(torch.int32)
        self.weights_RLK[rows, moe_layer] = topk_weights_NK[picked].float()

    def _order_R(self) -> np.ndarray:
        """Rows oldest token first."""
        R = self.count
        start = self.seen % self.max_tokens if self.ring and self.seen > self.max_tokens else 0
        return (start + np.arange(R)) % self.max_tokens

    def gather(self, coll: Collectives) -> RoutingTrace:
        """Collective: every rank must call it. Returns the whole trace on every rank (host syncs: off the
        step path)."""
        order_R = self._order_R()
        idx = torch.as_tensor(order_R, device=self.experts_RLK.device)
        experts_GRLK = coll.all_gather_rows(self.experts_RLK[idx], phase="recorder").cpu()
        weights_GRLK = coll.all_gather_rows(self.weights_RLK[idx], phase="recorder").cpu()
        here_GRL = (experts_GRLK >= 0).all(-1)
        covered_RL = here_GRL.sum(0)
        if len(order_R) and not bool((covered_RL == 1).all()):
            r, l = (covered_RL != 1).nonzero()[0].tolist()
            raise RuntimeError(f"recorder: token row {r}, MoE layer {l} was routed on {int(covered_RL[r, l])} ranks")
        src_RL = here_GRL.int().argmax(0)
        pick = lambda a_GRLK: a_GRLK.gather(0, src_RL[None, :, :, None].expand(1, *a_GRLK.shape[1:]))[0]  # noqa: E731
        return RoutingTrace(pick(experts_GRLK).numpy().astype(np.int16), pick(weights_GRLK).numpy(),
                            self.num_experts, self.token_ids_R[order_R], self.seq_ids_R[order_R],
                            self.positions_R[order_R], meta=dict(self.meta, source="epserve recorder"))

    def save(self, coll: Collectives, path: str | Path) -> RoutingTrace:
        """Collective: every rank calls it; rank 0 writes ``path``. Returns the trace."""
        trace = self.gather(coll)
        if coll.rank == 0:
            path = Path(path)
            trace.save(path)
            with np.load(path, allow_pickle=False) as npz:   # add the phase beside the DESIGN.md arrays
                arrays = {k: npz[k] for k in npz.files}
            arrays["is_prefill"] = self.is_prefill_R[self._order_R()]
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(path)
        return trace


def load_is_prefill(path: str | Path) -> np.ndarray | None:
    """The ``is_prefill`` array a recorder wrote beside the trace (None if the file has none)."""
    with np.load(path, allow_pickle=False) as npz:
        return npz["is_prefill"].astype(bool) if "is_prefill" in npz.files else None
