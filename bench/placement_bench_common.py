"""What the placement benchmark's parts share: the simulated traffic summary of a placement."""

from __future__ import annotations

from placement.simulate import Strategy, simulate


def _traffic(trace, placement, strategy=Strategy.COHERENT) -> dict:
    r = simulate(trace, placement, strategy)
    return {"transfers_per_token_layer": r.transfers_per_token_layer, "top1_cross_gpu_rate": r.top1_cross_gpu_rate,
            "lar": r.lar, "cross_node_transfers": r.cross_node_transfers,
            "load_max_over_mean": float(r.load_max_over_mean_L.max())}
