"""Anchor tables: on which of its expert ranks a coherent token's top-k partial outputs are summed.

Shapes: T tokens, N tokens of one layer, L MoE layers, K experts per token (top-k), E experts, G GPUs (= EP ranks).

    fit trace + placement --fit_anchor_table--> AnchorTable(score_LEG: int32 [L, E, G])
    routing of one layer [N, K] + ranks [N, K] + score_EG --choose_anchors--> anchor rank per token [N]
    (comm/routes.py ``table_anchor_N`` is the torch twin; a test holds them equal)

The rule (binding: simulator and runtime use exactly this). A decode token at MoE layer l picks experts
e_1..e_K (router-weight order) on ranks r_1..r_K. Each candidate rank gets the integer score
``score(r) = sum_k score_LEG[l, e_k, r]``; the anchor is the r_k with the largest score(r_k), ties to the
smallest k (so an all-zero layer gives r_1, the rank of the top-1 expert: the rule without a table). With
replicated experts r_k is the copy the token uses from where it is (placement/replicas.py), so the candidates
are the ranks it really sends to. The
anchor is always one of the token's expert ranks, so the combine costs |R| - 1 transfers whichever is chosen;
what the choice changes is where the token starts layer l+1, which saves a dispatch transfer when that rank is
among its next experts' ranks. It never changes outputs: only where the sum happens and where the token lives.

Fit (naive Bayes over the token's K experts, in integers so that every rank computes the same choice): with
p(e, r) = P(r in R_{l+1} | e in topk_l) and q(r) = P(r in R_{l+1}) counted on the fit tokens (R_{l+1}: the ranks of
the token's experts at layer l+1; add-one smoothing),
``score_LEG[l, e, r] = round(SCALE * (logit p(e, r) - (K - 1) / K * logit q(r)))``, whose sum over the K experts is
the log-odds of r in R_{l+1} under independence. The last layer's row predicts the first MoE layer of the same
sequence's next position (decode: the token after it starts where this one was anchored); it stays zero when
the trace has no sequences.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placement.errors import InputError, PlacementError
from placement.npzfile import load_npz, save_npz

FORMAT = "epserve-anchor-table"
FORMAT_VERSION = 1
SCALE = 1000            # log-odds in thousandths
MAX_ABS_SCORE = 1 << 24   # sums over K experts stay exact in int64 (and in float32 nowhere: integers only)
SMOOTHING = 1.0           # add-one: an expert never seen gets p = 1/2
DEFAULT_BALANCE = 1.0     # strength of the anchored-load term (0: affinity alone)


COPIES_DIGEST_PREFIX = "copies:"   # digest of a replicated placement's copies table (placement schema v2)


def expert_table_digest(table: np.ndarray) -> str:
    """sha256 of the placement an anchor table is fitted for: ties the table to that placement.

    ``table``: an expert -> GPU table (int [L, E]) or a copies table (bool [L, E, G]: GPU g holds a copy of
    expert e, ``Placement.copies_LEG``). A copies table with one copy per expert digests as its expert -> GPU
    table (the digest of one-copy placements is unchanged by schema v2); with replicas it digests the copies
    themselves, prefixed ``copies:``, so a table fitted for one replicated placement is refused for another."""
    t = np.asarray(table)
    if t.ndim == 3:
        c = t.astype(bool)
        if (c.sum(axis=2) == 1).all():
            t = np.argmax(c, axis=2)
        else:
            shape = np.asarray(c.shape, dtype=np.int64).tobytes()
            return COPIES_DIGEST_PREFIX + hashlib.sha256(shape + np.ascontiguousarray(c, dtype=np.uint8).tobytes()
                                                         ).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(t, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class AnchorTable:
    score_LEG: np.ndarray           # int32 [L, E, G]: integer score of rank g for a token with expert e at l
    placement_sha256: str           # expert_table_digest of the placement it was fitted for
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.score_LEG
        if not isinstance(s, np.ndarray) or s.ndim != 3 or not np.issubdtype(s.dtype, np.integer):
            raise PlacementError(f"anchor scores must be an integer [layers, experts, gpus] array, got "
                                 f"{getattr(s, 'dtype', type(s).__name__)} {getattr(s, 'shape', None)}")
        if s.size and np.abs(s.astype(np.int64)).max() > MAX_ABS_SCORE:
            raise PlacementError(f"anchor scores must lie in [-{MAX_ABS_SCORE}, {MAX_ABS_SCORE}], got "
                                 f"[{s.min()}, {s.max()}]")
        object.__setattr__(self, "score_LEG", s.astype(np.int32, copy=False))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.score_LEG.shape)

    @property
    def replicated(self) -> bool:
        """Fitted for a placement with replicated experts (its digest covers the copies)."""
        return self.placement_sha256.startswith(COPIES_DIGEST_PREFIX)

    def check_fits(self, table: np.ndarray, num_gpus: int) -> None:
        """Refuse a placement this table was not fitted for. ``table``: the placement's copies (bool [L, E, G]:
        shape and digest are checked) or an expert -> GPU table (int [L, E]). For a table fitted for a
        replicated placement an [L, E] table (its primaries, or one rank's column of the copy rule, which is
        what the runtime holds) cannot name the placement: only the shape is checked then, so pass the copies
        where they are known."""
        t = np.asarray(table)
        L, E = t.shape[:2]
        if self.shape != (L, E, num_gpus) or (t.ndim == 3 and t.shape[2] != num_gpus):
            raise PlacementError(f"anchor table is for {self.shape[0]} layers x {self.shape[1]} experts x "
                                 f"{self.shape[2]} GPUs, the placement has {L} x {E} x {num_gpus}")
        if t.ndim == 2 and self.replicated:
            return
        if self.placement_sha256 != expert_table_digest(t):
            raise PlacementError("anchor table was fitted for a different placement (expert -> GPU table "
                                 "digest differs); refit it with epserve place")

    # ---- the rule ----------------------------------------------------------------------------------------
    def slots_TL(self, experts_TLK: np.ndarray, ranks_TLK: np.ndarray) -> np.ndarray:
        """[T, L] the slot k of every token-layer whose rank is its anchor (decode rule)."""
        return np.stack([anchor_slots(self.score_LEG[l], experts_TLK[:, l], ranks_TLK[:, l])
                         for l in range(ranks_TLK.shape[1])], axis=1)

    def anchors_TL(self, experts_TLK: np.ndarray, ranks_TLK: np.ndarray) -> np.ndarray:
        """[T, L] anchor rank of every token-layer (decode rule; the simulator applies prefill itself)."""
        slots_TL = self.slots_TL(experts_TLK, ranks_TLK)
        return np.take_along_axis(ranks_TLK, slots_TL[..., None], axis=2)[..., 0].astype(np.int64)

    # ---- files -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "version": FORMAT_VERSION, "placement_sha256": self.placement_sha256,
                  "meta": self.meta}
        save_npz(path, header, score=self.score_LEG)

    @classmethod
    def load(cls, path: str | Path) -> "AnchorTable":
        header, data = load_npz(path, what="anchor table", arrays=("score",), error=PlacementError)
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise PlacementError(f"{path}: anchor table format {header.get('format')!r} version "
                                 f"{header.get('version')!r} is not supported (expected version {FORMAT_VERSION})")
        try:
            return cls(data["score"], str(header["placement_sha256"]), dict(header.get("meta") or {}))
        except (KeyError, TypeError) as exc:
            raise PlacementError(f"{path}: bad anchor table header ({exc})") from None


def choose_anchors(score_EG: np.ndarray, experts_NK: np.ndarray, ranks_NK: np.ndarray) -> np.ndarray:
    """[N] anchor rank per token: the r_k with the largest sum_k' score_EG[e_k', r_k], ties to the smallest k."""
    k_N = anchor_slots(score_EG, experts_NK, ranks_NK)
    return ranks_NK[np.arange(len(k_N)), k_N].astype(np.int64)


def anchor_slots(score_EG: np.ndarray, experts_NK: np.ndarray, ranks_NK: np.ndarray) -> np.ndarray:
    """[N] the slot k whose rank ``choose_anchors`` picks."""
    K = ranks_NK.shape[1]
    score_NG = score_EG[experts_NK.astype(np.int64)].astype(np.int64).sum(axis=1)
    cand_NK = np.take_along_axis(score_NG, ranks_NK.astype(np.int64), axis=1)
    key_NK = cand_NK * K + (K - 1 - np.arange(K))        # unique per row: ties to the smallest k
    return np.argmax(key_NK, axis=1)


def fit_anchor_table(trace, table: np.ndarray, num_gpus: int, *,
                     balance: float = DEFAULT_BALANCE) -> AnchorTable:
    """Fit the scores on ``trace`` (a RoutingTrace: the fit part only) for this placement: ``table`` is its
    expert -> GPU table (int [L, E]) or its copies (bool [L, E, G], ``Placement.copies_LEG``; pass the copies for
    a replicated placement: the table's digest then covers them). ``balance`` > 0 adds the load-balance term
    (:func:`_balance`): 0 keeps the pure affinity rule.

    With replicated experts, "r in R_{l+1}" becomes "r holds a copy of one of the token's experts at l+1": an
    anchor there saves that dispatch transfer whichever copy the rule would pick from elsewhere (a token on a
    GPU holding a copy uses it, placement/replicas.py). The candidate ranks that the balance term counts anchors
    over are the primary copies (the chosen copies depend on where each token is; any scores give a lossless
    rule, so this only shifts the balance, never correctness)."""
    from placement.simulate import sequence_order   # simulate uses this module: import where needed
    experts_TLK = trace.experts_TLK.astype(np.int64)
    T, L, K = experts_TLK.shape
    t = np.asarray(table)
    E, G = t.shape[1], num_gpus
    if t.shape[0] != L:
        raise InputError(f"trace has {L} MoE layers, the placement {t.shape[0]}")
    if t.ndim == 3:
        copies_LEG = t.astype(bool)
        expert_to_gpu_LE = np.argmax(copies_LEG, axis=2).astype(np.int64)
    else:
        expert_to_gpu_LE = t.astype(np.int64)
        copies_LEG = np.zeros((L, E, G), dtype=bool)
        np.put_along_axis(copies_LEG, expert_to_gpu_LE[:, :, None], True, axis=2)
    ranks_TLK = expert_to_gpu_LE[np.arange(L)[None, :, None], experts_TLK]
    member_TLG = np.zeros((T, L, G), dtype=np.float64)
    for l in range(L):   # r holds a copy of one of the token's experts at l
        member_TLG[:, l] = copies_LEG[l][experts_TLK[:, l]].any(axis=1)
    score_LEG = np.zeros((L, E, G), dtype=np.int32)
    for l in range(L - 1):
        score_LEG[l] = _scores(experts_TLK[:, l], member_TLG[:, l + 1], E)
    _, _, prev_T = sequence_order(trace)
    chained_T = np.flatnonzero(prev_T >= 0)
    if len(chained_T):
        score_LEG[L - 1] = _scores(experts_TLK[prev_T[chained_T], L - 1], member_TLG[chained_T, 0], E)
    if balance > 0:
        for l in range(L):
            score_LEG[l] = _balance(score_LEG[l], experts_TLK[:, l], ranks_TLK[:, l], G, balance)
    meta = {"fit_tokens": int(T), "chained_tokens": int(len(chained_T)), "scale": SCALE, "balance": balance}
    return AnchorTable(score_LEG, expert_table_digest(t if t.ndim == 3 else expert_to_gpu_LE), meta)


def _balance(score_EG: np.ndarray, experts_NK: np.ndarray, ranks_NK: np.ndarray, G: int, strength: float,
             rounds: int = 16) -> np.ndarray:
    """The load-balance term. Under coherent, a token lives on its anchor until the next MoE layer, so the
    anchored tokens per rank set where attention runs (the busiest rank sets the step's time). Each round
    lowers the score of every rank in proportion to its anchored load's excess over the mean on the fit tokens,
    with a step that shrinks each round (a per-rank integer offset added to every expert's column, so every
    rank still computes the same choice); the table whose busiest rank was least loaded wins."""
    score_EG = score_EG.astype(np.int64)
    N, K = experts_NK.shape
    if N == 0:
        return score_EG.astype(np.int32)
    best, best_max, step = score_EG.copy(), None, SCALE * strength / K
    for _ in range(rounds):
        load_G = np.bincount(choose_anchors(score_EG, experts_NK, ranks_NK), minlength=G)
        if best_max is None or load_G.max() < best_max:
            best, best_max = score_EG.copy(), load_G.max()
        if load_G.max() <= 1.05 * N / G:
            break
        score_EG = score_EG - np.rint(step * (load_G - N / G) / (N / G)).astype(np.int64)[None, :]
        step *= 0.7
    return np.clip(best, -MAX_ABS_SCORE // K, MAX_ABS_SCORE // K).astype(np.int32)


def _scores(experts_NK: np.ndarray, next_member_NG: np.ndarray, E: int) -> np.ndarray:
    """[E, G] round(SCALE * (logit p(e, g) - (K - 1) / K * logit q(g))) (module docstring), add-one smoothing."""
    N, K = experts_NK.shape
    onehot_NE = np.zeros((N, E))
    np.put_along_axis(onehot_NE, experts_NK, 1.0, axis=1)
    hits_EG = onehot_NE.T @ next_member_NG
    seen_E = onehot_NE.sum(axis=0)
    p_EG = (hits_EG + SMOOTHING) / (seen_E[:, None] + 2 * SMOOTHING)
    q_G = (next_member_NG.sum(axis=0) + SMOOTHING) / (N + 2 * SMOOTHING)
    logit = lambda x: np.log(x) - np.log1p(-x)  # noqa: E731
    return np.rint(SCALE * (logit(p_EG) - (K - 1) / K * logit(q_G)[None, :])).astype(np.int32)
