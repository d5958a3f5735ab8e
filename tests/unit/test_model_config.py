"""ModelConfig.from_hf: the family rules of transformers, read from config dicts."""

from __future__ import annotations

import math

import pytest

from epserve.model import CheckpointError, ModelConfig, ModelFamily, QKNorm, hub_tensor_shapes

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


# config.json of four public hub checkpoints, as published (transformers-4 era files)
HUB = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000},
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
        "model_type": "qwen2_moe", "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06, "rope_theta": 1e6, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001},
    "Qwen/Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1e6, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "allenai/OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304},
}


@pytest.mark.parametrize("repo, params, tensor, shape", [
    # parameter counts as transformers counts them (and as the model cards round them: 46.7B, 14.3B, 30.5B, 6.9B)
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, "model.layers.31.block_sparse_moe.experts.7.w2.weight",
     (4096, 14336)),
    ("Qwen/Qwen1.5-MoE-A2.7B", 14_315_784_192, "model.layers.0.self_attn.q_proj.bias", (2048,)),
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624, "model.layers.47.self_attn.q_norm.weight", (128,)),
    ("allenai/OLMoE-1B-7B-0924", 6_919_161_856, "model.layers.0.self_attn.k_norm.weight", (2048,)),
])
def test_real_hub_configs_give_the_published_tensors(repo, params, tensor, shape):
    shapes = hub_tensor_shapes(ModelConfig.from_hf(HUB[repo]))
    assert sum(math.prod(s) for s in shapes.values()) == params
    assert shapes[tensor] == shape
