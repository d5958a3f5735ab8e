"""Liveness: which rank (or node) was lost when a collective fails, in one line.

    every rank: a daemon thread adds 1 to its own counter ``epserve/alive/<rank>`` in the job's key-value store
                every ``interval_s`` (torchrun's agent on node 0 holds the store; it outlives any worker)
    a collective failed: diagnose() reads every counter, waits ``3 x interval_s``, reads again
        --> ranks whose counter did not move and that did not say they are leaving (``leaving()``: a rank that
            noticed the failure itself, or stops on purpose): lost ("rank 2 (node 1) stopped answering")
        --> the store itself unreachable: this node lost node 0 ("lost contact with node 0 ...")
        --> nobody stopped: "" (the caller keeps the collective's own error)

Counters, not clocks: nodes' clocks need not agree. Built in launch/ from the environment (MASTER_ADDR /
MASTER_PORT), passed down; nothing here is module-level state.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

KEY = "epserve/alive/{}"
LEAVING = "epserve/leaving/{}"


class Liveness:
    def __init__(self, *, host: str, port: int, rank: int, world_size: int, gpus_per_node: int,
                 interval_s: float = 0.5, timeout_s: float = 5.0) -> None:
        self.host, self.port, self.rank, self.world_size = host, port, rank, world_size
        self.gpus_per_node, self.interval_s, self.timeout_s = gpus_per_node, interval_s, timeout_s
        self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                    wait_for_workers=False)
        self._stop = threading.Event()
        self._store.add(KEY.format(rank), 1)
        self._thread = threading.Thread(target=self._beat, name="epserve-liveness", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._store.add(KEY.format(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: diagnose() says so when asked
                return

    def stop(self) -> None:
        self._stop.set()

    def leaving(self) -> None:
        """This rank exits on its own account (it noticed a failure, or the group stops): not a lost rank.
        Bounded: the heartbeat's connection may be stuck in a call to a store that went away."""
        self._stop.set()

        def say() -> None:
            try:
                self._store.add(LEAVING.format(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone; nobody can ask any more
                pass

        worker = threading.Thread(target=say, name="epserve-leaving", daemon=True)
        worker.start()
        worker.join(1.0)

    def lost_ranks(self) -> list[int]:
        """Ranks whose counter stopped (blocks about 3 x interval). Raises when the store is unreachable. Uses
        a connection of its own: the heartbeat's may be stuck in a call to a store that went away."""
        socket.create_connection((self.host, self.port), timeout=self.timeout_s).close()   # quiet first probe
        store = dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout_s),
                              wait_for_workers=False)
        counts = lambda: [store.add(KEY.format(r), 0) for r in range(self.world_size)]  # noqa: E731
        before = counts()
        time.sleep(3 * self.interval_s)
        after = counts()
        stopped = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]
        return [r for r in stopped if not store.add(LEAVING.format(r), 0)]

    def diagnose(self) -> str:
        """One line naming what was lost, or "" when every rank still beats. Bounded: a store call that never
        returns (a cut link: TCP waits minutes) counts as the store being unreachable."""
        box: list = []

        def run() -> None:
            try:
                box.append(self.lost_ranks())
            except Exception as exc:  # noqa: BLE001 - any store failure: node 0's agent cannot be reached
                box.append(exc)

        worker = threading.Thread(target=run, name="epserve-diagnose", daemon=True)
        worker.start()
        worker.join(3 * self.interval_s + 2 * self.timeout_s + 1.0)
        if not box or isinstance(box[0], Exception):
            return (f"lost contact with node 0 (its store at {self.host}:{self.port} does not answer): the "
                    f"link to node 0 or node 0 itself is down")
        return describe_lost(box[0], self.gpus_per_node) if box[0] else ""


def describe_lost(lost: list[int], gpus_per_node: int) -> str:
    """``[2, 3]`` -> "ranks 2, 3 (node 1) stopped answering"."""
    nodes = sorted({r // gpus_per_node for r in lost})
    who = f"rank {lost[0]}" if len(lost) == 1 else "ranks " + ", ".join(map(str, lost))
    where = f"node {nodes[0]}" if len(nodes) == 1 else "nodes " + ", ".join(map(str, nodes))
    return f"{who} ({where}) stopped answering"
