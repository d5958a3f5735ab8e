"""Rank-side code of the lossless grid (tests/dist/test_runner_lossless.py) and its one-process reference.

Each rank builds its Runner for every case (reading only its experts), runs ``generate`` and returns tokens,
logits, counters and what it loaded; rank 0 also returns the recorded routing trace when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from comm.strategy import Strategy
from epserve.engine.builder import build_runner
from epserve.engine.generate import generate
from epserve.model.loader import load_model
from placement.placement import Placement


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
    extra: dict = field(default_factory=dict)


def run_cases(topology, cases: list[RunCase]) -> list[dict]:
    out = []
    for case in cases:
        runner = build_runner(case.ckpt, topology, strategy=case.strategy, placement=case.placement,
                              predictor_path=case.predictor_path, kv_cache_tokens=512, kv_block_size=4,
                              record_tokens=4096 if case.record else 0, check_splits=True)
        gen = generate(runner, [list(p) for p in case.prompts], case.max_new_tokens, return_logits=True,
                       prefill_chunk=case.prefill_chunk, stagger=case.stagger)
        res = {"tokens": gen.tokens, "steps": gen.steps, "counters": runner.counters.to_rows(),
               "loaded": {m: list(ids) for m, ids in runner.model.loaded_experts.items()},
               "expert_bytes": runner.load_report.expert_bytes, "kv": runner.kv_stats(),
               "coherence_in_flight": 0 if runner.coherence is None else runner.coherence.in_flight}
        if topology.rank == 0:
            res["logits"] = [[t.numpy() for t in seq] for seq in gen.logits]
        if case.record:
            trace = runner.recorder.gather(runner.coll)
            res["trace"] = trace if topology.rank == 0 else None
        out.append(res)
    return out


def reference(ckpt: Path, prompts, max_new_tokens: int):
    """(tokens, logits) of the one-process model: greedy_reference's tokens, and for each new token the
    logits that produced it (one causal forward over prompt + new tokens)."""
    model, _ = load_model(ckpt)
    tokens = model.greedy_reference([list(p) for p in prompts], max_new_tokens)
    logits = []
    for p, new in zip(prompts, tokens):
        full = list(p) + new[:-1]
        logits_SV = model.forward_full(torch.tensor([full]))[0]
        logits.append([logits_SV[len(p) - 1 + i].numpy() for i in range(len(new))])
    return tokens, logits


def reference_routing(ckpt: Path, prompts) -> list[np.ndarray]:
    """[L] arrays of the top-k expert ids every prompt token picks (for building skewed placements)."""
    model, _ = load_model(ckpt)
    ids = torch.tensor([t for p in prompts for t in p])
    seq = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(p) for p in prompts]))
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    routing = []
    model.forward_flat(ids, pos, seq, routing)
    return [r[0].numpy() for r in routing]
