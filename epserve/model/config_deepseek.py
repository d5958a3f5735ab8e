"""The DeepSeek-V2 / V3 part of reading a Hugging Face ``config.json`` (Kimi-K2 and similar reuse deepseek_v3).

    config dict --deepseek_fields--> keyword arguments of ModelConfig:
        MLA (q LoRA or plain q_proj, kv latent + decoupled rotary key, YaRN), routers (V2: softmax, greedy or
        group_limited_greedy, never renormalised; V3: sigmoid + e_score_correction_bias, noaux_tc, norm_topk_prob),
        routed_scaling_factor, ungated shared experts (n_shared_experts x moe_intermediate_size),
        dense layers [0, first_k_dense_replace) then every moe_layer_freq-th layer

Inconsistent group settings are refused by field name: n_routed_experts not divisible by n_group, topk_group
> n_group, num_experts_per_tok larger than the experts of topk_group groups.
"""

from __future__ import annotations

import math

from epserve.model.config import AttentionKind, CheckpointError, RouterScoring, TopkMethod

V2, V3 = "deepseek_v2", "deepseek_v3"

# transformers' defaults (configuration_deepseek_v2.py / _v3.py) for keys that do not fix a tensor shape
DEFAULTS = {
    V2: dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=2048,
             bos_token_id=100000, eos_token_id=100001, attention_bias=False, mlp_bias=False, first_k_dense_replace=0,
             moe_layer_freq=1, n_group=None, topk_group=None, topk_method="greedy", norm_topk_prob=False,
             routed_scaling_factor=1.0, n_shared_experts=None, q_lora_rank=None, rope_interleave=True),
    V3: dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=4096,
             bos_token_id=0, eos_token_id=1, attention_bias=False, first_k_dense_replace=3, moe_layer_freq=1,
             n_group=8, topk_group=4, topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
             n_shared_experts=1, q_lora_rank=1536, rope_interleave=True, num_nextn_predict_layers=1),
}
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate")


def deepseek_fields(d: dict, cfg, *, model_type: str) -> dict:
    """ModelConfig keyword arguments of a DeepSeek-V2/V3 config (``cfg``: the typed reader of config.py)."""
    if cfg.raw("mlp_bias") if model_type == V2 else False:
        raise CheckpointError("mlp_bias=true is not supported (the experts carry no bias)")
    num_layers = cfg.int("num_hidden_layers")
    E = cfg.int_alias(("n_routed_experts", "num_local_experts"))
    top_k = cfg.int("num_experts_per_tok")
    method = TopkMethod(_choice(cfg, "topk_method", ("greedy", "group_limited_greedy", "noaux_tc")))
    if model_type == V2 and method is TopkMethod.NOAUX_TC:
        raise CheckpointError("topk_method='noaux_tc' is a deepseek_v3 router (deepseek_v2 has greedy and "
                              "group_limited_greedy)")
    if model_type == V3 and cfg.raw_or("scoring_func", "sigmoid") != "sigmoid":
        raise CheckpointError(f"scoring_func={d['scoring_func']!r} is not supported for deepseek_v3 (sigmoid)")
    grouped = model_type == V3 or method is TopkMethod.GROUP_LIMITED_GREEDY
    n_group = cfg.int("n_group") if grouped else 1
    topk_group = cfg.int("topk_group") if grouped else 1
    if grouped:
        if E % n_group:
            raise CheckpointError(f"n_routed_experts={E} is not divisible by n_group={n_group}")
        if topk_group > n_group:
            raise CheckpointError(f"topk_group={topk_group} is larger than n_group={n_group}")
        if top_k > topk_group * (E // n_group):
            raise CheckpointError(f"num_experts_per_tok={top_k} is larger than the {topk_group * (E // n_group)} "
                                  f"experts of topk_group={topk_group} groups of {E // n_group}")
        if model_type == V3 and E // n_group < 2:
            raise CheckpointError(f"n_group={n_group} leaves fewer than 2 experts per group (noaux_tc ranks a "
                                  f"group by its top-2 sum)")
    first_dense = cfg.int("first_k_dense_replace", minimum=0)
    freq = cfg.int("moe_layer_freq")
    moe_layer_ids = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
    if not moe_layer_ids:
        raise CheckpointError(f"no MoE layer: first_k_dense_replace={first_dense} / moe_layer_freq={freq} leave "
                              f"every one of the {num_layers} layers dense")
    shared = cfg.int("n_shared_experts", nullable=True, minimum=0) or 0
    moe_width = cfg.int("moe_intermediate_size")
    rope_dim, nope_dim = cfg.int("qk_rope_head_dim"), cfg.int("qk_nope_head_dim", minimum=0)
    heads = cfg.int("num_attention_heads")
    return dict(
        num_heads=heads, num_kv_heads=heads, head_dim=rope_dim,
        num_experts=E, top_k=top_k, moe_intermediate_size=moe_width,
        norm_topk_prob=model_type == V3 and cfg.bool("norm_topk_prob"),   # V2's router never renormalises
        moe_layer_ids=moe_layer_ids,
        dense_intermediate_size=cfg.int("intermediate_size") if len(moe_layer_ids) < num_layers else 0,
        shared_expert_intermediate_size=shared * moe_width, shared_expert_gated=False,
        qkv_bias=False, o_bias=cfg.bool("attention_bias"),
        scoring=RouterScoring.SIGMOID if model_type == V3 else RouterScoring.SOFTMAX,
        topk_method=method, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=cfg.float("routed_scaling_factor"), score_correction_bias=model_type == V3,
        router_in_float32=True,
        attention=AttentionKind.MLA, q_lora_rank=cfg.int("q_lora_rank", nullable=True),
        kv_lora_rank=cfg.int("kv_lora_rank"), qk_nope_head_dim=nope_dim, qk_rope_head_dim=rope_dim,
        v_head_dim=cfg.int("v_head_dim"),
        rope_interleave=True if model_type == V2 else cfg.bool("rope_interleave"),
        rope_scaling=_yarn(d, cfg),
    )


def extra_layers(d: dict, model_type: str) -> int:
    """Layers a checkpoint may carry beyond num_hidden_layers that inference ignores (V3's multi-token
    prediction layers, as transformers ignores them)."""
    if model_type != V3:
        return 0
    n = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", DEFAULTS[V3]["num_nextn_predict_layers"]))
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _choice(cfg, key: str, allowed: tuple[str, ...]) -> str:
    value = cfg.raw(key)
    if value not in allowed:
        raise CheckpointError(f"config field '{key}' must be one of {list(allowed)}, got {value!r}")
    return value


def _yarn(d: dict, cfg) -> dict | None:
    """YaRN parameters from rope_parameters (transformers 5) or rope_scaling (older files); None: plain rotary."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_parameters must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise CheckpointError(f"rope_parameters.rope_type={kind!r} is not supported for DeepSeek (default, yarn)")
    out = {k: rope[k] for k in _YARN_KEYS if rope.get(k) is not None}
    for key in ("original_max_position_embeddings",):
        if key not in out:
            raise CheckpointError(f"rope_parameters.{key} is missing (YaRN needs it)")
    if "factor" not in out:
        out["factor"] = cfg.int("max_position_embeddings") / out["original_max_position_embeddings"]
    for key, value in out.items():
        if key == "truncate":
            if not isinstance(value, bool):
                raise CheckpointError(f"rope_parameters.truncate must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"rope_parameters.{key} must be a number > 0, got {value!r}")
    return out
