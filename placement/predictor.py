"""Speculative predictor: which EP rank a token's experts will use, before its router runs.

Shapes: T tokens, L MoE layers, K experts per token, G GPUs (= EP ranks), V distinct vocabulary ids seen
while building, X = G ** order n-gram contexts.

    build(trace with token_ids, placement):
        R = the ranks that hold a copy of one of a token's experts at a layer (one copy per expert: the
        ranks expert_to_gpu[l, experts]; with replicas every copy counts: a token that starts on any of
        them finds that expert there, placement/replicas.py)
        token table  per layer l, id v: the rank most often in R (ties: lowest), confidence = that count /
                     occurrences of v, support = occurrences of v
        n-gram table per layer l >= 1, context = rank of e_1 at l-1 (and l-2 for order 2; with replicas
                     the primary copy's rank, expert_to_gpu): the rank most often in R, with confidence and
                     support
    predict: per layer, the table with the higher confidence wins (layer 0 has only the token table);
             a prediction is confident when confidence >= min_confidence and support >= min_support
    save/load: one .npz (arrays + a JSON header that names the placement it was built for: the digest of its
               copies, placement/anchor.py ``expert_table_digest``; one copy per expert: of expert_to_gpu)

Only where a token sits when its router runs depends on a prediction: a wrong guess costs one normal
transfer, never accuracy. A trace without vocabulary ids cannot build one (TraceError); nothing is guessed,
unless ``build(..., ngram_only=True)`` is asked for: then the token table is EMPTY (V = 0: every id unknown, ids
ignored even where the trace has them) and only the n-gram table predicts (layers >= 1; layer 0 and
``predict_start_ranks`` give -1). ``predict_ranks`` accepts ``token_ids_T=None`` (every id unknown). The file
format is unchanged: an n-gram-only predictor saves [0]-long vocab/support and [L, 0] token arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.anchor import expert_table_digest
from placement.errors import InputError, PlacementError, TraceError
from placement.npzfile import load_npz, save_npz
from placement.placement import Placement
from placement.trace import RoutingTrace

FORMAT = "epserve-speculative-predictor"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PredictorOptions:
    order: int = 1                  # n-gram context: ranks of e_1 at the previous 1 or 2 layers
    min_confidence: float = 0.5
    min_support: int = 2

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise InputError(f"predictor order must be 1 or 2, got {self.order!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise InputError(f"predictor min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if not isinstance(self.min_support, int) or self.min_support < 1:
            raise InputError(f"predictor min_support must be an integer >= 1, got {self.min_support!r}")

    def to_dict(self) -> dict:
        return {"order": self.order, "min_confidence": self.min_confidence, "min_support": self.min_support}


def placement_digest(placement: Placement) -> str:
    """sha256 of the placement's copies: ties a predictor to the placement it was built for (the same digest
    an anchor table carries; with one copy per expert it is the digest of the expert -> GPU table, so files
    built before replicas existed still match)."""
    return expert_table_digest(placement.copies_LEG)


@dataclass(frozen=True, eq=False)
class SpeculativePredictor:
    vocab_V: np.ndarray            # [V] sorted vocabulary ids with a row in the token table
    token_rank_LV: np.ndarray      # [L, V] predicted rank
    token_conf_LV: np.ndarray      # [L, V] confidence in [0, 1]
    support_V: np.ndarray          # [V] occurrences of the id in the build trace
    ngram_rank_LX: np.ndarray      # [L, X] predicted rank per context (row 0 unused)
    ngram_conf_LX: np.ndarray      # [L, X]
    ngram_support_LX: np.ndarray   # [L, X]
    num_gpus: int
    placement_sha256: str
    options: PredictorOptions

    def __post_init__(self) -> None:
        L, V = self.token_rank_LV.shape
        X = self.num_gpus ** self.options.order
        shapes = {"vocab": (self.vocab_V.shape, (V,)), "token_conf": (self.token_conf_LV.shape, (L, V)),
                  "support": (self.support_V.shape, (V,)), "ngram_rank": (self.ngram_rank_LX.shape, (L, X)),
                  "ngram_conf": (self.ngram_conf_LX.shape, (L, X)),
                  "ngram_support": (self.ngram_support_LX.shape, (L, X))}
        for name, (got, want) in shapes.items():
            if got != want:
                raise InputError(f"predictor array {name} has shape {got}, expected {want}")
        if np.any(np.diff(self.vocab_V) <= 0):
            raise InputError("predictor vocab ids must be strictly increasing")
        for name, arr in (("token_rank", self.token_rank_LV), ("ngram_rank", self.ngram_rank_LX)):
            if arr.size and (arr.min() < 0 or arr.max() >= self.num_gpus):
                raise InputError(f"predictor array {name} holds ranks outside [0, {self.num_gpus})")

    @property
    def num_layers(self) -> int:
        return self.token_rank_LV.shape[0]

    @property
    def ngram_only(self) -> bool:
        """No token table (built with ``ngram_only=True``, e.g. from a trace without vocabulary ids)."""
        return len(self.vocab_V) == 0

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, trace: RoutingTrace, placement: Placement, options: PredictorOptions = PredictorOptions(),
              *, ngram_only: bool = False) -> "SpeculativePredictor":
        """Tables from ``trace`` under ``placement``. ``ngram_only``: no token table (the trace's ids, if any,
        are ignored); without it a trace without vocabulary ids is refused (TraceError)."""
        if not trace.has_token_ids and not ngram_only:
            raise TraceError("the trace has no vocabulary ids (token_ids): a speculative predictor cannot be "
                             "built from it (ngram_only=True builds the n-gram table alone)")
        placement.check_fits(num_layers=trace.num_layers, num_experts=trace.num_experts)
        G, L = placement.num_gpus, trace.num_layers
        ranks_TLK = _ranks(trace, placement)
        in_R_TLG = _rank_sets(trace, placement)
        ids_T = np.zeros(0, dtype=np.int64) if ngram_only else trace.token_ids_T
        vocab_V, vid_T = np.unique(ids_T, return_inverse=True)
        V = len(vocab_V)
        support_V = np.bincount(vid_T, minlength=V)
        token_rank_LV = np.empty((L, V), dtype=np.int64)
        token_conf_LV = np.empty((L, V))
        for l in range(L if V else 0):
            count_VG = np.zeros((V, G))
            np.add.at(count_VG, vid_T, in_R_TLG[:, l])
            token_rank_LV[l], token_conf_LV[l] = _winner(count_VG, support_V)
        X = G ** options.order
        ngram_rank_LX = np.zeros((L, X), dtype=np.int64)
        ngram_conf_LX = np.zeros((L, X))
        ngram_support_LX = np.zeros((L, X), dtype=np.int64)
        for l in range(1, L):
            ctx_T = _context(ranks_TLK[:, :, 0], l, G, options.order)
            support_X = np.bincount(ctx_T, minlength=X)
            count_XG = np.zeros((X, G))
            np.add.at(count_XG, ctx_T, in_R_TLG[:, l])
            ngram_rank_LX[l], ngram_conf_LX[l] = _winner(count_XG, support_X)
            ngram_support_LX[l] = support_X
        return cls(vocab_V.astype(np.int64), token_rank_LV, token_conf_LV, support_V.astype(np.int64),
                   ngram_rank_LX, ngram_conf_LX, ngram_support_LX, G, placement_digest(placement), options)

    # ---- predicting ----------------------------------------------------------------------------------------
    def _token_lookup(self, token_ids_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into the token table, known mask) for each id (an n-gram-only predictor knows none)."""
        ids = np.asarray(token_ids_T, dtype=np.int64).ravel()
        if self.ngram_only:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        idx = np.searchsorted(self.vocab_V, ids)
        idx = np.minimum(idx, len(self.vocab_V) - 1)
        return idx, self.vocab_V[idx] == ids

    def predict_start_ranks(self, token_ids_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank_T, confident_T): the rank predicted for each token's first MoE layer from its id alone.
        rank is -1 for ids never seen while building (never confident)."""
        idx, known = self._token_lookup(token_ids_T)
        if self.ngram_only:
            return np.full(len(idx), -1, dtype=np.int64), np.zeros(len(idx), dtype=bool)
        rank_T = np.where(known, self.token_rank_LV[0, idx], -1)
        confident_T = known & (self.token_conf_LV[0, idx] >= self.options.min_confidence) \
            & (self.support_V[idx] >= self.options.min_support)
        return rank_T.astype(np.int64), confident_T

    def predict_ranks(self, token_ids_T: np.ndarray, top1_rank_TL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank_TL, confident_TL): per layer, the more confident of the token table (by id) and the n-gram
        table (by the observed ranks of e_1 at the previous layers, ``top1_rank_TL``). ``token_ids_T`` None:
        every id unknown (the n-gram table alone; layer 0 gets -1)."""
        T, L = top1_rank_TL.shape
        idx, known = self._token_lookup(np.full(T, -1) if token_ids_T is None else token_ids_T)
        columns = [self._predict_layer(idx, known, top1_rank_TL, l) for l in range(L)]
        rank_TL = np.stack([r for r, _ in columns], axis=1) if L else np.full((T, 0), -1, dtype=np.int64)
        conf_TL = np.stack([c for _, c in columns], axis=1) if L else np.full((T, 0), -1.0)
        return rank_TL, conf_TL >= self.options.min_confidence

    def predict_layer(self, token_ids_T: np.ndarray | None, top1_rank_TL: np.ndarray, layer: int) -> np.ndarray:
        """``predict_ranks``' column ``layer`` alone (rank_T; -1: no prediction): what the TP runtime asks once per
        MoE layer, with only the previous layers of ``top1_rank_TL`` known."""
        T = top1_rank_TL.shape[0]
        idx, known = self._token_lookup(np.full(T, -1) if token_ids_T is None else token_ids_T)
        return self._predict_layer(idx, known, top1_rank_TL, layer)[0]

    def _predict_layer(self, idx: np.ndarray, known: np.ndarray, top1_rank_TL: np.ndarray, l: int
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(rank_T, conf_T) at layer ``l``: the token table's answer, replaced by the n-gram's when more confident."""
        T, min_s = len(idx), self.options.min_support
        rank_T, conf_T = np.full(T, -1, dtype=np.int64), np.full(T, -1.0)
        rank_T[known] = self.token_rank_LV[l, idx[known]]
        conf_T[known] = np.where(self.support_V[idx[known]] >= min_s, self.token_conf_LV[l, idx[known]], -1.0)
        if l >= 1:
            ctx_T = _context(top1_rank_TL, l, self.num_gpus, self.options.order)
            n_conf = np.where(self.ngram_support_LX[l, ctx_T] >= min_s, self.ngram_conf_LX[l, ctx_T], -1.0)
            better = n_conf > conf_T
            rank_T[better] = self.ngram_rank_LX[l, ctx_T[better]]
            conf_T = np.maximum(conf_T, n_conf)
        return rank_T, conf_T

    def predict_home_rank(self, prompt_token_ids, default: int = 0) -> int:
        """The rank a prompt's tokens are predicted to use most over all MoE layers (ties to the lowest rank);
        ``default`` when none of its ids is known with enough support."""
        idx, known = self._token_lookup(np.asarray(prompt_token_ids))
        if self.ngram_only:
            return int(default)
        known &= self.support_V[idx] >= self.options.min_support
        if not known.any():
            return int(default)
        votes_G = np.bincount(self.token_rank_LV[:, idx[known]].ravel(), minlength=self.num_gpus)
        return int(np.argmax(votes_G))

    def accuracy(self, trace: RoutingTrace, placement: Placement) -> dict:
        """Per layer on ``trace`` (held-out data): how often the predicted rank is one of the token's expert
        ranks (holds a copy of one of its experts), how many predictions are confident, and the accuracy of the
        confident ones."""
        if not trace.has_token_ids and not self.ngram_only:
            raise TraceError("the trace has no vocabulary ids (token_ids): predictor accuracy cannot be measured")
        self.check_placement(placement)
        ranks_TLK = _ranks(trace, placement)
        ids_T = None if self.ngram_only else trace.token_ids_T
        rank_TL, confident_TL = self.predict_ranks(ids_T, ranks_TLK[:, :, 0])
        in_R_TLG = _rank_sets(trace, placement)
        hit_TL = (rank_TL >= 0) & np.take_along_axis(in_R_TLG, np.maximum(rank_TL, 0)[:, :, None], axis=2)[:, :, 0]
        n_conf_L = confident_TL.sum(axis=0)
        return {"accuracy_L": hit_TL.mean(axis=0).tolist(),
                "confident_L": confident_TL.mean(axis=0).tolist(),
                "confident_accuracy_L": np.where(n_conf_L > 0, (hit_TL & confident_TL).sum(axis=0)
                                                 / np.maximum(n_conf_L, 1), np.nan).tolist()}

    def check_placement(self, placement: Placement) -> None:
        if placement_digest(placement) != self.placement_sha256 or placement.num_layers != self.num_layers:
            raise PlacementError("the predictor was built for a different placement (its placement sha256 "
                                 f"{self.placement_sha256[:12]}... does not match); rebuild it with this placement")

    # ---- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "version": FORMAT_VERSION, "num_gpus": self.num_gpus,
                  "placement_sha256": self.placement_sha256, "options": self.options.to_dict()}
        save_npz(path, header, vocab=self.vocab_V, token_rank=self.token_rank_LV, token_conf=self.token_conf_LV,
                 support=self.support_V, ngram_rank=self.ngram_rank_LX, ngram_conf=self.ngram_conf_LX,
                 ngram_support=self.ngram_support_LX)

    @classmethod
    def load(cls, path: str | Path) -> "SpeculativePredictor":
        header, data = load_npz(path, what="predictor", error=InputError,
                                arrays=("vocab", "token_rank", "token_conf", "support", "ngram_rank", "ngram_conf",
                                        "ngram_support"))
        if header.get("version") != FORMAT_VERSION:
            raise InputError(f"{path}: predictor version {header.get('version')!r} is not supported")
        try:
            return cls(data["vocab"].astype(np.int64), data["token_rank"].astype(np.int64),
                       data["token_conf"].astype(np.float64), data["support"].astype(np.int64),
                       data["ngram_rank"].astype(np.int64), data["ngram_conf"].astype(np.float64),
                       data["ngram_support"].astype(np.int64), int(header["num_gpus"]),
                       str(header["placement_sha256"]), PredictorOptions(**header["options"]))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{path}: predictor header is malformed ({exc})") from None
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None


def _ranks(trace: RoutingTrace, placement: Placement) -> np.ndarray:
    """[T, L, K] the rank of each expert's primary copy (the n-gram contexts)."""
    L = trace.num_layers
    return placement.expert_to_gpu_LE[np.arange(L)[None, :, None], trace.experts_TLK.astype(np.int64)]


def _rank_sets(trace: RoutingTrace, placement: Placement) -> np.ndarray:
    """[T, L, G] bool: rank g holds a copy of one of the token's experts at layer l."""
    L, K = trace.num_layers, trace.top_k
    in_R_TLG = np.zeros((trace.num_tokens, L, placement.num_gpus), dtype=bool)
    layer_1L = np.arange(L)[None, :]
    for k in range(K):
        in_R_TLG |= placement.copies_LEG[layer_1L, trace.experts_TLK[:, :, k].astype(np.int64)]
    return in_R_TLG


def _context(top1_rank_TL: np.ndarray, l: int, G: int, order: int) -> np.ndarray:
    """n-gram context id of each token at layer l >= 1 (order 2 falls back to order 1 at l = 1)."""
    ctx_T = top1_rank_TL[:, l - 1].astype(np.int64)
    if order == 2 and l >= 2:
        ctx_T = ctx_T + G * top1_rank_TL[:, l - 2]
    return ctx_T


def _winner(count_NG: np.ndarray, support_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most frequent rank per row (ties to the lowest) and its share of the row's occurrences."""
    rank_N = np.argmax(count_NG, axis=1)
    conf_N = count_NG[np.arange(len(rank_N)), rank_N] / np.maximum(support_N, 1)
    return rank_N.astype(np.int64), conf_N
