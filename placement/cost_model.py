"""Cost model: simulated traffic (CommReport) + model shape + hardware profile -> modelled step time.

Shapes: L MoE layers of the trace, G ranks, P ranks per node, N nodes, W sequences in a step, Y K/V groups.

    CommReport.flows_LGG[phase] (transfers over the trace) x tokens_per_step / T  --> rows per step
        x row bytes (comm/wire.py: dispatch: hidden x dtype + top-k ids int32 + weights fp32 + token int32 +
                     anchor int32; combine: token int32 + hidden x dtype)           --> bytes [L, G, G] per phase
    every collective the runtime makes, per MoE layer and per step (the table below), as (payload [G, G],
    directed messages [G, G]: the pairs of ranks the call connects, an empty message included):
        link bytes of a pair on class c = payload x (1 + payload_overhead_c) + message_overhead_c x (messages
            of the pair in either direction) / 2
        per link class c present in the call: bottleneck_c = max over ranks (over nodes if the link is shared
        per node) of max(link bytes sent, received) on class c
        time = host_s + max over c of (alpha_c + alpha_per_peer_c x peers_c + bottleneck_c / beta_c)
    step = the profile's step_fixed_s (measured compute + host; the link model cannot give it) + step_s +
        the collectives' time - the token bucket's refill: a tbf link (burst_bytes > 0) refills while the step
        computes, so up to min(step_fixed_s, calls x burst / beta) seconds of its byte time pass meanwhile
    --> CostBreakdown (per phase, per layer, per step; bottleneck class; link and payload bytes per class)

    collective              group          when                       payload / messages
    counts (exchange)       world          a2a, node_aware: per layer equal splits of C int64 per peer (below)
    dispatch, combine       world          per layer                  the flows / every pair
    dispatch_intra,         node (world    node_aware, per layer      the flows / the node's pairs (RuntimeWire.
      combine_intra          before 84fe1de)                          node_groups False: every pair)
    fixed dispatch/combine  world          per layer                  capacity rows to every peer
    plan (broadcast)        world (gloo)   per step                   rank 0's plan frame along gloo's binomial tree
    sampled_ids (all-gather) world         per step                   (W + Y + 1) int64 per rank, gloo's ring:
                                                                      2 (G - 1) half-chunk messages per ring edge
    kv_copy                 K/V group      coherent, per step         every rank's K/V rows to every peer
                                                                      (node_aware: once per other node, then the
                                                                      node's group)
    Counts per peer (comm/transport_counted.py _stage_sizes): tokens at home: 1 (+ 2P with node_aware's relays);
    tokens move: 1 + (relays: 2P) + (combine: (relays: 2P) + 2G) + ceil(T / 62) bitmap words.
    fixed: capacity = placement.transport.fixed_capacity(tokens, bound = the most tokens one rank holds:
    ceil(tokens / G) with two_a2a, whose homes the scheduler balances; tokens when they move), its factor doubled
    until the busiest pair fits (the runtime reruns a step that overflowed and keeps the doubled factor, so in
    steady state no step reruns).

Caveat: flows are the trace's mean per step, so the bottleneck of a small step is an expectation; it misses the
per-step fluctuation of the busiest rank (the model is optimistic for tiny batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from placement.errors import InputError
from placement.hardware import HardwareProfile, LinkProfile
from placement.simulate import CommReport, Strategy
from placement.transport import COMBINE_PHASES, DEFAULT_CAPACITY_FACTOR, Transport, fixed_capacity

CLASSES = ("intra_node", "inter_node")
COUNT_BYTES = 8                   # one int64 of the counts exchange
META_BYTES_PER_EXPERT = 4 + 4 + 4  # top-k id int32 + weight fp32 + chosen copy int32 (comm/wire.py dispatch_codec)
META_BYTES_PER_ROW = 4 + 4        # token int32 + anchor int32
COMBINE_META_BYTES = 4            # token int32 (comm/wire.py combine_codec)
KV_ROW_META_BYTES = 4 + 4         # token int32 + group int32 (epserve/engine/kv_coherence.py)
BITMAP_TOKENS_PER_WORD = 62       # anchored-token bitmap words of the counts exchange
# The step plan rank 0 broadcasts (epserve/engine/control.py): its compact encoding is about 54 B + 8 B per
# sequence for decode steps (measured with encode_plan: 62 B for 1 sequence, 118 B for 8, 342 B for 32), sent in a
# frame of the previous message's size + 4 B prefix + 25%, rounded up to 64 B, at least 128 B.
PLAN_BYTES_FIXED, PLAN_BYTES_PER_SEQUENCE = 54, 8
PLAN_FRAME_MIN, PLAN_FRAME_STEP, PLAN_LEN_BYTES = 128, 64, 4


@dataclass(frozen=True, kw_only=True)
class RuntimeWire:
    """How the runtime puts a step on the wire where that changed between versions (the defaults: the runtime as
    of 84fe1de). ``node_groups``: node_aware's in-node stages and K/V forwards run on per-node groups (before:
    on the world group, so they connected every pair of ranks, across nodes too). ``compact_counts``: the counts
    exchange sends the in-node stages' counts P wide and, when tokens stay home, no combine counts (before
    e4301f5: 2G per later stage)."""

    node_groups: bool = True
    compact_counts: bool = True


CURRENT_WIRE = RuntimeWire()
# The runtime bench/results/shaped_link.json was measured on (cf21b95).
WIRE_CF21B95 = RuntimeWire(node_groups=False, compact_counts=False)


def plan_frame_bytes(sequences: int) -> int:
    """Bytes of the step plan's broadcast frame for a decode step of ``sequences`` sequences (steady state: the
    frame is sized from the previous plan, which is the same size)."""
    message = PLAN_LEN_BYTES + PLAN_BYTES_FIXED + PLAN_BYTES_PER_SEQUENCE * sequences
    want = PLAN_LEN_BYTES + message + message // 4
    return max(PLAN_FRAME_MIN, -(-want // PLAN_FRAME_STEP) * PLAN_FRAME_STEP)


def counts_per_peer(transport: Transport, *, tokens_move: bool, needs_combine: bool, gpus_per_node: int,
                    world_size: int, tokens_per_step: int, wire: RuntimeWire = CURRENT_WIRE) -> int:
    """int64 values the counts exchange sends each peer per MoE layer (comm/transport_counted.py _stage_sizes)."""
    G, P = world_size, gpus_per_node
    relays = transport is Transport.NODE_AWARE and 1 < P < G
    combine_counts = needs_combine and (tokens_move or not wire.compact_counts)   # else mirrored from dispatch
    later = (["dispatch_intra"] if relays else []) + \
        ((["combine_intra"] if relays else []) + ["combine"] if combine_counts else [])
    width = {"combine": G, "dispatch_intra": P, "combine_intra": P} if wire.compact_counts else \
        dict.fromkeys(later, G)
    words = -(-tokens_per_step // BITMAP_TOKENS_PER_WORD) if tokens_move else 0
    return 1 + sum(2 * width[s] for s in later) + words


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the cost model needs of a model. kv_entry_bytes: one token's cached K/V at one attention layer."""

    hidden_size: int
    top_k: int
    moe_layers: int
    attention_layers: int
    kv_entry_bytes: int
    dtype_bytes: int = 2
    num_experts: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "top_k", "moe_layers", "attention_layers", "kv_entry_bytes", "dtype_bytes"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"model shape {key} must be a positive integer, got {value!r}")
        if self.moe_layers > self.attention_layers:
            raise InputError(f"model shape has {self.moe_layers} MoE layers but only {self.attention_layers} "
                             f"attention layers")

    @classmethod
    def from_fields(cls, *, hidden_size: int, num_layers: int, moe_layers: int, top_k: int, dtype_bytes: int = 2,
                    num_kv_heads: int | None = None, head_dim: int | None = None, kv_latent_dim: int | None = None,
                    num_experts: int | None = None, name: str = "") -> "ModelShape":
        """From config fields (plain ints, as epserve's ModelConfig has them). K/V per token-layer: MLA caches
        ``kv_latent_dim`` values (DeepSeek: kv_lora_rank + qk_rope_head_dim = 576), else 2 x kv heads x head_dim."""
        if kv_latent_dim is not None:
            kv_values = kv_latent_dim
        elif num_kv_heads is not None and head_dim is not None:
            kv_values = 2 * num_kv_heads * head_dim
        else:
            raise InputError("model shape needs num_kv_heads and head_dim (or kv_latent_dim for MLA)")
        return cls(hidden_size=hidden_size, top_k=top_k, moe_layers=moe_layers, attention_layers=num_layers,
                   kv_entry_bytes=kv_values * dtype_bytes, dtype_bytes=dtype_bytes, num_experts=num_experts,
                   name=name)

    @property
    def dispatch_row_bytes(self) -> int:
        return self.hidden_size * self.dtype_bytes + self.top_k * META_BYTES_PER_EXPERT + META_BYTES_PER_ROW

    @property
    def partial_dtype_bytes(self) -> int:
        """Partial sums cross in float32 for top-k >= 3 in a 2-byte dtype (comm/partial_sums.py)."""
        return 4 if self.top_k >= 3 and self.dtype_bytes < 4 else self.dtype_bytes

    @property
    def combine_row_bytes(self) -> int:
        return self.hidden_size * self.partial_dtype_bytes + COMBINE_META_BYTES


