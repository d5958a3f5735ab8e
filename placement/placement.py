"""Placement: which GPUs hold each expert of each MoE layer (schema version 2; version 1 files still load).

Shapes: L MoE layers, E experts per layer, G GPUs (= EP ranks; EP rank r serves GPU r), S slots per GPU.

JSON (DESIGN.md "Data formats")::

    {"version": 2, "num_layers": L, "num_experts": E, "cluster": {"nodes": N, "gpus_per_node": G},
     "slots_per_gpu": S, "expert_to_gpus": [[[g, ...] per expert] x L],
     "solver": {...}, "objective": {...}, "trace": {...}}
    version 1: "expert_to_gpu": [[g, ...] x L] (one copy per expert, E / G experts per GPU)

Every expert has at least one copy (more: replicas, EPLB's redundant experts), a GPU holds at most one copy of
an expert, and every GPU holds exactly S copies in every layer (S x G >= E: fewer experts than GPUs is legal).
``expert_to_gpu_LE`` is each expert's primary copy (its lowest GPU id): what everything that follows one copy
per expert reads; ``copies_LEG`` holds them all.

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

SCHEMA_VERSION = 2


@dataclass(frozen=True, eq=False)
class Placement:
    expert_to_gpu_LE: np.ndarray
    cluster: ClusterShape
    solver: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    trace: dict = field(default_factory=dict)
    anchors: AnchorTable | None = None    # coherent anchor rule; None: the top-1 expert's rank
    copies_LEG: np.ndarray | None = None  # bool: GPU g holds a copy of expert e (None: the primary copies only)

    def __post_init__(self) -> None:
        if self.copies_LEG is not None:
            self._check_copies()
            return
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
        copies_LEG = np.zeros((L, E, G), dtype=bool)
        np.put_along_axis(copies_LEG, self.expert_to_gpu_LE[:, :, None], True, axis=2)
        object.__setattr__(self, "copies_LEG", copies_LEG)
        if self.anchors is not None:
            self.anchors.check_fits(self.expert_to_gpu_LE, G)

    def _check_copies(self) -> None:
        """Validate ``copies_LEG`` and derive the primary copies from it (names the layer / expert / GPU)."""
        c = self.copies_LEG
        G = self.cluster.num_gpus
        if not isinstance(c, np.ndarray) or c.ndim != 3 or c.dtype != bool:
            raise PlacementError(f"copies must be a bool [layers, experts, GPUs] table, got "
                                 f"{getattr(c, 'dtype', type(c).__name__)} {getattr(c, 'shape', None)}")
        L, E, G_c = c.shape
        if L == 0 or E == 0:
            raise PlacementError(f"expert_to_gpus is empty: {L} layers x {E} experts")
        if G_c != G:
            raise PlacementError(f"copies are for {G_c} GPUs, the cluster has {G}")
        none = np.argwhere(~c.any(axis=2))
        if len(none):
            l, e = none[0]
            raise PlacementError(f"layer {l}, expert {e}: no GPU holds a copy")
        count_LG = c.sum(axis=1)
        S = int(count_LG[0, 0])
        uneven = np.argwhere(count_LG != S)
        if len(uneven):
            l, g = uneven[0]
            raise PlacementError(f"layer {l}: GPU {g} holds {int(count_LG[l, g])} copies, every GPU must hold the "
                                 f"same number of slots ({S}, as GPU 0 of layer 0)")
        object.__setattr__(self, "expert_to_gpu_LE", np.argmax(c, axis=2).astype(np.int64))
        if self.anchors is not None:   # a table fitted for other copies is refused (its digest covers them)
            self.anchors.check_fits(c, G)

    @classmethod
    def from_copies(cls, copies_LEG: np.ndarray, cluster: ClusterShape, **fields) -> "Placement":
        """A placement with (possibly) replicated experts; ``copies_LEG``: bool [L, E, G]."""
        c = np.asarray(copies_LEG, dtype=bool)
        return cls(np.argmax(c, axis=2).astype(np.int64), cluster, copies_LEG=c, **fields)

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
    def slots_per_gpu(self) -> int:
        """S: expert copies every GPU holds in every layer."""
        return int(self.copies_LEG[0, :, 0].sum())

    @property
    def experts_per_gpu(self) -> int:
        return self.slots_per_gpu

    @property
    def has_replicas(self) -> bool:
        return bool((self.copies_LEG.sum(axis=2) > 1).any())

    def experts_on(self, gpu: int) -> np.ndarray:
        """[L, S] expert ids held by ``gpu`` in each layer (every copy it holds), ascending."""
        return np.stack([np.flatnonzero(row_EG[:, gpu]) for row_EG in self.copies_LEG])

    @property
    def copy_choice_LEG(self) -> np.ndarray:
        """int64 [L, E, G]: the copy a token held on GPU c uses for expert e (placement/replicas.py's rule)."""
        from placement.replicas import copy_choice_LEG
        return copy_choice_LEG(self.copies_LEG, self.cluster.gpus_per_node)

    def gpus_of(self, layer: int, expert: int) -> list[int]:
        """The GPUs holding a copy of ``expert`` in MoE layer ``layer``, ascending (the first is the primary)."""
        return np.flatnonzero(self.copies_LEG[layer, expert]).tolist()

    def check_fits(self, *, num_layers: int, num_experts: int, what: str = "the trace") -> None:
        """Raise a PlacementError unless this placement has the given number of layers and experts."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise PlacementError(f"placement is for {self.num_layers} MoE layers x {self.num_experts} experts, "
                                 f"but {what} has {num_layers} x {num_experts}")

    # ---- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        gpus = [[np.flatnonzero(row_G).tolist() for row_G in row_EG] for row_EG in self.copies_LEG]
        return {"version": SCHEMA_VERSION, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "cluster": self.cluster.to_dict(), "slots_per_gpu": self.slots_per_gpu, "expert_to_gpus": gpus,
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
        if version not in (1, SCHEMA_VERSION):
            raise PlacementError(f"placement version {version!r} is not supported (1 or {SCHEMA_VERSION})")
        table = "expert_to_gpu" if version == 1 else "expert_to_gpus"
        for key in ("num_layers", "num_experts", "cluster", table):
            if key not in d:
                raise PlacementError(f"placement is missing '{key}'")
        try:
            cluster = ClusterShape.from_dict(d["cluster"])
        except InputError as exc:
            raise PlacementError(f"placement {exc}") from None
        if version == SCHEMA_VERSION:
            placement = cls.from_copies(_copies_from_lists(d["expert_to_gpus"], cluster.num_gpus), cluster,
                                        **_provenance(d))
            _check_header(d, placement)
            return placement
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
        placement = cls(np.array(rows, dtype=np.int64).reshape(len(rows), -1), cluster, **_provenance(d))
        _check_header(d, placement)
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


def _provenance(d: dict) -> dict:
    return {"solver": dict(d.get("solver") or {}), "objective": dict(d.get("objective") or {}),
            "trace": dict(d.get("trace") or {})}


def _check_header(d: dict, placement: Placement) -> None:
    if (placement.num_layers, placement.num_experts) != (d["num_layers"], d["num_experts"]):
        raise PlacementError(f"num_layers/num_experts say {d['num_layers']} x {d['num_experts']}, but "
                             f"the expert table is {placement.num_layers} x {placement.num_experts}")
    if "slots_per_gpu" in d and d["slots_per_gpu"] != placement.slots_per_gpu:
        raise PlacementError(f"slots_per_gpu says {d['slots_per_gpu']!r}, but every GPU holds "
                             f"{placement.slots_per_gpu} copies per layer")


def _copies_from_lists(rows, G: int) -> np.ndarray:
    """bool [L, E, G] from version 2's lists of GPU ids per expert; names the layer / expert of any problem."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise PlacementError("expert_to_gpus must be a non-empty list (one list per layer of GPU lists per expert)")
    if len({len(r) for r in rows}) > 1:
        raise PlacementError("expert_to_gpus rows differ in length: every layer must list every expert")
    copies = np.zeros((len(rows), len(rows[0]), G), dtype=bool)
    for l, row in enumerate(rows):
        for e, gpus in enumerate(row):
            if not isinstance(gpus, list) or not gpus:
                raise PlacementError(f"layer {l}, expert {e}: needs a non-empty list of GPU ids, got {gpus!r}")
            for g in gpus:
                if not isinstance(g, int) or isinstance(g, bool):
                    raise PlacementError(f"layer {l}, expert {e}: GPU id must be an integer, got {g!r}")
                if not 0 <= g < G:
                    raise PlacementError(f"layer {l}, expert {e}: GPU {g} is outside the cluster [0, {G})")
                if copies[l, e, g]:
                    raise PlacementError(f"layer {l}, expert {e}: GPU {g} is listed twice (one copy per GPU)")
                copies[l, e, g] = True
    return copies


def contiguous_placement(num_layers: int, num_experts: int, cluster: ClusterShape) -> Placement:
    """Expert e on GPU e // (E / G) in every layer: the DeepSpeed-MoE default."""
    if num_experts % cluster.num_gpus:
        raise PlacementError(f"{num_experts} experts cannot be split evenly over {cluster.num_gpus} GPUs")
    row_E = np.arange(num_experts) // (num_experts // cluster.num_gpus)
    return Placement(np.tile(row_E, (num_layers, 1)), cluster, solver={"name": "contiguous"})
