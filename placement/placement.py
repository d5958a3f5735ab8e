"""Placement: which GPU holds each expert of each MoE layer (schema version 1).

Shapes: L MoE layers, E experts per layer, G GPUs (= EP ranks; EP rank r serves GPU r).

JSON (DESIGN.md "Data formats")::

    {"version": 1, "num_layers": L, "num_experts": E, "cluster": {"nodes": N, "gpus_per_node": G},
     "expert_to_gpu": [[g, ...] x L], "solver": {...}, "objective": {...}, "trace": {...}}

Version 1 holds one copy of each expert and the same number of experts on every GPU in every layer.
Replicated experts (a list of GPUs per expert) are a planned extension; such files are refused by name.

An optional anchor table (placement/anchor.py: where coherent tokens are summed and live) is saved beside the
JSON as ``<stem>.anchors.npz`` and named by ``solver["anchors"]``; ``load`` reads it back. Without one the
anchor is the rank of the top-1 expert.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placement.anchor import AnchorTable
from placement.cluster import ClusterShape
from placement.errors import InputError, PlacementError

SCHEMA_VERSION = 1


@dataclass(frozen=True, eq=False)
class Placement:
    expert_to_gpu_LE: np.ndarray
    cluster: ClusterShape
    solver: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    trace: dict = field(default_factory=dict)
    anchors: AnchorTable | None = None    # coherent anchor rule; None: the top-1 expert's rank

    def __post_init__(self) -> None:
        arr = self.expert_to_gpu_LE
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise PlacementError(f"expert_to_gpu must be a [layers][experts] table, got shape "
                                 f"{getattr(arr, 'shape', None)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise PlacementError(f"expert_to_gpu must hold integer GPU ids, got dtype {arr.dtype}")
        L, E = arr.shape
        G = self.cluster.num_gpus
        if L == 0 or E == 0:
            raise PlacementError(f"expert_to_gpu is empty: shape {arr.shape}")
        if E % G:
            raise PlacementError(f"{E} experts cannot be split evenly over {G} GPUs "
                                 f"({self.cluster.nodes} node(s) x {self.cluster.gpus_per_node})")
        bad = np.argwhere((arr < 0) | (arr >= G))
        if len(bad):
            l, e = bad[0]
            raise PlacementError(f"layer {l}, expert {e}: GPU id {int(arr[l, e])} out of range [0, {G})")
        count_LG = np.stack([np.bincount(row, minlength=G) for row in arr])
        uneven = np.argwhere(count_LG != E // G)
        if len(uneven):
            l, g = uneven[0]
            raise PlacementError(f"layer {l}: GPU {g} holds {int(count_LG[l, g])} experts, every GPU must hold "
                                 f"{E // G} (= {E} experts / {G} GPUs)")
        object.__setattr__(self, "expert_to_gpu_LE", arr.astype(np.int64, copy=False))
        if self.anchors is not None:
            self.anchors.check_fits(self.expert_to_gpu_LE, G)

    def with_anchors(self, anchors: AnchorTable | None) -> "Placement":
        return dataclasses.replace(self, anchors=anchors)

    # ---- shape -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.expert_to_gpu_LE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.expert_to_gpu_LE.shape[1]

    @property
    def num_gpus(self) -> int:
        return self.cluster.num_gpus

    @property
    def experts_per_gpu(self) -> int:
        return self.num_experts // self.num_gpus

    def experts_on(self, gpu: int) -> np.ndarray:
        """[L, E/G] expert ids held by ``gpu`` in each layer, ascending."""
        return np.stack([np.flatnonzero(row == gpu) for row in self.expert_to_gpu_LE])

    def check_fits(self, *, num_layers: int, num_experts: int, what: str = "the trace") -> None:
        """Raise a PlacementError unless this placement has the given number of layers and experts."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise PlacementError(f"placement is for {self.num_layers} MoE layers x {self.num_experts} experts, "
                                 f"but {what} has {num_layers} x {num_experts}")

    # ---- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": SCHEMA_VERSION, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "cluster": self.cluster.to_dict(), "expert_to_gpu": self.expert_to_gpu_LE.tolist(),
                "solver": self.solver, "objective": self.objective, "trace": self.trace}

    def save(self, path: str | Path) -> None:
        """Write the JSON (and the anchor table beside it as ``<stem>.anchors.npz``, named in ``solver``)."""
        path = Path(path)
        d = self.to_dict()
        d["solver"] = {k: v for k, v in self.solver.items() if k != "anchors"}
        if self.anchors is not None:
            d["solver"]["anchors"] = path.with_name(path.stem + ".anchors.npz").name
            self.anchors.save(path.with_name(d["solver"]["anchors"]))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        if not isinstance(d, dict):
            raise PlacementError(f"placement must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise PlacementError(f"placement version {version!r} is not supported (expected {SCHEMA_VERSION})")
        for key in ("num_layers", "num_experts", "cluster", "expert_to_gpu"):
            if key not in d:
                raise PlacementError(f"placement is missing '{key}'")
        try:
            cluster = ClusterShape.from_dict(d["cluster"])
        except InputError as exc:
            raise PlacementError(f"placement {exc}") from None
        rows = d["expert_to_gpu"]
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise PlacementError("expert_to_gpu must be a list of lists (one list of GPU ids per layer)")
        for l, row in enumerate(rows):
            for e, g in enumerate(row):
                if isinstance(g, list):
                    raise PlacementError(f"layer {l}, expert {e}: replicated experts (a list of GPUs) are not "
                                         f"supported by placement version {SCHEMA_VERSION}")
                if not isinstance(g, int) or isinstance(g, bool):
                    raise PlacementError(f"layer {l}, expert {e}: GPU id must be an integer, got {g!r}")
        if len({len(r) for r in rows}) > 1:
            raise PlacementError("expert_to_gpu rows differ in length: every layer must list every expert")
        placement = cls(np.array(rows, dtype=np.int64).reshape(len(rows), -1), cluster,
                        dict(d.get("solver") or {}), dict(d.get("objective") or {}), dict(d.get("trace") or {}))
        if (placement.num_layers, placement.num_experts) != (d["num_layers"], d["num_experts"]):
            raise PlacementError(f"num_layers/num_experts say {d['num_layers']} x {d['num_experts']}, but "
                                 f"expert_to_gpu is {placement.num_layers} x {placement.num_experts}")
        return placement

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        if not path.is_file():
            raise PlacementError(f"placement file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlacementError(f"{path}: not valid JSON ({exc})") from None
        placement = cls.from_dict(d)
        name = placement.solver.get("anchors")
        if name is None:
            return placement
        if not isinstance(name, str) or Path(name).name != name:
            raise PlacementError(f"{path}: solver.anchors must be a file name beside the placement, got {name!r}")
        try:
            return placement.with_anchors(AnchorTable.load(path.with_name(name)))
        except PlacementError as exc:
            raise PlacementError(f"{path}: {exc}") from None


def contiguous_placement(num_layers: int, num_experts: int, cluster: ClusterShape) -> Placement:
    """Expert e on GPU e // (E / G) in every layer: the DeepSpeed-MoE default."""
    if num_experts % cluster.num_gpus:
        raise PlacementError(f"{num_experts} experts cannot be split evenly over {cluster.num_gpus} GPUs")
    row_E = np.arange(num_experts) // (num_experts // cluster.num_gpus)
    return Placement(np.tile(row_E, (num_layers, 1)), cluster, solver={"name": "contiguous"})
