"""Host collectives: small messages over the topology's CPU (gloo) control group, each one counted.

    broadcast_bytes:  rank 0's bytes --[frame: u32 length | first bytes | zero pad]--broadcast--> every rank
                      (a payload longer than the frame: the rest follows in ONE more broadcast of exactly that
                      size, so the wire size tracks the payload and a short one costs one call)
    all_gather_int64: [X] int64 per rank (the same X everywhere) --all_gather_into_tensor--> [G, X]

What they carry is engine control (step plans: CollKind.CONTROL) and statistics (CollKind.STATS), never hidden
states, so they are recorded with ``layer=None`` and stay out of every per-MoE-layer data figure. Counting
follows comm/primitives.py: a rank records what it sends to the OTHER ranks (logical, as if sent directly):

    broadcast, rank 0:  rows = G - 1 receivers (cross_node_rows: those on other nodes),
                        payload_bytes = (G - 1) x payload bytes in this call (length prefix and padding excluded),
                        wire_bytes = (G - 1) x buffer bytes (frame padding and length included)
    broadcast, others:  calls = 1, nothing sent
    all-gather, each:   rows = G - 1 (cross_node_rows: G - ranks per node), payload_bytes = wire_bytes = (G - 1) x 8X

so every rank makes the same calls (CommCounters.merged holds) and the sum over ranks is the group's traffic;
a row is one copy of the message to one rank, so bytes across nodes are wire_bytes x cross_node_rows / rows.
These are logical figures: gloo's own algorithms may relay copies through other ranks (a ring all-gather),
so the bytes on each link can differ; the copies each rank receives do not.
At world size 1 nothing is called and nothing is counted. A peer that died makes the call raise (gloo: a
closed connection, or the group's timeout); callers treat that as fatal.

Legend: G ranks, X int64 values per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.counters import CollKind, CommCounters
from comm.topology import EPTopology

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
HOST_KINDS = (CollKind.CONTROL, CollKind.STATS)
LEN_BYTES = 4                    # the frame's length prefix (little-endian u32)
MAX_PAYLOAD = 2 ** 32 - 1
DEFAULT_FRAME_BYTES = 256


@dataclass(frozen=True, eq=False)
class HostCollectives:
    topology: EPTopology
    counters: CommCounters

    def broadcast_bytes(self, payload: bytes | None, *, phase: str, kind: CollKind = CollKind.CONTROL,
                        frame_bytes: int = DEFAULT_FRAME_BYTES) -> bytes:
        """Rank 0 passes ``payload``, the others None; every rank returns rank 0's bytes. Every rank must pass
        the same ``frame_bytes``. Counted as ``phase`` (the frame) and ``phase + "_tail"`` (the rest, if any)."""
        _check_kind(kind)
        if frame_bytes <= LEN_BYTES:
            raise ValueError(f"frame_bytes must be > {LEN_BYTES}, got {frame_bytes}")
        root = self.topology.rank == 0
        if root != (payload is not None):
            raise ValueError(f"rank {self.topology.rank}: rank 0 (only) passes the payload")
        if not self.topology.is_distributed:
            if payload is None:
                raise RuntimeError("broadcast_bytes: world size 1 has no rank to receive from")
            return bytes(payload)
        head_room = frame_bytes - LEN_BYTES
        frame = torch.zeros(frame_bytes, dtype=torch.uint8)
        head = b""
        if root:
            payload = bytes(payload)
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"broadcast_bytes: {len(payload)} bytes exceed the {MAX_PAYLOAD}-byte limit")
            head = payload[:head_room]
            frame[:LEN_BYTES + len(head)] = _as_uint8(len(payload).to_bytes(LEN_BYTES, "little") + head)
        self._broadcast(frame, kind=kind, phase=phase, useful=len(head))
        raw = frame.numpy().tobytes()
        size = int.from_bytes(raw[:LEN_BYTES], "little")
        if size <= head_room:
            return raw[LEN_BYTES:LEN_BYTES + size]
        rest = _as_uint8(payload[head_room:]) if root else torch.empty(size - head_room, dtype=torch.uint8)
        self._broadcast(rest, kind=kind, phase=phase + "_tail", useful=rest.numel() if root else 0)
        return raw[LEN_BYTES:] + rest.numpy().tobytes()

    def all_gather_int64(self, vec_X: torch.Tensor, *, phase: str, kind: CollKind = CollKind.STATS) -> torch.Tensor:
        """This rank's int64 CPU vector [X] (the same X on every rank) -> [G, X], row g from rank g."""
        _check_kind(kind)
        if vec_X.dtype != torch.int64 or vec_X.ndim != 1 or vec_X.device.type != "cpu":
            raise ValueError(f"all_gather_int64 takes a 1-d int64 CPU vector, got {vec_X.dtype} "
                             f"{tuple(vec_X.shape)} on {vec_X.device}")
        G = self.topology.world_size
        if G == 1:
            return vec_X[None].clone()
        vec_X = vec_X.contiguous()
        out_GX = torch.empty(G * vec_X.numel(), dtype=torch.int64)
        _all_gather_single(out_GX, vec_X, group=self.topology.cpu_group)
        nbytes = (G - 1) * vec_X.numel() * vec_X.element_size()
        self.counters.record(kind, phase=phase, layer=None, rows=G - 1, cross_node_rows=G - self.topology.gpus_per_node,
                             payload_bytes=nbytes, wire_bytes=nbytes)
        return out_GX.view(G, -1)

    def _broadcast(self, buf: torch.Tensor, *, kind: CollKind, phase: str, useful: int) -> None:
        dist.broadcast(buf, src=0, group=self.topology.cpu_group)
        root = self.topology.rank == 0
        peers = self.topology.world_size - 1 if root else 0
        remote = self.topology.world_size - self.topology.gpus_per_node if root else 0   # rank 0 is on node 0
        self.counters.record(kind, phase=phase, layer=None, rows=peers, cross_node_rows=remote,
                             payload_bytes=peers * useful, wire_bytes=peers * buf.numel())


def _check_kind(kind: CollKind) -> None:
    if kind not in HOST_KINDS:
        raise ValueError(f"host collectives carry {[k.value for k in HOST_KINDS]}, not {kind.value}")


def _as_uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
