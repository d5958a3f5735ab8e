"""build_runner: checkpoint + topology + strategy + placement --> this rank's Runner.

    config.json --> placement (given, or contiguous) checked against the model and the world size
        --> load_model(experts = this rank's experts only) --> [--attention tp: keep this rank's heads only]
        --> dispatcher (factory, by Strategy x Transport)
        --> KV store (every sequence on every rank under coherent strategies and TP attention; TP: its heads)
        --> Runner (TPRunner under TP attention)
"""

from __future__ import annotations

from pathlib import Path

import torch

from comm.counters import CommCounters
from comm.dispatchers import make_dispatcher
from comm.primitives import Collectives
from comm.strategy import AttentionLayout, Strategy
from comm.topology import EPTopology
from epserve.engine.forced_routing import ForcedRouting
from epserve.engine.kv_cache import KVCacheConfig, KVStore
from epserve.engine.recorder import RoutingRecorder
from epserve.engine.runner import Runner
from epserve.engine.runner_tp import TPRunner
from epserve.model.config import ModelConfig
from epserve.model.loader import checkpoint_dtype, load_model
from placement.errors import InputError, PlacementError
from placement.placement import Placement, contiguous_placement
from placement.transport import Transport


def check_placement(placement: Placement | None, config: ModelConfig, topology: EPTopology) -> Placement:
    """The placement to run (contiguous when None), refused by name if it does not fit."""
    if placement is None:
        return contiguous_placement(config.num_moe_layers, config.num_experts, topology.cluster())
    placement.check_fits(num_layers=config.num_moe_layers, num_experts=config.num_experts, what="the model")
    if placement.num_gpus != topology.world_size:
        raise PlacementError(f"placement is for {placement.num_gpus} GPUs, but the EP group has "
                             f"{topology.world_size} ranks")
    return placement


def load_predictor(path: str | Path | None, strategy: Strategy, placement: Placement):
    if not strategy.needs_predictor:
        return None
    if path is None:
        raise InputError(f"strategy {strategy.value} needs a predictor file (--predictor)")
    from placement.predictor import SpeculativePredictor
    predictor = SpeculativePredictor.load(path)
    predictor.check_placement(placement)
    return predictor


def build_runner(model_dir: str | Path, topology: EPTopology, *, strategy: Strategy,
                 placement: Placement | None = None, predictor_path: str | Path | None = None,
                 kv_cache_tokens: int = 8192, kv_block_size: int = 16, dtype: torch.dtype | None = None,
                 record_tokens: int = 0, window_tokens: int = 0, check_splits: bool = False,
                 forced_routing_trace=None,
                 transport: Transport = Transport.A2A, capacity: int | None = None,
                 attention: AttentionLayout = AttentionLayout.DP, tp_capacity_factor: float = 2.0) -> Runner:
    """This rank's Runner. Reads only this rank's experts; ``kv_cache_tokens`` is the KV capacity of each
    rank; ``record_tokens`` > 0 attaches a RoutingRecorder of that many tokens (the run's first: --record-trace);
    ``window_tokens`` > 0 a ring recorder of the latest that many (live re-placement); ``forced_routing_trace``
    (a RoutingTrace; benchmarks only) replaces the router's choices by the trace's. ``transport`` moves the
    rows (``capacity``: rows per peer of the fixed transport; default: sized from each step). ``dtype``: None
    serves in the checkpoint's dtype. ``attention``: DP (each token's attention on one rank) or TP (heads sharded
    over the group: strategy two_a2a only, served as tp_two_a2a)."""
    config = ModelConfig.from_dir(model_dir)
    tp = attention is AttentionLayout.TP
    if tp:
        from epserve.model.tp import check_tp
        check_tp(config, topology.world_size)
        if strategy not in (Strategy.TWO_A2A, Strategy.SPECULATIVE):
            raise InputError(f"--attention tp serves strategies two_a2a (tp_two_a2a) and speculative "
                             f"(tp_speculative); {strategy.value} needs --attention dp")
    dtype = checkpoint_dtype(model_dir) if dtype is None else dtype
    placement = check_placement(placement, config, topology)
    mine_LX = placement.experts_on(topology.rank)
    model, report = load_model(model_dir, experts={m: mine_LX[m].tolist() for m in range(config.num_moe_layers)},
                               dtype=dtype, device=topology.device)
    if tp:
        from epserve.model.tp import local_kv_heads, shard_attention
        for layer in model.layers:
            shard_attention(layer.attn, config, topology.rank, topology.world_size)
    coll = Collectives(topology, CommCounters())
    # this rank's column of the replica rule (placement/replicas.py): where its tokens go for each expert
    choice_LE = torch.as_tensor(placement.copy_choice_LEG[:, :, topology.rank])
    predictor = load_predictor(predictor_path, strategy, placement)
    shuffle_predictor = None
    if tp:   # the MoE layers run the two_a2a way on each chunk; s-TS only chooses the chunks (runner_tp.py)
        strategy, shuffle_predictor, predictor = Strategy.TWO_A2A, predictor, None
    dispatcher = make_dispatcher(strategy, coll, choice_LE, top_k=config.top_k, hidden_size=config.hidden_size,
                                 dtype=dtype,
                                 predictor=predictor,
                                 anchors=placement.anchors, check_splits=check_splits, transport=transport,
                                 capacity=capacity)
    kv_heads, k_dim, v_dim = config.kv_row   # MLA: one latent row per token, no V tensor (v_dim 0)
    if tp:
        kv_heads = local_kv_heads(config, topology.world_size)
    kv = KVStore(KVCacheConfig(num_layers=config.num_layers, num_kv_heads=kv_heads, k_dim=k_dim, v_dim=v_dim,
                               capacity_tokens=kv_cache_tokens, block_size=kv_block_size, dtype=dtype),
                 rank=topology.rank, world_size=topology.world_size, replicated=dispatcher.replicated_kv or tp,
                 device=topology.device)
    meta = {"model": str(model_dir), "moe_layers": list(config.moe_layer_ids), "strategy": strategy.value}
    recorder, window = (None if n <= 0 else RoutingRecorder(
        max_tokens=n, num_moe_layers=config.num_moe_layers, top_k=config.top_k, num_experts=config.num_experts,
        meta=meta, ring=ring, device=topology.device) for n, ring in ((record_tokens, False), (window_tokens, True)))
    forced = None if forced_routing_trace is None else ForcedRouting(
        forced_routing_trace, num_experts=config.num_experts, top_k=config.top_k,
        num_moe_layers=config.num_moe_layers)
    common = dict(model=model, coll=coll, dispatcher=dispatcher, kv=kv, recorder=recorder, window=window,
                  load_report=report, placement=placement, forced_routing=forced)
    if tp:
        return TPRunner(shuffle_predictor=shuffle_predictor, capacity_factor=tp_capacity_factor, **common)
    return Runner(**common)
