"""Rank-side code of tests/dist/test_tp_attention.py: generation under --attention tp (tp_two_a2a)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comm.counters import CollKind
from comm.strategy import AttentionLayout, Strategy
from epserve.engine.builder import build_runner
from epserve.engine.generate import generate
from placement.placement import Placement
from placement.transport import Transport
from tests.dist._runner_cases import DTYPES

PROMPTS = ((5, 6, 7, 8, 9, 10, 11), (12, 13), (3,), (40, 41, 42, 43, 44))
NEW = 6


@dataclass(frozen=True)
class TPCase:
    name: str
    ckpt: Path
    dtype: str = "float32"
    transport: Transport = Transport.A2A
    strategy: Strategy = Strategy.TWO_A2A        # SPECULATIVE: tp_speculative (needs predictor_path)
    placement: Placement | None = None
    predictor_path: Path | None = None


def run_tp_cases(topology, cases: list[TPCase]) -> list[dict]:
    out = []
    for case in cases:
        runner = build_runner(case.ckpt, topology, strategy=case.strategy, attention=AttentionLayout.TP,
                              kv_cache_tokens=512, kv_block_size=4, check_splits=True, transport=case.transport,
                              dtype=DTYPES[case.dtype], placement=case.placement,
                              predictor_path=case.predictor_path, record_tokens=4096)
        step_tokens = []

        def count(plan):
            step_tokens.append(sum(len(w.token_ids) for w in plan.work))
            return plan

        gen = generate(runner, [list(p) for p in PROMPTS], NEW, before_step=count)
        trace = runner.recorder.gather(runner.coll)   # collective: the run's routing, in step order
        attn = runner.model.layers[0].attn
        rs = runner.counters.total(CollKind.REDUCE_SCATTER)
        out.append({"tokens": gen.tokens, "steps": gen.steps, "heads": (attn.num_heads, attn.num_kv_heads),
                    "q_rows": attn.q_proj.weight.shape[0], "o_cols": attn.o_proj.weight.shape[1],
                    "kv_heads_cached": runner.kv.config.num_kv_heads,
                    "rs_rows": rs.rows, "rs_calls": rs.calls,
                    "ag_rows": runner.counters.total(CollKind.ALL_GATHER, phase="tp_gather").rows,
                    "ag_calls": runner.counters.total(CollKind.ALL_GATHER, phase="tp_gather").calls,
                    "step_tokens": step_tokens, "label": runner.strategy_label,
                    "trace": trace if topology.rank == 0 else None,
                    "dispatch_rows": runner.counters.total(CollKind.ALL_TO_ALL).rows})
    return out
