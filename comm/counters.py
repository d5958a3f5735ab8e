"""CommCounters: what this rank's collectives moved, per collective kind, phase and MoE layer.

Each collective call records one entry: ``calls`` += 1, ``rows`` (for hidden-state all-to-alls: transfers,
i.e. rows sent to OTHER ranks; ``cross_node_rows`` those sent to another node), ``payload_bytes`` (rows x H x dtype size: the hidden states alone) and
``wire_bytes`` (everything this rank put on the wire for the call, metadata included). Rows a rank keeps for
itself are never counted. Summing ``rows`` over the ranks of a group (:meth:`CommCounters.merged`) gives the
group's transfers, the number the placement simulator predicts.

Kinds: ``all_to_all`` (the data all-to-alls that move hidden states; phase ``dispatch`` or ``combine``),
``a2a_splits`` (the tiny counts exchange before a dispatch), ``kv_coherence`` (K/V rows copied to the other
ranks; rows = KV-entry copies, one per token x attention layer x destination), ``all_gather`` (sampled ids,
test-only logits, recorder).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CollKind(enum.Enum):
    ALL_TO_ALL = "all_to_all"
    A2A_SPLITS = "a2a_splits"
    KV_COHERENCE = "kv_coherence"
    ALL_GATHER = "all_gather"
    CONTROL = "control"            # step plans broadcast from rank 0 (CPU group)
    STATS = "stats"                # live statistics gathered over the CPU group
    WEIGHTS = "weights"            # expert weights moved between ranks by a live re-placement
    REDUCE_SCATTER = "reduce_scatter"   # tensor-parallel attention's partial outputs, summed per token chunk


@dataclass(kw_only=True)
class CollStat:
    calls: int = 0
    rows: int = 0
    cross_node_rows: int = 0      # rows whose destination is on another node
    payload_bytes: int = 0
    wire_bytes: int = 0

    def add(self, other: "CollStat", *, calls: bool = True) -> None:
        self.calls += other.calls if calls else 0
        self.rows += other.rows
        self.cross_node_rows += other.cross_node_rows
        self.payload_bytes += other.payload_bytes
        self.wire_bytes += other.wire_bytes

    def to_dict(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "cross_node_rows": self.cross_node_rows,
                "payload_bytes": self.payload_bytes, "wire_bytes": self.wire_bytes}


Key = tuple[CollKind, str, "int | None"]  # (kind, phase, MoE layer index or None)


class CommCounters:
    """Counts of one rank (or, after :meth:`merged`, of a whole group). Not thread-safe; one per Runner."""

    def __init__(self) -> None:
        self._stats: dict[Key, CollStat] = {}
        self._pending: list[tuple[Key, CollStat]] = []   # figures still on the device (fixed transport)

    def record(self, kind: CollKind, *, phase: str, layer: int | None, rows=0, cross_node_rows=0,
               payload_bytes=0, wire_bytes: int = 0, calls: int = 1) -> None:
        """Figures are ints, or device scalars (no host sync here: they are read when the counters are).
        ``calls=0``: a share of a call recorded under another key (one collective serving several layers)."""
        key = (kind, phase, layer)
        stat = self._stats.setdefault(key, CollStat())
        late = CollStat(rows=rows, cross_node_rows=cross_node_rows, payload_bytes=payload_bytes)
        if any(not isinstance(v, int) for v in (rows, cross_node_rows, payload_bytes)):
            self._pending.append((key, late))
            late = CollStat()
        late.calls, late.wire_bytes = calls, wire_bytes
        stat.add(late)

    def _resolve(self) -> None:
        """Bring device figures to the host (a sync: only when someone reads the counters)."""
        pending, self._pending = self._pending, []
        for key, late in pending:
            self._stats[key].add(CollStat(**{k: int(v) for k, v in late.to_dict().items()}), calls=False)

    def reset(self) -> None:
        self._stats.clear()
        self._pending.clear()

    def total(self, kind: CollKind | None = None, *, phase: str | None = None, layer: int | None = -1) -> CollStat:
        """Sum over the entries matching ``kind``/``phase``/``layer`` (None matches any kind/phase;
        ``layer=-1`` matches any layer, ``layer=None`` only entries that belong to no layer)."""
        self._resolve()
        out = CollStat()
        for (k, p, lay), stat in self._stats.items():
            if (kind is None or k is kind) and (phase is None or p == phase) and (layer == -1 or lay == layer):
                out.add(stat)
        return out

    def layers(self) -> list[int]:
        self._resolve()
        return sorted({lay for (_, _, lay) in self._stats if lay is not None})

    def data_all_to_all_calls(self, layer: int) -> int:
        """Data all-to-alls (dispatch + combine) this rank called for one MoE layer."""
        return self.total(CollKind.ALL_TO_ALL, layer=layer).calls

    def to_rows(self) -> list[dict]:
        """JSON-able, sorted: one dict per (kind, phase, layer)."""
        self._resolve()
        rows = [{"kind": k.value, "phase": p, "layer": lay, **s.to_dict()} for (k, p, lay), s in self._stats.items()]
        return sorted(rows, key=lambda r: (r["kind"], r["phase"], -1 if r["layer"] is None else r["layer"]))

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "CommCounters":
        out = cls()
        for r in rows:
            key = (CollKind(r["kind"]), r["phase"], r["layer"])
            out._stats[key] = CollStat(**{k: r[k] for k in CollStat().to_dict()})
        return out

    @classmethod
    def merged(cls, per_rank: list["CommCounters"]) -> "CommCounters":
        """Group totals: rows and bytes summed over ranks; calls are collective, so every rank made the same
        number and that number is kept (a mismatch means the ranks fell out of lockstep: raised)."""
        out = cls()
        for c in per_rank:
            c._resolve()
        keys = set().union(*(c._stats for c in per_rank)) if per_rank else set()
        for key in keys:
            stats = [c._stats.get(key, CollStat()) for c in per_rank]
            calls = {s.calls for s in stats}
            if len(calls) != 1:
                raise ValueError(f"ranks disagree on the number of {key[0].value}/{key[1]} calls at layer "
                                 f"{key[2]}: {[s.calls for s in stats]}")
            total = CollStat(calls=calls.pop())
            for s in stats:
                total.add(s, calls=False)
            out._stats[key] = total
        return out
