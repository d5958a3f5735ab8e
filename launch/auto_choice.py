"""``--strategy auto`` / ``--transport auto``: pick what the cost model predicts fastest, before torchrun starts.

    model config (shape, K/V width) + placement + routing (--trace, or uniform routing when none is given)
        --> simulate every candidate (strategy x transport; node_aware only across nodes; the speculative
            strategies only with a predictor) --> placement.cost_model.choose on --hardware
        --> (strategy, transport, the reason: printed, and the workers get the concrete choice)

Every node runs the same deterministic choice from the same inputs, so all ranks agree.
"""

from __future__ import annotations

from pathlib import Path

from comm.strategy import Strategy
from epserve.model.config import ModelConfig
from placement.errors import InputError
from placement.placement import Placement
from placement.transport import Transport

AUTO = "auto"


def hardware_name(args) -> str:
    """--hardware, or this host's default: a GPU cluster profile when CUDA is present, else cpu-gloo."""
    if getattr(args, "hardware", None):
        return args.hardware
    import torch
    return "h800-ib400" if torch.cuda.is_available() else "cpu-gloo"


def resolve_auto(args, config: ModelConfig, placement: Placement, predictor_path: Path | None
                 ) -> tuple[Strategy, Transport, str, str]:
    """The concrete (strategy, transport, attention layout) for ``args`` (strategy or transport ``auto``) and
    why. With ``--strategy auto`` and no ``--attention``, the TP attention strategies (tp_two_a2a, and
    tp_speculative with a predictor; transport a2a) are priced too (placement/cost_model_tp.py) and chosen when
    their modelled step is shorter; ``--attention dp|tp`` keeps the choice to that layout."""
    from placement.cost_model import ModelShape, choose, predict
    from placement.hardware import load_profile
    from placement.simulate import SimOptions, simulate

    hardware = load_profile(hardware_name(args))
    nodes = placement.cluster.nodes
    strategies = [Strategy.parse(args.strategy)] if args.strategy != AUTO else \
        [s for s in Strategy if predictor_path is not None or not s.needs_predictor]
    transports = [Transport.parse(args.transport)] if args.transport != AUTO else \
        [t for t in Transport if nodes > 1 or t is not Transport.NODE_AWARE]
    trace, source = _routing(args, config)
    predictor = None
    if predictor_path is not None and any(s.needs_predictor for s in strategies):
        from placement.predictor import SpeculativePredictor
        predictor = SpeculativePredictor.load(predictor_path)
        if not trace.has_token_ids:
            strategies = [s for s in strategies if not s.needs_predictor]
    dtype_bytes = _served_dtype_bytes(args)
    heads, k_dim, v_dim = config.kv_row
    kv = dict(kv_latent_dim=k_dim) if v_dim == 0 else dict(num_kv_heads=heads, head_dim=k_dim)   # MLA: latent row
    shape = ModelShape.from_fields(hidden_size=config.hidden_size, num_layers=config.num_layers,
                                   moe_layers=config.num_moe_layers, top_k=config.top_k, dtype_bytes=dtype_bytes,
                                   num_experts=config.num_experts, **kv)
    options = SimOptions(hidden_size=config.hidden_size, dtype_bytes=dtype_bytes, attention_layers=config.num_layers)
    tokens = args.tokens_per_step or args.max_running or 32
    tp = _tp_costs(args, config, placement, trace, predictor, strategies, transports, shape, hardware, tokens)
    if getattr(args, "attention", None) == "tp":
        if not tp:
            raise InputError("--attention tp: no TP candidate to choose from (--transport must be a2a or auto)")
        best = min(tp, key=lambda s: tp[s][0])
        return best, Transport.A2A, "tp", f"{_tp_label(best)} has the lowest modelled step among the TP " \
            f"strategies ({tp[best][0] * 1e3:.3f} ms on {hardware.name}). Routing: {source}."
    candidates = {(s, t): simulate(trace, placement, s, transport=t, options=options,
                                   predictor=predictor if s.needs_predictor else None)
                  for s in strategies for t in transports}
    (strategy, transport), _, why = choose(candidates, model=shape, hardware=hardware, tokens_per_step=tokens)
    dp_s = predict(candidates[(strategy, transport)], model=shape, hardware=hardware, tokens_per_step=tokens).step_s
    if tp:
        best = min(tp, key=lambda s: tp[s][0])
        if tp[best][0] < dp_s:
            return best, Transport.A2A, "tp", f"{_tp_label(best)}+a2a (TP attention) has the lowest modelled " \
                f"step: {tp[best][0] * 1e3:.3f} ms against {dp_s * 1e3:.3f} ms for {strategy.value}+" \
                f"{transport.value} on {hardware.name}. Routing: {source}."
        why += " TP attention considered: " + ", ".join(f"{_tp_label(s)} {c * 1e3:.3f} ms" for s, (c, _) in tp.items())
        why += " (its reduce-scatter and all-gather cost more than they save)."
    return strategy, transport, "dp", f"{why} Routing: {source}."


