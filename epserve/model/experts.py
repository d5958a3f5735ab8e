"""The routed experts one rank holds, stacked, run as ONE grouped computation per MoE layer.

Legend: N rows, K top-k, X = N x K (row, k) choices, D hidden, I expert intermediate size, E experts (global),
L experts held here (local), M choices sorted by local expert.

    (x_ND, topk_ids_NK, topk_weights_NK, use_NK)
      --local_of_global_E[ids] (-1: not held); unused or not held -> L (a spare group, never computed)-->
        key_X
      --ONE stable argsort of key_X--> order_M; group ends offs_L = searchsorted(sorted keys, 1..L) (no sync)
      --x_ND[row of order_M]--> x_MD
      --grouped matmul with gate_up_proj [L, 2I, D] --> silu(gate) * up --> grouped matmul with down_proj
        [L, D, I]--> out_MD   (torch._grouped_mm where the device / dtype / strides allow, else a padded bmm)
      --weight (dtype rule below), back to (row, k) order, zero where not computed--> y_NKD

The weights are transformers' fused layout (gate rows first), so a fused checkpoint slices straight in and
the hub's per-expert tensors are stacked once, at load time (epserve/model/loader.py).

Weighting (``weights_in_model_dtype``, the family's transformers rule): True: w is cast to the model dtype
and multiplies the expert output there; False (Mixtral, DeepSeek): out x w in float32, cast to the model dtype.

No host sync and no Python loop over experts: group sizes come from ``searchsorted`` on the sorted keys
(``bincount`` on CUDA reads its max on the host). A choice whose expert is not held gives 0, silently:
``MoEBlock.check_loaded`` (a host sync; the Runner runs it only in the dispatcher's ``check_splits`` debug
mode) raises ExpertNotLoadedError for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class ExpertNotLoadedError(LookupError):
    """A token needs an expert that this rank did not load: a placement / dispatch bug, never user input."""


class GroupedExperts(nn.Module):
    """SwiGLU experts ``expert_ids`` (global ids, ascending) of one MoE layer, stacked by local index."""

    def __init__(self, hidden_size: int, intermediate_size: int, expert_ids: Iterable[int], num_experts: int
                 ) -> None:
        super().__init__()
        ids = tuple(sorted(int(e) for e in expert_ids))
        if len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
            raise ValueError(f"expert ids {list(ids)} must be distinct and in [0, {num_experts})")
        self.expert_ids = ids
        L, D, I = len(ids), hidden_size, intermediate_size
        self.intermediate_size = I
        self.gate_up_proj = nn.Parameter(torch.empty(L, 2 * I, D))   # rows [0, I): gate, [I, 2I): up
        self.down_proj = nn.Parameter(torch.empty(L, D, I))
        # built on the CPU even under a meta-device context (computed, never loaded); the loader moves it
        local_E = torch.full((num_experts,), -1, dtype=torch.long, device="cpu")
        local_E[list(ids)] = torch.arange(L, device="cpu")
        self.register_buffer("local_of_global_E", local_E, persistent=False)

    @classmethod
    def from_stacked(cls, expert_ids: Iterable[int], gate_up_LFD: torch.Tensor, down_LDI: torch.Tensor,
                     num_experts: int) -> "GroupedExperts":
        """Experts whose stacked weights are already in place (live re-placement: epserve/engine/replace.py);
        ``expert_ids`` ascending, rows in that order."""
        L, D, I = down_LDI.shape
        with torch.device("meta"):
            module = cls(D, I, expert_ids, num_experts)
        if gate_up_LFD.shape != (L, 2 * I, D) or len(module) != L:
            raise ValueError(f"stacked weights {tuple(gate_up_LFD.shape)} / {tuple(down_LDI.shape)} do not hold "
                             f"the {len(module)} experts {list(module.expert_ids)}")
        module.gate_up_proj = nn.Parameter(gate_up_LFD, requires_grad=False)
        module.down_proj = nn.Parameter(down_LDI, requires_grad=False)
        return module.to(down_LDI.device)   # the global -> local table (built on the CPU)

    def __len__(self) -> int:
        return len(self.expert_ids)

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Views of global expert ``e``'s weights in the hub's per-expert names (tests, benchmarks)."""
        j, I = self.expert_ids.index(e), self.intermediate_size
        return {"gate_proj.weight": self.gate_up_proj[j, :I], "up_proj.weight": self.gate_up_proj[j, I:],
                "down_proj.weight": self.down_proj[j]}

    # ---- the hot path -------------------------------------------------------------------------------------
    def weighted_outputs(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor,
                         use_NK: torch.Tensor, *, weights_in_model_dtype: bool) -> torch.Tensor:
        """y_NKD[n, k] = w_nk * expert[id_nk](x_n) where use_NK and the expert is held here, else 0 (x's dtype)."""
        N, K = topk_ids_NK.shape
        D, L = x_ND.shape[-1], len(self.expert_ids)
        if L == 0 or N == 0:
            return x_ND.new_zeros(N, K, D)
        table_E = self.local_of_global_E
        local_X = table_E[topk_ids_NK.reshape(-1)]
        live_X = use_NK.reshape(-1).to(torch.bool) & (local_X >= 0)
        key_X = torch.where(live_X, local_X, L)                       # L: the spare group, never computed
        sorted_M, order_M = torch.sort(key_X, stable=True)
        ends_L = torch.searchsorted(sorted_M, torch.arange(1, L + 1, device=key_X.device, dtype=key_X.dtype))
        x_MD = x_ND[order_M // K]
        out_MD = _swiglu_grouped(x_MD, self.gate_up_proj, self.down_proj, sorted_M, ends_L, capacity=N)
        w_M = topk_weights_NK.reshape(-1)[order_M]
        if weights_in_model_dtype:
            w_M = w_M.to(out_MD.dtype)
        y_MD = (out_MD * w_M[:, None]).to(x_ND.dtype)
        inverse_X = torch.empty_like(order_M)
        inverse_X[order_M] = torch.arange(order_M.shape[0], device=order_M.device)
        y_XD = torch.where(live_X[:, None], y_MD[inverse_X], 0)      # the spare group's rows are garbage
        return y_XD.view(N, K, D)

    # ---- debug ---------------------------------------------------------------------------------------------
    def missing_expert(self, topk_ids_NK: torch.Tensor, use_NK: torch.Tensor) -> int | None:
        """A used expert id that is not held here, or None. Host sync: debug paths only."""
        bad_X = use_NK.reshape(-1).to(torch.bool) & (self.local_of_global_E[topk_ids_NK.reshape(-1)] < 0)
        bad = topk_ids_NK.reshape(-1)[bad_X]
        return int(bad.min()) if bad.numel() else None   # host sync (debug)


def _swiglu_grouped(x_MD: torch.Tensor, gate_up_LFD: torch.Tensor, down_LDI: torch.Tensor,
                    sorted_M: torch.Tensor, ends_L: torch.Tensor, *, capacity: int) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with each row's expert given by its sorted group; rows past ends_L[-1]
    hold garbage. ``capacity``: no group has more rows (N: a row chooses an expert at most once)."""
    I = down_LDI.shape[-1]
    if grouped_mm_supported(x_MD, gate_up_LFD, down_LDI):
        offs_L = ends_L.to(torch.int32)
        gu_MF = torch._grouped_mm(x_MD, gate_up_LFD.transpose(-2, -1), offs=offs_L)
        h_MI = (F.silu(gu_MF[:, :I]) * gu_MF[:, I:]).contiguous()
        return torch._grouped_mm(h_MI, down_LDI.transpose(-2, -1), offs=offs_L)
    return _swiglu_padded(x_MD, gate_up_LFD, down_LDI, sorted_M, ends_L, capacity)


def grouped_mm_supported(x_MD: torch.Tensor, gate_up_LFD: torch.Tensor, down_LDI: torch.Tensor) -> bool:
    """torch._grouped_mm runs here without a host sync: it exists, the device / dtype pair has a kernel (CPU:
    any float; CUDA: bfloat16 on compute capability 9.x / 10.x, its CUTLASS path; elsewhere on CUDA torch
    falls back to a loop that reads ``offs`` on the host), every row stride is a multiple of 16 bytes and the
    data is 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dev = x_MD.device
    if dev.type == "cuda":
        if x_MD.dtype is not torch.bfloat16 or torch.cuda.get_device_capability(dev)[0] not in (9, 10):
            return False
    elif dev.type != "cpu":
        return False
    size = x_MD.element_size()
    D, I = x_MD.shape[-1], down_LDI.shape[-1]
    return ((D * size) % 16 == 0 and (I * size) % 16 == 0 and gate_up_LFD.is_contiguous()
            and down_LDI.is_contiguous() and all(t.data_ptr() % 16 == 0 for t in (x_MD, gate_up_LFD, down_LDI)))


def _swiglu_padded(x_MD: torch.Tensor, gate_up_LFD: torch.Tensor, down_LDI: torch.Tensor,
                   sorted_M: torch.Tensor, ends_L: torch.Tensor, C: int) -> torch.Tensor:
    """The fallback: rows into a zero-padded [L, C, D] batch (C: the most rows a group can have, known
    without a host sync), one bmm per projection, rows back. Memory L x C x (D + 2I)."""
    M, D = x_MD.shape
    L, I = down_LDI.shape[0], down_LDI.shape[-1]
    starts_L = torch.cat([ends_L.new_zeros(1), ends_L[:-1]])
    group_M = sorted_M.clamp(max=L - 1)
    pos_M = torch.arange(M, device=x_MD.device) - starts_L[group_M]
    live_M = (sorted_M < L) & (pos_M < C)
    slot_M = torch.where(live_M, group_M * C + pos_M, L * C)            # L * C: a spare slot
    x_PD = x_MD.new_zeros(L * C + 1, D).index_copy_(0, slot_M, x_MD)  # (duplicates: the spare slot only)
    gu_LCF = torch.bmm(x_PD[:-1].view(L, C, D), gate_up_LFD.transpose(-2, -1))
    h_LCI = F.silu(gu_LCF[..., :I]) * gu_LCF[..., I:]
    out_PD = torch.bmm(h_LCI, down_LDI.transpose(-2, -1)).reshape(L * C, D)
    return out_PD[slot_M.clamp(max=L * C - 1)]
