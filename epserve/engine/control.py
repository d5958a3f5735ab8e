"""ControlChannel: rank 0 broadcasts every StepPlan to the other ranks over the CPU (gloo) group.

    rank 0: send(plan) --pickle--> [8-byte length | payload ... padded to FRAME] --broadcast--> ranks > 0: recv()
            (payloads longer than a frame: the rest follows in a second broadcast of exactly that size)

One broadcast per step for ordinary plans. Plans come from rank 0 of the same job only (trusted pickles).
A peer that died makes the broadcast raise (gloo: connection closed, or the group's timeout); the caller
treats that as fatal. World size 1: send does nothing, recv is an error.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from comm.topology import EPTopology
from epserve.engine.plan import StepPlan

FRAME_BYTES = 8192
_LEN_BYTES = 8


class ControlChannel:
    def __init__(self, topology: EPTopology, *, frame_bytes: int = FRAME_BYTES) -> None:
        if frame_bytes <= _LEN_BYTES:
            raise ValueError(f"frame_bytes must be > {_LEN_BYTES}, got {frame_bytes}")
        self.topology = topology
        self.frame_bytes = frame_bytes
        self.sent = 0       # plans sent (rank 0) or received (others)

    def send(self, plan: StepPlan) -> None:
        if self.topology.rank != 0:
            raise RuntimeError(f"rank {self.topology.rank}: only rank 0 sends plans")
        self.sent += 1
        if not self.topology.is_distributed:
            return
        payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        frame = torch.zeros(self.frame_bytes, dtype=torch.uint8)
        frame[:_LEN_BYTES] = torch.frombuffer(bytearray(len(payload).to_bytes(_LEN_BYTES, "little")),
                                              dtype=torch.uint8)
        head = payload[: self.frame_bytes - _LEN_BYTES]
        if head:
            frame[_LEN_BYTES:_LEN_BYTES + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self._broadcast(frame)
        rest = payload[len(head):]
        if rest:
            self._broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8))

    def recv(self) -> StepPlan:
        if self.topology.rank == 0 or not self.topology.is_distributed:
            raise RuntimeError("recv is for ranks > 0 of a distributed group")
        frame = torch.empty(self.frame_bytes, dtype=torch.uint8)
        self._broadcast(frame)
        raw = frame.numpy().tobytes()
        size = int.from_bytes(raw[:_LEN_BYTES], "little")
        payload = raw[_LEN_BYTES:_LEN_BYTES + size]
        if size > len(payload):
            rest = torch.empty(size - len(payload), dtype=torch.uint8)
            self._broadcast(rest)
            payload += rest.numpy().tobytes()
        plan = pickle.loads(payload)
        if not isinstance(plan, StepPlan):
            raise RuntimeError(f"control channel: expected a StepPlan, got {type(plan).__name__}")
        self.sent += 1
        return plan

    def _broadcast(self, buf: torch.Tensor) -> None:
        dist.broadcast(buf, src=0, group=self.topology.cpu_group)
