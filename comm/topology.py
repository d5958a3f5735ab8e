"""EPTopology: who this process is in the expert-parallel (EP) group, built once and passed down.

    launch/ reads the torchrun environment --> init_ep_topology(rank=..., world_size=..., ...) --> EPTopology
        --> Runner / dispatchers / primitives receive it explicitly (no module-level distributed state)

The backend is picked once, here: NCCL when CUDA is present, gloo otherwise. Control messages (step plans,
counts of small Python objects) always go over a gloo group (``cpu_group``), which is the data group itself
when the backend is gloo.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

import torch
import torch.distributed as dist

from placement.cluster import ClusterShape
from placement.errors import InputError


class Backend(enum.Enum):
    GLOO = "gloo"
    NCCL = "nccl"

    @classmethod
    def for_host(cls) -> "Backend":
        """NCCL when this process sees a CUDA device, gloo otherwise (decided once, at start-up)."""
        return cls.NCCL if torch.cuda.is_available() else cls.GLOO


@dataclass(frozen=True, kw_only=True, eq=False)
class EPTopology:
    """One rank's view of its EP group. EP rank r serves GPU r; GPUs are numbered node-major."""

    rank: int
    world_size: int
    gpus_per_node: int
    backend: Backend
    device: torch.device
    group: object | None = None       # the EP data group (None: world size 1, no torch.distributed)
    cpu_group: object | None = None   # gloo group for control messages (== group under gloo)
    kv_group: object | None = None    # coherent K/V copies: a communicator of their own, so that a copy in
                                      # flight never queues in front of a dispatch (NCCL runs one
                                      # communicator's collectives in order)
    node_group: object | None = None  # the ranks of this node (several nodes only): node_aware's stages inside a
                                      # node never wait on another node
    node_kv_group: object | None = None   # the same ranks, for the K/V forwards inside a node

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InputError(f"topology: rank {self.rank} is not in a world of size {self.world_size}")
        if self.gpus_per_node < 1 or self.world_size % self.gpus_per_node:
            raise InputError(f"topology: world size {self.world_size} is not a whole number of nodes of "
                             f"{self.gpus_per_node} GPUs")
        if self.world_size > 1 and self.group is None:
            raise InputError("topology: a world of size > 1 needs a process group")

    @property
    def nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def cluster(self, *, intra_node_cost: float = 1.0, inter_node_cost: float = 4.0) -> ClusterShape:
        return ClusterShape(nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                            intra_node_cost=intra_node_cost, inter_node_cost=inter_node_cost)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "EPTopology":
        """World size 1 without torch.distributed (tests, the one-process server)."""
        device = torch.device(device)
        backend = Backend.NCCL if device.type == "cuda" else Backend.GLOO
        return cls(rank=0, world_size=1, gpus_per_node=1, backend=backend, device=device)


def init_ep_topology(*, rank: int, world_size: int, local_world_size: int, init_method: str,
                     timeout_s: float = 120.0, backend: Backend | None = None) -> EPTopology:
    """Initialise torch.distributed for this process and return its topology.

    ``init_method`` is e.g. ``tcp://127.0.0.1:29500`` or ``env://`` (launch/ decides; this module reads no
    environment variables). World size 1 returns :meth:`EPTopology.single` without a process group.
    """
    backend = backend or Backend.for_host()
    if backend is Backend.NCCL:
        local_rank = rank % local_world_size
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return EPTopology.single(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend.value, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    group = dist.group.WORLD
    cpu_group = group if backend is Backend.GLOO else dist.new_group(backend="gloo", timeout=timeout)
    kv_group = dist.new_group(backend=backend.value, timeout=timeout)
    node_group = node_kv_group = None
    P = local_world_size
    if 1 < P < world_size:   # every rank creates every node's groups, in the same order
        for purpose in ("data", "kv"):
            for n in range(world_size // P):
                g = dist.new_group(ranks=list(range(n * P, (n + 1) * P)), backend=backend.value, timeout=timeout)
                if n == rank // P:
                    node_group, node_kv_group = (g, node_kv_group) if purpose == "data" else (node_group, g)
    return EPTopology(rank=rank, world_size=world_size, gpus_per_node=local_world_size, backend=backend,
                      device=device, group=group, cpu_group=cpu_group, kv_group=kv_group, node_group=node_group,
                      node_kv_group=node_kv_group)


def shutdown_ep_topology(topology: EPTopology) -> None:
    """Tear down what :func:`init_ep_topology` started (no-op at world size 1)."""
    if topology.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
