"""ModelConfig.from_hf: the family rules of transformers, read from config dicts."""

from __future__ import annotations

import pytest

from epserve.model import CheckpointError, ModelConfig, ModelFamily, QKNorm

BASE = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, rope_theta=5e5, rms_norm_eps=1e-6)


def qwen2(**kw):
    return dict(BASE, model_type="qwen2_moe", num_experts=8, moe_intermediate_size=16, intermediate_size=64,
                shared_expert_intermediate_size=24, **kw)


def test_qwen2_dense_layers_from_decoder_sparse_step_and_mlp_only_layers():
    cfg = ModelConfig.from_hf(qwen2(decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layer_ids == (1,)
    cfg = ModelConfig.from_hf(qwen2(decoder_sparse_step=1, mlp_only_layers=[0, 2]))
    assert cfg.moe_layer_ids == (1, 3) and cfg.dense_layer_ids == (0, 2)
    assert [cfg.moe_index(i) for i in range(4)] == [None, 0, None, 1]
    assert cfg.num_moe_layers == 2 and cfg.dense_intermediate_size == 64
    assert cfg.shared_expert_intermediate_size == 24
    assert cfg.qkv_bias and not cfg.o_bias  # transformers' Qwen2-MoE default: q/k/v bias on
    assert not cfg.renormalise_topk and cfg.weights_in_model_dtype


def test_old_style_hub_config_fields():
    """transformers-4 style files: top-level rope_theta, rope_scaling null, head_dim null, eos list."""
    d = dict(BASE, model_type="mixtral", num_local_experts=8, intermediate_size=48, rope_scaling=None,
             head_dim=None, eos_token_id=[2, 7], norm_topk_prob=False, sliding_window=None)
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.head_dim == 8
    assert cfg.eos_token_id == (2, 7) and cfg.eos_token_ids == (2, 7)
    assert cfg.bos_token_id == 1  # Mixtral's default when the file gives none
    assert cfg.renormalise_topk  # Mixtral renormalises whatever the file says
    assert cfg.moe_layer_ids == (0, 1, 2, 3) and cfg.dense_intermediate_size == 0


def test_v5_rope_parameters_and_aliases():
    d = dict(BASE, model_type="qwen3_moe", num_local_experts=8, moe_intermediate_size=16, head_dim=16,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6}, norm_topk_prob=True, attention_bias=True)
    d.pop("rope_theta")
    cfg = ModelConfig.from_hf(d)
    assert (cfg.num_experts, cfg.rope_theta, cfg.head_dim, cfg.qk_norm) == (8, 1e6, 16, QKNorm.PER_HEAD)
    assert cfg.qkv_bias and cfg.o_bias and cfg.renormalise_topk
    assert cfg.eos_token_ids == ()


def test_olmoe_defaults():
    d = dict(BASE, model_type="olmoe", num_experts=8, intermediate_size=16, clip_qkv=8)
    del d["num_key_value_heads"], d["rope_theta"]
    cfg = ModelConfig.from_hf(d)
    assert cfg.family is ModelFamily.OLMOE and cfg.qk_norm is QKNorm.FULL
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.clip_qkv, cfg.eos_token_id) == (4, 1e4, 8.0, 50279)


def test_direct_construction_is_validated():
    kw = dict(family=ModelFamily.MIXTRAL, vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
              head_dim=4, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64, num_experts=4, top_k=2,
              moe_intermediate_size=8, norm_topk_prob=True, moe_layer_ids=(0, 1))
    assert ModelConfig(**kw).num_moe_layers == 2
    with pytest.raises(CheckpointError, match=r"moe_layer_ids must be ascending, distinct and in \[0, 2\)"):
        ModelConfig(**dict(kw, moe_layer_ids=(1, 0)))
    with pytest.raises(CheckpointError, match=r"layers \[1\] are dense but intermediate_size is 0"):
        ModelConfig(**dict(kw, moe_layer_ids=(0,)))
    with pytest.raises(CheckpointError, match="head_dim=3 must be even"):
        ModelConfig(**dict(kw, head_dim=3))
