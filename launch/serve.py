"""The torchrun worker: ``python -m launch.serve <args>`` runs on every rank (``epserve serve`` starts it).

    torchrun env (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT)
      --> pre-flight (the checks `epserve serve` runs; the bundled default model without --model): exit 2
      --> init_ep_topology(env://, collective timeout) + Liveness (heartbeats in torchrun's store: names the rank
          or node that was lost when a collective fails)
      --> build_runner (this rank's experts only)
      --> rank 0:    start_engine (engine thread) + create_app --> uvicorn in the main thread ("listening on ...")
                     engine on_fatal --> /health 503 for FATAL_GRACE_S --> server stops --> exit 1
                     SIGTERM --> drain: 503 + Retry-After to new requests, /health 503, in-flight requests finish
                                 (up to --drain-timeout; the rest end with an error) --> engine.shutdown() (every
                                 rank leaves its loop) --> server stops --> exit 0
                     SIGINT --> the same with no drain; a second signal stops at once
      --> ranks > 0: follow(runner) until the shutdown plan (or a failed collective: one line naming what was
                     lost) --> exit; they ignore SIGINT/SIGTERM (rank 0 ends the group)
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

from comm.strategy import AttentionLayout, Strategy
from placement.transport import Transport
from comm.topology import EPTopology, init_ep_topology
from epserve.engine.builder import build_runner
from epserve.model.loader import resolve_dtype
from placement.placement import Placement

from launch.serve_cmd import API_KEY_ENV, add_model_arguments, default_model_dir, engine_config, preflight
from placement.errors import InputError

FATAL_GRACE_S = 1.5      # /health answers 503 this long after the engine failed, then the server stops
EXIT_DEADLINE_S = 15.0   # from the start of a stop to a forced exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.serve", description="epserve torchrun worker")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def worker_preflight(args) -> None:
    """The checks `epserve serve` runs before torchrun, for a direct torchrun launch (every rank runs them:
    nothing has started yet; rank 0 prints the problem). Fills in the default model. Exits 2 on bad input."""
    env = os.environ
    world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    args.model = args.model or str(default_model_dir())
    if "auto" in (args.strategy, args.transport):
        _refuse("--strategy/--transport auto is resolved by `epserve serve` before torchrun; give a strategy and a "
                "transport to the worker")
    shape = argparse.Namespace(**vars(args), nnodes=max(1, world // max(local, 1)), nproc_per_node=local,
                               node_rank=int(env.get("GROUP_RANK", "0")),
                               master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None, hardware=None,
                               trace=None, tokens_per_step=None)
    try:
        preflight(shape, check_port=False)
    except InputError as exc:
        _refuse(str(exc))


def _refuse(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"epserve worker: {message}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(2)


def liveness_from_env(topology: EPTopology):
    """Heartbeats in torchrun's store (MASTER_ADDR:MASTER_PORT); None at world size 1 or without a store."""
    env = os.environ
    if topology.world_size == 1 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    from comm.liveness import Liveness
    try:
        return Liveness(host=env["MASTER_ADDR"], port=int(env["MASTER_PORT"]), rank=topology.rank,
                        world_size=topology.world_size, gpus_per_node=topology.gpus_per_node)
    except Exception as exc:  # noqa: BLE001 - serving works without it; failures are then named less precisely
        print(f"epserve worker rank {topology.rank}: no liveness heartbeats ({exc})", file=sys.stderr, flush=True)
        return None


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
    worker_preflight(args)
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)
    # rank 0 takes its HTTP port before anything else can: gloo's and the store's ephemeral ports come later
    http_socket = bind_http_socket(args.host, args.port) if os.environ.get("RANK", "0") == "0" else None
    topology = topology_from_env(args.collective_timeout)
    liveness = liveness_from_env(topology)
    placement = Placement.load(args.placement) if args.placement else None
    runner = build_runner(args.model, topology, strategy=Strategy.parse(args.strategy), placement=placement,
                          predictor_path=args.predictor, kv_cache_tokens=args.kv_cache_tokens,
                          record_tokens=args.record_tokens if args.record_trace else 0,
                          window_tokens=args.replace_window, transport=Transport.parse(args.transport),
                          capacity=args.capacity, dtype=resolve_dtype(args.dtype, args.model),
                          attention=AttentionLayout.parse(args.attention or "dp"))
    watchdog = Watchdog(EXIT_DEADLINE_S)
    if topology.rank == 0:
        code = serve_rank0(args, runner, watchdog, http_socket, liveness)
    else:
        code = follow_rank(args, runner, watchdog, liveness)
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


