"""Traffic simulator: replay a routing trace under (placement, strategy, cluster) -> CommReport.

Shapes: T tokens, L MoE layers, K experts per token, E experts, G GPUs (= EP ranks), N nodes.

    trace + placement --> ranks_TLK = expert_to_gpu[l, experts_TLK]
        --> home_T (given | seq_id % G | row % G | predicted from the prompt for speculative_two_a2a)
        --> start rank of each token (home | previous position's final anchor | predicted)
        --> position rank c_TL, anchor rank a_TL
        --> per token-layer: dispatch |R \\ {c}|, combine |R \\ {a}|, cross-node, local activations
        --> transport (placement/transport.py): which rank sends each transfer to which, per phase
        --> CommReport (per-layer arrays, per-phase [L, G, G] flows, totals)

The traffic model (binding: the comm runtime's counters must equal these numbers on a replayed trace).
Per token t and MoE layer l: its K experts e_1..e_K in router-weight order (highest first), their ranks
r_k = expert_to_gpu[l, e_k] (EP rank r serves GPU r), R = set{r_1..r_K}. A transfer is one hidden-state
vector (H elements) from one rank to another, sent once per destination rank per token (deduplicated). Each
token has a position rank c (where its hidden state is when layer l starts) and an anchor rank a (where its
expert outputs are summed and where it lives after layer l):
    dispatch transfers  = |R \\ {c}|      (c sends the token's residual hidden state to each other expert rank)
    combine transfers   = |R \\ {a}|      (each expert rank other than a sends ONE partial weighted sum to a)
    the token's position for layer l+1 = a
    local activations (for LAR) = #{k : r_k == c}
    cross-node transfers: those whose source and destination ranks lie on different nodes.
- two_a2a (baseline, DeepSpeed-MoE style): c = a = home rank h at every layer. 2 all-to-all calls per layer.
- coherent (ExFlow): decode tokens: a = r_1 (the rank of the highest-weight expert; every rank in R gives
  the same combine count |R|-1, ties go to the largest router weight), or, when the placement carries an
  anchor table, the r_k the table scores highest (placement/anchor.py; ties to the smallest k). At the start of a decode step the
  token is on the rank where its previous token was sampled, i.e. the final anchor (last MoE layer) of the
  same sequence's previous position; if that previous position is not a decode token (first decode token
  after prefill, or absent from the trace), it starts on its home rank. For l > 0, c = the anchor of l-1.
  All-to-all calls per layer: 1 when K == 1, 2 when K > 1. Prefill tokens in every strategy use the
  two_a2a rule (c = a = home) and then share their K/V.
- speculative: as coherent, but a decode token starts the step on the rank the predictor gives for its
  first MoE layer (from its vocabulary id) when that prediction is confident; otherwise as coherent.
- speculative_two_a2a: as two_a2a, but a sequence's home rank is the rank its prompt tokens are predicted to
  use most (over all MoE layers; ties to the lowest rank; a prompt with no known token keeps the default).
- Home rank default (when not given): seq_id % G if the trace has seq_ids, else row index % G.
- Coherence (coherent/speculative): every new K/V entry (per token per attention layer) is copied to the
  other G-1 ranks, reported separately as KV-entry copies and bytes when the entry size is known. Sampled
  ids are all-gathered: G-1 copies per sampled token (each decode token, plus the last prefill token of each
  sequence), 8 bytes each (int64), reported separately.
- Transports (placement/transport.py, exact): a2a and fixed move the rows above directly (phases
  ``dispatch``, ``combine``); node_aware relays them (phases ``dispatch``, ``dispatch_intra``,
  ``combine_intra``, ``combine``) with the same totals and fewer cross-node transfers. ``dispatch_L`` /
  ``combine_L`` count every transfer of the dispatch / combine phases (forwarded hops included),
  ``cross_node_*`` those between nodes, ``flows_LGG[phase]`` the same by (source, destination) rank.
  Data all-to-alls per layer: a2a/fixed 1 per direction (dispatch; combine unless coherent top-1), node_aware
  2 per direction (1 on one GPU per node: nothing to forward); counts exchanges per layer: 1, fixed 0.
  K/V copies crossing nodes: a2a/fixed send each entry to the G - gpus_per_node ranks of other nodes;
  node_aware sends it once to each other node (N - 1), which forwards it inside (total copies unchanged).
- Metrics: transfers per token-layer = (dispatch + combine) / (T x L); LAR = local activations / (T x L x K);
  top-1 cross-GPU rate = fraction of (t, l -> l+1) with expert_to_gpu[l, e_1(t,l)] !=
  expert_to_gpu[l+1, e_1(t,l+1)] (placement only); per-GPU load per layer = activations per GPU.

Which tokens are prefill is not in the trace format: pass ``prefill_T`` (default: every token is a decode
token, one token per sequence per step). A sequence is (seq_id) ordered by ``positions`` (row order where the
trace has no positions); a trace without seq_ids makes every row its own sequence. The "prompt" of a sequence
for speculative_two_a2a is its prefill tokens, or its first token in the trace when none is marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from placement.anchor import choose_anchors
from placement.errors import InputError, PlacementError, TraceError, parse_enum
from placement.placement import Placement
from placement.trace import RoutingTrace
from placement.transport import COMBINE_PHASES, DISPATCH_PHASES, Transport, phase_flows

SAMPLED_ID_BYTES = 8  # int64 token ids


class Strategy(Enum):
    TWO_A2A = "two_a2a"
    COHERENT = "coherent"
    SPECULATIVE = "speculative"
    SPECULATIVE_TWO_A2A = "speculative_two_a2a"

    @property
    def coherent(self) -> bool:
        """Tokens stay at their anchor between layers and steps (K/V replicated)."""
        return self in (Strategy.COHERENT, Strategy.SPECULATIVE)

    @property
    def needs_predictor(self) -> bool:
        return self in (Strategy.SPECULATIVE, Strategy.SPECULATIVE_TWO_A2A)

    @classmethod
    def parse(cls, name: str) -> "Strategy":
        return parse_enum(cls, name, "strategy")


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    hidden_size: int | None = None       # H: bytes are reported when known
    dtype_bytes: int = 2                  # bytes per hidden-state element (bf16)
    kv_entry_bytes: int | None = None     # bytes of one token's K and V at one attention layer
    attention_layers: int | None = None   # attention layers per token (default: the trace's MoE layers)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "kv_entry_bytes", "attention_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise InputError(f"simulation option {name} must be a positive integer, got {value!r}")
        if not isinstance(self.dtype_bytes, (int, np.integer)) or self.dtype_bytes < 1:
            raise InputError(f"simulation option dtype_bytes must be a positive integer, got {self.dtype_bytes!r}")


@dataclass(frozen=True, eq=False)
class CommReport:
    """Simulated traffic of one (trace, placement, strategy). Per-layer arrays are int64 counts."""

    strategy: str
    num_tokens: int
    top_k: int
    nodes: int
    gpus_per_node: int
    dispatch_L: np.ndarray
    combine_L: np.ndarray
    cross_node_dispatch_L: np.ndarray
    cross_node_combine_L: np.ndarray
    local_activations_L: np.ndarray
    top1_cross_L: np.ndarray          # [L-1] tokens whose top-1 GPU changes from l to l+1
    load_LG: np.ndarray               # [L, G] activations per GPU
    a2a_calls_per_layer: int          # data all-to-alls per MoE layer (counts exchanges not included)
    kv_entry_copies: int
    sampled_id_copies: int
    options: SimOptions = field(default_factory=SimOptions)
    transport: str = Transport.A2A.value
    flows_LGG: dict = field(default_factory=dict)   # phase -> int64 [L, G, G] transfers (source, destination)
    held_LG: np.ndarray | None = None # [L, G] tokens on each rank when layer l starts (where attention runs)
    counts_exchanges_per_layer: int = 1
    kv_cross_node_copies: int = 0     # K/V entry copies that cross nodes (node_aware: one per other node)

    @property
    def num_layers(self) -> int:
        return len(self.dispatch_L)

    @property
    def token_layers(self) -> int:
        return self.num_tokens * self.num_layers

    @property
    def transfers(self) -> int:
        return int(self.dispatch_L.sum() + self.combine_L.sum())

    @property
    def transfers_per_token_layer(self) -> float:
        return self.transfers / self.token_layers

    @property
    def cross_node_transfers(self) -> int:
        return int(self.cross_node_dispatch_L.sum() + self.cross_node_combine_L.sum())

    @property
    def lar(self) -> float:
        return float(self.local_activations_L.sum()) / (self.token_layers * self.top_k)

    @property
    def top1_cross_gpu_rate(self) -> float:
        steps = self.num_tokens * (self.num_layers - 1)
        return float(self.top1_cross_L.sum()) / steps if steps else 0.0

    @property
    def load_max_over_mean_L(self) -> np.ndarray:
        return self.load_LG.max(axis=1) / self.load_LG.mean(axis=1)

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(self.flows_LGG)

    def phase_transfers_L(self, phase: str) -> np.ndarray:
        """[L] transfers of one phase (dispatch, dispatch_intra, combine_intra, combine)."""
        return self.flows_LGG[phase].sum(axis=(1, 2))

    def phase_cross_node_L(self, phase: str) -> np.ndarray:
        """[L] transfers of one phase whose source and destination lie on different nodes."""
        return (self.flows_LGG[phase] * self.cross_node_GG).sum(axis=(1, 2))

    @property
    def cross_node_GG(self) -> np.ndarray:
        """[G, G] bool: ranks s and d lie on different nodes."""
        node_G = np.arange(self.nodes * self.gpus_per_node) // self.gpus_per_node
        return node_G[:, None] != node_G[None, :]

    @property
    def transfer_bytes(self) -> int | None:
        h = self.options.hidden_size
        return None if h is None else self.transfers * h * self.options.dtype_bytes

    @property
    def kv_bytes(self) -> int | None:
        b = self.options.kv_entry_bytes
        return None if b is None else self.kv_entry_copies * b

    def to_dict(self) -> dict:
        per_layer = {name: getattr(self, name).tolist() for name in
                     ("dispatch_L", "combine_L", "cross_node_dispatch_L", "cross_node_combine_L",
                      "local_activations_L", "top1_cross_L", "load_LG")}
        return {
            "strategy": self.strategy, "tokens": self.num_tokens, "moe_layers": self.num_layers,
            "top_k": self.top_k, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
            "transfers": self.transfers, "dispatch": int(self.dispatch_L.sum()),
            "combine": int(self.combine_L.sum()), "transfers_per_token_layer": self.transfers_per_token_layer,
            "transfer_bytes": self.transfer_bytes, "cross_node_transfers": self.cross_node_transfers,
            "lar": self.lar, "top1_cross_gpu_rate": self.top1_cross_gpu_rate,
            "load_max_over_mean": float(self.load_max_over_mean_L.max()),
            "load_max_over_mean_avg": float(self.load_max_over_mean_L.mean()),
            "a2a_calls_per_layer": self.a2a_calls_per_layer,
            "transport": self.transport, "counts_exchanges_per_layer": self.counts_exchanges_per_layer,
            "kv_entry_copies": self.kv_entry_copies, "kv_bytes": self.kv_bytes,
            "kv_cross_node_copies": self.kv_cross_node_copies,
            "phases": {p: {"transfers": int(self.phase_transfers_L(p).sum()),
                           "cross_node": int(self.phase_cross_node_L(p).sum())} for p in self.phases},
            "sampled_id_copies": self.sampled_id_copies,
            "sampled_id_bytes": self.sampled_id_copies * SAMPLED_ID_BYTES,
            "per_layer": per_layer,
        }


def simulate(trace: RoutingTrace, placement: Placement, strategy: Strategy, *,
             predictor=None, home_rank_T: np.ndarray | None = None, prefill_T: np.ndarray | None = None,
             options: SimOptions = SimOptions(), transport: Transport = Transport.A2A) -> CommReport:
    """Replay ``trace`` under ``placement`` with ``strategy`` and ``transport``, following the traffic model
    exactly (this docstring and placement/transport.py's).

    ``predictor`` (a ``SpeculativePredictor``) is required by the speculative strategies; ``home_rank_T``
    ([T] ints in [0, G)) overrides the default home ranks; ``prefill_T`` ([T] bools) marks prefill tokens.
    ``node_aware`` on a one-node cluster is refused (InputError): it has no other node to relay through.
    """
    placement.check_fits(num_layers=trace.num_layers, num_experts=trace.num_experts)
    T, L, K = trace.experts_TLK.shape
    G, cluster = placement.num_gpus, placement.cluster
    if not isinstance(transport, Transport):
        raise InputError(f"transport must be a Transport, got {transport!r}")
    if transport is Transport.NODE_AWARE and cluster.nodes < 2:
        raise InputError(f"transport node_aware needs at least 2 nodes: the placement's cluster has 1 node of "
                         f"{cluster.gpus_per_node} GPUs, so no token ever crosses a node (use a2a or fixed)")
    ranks_TLK = placement.expert_to_gpu_LE[np.arange(L)[None, :, None], trace.experts_TLK.astype(np.int64)]
    prefill_T = _prefill_mask(prefill_T, T)
    seq_T, pos_T, prev_T = sequence_order(trace)
    if strategy.needs_predictor:
        _check_predictor(predictor, trace, placement)
    home_T = _home_ranks(trace, home_rank_T, G, seq_T)
    if strategy is Strategy.SPECULATIVE_TWO_A2A:
        home_T = _predicted_homes(trace, predictor, home_T, seq_T, pos_T, prefill_T)

    top1_TL = ranks_TLK[:, :, 0]
    if placement.has_replicas:   # where a token is decides which copy it uses: follow each token in order
        predicted_T = None
        if strategy is Strategy.SPECULATIVE:   # confident decode tokens start on the predicted rank
            rank_T, confident_T = predictor.predict_start_ranks(trace.token_ids_T)
            predicted_T = np.where(confident_T, rank_T, -1)
        ranks_TLK, pos_TL, anchor_TL = _replica_routes(trace, placement, home_T, prefill_T, prev_T,
                                                       coherent=strategy.coherent, predicted_start_T=predicted_T)
        top1_TL = ranks_TLK[:, :, 0]
    elif strategy.coherent:
        start_T = home_T.copy()
        chained_T = (prev_T >= 0) & ~prefill_T
        chained_T[chained_T] = ~prefill_T[prev_T[chained_T]]
        anchor_TL = top1_TL.copy() if placement.anchors is None else \
            placement.anchors.anchors_TL(trace.experts_TLK, ranks_TLK)
        start_T[chained_T] = anchor_TL[prev_T[chained_T], L - 1]
        if strategy is Strategy.SPECULATIVE:
            rank_T, confident_T = predictor.predict_start_ranks(trace.token_ids_T)
            start_T = np.where(confident_T, rank_T, start_T)
        pos_TL = np.concatenate([start_T[:, None], anchor_TL[:, :-1]], axis=1)
        pos_TL[prefill_T] = home_T[prefill_T, None]
        anchor_TL[prefill_T] = home_T[prefill_T, None]
    else:
        pos_TL = np.broadcast_to(home_T[:, None], (T, L))
        anchor_TL = pos_TL

    # Deduplicate ranks per token-layer: after sorting, a slot is a new destination if it differs from the
    # slot before it.
    sorted_TLK = np.sort(ranks_TLK, axis=-1)
    first_TLK = np.ones_like(sorted_TLK, dtype=bool)
    first_TLK[..., 1:] = sorted_TLK[..., 1:] != sorted_TLK[..., :-1]
    flows_LGG = phase_flows(sorted_TLK, first_TLK, np.ascontiguousarray(pos_TL), anchor_TL, transport=transport,
                            gpus_per_node=cluster.gpus_per_node, num_gpus=G)
    node_G = np.arange(G) // cluster.gpus_per_node
    cross_GG = node_G[:, None] != node_G[None, :]
    total_L = lambda phases: sum(flows_LGG[p].sum(axis=(1, 2)) for p in phases if p in flows_LGG)  # noqa: E731
    cross_L = lambda phases: sum((flows_LGG[p] * cross_GG).sum(axis=(1, 2))  # noqa: E731
                                 for p in phases if p in flows_LGG)
    local_L = (ranks_TLK == pos_TL[..., None]).sum(axis=(0, 2))
    top1_cross_L = (top1_TL[:, 1:] != top1_TL[:, :-1]).sum(axis=0)
    layer_TLK = np.broadcast_to(np.arange(L)[None, :, None], ranks_TLK.shape)
    load_LG = np.bincount((layer_TLK * G + ranks_TLK).ravel(), minlength=L * G).reshape(L, G)
    held_LG = np.bincount((np.arange(L)[None, :] * G + pos_TL).ravel(), minlength=L * G).reshape(L, G)

    if strategy.coherent:
        attention_layers = options.attention_layers or L
        entries = T * attention_layers
        kv_copies = entries * (G - 1)
        kv_cross = entries * ((cluster.nodes - 1) if transport is Transport.NODE_AWARE
                              else (G - cluster.gpus_per_node))
        last_prefill = int(np.unique(seq_T[prefill_T]).size)
        sampled_copies = (int((~prefill_T).sum()) + last_prefill) * (G - 1)
        directions = 1 if K == 1 else 2
    else:
        kv_copies, kv_cross, sampled_copies, directions = 0, 0, 0, 2
    two_stage = transport is Transport.NODE_AWARE and cluster.gpus_per_node > 1
    calls = directions * (2 if two_stage else 1)
    as_int = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return CommReport(
        strategy=strategy.value, num_tokens=T, top_k=K, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
        dispatch_L=as_int(total_L(DISPATCH_PHASES)), combine_L=as_int(total_L(COMBINE_PHASES)),
        cross_node_dispatch_L=as_int(cross_L(DISPATCH_PHASES)), cross_node_combine_L=as_int(cross_L(COMBINE_PHASES)),
        local_activations_L=as_int(local_L), top1_cross_L=as_int(top1_cross_L), load_LG=as_int(load_LG),
        a2a_calls_per_layer=calls, kv_entry_copies=kv_copies, sampled_id_copies=sampled_copies, options=options,
        transport=transport.value, flows_LGG=flows_LGG, held_LG=as_int(held_LG),
        counts_exchanges_per_layer=int(transport.needs_counts_exchange), kv_cross_node_copies=kv_cross)


def _replica_routes(trace: RoutingTrace, placement: Placement, home_T: np.ndarray, prefill_T: np.ndarray,
                    prev_T: np.ndarray, *, coherent: bool,
                    predicted_start_T: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranks_TLK, pos_TL, anchor_TL) with replicated experts: a token on GPU c uses copy choice[l, e, c]
    (placement/replicas.py). two_a2a: c is the home rank. coherent: c is where the token is, which is the
    previous layer's anchor (the top-1 copy, or with an anchor table the chosen copy the table scores highest:
    ``choose_anchors`` over the copies the token uses from c), and a decode token starts where the previous
    token of its sequence ended, so tokens are followed in waves of sequence order (vectorised within a wave).
    speculative: ``predicted_start_T`` ([T] rank, -1 where the prediction is not confident): a decode token with
    a prediction starts on that rank instead (and uses the copies chosen from there)."""
    T, L, K = trace.experts_TLK.shape
    choice_LEG = placement.copy_choice_LEG
    experts_TLK = trace.experts_TLK.astype(np.int64)
    layer_L1 = np.arange(L)[:, None]
    if not coherent:
        pos_TL = np.broadcast_to(home_T[:, None], (T, L))
        ranks_TLK = choice_LEG[layer_L1[None], experts_TLK, home_T[:, None, None]]
        return ranks_TLK, pos_TL, pos_TL
    score_LEG = None if placement.anchors is None else placement.anchors.score_LEG
    ranks_TLK = np.empty((T, L, K), dtype=np.int64)
    pos_TL, anchor_TL = np.empty((T, L), dtype=np.int64), np.empty((T, L), dtype=np.int64)
    chained_T = (prev_T >= 0) & ~prefill_T
    chained_T[chained_T] = ~prefill_T[prev_T[chained_T]]
    done_T = np.zeros(T, dtype=bool)
    wave_T = ~chained_T
    while wave_T.any():
        w = np.flatnonzero(wave_T)
        where_W = np.where(chained_T[w], anchor_TL[prev_T[w], L - 1] if L else 0, home_T[w])
        if predicted_start_T is not None:
            p_W = predicted_start_T[w]
            where_W = np.where((p_W >= 0) & ~prefill_T[w], p_W, where_W)
        for l in range(L):
            pos_TL[w, l] = where_W
            ranks_TLK[w, l] = choice_LEG[l][experts_TLK[w, l], where_W[:, None]]
            decode_W = ranks_TLK[w, l, 0] if score_LEG is None else \
                choose_anchors(score_LEG[l], experts_TLK[w, l], ranks_TLK[w, l])
            where_W = np.where(prefill_T[w], home_T[w], decode_W)
            anchor_TL[w, l] = where_W
        done_T[w] = True
        wave_T = chained_T & ~done_T & done_T[np.maximum(prev_T, 0)]
    if not done_T.all():
        raise AssertionError("a sequence's tokens form a cycle (sequence_order is broken)")
    return ranks_TLK, pos_TL, anchor_TL


def sequence_order(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq_T, pos_T, prev_T): each token's sequence id and position, and the row of the same sequence's
    previous position (-1 where that position is not in the trace). Without seq_ids every row is its own
    sequence (position 0); without positions a sequence's rows are in order of appearance."""
    T = trace.num_tokens
    if trace.seq_ids_T is None:
        return np.arange(T, dtype=np.int64), np.zeros(T, dtype=np.int64), np.full(T, -1, dtype=np.int64)
    seq_T = trace.seq_ids_T.astype(np.int64)
    if trace.positions_T is not None:
        pos_T = trace.positions_T.astype(np.int64)
    else:  # order of appearance within each sequence
        order = np.argsort(seq_T, kind="stable")
        starts = np.r_[0, np.flatnonzero(np.diff(seq_T[order])) + 1]
        run_start = np.repeat(starts, np.diff(np.r_[starts, T]))
        pos_T = np.empty(T, dtype=np.int64)
        pos_T[order] = np.arange(T) - run_start
    key_T = seq_T * (int(pos_T.max()) + 2) + pos_T
    order = np.argsort(key_T, kind="stable")
    sorted_keys = key_T[order]
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(dup):
        row = order[dup[0] + 1]
        raise TraceError(f"seq_id {int(seq_T[row])} position {int(pos_T[row])} appears twice in the trace "
                         f"(rows {int(order[dup[0]])} and {int(row)})")
    idx = np.searchsorted(sorted_keys, key_T - 1)
    found = (idx < T) & (sorted_keys[np.minimum(idx, T - 1)] == key_T - 1) & (pos_T > 0)
    prev_T = np.where(found, order[np.minimum(idx, T - 1)], -1)
    return seq_T, pos_T, prev_T


def _prefill_mask(prefill_T, T: int) -> np.ndarray:
    if prefill_T is None:
        return np.zeros(T, dtype=bool)
    prefill_T = np.asarray(prefill_T)
    if prefill_T.shape != (T,) or prefill_T.dtype != bool:
        raise InputError(f"prefill mask must be a bool array of shape [{T}], got {prefill_T.dtype} "
                         f"{prefill_T.shape}")
    return prefill_T


def _home_ranks(trace: RoutingTrace, home_rank_T, G: int, seq_T: np.ndarray) -> np.ndarray:
    if home_rank_T is None:
        return (seq_T % G).astype(np.int64)
    home_T = np.asarray(home_rank_T)
    if home_T.shape != (trace.num_tokens,) or not np.issubdtype(home_T.dtype, np.integer):
        raise InputError(f"home ranks must be an integer array of shape [{trace.num_tokens}], got "
                         f"{home_T.dtype} {home_T.shape}")
    if len(home_T) and (home_T.min() < 0 or home_T.max() >= G):
        raise InputError(f"home ranks must lie in [0, {G}), got values in [{home_T.min()}, {home_T.max()}]")
    return home_T.astype(np.int64)


def _check_predictor(predictor, trace: RoutingTrace, placement: Placement) -> None:
    if not trace.has_token_ids:
        raise TraceError("the trace has no vocabulary ids (token_ids), which the speculative strategies need; "
                         "record a trace with token ids or use two_a2a / coherent")
    if predictor is None:
        raise InputError("the speculative strategies need a predictor (built from a trace with token ids)")
    if (predictor.num_layers, predictor.num_gpus) != (trace.num_layers, placement.num_gpus):
        raise PlacementError(f"the predictor is for {predictor.num_layers} MoE layers x {predictor.num_gpus} "
                             f"GPUs, but the trace/placement have {trace.num_layers} x {placement.num_gpus}")
    predictor.check_placement(placement)


def _predicted_homes(trace, predictor, home_T, seq_T, pos_T, prefill_T) -> np.ndarray:
    """Per sequence: the rank its prompt tokens are predicted to use most (host loop over sequences: offline)."""
    home_T = home_T.copy()
    order = np.lexsort((pos_T, seq_T))
    bounds = np.flatnonzero(np.diff(seq_T[order])) + 1
    for rows in np.split(order, bounds):
        prompt = rows[prefill_T[rows]] if prefill_T[rows].any() else rows[:1]
        home_T[rows] = predictor.predict_home_rank(trace.token_ids_T[prompt], default=int(home_T[rows[0]]))
    return home_T
