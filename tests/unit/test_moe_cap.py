"""S-MBU / S-MFU counting (epserve/engine/moe_cap.py) against hand-computed values for tiny configs."""

from __future__ import annotations

import numpy as np
import pytest

from epserve.engine import moe_cap
from epserve.model.config import AttentionKind, ModelConfig, ModelFamily


def tiny(**overrides) -> ModelConfig:
    """D 8, 2 layers (both MoE), 2 heads x 4, 1 KV head, 4 experts of width 6, top-2, vocab 16."""
    values = dict(family=ModelFamily.MIXTRAL, vocab_size=16, hidden_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=64,
                  num_experts=4, top_k=2, moe_intermediate_size=6, norm_topk_prob=True, moe_layer_ids=(0, 1))
    values.update(overrides)
    return ModelConfig(**values)


# routing of a 2-token decode step: layer 0 {0,1} + {1,2} -> union {0,1,2}; layer 1 {2,3} + {3,2} -> {2,3}
TOPK_TLK = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 2]]])
CONTEXT = [3, 5]


def test_activated_experts_is_the_union_over_tokens():
    assert moe_cap.activated_experts(TOPK_TLK) == [frozenset({0, 1, 2}), frozenset({2, 3})]


def test_bytes_by_hand():
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, norms 2x8 = 16, router 4x8 = 32; + final norm 8
    # experts: 5 activated (3 + 2) x 3 x 8 x 6 = 720; embedding 2 distinct rows x 8 = 16; lm_head 16 x 8 = 128
    # K/V: (3 + 5) keys x 2 layers x (2 x 1 x 4) values x 4 B = 512
    got = moe_cap.decode_step_bytes(tiny(), moe_cap.activated_experts(TOPK_TLK), CONTEXT, dtype_bytes=4,
                                    token_ids=[5, 7])
    assert got == {"experts": 720 * 4, "router": 64 * 4, "shared_expert": 0, "dense_mlp": 0,
                   "attention": (2 * (192 + 16) + 8) * 4, "embedding": 16 * 4, "lm_head": 128 * 4, "kv": 512}
    assert sum(got.values()) == 5920


def test_flops_by_hand():
    # per token: projections 2 x 192 x 2 layers = 768, router 2 x 32 x 2 = 128, experts 2 x 2 x 144 x 2 = 1152,
    # lm_head 2 x 128 = 256 -> 2304 x 2 tokens; scores: 2 layers x (2 + 2) x 2 heads x 4 x (3 + 5) keys = 512
    got = moe_cap.decode_step_flops(tiny(), CONTEXT)
    assert got == {"experts": 2304, "router": 256, "shared_expert": 0, "dense_mlp": 0, "projections": 1536,
                   "scores": 512, "lm_head": 512}
    assert sum(got.values()) == 5120


def test_utilisation_from_counts():
    counts = moe_cap.decode_step_counts(tiny(), moe_cap.activated_experts(TOPK_TLK), CONTEXT, dtype_bytes=4,
                                        token_ids=[5, 7])
    assert moe_cap.s_mbu(counts.bytes, 1e-3, 1e7) == pytest.approx(0.592)
    assert moe_cap.s_mfu(counts.flops, 1e-3, 1e7) == pytest.approx(0.512)


def test_padding_never_counts_only_own_context():
    # one long and one short sequence cost what their own lengths say, not 2 x the longest
    c = tiny()
    long_short = moe_cap.decode_step_flops(c, [100, 1])["scores"]
    assert long_short == 2 * 2 * (2 * 2 * 4) * 101
    assert moe_cap.decode_step_bytes(c, [{0}, {0}], [100, 1], dtype_bytes=2)["kv"] == 101 * 2 * 8 * 2


def test_bf16_halves_weight_bytes_and_repeated_ids_read_one_row():
    c = tiny()
    fp32 = moe_cap.decode_step_bytes(c, [{0}, {1}], [1, 1], dtype_bytes=4, token_ids=[3, 3])
    bf16 = moe_cap.decode_step_bytes(c, [{0}, {1}], [1, 1], dtype_bytes=2, token_ids=[3, 3])
    assert fp32["embedding"] == 8 * 4 and bf16["embedding"] == 8 * 2
    assert all(fp32[k] == 2 * bf16[k] for k in fp32)


def test_dense_layer_shared_expert_and_tied_embedding():
    # layer 0 dense (width 10), layer 1 MoE with a gated shared expert of width 5; tied: no embedding rows
    c = tiny(family=ModelFamily.QWEN2_MOE, moe_layer_ids=(1,), dense_intermediate_size=10,
             shared_expert_intermediate_size=5, tie_word_embeddings=True)
    got = moe_cap.decode_step_bytes(c, [{1, 2}], [4], dtype_bytes=1)
    assert got["dense_mlp"] == 3 * 8 * 10
    assert got["shared_expert"] == 3 * 8 * 5 + 8
    assert got["router"] == 4 * 8 and got["experts"] == 2 * 144 and got["embedding"] == 0
    flops = moe_cap.decode_step_flops(c, [4])
    assert flops["dense_mlp"] == 2 * 3 * 8 * 10 and flops["shared_expert"] == 2 * (3 * 8 * 5 + 8)
    assert flops["experts"] == 2 * 2 * 144


def test_mla_latent_cache_and_absorbed_scores():
    # q 8 -> 2 x (4 + 2); kv_a 8 -> 6 + 2; kv_b 6 -> 2 x (4 + 4); o 2 x 4 -> 8
    c = tiny(attention=AttentionKind.MLA, q_lora_rank=None, kv_lora_rank=6, qk_nope_head_dim=4,
             qk_rope_head_dim=2, v_head_dim=4)
    assert moe_cap.attention_weight_params(c) == 8 * 12 + 8 * 8 + 6 * 16 + 8 * 8
    assert moe_cap.kv_values_per_token_layer(c) == 8
    assert moe_cap.decode_step_flops(c, [3])["scores"] == 2 * 2 * (2 * 8 + 2 * 6) * 3


def test_refusals_name_the_input():
    c = tiny()
    with pytest.raises(ValueError, match="2 MoE layers"):
        moe_cap.decode_step_bytes(c, [{0}], [1], dtype_bytes=4)
    with pytest.raises(ValueError, match="expert 9"):
        moe_cap.decode_step_bytes(c, [{0}, {9}], [1], dtype_bytes=4)
    with pytest.raises(ValueError, match="context_lens"):
        moe_cap.decode_step_flops(c, [0])
    with pytest.raises(ValueError, match="step_s"):
        moe_cap.s_mbu(1.0, 0.0, 1.0)
