"""MLA (DeepSeek-V2/V3) in its absorbed form against transformers' expanded attention, layer by layer: the same
weights, random inputs, float32; plus YaRN's frequencies and attention factor against transformers' rule."""

from __future__ import annotations

import pytest
import torch

from epserve.model.config import ModelConfig, ModelFamily
from epserve.model.mla import MLARotary, MLAttention, latent_attend, rope_inv_freq
from tests.tiny_models import hf_config

pytest.importorskip("transformers")


def _pair(family: ModelFamily, **overrides):
    """(transformers' attention of layer 0 and its rotary, ours with the same weights, our config)."""
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as v3

    hf_cfg = hf_config(family, **overrides)
    hf_cfg._attn_implementation = "eager"
    mod = v2 if family is ModelFamily.DEEPSEEK_V2 else v3
    cls = mod.DeepseekV2Attention if family is ModelFamily.DEEPSEEK_V2 else mod.DeepseekV3Attention
    rot_cls = mod.DeepseekV2RotaryEmbedding if family is ModelFamily.DEEPSEEK_V2 else mod.DeepseekV3RotaryEmbedding
    torch.manual_seed(0)
    theirs = cls(hf_cfg, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    config = ModelConfig.from_hf(hf_cfg.to_dict())
    ours = MLAttention(config, MLARotary(config)).eval()
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys
    return theirs, rot_cls(hf_cfg), ours, config


def _hf_out(theirs, rotary, x_BSD):
    B, S, _ = x_BSD.shape
    pos = torch.arange(S)[None].expand(B, S)
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None].expand(B, 1, S, S)
    return theirs(x_BSD, attention_mask=mask, position_embeddings=rotary(x_BSD, pos))[0]


def _our_out(ours, x_BSD):
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    pos_T = torch.arange(S).repeat(B)
    seq_T = torch.arange(B).repeat_interleave(S)
    q, row, v = ours.project_qkv(x_TD, pos_T)
    assert v is None and row.shape == (B * S, 1, ours.latent + ours.rope)
    o = latent_attend(q, row, ours.value_dim, ours.softmax_scale, pos_T, pos_T, seq_T, seq_T)
    return ours.output(o).view(B, S, D)


@pytest.mark.parametrize("family,overrides", [
    (ModelFamily.DEEPSEEK_V2, {}),
    (ModelFamily.DEEPSEEK_V3, {}),
    (ModelFamily.DEEPSEEK_V3, {"rope_interleave": False, "q_lora_rank": None}),
    (ModelFamily.DEEPSEEK_V3, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 32, "beta_fast": 32,
                                                   "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    (ModelFamily.DEEPSEEK_V2, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                   "original_max_position_embeddings": 16, "mscale": 0.707,
                                                   "mscale_all_dim": 0.707}}),
])
def test_absorbed_mla_equals_transformers_expanded(family, overrides):
    theirs, rotary, ours, _ = _pair(family, **overrides)
    x_BSD = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_our_out(ours, x_BSD), _hf_out(theirs, rotary, x_BSD), atol=1e-5, rtol=1e-5)


def test_yarn_frequencies_and_factor_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf_cfg = hf_config(ModelFamily.DEEPSEEK_V3, qk_rope_head_dim=64, max_position_embeddings=163840,
                       rope_parameters=rope)
    theirs_freq, theirs_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    config = ModelConfig.from_hf(hf_cfg.to_dict())
    ours_freq, ours_factor = rope_inv_freq(64, 10000.0, config.rope_scaling)
    torch.testing.assert_close(ours_freq, theirs_freq, atol=0, rtol=0)
    assert ours_factor == pytest.approx(theirs_factor, abs=0)
