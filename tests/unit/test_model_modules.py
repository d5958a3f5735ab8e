"""The model's pieces, checked against hand-computed values and naive references."""

from __future__ import annotations

import math

import pytest
import torch

from epserve.model import (ModelConfig, ModelFamily, MoEModel, RMSNorm, RotaryEmbedding, Router, apply_rotary,
                           attend, load_model)

G = torch.Generator().manual_seed(0)


def tiny_config(**kw) -> ModelConfig:
    base = dict(family=ModelFamily.QWEN2_MOE, vocab_size=16, hidden_size=4, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=2, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=64,
                num_experts=4, top_k=2, moe_intermediate_size=4, norm_topk_prob=False, moe_layer_ids=(0,))
    return ModelConfig(**dict(base, **kw))


@pytest.mark.parametrize("family, norm_topk_prob, top_k, ids, weights", [
    (ModelFamily.QWEN2_MOE, False, 2, [2, 1], [0.5, 0.25]),
    (ModelFamily.QWEN2_MOE, True, 2, [2, 1], [2 / 3, 1 / 3]),
    (ModelFamily.MIXTRAL, False, 2, [2, 1], [2 / 3, 1 / 3]),   # Mixtral always renormalises
    (ModelFamily.OLMOE, False, 1, [2], [0.5]),
    (ModelFamily.OLMOE, True, 1, [2], [1.0]),
])
def test_router_rule(family, norm_topk_prob, top_k, ids, weights):
    router = Router(tiny_config(family=family, norm_topk_prob=norm_topk_prob, top_k=top_k))
    with torch.no_grad():  # logits = log([1, 2, 4, 1]) for x = e_0: probabilities 1/8, 2/8, 4/8, 1/8
        router.weight.zero_()
        router.weight[:, 0] = torch.log(torch.tensor([1.0, 2.0, 4.0, 1.0]))
    w_TK, ids_TK = router.route(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert ids_TK.dtype == torch.int64 and w_TK.dtype == torch.float32
    assert ids_TK.tolist() == [ids]
    assert w_TK[0].tolist() == pytest.approx(weights, abs=1e-6)


def test_rmsnorm_value():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    rms = math.sqrt((9 + 16) / 2)
    assert norm(torch.tensor([[3.0, 4.0]])).tolist()[0] == pytest.approx([3 / rms, 8 / rms])


def test_rotary_is_a_rotation_with_relative_dot_products():
    rope = RotaryEmbedding(8, 1e4)
    cos, sin = rope.rope_cos_sin(torch.tensor([0]))
    assert torch.equal(cos, torch.ones(1, 8)) and torch.equal(sin, torch.zeros(1, 8))
    q, k = torch.randn(1, 1, 8, generator=G), torch.randn(1, 1, 8, generator=G)

    def dot(p, s):
        qp = apply_rotary(q, *rope.rope_cos_sin(torch.tensor([p])))
        ks = apply_rotary(k, *rope.rope_cos_sin(torch.tensor([s])))
        return (qp * ks).sum().item()

    assert dot(7, 3) == pytest.approx(dot(4, 0), rel=1e-5)
    assert dot(7, 3) != pytest.approx(dot(7, 2), rel=1e-3)
    assert apply_rotary(q, *rope.rope_cos_sin(torch.tensor([5]))).norm().item() == pytest.approx(q.norm().item())


def test_attend_matches_naive_per_sequence_attention_with_gqa():
    H, Hkv, d = 4, 2, 8
    # two sequences of lengths 5 and 3, keys given in a shuffled order (as a KV cache might hold them)
    seq_S = torch.tensor([0] * 5 + [1] * 3)
    pos_S = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    perm = torch.randperm(8, generator=G)
    q_THd = torch.randn(8, H, d, generator=G)
    k_SHkvd, v_SHkvd = torch.randn(8, Hkv, d, generator=G), torch.randn(8, Hkv, d, generator=G)
    o_THd = attend(q_THd, k_SHkvd[perm], v_SHkvd[perm], pos_S, pos_S[perm], seq_S, seq_S[perm])
    for t in range(8):
        for h in range(H):
            keys = [s for s in range(8) if seq_S[s] == seq_S[t] and pos_S[s] <= pos_S[t]]
            scores = torch.stack([q_THd[t, h] @ k_SHkvd[s, h // 2] for s in keys]) / math.sqrt(d)
            expected = sum(p * v_SHkvd[s, h // 2] for p, s in zip(torch.softmax(scores, 0), keys))
            assert torch.allclose(o_THd[t, h], expected, atol=1e-6)


@pytest.fixture(scope="module")
def qwen2(tiny_checkpoint):
    return load_model(tiny_checkpoint(ModelFamily.QWEN2_MOE))[0]


def test_prefill_then_decode_with_cached_kv_matches_the_full_forward(qwen2):
    """The runtime's pattern: the pieces (project_qkv, attend over cached K/V, output, MoE) reproduce the
    one-process forward for a token decoded after a cached prompt."""
    ids = [5, 9, 33, 2, 71, 8]
    model = qwen2
    cache = {}  # layer -> (k_SHkvd, v_SHkvd) of the prompt
    x_TD = model.embed_tokens(torch.tensor(ids[:-1]))
    pos, seq = torch.arange(5), torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        for layer in model.layers:
            q, k, v = layer.attn.project_qkv(layer.input_norm(x_TD), pos)
            cache[layer.layer] = (k, v)
            x_TD = x_TD + layer.attn.output(attend(q, k, v, pos, pos, seq, seq))
            x_TD = x_TD + layer.mlp(layer.post_attn_norm(x_TD))
        x_1D = model.embed_tokens(torch.tensor(ids[-1:]))
        p1 = torch.tensor([5])
        for layer in model.layers:
            q, k, v = layer.attn.project_qkv(layer.input_norm(x_1D), p1)
            k_all, v_all = torch.cat([cache[layer.layer][0], k]), torch.cat([cache[layer.layer][1], v])
            x_1D = x_1D + layer.attn.output(attend(q, k_all, v_all, p1, torch.arange(6), seq[:1],
                                                   torch.zeros(6, dtype=torch.long)))
            h_1D = layer.post_attn_norm(x_1D)
            if layer.moe_index is None:
                x_1D = x_1D + layer.mlp(h_1D)
            else:
                w, e = layer.mlp.router.route(h_1D)
                x_1D = x_1D + layer.mlp.local_weighted_sum(h_1D, e, w, torch.ones_like(e, dtype=torch.bool)) \
                    + layer.mlp.shared_output(h_1D)
        logits_V = model.lm_head(model.norm(x_1D))[0]
    assert torch.allclose(logits_V, model.forward_full(torch.tensor([ids]))[0, -1], atol=1e-5)


def test_greedy_reference_batches_and_stops_at_eos(qwen2):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41]]
    together = qwen2.greedy_reference(prompts, 6)
    assert together == [qwen2.greedy_reference([p], 6)[0] for p in prompts]
    first = together[0]
    eos = first[2]
    cut = first.index(eos) + 1
    stopped = qwen2.greedy_reference(prompts[:1], 6, eos_token_ids=[eos])
    assert stopped == [first[:cut]] and len(stopped[0]) <= 3


def test_routing_is_recorded_per_moe_layer(qwen2):
    routing = []
    qwen2.forward_flat(torch.tensor([3, 4, 5]), torch.arange(3), torch.zeros(3, dtype=torch.long), routing)
    assert len(routing) == qwen2.config.num_moe_layers == 2
    ids_TK, w_TK = routing[0]
    assert ids_TK.shape == w_TK.shape == (3, 2)
    assert (w_TK[:, 0] >= w_TK[:, 1]).all()


def test_model_without_loader_has_every_expert():
    model = MoEModel(tiny_config(num_layers=2, moe_layer_ids=(1,), dense_intermediate_size=6,
                                 shared_expert_intermediate_size=3))
    assert model.loaded_experts == {0: (0, 1, 2, 3)}
    assert model.layers[0].moe_index is None and model.layers[1].moe_index == 0
    assert model.forward_full(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)