@dataclass(frozen=True, kw_only=True)
class CostBreakdown:
    strategy: str
    transport: str
    hardware: str
    tokens_per_step: int
    phase_s: dict           # per step: phase (and counts, kv_copy, sampled_ids, fixed) -> seconds
    layer_s: float          # one MoE layer (mean over the trace's layers): its collectives
    step_s: float           # a whole step: MoE layers x layer_s + per-step collectives + fixed
    bottleneck: str         # the link class that set most of the time (intra_node / inter_node)
    class_s: dict           # seconds per step attributed to the class that set each collective's time
    bytes_per_step: dict    # class -> link bytes over that class per step, all ranks together (payload + the
                            # profile's overhead per message and per byte; both directions)
    collectives_per_step: int
    payload_bytes_per_step: dict = None   # class -> payload bytes only
    messages_per_step: dict = None        # class -> directed messages between ranks per step

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def predict(report: CommReport, *, model: ModelShape, hardware: HardwareProfile, tokens_per_step: int,
            capacity_factor: float = DEFAULT_CAPACITY_FACTOR, sequences_per_step: int | None = None,
            wire: RuntimeWire = CURRENT_WIRE) -> CostBreakdown:
    """Modelled time of one step of ``tokens_per_step`` tokens of ``report`` (one strategy x transport on a
    trace) from ``sequences_per_step`` sequences (default: one token each, a decode step), as the runtime
    ``wire`` puts it on the wire (module docstring)."""
    if not isinstance(tokens_per_step, (int, np.integer)) or tokens_per_step < 1:
        raise InputError(f"tokens per step must be a positive integer, got {tokens_per_step!r}")
    W = tokens_per_step if sequences_per_step is None else sequences_per_step
    if not isinstance(W, (int, np.integer)) or not 1 <= W <= tokens_per_step:
        raise InputError(f"sequences per step must be an integer in [1, tokens per step], got {W!r}")
    net = _Net(report, hardware)
    acc = _Tally()
    transport = Transport(report.transport)
    strategy = Strategy(report.strategy)
    scale = tokens_per_step / report.num_tokens
    L = report.num_layers
    per_layer = model.moe_layers / L                  # the trace's layers stand for the model's MoE layers
    phases = _running_phases(report)
    if transport is Transport.FIXED:
        capacity = _steady_capacity(report, net, tokens_per_step, scale, capacity_factor, strategy, phases)
    for phase in phases:
        row = model.combine_row_bytes if phase in COMBINE_PHASES else model.dispatch_row_bytes
        group = "node" if (transport is Transport.NODE_AWARE and phase in ("dispatch_intra", "combine_intra")
                           and wire.node_groups) else "world"
        if group == "node" and net.gpn == 1:
            continue
        for l in range(L):
            if transport is Transport.FIXED:
                payload_GG = np.where(net.eye, 0.0, capacity * row)
            else:
                payload_GG = report.flows_LGG[phase][l] * scale * row
            acc.add(phase, net.call(payload_GG, net.pairs[group]), per_layer)
    if transport.needs_counts_exchange:
        c = counts_per_peer(transport, tokens_move=strategy.coherent, needs_combine=_needs_combine(report),
                            gpus_per_node=net.gpn, world_size=net.G, tokens_per_step=tokens_per_step, wire=wire)
        call = net.call(np.where(net.eye, 0.0, c * COUNT_BYTES), net.pairs["world"])
        for _ in range(L):
            acc.add("counts", call, per_layer)
    layer_s = sum(acc.phase_s.values()) / model.moe_layers
    if strategy.coherent:
        _kv_copies(report, net, model, scale, transport, wire, acc)
    groups = model.moe_layers if strategy.coherent else 0
    acc.add("plan", net.broadcast(plan_frame_bytes(W)), 1.0)
    acc.add("sampled_ids", net.all_gather((W + groups + 1) * 8), 1.0)
    phase_s = dict(acc.phase_s)
    if hardware.step_s:
        phase_s["fixed"] = hardware.step_s
    if hardware.step_fixed_s:
        phase_s["compute"] = hardware.step_fixed_s
    for cls in net.all_classes:
        lp = net.link[cls]
        if lp.burst_bytes > 0 and cls in acc.direction_bytes:
            phase_s[f"{cls}_bucket"] = _bucket_correction(lp, acc, cls, hardware.step_fixed_s)
    return CostBreakdown(strategy=report.strategy, transport=report.transport, hardware=hardware.name,
                         tokens_per_step=int(tokens_per_step), phase_s=phase_s, layer_s=layer_s,
                         step_s=sum(phase_s.values()), bottleneck=max(acc.class_s, key=acc.class_s.get),
                         class_s=acc.class_s, bytes_per_step=acc.link_bytes, collectives_per_step=round(acc.calls),
                         payload_bytes_per_step=acc.payload_bytes, messages_per_step=acc.messages)


