"""Rank-side code of the lossless grid (tests/dist/test_runner_lossless.py) and its one-process reference.

Each rank builds its Runner for every case (reading only its experts), runs ``generate`` and returns tokens,
logits, counters and what it loaded; rank 0 also returns the recorded routing trace when asked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
import tempfile
from pathlib import Path

import numpy as np
import torch

from comm.strategy import Strategy
from epserve.engine.builder import build_runner
from epserve.engine.generate import generate
from epserve.engine.recorder import load_is_prefill
from epserve.model.config import ModelConfig
from epserve.model.loader import load_model
from placement.cluster import ClusterShape
from placement.placement import Placement
from placement.trace import RoutingTrace
from placement.transport import Transport


@dataclass(frozen=True)
class RunCase:
    name: str
    ckpt: Path
    strategy: Strategy
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    placement: Placement | None = None       # None: contiguous
    prefill_chunk: int | None = None
    stagger: int = 0
    record: bool = False
    predictor_path: Path | None = None
    transport: Transport = Transport.A2A
    capacity: int | None = None              # fixed transport: rows per peer (None: sized from each step)
    count_syncs: bool = False                # count the host syncs of every dispatch + combine (no debug checks)
    dtype: str = "float32"                   # served (and reference) dtype
    extra: dict = field(default_factory=dict)


def run_runner_cases(topology, cases: list[RunCase]) -> list[dict]:
    out = []
    for case in cases:
        runner = build_runner(case.ckpt, topology, strategy=case.strategy, placement=case.placement,
                              predictor_path=case.predictor_path, kv_cache_tokens=512, kv_block_size=4,
                              record_tokens=4096 if case.record else 0, check_splits=not case.count_syncs,
                              transport=case.transport, capacity=case.capacity, dtype=DTYPES[case.dtype])
        syncs = _count_syncs(runner) if case.count_syncs else None
        gen = generate(runner, [list(p) for p in case.prompts], case.max_new_tokens, return_logits=True,
                       prefill_chunk=case.prefill_chunk, stagger=case.stagger)
        res = {"tokens": gen.tokens, "steps": gen.steps, "counters": runner.counters.to_rows(),
               "loaded": {m: list(ids) for m, ids in runner.model.loaded_experts.items()},
               "expert_bytes": runner.load_report.expert_bytes, "kv": runner.kv_stats(),
               "coherence_in_flight": 0 if runner.coherence is None else runner.coherence.in_flight,
               "retried_steps": runner.retried_steps, "syncs": syncs}
        if topology.rank == 0:
            res["logits"] = [[t.float().numpy() for t in seq] for seq in gen.logits]
        if case.record:   # collective: every rank calls it; rank 0 writes the file
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "routing.npz"
                runner.recorder.save(runner.coll, path)
                if topology.rank == 0:
                    res["trace"], res["is_prefill"] = RoutingTrace.load(path), load_is_prefill(path)
        out.append(res)
    return out


def _count_syncs(runner) -> list:
    """Wrap the runner so each decoder layer (attention, router, dispatch, experts, combine, shared expert)
    records [step has prefill, syncs, ops]: the model side's syncs count against the dispatcher's budget."""
    from tests.sync_counter import SyncCounter, mark_host
    out, layer_step = [], runner._layer

    def counted_layer(layer, batch, held, *args, **kwargs):
        mark_host(held.token_N)   # host metadata by construction (from the plan, or the transport's token_A)
        with SyncCounter() as s:
            result = layer_step(layer, batch, held, *args, **kwargs)
        out.append([batch.has_prefill, s.count, s.ops])
        return result

    runner._layer = counted_layer
    return out


def reference(ckpt: Path, prompts, max_new_tokens: int, dtype: str = "float32"):
    """(tokens, logits) of the one-process model: greedy_reference's tokens, and for each new token the
    logits that produced it (one causal forward over prompt + new tokens)."""
    model, _ = load_model(ckpt, dtype=DTYPES[dtype])
    tokens = model.greedy_reference([list(p) for p in prompts], max_new_tokens)
    logits = []
    for p, new in zip(prompts, tokens):
        full = list(p) + new[:-1]
        logits_SV = model.forward_full(torch.tensor([full]))[0]
        logits.append([logits_SV[len(p) - 1 + i].float().numpy() for i in range(len(new))])
    return tokens, logits


@functools.lru_cache(maxsize=None)
def reference_tokens(ckpt: Path, prompts: tuple, max_new_tokens: int, dtype: str = "float32") -> list[list[int]]:
    """The one-process greedy tokens (``reference``'s), computed once per argument set in a session."""
    return reference(ckpt, prompts, max_new_tokens, dtype)[0]


def reference_routing(ckpt: Path, seqs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ids, weights): [L] arrays [T, K] of the one-process model's routing of every token of ``seqs`` (whole
    sequences, flattened in order)."""
    model, _ = load_model(ckpt)
    ids = torch.tensor([t for p in seqs for t in p])
    seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(p) for p in seqs]))
    pos = torch.cat([torch.arange(len(p)) for p in seqs])
    routing = []
    model.forward_flat(ids, pos, seq, routing)
    return [r[0].numpy() for r in routing], [r[1].numpy() for r in routing]


PROMPTS = ((5, 6, 7, 8, 9, 10, 11), (12, 13), (3,), (40, 41, 42, 43, 44))
NEW = 5
STRATEGIES = (Strategy.TWO_A2A, Strategy.COHERENT)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WIDE_MODELS = ("qwen3_top8", "deepseek_v3")   # top-k >= 3 and MLA: every strategy, fp32 and bf16
REPLICA_ONLY = ("mixtral_2experts",)            # fewer experts than ranks: replica_cases only


def random_placement(L: int, E: int, G: int, seed: int) -> Placement:
    g = np.random.default_rng(seed)
    rows = [g.permutation(np.arange(E) // (E // G)) for _ in range(L)]
    return Placement(np.stack(rows), ClusterShape(gpus_per_node=G), solver={"name": "random", "seed": seed})


def replicated_placement(L: int, E: int, G: int, gpus_per_node: int, seed: int) -> Placement:
    """One extra slot per GPU, each holding a random expert the GPU does not hold yet: every layer has G
    replicas on top of a random one-copy placement (schema version 2)."""
    g = np.random.default_rng(seed)
    copies = np.zeros((L, E, G), dtype=bool)
    for l in range(L):
        copies[l, np.arange(E), g.permutation(np.arange(E) // (E // G))] = True
        for gpu in range(G):
            copies[l, g.choice(np.flatnonzero(~copies[l, :, gpu])), gpu] = True
    return Placement.from_copies(copies, ClusterShape(nodes=G // gpus_per_node, gpus_per_node=gpus_per_node),
                                 solver={"name": "random+replicas", "seed": seed})


def solved_placement(ckpt: Path, G: int, gpus_per_node: int) -> Placement:
    """The local-search solver's placement, fitted on the one-process routing of the grid's prompts."""
    from placement.solvers import SolveOptions, SolverKind, solve
    from placement.stats import compute_stats
    ids_L, w_L = reference_routing(ckpt, PROMPTS)
    trace = RoutingTrace(np.stack(ids_L, axis=1), np.stack(w_L, axis=1), ModelConfig.from_dir(ckpt).num_experts)
    cluster = ClusterShape(nodes=G // gpus_per_node, gpus_per_node=gpus_per_node)
    return solve(compute_stats(trace), cluster, SolveOptions(solver=SolverKind.LOCAL, time_limit=2.0, restarts=1,
                                                             rounds=3))


def hot_rank_placement(routing_L, E: int, G: int) -> Placement:
    """The E/G most used experts of each layer (by the prompts' routing) all on rank 0: uneven loads."""
    rows = []
    for ids_TK in routing_L:
        order = np.argsort(-np.bincount(ids_TK.ravel(), minlength=E), kind="stable")
        row = np.empty(E, dtype=np.int64)
        row[order] = np.arange(E) // (E // G)
        rows.append(row)
    return Placement(np.stack(rows), ClusterShape(gpus_per_node=G), solver={"name": "hot_rank_0"})


def build_predictor(ckpt: Path, placement: Placement, path: Path) -> Path:
    """A predictor from the one-process routing of the grid's whole sequences (with their vocabulary ids),
    confident about every id it has seen, so speculative starts and homes really move tokens."""
    from placement.predictor import PredictorOptions, SpeculativePredictor
    tokens, _ = reference(ckpt, PROMPTS, NEW)
    fed = [list(p) + new[:-1] for p, new in zip(PROMPTS, tokens)]
    ids_L, w_L = reference_routing(ckpt, fed)
    trace = RoutingTrace(np.stack(ids_L, axis=1), np.stack(w_L, axis=1), ModelConfig.from_dir(ckpt).num_experts,
                         token_ids_T=np.array([t for seq in fed for t in seq]))
    SpeculativePredictor.build(trace, placement, PredictorOptions(min_confidence=0.0, min_support=1)).save(path)
    return path


def with_anchor_table(ckpt: Path, placement: Placement, *, seed: int | None = None) -> Placement:
    """The placement with an anchor table fitted on the one-process routing of the grid's whole sequences
    (seed None; the last layer's row learns from consecutive positions), or with random integer scores (a
    seed: the rule then departs from the top-1 rank for many tokens)."""
    from placement.anchor import AnchorTable, expert_table_digest, fit_anchor_table
    G, (L, E) = placement.num_gpus, placement.expert_to_gpu_LE.shape
    if seed is not None:
        score_LEG = np.random.default_rng(seed).integers(0, 1000, size=(L, E, G))
        return placement.with_anchors(AnchorTable(score_LEG, expert_table_digest(placement.expert_to_gpu_LE)))
    tokens, _ = reference(ckpt, PROMPTS, NEW)
    fed = [list(p) + new[:-1] for p, new in zip(PROMPTS, tokens)]
    ids_L, w_L = reference_routing(ckpt, fed)
    trace = RoutingTrace(np.stack(ids_L, axis=1), np.stack(w_L, axis=1), E,
                         seq_ids_T=np.concatenate([np.full(len(f), s, dtype=np.int32) for s, f in enumerate(fed)]),
                         positions_T=np.concatenate([np.arange(len(f), dtype=np.int32) for f in fed]))
    return placement.with_anchors(fit_anchor_table(trace, placement.expert_to_gpu_LE, G))


def runner_cases(models: dict, G: int, gpus_per_node: int, work_dir: Path) -> list[RunCase]:
    """The lossless grid for G ranks (``models``: name -> checkpoint dir, see tests/dist/conftest.py)."""
    cases = []
    for name, ckpt in models.items():
        if name == "qwen3_top2" and G != 2 or name in WIDE_MODELS or name in REPLICA_ONLY:
            continue
        cfg = ModelConfig.from_dir(ckpt)
        L, E = cfg.num_moe_layers, cfg.num_experts
        placements = {"contiguous": None, "random": random_placement(L, E, G, seed=G)}
        if G > 1 and name in ("mixtral_top2", "mixtral_top1"):
            placements["solved"] = solved_placement(ckpt, G, gpus_per_node)
        if G > 1 and name == "mixtral_top2":
            placements["hot_rank_0"] = hot_rank_placement(reference_routing(ckpt, PROMPTS)[0], E, G)
        for strategy in STRATEGIES:
            for pname, placement in placements.items():
                cases.append(RunCase(f"{name}/{strategy.value}/{pname}", ckpt, strategy, PROMPTS, NEW, placement,
                                     record=True))
        if "solved" in placements:
            predictor = build_predictor(ckpt, placements["solved"], work_dir / f"{name}-G{G}.predictor.npz")
            for strategy in (Strategy.SPECULATIVE, Strategy.SPECULATIVE_TWO_A2A):
                cases.append(RunCase(f"{name}/{strategy.value}/solved", ckpt, strategy, PROMPTS, NEW,
                                     placements["solved"], record=True, predictor_path=predictor))
    top2, top1 = models["mixtral_top2"], models["mixtral_top1"]
    if G > 1:   # anchor tables (coherent strategies): fitted on the solved placement, random on a random one
        cfg = ModelConfig.from_dir(top2)
        fitted = with_anchor_table(top2, solved_placement(top2, G, gpus_per_node))
        random = with_anchor_table(top2, random_placement(cfg.num_moe_layers, cfg.num_experts, G, seed=G), seed=G)
        cases.append(RunCase("mixtral_top2/coherent/solved+anchors", top2, Strategy.COHERENT, PROMPTS, NEW, fitted,
                             record=True))
        cases.append(RunCase("mixtral_top2/coherent/random+random_anchors", top2, Strategy.COHERENT, PROMPTS, NEW,
                             random, record=True))
        cases.append(RunCase("mixtral_top2/coherent/chunked+staggered+random_anchors", top2, Strategy.COHERENT,
                             PROMPTS, NEW, random, prefill_chunk=3, stagger=2))
    for strategy in STRATEGIES:
        # mixed steps: chunked prefill of later requests beside decode of earlier ones
        cases.append(RunCase(f"mixtral_top2/{strategy.value}/chunked+staggered", top2, strategy, PROMPTS, NEW,
                             prefill_chunk=3, stagger=2, record=True))
        cases.append(RunCase(f"qwen2/{strategy.value}/chunked+staggered", models["qwen2_dense_shared"], strategy,
                             PROMPTS, NEW, prefill_chunk=2, stagger=1))
        # one sequence, top-1: every decode step leaves at least G - 2 ranks with no token at all
        cases.append(RunCase(f"mixtral_top1/{strategy.value}/single", top1, strategy, PROMPTS[:1], NEW, record=True))
    cases += wide_model_cases(models, G, gpus_per_node, work_dir)
    if G > 1:
        cases += transport_cases(models, G, gpus_per_node, work_dir)
        cases += replica_cases(models, G, gpus_per_node, work_dir)
    return cases


def replica_cases(models: dict, G: int, gpus_per_node: int, work_dir: Path) -> list[RunCase]:
    """Replicated experts (one extra copy per GPU) under both base strategies and every transport: the copy a
    token uses depends on where it is (placement/replicas.py), and the counters must equal the simulator. Top-2
    also under the speculative strategies, with a predictor built for the replicated placement (predicted start
    ranks and homes hold a copy of the predicted experts)."""
    cases = []
    transports = [Transport.A2A, Transport.FIXED] + ([Transport.NODE_AWARE] if G // gpus_per_node > 1 else [])
    for name in ("mixtral_top2", "mixtral_top1"):
        ckpt = models[name]
        cfg = ModelConfig.from_dir(ckpt)
        placement = replicated_placement(cfg.num_moe_layers, cfg.num_experts, G, gpus_per_node, seed=G + 7)
        for t in transports:
            for strategy in STRATEGIES:
                cases.append(RunCase(f"{name}/{strategy.value}/replicated[{t.value}]", ckpt, strategy, PROMPTS, NEW,
                                     placement, record=True, transport=t))
        if cfg.top_k > 1:   # an anchor table over the chosen copies (random scores: far from the top-1 copy)
            from placement.anchor import AnchorTable, expert_table_digest
            score_LEG = np.random.default_rng(G + 11).integers(0, 1000, size=placement.copies_LEG.shape)
            anchored = placement.with_anchors(AnchorTable(score_LEG, expert_table_digest(placement.copies_LEG)))
            cases.append(RunCase(f"{name}/coherent/replicated+random_anchors", ckpt, Strategy.COHERENT, PROMPTS,
                                 NEW, anchored, record=True))
            predictor = build_predictor(ckpt, placement, work_dir / f"{name}-G{G}.replicated.predictor.npz")
            # speculative_two_a2a only from 4 ranks: on 2 every prompt is predicted home 0, and from GPU 0 the
            # chosen copy is always the primary (the lowest GPU holding it), so no replica would be used
            for strategy in (Strategy.SPECULATIVE,) + ((Strategy.SPECULATIVE_TWO_A2A,) if G > 2 else ()):
                cases.append(RunCase(f"{name}/{strategy.value}/replicated", ckpt, strategy, PROMPTS, NEW, placement,
                                     record=True, predictor_path=predictor))
    if G == 4:   # 2 experts on 4 ranks: expert e on GPUs e and e + 2 (one per node), one slot per GPU
        ckpt = models["mixtral_2experts"]
        L = ModelConfig.from_dir(ckpt).num_moe_layers
        copies = np.zeros((L, 2, G), dtype=bool)
        copies[:, 0, [0, 2]] = copies[:, 1, [1, 3]] = True
        placement = Placement.from_copies(copies, ClusterShape(nodes=2, gpus_per_node=2), solver={"name": "hand"})
        for strategy in STRATEGIES:
            for t in transports:
                cases.append(RunCase(f"mixtral_2experts/{strategy.value}/replicated[{t.value}]", ckpt, strategy,
                                     PROMPTS, NEW, placement, record=True, transport=t))
    return cases


def wide_model_cases(models: dict, G: int, gpus_per_node: int, work_dir: Path) -> list[RunCase]:
    """Top-8 Qwen3-MoE and DeepSeek-V3 (MLA, top-4): every strategy on a random placement in float32, the two
    base strategies in bfloat16, and the transports with partial sums from several ranks per token."""
    cases = []
    for name in WIDE_MODELS:
        ckpt = models[name]
        cfg = ModelConfig.from_dir(ckpt)
        placement = random_placement(cfg.num_moe_layers, cfg.num_experts, G, seed=G + 1)
        predictor = build_predictor(ckpt, placement, work_dir / f"{name}-G{G}.predictor.npz")
        for strategy in Strategy:
            cases.append(RunCase(f"{name}/{strategy.value}/random", ckpt, strategy, PROMPTS, NEW, placement,
                                 predictor_path=predictor if strategy.needs_predictor else None))
        for strategy in STRATEGIES:
            cases.append(RunCase(f"{name}/{strategy.value}/random[bf16]", ckpt, strategy, PROMPTS, NEW, placement,
                                 dtype="bfloat16"))
            if G > 1:
                transport = Transport.NODE_AWARE if G // gpus_per_node > 1 else Transport.FIXED
                cases.append(RunCase(f"{name}/{strategy.value}/chunked+staggered[{transport.value}]", ckpt, strategy,
                                     PROMPTS, NEW, placement, prefill_chunk=3, stagger=2, transport=transport))
    return cases


def transport_cases(models: dict, G: int, gpus_per_node: int, work_dir: Path) -> list[RunCase]:
    """The transports (fixed everywhere; node_aware where there are 2 nodes) under every policy, with solved
    placements, mixed prefill/decode steps, a trailing K/V group, and fixed buffers so small that steps overflow
    and run again."""
    top2, top1 = models["mixtral_top2"], models["mixtral_top1"]
    solved = solved_placement(top2, G, gpus_per_node)
    transports = [Transport.FIXED] + ([Transport.NODE_AWARE] if G // gpus_per_node > 1 else [])
    predictor = build_predictor(top2, solved, work_dir / f"transport-G{G}.predictor.npz")
    cases = []
    for t in transports:
        tag = f"[{t.value}]"
        for strategy in (*STRATEGIES, Strategy.SPECULATIVE):
            cases.append(RunCase(f"mixtral_top2/{strategy.value}/solved{tag}", top2, strategy, PROMPTS, NEW, solved,
                                 record=True, transport=t,
                                 predictor_path=predictor if strategy.needs_predictor else None))
        cases.append(RunCase(f"mixtral_top2/coherent/chunked+staggered{tag}", top2, Strategy.COHERENT, PROMPTS, NEW,
                             prefill_chunk=3, stagger=2, transport=t))
        cases.append(RunCase(f"mixtral_top1/coherent/solved{tag}", top1, Strategy.COHERENT, PROMPTS, NEW,
                             record=True, transport=t))
        cases.append(RunCase(f"qwen2/coherent/chunked+staggered{tag}", models["qwen2_dense_shared"],
                             Strategy.COHERENT, PROMPTS, NEW, prefill_chunk=2, stagger=1, transport=t))
    for t in (Transport.A2A, *transports):   # host syncs per MoE layer (tests/dist/test_host_syncs.py)
        for strategy in (*STRATEGIES, Strategy.SPECULATIVE):
            cases.append(RunCase(f"mixtral_top2/{strategy.value}/solved[{t.value}, syncs]", top2, strategy, PROMPTS,
                                 NEW, solved, transport=t, count_syncs=True,
                                 predictor_path=predictor if strategy.needs_predictor else None))
    cases.append(RunCase("mixtral_top2/coherent/solved[fixed, capacity 16]", top2, Strategy.COHERENT, PROMPTS, NEW,
                         solved, record=True, transport=Transport.FIXED, capacity=16))   # room for every row
    for strategy in STRATEGIES:   # one row per peer: most steps overflow on some rank and run again
        cases.append(RunCase(f"mixtral_top2/{strategy.value}/solved[fixed, capacity 1]", top2, strategy, PROMPTS,
                             NEW, solved, transport=Transport.FIXED, capacity=1))
    return cases
