"""``epserve serve``: check everything in this process, then run torchrun with ``launch.serve`` on every rank.

    argv --> pre-flight (nothing started yet): checkpoint headers + tokenizer, placement fits the model
         (layers x experts) and the world (nnodes x nproc), strategy has its predictor, limits are sane
         --> InputError: one line, exit status 2
    --> torchrun child (own session): python -m torch.distributed.run ... -m launch.serve <worker args>
         SIGINT: the workers stop (rank 0 ends the group), SIGTERM: torchrun stops them; each step bounded,
         then a harder one (SIGKILL last; the workers die with torchrun: PDEATHSIG)
    --> node 0: poll /health until the server answers, print where it listens
    --> exit status of torchrun (0 after a requested stop that ended cleanly)

The API key travels to the workers in the environment (EPSERVE_API_KEY), never on a command line.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from comm.spawn import free_port
from comm.strategy import Strategy
from epserve.model.config import ModelConfig
from launch.supervise import forward_signals, relay_stderr, say_if_node0_is_gone
from launch.auto_choice import AUTO, check_transport_options, resolve_auto
from placement.transport import Transport
from placement.errors import InputError, PlacementError
from placement.placement import Placement, contiguous_placement
from placement.cluster import ClusterShape

API_KEY_ENV = "EPSERVE_API_KEY"
WORKER_SHUTDOWN_S = 10     # torchrun: SIGTERM to a worker, then SIGKILL after this long
ENGINE_STOP_S = 5.0        # rank 0 waits this long for the engine's shutdown plan to go round
ENGINE_HEARTBEAT_S = 0.5   # the engine's idle plan interval (EngineConfig default)


def default_model_dir() -> Path:
    """The bundled default model (found through the installed package: works offline)."""
    return Path(str(resources.files("epserve") / "assets" / "default_model"))


# ---- arguments ----------------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options a worker needs too (``launch.serve`` parses the same ones)."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled default model)")
    p.add_argument("--strategy", default=Strategy.TWO_A2A.value, choices=[s.value for s in Strategy] + [AUTO],
                   help="where tokens live and are summed (auto: what the cost model predicts fastest)")
    p.add_argument("--transport", default=Transport.A2A.value, choices=[t.value for t in Transport] + [AUTO],
                   help="how rows move: a2a (counts exchange + uneven all-to-all), fixed (fixed per-peer buffers, "
                        "no host sync), node_aware (each token crosses to another node once); auto: the cost "
                        "model's choice")
    p.add_argument("--attention", default=None, choices=["dp", "tp"],
                   help="default dp, or what --strategy auto chooses (it prices both); "
                        "dp: each token's attention on one rank (every strategy); tp: heads sharded over the EP "
                        "group, each rank caching only its heads' K/V, tokens reduce-scattered into chunks around "
                        "each MoE layer (strategy two_a2a: tp_two_a2a; speculative: tp_speculative, each token "
                        "scattered to the rank predicted to hold its experts; GQA models)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights, activations and KV cache dtype (auto: the checkpoint's); routers' softmax / "
                        "sigmoid and top-k weights stay float32")
    p.add_argument("--capacity", type=int, help="fixed transport: rows per peer (default: sized from each step)")
    p.add_argument("--placement", help="placement JSON (from epserve place; default: contiguous)")
    p.add_argument("--predictor", help="predictor .npz (default: the one the placement names)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server listens on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--served-model-name", help="model name the API reports (default: the checkpoint's name)")
    p.add_argument("--max-running", type=int, help="sequences in the running batch")
    p.add_argument("--max-batched-tokens", type=int, help="tokens per engine step")
    p.add_argument("--max-waiting", type=int, help="queued requests before 503")
    p.add_argument("--kv-cache-tokens", type=int, default=8192, help="KV cache capacity per rank (tokens)")
    p.add_argument("--max-model-len", type=int, help="prompt + generated tokens of one sequence")
    p.add_argument("--record-trace", help="write the routing of live traffic to this .npz at shutdown")
    p.add_argument("--record-tokens", type=int, default=65536, help="tokens to record (with --record-trace)")
    p.add_argument("--collective-timeout", type=float, default=60.0,
                   help="seconds before a stuck collective fails the engine (finite); also bounds how long a "
                        "dead peer or a cut link takes to be noticed (shorter: faster failover, but a long prefill "
                        "step on a slow machine must stay under it)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to finish the requests in flight (new ones get 503 with Retry-After, "
                        "/health 503) before the rest are ended with an error; then exit 0")
    live = p.add_argument_group("live re-placement (POST /placement, needs --api-key)")
    live.add_argument("--replace-window", type=int, default=4096, metavar="TOKENS",
                      help="keep the routing of the latest TOKENS tokens on each rank (device memory, no host "
                           "sync) for solving a placement from live traffic; 0: off")
    live.add_argument("--replace-every", type=int, default=0, metavar="TOKENS",
                      help="solve a placement from the live window every TOKENS generated tokens and swap it in "
                           "when it pays (default 0: only on POST /placement)")
    live.add_argument("--replace-step-mb", type=float, default=8.0, metavar="MB",
                      help="expert weights one rank sends or receives per engine step during a swap (MiB; a "
                           "layer's moves are staged over several steps, the layer switches at its last; 0: a "
                           "whole layer per step)")
    live.add_argument("--replace-time-limit", type=float, default=10.0, metavar="S",
                      help="seconds of search for a live solve (a background process, niced)")
    live.add_argument("--replace-min-gain", type=float, default=0.02, metavar="F",
                      help="swap a solved placement in only when it cuts transfers per token-layer on the live "
                           "window by this fraction (default 0.02)")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (OpenAI API) on EP ranks under torchrun",
                              description="Check the model, placement and options, then start torchrun with "
                                          "one rank per GPU; rank 0 serves the OpenAI-compatible API.")
    add_model_arguments(p)
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks (GPUs) on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (machines) in the EP group")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index (node 0 serves HTTP)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (node 0's)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one; set it for nnodes > 1)")
    p.add_argument("--api-key", help=f"require this bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--hardware", help="cost-model profile for auto choices (cpu-gloo, h800-ib400, shaped:RATE, "
                                      "or a profile .json; default: h800-ib400 with CUDA, else cpu-gloo)")
    p.add_argument("--trace", help="routing trace the auto choices replay (default: uniform random routing)")
    p.add_argument("--tokens-per-step", type=int, help="tokens per step the auto choices assume "
                                                       "(default: --max-running)")
    p.set_defaults(func=run_serve)


# ---- pre-flight ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks resolved: absolute paths the workers get, and what to print."""

    model_dir: Path
    config: ModelConfig
    placement: Placement
    placement_path: Path | None
    predictor_path: Path | None
    world_size: int
    strategy: Strategy
    transport: Transport
    attention: str = "dp"       # dp or tp (--attention, or what --strategy auto chose)
    why: str = ""               # the cost model's reason, when a choice was left to it