def choose(candidates: dict, *, model: ModelShape, hardware: HardwareProfile, tokens_per_step: int,
           baseline: tuple = (Strategy.TWO_A2A, Transport.A2A)) -> tuple[tuple, list[dict], str]:
    """Pick the fastest (Strategy, Transport) of ``candidates`` ({(Strategy, Transport): CommReport}) by
    modelled step time. Returns (best key, table rows sorted fastest first, a one-paragraph reason)."""
    if not candidates:
        raise InputError("nothing to choose from: no (strategy, transport) candidates")
    costs = {key: predict(r, model=model, hardware=hardware, tokens_per_step=tokens_per_step)
             for key, r in candidates.items()}
    ranked = sorted(costs, key=lambda k: (costs[k].step_s, k[0].value, k[1].value))
    base = costs.get(baseline)
    rows = [cost_row(costs[k], candidates[k], base) for k in ranked]
    best, c = ranked[0], costs[ranked[0]]
    why = (f"{best[0].value}+{best[1].value} has the lowest modelled communication time: "
           f"{c.step_s * 1e3:.3f} ms per step of {tokens_per_step} tokens ({c.layer_s * 1e6:.1f} us per MoE layer) "
           f"on {hardware.name}")
    if base is not None and best != baseline:
        why += f", {c.step_s / base.step_s:.2f}x the {baseline[0].value}+{baseline[1].value} baseline's " \
               f"{base.step_s * 1e3:.3f} ms"
    why += f"; its bottleneck is the {c.bottleneck.replace('_', '-')} link"
    if len(ranked) > 1:
        r2 = costs[ranked[1]]
        why += f"; runner-up {ranked[1][0].value}+{ranked[1][1].value} at {r2.step_s * 1e3:.3f} ms"
    inter = c.bytes_per_step["inter_node"]
    why += f". {inter / 1e6:.3f} MB cross nodes per step, {c.bytes_per_step['intra_node'] / 1e6:.3f} MB stay " \
           f"inside nodes; {c.collectives_per_step} collectives per step."
    return best, rows, why


