"""ClusterShape: how many nodes and GPUs per node, and what a transfer costs inside and across nodes.

GPUs are numbered globally, node-major: GPU g is GPU ``g % gpus_per_node`` of node ``g // gpus_per_node``.
EP rank r serves GPU r.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.errors import InputError


@dataclass(frozen=True, kw_only=True)
class ClusterShape:
    nodes: int = 1
    gpus_per_node: int
    # Relative cost of moving one hidden-state vector between two GPUs of a node / of two nodes.
    intra_node_cost: float = 1.0
    inter_node_cost: float = 4.0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InputError(f"cluster.{name} must be a positive integer, got {value!r}")
        for name in ("intra_node_cost", "inter_node_cost"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise InputError(f"cluster.{name} must be a finite number >= 0, got {value!r}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, gpu):
        """Node index of a GPU id (int or integer array)."""
        return gpu // self.gpus_per_node

    def transfer_cost_GG(self) -> np.ndarray:
        """[G, G] cost of one transfer from GPU a to GPU b (0 on the diagonal)."""
        node_G = np.arange(self.num_gpus) // self.gpus_per_node
        cost_GG = np.where(node_G[:, None] == node_G[None, :], self.intra_node_cost, self.inter_node_cost)
        np.fill_diagonal(cost_GG, 0.0)
        return cost_GG.astype(np.float64)

    def to_dict(self) -> dict:
        return {"nodes": int(self.nodes), "gpus_per_node": int(self.gpus_per_node),
                "intra_node_cost": float(self.intra_node_cost), "inter_node_cost": float(self.inter_node_cost)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterShape":
        if not isinstance(d, dict):
            raise InputError(f"cluster must be an object with nodes and gpus_per_node, got {type(d).__name__}")
        missing = [k for k in ("nodes", "gpus_per_node") if k not in d]
        if missing:
            raise InputError(f"cluster is missing {', '.join(missing)}")
        known = {"nodes", "gpus_per_node", "intra_node_cost", "inter_node_cost"}
        return cls(**{k: v for k, v in d.items() if k in known})