def preflight(args, *, check_port: bool = True) -> Preflight:
    """Every check that can fail on the user's input, before any process starts. Raises InputError.
    ``check_port``: False in the torchrun worker (rank 0 binds the port itself)."""
    _check_numbers(args)
    model_dir = Path(args.model).resolve() if args.model else default_model_dir()
    from epserve.model.loader import check_checkpoint
    config = check_checkpoint(model_dir)
    from epserve.model.loader import resolve_dtype
    resolve_dtype(args.dtype, model_dir)   # refuses a cast by name, before torchrun
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir}: no tokenizer.json (the server needs the model's tokenizer)")
    world = args.nnodes * args.nproc_per_node
    if config.num_experts % world and not args.placement:   # a placement may replicate experts instead
        raise InputError(f"the model's {config.num_experts} experts cannot be split evenly over {world} ranks "
                         f"(--nnodes {args.nnodes} x --nproc-per-node {args.nproc_per_node}); give a --placement "
                         f"with replicated experts (schema version 2)")
    placement_path = Path(args.placement).resolve() if args.placement else None
    placement = _placement(args, placement_path, config, model_dir.name)
    if args.attention == "tp":
        from epserve.model.tp import check_tp
        check_tp(config, world)
        if args.strategy not in (Strategy.TWO_A2A.value, Strategy.SPECULATIVE.value, AUTO):
            raise InputError(f"--attention tp serves --strategy two_a2a (tp_two_a2a) and speculative "
                             f"(tp_speculative); got --strategy {args.strategy}")
    check_transport_options(args)
    predictor_path = None if args.strategy == AUTO else \
        _predictor(args, Strategy.parse(args.strategy), placement, placement_path)
    if AUTO in (args.strategy, args.transport):
        if args.strategy == AUTO:
            predictor_path = _optional_predictor(args, placement, placement_path)
        strategy, transport, attention, why = resolve_auto(args, config, placement, predictor_path)
        if not strategy.needs_predictor:
            predictor_path = None
    else:
        strategy, transport, why = Strategy.parse(args.strategy), Transport.parse(args.transport), ""
        attention = args.attention or "dp"
    if args.max_model_len is not None and args.max_model_len > config.max_position_embeddings:
        raise InputError(f"--max-model-len {args.max_model_len} exceeds the model's context "
                         f"({config.max_position_embeddings} positions)")
    if args.record_trace and not Path(args.record_trace).resolve().parent.is_dir():
        raise InputError(f"--record-trace: directory does not exist: {Path(args.record_trace).parent}")
    _check_engine_limits(args)
    try:
        engine_config(args, model_dir)
    except ValueError as exc:   # every option was checked above in its own words; this is a backstop
        raise InputError(f"engine options: {exc}") from None
    max_len = args.max_model_len or config.max_position_embeddings
    if args.kv_cache_tokens < max_len:
        raise InputError(f"--kv-cache-tokens {args.kv_cache_tokens} holds fewer tokens than one full-length sequence "
                         f"({max_len}: --max-model-len, default the model's context); raise --kv-cache-tokens or "
                         f"lower --max-model-len")
    if args.node_rank == 0 and check_port:
        _check_port_free(args.host, args.port)
    return Preflight(model_dir=model_dir, config=config, placement=placement, placement_path=placement_path,
                     predictor_path=predictor_path, world_size=world, strategy=strategy, transport=transport,
                     attention=attention, why=why)


def _placement(args, path: Path | None, config: ModelConfig, model_name: str) -> Placement:
    """The placement to serve (contiguous without --placement), refused unless it fits the model and world."""
    if path is None:
        return contiguous_placement(config.num_moe_layers, config.num_experts,
                                    ClusterShape(nodes=args.nnodes, gpus_per_node=args.nproc_per_node))
    placement = Placement.load(path)
    placement.check_fits(num_layers=config.num_moe_layers, num_experts=config.num_experts,
                         what=f"the model ({model_name})")
    world = args.nnodes * args.nproc_per_node
    if placement.num_gpus != world:
        raise PlacementError(f"{path} is for {placement.num_gpus} GPUs, but --nnodes {args.nnodes} "
                             f"x --nproc-per-node {args.nproc_per_node} = {world} ranks")
    return placement


def engine_config(args, model_dir: Path):
    """The EngineConfig the options ask for (defaults from the checkpoint). Raises ValueError."""
    from epserve.engine.engine import EngineConfig

    given = {"max_running_seqs": args.max_running, "max_batched_tokens": args.max_batched_tokens,
             "max_waiting": args.max_waiting, "max_model_len": args.max_model_len,
             "model_name": args.served_model_name,
             "record_trace_path": str(Path(args.record_trace).resolve()) if args.record_trace else None,
             "stuck_after_s": max(args.collective_timeout, 2 * ENGINE_HEARTBEAT_S),
             "shutdown_timeout_s": ENGINE_STOP_S, "replace": replace_config(args)}
    return EngineConfig.from_model_dir(model_dir, **{k: v for k, v in given.items() if v is not None})


def replace_config(args):
    """Live re-placement's options (epserve/engine/replace_control.py). Raises InputError."""
    from epserve.engine.replace_control import ReplaceConfig
    from placement.pipeline import RefitOptions

    refit = RefitOptions(time_limit=args.replace_time_limit, min_gain=args.replace_min_gain)
    step_bytes = int(args.replace_step_mb * (1 << 20)) or None
    return ReplaceConfig(every_tokens=args.replace_every, step_bytes=step_bytes, refit=refit)


def _check_engine_limits(args) -> None:
    """The cross-option limits of EngineConfig, in the words of the command line (defaults filled in)."""
    from epserve.engine.engine import EngineConfig

    defaults = {f.name: f.default for f in fields(EngineConfig)}
    running = args.max_running or defaults["max_running_seqs"]
    batched = args.max_batched_tokens or defaults["max_batched_tokens"]
    if running > batched:
        raise InputError(f"--max-running ({running}) must be <= --max-batched-tokens ({batched}): every running "
                         f"sequence decodes one token each step")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise InputError("--served-model-name must not be empty")


def _check_port_free(host: str, port: int) -> None:
    """The server (rank 0, on this node) must be able to listen on host:port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: cannot resolve it ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
        try:
            s.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def _check_numbers(args) -> None:
    positive = {"--nproc-per-node": args.nproc_per_node, "--nnodes": args.nnodes,
                "--kv-cache-tokens": args.kv_cache_tokens, "--record-tokens": args.record_tokens,
                "--max-running": args.max_running, "--max-batched-tokens": args.max_batched_tokens,
                "--max-waiting": args.max_waiting, "--max-model-len": args.max_model_len}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.node_rank < args.nnodes:
        raise InputError(f"--node-rank {args.node_rank} is not in [0, --nnodes {args.nnodes})")
    if args.nnodes > 1 and args.master_port is None:
        raise InputError("--master-port is required with --nnodes > 1 (every node must name the same one)")
    for flag, port in (("--port", args.port), ("--master-port", args.master_port)):
        if port is not None and not 0 < port < 65536:
            raise InputError(f"{flag} {port} is not a TCP port (1..65535)")
    if args.master_port is not None and args.master_port == args.port and args.node_rank == 0:
        raise InputError(f"--master-port {args.master_port} is also the HTTP --port: node 0 listens on both")
    for flag, value in (("--replace-window", args.replace_window), ("--replace-every", args.replace_every)):
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if args.replace_every and not args.replace_window:
        raise InputError("--replace-every needs a live routing window to solve on: give --replace-window > 0")
    if not (math.isfinite(args.replace_step_mb) and args.replace_step_mb >= 0):
        raise InputError(f"--replace-step-mb must be a number of MiB >= 0, got {args.replace_step_mb}")
    if not (math.isfinite(args.replace_time_limit) and args.replace_time_limit > 0):
        raise InputError(f"--replace-time-limit must be a finite number of seconds > 0, got {args.replace_time_limit}")
    if not 0 <= args.replace_min_gain < 1:
        raise InputError(f"--replace-min-gain must be in [0, 1), got {args.replace_min_gain}")
    if not (math.isfinite(args.collective_timeout) and args.collective_timeout > 0):
        raise InputError(f"--collective-timeout must be a finite number of seconds > 0, got "
                         f"{args.collective_timeout}")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise InputError(f"--drain-timeout must be a finite number of seconds >= 0, got {args.drain_timeout}")


def _predictor(args, strategy: Strategy, placement: Placement, placement_path: Path | None) -> Path | None:
    """The predictor file the strategy needs (checked against the placement), or None."""
    if not strategy.needs_predictor:
        return None
    if args.predictor:
        path = Path(args.predictor).resolve()
    elif placement_path is not None and placement.solver.get("predictor"):
        path = placement_path.with_name(placement.solver["predictor"])
    else:
        raise InputError(f"strategy {strategy.value} needs a predictor: pass --predictor, or a --placement "
                         f"written by `epserve place` from a trace with vocabulary ids (it names one)")
    from placement.predictor import SpeculativePredictor
    SpeculativePredictor.load(path).check_placement(placement)   # InputError when missing or unreadable
    return path


def _optional_predictor(args, placement: Placement, placement_path: Path | None) -> Path | None:
    """For --strategy auto: the predictor when one is given or named by the placement, else None."""
    if not args.predictor and not (placement_path is not None and placement.solver.get("predictor")):
        return None
    return _predictor(args, Strategy.SPECULATIVE, placement, placement_path)


# ---- torchrun -----------------------------------------------------------------------------------------------
def worker_argv(args, pre: Preflight) -> list[str]:
    """``launch.serve``'s arguments: the resolved paths and every model option as given."""
    out = ["--model", str(pre.model_dir), "--strategy", pre.strategy.value, "--transport", pre.transport.value,
           "--attention", pre.attention,
           "--host", args.host, "--port", str(args.port), "--dtype", args.dtype,
           "--kv-cache-tokens", str(args.kv_cache_tokens), "--record-tokens", str(args.record_tokens),
           "--collective-timeout", str(args.collective_timeout), "--drain-timeout", str(args.drain_timeout),
           "--replace-window", str(args.replace_window),
           "--replace-every", str(args.replace_every), "--replace-time-limit", str(args.replace_time_limit),
           "--replace-step-mb", str(args.replace_step_mb),
           "--replace-min-gain", str(args.replace_min_gain)]
    optional = {"--placement": pre.placement_path, "--predictor": pre.predictor_path,
                "--served-model-name": args.served_model_name, "--max-running": args.max_running,
                "--max-batched-tokens": args.max_batched_tokens, "--max-waiting": args.max_waiting,
                "--max-model-len": args.max_model_len, "--capacity": args.capacity,
                "--record-trace": Path(args.record_trace).resolve() if args.record_trace else None}
    for flag, value in optional.items():
        if value is not None:
            out += [flag, str(value)]
    return out


def torchrun_argv(args, pre: Preflight) -> list[str]:
    port = args.master_port
    while port is None or port == args.port:   # a free port may come round again: never the HTTP one
        port = free_port()                     # (a given --master-port equal to --port is refused before)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node),
            "--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
            "--master-port", str(port), "--max-restarts", "0", "--monitor-interval", "0.5",
            "--shutdown-timeout", str(WORKER_SHUTDOWN_S), "-m", "launch.serve", *worker_argv(args, pre)]


