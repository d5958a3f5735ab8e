"""Our one-process model agrees with transformers' own implementation of each family.

Tiny random checkpoints (tests/tiny_models.py), float32: logits on a right-padded batch of different lengths
within 1e-5, and greedy generations identical token for token (HF generate(do_sample=False) vs
greedy_reference). The cases cover top-1 / top-2, norm_topk_prob true / false, the shared expert, dense
layers (mlp_only_layers, decoder_sparse_step), q/k/v(/o) biases, both q/k norms, clip_qkv, a head_dim that is
not hidden/heads, tied embeddings and the fused expert layout.
"""

from __future__ import annotations

import pytest
import torch

from epserve.model import ModelFamily, load_model
from tests.tiny_models import load_hf_model

M, Q2, Q3, OL = ModelFamily.MIXTRAL, ModelFamily.QWEN2_MOE, ModelFamily.QWEN3_MOE, ModelFamily.OLMOE
DS2, DS3 = ModelFamily.DEEPSEEK_V2, ModelFamily.DEEPSEEK_V3
CASES = {
    "mixtral-top2": (M, {}),
    "mixtral-top1-fused": (M, dict(num_experts_per_tok=1, fused_experts=True, seed=1)),
    # shared expert, dense layer 1, q/k/v bias, no renormalisation
    "qwen2-top2-shared-dense": (Q2, {}),
    "qwen2-top1-norm-sparse-step": (Q2, dict(num_experts_per_tok=1, norm_topk_prob=True, mlp_only_layers=[],
                                             decoder_sparse_step=2, num_hidden_layers=4, seed=2)),
    "qwen2-top2-fused-no-bias": (Q2, dict(qkv_bias=False, fused_experts=True, seed=3)),
    # per-head q/k norm, head_dim 16 != 32/4
    "qwen3-top2-norm": (Q3, {}),
    "qwen3-top2-bias-tied-dense": (Q3, dict(norm_topk_prob=False, attention_bias=True, tie_word_embeddings=True,
                                            mlp_only_layers=[0], seed=4)),
    # q/k norm over the whole projection
    "olmoe-top2": (OL, {}),
    "olmoe-top1-clip-bias-norm": (OL, dict(num_experts_per_tok=1, clip_qkv=0.5, attention_bias=True,
                                           norm_topk_prob=True, num_key_value_heads=4, seed=5)),
    # top-8 of 16: sums of 8 partial outputs
    "qwen3-top8": (Q3, dict(num_experts=16, num_experts_per_tok=8, seed=6)),
    # MLA without q LoRA, softmax group-limited top-2, shared expert, first layer dense
    "deepseek-v2": (DS2, {}),
    "deepseek-v2-greedy-yarn": (DS2, dict(topk_method="greedy", seed=7, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=0.707,
        mscale_all_dim=0.707))),
    # MLA with q LoRA, sigmoid top-4 with the choice bias, noaux_tc groups, routed scaling 2.5
    "deepseek-v3": (DS3, {}),
    "deepseek-v3-rotate-half-fused": (DS3, dict(rope_interleave=False, fused_experts=True, norm_topk_prob=False,
                                                seed=8)),
}


def _batch():
    """Three rows of lengths 13, 9 and 4, right-padded with a real token id (so padding must be masked)."""
    g = torch.Generator().manual_seed(123)
    ids_BS = torch.randint(0, 128, (3, 13), generator=g)
    mask_BS = torch.ones(3, 13, dtype=torch.long)
    mask_BS[1, 9:] = 0
    mask_BS[2, 4:] = 0
    return ids_BS, mask_BS


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    cache = {}

    def get(case):
        if case not in cache:
            family, overrides = CASES[case]
            ckpt = tiny_checkpoint(family, **overrides)
            cache[case] = (load_hf_model(ckpt), load_model(ckpt)[0])
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, case):
    hf, ours = models(case)
    ids_BS, mask_BS = _batch()
    with torch.no_grad():
        ref_BSV = hf(input_ids=ids_BS, attention_mask=mask_BS).logits
    got_BSV = ours.forward_full(ids_BS, mask_BS)
    valid = mask_BS.bool()
    assert got_BSV.shape == ref_BSV.shape == (3, 13, 128)
    err = (got_BSV[valid] - ref_BSV[valid]).abs().max().item()
    assert err < 1e-5, f"{case}: max |ours - transformers| = {err:.3g}"
    # the logits are not degenerate: they differ between positions far more than the tolerance
    assert ref_BSV[valid].std(0).mean().item() > 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(models, case):
    hf, ours = models(case)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [100, 2], [64, 65, 66, 67, 68]]
    n_new = 8
    expected = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    got = ours.greedy_reference(prompts, n_new)
    assert got == expected
    assert all(len(e) == n_new for e in expected)  # no EOS stop on either side


