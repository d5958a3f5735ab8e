"""Routers against transformers' own DeepSeek-V2 / V3 routers (the same ids as a set, the same float32 weight
per id), and the order we return: by weight, highest first, ties by lower id."""

from __future__ import annotations

import pytest
import torch

from epserve.model import ModelConfig, ModelFamily, MoEModel, Router
from epserve.model.config import RouterScoring, TopkMethod

E, D, K, T = 16, 32, 4, 64


def our_config(**kw) -> ModelConfig:
    base = dict(family=ModelFamily.QWEN3_MOE, vocab_size=16, hidden_size=D, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=64,
                num_experts=E, top_k=K, moe_intermediate_size=8, norm_topk_prob=False, moe_layer_ids=(0,),
                n_group=4, topk_group=2, router_in_float32=True)
    return ModelConfig(**dict(base, **kw))


def hf_v2(topk_method: str, scaling: float):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                           topk_method=topk_method, routed_scaling_factor=scaling)
    return DeepseekV2TopkRouter(cfg)


def hf_v3(norm: bool, scaling: float):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                           norm_topk_prob=norm, routed_scaling_factor=scaling)
    return DeepseekV3TopkRouter(cfg)


def randomise(hf, ours, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g) * 0.3)
        ours.weight.copy_(hf.weight)
        if getattr(hf, "e_score_correction_bias", None) is not None:
            hf.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
            ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    return torch.randn(T, D, generator=g)


def assert_same_choice(ours_w_TK, ours_ids_TK, hf_w_TK, hf_ids_TK):
    for t in range(T):
        mine = dict(zip(ours_ids_TK[t].tolist(), ours_w_TK[t].tolist()))
        theirs = dict(zip(hf_ids_TK[t].tolist(), hf_w_TK[t].tolist()))
        assert mine == theirs, f"token {t}"   # the same ids, and bit-identical float32 weights per id
    assert_ordered(ours_w_TK, ours_ids_TK)


def assert_ordered(w_TK, ids_TK):
    w0, w1, i0, i1 = w_TK[:, :-1], w_TK[:, 1:], ids_TK[:, :-1], ids_TK[:, 1:]
    assert ((w0 > w1) | ((w0 == w1) & (i0 < i1))).all()


@pytest.mark.parametrize("method", [TopkMethod.GREEDY, TopkMethod.GROUP_LIMITED_GREEDY])
@pytest.mark.parametrize("scaling", [1.0, 16.0])
def test_deepseek_v2_router(method, scaling):
    hf = hf_v2(method.value, scaling)
    ours = Router(our_config(topk_method=method, routed_scaling_factor=scaling))
    for seed in range(3):
        x_TD = randomise(hf, ours, seed)
        _, hf_w, hf_ids = hf(x_TD)
        w, ids = ours.route(x_TD)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64
        assert_same_choice(w, ids, hf_w, hf_ids)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_deepseek_v3_router(norm, scaling):
    hf = hf_v3(norm, scaling)
    ours = Router(our_config(scoring=RouterScoring.SIGMOID, topk_method=TopkMethod.NOAUX_TC, norm_topk_prob=norm,
                             score_correction_bias=True, routed_scaling_factor=scaling))
    assert ours.e_score_correction_bias.dtype == torch.float32
    for seed in range(3):
        x_TD = randomise(hf, ours, seed)
        _, hf_w, hf_ids = hf(x_TD)
        w, ids = ours.route(x_TD)
        assert_same_choice(w, ids, hf_w, hf_ids)


def test_group_limit_and_choice_bias_matter():
    """Hand-made scores: V3's bias moves the choice but not the weights; groups outside the top 2 are never
    chosen even when one of their experts scores higher than a chosen one."""
    cfg = our_config(scoring=RouterScoring.SIGMOID, topk_method=TopkMethod.NOAUX_TC, norm_topk_prob=False,
                     score_correction_bias=True, top_k=2)
    router = Router(cfg)
    logits_E = torch.full((E,), -4.0)
    logits_E[[0, 1]] = torch.tensor([2.0, 1.8])   # group 0: top-2 sum 1.74
    logits_E[[4, 5]] = 1.0     # group 1: with the bias on 5, the best group
    logits_E[8] = 3.0          # group 2: the strongest unbiased expert, but its group's top-2 sum is 0.97
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = logits_E
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[5] = 2.0   # makes expert 5 the first choice, weighed unbiased
    x_1D = torch.zeros(1, D)
    x_1D[0, 0] = 1.0
    w, ids = router.route(x_1D)
    assert ids.tolist() == [[0, 5]]     # not 8 (its group is out); by weight: sigmoid(2) > sigmoid(1)
    assert w[0].tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item(),
                                           torch.sigmoid(torch.tensor(1.0)).item()], abs=0)


def test_ties_are_ordered_by_lower_id():
    router = Router(our_config(n_group=1, topk_group=1, router_in_float32=False))
    with torch.no_grad():
        router.weight.zero_()   # every expert scores 1/16
    w, ids = router.route(torch.randn(5, D))
    assert_ordered(w, ids)
    assert (w == 1 / 16).all()


def test_deepseek_shared_expert_is_ungated():
    cfg = our_config(shared_expert_intermediate_size=16, shared_expert_gated=False)
    names = MoEModel(cfg).state_dict().keys()
    assert "layers.0.mlp.shared_expert.gate_proj.weight" in names
    assert not any("shared_expert_gate" in n for n in names)
    block = MoEModel(cfg).layers[0].mlp
    x_TD = torch.randn(3, D)
    torch.nn.init.normal_(block.shared_expert.down_proj.weight)
    assert torch.equal(block.shared_output(x_TD), block.shared_expert(x_TD))
    gated = our_config(shared_expert_intermediate_size=16)
    assert "layers.0.mlp.shared_expert_gate.weight" in MoEModel(gated).state_dict()
