"""The torchrun worker: ``python -m launch.serve <args>`` runs on every rank (``epserve serve`` starts it).

    torchrun env (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) --> init_ep_topology(env://, collective timeout)
      --> build_runner (this rank's experts only)
      --> rank 0:    start_engine (engine thread) + create_app --> uvicorn in the main thread
                     engine on_fatal --> /health 503 for FATAL_GRACE_S --> server stops --> exit 1
                     SIGINT/SIGTERM --> server stops --> engine.shutdown() (every rank leaves its loop) --> exit
      --> ranks > 0: follow(runner) until the shutdown plan (or a failed collective) --> exit
    Once stopping has begun, a watchdog ends the process (os._exit) after EXIT_DEADLINE_S, so no rank lingers on
    a collective whose peers are gone. Ranks also die with torchrun (PR_SET_PDEATHSIG).

This module and launch/serve_cmd.py are the only places that read environment variables.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from comm.strategy import Strategy
from placement.transport import Transport
from comm.topology import EPTopology, init_ep_topology
from epserve.engine.builder import build_runner
from epserve.model.loader import resolve_dtype
from placement.placement import Placement

from launch.serve_cmd import API_KEY_ENV, add_model_arguments, engine_config

FATAL_GRACE_S = 1.5      # /health answers 503 this long after the engine failed, then the server stops
EXIT_DEADLINE_S = 15.0   # from the start of a stop to a forced exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.serve", description="epserve torchrun worker")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def topology_from_env(collective_timeout_s: float) -> EPTopology:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return init_ep_topology(rank=int(env.get("RANK", "0")), world_size=world,
                            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
                            init_method="env://", timeout_s=collective_timeout_s)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when torchrun (its parent) dies, whatever killed it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class Watchdog:
    """Forces the exit once a stop has lasted ``deadline_s`` (a peer that is gone can hang a collective)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._armed = threading.Event()

    def arm(self, code: int) -> None:
        if self._armed.is_set():
            return
        self._armed.set()

        def expire() -> None:
            time.sleep(self.deadline_s)
            print(f"epserve worker: still stopping after {self.deadline_s:.0f} s; exiting", file=sys.stderr,
                  flush=True)
            os._exit(code)

        threading.Thread(target=expire, daemon=True, name="exit-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent()
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)
    # rank 0 takes its HTTP port before anything else can: gloo's and the store's ephemeral ports come later
    http_socket = bind_http_socket(args.host, args.port) if os.environ.get("RANK", "0") == "0" else None
    topology = topology_from_env(args.collective_timeout)
    placement = Placement.load(args.placement) if args.placement else None
    runner = build_runner(args.model, topology, strategy=Strategy.parse(args.strategy), placement=placement,
                          predictor_path=args.predictor, kv_cache_tokens=args.kv_cache_tokens,
                          record_tokens=args.record_tokens if args.record_trace else 0,
                          window_tokens=args.replace_window, transport=Transport.parse(args.transport), capacity=args.capacity,
                          dtype=resolve_dtype(args.dtype, args.model))
    watchdog = Watchdog(EXIT_DEADLINE_S)
    if topology.rank == 0:
        code = serve_rank0(args, runner, watchdog, http_socket)
    else:
        code = follow_rank(args, runner, watchdog)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # skip interpreter teardown: a dead peer can hang process-group destructors


# ---- rank 0 -------------------------------------------------------------------------------------------------
def bind_http_socket(host: str, port: int):
    """The listening socket of the HTTP server, bound now (uvicorn's own rule: IPv4/IPv6, SO_REUSEADDR)."""
    import uvicorn
    try:
        return uvicorn.Config(app=None, host=host, port=port).bind_socket()
    except SystemExit:   # uvicorn logged why (e.g. the port is taken)
        print(f"epserve worker: cannot listen on {host}:{port}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def serve_rank0(args, runner, watchdog: Watchdog, http_socket=None) -> int:
    import uvicorn

    from epserve.engine.engine import start_engine
    from epserve.server.app import create_app

    fatal, stop = threading.Event(), threading.Event()
    server_box: list[uvicorn.Server] = []

    def stop_server() -> None:
        stop.set()
        if server_box:
            server_box[0].should_exit = True

    def on_signal(sig, _frame) -> None:   # also what uvicorn re-raises after its own handling
        watchdog.arm(0)
        stop_server()

    def on_fatal(reason: str) -> None:    # engine thread
        print(f"epserve worker: engine failed: {reason}", file=sys.stderr, flush=True)
        fatal.set()
        watchdog.arm(1)
        timer = threading.Timer(FATAL_GRACE_S, stop_server)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    engine = start_engine(runner, engine_config(args, Path(args.model)),
                          placement_document=runner.placement.to_dict(), on_fatal=on_fatal)
    app = create_app(engine, _server_config(args))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                          timeout_graceful_shutdown=2))
    server_box.append(server)
    server.should_exit = stop.is_set()     # a signal that came before the server existed
    try:
        server.run(sockets=None if http_socket is None else [http_socket])
    except SystemExit:          # uvicorn could not start (e.g. the port is taken); it logged why
        fatal.set()
    finally:
        watchdog.arm(1 if fatal.is_set() else 0)
        clean = _stop_engine(engine)
    return 1 if fatal.is_set() or not clean else 0


def _stop_engine(engine) -> bool:
    """Every rank leaves its loop (the engine sends a shutdown plan; bounded by its shutdown_timeout_s).
    True when the engine thread ended without a failure."""
    try:
        engine.shutdown()
    except Exception as exc:  # noqa: BLE001 - reported; the exit status says it
        print(f"epserve worker: engine shutdown failed: {exc}", file=sys.stderr, flush=True)
        return False
    return engine.join(timeout=0.1) and engine.dead_reason is None


# ---- ranks > 0 ----------------------------------------------------------------------------------------------
def follow_rank(args, runner, watchdog: Watchdog) -> int:
    from epserve.engine.engine import follow

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 stops the group (a shutdown plan)
    try:
        follow(runner)
    except Exception as exc:  # noqa: BLE001 - a failed collective: rank 0 or a peer is gone
        print(f"epserve worker rank {runner.topology.rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---- configuration of the server ------------------------------------------------------------------------------
def _server_config(args):
    from epserve.server.app import ServerConfig

    names = (args.served_model_name,) if args.served_model_name else ()
    return ServerConfig(model_dir=args.model, served_model_names=names,
                        api_key=os.environ.get(API_KEY_ENV) or None)


if __name__ == "__main__":
    sys.exit(main())
