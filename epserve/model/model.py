"""MoEModel: the generic MoE decoder and its one-process reference forward.

Legend: B batch rows, S columns (padded length), T flattened tokens, D hidden, V vocab, K top-k.

    input_ids_BS --flatten (positions = column, seq = row; a pad token is a sequence of its own)--> ids_T
      --embed_tokens--> x_TD
      --for each DecoderLayer:  x += attn(input_norm(x))      (attend over every token of the batch)
                                x += mlp(post_attn_norm(x))   (MoEBlock or DenseMLP)
      --norm--> --lm_head--> logits_TV --unflatten--> logits_BSV

``forward_full`` is what the Hugging Face agreement tests compare with transformers; ``greedy_reference``
(full recompute every step, no KV cache) is THE one-process reference every lossless test compares with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from epserve.model.config import AttentionKind, ModelConfig
from epserve.model.layers import Attention, DenseMLP, RMSNorm, RotaryEmbedding, attend
from epserve.model.mla import MLARotary, MLAttention, latent_attend
from epserve.model.moe import MoEBlock


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding | MLARotary,
                 expert_ids: Iterable[int] | None) -> None:
        super().__init__()
        self.layer = layer
        self.moe_index = config.moe_index(layer)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLAttention(config, rotary) if config.attention is AttentionKind.MLA else Attention(config, rotary)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.moe_index is None:
            self.mlp = DenseMLP(config.hidden_size, config.dense_intermediate_size)
        else:
            ids = range(config.num_experts) if expert_ids is None else expert_ids
            self.mlp = MoEBlock(config, moe_index=self.moe_index, layer=layer, expert_ids=ids)

    def forward(self, x_TD: torch.Tensor, positions_T: torch.Tensor, seq_T: torch.Tensor,
                routing_out: list | None = None) -> torch.Tensor:
        """One-process layer over a set of whole sequences (no KV cache)."""
        q_THd, k_THkvd, v_THkvd = self.attn.project_qkv(self.input_norm(x_TD), positions_T)
        if v_THkvd is None:   # MLA: one cached latent row per token, values are its first columns
            o_THd = latent_attend(q_THd, k_THkvd, self.attn.value_dim, self.attn.softmax_scale, positions_T,
                                  positions_T, seq_T, seq_T)
        else:
            o_THd = attend(q_THd, k_THkvd, v_THkvd, positions_T, positions_T, seq_T, seq_T)
        x_TD = x_TD + self.attn.output(o_THd)
        h_TD = self.post_attn_norm(x_TD)
        mlp_TD = self.mlp(h_TD) if self.moe_index is None else self.mlp(h_TD, routing_out)
        return x_TD + mlp_TD


class MoEModel(nn.Module):
    def __init__(self, config: ModelConfig, *, experts: Mapping[int, Iterable[int]] | None = None) -> None:
        """``experts[moe_index]``: global expert ids held in that MoE layer (None, or a missing layer: all)."""
        super().__init__()
        self.config = config
        # Weights always come from a checkpoint. Passing the tensor skips nn.Embedding's random init, which
        # on the meta device imports torch._dynamo (2.5-5 s per spawned rank).
        V, D = config.vocab_size, config.hidden_size
        self.embed_tokens = nn.Embedding(V, D, _weight=torch.empty(V, D))
        self.rotary = MLARotary(config) if config.attention is AttentionKind.MLA else \
            RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rotary,
                         None if experts is None or config.moe_index(i) is None else experts.get(config.moe_index(i)))
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def loaded_experts(self) -> dict[int, tuple[int, ...]]:
        """moe_index -> global expert ids held, ascending."""
        return {layer.moe_index: layer.mlp.expert_ids for layer in self.layers if layer.moe_index is not None}

    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks in MoE-layer order (index i = Placement row i)."""
        return [layer.mlp for layer in self.layers if layer.moe_index is not None]

    # ---- the one-process reference -----------------------------------------------------------------------
    @torch.no_grad()
    def forward_flat(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, seq_T: torch.Tensor,
                     routing_out: list | None = None) -> torch.Tensor:
        """logits_TV for whole sequences given token by token (every expert must be held). With
        ``routing_out`` (a list), (topk_ids_TK, topk_weights_TK) of every MoE layer is appended in order."""
        x_TD = self.embed_tokens(input_ids_T)
        for layer in self.layers:
            x_TD = layer(x_TD, positions_T, seq_T, routing_out)
        return self.lm_head(self.norm(x_TD))

    @torch.no_grad()
    def forward_full(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """logits_BSV of a right-padded batch, causal within each row; padded columns hold meaningless
        logits. Positions are column indices (transformers' default when no position_ids are given)."""
        B, S = input_ids_BS.shape
        device = input_ids_BS.device
        positions_BS = torch.arange(S, device=device).expand(B, S)
        seq_BS = torch.arange(B, device=device)[:, None].expand(B, S)
        if attention_mask_BS is not None:
            if attention_mask_BS.shape != (B, S):
                raise ValueError(f"attention_mask shape {tuple(attention_mask_BS.shape)} != input_ids shape "
                                 f"{(B, S)}")
            # A pad token is a sequence of its own: no real token sees it, and it sees only itself.
            pad_seq_BS = B + torch.arange(B * S, device=device).view(B, S)
            seq_BS = torch.where(attention_mask_BS.bool(), seq_BS, pad_seq_BS)
        logits_TV = self.forward_flat(input_ids_BS.reshape(-1), positions_BS.reshape(-1), seq_BS.reshape(-1))
        return logits_TV.view(B, S, -1)

    @torch.no_grad()
    def greedy_reference(self, prompts: list[list[int]], max_new_tokens: int, *,
                         eos_token_ids: Iterable[int] = ()) -> list[list[int]]:
        """Greedy continuation of every prompt: the new tokens only (an EOS in ``eos_token_ids`` is kept and
        ends that prompt). Recomputes the whole forward every step: slow, obviously right."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("greedy_reference needs at least one prompt, and no empty prompt")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        eos = set(eos_token_ids)
        device = self.embed_tokens.weight.device
        seqs = [list(p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            if not live:
                break
            S = max(len(seqs[i]) for i in live)
            ids_BS = torch.zeros(len(live), S, dtype=torch.long, device=device)
            mask_BS = torch.zeros(len(live), S, dtype=torch.long, device=device)
            for row, i in enumerate(live):
                ids_BS[row, :len(seqs[i])] = torch.tensor(seqs[i], device=device)
                mask_BS[row, :len(seqs[i])] = 1
            logits_BSV = self.forward_full(ids_BS, mask_BS)
            last_B = torch.tensor([len(seqs[i]) - 1 for i in live], device=device)
            next_B = logits_BSV[torch.arange(len(live), device=device), last_B].argmax(-1).tolist()
            for i, tok in zip(live, next_B):
                seqs[i].append(tok)
                out[i].append(tok)
            live = [i for i in live if out[i][-1] not in eos]
        return out
