"""Cost model: simulated traffic (CommReport) + model shape + hardware profile -> modelled communication time.

Shapes: L MoE layers of the trace, G ranks, N nodes, P phases (dispatch, dispatch_intra, combine_intra, combine).

    CommReport.flows_LGG[phase] (transfers over the trace) x tokens_per_step / T  --> rows per step
        x row bytes (dispatch: hidden x dtype + top-k ids int32 + weights fp32 + token int32 + anchor int32;
                     combine: hidden x dtype)                                       --> bytes [L, G, G] per phase
    per MoE layer, per collective (a phase, the counts exchange):
        per link class c present in the call: bottleneck_c = max over ranks (over nodes if the link is shared
        per node) of max(bytes sent, bytes received) on class c
        time = host_s + max over c of (alpha_c + alpha_per_peer_c x peers_c + bottleneck_c / beta_c)
        fixed: every call moves capacity rows per peer (placement.transport.fixed_capacity); a call whose
        busiest (source, destination) pair needs more runs again with doubled capacity (lossless)
    per step: MoE layers x mean layer time + K/V copies (coherent: one all-gather per step, node-deduplicated
        with node_aware) + the sampled-id all-gather (coherent) + the profile's fixed seconds per step
    --> CostBreakdown (per phase, per layer, per step; bottleneck class; bytes per class per step)

Caveat: flows are the trace's mean per step, so the bottleneck of a small step is an expectation; it misses the
per-step fluctuation of the busiest rank (the model is optimistic for tiny batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.errors import InputError
from placement.hardware import HardwareProfile, LinkProfile
from placement.simulate import SAMPLED_ID_BYTES, CommReport, Strategy
from placement.transport import COMBINE_PHASES, DEFAULT_CAPACITY_FACTOR, Transport, fixed_capacity

CLASSES = ("intra_node", "inter_node")
COUNTS_BYTES_PER_PEER = 16        # one int64 count + one side count per peer
META_BYTES_PER_EXPERT = 4 + 4     # top-k id int32 + weight fp32 (comm/wire.py dispatch_codec)
META_BYTES_PER_ROW = 4 + 4        # token int32 + anchor int32


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
    def combine_row_bytes(self) -> int:
        return self.hidden_size * self.dtype_bytes


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
    bytes_per_step: dict    # class -> bytes over that class per step, all ranks together
    collectives_per_step: int

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def predict(report: CommReport, *, model: ModelShape, hardware: HardwareProfile, tokens_per_step: int,
            capacity_factor: float = DEFAULT_CAPACITY_FACTOR) -> CostBreakdown:
    """Modelled communication time of ``report`` (one strategy x transport on a trace) for a step of
    ``tokens_per_step`` tokens (module docstring)."""
    if not isinstance(tokens_per_step, (int, np.integer)) or tokens_per_step < 1:
        raise InputError(f"tokens per step must be a positive integer, got {tokens_per_step!r}")
    net = _Net(report, hardware)
    transport = Transport(report.transport)
    scale = tokens_per_step / report.num_tokens
    L = report.num_layers
    phase_s: dict[str, float] = {}
    class_s = {c: 0.0 for c in CLASSES}
    bytes_step = {c: 0.0 for c in CLASSES}
    calls = 0
    capacity = fixed_capacity(tokens_per_step, top_k=report.top_k, world_size=net.G, factor=capacity_factor)
    for phase in _running_phases(report):
        row = model.combine_row_bytes if phase in COMBINE_PHASES else model.dispatch_row_bytes
        classes = net.classes_of(transport, phase)
        if not classes:
            continue
        total = 0.0
        for l in range(L):
            rows_GG = report.flows_LGG[phase][l] * scale
            if transport is Transport.FIXED:
                seconds, winner, moved, n = net.fixed_call(rows_GG, capacity, row, classes)
            else:
                seconds, winner, moved = net.call(rows_GG * row, classes)
                n = 1
            total += seconds
            class_s[winner] += seconds
            calls += n
            for c in classes:
                bytes_step[c] += moved[c]
        phase_s[phase] = total / L * model.moe_layers
    if transport.needs_counts_exchange:
        seconds, winner, moved = net.uniform_call(COUNTS_BYTES_PER_PEER, net.all_classes)
        phase_s["counts"] = seconds * model.moe_layers
        class_s[winner] += seconds * L
        for c, b in moved.items():
            bytes_step[c] += b * L
        calls += L
    layer_s = sum(phase_s.values()) / model.moe_layers
    for key in class_s:
        class_s[key] *= model.moe_layers / L
    bytes_step = {c: b * model.moe_layers / L for c, b in bytes_step.items()}
    calls = round(calls * model.moe_layers / L)
    if Strategy(report.strategy).coherent:
        calls += _per_step_copies(report, net, model, scale, transport, phase_s, class_s, bytes_step)
    if hardware.step_s:
        phase_s["fixed"] = hardware.step_s
    return CostBreakdown(strategy=report.strategy, transport=report.transport, hardware=hardware.name,
                         tokens_per_step=int(tokens_per_step), phase_s=phase_s, layer_s=layer_s,
                         step_s=sum(phase_s.values()), bottleneck=max(class_s, key=class_s.get), class_s=class_s,
                         bytes_per_step=bytes_step, collectives_per_step=calls)


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
class _Net:
    def __init__(self, report: CommReport, hardware: HardwareProfile) -> None:
        self.N, self.gpn = report.nodes, report.gpus_per_node
        self.G = self.N * self.gpn
        self.node_G = np.arange(self.G) // self.gpn
        same = self.node_G[:, None] == self.node_G[None, :]
        self.mask = {"intra_node": same & ~np.eye(self.G, dtype=bool), "inter_node": ~same}
        self.peers = {"intra_node": self.gpn - 1, "inter_node": self.G - self.gpn}
        self.link: dict[str, LinkProfile] = {"intra_node": hardware.intra_node, "inter_node": hardware.inter_node}
        self.host_s = hardware.host_s_per_collective
        self.all_classes = tuple(c for c in CLASSES if self.peers[c] > 0)

    def classes_of(self, transport: Transport, phase: str) -> tuple[str, ...]:
        """Link classes a phase's collective spans (node_aware's intra stages stay inside nodes, its combine
        crosses them only)."""
        if transport is Transport.NODE_AWARE and phase in ("dispatch_intra", "combine_intra"):
            return tuple(c for c in ("intra_node",) if self.peers[c] > 0)
        if transport is Transport.NODE_AWARE and phase == "combine":
            return ("inter_node",)
        return self.all_classes

    def bottleneck(self, bytes_GG: np.ndarray, cls: str) -> float:
        b = np.where(self.mask[cls], bytes_GG, 0.0)
        sent, recv = b.sum(axis=1), b.sum(axis=0)
        if self.link[cls].shared_per_node:
            sent, recv = (np.bincount(self.node_G, weights=v, minlength=self.N) for v in (sent, recv))
        return float(max(sent.max(), recv.max()))

    def call(self, bytes_GG: np.ndarray, classes) -> tuple[float, str, dict]:
        """One collective moving ``bytes_GG``: (seconds, the class that set them, bytes moved per class)."""
        if not classes:                                    # one rank: nothing to call
            return 0.0, CLASSES[0], {}
        t = {c: self.link[c].seconds(self.bottleneck(bytes_GG, c), self.peers[c]) for c in classes}
        winner = max(t, key=t.get)
        moved = {c: float(np.where(self.mask[c], bytes_GG, 0.0).sum()) for c in classes}
        return self.host_s + t[winner], winner, moved

    def uniform_call(self, bytes_per_peer: float, classes) -> tuple[float, str, dict]:
        return self.call(np.where(np.eye(self.G, dtype=bool), 0.0, float(bytes_per_peer)), classes)

    def fixed_call(self, rows_GG: np.ndarray, capacity: int, row_bytes: int, classes):
        """fixed: capacity rows per peer whatever is valid; doubled and rerun while a pair overflows."""
        seconds, n, moved_all = 0.0, 0, {c: 0.0 for c in classes}
        need = float(np.where(np.eye(self.G, dtype=bool), 0.0, rows_GG).max())
        while True:
            s, winner, moved = self.uniform_call(capacity * row_bytes, classes)
            seconds, n = seconds + s, n + 1
            for c in classes:
                moved_all[c] += moved[c]
            if need <= capacity:
                return seconds, winner, moved_all, n
            capacity *= 2


def _running_phases(report: CommReport) -> list[str]:
    """The phases that run a collective: the combine ones only when some token may need a combine."""
    stages = 2 if report.transport == Transport.NODE_AWARE.value and report.gpus_per_node > 1 else 1
    combine = report.a2a_calls_per_layer > stages
    return [p for p in report.flows_LGG if combine or p not in COMBINE_PHASES]


def _per_step_copies(report: CommReport, net: _Net, model: ModelShape, scale: float, transport: Transport,
                     phase_s: dict, class_s: dict, bytes_step: dict) -> int:
    """Coherent: K/V copies (one all-gather per step; node_aware: once to each other node, then inside it) and
    the sampled-id all-gather. Returns the collectives added."""
    B = model.kv_entry_bytes
    entries_G = report.held_LG.sum(axis=0) * scale * model.attention_layers / report.num_layers
    G, gpn, N = net.G, net.gpn, net.N
    if transport is Transport.NODE_AWARE:
        # stage 1: rank r -> the rank with its local index on every other node; stage 2: forward inside nodes
        local_G = np.arange(G) % gpn
        peer_GG = (local_G[:, None] == local_G[None, :]) & net.mask["inter_node"]
        inter_GG = np.where(peer_GG, entries_G[:, None] * B, 0.0)
        s1, w1, m1 = net.call(inter_GG, ("inter_node",))
        have_G = entries_G + inter_GG.sum(axis=0) / B          # own + received from other nodes
        intra_GG = np.where(net.mask["intra_node"], have_G[:, None] * B, 0.0)
        stages = [(s1, w1, m1)] + ([net.call(intra_GG, ("intra_node",))] if gpn > 1 else [])
    else:
        all_GG = np.where(np.eye(G, dtype=bool), 0.0, entries_G[:, None] * B)
        stages = [net.call(all_GG, net.all_classes)]
    phase_s["kv_copy"] = sum(s for s, _, _ in stages)
    for s, w, moved in stages:
        class_s[w] += s
        for c, b in moved.items():
            bytes_step[c] += b
    sampled = report.sampled_id_copies / max(1, G - 1) * scale     # sampled tokens per step
    s, w, moved = net.uniform_call(sampled / G * SAMPLED_ID_BYTES, net.all_classes)
    phase_s["sampled_ids"] = s
    class_s[w] += s
    for c, b in moved.items():
        bytes_step[c] += b
    return len(stages) + 1
