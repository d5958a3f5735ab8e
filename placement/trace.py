"""RoutingTrace: which experts each token chose at each MoE layer.

Shapes: T tokens, L MoE layers, K experts per token (top-k), E experts per layer.

    .npz file --load--> validate --> RoutingTrace --split--> (fit, held-out)
    FLAME layout (``scores``) --import_flame--^

File format (DESIGN.md "Data formats"): ``experts`` int16 [T, L, K] (highest weight first), ``weights``
float32 [T, L, K], optional ``token_ids`` / ``seq_ids`` / ``positions`` int32 [T], and ``meta`` (JSON string
with at least ``num_experts``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placement.errors import TraceError

_OPTIONAL_T = ("token_ids", "seq_ids", "positions")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    experts_TLK: np.ndarray
    weights_TLK: np.ndarray
    num_experts: int
    token_ids_T: np.ndarray | None = None
    seq_ids_T: np.ndarray | None = None
    positions_T: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        experts, weights = self.experts_TLK, self.weights_TLK
        if not isinstance(experts, np.ndarray) or experts.ndim != 3:
            raise TraceError(f"experts must be a 3-d array [tokens, layers, top_k], got shape "
                             f"{getattr(experts, 'shape', None)}")
        if not np.issubdtype(experts.dtype, np.integer):
            raise TraceError(f"experts must hold integers, got dtype {experts.dtype}")
        if not isinstance(weights, np.ndarray) or weights.shape != experts.shape:
            raise TraceError(f"weights shape {getattr(weights, 'shape', None)} does not match experts shape "
                             f"{experts.shape}")
        T, L, K = experts.shape
        if T == 0 or L == 0 or K == 0:
            raise TraceError(f"trace is empty: experts shape {experts.shape}")
        E = self.num_experts
        if not isinstance(E, (int, np.integer)) or E < 1:
            raise TraceError(f"num_experts must be a positive integer, got {E!r}")
        if K > E:
            raise TraceError(f"top_k={K} is larger than num_experts={E}")
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            bad = np.argwhere((experts < 0) | (experts >= E))[0]
            raise TraceError(f"expert id {int(experts[tuple(bad)])} out of range [0, {E}) at "
                             f"token {bad[0]}, layer {bad[1]}, slot {bad[2]}")
        if K > 1:
            sorted_TLK = np.sort(experts, axis=-1)
            dup = np.argwhere((sorted_TLK[..., 1:] == sorted_TLK[..., :-1]).any(-1))
            if len(dup):
                t, l = dup[0]
                raise TraceError(f"token {t} chose expert {experts[t, l].tolist()} at layer {l}: "
                                 f"an expert appears twice in one top-k")
        if not np.issubdtype(weights.dtype, np.floating):
            raise TraceError(f"weights must be floating point, got dtype {weights.dtype}")
        if not np.isfinite(weights).all():
            bad = np.argwhere(~np.isfinite(weights))[0]
            raise TraceError(f"weights hold NaN or inf (first at token {bad[0]}, layer {bad[1]}, slot {bad[2]})")
        if (weights < 0).any():
            raise TraceError("weights must be >= 0 (router probabilities)")
        for name in _OPTIONAL_T:
            arr = getattr(self, f"{name}_T")
            if arr is None:
                continue
            if not isinstance(arr, np.ndarray) or arr.shape != (T,):
                raise TraceError(f"{name} must have shape [{T}], got {getattr(arr, 'shape', None)}")
            if not np.issubdtype(arr.dtype, np.integer):
                raise TraceError(f"{name} must hold integers, got dtype {arr.dtype}")
            if (arr < 0).any():
                raise TraceError(f"{name} holds negative values")
        # Normalise dtypes once, so every consumer can rely on them.
        object.__setattr__(self, "experts_TLK", experts.astype(np.int16, copy=False))
        object.__setattr__(self, "weights_TLK", weights.astype(np.float32, copy=False))
        object.__setattr__(self, "num_experts", int(E))
        for name in _OPTIONAL_T:
            arr = getattr(self, f"{name}_T")
            if arr is not None:
                object.__setattr__(self, f"{name}_T", arr.astype(np.int32, copy=False))

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.experts_TLK.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts_TLK.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts_TLK.shape[2]

    @property
    def has_token_ids(self) -> bool:
        return self.token_ids_T is not None

    # ---- slicing -----------------------------------------------------------------------------------------
    def select(self, rows) -> "RoutingTrace":
        """A trace holding only the given token rows (index array, boolean mask or slice)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return RoutingTrace(self.experts_TLK[rows], self.weights_TLK[rows], self.num_experts,
                            pick(self.token_ids_T), pick(self.seq_ids_T), pick(self.positions_T), dict(self.meta))

    def split(self, fit_fraction: float) -> tuple["RoutingTrace", "RoutingTrace"]:
        """(fit, held_out): the first ``fit_fraction`` of the token rows, and the rest. Order is kept, so
        held-out tokens come later in the trace than every fitted one (no leakage of a sequence's future)."""
        if not 0.0 < fit_fraction < 1.0:
            raise TraceError(f"fit fraction must be in (0, 1), got {fit_fraction}")
        cut = int(round(self.num_tokens * fit_fraction))
        if cut < 1 or cut >= self.num_tokens:
            raise TraceError(f"fit fraction {fit_fraction} leaves an empty part of a {self.num_tokens}-token trace")
        return self.select(slice(0, cut)), self.select(slice(cut, None))

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        meta = dict(self.meta, num_experts=self.num_experts, top_k=self.top_k, num_layers=self.num_layers)
        arrays = {"experts": self.experts_TLK, "weights": self.weights_TLK, "meta": np.array(json.dumps(meta))}
        for name in _OPTIONAL_T:
            arr = getattr(self, f"{name}_T")
            if arr is not None:
                arrays[name] = arr
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, *, num_experts: int | None = None) -> "RoutingTrace":
        """Load a trace in our format, or in the FLAME layout (detected by its ``scores`` array). Every problem
        is a TraceError that starts with the file's name and names the array at fault."""
        path = Path(path)
        data = _read_npz(path)
        if "weights" not in data and "scores" in data:
            return import_flame(data, num_experts=num_experts, source=str(path))
        try:
            _check_arrays(data, "weights")
            meta = _parse_meta(data.get("meta"))
            if num_experts is not None:
                E, said = num_experts, f"--num-experts {num_experts}"
            else:
                E, said = meta.get("num_experts"), f"meta's num_experts {meta.get('num_experts')!r}"
            if E is None:
                raise TraceError(f"the number of experts per layer is unknown: meta has no num_experts "
                                 f"(experts {data['experts'].shape}, ids 0..{int(data['experts'].max())}); "
                                 f"pass --num-experts")
            _check_ids(data["experts"], E, said)
            return cls(data["experts"], data["weights"], E, *(data.get(n) for n in _OPTIONAL_T), meta=meta)
        except TraceError as exc:
            raise TraceError(f"{path}: {exc}") from None


