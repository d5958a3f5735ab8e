"""Dense building blocks of the MoE decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLPs.

Legend: T query tokens, S key tokens, D hidden, H heads, Hkv kv heads, d head_dim, I intermediate, N rows.

Attention is split so the runtime can put a KV cache (and a network) between its steps:

    x_TD --project_qkv: q/k/v proj (+bias) -> [FULL q/k norm] -> [clip] -> reshape -> [PER_HEAD q/k norm]
                        -> rotary(positions_T)--> q_THd, k_THkvd, v_THkvd
    (q_THd, cached k_SHkvd / v_SHkvd) --attend: causal within a sequence, GQA--> o_THd
    o_THd --output: o_proj (+bias)--> x_TD

The math (dtypes, order of the casts) follows transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epserve.model.config import ModelConfig, QKNorm


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back before the weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        dtype = x_ND.dtype
        x32_ND = x_ND.to(torch.float32)
        x32_ND = x32_ND * torch.rsqrt(x32_ND.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_ND.to(dtype)


class RotaryEmbedding(nn.Module):
    """Plain rotary position embeddings (no scaling), rotate-half convention."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # Built on the CPU even under a meta-device context: it is computed, never loaded.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._last = None

    def rope_cos_sin(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_Td, sin_Td) in float32 for integer positions. The last result is kept for the same positions
        tensor: every layer of a step passes the one tensor of its attention context (computed once, not per
        layer)."""
        last = self._last
        if last is not None and last[0] is positions_T:
            return last[1], last[2]
        cos_Td, sin_Td = self._cos_sin(positions_T)
        self._last = (positions_T, cos_Td, sin_Td)
        return cos_Td, sin_Td

    def _cos_sin(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_Th = positions_T[:, None].float() * self.inv_freq.to(positions_T.device)[None, :]
        emb_Td = torch.cat((freqs_Th, freqs_Th), dim=-1)
        return emb_Td.cos(), emb_Td.sin()


def apply_rotary(x_TXd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate every head of x (X heads) by its token's angle."""
    cos_T1d = cos_Td.to(x_TXd.dtype)[:, None, :]
    sin_T1d = sin_Td.to(x_TXd.dtype)[:, None, :]
    half = x_TXd.shape[-1] // 2
    rotated_TXd = torch.cat((-x_TXd[..., half:], x_TXd[..., :half]), dim=-1)
    return x_TXd * cos_T1d + rotated_TXd * sin_T1d


def attend(q_THd: torch.Tensor, k_SHkvd: torch.Tensor, v_SHkvd: torch.Tensor, q_positions_T: torch.Tensor,
           k_positions_S: torch.Tensor, q_seq_T: torch.Tensor, k_seq_S: torch.Tensor) -> torch.Tensor:
    """Causal attention within a sequence: query t sees key s iff q_seq[t] == k_seq[s] and
    k_pos[s] <= q_pos[t]. Keys may come from several sequences (a batch, or a KV cache); every query must see
    at least its own key (a query that sees nothing gives NaN). Softmax in float32, as transformers' eager
    attention. Returns o_THd in q's dtype."""
    H, Hkv, d = q_THd.shape[1], k_SHkvd.shape[1], q_THd.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads")
    k_SHd = k_SHkvd.repeat_interleave(H // Hkv, dim=1)
    v_SHd = v_SHkvd.repeat_interleave(H // Hkv, dim=1)
    scores_HTS = torch.einsum("thd,shd->hts", q_THd, k_SHd) * d ** -0.5
    allowed_TS = (q_seq_T[:, None] == k_seq_S[None, :]) & (k_positions_S[None, :] <= q_positions_T[:, None])
    scores_HTS = scores_HTS.masked_fill(~allowed_TS[None], float("-inf"))
    probs_HTS = torch.softmax(scores_HTS, dim=-1, dtype=torch.float32).to(q_THd.dtype)
    return torch.einsum("hts,shd->thd", probs_HTS, v_SHd)


class Attention(nn.Module):
    """Projections of one attention layer; ``attend`` (above) does the mixing between tokens in the one-process
    forward, epserve/engine/paged_attention.py over the runtime's paged KV cache."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        D, H, Hkv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.softmax_scale = d ** -0.5   # what paged attention scales the scores by (attend's rule)
        self.value_dim = d               # width of the values (MLAttention: the latent's first columns)
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        self.q_proj = nn.Linear(D, H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, Hkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, Hkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=config.o_bias)
        if config.qk_norm is QKNorm.PER_HEAD:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        elif config.qk_norm is QKNorm.FULL:
            self.q_norm = RMSNorm(H * d, config.rms_norm_eps)
            self.k_norm = RMSNorm(Hkv * d, config.rms_norm_eps)
        self.rotary = rotary  # shared by every layer; holds no weights
        self.tp_slices = None  # tensor-parallel shard of a FULL q/k norm layer: (q columns, k columns) kept

    def project_qkv(self, x_TD: torch.Tensor, positions_T: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_THd, k_THkvd, v_THkvd with the q/k norm and the rotary embedding applied."""
        T = x_TD.shape[0]
        q_TX, k_TX, v_TX = self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD)
        if self.qk_norm is QKNorm.FULL:
            q_TX, k_TX = self.q_norm(q_TX), self.k_norm(k_TX)
            if self.tp_slices is not None:   # the norm saw every head; this rank keeps its own (epserve/model/tp.py)
                q_TX, k_TX = q_TX[:, self.tp_slices[0]], k_TX[:, self.tp_slices[1]]
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q_TX, k_TX, v_TX = q_TX.clamp(-c, c), k_TX.clamp(-c, c), v_TX.clamp(-c, c)
        q_THd = q_TX.reshape(T, self.num_heads, self.head_dim)
        k_THkvd = k_TX.reshape(T, self.num_kv_heads, self.head_dim)
        v_THkvd = v_TX.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm is QKNorm.PER_HEAD:
            q_THd, k_THkvd = self.q_norm(q_THd), self.k_norm(k_THkvd)
        cos_Td, sin_Td = self.rotary.rope_cos_sin(positions_T)
        return apply_rotary(q_THd, cos_Td, sin_Td), apply_rotary(k_THkvd, cos_Td, sin_Td), v_THkvd

    def output(self, o_THd: torch.Tensor) -> torch.Tensor:
        return self.o_proj(o_THd.reshape(o_THd.shape[0], -1))


class ExpertMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). One routed expert (or the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class DenseMLP(ExpertMLP):
    """The SwiGLU MLP of a non-MoE decoder layer (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``)."""