def worker_env(args) -> dict[str, str]:
    env = dict(os.environ)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key:
        env[API_KEY_ENV] = api_key
    else:
        env.pop(API_KEY_ENV, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_serve(args) -> int:
    pre = preflight(args)
    if pre.why:
        print(f"epserve serve: chose --strategy {pre.strategy.value} --transport {pre.transport.value} "
              f"--attention {pre.attention}: {pre.why}",
              file=sys.stderr, flush=True)
    child = subprocess.Popen(torchrun_argv(args, pre), env=worker_env(args), start_new_session=True,
                             stderr=subprocess.PIPE)
    relay = threading.Thread(target=relay_stderr, args=(child.stderr,), daemon=True, name="stderr-relay")
    relay.start()
    stop = forward_signals(child, drain_s=args.drain_timeout)
    if args.node_rank == 0:
        threading.Thread(target=_announce, args=(child, args, pre), daemon=True).start()
    code = child.wait()
    relay.join(timeout=5.0)
    if code != 0 and not stop.is_set() and args.node_rank != 0:
        say_if_node0_is_gone(args.master_addr, args.master_port)
    if stop.is_set() and code == 0:
        print("epserve serve: stopped", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code


def _announce(child: subprocess.Popen, args, pre: Preflight) -> None:
    """Print where the server listens once /health answers (any HTTP status), while torchrun lives."""
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = f"http://{host}:{args.port}/health"
    while child.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1.0).close()
        except urllib.error.HTTPError:
            pass                                  # it answered: up (503 while warming up, 401 with a key)
        except (OSError, ValueError):
            time.sleep(0.25)
            continue
        print(f"epserve serve: listening on http://{args.host}:{args.port} ({pre.model_dir.name}, "
              f"{pre.world_size} rank(s), strategy {pre.strategy.value}, transport {pre.transport.value}, placement "
              f"{pre.placement_path or 'contiguous'})", file=sys.stderr, flush=True)
        return
