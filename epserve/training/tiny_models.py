"""Tiny random Hugging Face MoE checkpoints, built offline with transformers (seeded), for the tests and the
benchmarks (dev-only, as all of epserve.training: transformers is imported inside the functions).

    family + overrides --transformers config--> seeded random *ForCausalLM --save_pretrained--> out_dir
    (config.json + model.safetensors in the hub's per-expert layout; or, with fused_experts=True, the
    in-memory fused layout: ...mlp.experts.gate_up_proj [E, 2I, D] / down_proj [E, D, I])

Sizes: hidden 32, 4 heads (2 kv heads), 2-3 layers, 8 experts, top-2, vocab 128. The initialiser std is 0.1
(transformers' 0.02 makes near-uniform logits whose greedy choice hangs on rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from epserve.model.config import ModelFamily

__all__ = ["edit_config", "hf_config", "load_hf_model", "make_tiny_checkpoint"]

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6, tie_word_embeddings=False)
_TINY = {
    ModelFamily.MIXTRAL: dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                              bos_token_id=1, eos_token_id=2),
    ModelFamily.QWEN2_MOE: dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=3,
                                mlp_only_layers=[1], eos_token_id=3),
    ModelFamily.QWEN3_MOE: dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, head_dim=16, eos_token_id=3),
    ModelFamily.OLMOE: dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                            eos_token_id=3, pad_token_id=None),  # OLMoE's pad id 1 zeroes an embedding row
    # DeepSeek: MLA (V3 with a q LoRA, V2 without), group-limited routing, a shared expert, a first dense layer
    ModelFamily.DEEPSEEK_V2: dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                  num_hidden_layers=3, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
                                  topk_method="group_limited_greedy", routed_scaling_factor=1.5, num_key_value_heads=4,
                                  bos_token_id=0, eos_token_id=3),
    ModelFamily.DEEPSEEK_V3: dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
                                  num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                                  num_hidden_layers=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                                  qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, num_key_value_heads=4, rope_interleave=True,
                                  bos_token_id=0, eos_token_id=3),
}


def hf_config(family: ModelFamily | str, **overrides):
    """The transformers config of the tiny model (``overrides`` are transformers config keys)."""
    from transformers import AutoConfig

    family = ModelFamily(family)
    kwargs = dict(_COMMON, **_TINY[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family.value, **kwargs)


def make_tiny_checkpoint(family: ModelFamily | str, out_dir: str | Path, *, seed: int = 0,
                         fused_experts: bool = False, **config_overrides) -> Path:
    """Build a seeded random tiny model of ``family`` and save it (float32) to ``out_dir``; returns out_dir."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = hf_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():   # V3's choice bias is zero at init: make it matter
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    if not fused_experts:
        model.save_pretrained(out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def load_hf_model(ckpt_dir: str | Path):
    """transformers' own model of a checkpoint directory (float32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval()


def edit_config(ckpt_dir: str | Path, **changes) -> dict:
    """Rewrite keys of a checkpoint's config.json (a value of ``...`` deletes the key); returns the new dict."""
    path = Path(ckpt_dir) / "config.json"
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d, indent=1))
    return d