def import_flame(data: dict, *, num_experts: int | None = None, source: str = "") -> RoutingTrace:
    """FLAME-MoE traces (``../shared/traces/flame-moe-290m``): ``experts``, ``scores``, ``moe_layers``, and
    optional ``seq_id`` / ``position``. Their ``token_id`` is a row index, not a vocabulary id, so the result
    carries no vocabulary ids. FLAME-MoE-290M has 64 routed experts; ``num_experts`` defaults to that when the
    ids fit, otherwise to max id + 1."""
    try:
        _check_arrays(data, "scores")
        experts = data["experts"]
        if num_experts is None:
            top = int(np.max(experts)) + 1 if np.size(experts) else 0
            num_experts = 64 if top <= 64 else top
            said = f"{num_experts} (FLAME-MoE-290M's 64, or the largest id + 1)"
        else:
            said = f"--num-experts {num_experts}"
        _check_ids(experts, num_experts, said)
        meta = {"model": "FLAME-MoE-290M-1.3B", "source": source or "flame", "layout": "flame"}
        if "moe_layers" in data:
            meta["moe_layers"] = [int(x) for x in np.asarray(data["moe_layers"]).tolist()]
        seq = data.get("seq_id")
        pos = data.get("position")
        return RoutingTrace(experts, np.asarray(data["scores"], dtype=np.float32), num_experts, None,
                            None if seq is None else np.asarray(seq).astype(np.int32),
                            None if pos is None else np.asarray(pos).astype(np.int32), meta=meta)
    except TraceError as exc:
        raise TraceError(f"{source}: {exc}" if source else str(exc)) from None


