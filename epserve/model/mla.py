"""Multi-head latent attention (MLA, DeepSeek-V2/V3), run in its absorbed form over a cached latent.

Legend: T query tokens, S key tokens, D hidden, H heads, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim,
C kv_lora_rank (the latent), Q q_lora_rank.

    x_TD --q: q_proj, or q_a_proj -> RMSNorm -> q_b_proj--> q_THn (no rotary) | q_THr (rotary)
    x_TD --kv_a_proj_with_mqa--> latent_TC (-> RMSNorm) | k_Tr (rotary; ONE key shared by every head)
    absorb: q_THC = q_THn @ W_UK[h]  (W_UK, W_UV: the two halves of kv_b_proj, never applied to the cache)
    --project_qkv--> query q_TH(C+r) = [q_THC | q_THr], cached row k_T1(C+r) = [latent_TC | k_Tr], no V tensor
    --attention over the cached rows (one KV head; values = the first C columns of each row), scale
        (n + r)^-0.5 x YaRN's mscale^2 --> o_THC
    --output: o_THv = o_THC @ W_UV[h]^T --o_proj--> x_TD

So the KV cache and coherent EP's K/V copies carry C + r values per token-layer (576 for DeepSeek-V3 against a
hidden size of 7168), never the expanded per-head keys and values. Scores equal transformers' expanded form
q_n . (W_UK c) + q_r . k_r up to float rounding (the agreement tests hold logits within 1e-5 in float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from epserve.model.config import ModelConfig
from epserve.model.layers import RMSNorm


class MLARotary(nn.Module):
    """Rotary angles of MLA's decoupled rotary dims: plain, or YaRN-scaled (transformers' yarn rule), with
    YaRN's attention factor folded into cos / sin as transformers does."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config.qk_rope_head_dim, config.rope_theta,
                                                        config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = config.rope_interleave
        self._last = None

    def rope_cos_sin(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_Th, sin_Th) in float32, one angle per rotated pair (h = r / 2); the last result is kept for the
        same positions tensor (every layer of a step passes its attention context's one tensor)."""
        if self._last is not None and self._last[0] is positions_T:
            return self._last[1], self._last[2]
        freqs_Th = positions_T[:, None].float() * self.inv_freq.to(positions_T.device)[None, :]
        cos_Th, sin_Th = freqs_Th.cos() * self.attention_factor, freqs_Th.sin() * self.attention_factor
        self._last = (positions_T, cos_Th, sin_Th)
        return cos_Th, sin_Th

    def rotate(self, x_TXr: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor) -> torch.Tensor:
        """Rotate each head's r dims. Interleaved pairs (x0, x1), (x2, x3)... (DeepSeek's layout) come out as
        [rotated evens | rotated odds] (transformers' V3 layout; q and k get the same permutation, so their dot
        product is that of V2's interleaved output); else rotate-half pairs (i, i + r/2)."""
        cos, sin = cos_Th.to(x_TXr.dtype)[:, None, :], sin_Th.to(x_TXr.dtype)[:, None, :]
        if self.interleave:
            a, b = x_TXr[..., 0::2], x_TXr[..., 1::2]
        else:
            half = x_TXr.shape[-1] // 2
            a, b = x_TXr[..., :half], x_TXr[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2] float32, attention factor). ``scaling``: YaRN parameters (see config_deepseek.py)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
    if scaling is None:
        return 1.0 / pos_freqs, 1.0
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class MLAttention(nn.Module):
    """MLA's projections; the attention itself runs over cached latent rows (one KV head, values = the first
    ``value_dim`` columns of each row). Parameter names are the checkpoint's (self_attn.<name>)."""

    def __init__(self, config: ModelConfig, rotary: MLARotary) -> None:
        super().__init__()
        D, H = config.hidden_size, config.num_heads
        n, r, v, C = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        self.num_heads, self.nope, self.rope, self.v_dim, self.latent = H, n, r, v, C
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (n + r), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.o_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * (n + r), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + r, bias=config.o_bias)
        self.kv_a_layernorm = RMSNorm(C, 1e-6)
        self.kv_b_proj = nn.Linear(C, H * (n + v), bias=False)
        self.o_proj = nn.Linear(H * v, D, bias=config.o_bias)
        self.q_lora = config.q_lora_rank is not None
        scale = (n + r) ** -0.5
        if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        self.softmax_scale = scale
        self.value_dim = C         # values are the first C columns of a cached row
        self.rotary = rotary       # shared by every layer; holds no weights

    def _w_uk_w_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, n, C] and W_UV [H, v, C]: views of kv_b_proj's weight (no copy)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent)
        return w[:, :self.nope], w[:, self.nope:]

    def project_qkv(self, x_TD: torch.Tensor, positions_T: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(q_TH(C+r) in the latent space, cached row k_T1(C+r), None: no value tensor)."""
        T = x_TD.shape[0]
        q_TX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_TD))) if self.q_lora else self.q_proj(x_TD)
        q_THx = q_TX.view(T, self.num_heads, self.nope + self.rope)
        q_nope_THn, q_pe_THr = q_THx[..., :self.nope], q_THx[..., self.nope:]
        kv_TX = self.kv_a_proj_with_mqa(x_TD)
        latent_TC = self.kv_a_layernorm(kv_TX[:, :self.latent])
        k_pe_T1r = kv_TX[:, None, self.latent:]
        cos, sin = self.rotary.rope_cos_sin(positions_T)
        q_pe_THr, k_pe_T1r = self.rotary.rotate(q_pe_THr, cos, sin), self.rotary.rotate(k_pe_T1r, cos, sin)
        w_uk_HnC, _ = self._w_uk_w_uv()
        q_THC = torch.einsum("thn,hnc->thc", q_nope_THn, w_uk_HnC)
        return torch.cat((q_THC, q_pe_THr), dim=-1), torch.cat((latent_TC[:, None], k_pe_T1r), dim=-1), None

    def output(self, o_THC: torch.Tensor) -> torch.Tensor:
        _, w_uv_HvC = self._w_uk_w_uv()
        o_THv = torch.einsum("thc,hvc->thv", o_THC, w_uv_HvC)
        return self.o_proj(o_THv.reshape(o_THv.shape[0], -1))


def latent_attend(q_THx: torch.Tensor, row_S1x: torch.Tensor, value_dim: int, scale: float,
                  q_positions_T: torch.Tensor, k_positions_S: torch.Tensor, q_seq_T: torch.Tensor,
                  k_seq_S: torch.Tensor) -> torch.Tensor:
    """Dense reference attention over latent rows (the one-process forward): query t sees key s iff same
    sequence and k_pos <= q_pos; softmax in float32 (transformers' eager rule). Returns o_THC (C = value_dim)."""
    scores_HTS = torch.einsum("thx,sx->hts", q_THx, row_S1x[:, 0]) * scale
    allowed_TS = (q_seq_T[:, None] == k_seq_S[None, :]) & (k_positions_S[None, :] <= q_positions_T[:, None])
    scores_HTS = scores_HTS.masked_fill(~allowed_TS[None], float("-inf"))
    probs_HTS = torch.softmax(scores_HTS, dim=-1, dtype=torch.float32).to(q_THx.dtype)
    return torch.einsum("hts,sc->thc", probs_HTS, row_S1x[:, 0, :value_dim])