def _tp_label(strategy: Strategy) -> str:
    return "tp_speculative" if strategy is Strategy.SPECULATIVE else "tp_two_a2a"


def _tp_costs(args, config, placement, trace, predictor, strategies, transports, shape, hardware, tokens) -> dict:
    """{Strategy: (modelled step seconds, TPReport)} of the TP candidates the options allow ({} when none)."""
    if getattr(args, "attention", None) == "dp" or args.strategy != AUTO or Transport.A2A not in transports:
        return {}
    from epserve.model.tp import check_tp
    from placement.cost_model_tp import tp_step_time
    from placement.simulate_tp import simulate_tp
    try:
        check_tp(config, placement.num_gpus)
    except InputError:
        return {}
    out = {}
    for s in (Strategy.TWO_A2A, Strategy.SPECULATIVE):
        if s not in strategies or (s.needs_predictor and predictor is None):
            continue
        report = simulate_tp(trace, placement, strategy=_tp_label(s), predictor=predictor if s.needs_predictor
                             else None, tokens_per_step=tokens, hidden_size=config.hidden_size,
                             dtype_bytes=shape.dtype_bytes, capacity_factor=2.0)
        cost = tp_step_time(report, hardware, model=shape)
        out[s] = (sum(cost.phase_s.values()), report)
    return out


def _routing(args, config: ModelConfig):
    """The trace the choice replays: --trace, or uniform random routing of the model's shape."""
    from placement.trace import RoutingTrace
    if getattr(args, "trace", None):
        trace = RoutingTrace.load(args.trace)
        if (trace.num_layers, trace.num_experts) != (config.num_moe_layers, config.num_experts):
            raise InputError(f"--trace {args.trace} has {trace.num_layers} MoE layers x {trace.num_experts} "
                             f"experts, the model {config.num_moe_layers} x {config.num_experts}")
        return trace, f"{args.trace} ({trace.num_tokens} tokens)"
    from placement.synthetic import SyntheticSpec, synthetic_trace
    spec = SyntheticSpec(num_tokens=2048, num_layers=config.num_moe_layers, num_experts=config.num_experts,
                         top_k=config.top_k, num_clusters=1, noise=1.0, seq_len=32, seed=0)
    return synthetic_trace(spec), "uniform random routing (no --trace given: no affinity assumed)"


def check_transport_options(args) -> None:
    """--transport node_aware needs several nodes; --capacity is the fixed transport's, and positive."""
    if args.transport == Transport.NODE_AWARE.value and args.nnodes < 2:
        raise InputError("--transport node_aware needs --nnodes >= 2 (on one node every transfer is intra-node: "
                         "use a2a or fixed)")
    if args.capacity is not None:
        if args.capacity < 1:
            raise InputError(f"--capacity must be >= 1 row per peer, got {args.capacity}")
        if args.transport not in (Transport.FIXED.value, AUTO):
            raise InputError(f"--capacity sizes the fixed transport's buffers; it does not apply to --transport "
                             f"{args.transport}")
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        raise InputError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")



def _served_dtype_bytes(args) -> int:
    """Bytes per element of the dtype the workers will serve in (--dtype, auto: the checkpoint's)."""
    import torch

    from epserve.model.loader import resolve_dtype
    from launch.serve_cmd import default_model_dir
    model_dir = Path(args.model) if getattr(args, "model", None) else default_model_dir()
    return torch.empty((), dtype=resolve_dtype(getattr(args, "dtype", "auto"), model_dir)).element_size()