def _uvicorn_server(config):
    """uvicorn.Server that leaves signal handling to us (its own handlers stop at once: no drain)."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(config)


def serve_rank0(args, runner, watchdog: Watchdog, http_socket=None, liveness=None) -> int:
    import uvicorn

    from epserve.engine.engine import start_engine
    from epserve.server.app import create_app

    fatal, stopping = threading.Event(), threading.Event()
    server_box: list = []

    def stop_server() -> None:
        if server_box:
            server_box[0].should_exit = True

    def end(drain_s: float) -> None:
        """Drain for up to ``drain_s``, end what is left with an error, stop every rank and the server."""
        engine.drain()
        deadline = time.monotonic() + drain_s
        while engine.in_flight() and time.monotonic() < deadline and not fatal.is_set():
            time.sleep(0.05)
        left = engine.in_flight()
        if engine.dead_reason is None:
            print(f"epserve worker: stopping ({'drained' if not left else f'{left} request(s) cut at the drain timeout'})",
                  file=sys.stderr, flush=True)
        watchdog.arm(1 if fatal.is_set() else 0)
        _stop_engine(engine)        # requests still running end with an error chunk while the server still answers
        time.sleep(0.3)
        stop_server()

    def on_signal(sig, _frame) -> None:
        if stopping.is_set():       # a second signal: stop now
            threading.Thread(target=end, args=(0.0,), daemon=True).start()
            return
        stopping.set()
        drain_s = args.drain_timeout if sig == signal.SIGTERM else 0.0
        threading.Thread(target=end, args=(drain_s,), daemon=True, name="epserve-drain").start()

    def on_fatal(reason: str) -> None:    # engine thread
        if liveness is not None:
            liveness.leaving()
        print(f"epserve worker: engine failed: {reason}", file=sys.stderr, flush=True)
        fatal.set()
        watchdog.arm(1)
        timer = threading.Timer(FATAL_GRACE_S, stop_server)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    engine = start_engine(runner, engine_config(args, Path(args.model)),
                          placement_document=runner.placement.to_dict(), on_fatal=on_fatal,
                          diagnose=None if liveness is None else liveness.diagnose)
    app = create_app(engine, _server_config(args))
    server = _uvicorn_server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                     timeout_graceful_shutdown=2))
    server_box.append(server)
    threading.Thread(target=_say_listening, args=(server, args, runner), daemon=True).start()
    try:
        server.run(sockets=None if http_socket is None else [http_socket])
    except SystemExit:          # uvicorn could not start (e.g. the port is taken); it logged why
        fatal.set()
    finally:
        watchdog.arm(1 if fatal.is_set() else 0)
        clean = _stop_engine(engine)
    return 1 if fatal.is_set() or not clean else 0


def _say_listening(server, args, runner) -> None:
    """One line once uvicorn accepts connections (the direct torchrun launch has no launcher to say it)."""
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        t = runner.topology
        print(f"epserve worker: listening on http://{args.host}:{args.port} ({t.world_size} rank(s), strategy "
              f"{runner.strategy_label})", file=sys.stderr, flush=True)


def _stop_engine(engine) -> bool:
    """Every rank leaves its loop (the engine sends a shutdown plan; bounded by its shutdown_timeout_s).
    True when the engine thread ended without a failure. Idempotent."""
    try:
        engine.shutdown()
    except Exception as exc:  # noqa: BLE001 - reported; the exit status says it
        print(f"epserve worker: engine shutdown failed: {exc}", file=sys.stderr, flush=True)
        return False
    return engine.join(timeout=0.1) and engine.dead_reason is None


# ---- ranks > 0 ----------------------------------------------------------------------------------------------
def follow_rank(args, runner, watchdog: Watchdog, liveness=None) -> int:
    from epserve.engine.engine import follow

    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 stops the group (a shutdown plan)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # rank 0 drains first; torchrun's SIGKILL still ends us
    try:
        follow(runner)
    except Exception as exc:  # noqa: BLE001 - a failed collective: rank 0 or a peer is gone
        lost = liveness.diagnose() if liveness is not None else ""
        if liveness is not None:
            liveness.leaving()
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        print(f"epserve worker rank {runner.topology.rank}: {lost or 'a collective failed: ' + first}; exiting",
              file=sys.stderr, flush=True)
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
