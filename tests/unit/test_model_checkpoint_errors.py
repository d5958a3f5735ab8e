"""Every checkpoint we refuse gets a CheckpointError (an InputError) naming the file and the tensor / field."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from epserve.model import CheckpointError, ModelFamily, load_model
from placement.errors import InputError
from tests.tiny_models import edit_config


@pytest.fixture
def mixtral(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint(ModelFamily.MIXTRAL), tmp_path / "mixtral")


def rewrite_tensors(ckpt, change):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def refused(ckpt, pattern, **kwargs):
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model(ckpt, **kwargs)
    assert isinstance(info.value, InputError)
    return str(info.value)


def test_missing_tensor_is_named_even_if_this_rank_does_not_load_it(mixtral):
    name = "model.layers.1.block_sparse_moe.experts.6.w2.weight"
    rewrite_tensors(mixtral, lambda t: t.pop(name))
    refused(mixtral, re.escape(f"tensor '{name}' is missing (looked in model.safetensors)"),
            experts={0: [0], 1: [0]})


def test_wrong_shape_is_named_with_both_shapes(mixtral):
    name = "model.layers.0.self_attn.k_proj.weight"
    file = rewrite_tensors(mixtral, lambda t: t.__setitem__(name, torch.zeros(32, 32)))
    refused(mixtral, re.escape(f"{file}: tensor '{name}' has shape [32, 32], the config implies [16, 32]"))


def test_unexpected_tensor_is_named(mixtral):
    name = "model.layers.0.self_attn.q_proj.bias"
    rewrite_tensors(mixtral, lambda t: t.__setitem__(name, torch.zeros(32)))
    refused(mixtral, re.escape(f"unexpected tensor '{name}': the mixtral model described by config.json has no "
                               f"such weight"))


def test_integer_tensor_is_refused(mixtral):
    name = "model.norm.weight"
    rewrite_tensors(mixtral, lambda t: t.__setitem__(name, torch.ones(32, dtype=torch.int8)))
    refused(mixtral, re.escape(f"tensor '{name}' has dtype I8; only F64/F32/F16/BF16"))


def test_corrupt_and_truncated_safetensors_name_the_file(mixtral):
    file = mixtral / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    refused(mixtral, re.escape(f"{file}: not a readable safetensors file") + ".*file not fully covered")
    file.write_bytes(b"\x00garbage" * 50)
    refused(mixtral, re.escape(f"{file}: not a readable safetensors file"))


def test_no_safetensors_files(mixtral):
    (mixtral / "model.safetensors").rename(mixtral / "pytorch_model.bin")
    refused(mixtral, re.escape(f"{mixtral}: no *.safetensors files"))


def test_index_naming_a_missing_shard(mixtral):
    index = mixtral / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    refused(mixtral, re.escape(f"{index}: names shard 'model-00002-of-00002.safetensors', which is not in"))
    index.write_text("[]")
    refused(mixtral, re.escape(f"{index}: not a valid safetensors index"))


def test_missing_or_broken_config_json(mixtral, tmp_path):
    (mixtral / "config.json").write_text("{not json")
    refused(mixtral, re.escape(f"{mixtral / 'config.json'}: not valid JSON"))
    (mixtral / "config.json").unlink()
    refused(mixtral, re.escape(f"{mixtral / 'config.json'}: not found"))
    refused(tmp_path / "nowhere", "checkpoint directory not found")


@pytest.mark.parametrize("changes, pattern", [
    (dict(model_type="llama"), r"model_type 'llama' is not supported \(supported: mixtral, qwen2_moe, qwen3_moe, "
                               r"olmoe, deepseek_v2, deepseek_v3\)"),
    (dict(model_type=...), r"missing config field 'model_type'"),
    (dict(hidden_size=...), r"missing config field 'hidden_size'"),
    (dict(num_local_experts=...), r"missing config field 'num_experts' \(or 'num_local_experts'\)"),
    (dict(num_experts=6), r"config fields num_experts and num_local_experts disagree"),
    (dict(num_experts_per_tok=0), r"config field 'num_experts_per_tok' must be an integer >= 1, got 0"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 is larger than the number of experts \(8\)"),
    (dict(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    (dict(rms_norm_eps="small"), r"config field 'rms_norm_eps' must be a number, got 'small'"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling=.*linear.* is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
     r"rope_parameters.rope_type='yarn' is not supported"),
    (dict(sliding_window=4096), r"sliding_window=4096: sliding-window attention is not supported"),
    (dict(quantization_config={"quant_method": "gptq"}), r"quantization_config is set"),
])
def test_bad_mixtral_config_is_named(mixtral, changes, pattern):
    edit_config(mixtral, **changes)
    message = refused(mixtral, pattern)
    assert str(mixtral / "config.json") in message


@pytest.mark.parametrize("family, changes, pattern", [
    (ModelFamily.QWEN2_MOE, dict(use_sliding_window=True, max_window_layers=2, layer_types=...),
     r"layer_types: layers \[0\] use sliding-window attention"),
    (ModelFamily.QWEN2_MOE, dict(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     r"layer_types: layers \[1\] use sliding-window attention"),
    (ModelFamily.QWEN2_MOE, dict(shared_expert_intermediate_size=...),
     r"missing config field 'shared_expert_intermediate_size'"),
    (ModelFamily.QWEN2_MOE, dict(mlp_only_layers=[0, 1, 2]), r"no MoE layer"),
    (ModelFamily.QWEN2_MOE, dict(mlp_only_layers=[5]), r"mlp_only_layers holds \[5\], outside \[0, 3\)"),
    (ModelFamily.QWEN2_MOE, dict(intermediate_size=...), r"missing config field 'intermediate_size'"),
    (ModelFamily.QWEN3_MOE, dict(use_sliding_window=True), r"use_sliding_window=true"),
    (ModelFamily.QWEN3_MOE, dict(moe_intermediate_size=...), r"missing config field 'moe_intermediate_size'"),
    (ModelFamily.OLMOE, dict(head_dim=16), r"head_dim=16 is not supported for olmoe"),
    (ModelFamily.OLMOE, dict(clip_qkv=-1.0), r"clip_qkv must be null or a number > 0"),
])
def test_bad_config_of_other_families_is_named(tiny_checkpoint, tmp_path, family, changes, pattern):
    ckpt = shutil.copytree(tiny_checkpoint(family), tmp_path / "ckpt")
    edit_config(ckpt, **changes)
    refused(ckpt, pattern)


def test_config_that_implies_other_shapes_names_the_tensor(tiny_checkpoint, tmp_path):
    """A config whose qkv_bias says true for a checkpoint saved without biases: the missing bias is named."""
    ckpt = shutil.copytree(tiny_checkpoint(ModelFamily.QWEN2_MOE, qkv_bias=False, fused_experts=True, seed=3),
                           tmp_path / "ckpt")
    edit_config(ckpt, qkv_bias=True)
    refused(ckpt, re.escape("tensor 'model.layers.0.self_attn.q_proj.bias' is missing"))
    edit_config(ckpt, qkv_bias=False, moe_intermediate_size=20)
    refused(ckpt, re.escape("tensor 'model.layers.0.mlp.experts.gate_up_proj' has shape [8, 48, 32], the config "
                            "implies [8, 40, 32]"))
    assert json.loads((ckpt / "config.json").read_text())["moe_intermediate_size"] == 20


# ---- DeepSeek-V2/V3: inconsistent group settings, and the dtype we refuse to cast to ------------------------
@pytest.mark.parametrize("changes, pattern", [
    (dict(n_group=3), r"n_routed_experts=16 is not divisible by n_group=3"),
    (dict(topk_group=5), r"topk_group=5 is larger than n_group=4"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 is larger than the 8 experts of topk_group=2 groups"),
    (dict(topk_method="bogus"), r"config field 'topk_method' must be one of"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     r"rope_parameters.rope_type='linear' is not supported for DeepSeek"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}),
     r"rope_parameters.original_max_position_embeddings is missing"),
    (dict(kv_lora_rank=0), r"config field 'kv_lora_rank' must be an integer >= 1"),
])
def test_bad_deepseek_config_is_named(tiny_checkpoint, tmp_path, changes, pattern):
    ckpt = shutil.copytree(tiny_checkpoint(ModelFamily.DEEPSEEK_V3), tmp_path / "v3")
    edit_config(ckpt, **changes)
    refused(ckpt, pattern)


def test_float16_is_refused_for_a_bfloat16_checkpoint(mixtral):
    from epserve.model.loader import resolve_dtype
    edit_config(mixtral, dtype="bfloat16")
    with pytest.raises(CheckpointError, match=r"--dtype float16 cannot hold this bfloat16 checkpoint's range"):
        resolve_dtype("float16", mixtral)
    assert resolve_dtype("auto", mixtral) is torch.bfloat16
    assert resolve_dtype("float32", mixtral) is torch.float32
