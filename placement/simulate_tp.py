"""Traffic simulator for tensor-parallel attention (``--attention tp``): replay a routing trace under (placement,
tp strategy) -> TPReport. Mirrors epserve/engine/runner_tp.py.

Shapes: T tokens, L MoE layers, K experts per token, E experts, G ranks (= GPUs), P ranks per node,
S tokens per step (the last step shorter), Ts tokens of one step, C = ceil(Ts / G) rows per rank's chunk.

    trace rows --cut into steps of S--> per step, per MoE layer l:
        chunks  tp_two_a2a:     contiguous_chunks(Ts, G)                (token t on rank t // C)
                tp_speculative: balanced_chunks(pred_rank_T[:, l], G)   (placement/tp_shuffle.py)
        --> chunk rank c of each token (its home for the layer)
        --> expert ranks r_k = copy_choice_LEG[l, e_k, c] (placement/replicas.py; one copy: expert_to_gpu)
        --> rs | dispatch | combine | ag transfers, padding rows, local activations, cross-node transfers
    --> TPReport (per-layer int64 arrays, dispatch flows [L, G, G], totals)

The traffic model (binding: the runtime's counters must equal these numbers on a replayed trace):
    reduce-scatter (rs)  (G - 1) x Ts transfers per step-layer (every rank sends every other rank the real rows
                         of that rank's chunk); wire rows (G - 1) x G x C (padding included); cross-node
                         (G - P) x Ts. Elements of ``partial_bytes`` (float32 for 16-bit models: the runtime
                         reduce-scatters float32 partials).
    dispatch             per token: |R \\ {c}|, R = set{r_1..r_K} (one transfer per destination rank)
    combine              the same count (each expert rank other than c sends ONE partial sum back to c)
    all-gather (ag)      (G - 1) x Ts transfers, wire rows (G - 1) x G x C, cross-node (G - P) x Ts, at every
                         MoE layer except the last. ASSUMPTION: the trace knows only MoE layers; the runtime skips
                         the all-gather after the last DECODER layer, which is the last MoE layer in a model
                         whose last decoder layer is an MoE layer (all epserve's families); a dense layer's
                         rs/ag and a trailing dense layer are not counted.
    local activations    #{k : r_k == c}; LAR = local activations / (T x L x K)
    padding rows         G x C - Ts per step-layer (rows of the chunks that hold no token; C is the chunks' width:
                         ceil(Ts / G), or balanced_chunks' ceil(capacity_factor x Ts / G) for tp_speculative)
    bytes                transfers x hidden_size x (partial_bytes for rs, dtype_bytes otherwise); the dispatch
                         rows' metadata (top-k ids, weights) is the cost model's business (cost_model_tp.py).
tp_speculative's prediction for MoE layer l: ``SpeculativePredictor.predict_ranks(token_ids_T, top1_rank_TL)``
over the whole trace (row-wise: a token's prediction uses only its own id and its primary copies' ranks of e_1 at
layers < l, ``expert_to_gpu``, as the predictor was built); the token asks for rank_TL[t, l] when it is >= 0
(confident or not), else -1. An n-gram-only predictor (trace without vocabulary ids) gets ids None.
Predictor figures per layer: predicted (rank >= 0), hit (the predicted rank holds a copy of one of the token's
experts; no prediction counts as a miss) and landed (the token's chunk rank is its predicted rank: the rest
overflowed a full rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from placement.errors import InputError, PlacementError
from placement.placement import Placement
from placement.simulate import CommReport, SimOptions, Strategy, simulate
from placement.tp_shuffle import balanced_chunks, contiguous_chunks
from placement.trace import RoutingTrace

TP_STRATEGIES = ("tp_two_a2a", "tp_speculative")
PHASES = ("rs", "dispatch", "combine", "ag")


@dataclass(frozen=True, eq=False)
class TPReport:
    """Simulated traffic of one (trace, placement, tp strategy). Per-layer arrays are int64 counts over the trace."""

    strategy: str
    num_tokens: int
    top_k: int
    nodes: int
    gpus_per_node: int
    tokens_per_step: int
    steps: int
    transfers_L: dict            # phase -> [L] transfers (real rows)
    wire_rows_L: dict            # phase -> [L] rows on the wire (rs, ag: padding included; dispatch/combine: =)
    cross_node_L: dict           # phase -> [L] transfers between nodes
    padding_rows_L: np.ndarray   # [L] chunk rows holding no token
    local_activations_L: np.ndarray
    dispatch_flows_LGG: np.ndarray   # [L, G, G] dispatch transfers (chunk rank -> expert rank); combine: transposed
    chunk_rank_TL: np.ndarray    # [T, L] the rank whose chunk holds token t at MoE layer l
    predicted_L: np.ndarray | None = None   # [L] tokens with a predicted rank (tp_speculative)
    hits_L: np.ndarray | None = None        # [L] tokens whose predicted rank holds one of their experts
    landed_L: np.ndarray | None = None      # [L] tokens whose chunk rank is their predicted rank
    hidden_size: int | None = None
    dtype_bytes: int = 2
    partial_bytes: int = 4
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.padding_rows_L)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def token_layers(self) -> int:
        return self.num_tokens * self.num_layers

    def per_token_layer(self, phase: str) -> float:
        return float(self.transfers_L[phase].sum()) / self.token_layers

    @property
    def lar(self) -> float:
        return float(self.local_activations_L.sum()) / (self.token_layers * self.top_k)

    def element_bytes(self, phase: str) -> int:
        return self.partial_bytes if phase == "rs" else self.dtype_bytes

    def bytes_L(self, phase: str, *, wire: bool = False) -> np.ndarray | None:
        """[L] payload (or wire, padding included) bytes of a phase; None without hidden_size."""
        if self.hidden_size is None:
            return None
        rows = self.wire_rows_L[phase] if wire else self.transfers_L[phase]
        return rows * self.hidden_size * self.element_bytes(phase)

    def total_bytes(self, *, wire: bool = False) -> int | None:
        if self.hidden_size is None:
            return None
        return int(sum(self.bytes_L(p, wire=wire).sum() for p in PHASES))

    def accuracy_L(self) -> np.ndarray | None:
        return None if self.hits_L is None else self.hits_L / self.num_tokens

    def landed_fraction_L(self) -> np.ndarray | None:
        return None if self.landed_L is None else self.landed_L / self.num_tokens

    def summary(self) -> dict:
        """The comparison row (the same keys as ``dp_summary``)."""
        tl = self.token_layers
        b = self.total_bytes()
        return {"strategy": self.strategy, "lar": self.lar,
                **{f"{p}_per_token_layer": self.per_token_layer(p) for p in PHASES},
                "transfers_per_token_layer": sum(self.per_token_layer(p) for p in PHASES),
                "cross_node_per_token_layer": sum(float(self.cross_node_L[p].sum()) for p in PHASES) / tl,
                "bytes_per_token_layer": None if b is None else b / tl,
                "wire_bytes_per_token_layer": None if b is None else self.total_bytes(wire=True) / tl,
                "padding_rows_per_step_layer": float(self.padding_rows_L.sum()) / (self.steps * self.num_layers),
                "accuracy_L": None if self.hits_L is None else self.accuracy_L().tolist(),
                "landed_L": None if self.landed_L is None else self.landed_fraction_L().tolist()}

    def to_dict(self) -> dict:
        as_list = lambda d: {p: v.tolist() for p, v in d.items()}  # noqa: E731
        out = {"strategy": self.strategy, "tokens": self.num_tokens, "moe_layers": self.num_layers,
               "top_k": self.top_k, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
               "tokens_per_step": self.tokens_per_step, "steps": self.steps, "hidden_size": self.hidden_size,
               "dtype_bytes": self.dtype_bytes, "partial_bytes": self.partial_bytes, **self.summary(),
               "transfers": {p: int(v.sum()) for p, v in self.transfers_L.items()},
               "bytes": None if self.hidden_size is None else {p: int(self.bytes_L(p).sum()) for p in PHASES},
               "wire_bytes": None if self.hidden_size is None else
               {p: int(self.bytes_L(p, wire=True).sum()) for p in PHASES},
               "cross_node": {p: int(v.sum()) for p, v in self.cross_node_L.items()},
               "padding_rows": int(self.padding_rows_L.sum()),
               "per_layer": {"transfers_L": as_list(self.transfers_L), "wire_rows_L": as_list(self.wire_rows_L),
                             "cross_node_L": as_list(self.cross_node_L),
                             "padding_rows_L": self.padding_rows_L.tolist(),
                             "local_activations_L": self.local_activations_L.tolist()},
               "meta": dict(self.meta)}
        if self.predicted_L is not None:
            out["per_layer"].update(predicted_L=self.predicted_L.tolist(), hits_L=self.hits_L.tolist(),
                                    landed_L=self.landed_L.tolist())
        return out


def simulate_tp(trace: RoutingTrace, placement: Placement, *, strategy: str, predictor=None,
                tokens_per_step: int = 64, hidden_size: int | None = None, dtype_bytes: int = 2,
                partial_bytes: int | None = None, capacity_factor: float = 1.0,
                step_sizes: list[int] | None = None) -> TPReport:
    """Replay ``trace`` as consecutive steps of ``tokens_per_step`` rows under ``placement`` with a TP strategy
    (module docstring: the traffic model). ``predictor`` (SpeculativePredictor) is required by tp_speculative.
    ``partial_bytes`` default: 4 when dtype_bytes == 2, else dtype_bytes. ``capacity_factor``: balanced_chunks'
    rows per rank (tp_speculative; 1: C = ceil(Ts / G), as contiguous_chunks). ``step_sizes``: the tokens of each
    step, in trace order (a recorded run's steps; they must add up to the trace), instead of ``tokens_per_step``."""
    if strategy not in TP_STRATEGIES:
        raise InputError(f"tp strategy must be one of {', '.join(TP_STRATEGIES)}, got {strategy!r}")
    for name, value in (("tokens_per_step", tokens_per_step), ("dtype_bytes", dtype_bytes),
                        ("hidden_size", hidden_size), ("partial_bytes", partial_bytes)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if partial_bytes is None:
        partial_bytes = 4 if dtype_bytes == 2 else dtype_bytes
    placement.check_fits(num_layers=trace.num_layers, num_experts=trace.num_experts)
    T, L, K = trace.experts_TLK.shape
    G, P = placement.num_gpus, placement.cluster.gpus_per_node
    experts_TLK = trace.experts_TLK.astype(np.int64)
    layer_L = np.arange(L)
    pred_TL = _predictions(trace, placement, predictor) if strategy == "tp_speculative" else None

    chunk_rank_TL = np.empty((T, L), dtype=np.int64)
    C_L = np.zeros(L, dtype=np.int64)          # sum over steps of the chunk rows per rank
    if step_sizes is None:
        step_sizes = [min(tokens_per_step, T - s0) for s0 in range(0, T, tokens_per_step)]
    elif sum(step_sizes) != T or min(step_sizes, default=1) < 1:
        raise InputError(f"step_sizes must be positive and add up to the trace's {T} tokens, got {sum(step_sizes)}")
    steps, s0 = 0, 0
    for Ts in step_sizes:
        steps += 1
        if pred_TL is None:
            order_GC = contiguous_chunks(Ts, G)
            chunk_rank_TL[s0:s0 + Ts] = chunk_ranks_T(order_GC, Ts)[:, None]
            C_L += order_GC.shape[1]
        else:
            for l in range(L):
                order_GC = balanced_chunks(pred_TL[s0:s0 + Ts, l], G, capacity_factor=capacity_factor)
                chunk_rank_TL[s0:s0 + Ts, l] = chunk_ranks_T(order_GC, Ts)
                C_L[l] += order_GC.shape[1]
        s0 += Ts
    wire_rows_L, padding_L = (G - 1) * G * C_L, G * C_L - T

    choice_LEG = placement.copy_choice_LEG
    ranks_TLK = choice_LEG[layer_L[None, :, None], experts_TLK, chunk_rank_TL[:, :, None]]
    sorted_TLK = np.sort(ranks_TLK, axis=-1)
    first_TLK = np.ones_like(sorted_TLK, dtype=bool)
    first_TLK[..., 1:] = sorted_TLK[..., 1:] != sorted_TLK[..., :-1]
    src_TLK = np.broadcast_to(chunk_rank_TL[:, :, None], ranks_TLK.shape)
    sent_TLK = first_TLK & (sorted_TLK != src_TLK)
    lay_TLK = np.broadcast_to(layer_L[None, :, None], ranks_TLK.shape)
    flows_LGG = np.bincount(((lay_TLK * G + src_TLK) * G + sorted_TLK)[sent_TLK],
                            minlength=L * G * G).reshape(L, G, G).astype(np.int64)
    node_G = np.arange(G) // P
    cross_GG = node_G[:, None] != node_G[None, :]
    dispatch_L = flows_LGG.sum(axis=(1, 2))
    cross_dispatch_L = (flows_LGG * cross_GG).sum(axis=(1, 2))
    collective_L = np.full(L, (G - 1) * T, dtype=np.int64)
    last_off_L = (layer_L < L - 1).astype(np.int64)          # no all-gather after the last MoE layer
    transfers = {"rs": collective_L, "dispatch": dispatch_L, "combine": dispatch_L.copy(),
                 "ag": collective_L * last_off_L}
    wire = {"rs": wire_rows_L, "dispatch": dispatch_L.copy(), "combine": dispatch_L.copy(),
            "ag": wire_rows_L * last_off_L}
    cross_collective_L = np.full(L, (G - P) * T, dtype=np.int64)
    cross = {"rs": cross_collective_L, "dispatch": cross_dispatch_L, "combine": cross_dispatch_L.copy(),
             "ag": cross_collective_L * last_off_L}
    local_L = (ranks_TLK == chunk_rank_TL[:, :, None]).sum(axis=(0, 2)).astype(np.int64)
    predicted = hits = landed = None
    if pred_TL is not None:
        has_TL = pred_TL >= 0
        holds_TLK = placement.copies_LEG[layer_L[None, :, None], experts_TLK, np.maximum(pred_TL, 0)[:, :, None]]
        predicted = has_TL.sum(axis=0)
        hits = (has_TL & holds_TLK.any(axis=2)).sum(axis=0)
        landed = (has_TL & (chunk_rank_TL == pred_TL)).sum(axis=0)
    as_int = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return TPReport(
        strategy=strategy, num_tokens=T, top_k=K, nodes=placement.cluster.nodes, gpus_per_node=P,
        tokens_per_step=int(tokens_per_step), steps=steps,
        transfers_L={p: as_int(v) for p, v in transfers.items()}, wire_rows_L={p: as_int(v) for p, v in wire.items()},
        cross_node_L={p: as_int(v) for p, v in cross.items()}, padding_rows_L=as_int(padding_L),
        local_activations_L=local_L, dispatch_flows_LGG=flows_LGG, chunk_rank_TL=chunk_rank_TL,
        predicted_L=None if predicted is None else as_int(predicted), hits_L=None if hits is None else as_int(hits),
        landed_L=None if landed is None else as_int(landed), hidden_size=hidden_size, dtype_bytes=int(dtype_bytes),
        partial_bytes=int(partial_bytes),
        meta={"predictor": None if predictor is None else ("ngram_only" if predictor.ngram_only else "token+ngram")})


def chunk_ranks_T(order_GC: np.ndarray, num_tokens: int) -> np.ndarray:
    """int64 [Ts]: the rank whose chunk holds each step token (inverse of ``order_GC``)."""
    G, C = order_GC.shape
    flat = order_GC.reshape(-1)
    valid = flat >= 0
    rank_T = np.full(num_tokens, -1, dtype=np.int64)
    rank_T[flat[valid]] = np.repeat(np.arange(G), C)[valid]
    if (rank_T < 0).any():
        raise AssertionError("a step token is in no chunk")
    return rank_T


def _predictions(trace: RoutingTrace, placement: Placement, predictor) -> np.ndarray:
    """[T, L] the rank each token asks for at each MoE layer (-1: none)."""
    if predictor is None:
        raise InputError("tp_speculative needs a predictor (SpeculativePredictor.build; ngram_only=True for a "
                         "trace without vocabulary ids)")
    if (predictor.num_layers, predictor.num_gpus) != (trace.num_layers, placement.num_gpus):
        raise PlacementError(f"the predictor is for {predictor.num_layers} MoE layers x {predictor.num_gpus} "
                             f"GPUs, but the trace/placement have {trace.num_layers} x {placement.num_gpus}")
    predictor.check_placement(placement)
    L = trace.num_layers
    top1_TL = placement.expert_to_gpu_LE[np.arange(L)[None, :], trace.experts_TLK[:, :, 0].astype(np.int64)]
    ids_T = None if (predictor.ngram_only or not trace.has_token_ids) else trace.token_ids_T
    rank_TL, _ = predictor.predict_ranks(ids_T, top1_TL)
    return np.where(rank_TL >= 0, rank_TL, -1).astype(np.int64)


def dp_summary(report: CommReport) -> dict:
    """The comparison row of a DP-attention CommReport (no rs/ag; its bytes at the report's options)."""
    tl = report.token_layers
    h, b = report.options.hidden_size, report.transfer_bytes
    return {"strategy": report.strategy, "lar": report.lar, "rs_per_token_layer": 0.0,
            "dispatch_per_token_layer": float(report.dispatch_L.sum()) / tl,
            "combine_per_token_layer": float(report.combine_L.sum()) / tl, "ag_per_token_layer": 0.0,
            "transfers_per_token_layer": report.transfers_per_token_layer,
            "cross_node_per_token_layer": report.cross_node_transfers / tl,
            "bytes_per_token_layer": None if h is None else b / tl,
            "wire_bytes_per_token_layer": None if h is None else b / tl,
            "padding_rows_per_step_layer": 0.0, "accuracy_L": None, "landed_L": None}


@dataclass(frozen=True)
class TPComparison:
    """tp_speculative vs tp_two_a2a vs the DP two_a2a baseline on one (trace, placement)."""

    tp_speculative: TPReport | None
    tp_two_a2a: TPReport
    dp: CommReport

    def rows(self) -> list[dict]:
        rows = [] if self.tp_speculative is None else [self.tp_speculative.summary()]
        rows += [self.tp_two_a2a.summary(), dp_summary(self.dp)]
        base = self.tp_two_a2a.per_token_layer("dispatch")
        for r in rows:
            r["dispatch_vs_tp_two_a2a"] = r["dispatch_per_token_layer"] / base if base else None
        return rows

    def to_dict(self) -> dict:
        return {"rows": self.rows(), "tp_two_a2a": self.tp_two_a2a.to_dict(), "dp_two_a2a": self.dp.to_dict(),
                "tp_speculative": None if self.tp_speculative is None else self.tp_speculative.to_dict()}


def compare_tp(trace: RoutingTrace, placement: Placement, *, predictor=None, tokens_per_step: int = 64,
               hidden_size: int | None = None, dtype_bytes: int = 2, partial_bytes: int | None = None,
               capacity_factor: float = 1.0) -> TPComparison:
    """tp_speculative (when ``predictor`` is given; ``capacity_factor`` as its chunks) and tp_two_a2a
    (simulate_tp) beside DP two_a2a (placement/simulate.py, default home ranks: seq_id % G, else row % G)."""
    kw = dict(tokens_per_step=tokens_per_step, hidden_size=hidden_size, dtype_bytes=dtype_bytes,
              partial_bytes=partial_bytes)
    spec = None if predictor is None else simulate_tp(trace, placement, strategy="tp_speculative",
                                                      predictor=predictor, capacity_factor=capacity_factor, **kw)
    base = simulate_tp(trace, placement, strategy="tp_two_a2a", **kw)
    dp = simulate(trace, placement, Strategy.TWO_A2A, options=SimOptions(hidden_size=hidden_size,
                                                                          dtype_bytes=dtype_bytes))
    return TPComparison(spec, base, dp)