_LAYOUT = "[tokens, layers, top_k]"
_FORMAT = ("a trace is an .npz archive (numpy.savez) holding experts, int16 [tokens, layers, top_k], and "
           "weights, float32 of the same shape (FLAME layout: scores)")


def _check_arrays(data: dict, weights_key: str) -> None:
    """The two arrays every trace has: present, 3-d, integer ids, floating weights of the same shape."""
    found = ", ".join(sorted(data)) or "nothing"
    if "experts" not in data:
        raise TraceError(f"missing array 'experts' (integer expert ids {_LAYOUT}; found: {found})")
    if weights_key not in data:
        raise TraceError(f"missing array '{weights_key}' (the router weight of each chosen expert, float32 "
                         f"{_LAYOUT}; found: {found})")
    experts, weights = data["experts"], data[weights_key]
    if experts.ndim != 3:
        hint = (f"; one layer's [tokens, top_k] choices are experts[:, None, :]" if experts.ndim == 2 else "")
        raise TraceError(f"array 'experts' has shape {experts.shape}, but it must be 3-d {_LAYOUT}: the top_k "
                         f"experts each token chose at each MoE layer{hint}")
    if not np.issubdtype(experts.dtype, np.integer):
        raise TraceError(f"array 'experts' has dtype {experts.dtype}, but it holds expert ids: it must be an "
                         f"integer array (int16)")
    if weights.shape != experts.shape:
        raise TraceError(f"array '{weights_key}' has shape {weights.shape}, but 'experts' has {experts.shape}: "
                         f"one weight per chosen expert, the same {_LAYOUT}")
    if not np.issubdtype(weights.dtype, np.floating):
        raise TraceError(f"array '{weights_key}' has dtype {weights.dtype}, but router weights must be floating "
                         f"point (float32)")


def _check_ids(experts: np.ndarray, num_experts, said: str) -> None:
    """Every id in [0, num_experts), or a message naming the first bad one and where num_experts came from."""
    if not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool) or num_experts < 1:
        raise TraceError(f"num_experts must be a positive integer, got {said}")
    bad = (experts < 0) | (experts >= num_experts)
    if bad.any():
        t, l, k = np.argwhere(bad)[0]
        value = int(experts[t, l, k])
        why = "negative" if value < 0 else f"not below num_experts ({said})"
        raise TraceError(f"array 'experts' holds expert id {value} at token {t}, layer {l}, slot {k}: ids must be "
                         f"in [0, {num_experts}), and this one is {why}")


def _read_npz(path: Path) -> dict:
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"\x93NUMPY"):
        raise TraceError(f"{path}: a single .npy array, not an .npz trace; {_FORMAT}")
    if not head.startswith(b"PK"):
        raise TraceError(f"{path}: not an .npz trace ({_describe(head)}); {_FORMAT}")
    data = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    data[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise TraceError(f"{path}: array '{key}' holds Python objects (pickled), which a trace "
                                         f"never does; {_FORMAT}") from None
                    raise
    except TraceError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise TraceError(f"{path}: a zip archive, but not a readable .npz trace ({exc}); {_FORMAT}") from None
    return data


def _describe(head: bytes) -> str:
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a binary file starting {head[:8]!r}"
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.splitlines()[0][:40] if text.strip() else ""
        return (f"a text file starting {first!r}; FLAME's CSV files convert with bench/get_flame_trace.py")
    return f"a binary file starting {head[:8]!r}"


def _parse_meta(raw) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise TraceError(f"array 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TraceError("array 'meta' must be a JSON object")
    return meta
