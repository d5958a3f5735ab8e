"""Comparison tables: one placement against the placements other systems use, on the same trace.

    trace + {name: Placement} + strategies --simulate--> one row per (placement, strategy)
        row = CommReport.to_dict() headline figures + reduction vs the baseline (contiguous, two_a2a)
              + surrogate objective, upper bound and gap
    --> format_table(rows) (text) or the rows themselves (JSON)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from placement.placement import Placement
from placement.simulate import SimOptions, Strategy, simulate
from placement.trace import RoutingTrace

BASELINE = ("contiguous", Strategy.TWO_A2A.value)

COLUMNS = (  # (key, header, format)
    ("placement", "placement", "{}"),
    ("strategy", "strategy", "{}"),
    ("transfers_per_token_layer", "transfers/tok-layer", "{:.3f}"),
    ("reduction_vs_baseline", "saved vs contiguous+two_a2a", "{:+.1%}"),
    ("lar", "LAR", "{:.3f}"),
    ("top1_cross_gpu_rate", "top-1 cross-GPU", "{:.3f}"),
    ("cross_node_transfers", "cross-node", "{:d}"),
    ("load_max_over_mean", "max/mean load", "{:.2f}"),
    ("objective", "objective", "{:.1f}"),
    ("upper_bound", "upper bound", "{:.1f}"),
    ("gap", "gap", "{:.2%}"),
)


def comparison_rows(trace: RoutingTrace, placements: dict[str, Placement], strategies: list[Strategy], *,
                    objectives: dict[str, tuple[float, float]] | None = None, predictor=None,
                    options: SimOptions = SimOptions()) -> list[dict]:
    """Simulate every (placement, strategy); ``objectives`` maps a placement name to (objective, bound).
    Strategies that need the predictor run only for placements it was built for."""
    rows = []
    for name, placement in placements.items():
        for strategy in strategies:
            if strategy.needs_predictor and (predictor is None or not _fits(predictor, placement)):
                continue
            report = simulate(trace, placement, strategy, predictor=predictor, options=options)
            row = {"placement": name, "strategy": strategy.value, **report.to_dict()}
            if objectives and name in objectives:
                value, bound = objectives[name]
                row.update(objective=value, upper_bound=bound, gap=(bound - value) / bound if bound > 0 else 0.0)
            rows.append(row)
    base = next((r for r in rows if (r["placement"], r["strategy"]) == BASELINE), None)
    for row in rows:
        if base is not None:
            row["reduction_vs_baseline"] = 1.0 - row["transfers_per_token_layer"] / base["transfers_per_token_layer"]
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fits(predictor, placement: Placement) -> bool:
    from placement.predictor import placement_digest
    return predictor.placement_sha256 == placement_digest(placement)
