"""Run a function on G local ranks over gloo (tests, benchmarks): one spawned process per rank.

    spawn_ranks(fn, G, args) --free port--> G processes: set 1 thread, init_ep_topology(tcp://127.0.0.1:port)
        --> fn(topology, *args) --> pickled result file per rank --> parent collects [result_0 .. result_G-1]

Every wait is bounded: a rank that fails makes the parent stop the others and raise with its traceback;
``timeout_s`` bounds the whole run. World size 1 runs in this process (no torch.distributed).
``fn`` must be importable by name (a module-level function) because ranks are spawned, not forked.
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from comm.topology import EPTopology, init_ep_topology, shutdown_ep_topology


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, gpus_per_node: int, port: int, args: tuple, out: str,
               timeout_s: float) -> None:
    torch.set_num_threads(1)
    path = Path(out) / f"rank{rank}.pkl"
    topology = None
    try:
        topology = init_ep_topology(rank=rank, world_size=world_size, local_world_size=gpus_per_node,
                                    init_method=f"tcp://127.0.0.1:{port}", timeout_s=timeout_s)
        result = fn(topology, *args)
        payload = {"ok": True, "result": result}
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        payload = {"ok": False, "error": traceback.format_exc()}
    path.with_suffix(".tmp").write_bytes(pickle.dumps(payload))
    path.with_suffix(".tmp").replace(path)
    if topology is not None and payload["ok"]:
        shutdown_ep_topology(topology)


def spawn_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), *, gpus_per_node: int | None = None,
                timeout_s: float = 180.0) -> list[Any]:
    """``[fn(topology_r, *args) for r in ranks]``, each on its own process. Raises RuntimeError naming the
    failed rank (with its traceback) or the timeout."""
    gpus_per_node = gpus_per_node or world_size
    if world_size == 1:
        torch.set_num_threads(1)
        return [fn(EPTopology.single(), *args)]
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="epserve-ranks-") as out:
        procs = [ctx.Process(target=_rank_main, daemon=True, name=f"ep-rank{r}",
                             args=(fn, r, world_size, gpus_per_node, port, args, out, timeout_s))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        results: dict[int, dict] = {}
        try:
            while len(results) < world_size:
                for r in range(world_size):
                    f = Path(out) / f"rank{r}.pkl"
                    if r not in results and f.exists():
                        results[r] = pickle.loads(f.read_bytes())
                        if not results[r]["ok"]:
                            raise RuntimeError(f"rank {r} of {world_size} failed:\n{results[r]['error']}")
                dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()
                        and not (Path(out) / f"rank{r}.pkl").exists()]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} of {world_size} died with exit code "
                                       f"{procs[dead[0]].exitcode} and no result")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {sorted(set(range(world_size)) - set(results))} of {world_size} "
                                       f"did not finish within {timeout_s:.0f} s")
                time.sleep(0.02)
            for p in procs:
                p.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    return [results[r]["result"] for r in range(world_size)]
