"""Load a Hugging Face MoE checkpoint directory, reading only the experts this rank holds.

    dir --config.json--> ModelConfig
        --*.safetensors headers (no tensor data)--> name -> (file, shape, dtype)
        --plan: every weight of the model -> its checkpoint tensor (per-expert or fused layout);
          check every name, shape and dtype of the WHOLE checkpoint, and that nothing is left over
        --read the non-expert tensors and only the selected experts (safe_open, one tensor at a time), the
          experts of a layer stacked into mlp.experts.gate_up_proj [L, 2I, D] / down_proj [L, D, I]-->
        MoEModel (built on the meta device, weights assigned) + LoadReport (bytes read)

Checkpoint tensor names (the hub's):
    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.N.{input_layernorm,post_attention_layernorm}.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}, model.layers.N.self_attn.{q,k}_norm.weight
    Mixtral:  model.layers.N.block_sparse_moe.gate.weight, ...block_sparse_moe.experts.E.{w1,w3,w2}.weight
    others:   model.layers.N.mlp.gate.weight, model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
              model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight, ...mlp.shared_expert_gate.weight
              dense layers: model.layers.N.mlp.{gate,up,down}_proj.weight
    fused (transformers' in-memory layout, any family): model.layers.N.mlp.experts.gate_up_proj [E, 2I, D]
              (gate rows first), model.layers.N.mlp.experts.down_proj [E, D, I]; Mixtral's router is then
              model.layers.N.mlp.gate.weight
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from epserve.model.config import AttentionKind, CheckpointError, ModelConfig, ModelFamily, QKNorm
from epserve.model.model import MoEModel
from placement.errors import PlacementError

_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # computed buffers some old checkpoints carry
_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What was read from disk: bytes as stored in the files (before any dtype conversion)."""

    expert_bytes: int         # routed-expert weights read
    other_bytes: int          # everything else (embeddings, attention, norms, routers, shared/dense MLPs)
    tensors_read: int         # tensor (or tensor-slice) reads
    expert_tensors_read: int
    files: tuple[str, ...]    # the safetensors files of the checkpoint

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


@dataclass(frozen=True)
class _Source:
    """Where one model weight comes from: a whole tensor, or expert ``index`` (rows ``rows``) of a fused one."""

    tensor: str
    index: int | None = None
    rows: slice | None = None
    expert: tuple[int, int] | None = None  # (moe_index, expert id) for routed-expert weights
    float32: bool = False                  # kept in float32 whatever the model dtype (DeepSeek's router)