@pytest.mark.parametrize("case, disable", [
    ("olmoe-top1-clip-bias-norm", "clip_qkv"),
    ("qwen2-top2-shared-dense", "shared_expert"),
    ("qwen3-top2-norm", "renormalise"),
    ("mixtral-top2", "renormalise"),
])
def test_each_feature_matters(models, case, disable):
    """The agreement above is not vacuous: turning one feature off in our model breaks it."""
    hf, _ = models(case)
    family, overrides = CASES[case]
    ours = load_model(hf.name_or_path)[0]
    for layer in ours.layers:
        if disable == "clip_qkv":
            layer.attn.clip_qkv = None
        elif layer.moe_index is not None and disable == "shared_expert":
            layer.mlp.shared_expert = None
        elif layer.moe_index is not None:
            layer.mlp.router.renormalise = not layer.mlp.router.renormalise
    ids_BS, mask_BS = _batch()
    with torch.no_grad():
        ref_BSV = hf(input_ids=ids_BS, attention_mask=mask_BS).logits
    err = (ours.forward_full(ids_BS, mask_BS) - ref_BSV)[mask_BS.bool()].abs().max().item()
    assert err > 1e-2


@pytest.mark.parametrize("case", ["mixtral-top2", "qwen2-top2-shared-dense", "qwen3-top2-norm", "olmoe-top2"])
def test_bfloat16_is_bitwise_transformers_eager(tiny_checkpoint, case):
    """In bfloat16 our forward rounds exactly where transformers' eager attention + eager experts do (top-2:
    two terms, so its expert-order index_add and our k-order sum agree)."""
    from transformers import AutoModelForCausalLM

    family, overrides = CASES[case]
    ckpt = tiny_checkpoint(family, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    ours = load_model(ckpt, dtype=torch.bfloat16)[0]
    ids_BS, mask_BS = _batch()
    with torch.no_grad():
        ref_BSV = hf(input_ids=ids_BS, attention_mask=mask_BS).logits
    assert torch.equal(ours.forward_full(ids_BS, mask_BS)[mask_BS.bool()], ref_BSV[mask_BS.bool()])


# ---- bfloat16 -------------------------------------------------------------------------------------------------
# transformers 5.x runs experts with grouped_mm and sums the k weighted outputs in float32 before one rounding,
# as we do; with its eager attention our bfloat16 logits are then the same bits for the families whose router
# weights are cast to the model dtype. Mixtral and DeepSeek keep float32 weighted outputs until that sum (we
# round each weighted output to bfloat16 first, so a top-2 partial sum can cross the network in bfloat16), and
# DeepSeek's absorbed MLA rounds differently from the expanded form: those agree within bfloat16 rounding only.
BF16_BITWISE = ["qwen2-top2-shared-dense", "qwen3-top2-norm", "qwen3-top8", "olmoe-top2"]


@pytest.mark.parametrize("case", BF16_BITWISE)
def test_bfloat16_logits_are_transformers_bits(tiny_checkpoint, case):
    from transformers import AutoModelForCausalLM

    family, overrides = CASES[case]
    ckpt = tiny_checkpoint(family, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = load_model(ckpt, dtype=torch.bfloat16)[0]
    ids_BS, mask_BS = _batch()
    with torch.no_grad():
        ref_BSV = hf(input_ids=ids_BS, attention_mask=mask_BS).logits
    got_BSV = ours.forward_full(ids_BS, mask_BS)
    valid = mask_BS.bool()
    assert got_BSV.dtype == torch.bfloat16
    assert torch.equal(got_BSV[valid], ref_BSV[valid]), case