def cost_row(cost: CostBreakdown, report: CommReport, base: CostBreakdown | None = None) -> dict:
    """One table row: the figures `epserve simulate --hardware` prints."""
    return {"strategy": cost.strategy, "transport": cost.transport, "layer_us": cost.layer_s * 1e6,
            "step_ms": cost.step_s * 1e3, "vs_baseline": None if base is None else cost.step_s / base.step_s,
            "bottleneck": cost.bottleneck, "intra_MB": cost.bytes_per_step["intra_node"] / 1e6,
            "inter_MB": cost.bytes_per_step["inter_node"] / 1e6, "collectives": cost.collectives_per_step,
            "cross_node_per_token_layer": report.cross_node_transfers / report.token_layers,
            "transfers_per_token_layer": report.transfers_per_token_layer}


COST_COLUMNS = (("strategy", "strategy", "{}"), ("transport", "transport", "{}"),
                ("layer_us", "us/MoE layer", "{:.1f}"), ("step_ms", "ms/step", "{:.3f}"),
                ("vs_baseline", "vs two_a2a+a2a", "{:.2f}x"), ("bottleneck", "bottleneck", "{}"),
                ("intra_MB", "intra-node MB/step", "{:.3f}"), ("inter_MB", "inter-node MB/step", "{:.3f}"),
                ("collectives", "collectives/step", "{:d}"))


