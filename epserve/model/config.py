"""ModelConfig: the shape and math of one MoE decoder, read from a Hugging Face ``config.json``.

    config.json --json--> dict --from_hf: family table, required keys, refusals--> ModelConfig (validated)

Four families share one generic decoder (RMSNorm, rotary GQA attention, top-k softmax router, SwiGLU experts):

    family     HF model_type  router renormalises   extras
    MIXTRAL    mixtral        always                -
    QWEN2_MOE  qwen2_moe      iff norm_topk_prob    sigmoid-gated shared expert, q/k/v bias, dense layers
    QWEN3_MOE  qwen3_moe      iff norm_topk_prob    per-head q/k RMSNorm, optional q/k/v/o bias, dense layers
    OLMOE      olmoe          iff norm_topk_prob    q/k RMSNorm over the whole projection, optional clip_qkv
    DEEPSEEK_V2 deepseek_v2   never                 MLA, group-limited softmax router, shared experts, dense layers
    DEEPSEEK_V3 deepseek_v3   iff norm_topk_prob    MLA, sigmoid router with a choice bias, shared experts, dense
                                                    layers (config_deepseek.py reads both DeepSeek families)

Keys that change the math and that we do not implement (rope scaling, sliding-window attention actually in
use, activations other than SiLU, quantised weights) are refused by name; keys the family's reference code
ignores at inference (dropout, aux-loss, jitter, output_router_logits) are ignored. Keys missing from the file
take the value transformers' config class would give them, except the ones that fix tensor shapes, which must
be present.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path

from placement.errors import InputError


class CheckpointError(InputError):
    """A checkpoint directory (config.json, *.safetensors) that we refuse; the message names the file and the
    tensor or config field."""


class ModelFamily(enum.Enum):
    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"
    OLMOE = "olmoe"
    DEEPSEEK_V2 = "deepseek_v2"
    DEEPSEEK_V3 = "deepseek_v3"   # also Kimi-K2 and other models that reuse its architecture


class RouterScoring(enum.Enum):
    SOFTMAX = "softmax"   # Mixtral, Qwen, OLMoE, DeepSeek-V2
    SIGMOID = "sigmoid"   # DeepSeek-V3 (with e_score_correction_bias)


class TopkMethod(enum.Enum):
    GREEDY = "greedy"                            # plain top-k over all experts
    GROUP_LIMITED_GREEDY = "group_limited_greedy"  # DeepSeek-V2: groups ranked by their best expert
    NOAUX_TC = "noaux_tc"                        # DeepSeek-V3: groups ranked by their top-2 sum (biased scores)


class AttentionKind(enum.Enum):
    GQA = "gqa"   # rotary attention with grouped KV heads (caches K and V)
    MLA = "mla"   # DeepSeek's multi-head latent attention (caches the compressed latent + rotary key)


class QKNorm(enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over d, for every head
    FULL = "full"          # OLMoE: RMSNorm over the whole H*d (Hkv*d) projection, before the reshape


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: ModelFamily
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    moe_layer_ids: tuple[int, ...]
    dense_intermediate_size: int = 0          # SwiGLU width of the non-MoE layers (0: every layer is MoE)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    qk_norm: QKNorm = QKNorm.NONE
    qkv_bias: bool = False                    # q/k/v projections carry a bias
    o_bias: bool = False                      # the output projection carries a bias
    clip_qkv: float | None = None             # OLMoE: clamp q, k, v to [-clip, clip] after the q/k norm
    tie_word_embeddings: bool = False
    # routers (DeepSeek-V2/V3 extras; the defaults are the plain softmax top-k of the other families)
    scoring: RouterScoring = RouterScoring.SOFTMAX
    topk_method: TopkMethod = TopkMethod.GREEDY
    n_group: int = 1                          # expert groups (routed experts / n_group per group)
    topk_group: int = 1                       # groups a token may choose its experts from
    routed_scaling_factor: float = 1.0        # multiplies the top-k weights
    score_correction_bias: bool = False       # V3: mlp.gate.e_score_correction_bias [E] biases the choice
    router_in_float32: bool = False           # DeepSeek: router logits from float32 x and weight
    shared_expert_gated: bool = True          # Qwen2-MoE: sigmoid(shared_expert_gate(x)); DeepSeek: no gate
    # attention (MLA: DeepSeek-V2/V3)
    attention: AttentionKind = AttentionKind.GQA
    q_lora_rank: int | None = None            # MLA: None: q_proj directly; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 0                     # MLA: width of the cached latent
    qk_nope_head_dim: int = 0                 # MLA: per-head query/key width without rotary
    qk_rope_head_dim: int = 0                 # MLA: per-head rotary width (one rotary key shared by all heads)
    v_head_dim: int = 0                       # MLA: per-head value width
    rope_interleave: bool = False             # MLA: rotary dims laid out in interleaved pairs
    rope_scaling: dict | None = None          # YaRN parameters (MLA), as in the config file; None: plain rotary
    ignored_extra_layers: int = 0             # V3: multi-token-prediction layers after the last one (not run)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.family, ModelFamily):
            raise CheckpointError(f"family must be a ModelFamily, got {self.family!r}")
        if not isinstance(self.qk_norm, QKNorm):
            raise CheckpointError(f"qk_norm must be a QKNorm, got {self.qk_norm!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings", "num_experts", "top_k", "moe_intermediate_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("dense_intermediate_size", "shared_expert_intermediate_size"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise CheckpointError(f"{name} must be a finite number > 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.top_k > self.num_experts:
            raise CheckpointError(f"num_experts_per_tok={self.top_k} is larger than the number of experts "
                                  f"({self.num_experts})")
        ids = self.moe_layer_ids
        if not isinstance(ids, tuple) or not ids:
            raise CheckpointError(f"moe_layer_ids must be a non-empty tuple of layer indices, got {ids!r}")
        if list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_layers:
            raise CheckpointError(f"moe_layer_ids must be ascending, distinct and in [0, {self.num_layers}), "
                                  f"got {list(ids)}")
        if len(ids) < self.num_layers and self.dense_intermediate_size < 1:
            raise CheckpointError(f"layers {list(self.dense_layer_ids)} are dense but intermediate_size is "
                                  f"{self.dense_intermediate_size}")
        if self.qk_norm is QKNorm.FULL and self.num_heads * self.head_dim != self.hidden_size:
            raise CheckpointError(f"q/k norm over the whole projection needs num_attention_heads x head_dim "
                                  f"({self.num_heads} x {self.head_dim}) == hidden_size ({self.hidden_size})")
        if self.clip_qkv is not None and (isinstance(self.clip_qkv, bool) or
                                          not isinstance(self.clip_qkv, (int, float)) or
                                          not math.isfinite(self.clip_qkv) or self.clip_qkv <= 0):
            raise CheckpointError(f"clip_qkv must be null or a number > 0, got {self.clip_qkv!r}")
        self._check_router_and_mla()
        for tok in (self.bos_token_id, *self.eos_token_ids):
            if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int) or tok < 0):
                raise CheckpointError(f"bos/eos token ids must be integers >= 0, got {tok!r}")

    def _check_router_and_mla(self) -> None:
        for name, kind in (("scoring", RouterScoring), ("topk_method", TopkMethod), ("attention", AttentionKind)):
            if not isinstance(getattr(self, name), kind):
                raise CheckpointError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        _check_int("n_group", self.n_group, minimum=1)
        _check_int("topk_group", self.topk_group, minimum=1)
        if self.num_experts % self.n_group:
            raise CheckpointError(f"n_routed_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise CheckpointError(f"topk_group={self.topk_group} is larger than n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise CheckpointError(f"num_experts_per_tok={self.top_k} is larger than the experts of topk_group="
                                  f"{self.topk_group} groups")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and math.isfinite(self.routed_scaling_factor)
                and self.routed_scaling_factor > 0) or isinstance(self.routed_scaling_factor, bool):
            raise CheckpointError(f"routed_scaling_factor must be a number > 0, got {self.routed_scaling_factor!r}")
        if self.attention is AttentionKind.MLA:
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                _check_int(name, getattr(self, name), minimum=1)
            _check_int("qk_nope_head_dim", self.qk_nope_head_dim, minimum=0)
            if self.q_lora_rank is not None:
                _check_int("q_lora_rank", self.q_lora_rank, minimum=1)
            if self.qk_rope_head_dim % 2:
                raise CheckpointError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings")

    # ---- derived -----------------------------------------------------------------------------------------
    @property
    def is_deepseek(self) -> bool:
        return self.family in (ModelFamily.DEEPSEEK_V2, ModelFamily.DEEPSEEK_V3)

    @property
    def kv_row(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of one token's cached row per attention layer. MLA caches one latent
        row [kv_lora_rank + qk_rope_head_dim] whose first kv_lora_rank columns are also its values (width 0:
        no separate value tensor)."""
        if self.attention is AttentionKind.MLA:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.num_kv_heads, self.head_dim, self.head_dim

    @property
    def kv_values_per_token_layer(self) -> int:
        """Values cached per token and attention layer (K and V together): what coherent EP copies."""
        heads, k, v = self.kv_row
        return heads * (k + v)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        moe = set(self.moe_layer_ids)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def moe_index(self, layer: int) -> int | None:
        """Row of this decoder layer in a Placement / routing trace, or None for a dense layer."""
        try:
            return self.moe_layer_ids.index(layer)
        except ValueError:
            return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def always_renormalise(self) -> bool:
        """Mixtral renormalises its top-k weights unconditionally (it has no norm_topk_prob key)."""
        return self.family is ModelFamily.MIXTRAL

    @property
    def renormalise_topk(self) -> bool:
        return self.always_renormalise or self.norm_topk_prob

    @property
    def weights_in_model_dtype(self) -> bool:
        """Qwen/OLMoE cast the router weights to the model dtype before scaling an expert's output; Mixtral
        scales in float32 and casts the product (transformers' code; identical in float32)."""
        return self.family not in (ModelFamily.MIXTRAL, ModelFamily.DEEPSEEK_V2, ModelFamily.DEEPSEEK_V3)

    # ---- Hugging Face config.json ------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json"
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {path}")
        if not file.is_file():
            raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
        try:
            return cls.from_hf(raw)
        except CheckpointError as exc:
            raise CheckpointError(f"{file}: {exc}") from None

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config dict. Raises CheckpointError naming the offending key."""
        if not isinstance(d, dict):
            raise CheckpointError(f"config must be a JSON object, got {type(d).__name__}")
        if "model_type" not in d:
            raise CheckpointError("missing config field 'model_type'")
        try:
            family = ModelFamily(d["model_type"])
        except ValueError:
            supported = ", ".join(f.value for f in ModelFamily)
            raise CheckpointError(f"model_type {d['model_type']!r} is not supported (supported: {supported})") \
                from None
        if family in (ModelFamily.DEEPSEEK_V2, ModelFamily.DEEPSEEK_V3):
            return cls._from_hf_deepseek(d, family)
        spec = _FAMILIES[family]
        cfg = _Reader(d, spec.defaults)
        _refuse_unsupported(d, family, cfg)

        num_layers = cfg.int("num_hidden_layers")
        hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
        if d.get("num_key_value_heads") is None and ("num_key_value_heads" in d or family is ModelFamily.OLMOE):
            kv_heads = heads  # transformers: null (for OLMoE also a missing key) means no grouping
        else:
            kv_heads = cfg.int("num_key_value_heads")
        head_dim = cfg.int("head_dim", nullable=True) or hidden // heads
        if family is ModelFamily.OLMOE and head_dim != hidden // heads:
            raise CheckpointError(f"head_dim={head_dim} is not supported for olmoe (its q/k norms assume "
                                  f"hidden_size / num_attention_heads = {hidden // heads})")
        num_experts = cfg.int_alias(("num_experts", "num_local_experts"))
        moe_layer_ids = _moe_layer_ids(cfg, family, num_layers)
        dense = len(moe_layer_ids) < num_layers
        if not moe_layer_ids:
            raise CheckpointError("no MoE layer: mlp_only_layers / decoder_sparse_step leave every layer dense")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", spec.rope_theta))
        attention_bias = cfg.bool("attention_bias") if family in (ModelFamily.QWEN3_MOE, ModelFamily.OLMOE) \
            else False
        try:
            return cls(
                family=family, vocab_size=cfg.int("vocab_size"), hidden_size=hidden, num_layers=num_layers,
                num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=float(theta),
                rms_norm_eps=cfg.float("rms_norm_eps"),
                max_position_embeddings=cfg.int("max_position_embeddings"),
                num_experts=num_experts, top_k=cfg.int("num_experts_per_tok"),
                moe_intermediate_size=cfg.int(spec.expert_width_key),
                norm_topk_prob=family is ModelFamily.MIXTRAL or cfg.bool("norm_topk_prob"),
                moe_layer_ids=moe_layer_ids,
                dense_intermediate_size=cfg.int("intermediate_size") if dense else 0,
                shared_expert_intermediate_size=(cfg.int("shared_expert_intermediate_size", minimum=0)
                                                 if family is ModelFamily.QWEN2_MOE else 0),
                qk_norm=spec.qk_norm,
                qkv_bias=cfg.bool("qkv_bias") if family is ModelFamily.QWEN2_MOE else attention_bias,
                o_bias=attention_bias,
                clip_qkv=cfg.float("clip_qkv", nullable=True) if family is ModelFamily.OLMOE else None,
                tie_word_embeddings=cfg.bool("tie_word_embeddings"),
                bos_token_id=cfg.token("bos_token_id"), eos_token_id=cfg.token("eos_token_id", many=True),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"inconsistent config: {exc}") from None


    @classmethod
    def _from_hf_deepseek(cls, d: dict, family: ModelFamily) -> "ModelConfig":
        from epserve.model.config_deepseek import DEFAULTS, deepseek_fields, extra_layers

        cfg = _Reader(d, DEFAULTS[family.value])
        if d.get("quantization_config"):
            raise CheckpointError("quantization_config is set: quantised checkpoints (e.g. DeepSeek-V3's FP8 "
                                  "release) are not supported; use a bf16 conversion")
        if cfg.raw("hidden_act") != "silu":
            raise CheckpointError(f"hidden_act={cfg.raw('hidden_act')!r} is not supported (only 'silu')")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        fields = deepseek_fields(d, cfg, model_type=family.value)
        try:
            return cls(family=family, vocab_size=cfg.int("vocab_size"), hidden_size=cfg.int("hidden_size"),
                       num_layers=cfg.int("num_hidden_layers"), rope_theta=float(theta),
                       rms_norm_eps=cfg.float("rms_norm_eps"),
                       max_position_embeddings=cfg.int("max_position_embeddings"),
                       tie_word_embeddings=cfg.bool("tie_word_embeddings"),
                       bos_token_id=cfg.token("bos_token_id"), eos_token_id=cfg.token("eos_token_id", many=True),
                       ignored_extra_layers=extra_layers(d, family.value), **fields)
        except CheckpointError as exc:
            raise CheckpointError(f"inconsistent config: {exc}") from None


# ---- the family table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FamilySpec:
    expert_width_key: str  # the key holding one routed expert's intermediate size
    qk_norm: QKNorm
    rope_theta: float      # transformers' default when the file gives none
    defaults: dict         # transformers' defaults for keys that do not fix a tensor shape


_COMMON_DEFAULTS = {"hidden_act": "silu", "tie_word_embeddings": False, "norm_topk_prob": False,
                    "decoder_sparse_step": 1, "mlp_only_layers": None, "attention_bias": False,
                    "clip_qkv": None, "head_dim": None, "bos_token_id": None, "eos_token_id": None}
_FAMILIES = {
    ModelFamily.MIXTRAL: _FamilySpec("intermediate_size", QKNorm.NONE, 1e6, dict(
        _COMMON_DEFAULTS, rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2)),
    ModelFamily.QWEN2_MOE: _FamilySpec("moe_intermediate_size", QKNorm.NONE, 1e4, dict(
        _COMMON_DEFAULTS, rms_norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True)),
    ModelFamily.QWEN3_MOE: _FamilySpec("moe_intermediate_size", QKNorm.PER_HEAD, 1e4, dict(
        _COMMON_DEFAULTS, rms_norm_eps=1e-6, max_position_embeddings=32768)),
    ModelFamily.OLMOE: _FamilySpec("intermediate_size", QKNorm.FULL, 1e4, dict(
        _COMMON_DEFAULTS, rms_norm_eps=1e-5, max_position_embeddings=4096, eos_token_id=50279)),
}


def _moe_layer_ids(cfg: "_Reader", family: ModelFamily, num_layers: int) -> tuple[int, ...]:
    """transformers' rule: Qwen layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step
    == 0; every Mixtral and OLMoE layer is MoE."""
    if family not in (ModelFamily.QWEN2_MOE, ModelFamily.QWEN3_MOE):
        return tuple(range(num_layers))
    step = cfg.int("decoder_sparse_step")
    only = cfg.raw("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise CheckpointError(f"mlp_only_layers must be a list of layer indices, got {only!r}")
    bad = [i for i in only if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"mlp_only_layers holds {bad}, outside [0, {num_layers})")
    return tuple(i for i in range(num_layers) if i not in only and (i + 1) % step == 0)


def _refuse_unsupported(d: dict, family: ModelFamily, cfg: "_Reader") -> None:
    """Keys that change the math and that we do not implement: refused by name, never ignored."""
    if d.get("quantization_config"):
        raise CheckpointError("quantization_config is set: quantised checkpoints are not supported")
    act = cfg.raw("hidden_act")
    if act != "silu":
        raise CheckpointError(f"hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU experts)")
    if d.get("rope_scaling") is not None:
        raise CheckpointError(f"rope_scaling={d['rope_scaling']!r} is not supported (only plain rotary "
                              f"embeddings)")
    rope = d.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            raise CheckpointError(f"rope_parameters must be an object, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"rope_parameters.rope_type={kind!r} is not supported (only 'default')")
    if family is ModelFamily.QWEN2_MOE:
        n = d.get("num_hidden_layers")
        types = d.get("layer_types")
        if types is None and cfg.raw_or("use_sliding_window", False) and isinstance(n, int):
            window_layers = cfg.raw_or("max_window_layers", 28)
            types = ["sliding_attention" if (i + 1) % 2 and i < window_layers else "full_attention"
                     for i in range(n)]
        sliding = [i for i, t in enumerate(types or []) if t != "full_attention"]
        if sliding:
            raise CheckpointError(f"layer_types: layers {sliding} use sliding-window attention "
                                  f"(use_sliding_window={d.get('use_sliding_window')!r}), which is not supported")
    elif family is ModelFamily.QWEN3_MOE:
        if cfg.raw_or("use_sliding_window", False):
            raise CheckpointError("use_sliding_window=true: sliding-window attention is not supported")
    elif d.get("sliding_window") is not None:
        raise CheckpointError(f"sliding_window={d['sliding_window']!r}: sliding-window attention is not "
                              f"supported")


class _Reader:
    """Typed access to config keys; every error names the key."""

    def __init__(self, d: dict, defaults: dict) -> None:
        self.d, self.defaults = d, defaults

    def raw(self, key: str):
        if key in self.d:
            return self.d[key]
        if key in self.defaults:
            return self.defaults[key]
        raise CheckpointError(f"missing config field '{key}'")

    def raw_or(self, key: str, default):
        return self.d.get(key, default)

    def int(self, key: str, *, nullable: bool = False, minimum: int = 1) -> int | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointError(f"config field '{key}' must be an integer >= {minimum}, got {value!r}")
        return value

    def int_alias(self, keys: tuple[str, ...]) -> int:
        present = {k: self.d[k] for k in keys if k in self.d}
        if not present:
            raise CheckpointError(f"missing config field '{keys[0]}' (or '{keys[1]}')")
        if len(set(map(repr, present.values()))) > 1:
            raise CheckpointError(f"config fields {' and '.join(present)} disagree: {present}")
        return self.int(next(iter(present)))

    def float(self, key: str, *, nullable: bool = False) -> float | None:
        value = self.raw(key)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"config field '{key}' must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise CheckpointError(f"config field '{key}' must be true or false, got {value!r}")
        return value

    def token(self, key: str, *, many: bool = False) -> int | tuple[int, ...] | None:
        value = self.raw(key)
        if many and isinstance(value, list):
            value = tuple(value)
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        else:
            ok = value is None or isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not ok:
            raise CheckpointError(f"config field '{key}' must be a token id{' or a list of them' if many else ''}"
                                  f", got {value!r}")
        return value


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{name} must be an integer >= {minimum}, got {value!r}")
