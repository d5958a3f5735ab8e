"""RoutingRecorder: write the routing of live traffic as a routing trace (.npz, DESIGN.md "Data formats").

    begin_step(batch): the step's tokens take the next rows (the first ``max_tokens`` tokens of the run; the
                       choice is made from step metadata, so every rank makes the same one)
    record(moe layer, tokens, topk ids, weights): on the rank where the router ran for those tokens
    gather(coll) (collective): every rank's rows --all-gather--> one RoutingTrace (each (token, layer) must
                       have been routed on exactly one rank)
    save(coll, path) (collective): rank 0 writes the trace, with vocabulary ids, seq ids, positions and an
                       extra ``is_prefill`` array (load it with :func:`load_is_prefill`)

Legend: R recorded rows, L MoE layers, K top-k, G ranks, N tokens held here.
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
                 meta: dict | None = None) -> None:
        if max_tokens < 1:
            raise ValueError(f"recorder max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens, self.num_experts, self.meta = max_tokens, num_experts, dict(meta or {})
        self.experts_RLK = np.full((max_tokens, num_moe_layers, top_k), -1, dtype=np.int32)
        self.weights_RLK = np.zeros((max_tokens, num_moe_layers, top_k), dtype=np.float32)
        self.token_ids_R = np.zeros(max_tokens, dtype=np.int32)
        self.seq_ids_R = np.zeros(max_tokens, dtype=np.int32)
        self.positions_R = np.zeros(max_tokens, dtype=np.int32)
        self.is_prefill_R = np.zeros(max_tokens, dtype=bool)
        self.count = 0
        self._row_T = np.zeros(0, dtype=np.int64)

    @property
    def full(self) -> bool:
        return self.count >= self.max_tokens

    def begin_step(self, batch: StepBatch) -> None:
        n = min(batch.num_tokens, self.max_tokens - self.count)
        self._row_T = np.full(batch.num_tokens, -1, dtype=np.int64)
        self._row_T[:n] = np.arange(self.count, self.count + n)
        rows = slice(self.count, self.count + n)
        self.token_ids_R[rows] = batch.token_T[:n]
        self.seq_ids_R[rows] = batch.seq_T[:n]
        self.positions_R[rows] = batch.pos_T[:n]
        self.is_prefill_R[rows] = batch.is_prefill_T[:n]
        self.count += n

    def record(self, moe_layer: int, token_N: torch.Tensor, topk_ids_NK: torch.Tensor,
               topk_weights_NK: torch.Tensor) -> None:
        row_N = self._row_T[token_N.cpu().numpy()]
        keep = row_N >= 0
        if keep.any():
            self.experts_RLK[row_N[keep], moe_layer] = topk_ids_NK.cpu().numpy()[keep]  # host sync (recording)
            self.weights_RLK[row_N[keep], moe_layer] = topk_weights_NK.float().cpu().numpy()[keep]

    def gather(self, coll: Collectives) -> RoutingTrace:
        """Collective: every rank must call it. Returns the whole trace on every rank."""
        R = self.count
        dev = coll.topology.device
        experts_GRLK = coll.all_gather_rows(torch.from_numpy(self.experts_RLK[:R]).to(dev), phase="recorder").cpu()
        weights_GRLK = coll.all_gather_rows(torch.from_numpy(self.weights_RLK[:R]).to(dev), phase="recorder").cpu()
        here_GRL = (experts_GRLK >= 0).all(-1)
        covered_RL = here_GRL.sum(0)
        if R and not bool((covered_RL == 1).all()):
            r, l = (covered_RL != 1).nonzero()[0].tolist()
            raise RuntimeError(f"recorder: token row {r}, MoE layer {l} was routed on {int(covered_RL[r, l])} ranks")
        src_RL = here_GRL.int().argmax(0)
        pick = lambda a_GRLK: a_GRLK.gather(0, src_RL[None, :, :, None].expand(1, *a_GRLK.shape[1:]))[0]  # noqa: E731
        return RoutingTrace(pick(experts_GRLK).numpy().astype(np.int16), pick(weights_GRLK).numpy(),
                            self.num_experts, self.token_ids_R[:R].copy(), self.seq_ids_R[:R].copy(),
                            self.positions_R[:R].copy(), meta=dict(self.meta, source="epserve recorder"))

    def save(self, coll: Collectives, path: str | Path) -> RoutingTrace:
        """Collective: every rank calls it; rank 0 writes ``path``. Returns the trace."""
        trace = self.gather(coll)
        if coll.rank == 0:
            path = Path(path)
            trace.save(path)
            with np.load(path, allow_pickle=False) as npz:   # add the phase beside the DESIGN.md arrays
                arrays = {k: npz[k] for k in npz.files}
            arrays["is_prefill"] = self.is_prefill_R[: self.count].copy()
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(path)
        return trace


def load_is_prefill(path: str | Path) -> np.ndarray | None:
    """The ``is_prefill`` array a recorder wrote beside the trace (None if the file has none)."""
    with np.load(path, allow_pickle=False) as npz:
        return npz["is_prefill"].astype(bool) if "is_prefill" in npz.files else None