@dataclass(frozen=True)
class _Stack:
    """A stacked expert weight [L, rows, cols]: entry j is ``parts[j]`` concatenated along the rows (gate then
    up for ``gate_up_proj``; the fused layout's whole expert slice; ``down_proj``)."""

    parts: tuple[tuple[_Source, ...], ...]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class _Header:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def load_model(model_dir: str | Path, *, experts: Mapping[int, Iterable[int]] | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> tuple[MoEModel, LoadReport]:
    """Load ``model_dir`` (config.json + *.safetensors). ``experts[moe_index]``: the global expert ids to load
    in that MoE layer (None: all experts of every layer; a layer missing from the mapping loads none).
    Raises CheckpointError (naming the file and tensor / field) before reading any tensor data."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    selected = _select_experts(config, experts)
    headers, expected = _checked_headers(config, model_dir)

    with torch.device("meta"):
        model = MoEModel(config, experts=selected)
    sources = _weight_sources(config, model, headers)
    state, report = _read(sources, expected, headers, dtype=dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(device)
    for block in model.moe_blocks():
        block.experts.to(device)   # the global -> local expert table (built on the CPU, not loaded)
    model.requires_grad_(False).eval()
    return model, report


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HEADER_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float32}


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the checkpoint is served in by default: config.json's ``dtype`` (``torch_dtype`` in older
    files), else the dtype most of its weight bytes are stored in (float64 files are served in float32)."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    name = raw.get("dtype", raw.get("torch_dtype"))
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    weight = Counter()
    for h in _read_headers(model_dir).values():
        n = 1
        for size in h.shape:
            n *= size
        weight[h.dtype] += n * _FLOAT_DTYPES.get(h.dtype, 0)
    stored = weight.most_common(1)[0][0] if weight else "F32"
    return _HEADER_DTYPES.get(stored, torch.float32)


def resolve_dtype(name: str, model_dir: str | Path) -> torch.dtype:
    """``--dtype``: auto (the checkpoint's) or a name in DTYPES. Raises CheckpointError for a cast we refuse:
    bfloat16 weights to float16 (bfloat16's range is float32's; float16 overflows above 65504)."""
    stored = checkpoint_dtype(model_dir)
    if name == "auto":
        return stored
    if name not in DTYPES:
        raise CheckpointError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    if stored is torch.bfloat16 and DTYPES[name] is torch.float16:
        raise CheckpointError(f"{model_dir}: --dtype float16 cannot hold this bfloat16 checkpoint's range "
                              f"(float16 overflows above 65504); use --dtype bfloat16 or float32")
    return DTYPES[name]


def check_checkpoint(model_dir: str | Path) -> ModelConfig:
    """Validate ``model_dir`` as :func:`load_model` would (config.json, every tensor's name, shape and dtype
    from the safetensors headers) without reading any tensor data. Raises CheckpointError naming the problem."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    _checked_headers(config, model_dir)
    return config


def _checked_headers(config: ModelConfig, model_dir: Path) -> tuple[dict[str, _Header], dict[str, tuple[int, ...]]]:
    """The checkpoint's tensor headers and the tensors ``config`` expects, once every header is checked."""
    headers = _read_headers(model_dir)
    expected = _expected_tensors(config, headers)
    _check_checkpoint(config, expected, headers, model_dir)
    return headers, expected


# ---- which experts -------------------------------------------------------------------------------------
def _select_experts(config: ModelConfig, experts) -> dict[int, tuple[int, ...]]:
    L, E = config.num_moe_layers, config.num_experts
    if experts is None:
        return {i: tuple(range(E)) for i in range(L)}
    bad_layers = [i for i in experts if not isinstance(i, int) or not 0 <= i < L]
    if bad_layers:
        raise PlacementError(f"experts to load: MoE layer index {bad_layers[0]!r} out of range [0, {L})")
    out = {}
    for i in range(L):
        ids = tuple(sorted(int(e) for e in experts.get(i, ())))
        if len(set(ids)) != len(ids) or any(not 0 <= e < E for e in ids):
            raise PlacementError(f"experts to load in MoE layer {i}: {list(ids)} must be distinct ids in [0, {E})")
        out[i] = ids
    return out


# ---- the checkpoint's headers ----------------------------------------------------------------------------
def _checkpoint_files(model_dir: Path) -> list[Path]:
    """As transformers: the shards named by model.safetensors.index.json, else model.safetensors, else every
    *.safetensors file (a hub repo may also hold e.g. a consolidated.safetensors in another naming)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard '{missing[0]}', which is not in {model_dir}")
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (other weight formats are not supported)")
    return files


def _read_headers(model_dir: Path) -> dict[str, _Header]:
    files = _checkpoint_files(model_dir)
    headers: dict[str, _Header] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name in headers:
                        raise CheckpointError(f"tensor '{name}' appears in both {headers[name].file.name} and "
                                              f"{file.name}")
                    sl = f.get_slice(name)
                    headers[name] = _Header(file, tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    return headers


def _layer_prefix(config: ModelConfig, headers: Mapping[str, _Header], i: int) -> str:
    """Mixtral's MoE block is ``block_sparse_moe`` on the hub and ``mlp`` in transformers' own naming."""
    mlp = f"model.layers.{i}.mlp"
    if config.family is ModelFamily.MIXTRAL and f"{mlp}.gate.weight" not in headers:
        return f"model.layers.{i}.block_sparse_moe"
    return mlp


def _is_fused(headers: Mapping[str, _Header], prefix: str) -> bool:
    return f"{prefix}.experts.gate_up_proj" in headers or f"{prefix}.experts.down_proj" in headers


def _expert_tensor(config: ModelConfig, prefix: str, e: int, proj: str) -> str:
    if config.family is ModelFamily.MIXTRAL and prefix.endswith("block_sparse_moe"):
        return f"{prefix}.experts.{e}.{_MIXTRAL_EXPERT[proj]}.weight"
    return f"{prefix}.experts.{e}.{proj}.weight"


def _expected_tensors(config: ModelConfig, headers: Mapping[str, _Header]) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold (all experts of every layer), with its shape."""
    D, V = config.hidden_size, config.vocab_size
    E, I = config.num_experts, config.moe_intermediate_size
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_attention_layernorm.weight"] = (D,)
        if config.attention is AttentionKind.MLA:
            _mla(out, f"{p}.self_attn", config)
        else:
            _gqa(out, f"{p}.self_attn", config)
        if config.moe_index(i) is None:
            _swiglu(out, f"{p}.mlp", D, config.dense_intermediate_size)
            continue
        m = _layer_prefix(config, headers, i)
        out[f"{m}.gate.weight"] = (E, D)
        if config.score_correction_bias:
            out[f"{m}.gate.e_score_correction_bias"] = (E,)
        if _is_fused(headers, m):
            out[f"{m}.experts.gate_up_proj"], out[f"{m}.experts.down_proj"] = (E, 2 * I, D), (E, D, I)
        else:
            for e in range(E):
                for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                    out[_expert_tensor(config, m, e, proj)] = shape
        if config.shared_expert_intermediate_size:
            _swiglu(out, f"{m}.{_shared_name(config)}", D, config.shared_expert_intermediate_size)
            if config.shared_expert_gated:
                out[f"{m}.shared_expert_gate.weight"] = (1, D)
    return out


def _shared_name(config: ModelConfig) -> str:
    """The shared expert's checkpoint module: Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``."""
    return "shared_experts" if config.is_deepseek else "shared_expert"


def _gqa(out: dict, p: str, config: ModelConfig) -> None:
    """Rotary GQA tensors of one layer (``p``: model.layers.N.self_attn)."""
    D, H, Hkv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    for proj, rows in (("q_proj", H * d), ("k_proj", Hkv * d), ("v_proj", Hkv * d)):
        out[f"{p}.{proj}.weight"] = (rows, D)
        if config.qkv_bias:
            out[f"{p}.{proj}.bias"] = (rows,)
    out[f"{p}.o_proj.weight"] = (D, H * d)
    if config.o_bias:
        out[f"{p}.o_proj.bias"] = (D,)
    if config.qk_norm is QKNorm.PER_HEAD:
        out[f"{p}.q_norm.weight"] = out[f"{p}.k_norm.weight"] = (d,)
    elif config.qk_norm is QKNorm.FULL:
        out[f"{p}.q_norm.weight"], out[f"{p}.k_norm.weight"] = (H * d,), (Hkv * d,)


def _mla(out: dict, p: str, config: ModelConfig) -> None:
    """DeepSeek's MLA tensors (attention_bias puts a bias on q_a_proj, kv_a_proj_with_mqa and o_proj)."""
    D, H, C, Q = config.hidden_size, config.num_heads, config.kv_lora_rank, config.q_lora_rank
    qk, r, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    if Q is None:
        out[f"{p}.q_proj.weight"] = (H * qk, D)
    else:
        out[f"{p}.q_a_proj.weight"], out[f"{p}.q_a_layernorm.weight"], out[f"{p}.q_b_proj.weight"] = \
            (Q, D), (Q,), (H * qk, Q)
    out[f"{p}.kv_a_proj_with_mqa.weight"], out[f"{p}.kv_a_layernorm.weight"] = (C + r, D), (C,)
    out[f"{p}.kv_b_proj.weight"], out[f"{p}.o_proj.weight"] = (H * (config.qk_nope_head_dim + v), C), (D, H * v)
    if config.o_bias:
        for name, rows in ((("q_a_proj", Q),) if Q is not None else ()) + (("kv_a_proj_with_mqa", C + r),
                                                                           ("o_proj", D)):
            out[f"{p}.{name}.bias"] = (rows,)


def hub_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``config``'s checkpoint in the hub's per-expert layout."""
    return _expected_tensors(config, {})


def _swiglu(out: dict, prefix: str, D: int, I: int) -> None:
    out[f"{prefix}.gate_proj.weight"] = out[f"{prefix}.up_proj.weight"] = (I, D)
    out[f"{prefix}.down_proj.weight"] = (D, I)


def _check_checkpoint(config: ModelConfig, expected: Mapping[str, tuple[int, ...]],
                      headers: Mapping[str, _Header], model_dir: Path) -> None:
    files = ", ".join(sorted({h.file.name for h in headers.values()}))
    for name, shape in expected.items():
        h = headers.get(name)
        if h is None:
            raise CheckpointError(f"{model_dir}: tensor '{name}' is missing (looked in {files})")
        if h.shape != shape:
            raise CheckpointError(f"{h.file}: tensor '{name}' has shape {list(h.shape)}, the config implies "
                                  f"{list(shape)}")
        if h.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{h.file}: tensor '{name}' has dtype {h.dtype}; only "
                                  f"{'/'.join(_FLOAT_DTYPES)} weights are supported")
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    ignored_layers = tuple(f"model.layers.{config.num_layers + j}." for j in range(config.ignored_extra_layers))
    extra = sorted(n for n in headers if n not in expected and n not in allowed
                   and not n.endswith(_IGNORED_SUFFIXES) and not n.startswith(ignored_layers))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{headers[extra[0]].file}: unexpected tensor '{extra[0]}'{more}: the "
                              f"{config.family.value} model described by config.json has no such weight")


# ---- from model weights to checkpoint tensors --------------------------------------------------------------
def _weight_sources(config: ModelConfig, model: MoEModel, headers: Mapping[str, _Header]
                    ) -> dict[str, _Source | _Stack]:
    out: dict[str, _Source | _Stack] = {}
    for name in model.state_dict():
        parts = name.split(".")
        if parts[0] != "layers":
            out[name] = _Source({"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                                 "lm_head.weight": "model.embed_tokens.weight" if config.tie_word_embeddings
                                 else "lm_head.weight"}[name])
            continue
        i, module, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        p = f"model.layers.{i}"
        if module in ("input_norm", "post_attn_norm"):
            out[name] = _Source(f"{p}.{'input_layernorm' if module == 'input_norm' else 'post_attention_layernorm'}"
                                f".{rest}")
        elif module == "attn":
            out[name] = _Source(f"{p}.self_attn.{rest}")
        elif config.moe_index(i) is None:
            out[name] = _Source(f"{p}.mlp.{rest}")
        else:
            m = _layer_prefix(config, headers, i)
            if parts[3] == "router":   # weight (and V3's e_score_correction_bias: float32 in every checkpoint)
                out[name] = _Source(f"{m}.gate.{'.'.join(parts[4:])}",
                                    float32=config.router_in_float32 or parts[4] == "e_score_correction_bias")
            elif parts[3] == "shared_expert":
                out[name] = _Source(f"{m}.{_shared_name(config)}.{'.'.join(parts[4:])}")
            elif parts[3] == "experts":
                block = model.layers[i].mlp
                out[name] = _expert_stack(config, headers, m, block.moe_index, block.expert_ids, parts[4])
            else:
                out[name] = _Source(f"{m}.{rest}")
    return out


def _expert_stack(config: ModelConfig, headers: Mapping[str, _Header], m: str, moe_index: int,
                  expert_ids: tuple[int, ...], proj: str) -> _Stack:
    """The checkpoint slices of the stacked ``gate_up_proj`` or ``down_proj`` of the experts held here."""
    fused = _is_fused(headers, m)
    parts = []
    for e in expert_ids:
        key = (moe_index, e)
        if fused:
            parts.append((_Source(f"{m}.experts.{proj}", index=e, expert=key),))
        elif proj == "down_proj":
            parts.append((_Source(_expert_tensor(config, m, e, "down_proj"), expert=key),))
        else:
            parts.append(tuple(_Source(_expert_tensor(config, m, e, half), expert=key)
                               for half in ("gate_proj", "up_proj")))
    D, I = config.hidden_size, config.moe_intermediate_size
    return _Stack(tuple(parts), (len(expert_ids), 2 * I, D) if proj == "gate_up_proj" else (len(expert_ids), D, I))


def _leaves(src: _Source | _Stack) -> tuple[_Source, ...]:
    return tuple(s for part in src.parts for s in part) if isinstance(src, _Stack) else (src,)


def _read(sources: Mapping[str, _Source | _Stack], expected: Mapping[str, tuple[int, ...]],
          headers: Mapping[str, _Header], *, dtype: torch.dtype, device) -> tuple[dict, LoadReport]:
    """Read each needed tensor (or fused expert slice) once; count the bytes as stored. Stacked expert weights
    are filled expert by expert into one tensor allocated at its final dtype and device."""
    leaves = [s for src in sources.values() for s in _leaves(src)]
    missing = [s.tensor for s in leaves if s.tensor not in expected]
    if missing:  # a bug in the plan, not in the checkpoint
        raise AssertionError(f"weight source {missing[0]} was not checked")
    state, cache = {}, {}
    uses = Counter((s.tensor, s.index) for s in leaves)  # >1: tied embeddings, fused gate/up
    counts = Counter()
    with contextlib.ExitStack() as stack:
        handles = {}

        def fetch(src: _Source) -> torch.Tensor:
            key = (src.tensor, src.index)
            if key not in cache:
                cache[key] = _read_one(src, headers[src.tensor], handles, stack, counts)
            t = cache[key] if src.rows is None else cache[key][src.rows]
            uses[key] -= 1
            if not uses[key]:
                del cache[key]  # keep at most one host copy of a tensor alive
            return t

        for name, src in sources.items():
            if isinstance(src, _Stack):
                state[name] = _stacked(src, fetch, dtype=dtype, device=device)
            else:
                state[name] = fetch(src).to(device=device, dtype=torch.float32 if src.float32 else dtype
                                            ).contiguous()
    report = LoadReport(expert_bytes=counts["expert_bytes"], other_bytes=counts["other_bytes"],
                        tensors_read=counts["reads"], expert_tensors_read=counts["expert_reads"],
                        files=tuple(sorted({str(h.file) for h in headers.values()})))
    return state, report


def _read_one(src: _Source, h: _Header, handles: dict, stack: contextlib.ExitStack, counts: Counter
              ) -> torch.Tensor:
    """One tensor (or one expert's slice of a fused tensor) from disk, its bytes counted as stored."""
    if h.file not in handles:
        try:
            handles[h.file] = stack.enter_context(safe_open(h.file, framework="pt"))
        except SafetensorError as exc:
            raise CheckpointError(f"{h.file}: not a readable safetensors file ({exc})") from None
    try:
        t = (handles[h.file].get_tensor(src.tensor) if src.index is None
             else handles[h.file].get_slice(src.tensor)[src.index])
    except SafetensorError as exc:
        raise CheckpointError(f"{h.file}: cannot read tensor '{src.tensor}' ({exc})") from None
    nbytes = t.numel() * _FLOAT_DTYPES[h.dtype]
    counts["reads"] += 1
    if src.expert is None:
        counts["other_bytes"] += nbytes
    else:
        counts["expert_bytes"] += nbytes
        counts["expert_reads"] += 1
    return t


def _stacked(src: _Stack, fetch, *, dtype: torch.dtype, device) -> torch.Tensor:
    """[L, rows, cols]: each expert's parts read, concatenated along the rows and copied into place."""
    out = torch.empty(src.shape, dtype=dtype, device=device)
    for j, part in enumerate(src.parts):
        start = 0
        for s in part:
            t = fetch(s)
            out[j, start:start + t.shape[0]].copy_(t)
            start += t.shape[0]
        if start != src.shape[1]:
            raise AssertionError(f"expert {part[0].expert}: {start} rows stacked, {src.shape[1]} expected")
    return out