def format_cost_table(rows: list[dict], columns=COST_COLUMNS) -> str:
    cells = [[h for _, h, _ in columns]]
    cells += [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    left = [fmt == "{}" for _, _, fmt in columns]          # text left, numbers right
    lines = ["  ".join(c.ljust(w) if left[i] else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- the network: link classes, bottleneck ranks ----------------------------------------------------------
@dataclass(frozen=True)
class _Call:
    seconds: float
    winner: str                # the class that set the time
    byte_s: dict               # class -> bottleneck bytes / beta
    direction_bytes: dict      # class -> link bytes each node (or rank) sends and receives [2 x nodes or ranks]
    link: dict                 # class -> link bytes (payload + overhead), all ranks, both directions
    payload: dict              # class -> payload bytes
    messages: dict             # class -> directed messages


class _Tally:
    """Sums of a step's collectives: seconds per phase and per winning class, bytes and messages per class."""

    def __init__(self) -> None:
        self.phase_s: dict[str, float] = {}
        self.class_s = {c: 0.0 for c in CLASSES}
        self.link_bytes = {c: 0.0 for c in CLASSES}
        self.payload_bytes = {c: 0.0 for c in CLASSES}
        self.messages = {c: 0.0 for c in CLASSES}
        self.direction_bytes: dict[str, np.ndarray] = {}
        self.winning_byte_s = {c: 0.0 for c in CLASSES}   # byte time of the calls each class set
        self.calls = 0.0

    def add(self, phase: str, call: _Call, weight: float) -> None:
        if not call.link:                                   # no call (one rank, or a node of one)
            return
        self.phase_s[phase] = self.phase_s.get(phase, 0.0) + call.seconds * weight
        self.class_s[call.winner] += call.seconds * weight
        for c in CLASSES:
            self.link_bytes[c] += call.link.get(c, 0.0) * weight
            self.payload_bytes[c] += call.payload.get(c, 0.0) * weight
            self.messages[c] += call.messages.get(c, 0.0) * weight
        self.calls += weight
        if call.winner in call.byte_s:
            self.winning_byte_s[call.winner] += call.byte_s[call.winner] * weight
        for c, v in call.direction_bytes.items():
            self.direction_bytes[c] = self.direction_bytes.get(c, 0.0) + v * weight


class _Net:
    def __init__(self, report: CommReport, hardware: HardwareProfile) -> None:
        self.N, self.gpn = report.nodes, report.gpus_per_node
        self.G = self.N * self.gpn
        self.node_G = np.arange(self.G) // self.gpn
        self.eye = np.eye(self.G, dtype=bool)
        same = self.node_G[:, None] == self.node_G[None, :]
        self.mask = {"intra_node": same & ~self.eye, "inter_node": ~same}
        self.pairs = {"world": (~self.eye).astype(float), "node": (same & ~self.eye).astype(float)}
        self.peers = {"intra_node": self.gpn - 1, "inter_node": self.G - self.gpn}
        self.link: dict[str, LinkProfile] = {"intra_node": hardware.intra_node, "inter_node": hardware.inter_node}
        self.host_s = hardware.host_s_per_collective
        self.all_classes = tuple(c for c in CLASSES if self.peers[c] > 0)

    def directions(self, bytes_GG: np.ndarray, cls: str) -> np.ndarray:
        """[2, ranks or nodes]: the bytes each end of class ``cls`` sends and receives."""
        b = np.where(self.mask[cls], bytes_GG, 0.0)
        sent, recv = b.sum(axis=1), b.sum(axis=0)
        if self.link[cls].shared_per_node:
            sent, recv = (np.bincount(self.node_G, weights=v, minlength=self.N) for v in (sent, recv))
        return np.stack([sent, recv])

    def bottleneck(self, bytes_GG: np.ndarray, cls: str) -> float:
        return float(self.directions(bytes_GG, cls).max())

    def call(self, payload_GG: np.ndarray, messages_GG: np.ndarray) -> _Call:
        """One collective: ``payload_GG`` bytes and ``messages_GG`` directed messages (source, destination).
        A message's overhead is split between its two directions (its data one way, the receive-ready notice and
        ACKs the other)."""
        classes = [c for c in self.all_classes if (np.where(self.mask[c], messages_GG + payload_GG, 0) > 0).any()]
        if not classes:                                    # one rank, or nothing between ranks: nothing to call
            return _Call(0.0, CLASSES[0], {}, {}, {}, {}, {})
        t, byte_s, link, payload, messages, directions = {}, {}, {}, {}, {}, {}
        for c in classes:
            lp, m = self.link[c], self.mask[c]
            wire_GG = np.where(m, payload_GG * (1 + lp.payload_overhead)
                               + lp.message_overhead_bytes * (messages_GG + messages_GG.T) / 2, 0.0)
            directions[c] = self.directions(wire_GG, c)
            byte_s[c] = float(directions[c].max()) / lp.beta_bytes_per_s
            t[c] = lp.alpha_s + lp.alpha_per_peer_s * self.peers[c] + byte_s[c]
            link[c] = float(wire_GG.sum())
            payload[c] = float(np.where(m, payload_GG, 0.0).sum())
            messages[c] = float(np.where(m, messages_GG, 0.0).sum())
        winner = max(t, key=t.get)
        return _Call(self.host_s + t[winner], winner, byte_s, directions, link, payload, messages)

    def broadcast(self, nbytes: float) -> _Call:
        """gloo's broadcast from rank 0: a binomial tree (rank v gets it from v - 2^floor(log2 v))."""
        edges = np.zeros((self.G, self.G))
        for v in range(1, self.G):
            edges[v - (1 << (v.bit_length() - 1)), v] = 1.0
        return self.call(edges * nbytes, edges)

    def all_gather(self, nbytes_per_rank: float) -> _Call:
        """gloo's all-gather: a ring (rank r sends to r + 1), 2 (G - 1) messages of half a rank's chunk per edge."""
        edges = np.zeros((self.G, self.G))
        if self.G > 1:
            edges[np.arange(self.G), (np.arange(self.G) + 1) % self.G] = 1.0
        return self.call(edges * (self.G - 1) * nbytes_per_rank, edges * 2 * (self.G - 1))


def _bucket_correction(lp: LinkProfile, acc: _Tally, cls: str, compute_s: float) -> float:
    """A token-bucket link (tc tbf) serves ``beta`` over the whole step: while the step computes (or another
    class sets a call's time) it refills its bucket, and a direction idle in one call bursts in the next. So its
    byte time is the busiest direction's bytes over the step / beta, less the refill during compute (at most one
    bucket per call), instead of the sum over calls of each call's busiest direction. Returns that time minus the
    byte time the calls it set already count (so the step's sum holds)."""
    busiest_s = float(acc.direction_bytes[cls].max()) / lp.beta_bytes_per_s
    refill_s = min(compute_s, acc.calls * lp.burst_bytes / lp.beta_bytes_per_s)
    return max(0.0, busiest_s - refill_s) - acc.winning_byte_s[cls]


def _needs_combine(report: CommReport) -> bool:
    stages = 2 if report.transport == Transport.NODE_AWARE.value and report.gpus_per_node > 1 else 1
    return report.a2a_calls_per_layer > stages


def _running_phases(report: CommReport) -> list[str]:
    """The phases that run a collective: the combine ones only when some token may need a combine."""
    combine = _needs_combine(report)
    return [p for p in report.flows_LGG if combine or p not in COMBINE_PHASES]


def _steady_capacity(report: CommReport, net: _Net, tokens: int, scale: float, factor: float, strategy: Strategy,
                     phases: list[str]) -> int:
    """fixed: rows per peer in steady state: fixed_capacity with the factor doubled until the busiest (source,
    destination) pair of any layer and phase fits, never more than the most tokens one rank holds (the runtime's
    bound: two_a2a: the busiest home rank's tokens; the scheduler admits a sequence to the least loaded home, so
    ceil(tokens / G), or the trace's busiest rank's mean tokens rounded down where its homes are less even;
    coherent: the step's tokens)."""
    need = max(float(np.where(net.eye, 0.0, report.flows_LGG[p]).max()) * scale for p in phases)
    busiest = math.floor(float(report.held_LG.max(axis=1).mean()) * scale + 1e-9)   # whole tokens, on average
    bound = tokens if strategy.coherent else max(1, math.ceil(tokens / net.G), busiest)
    while True:
        capacity = fixed_capacity(tokens, top_k=report.top_k, world_size=net.G, factor=factor, bound=bound)
        if capacity >= min(need, bound) or capacity >= bound:
            return capacity
        factor *= 2


def _kv_copies(report: CommReport, net: _Net, model: ModelShape, scale: float, transport: Transport,
               wire: RuntimeWire, acc: _Tally) -> None:
    """Coherent: every rank's K/V rows of the step (one per token and K/V group: token, group, the group's
    layers' entries) to every other rank in one all-to-all on the K/V group; node_aware: once to each other
    node's rank with the same local index, then forwarded inside the node (on the node's group)."""
    groups = model.moe_layers
    row = KV_ROW_META_BYTES + math.ceil(model.attention_layers / groups) * model.kv_entry_bytes
    rows_G = report.held_LG.sum(axis=0) * scale * groups / report.num_layers     # K/V rows computed per rank
    G, gpn = net.G, net.gpn
    if transport is Transport.NODE_AWARE:
        local_G = np.arange(G) % gpn
        peer_GG = (local_G[:, None] == local_G[None, :]) & net.mask["inter_node"]
        inter_GG = np.where(peer_GG, rows_G[:, None] * row, 0.0)
        acc.add("kv_copy", net.call(inter_GG, net.pairs["world"]), 1.0)
        if gpn > 1:
            have_G = rows_G * row + inter_GG.sum(axis=0)                          # own + received from other nodes
            intra_GG = np.where(net.mask["intra_node"], have_G[:, None], 0.0)
            acc.add("kv_copy", net.call(intra_GG, net.pairs["node" if wire.node_groups else "world"]), 1.0)
    else:
        acc.add("kv_copy", net.call(np.where(net.eye, 0.0, rows_G[:, None] * row), net.pairs["world"]), 1.0)
