"""``epserve place`` and ``epserve simulate``: the offline placement tool.

    place:    trace --split (--held-out)--> fit --stats--> solve (progress on stderr)
              [--refine: exact swaps against coherent transfers on the fit part] --> placement.json
              (+ <stem>.anchors.npz for top-k > 1: the coherent anchor table, fitted on the fit part)
              (+ <stem>.predictor.npz when the fit trace has vocabulary ids)
              --> table: ours vs contiguous vs round_robin on the held-out part (else the fit trace)
    simulate: trace + placement.json (+ predictor) --> table for the chosen strategies, same comparison
              [--hardware NAME|profile.json --model DIR]: + every strategy x transport on the placement
              (and two_a2a on contiguous, the baseline) --cost model--> time per MoE layer and per step,
              bottleneck link, bytes per link class, ratio to contiguous two_a2a+a2a, and the model's choice

Every input is read and checked before anything is written; bad input is an InputError (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from placement.cluster import ClusterShape
from placement.cost_model import COST_COLUMNS, ModelShape, choose, format_cost_table
from placement.hardware import BUILTIN_NAMES, load_profile
from placement.errors import InputError, TraceError
from placement.placement import Placement
from placement.pipeline import FitOptions, fit_placement
from placement.predictor import SpeculativePredictor
from placement.report import comparison_rows, file_sha256, format_table
from placement.simulate import SimOptions, Strategy, simulate
from placement.transport import Transport
from placement.solvers import SolveOptions, SolverKind, solve
from placement.solvers.replicate import DEFAULT_MAX_IMBALANCE
from placement.stats import StatsOptions, compute_stats, objective, objective_upper_bound
from placement.trace import RoutingTrace


def register(subparsers) -> None:
    place = subparsers.add_parser("place", help="fit an expert placement to a routing trace",
                                  description="Fit an expert placement to a routing trace and compare it with "
                                              "the contiguous and round-robin placements.")
    place.add_argument("--trace", required=True, help="routing trace (.npz, ours or the FLAME layout)")
    place.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    place.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (EP ranks) per node")
    place.add_argument("--solver", default="local", choices=[k.value for k in SolverKind], help="placement solver")
    place.add_argument("--time-limit", type=float, default=60.0, help="seconds for the search (default 60)")
    place.add_argument("--seed", type=int, default=0, help="random seed of the search")
    place.add_argument("--restarts", type=int, default=4, help="restarts of the search (local)")
    place.add_argument("--rounds", type=int, default=100, help="perturbation rounds per restart (local)")
    place.add_argument("--slot-decay", type=float, default=StatsOptions().slot_decay,
                       help="weight of a pair of choices in slots (s, d) is SLOT_DECAY ** (s + d) (default: auto, "
                            "from the fit tokens per expert pair: 0.5 with many, up to 1 with few)")
    place.add_argument("--coact-weight", type=float, default=StatsOptions().coact_weight,
                       help="weight of intra-layer co-activation relative to inter-layer affinity")
    place.add_argument("--shrink", default="0", type=_shrink_arg, metavar="auto|A",
                       help="shrink pair counts toward the product of their marginals by A in [0, 1] (noisy "
                            "statistics from few tokens); auto: choose A by 3-fold cross-validation inside the fit "
                            "part (15 small solves). Default 0: on the FLAME trace auto gained nothing beyond "
                            "noise (bench/results/placement_bench.md)")
    place.add_argument("--intra-node-cost", type=float, default=1.0, help="relative cost of an intra-node transfer")
    place.add_argument("--inter-node-cost", type=float, default=4.0, help="relative cost of an inter-node transfer")
    place.add_argument("--refine", action="store_true",
                       help="after solving, swap experts to lower the coherent strategy's exact transfers on the "
                            "fit tokens (the surrogate objective is pairwise; this counts distinct ranks)")
    place.add_argument("--anchors", action=argparse.BooleanOptionalAction, default=True,
                       help="fit a coherent anchor table (top-k > 1; default on): sum each token on the expert "
                            "rank most likely to hold its next layer's experts instead of its top-1 rank")
    place.add_argument("--slots-per-gpu", type=int, metavar="S",
                       help="expert copies per GPU per layer (default: experts / GPUs, no replicas); S x GPUs must "
                            "be >= experts (fewer experts than GPUs works): the S x GPUs - experts extra slots hold "
                            "replicas of hot experts (placement/solvers/replicate.py); the predictor (when the trace "
                            "has vocabulary ids) predicts ranks that hold a copy")
    place.add_argument("--max-imbalance", type=float, default=DEFAULT_MAX_IMBALANCE,
                       help="with --slots-per-gpu: bound on max / mean GPU load per layer that the replicas aim at "
                            f"(default {DEFAULT_MAX_IMBALANCE}); under it, ties go to affinity")
    _common(place)
    place.add_argument("-o", "--output", required=True, help="placement JSON to write")
    place.set_defaults(func=run_place)

    sim = subparsers.add_parser("simulate", help="simulate the all-to-all traffic of a placement on a trace",
                                description="Replay a routing trace under a placement and compare its traffic "
                                            "with the contiguous and round-robin placements.")
    sim.add_argument("--trace", required=True, help="routing trace (.npz, ours or the FLAME layout)")
    sim.add_argument("--placement", required=True, help="placement JSON (from epserve place)")
    sim.add_argument("--strategy", default="coherent", choices=[s.value for s in Strategy] + ["all"],
                     help="strategy to simulate (all: every one)")
    sim.add_argument("--predictor", help="predictor .npz (default: the one named in the placement)")
    sim.add_argument("--hidden-size", type=int, help="hidden size H, to report bytes")
    sim.add_argument("--dtype-bytes", type=int, default=2, help="bytes per hidden-state element")
    cost = sim.add_argument_group("cost model (modelled communication time)")
    cost.add_argument("--hardware", help=f"hardware profile: {', '.join(BUILTIN_NAMES)} (e.g. shaped:20mbit) or a "
                                         f"profile .json (bench/calibrate_gloo.py writes one)")
    cost.add_argument("--model", help="model directory (Hugging Face config.json gives the shape)")
    cost.add_argument("--kv-entry-bytes", type=int,
                      help="bytes of one token's K/V at one attention layer (without --model)")
    cost.add_argument("--attention-layers", type=int, help="attention layers (without --model; default: the "
                                                          "trace's MoE layers)")
    cost.add_argument("--transport", default="all", choices=[t.value for t in Transport] + ["all"],
                      help="transport(s) to model (all: node_aware only on more than one node)")
    cost.add_argument("--tokens-per-step", type=int, default=64, help="tokens in one step (all ranks together)")
    _common(sim)
    sim.set_defaults(func=run_simulate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--held-out", type=float, metavar="FRACTION",
                        help="fit on the first 1-FRACTION of the tokens, report on the rest")
    parser.add_argument("--num-experts", type=int, help="experts per layer, when the trace does not say")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_place(args) -> int:
    out = Path(args.output)
    if not out.parent.is_dir():
        raise InputError(f"output directory does not exist: {out.parent}")
    if out.suffix != ".json":
        raise InputError(f"output must be a .json file, got {out}")
    cluster = ClusterShape(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           intra_node_cost=args.intra_node_cost, inter_node_cost=args.inter_node_cost)
    trace = RoutingTrace.load(args.trace, num_experts=args.num_experts)
    fit, evaluate = _split(trace, args.held_out)
    options = FitOptions(solve=SolveOptions(solver=SolverKind.parse(args.solver), time_limit=args.time_limit,
                                            seed=args.seed, restarts=args.restarts, rounds=args.rounds,
                                            progress=_progress()),
                         stats=StatsOptions(slot_decay=args.slot_decay, coact_weight=args.coact_weight),
                         shrink=args.shrink, slots_per_gpu=args.slots_per_gpu, max_imbalance=args.max_imbalance,
                         refine=args.refine, anchors=args.anchors)
    fitted = fit_placement(fit, cluster, options, progress=options.solve.progress)
    shrink = fitted.shrink if args.shrink == "auto" else {"strength": args.shrink, "chosen_by": "--shrink"}
    solver = {**fitted.placement.solver, "shrink": shrink}
    if fitted.predictor is not None:
        solver["predictor"] = out.with_name(out.stem + ".predictor.npz").name
    if fitted.placement.anchors is not None:
        solver["anchors"] = out.with_name(out.stem + ".anchors.npz").name
    placement = dataclasses.replace(fitted.placement, solver=solver,
                                    trace=_provenance(args.trace, trace, fit, args.held_out))
    predictor, stats = fitted.predictor, fitted.stats
    if predictor is not None:
        predictor.save(out.with_name(solver["predictor"]))
    placement.save(out)
    if fitted.replicated:
        return _report_replicated(args, out, fit, evaluate, placement, predictor)

    baselines = {kind.value: solve(stats, cluster, SolveOptions(solver=kind))
                 for kind in (SolverKind.CONTIGUOUS, SolverKind.ROUND_ROBIN)}
    placements = {**_ours(placement), **baselines}
    # The table's objective is on the tokens the table is on (the held-out part), computed exactly as `simulate`
    # computes it; the solver's objective, proven bound and gap on the fit part are on the "wrote" line.
    objectives = _objectives_on(evaluate, placements, placement)
    strategies = [Strategy.TWO_A2A, Strategy.COHERENT] + ([Strategy.SPECULATIVE] if predictor else [])
    rows = comparison_rows(evaluate, placements, strategies, objectives=objectives, predictor=predictor)
    summary = {"output": str(out), "solver": placement.solver, "objective": placement.objective,
               "trace": placement.trace, "evaluated_on": _evaluated_on(args.held_out, evaluate),
               "objective_note": _OBJECTIVE_NOTE, "rows": rows}
    if predictor is not None:
        summary["predictor_accuracy"] = predictor.accuracy(evaluate, placement) if evaluate is not fit else None
    _print(args, summary, rows, placement.trace)
    return 0


def _report_replicated(args, out: Path, fit: RoutingTrace, evaluate: RoutingTrace, placement: Placement,
                       predictor) -> int:
    """Compare a replicated (v2) placement with contiguous / round_robin where those exist."""
    placements = _ours(placement)
    if fit.num_experts % placement.num_gpus == 0:
        stats = compute_stats(fit)
        placements.update({kind.value: solve(stats, placement.cluster, SolveOptions(solver=kind))
                           for kind in (SolverKind.CONTIGUOUS, SolverKind.ROUND_ROBIN)})
    strategies = [Strategy.TWO_A2A, Strategy.COHERENT] + ([Strategy.SPECULATIVE] if predictor else [])
    rows = comparison_rows(evaluate, placements, strategies, predictor=predictor)
    summary = {"output": str(out), "solver": placement.solver, "objective": placement.objective,
               "trace": placement.trace, "evaluated_on": _evaluated_on(args.held_out, evaluate), "rows": rows}
    if predictor is not None:
        summary["predictor_accuracy"] = predictor.accuracy(evaluate, placement) if evaluate is not fit else None
    if args.json:
        print(json.dumps(summary, indent=1, default=float))
        return 0
    r, load = placement.solver["replicas"], placement.objective["load"]
    print(f"wrote {out}: solver {placement.solver['name']}, {placement.slots_per_gpu} slots per GPU, {r['added']} "
          f"replicas, {r['rebalance_swaps']} rebalancing swaps; fit max/mean GPU load (two_a2a) "
          f"{load['max_over_mean_before']:.3f} -> {load['max_over_mean']:.3f} (bound {r['max_imbalance']})")
    print(f"traffic on {summary['evaluated_on']} of {placement.trace['path']}:")
    print(format_table(rows))
    return 0


def run_simulate(args) -> int:
    trace = RoutingTrace.load(args.trace, num_experts=args.num_experts)
    placement = Placement.load(args.placement)
    placement.check_fits(num_layers=trace.num_layers, num_experts=trace.num_experts)
    _, evaluate = _split(trace, args.held_out)
    if args.strategy == "all":   # the speculative ones only where they can run
        can_speculate = evaluate.has_token_ids and bool(args.predictor or placement.solver.get("predictor"))
        strategies = [s for s in Strategy if can_speculate or not s.needs_predictor]
    else:
        strategies = [Strategy.parse(args.strategy)]
    predictor = None
    cost_can_speculate = args.hardware is not None and evaluate.has_token_ids and \
        bool(args.predictor or placement.solver.get("predictor"))   # the cost table models every strategy
    if any(s.needs_predictor for s in strategies) or cost_can_speculate:
        if not evaluate.has_token_ids:
            raise TraceError(f"{args.trace} has no vocabulary ids (token_ids): the speculative strategies need "
                             f"them; use --strategy two_a2a or coherent")
        predictor = SpeculativePredictor.load(_predictor_path(args, placement))
        predictor.check_placement(placement)
    options = SimOptions(hidden_size=args.hidden_size, dtype_bytes=args.dtype_bytes)
    cluster = placement.cluster
    stats = compute_stats(evaluate, StatsOptions(**placement.objective.get("surrogate", {})))
    placements = {**_ours(placement), **{kind.value: solve(stats, cluster, SolveOptions(solver=kind))
                                        for kind in (SolverKind.CONTIGUOUS, SolverKind.ROUND_ROBIN)}}
    objectives = _objectives_on(evaluate, placements, placement)
    if Strategy.TWO_A2A not in strategies:
        strategies = [Strategy.TWO_A2A] + strategies      # the baseline row every reduction refers to
    rows = comparison_rows(evaluate, placements, strategies, objectives=objectives, predictor=predictor,
                           options=options)
    summary = {"placement": str(args.placement), "evaluated_on": _evaluated_on(args.held_out, evaluate),
               "objective_note": _OBJECTIVE_NOTE, "rows": rows}
    if args.hardware is not None:
        summary["cost"] = _cost(args, evaluate, placement, placements["contiguous"], predictor)
    elif args.model is not None:
        raise InputError("--model gives the shape for the cost model: pass --hardware too")
    _print(args, summary, rows, {"path": str(args.trace), "tokens": evaluate.num_tokens})
    return 0


_OBJECTIVE_NOTE = ("objective, upper bound, gap: the placement's surrogate on the same tokens as the traffic "
                   "(the fit's surrogate options); upper bound: the cheap bound there (sum of top-M pair weights), "
                   "not a proven optimum")


def _objectives_on(trace: RoutingTrace, placements: dict[str, Placement], ours: Placement) -> dict:
    """{name: (objective, cheap upper bound)} on ``trace``, with ``ours``' surrogate options: what `place` and
    `simulate` both put in their tables, so the same placement on the same tokens gives the same figure."""
    stats = compute_stats(trace, StatsOptions(**ours.objective.get("surrogate", {})))
    bound = objective_upper_bound(stats, ours.cluster)
    return {name: (objective(stats, p.expert_to_gpu_LE, ours.cluster), bound) for name, p in placements.items()}


def _cost(args, trace: RoutingTrace, placement: Placement, contiguous: Placement, predictor) -> dict:
    """Every strategy x transport on the placement (+ two_a2a on contiguous), through the cost model."""
    hardware = load_profile(args.hardware)
    model = _model_shape(args, trace)
    if args.transport == "all":
        transports = [t for t in Transport if placement.cluster.nodes > 1 or t is not Transport.NODE_AWARE]
    else:
        transports = [Transport.parse(args.transport)]
    can_speculate = predictor is not None
    strategies = [s for s in Strategy if can_speculate or not s.needs_predictor]
    options = SimOptions(hidden_size=model.hidden_size, dtype_bytes=model.dtype_bytes,
                         kv_entry_bytes=model.kv_entry_bytes, attention_layers=model.attention_layers)
    tokens = args.tokens_per_step
    base = choose({(Strategy.TWO_A2A, t): simulate(trace, contiguous, Strategy.TWO_A2A, options=options, transport=t)
                   for t in transports}, model=model, hardware=hardware, tokens_per_step=tokens)
    candidates = {(s, t): simulate(trace, placement, s, predictor=predictor, options=options, transport=t)
                  for s in strategies for t in transports}
    best, rows, reason = choose(candidates, model=model, hardware=hardware, tokens_per_step=tokens)
    baseline = next((r for r in base[1] if r["transport"] == Transport.A2A.value), None)
    rows = [dict(r, placement="ours") for r in rows] + [dict(r, placement="contiguous") for r in base[1]]
    for r in rows:
        r["vs_baseline"] = None if baseline is None else r["step_ms"] / baseline["step_ms"]
    notes = []
    if (trace.top_k, trace.num_experts) != (model.top_k, model.num_experts or trace.num_experts) or \
            trace.num_layers != model.moe_layers:
        notes.append(f"the trace has {trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}; "
                     f"the model {model.moe_layers} x {model.num_experts}, top-{model.top_k}: transfers per "
                     f"token-layer come from the trace, row bytes and the layer count from the model")
    return {"hardware": hardware.to_dict(), "model": dataclasses.asdict(model), "tokens_per_step": tokens,
            "rows": rows, "choice": {"strategy": best[0].value, "transport": best[1].value}, "reason": reason,
            "baseline": "contiguous two_a2a+a2a", "notes": notes}


def _model_shape(args, trace: RoutingTrace) -> ModelShape:
    if args.model is None:
        if args.hidden_size is None or args.kv_entry_bytes is None:
            raise InputError("the cost model needs the model's shape: pass --model DIR (its config.json), or "
                             "--hidden-size and --kv-entry-bytes")
        layers = args.attention_layers or trace.num_layers
        return ModelShape(hidden_size=args.hidden_size, top_k=trace.top_k, moe_layers=trace.num_layers,
                          attention_layers=layers, kv_entry_bytes=args.kv_entry_bytes, dtype_bytes=args.dtype_bytes,
                          num_experts=trace.num_experts)
    return model_shape_from_dir(args.model)


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def model_shape_from_dir(path: str | Path) -> ModelShape:
    """The cost model's shape from a Hugging Face checkpoint's config.json (Mixtral, Qwen2/3-MoE, OLMoE,
    DeepSeek-V2/V3 keys). Shapes only: the checkpoint itself is not read."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise InputError(f"{file}: not found (--model needs a checkpoint directory with config.json)")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: not valid JSON ({exc})") from None

    def need(*keys):
        for key in keys:
            if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
                return d[key]
        raise InputError(f"{file}: missing integer field {' / '.join(repr(k) for k in keys)}")

    layers, hidden = need("num_hidden_layers"), need("hidden_size")
    experts = need("n_routed_experts", "num_local_experts", "num_experts")
    if "first_k_dense_replace" in d:                   # DeepSeek: dense first layers, then every moe_layer_freq-th
        freq = d.get("moe_layer_freq", 1) or 1
        moe = sum(1 for i in range(layers) if i >= d["first_k_dense_replace"] and i % freq == 0)
    elif "decoder_sparse_step" in d or "mlp_only_layers" in d:
        step, dense = d.get("decoder_sparse_step", 1) or 1, set(d.get("mlp_only_layers") or ())
        moe = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    else:
        moe = layers
    dtype = d.get("torch_dtype", d.get("dtype", "bfloat16"))
    if dtype not in _DTYPE_BYTES:
        raise InputError(f"{file}: dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    fields = dict(hidden_size=hidden, num_layers=layers, moe_layers=moe, top_k=need("num_experts_per_tok"),
                  dtype_bytes=_DTYPE_BYTES[dtype], num_experts=experts, name=str(d.get("model_type", "")))
    if d.get("kv_lora_rank"):                           # MLA caches the latent and the rotary key part
        return ModelShape.from_fields(**fields, kv_latent_dim=need("kv_lora_rank") + need("qk_rope_head_dim"))
    heads = need("num_attention_heads")
    kv_heads = d.get("num_key_value_heads") or heads
    return ModelShape.from_fields(**fields, num_kv_heads=kv_heads, head_dim=d.get("head_dim") or hidden // heads)


def _shrink_arg(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--shrink must be auto or a number in [0, 1], got {text!r}")
    return value


def _ours(placement: Placement) -> dict[str, Placement]:
    """Our placement, and (when it has an anchor table) the same without it: what the table saves."""
    if placement.anchors is None:
        return {"ours": placement}
    return {"ours": placement, "ours_top1_anchor": placement.with_anchors(None)}


def _split(trace: RoutingTrace, held_out: float | None) -> tuple[RoutingTrace, RoutingTrace]:
    if held_out is None:
        return trace, trace
    if not 0.0 < held_out < 1.0:
        raise InputError(f"--held-out must be a fraction in (0, 1), got {held_out}")
    return trace.split(1.0 - held_out)


def _provenance(path: str, trace: RoutingTrace, fit: RoutingTrace, held_out: float | None) -> dict:
    return {"path": str(path), "sha256": file_sha256(path), "total_tokens": trace.num_tokens,
            "tokens": fit.num_tokens, "fit_fraction": 1.0 if held_out is None else 1.0 - held_out,
            "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k,
            "model": trace.meta.get("model")}


def _evaluated_on(held_out: float | None, evaluate: RoutingTrace) -> str:
    if held_out is None:
        return f"the whole trace ({evaluate.num_tokens} tokens; no --held-out, so fitted tokens)"
    return f"the last {held_out:.0%} of the tokens, held out ({evaluate.num_tokens} tokens)"


def _predictor_path(args, placement: Placement) -> Path:
    if args.predictor:
        return Path(args.predictor)
    name = placement.solver.get("predictor")
    if not name:
        raise InputError(f"{args.placement} names no predictor; pass --predictor (built by epserve place from "
                         f"a trace with vocabulary ids)")
    return Path(args.placement).with_name(name)


_COST_COLUMNS = (("placement", "placement", "{}"),) + COST_COLUMNS


def _progress():
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def _print(args, summary: dict, rows: list[dict], trace_info: dict) -> None:
    if args.json:
        print(json.dumps(summary, indent=1, default=float))
        return
    if "solver" in summary:
        s, o = summary["solver"], summary["objective"]
        print(f"wrote {summary['output']}: solver {s['name']} ({s['status']}), {s['time_s']:.1f} s wall, "
              f"{s['cpu_s']:.1f} s CPU; on the {trace_info['tokens']} fit tokens: objective {o['value']:.1f}, "
              f"upper bound {o['upper_bound']:.1f}, gap {o['gap']:.2%}" +
              (f"; predictor {s['predictor']}" if "predictor" in s else "") +
              (f"; anchor table {s['anchors']}" if "anchors" in s else ""))
    print(f"traffic on {summary['evaluated_on']} of {trace_info['path']}:")
    print(format_table(rows))
    if "objective_note" in summary:
        print(summary["objective_note"])
    cost = summary.get("cost")
    if cost:
        hw = cost["hardware"]
        print(f"\nmodelled communication time on {hw['name']}, {cost['tokens_per_step']} tokens per step "
              f"(MODELLED, not measured; vs {cost['baseline']}):")
        print(format_cost_table(cost["rows"], _COST_COLUMNS))
        for note in cost["notes"]:
            print(f"note: {note}")
        print(f"choice: {cost['reason']}")
        print("profile sources: " + "; ".join(f"{s['url']}: {s['says']}" for s in hw["sources"]))
    acc = summary.get("predictor_accuracy")
    if acc:
        print("predictor accuracy per layer (held out): " + " ".join(f"{a:.2f}" for a in acc["accuracy_L"]))
