"""StepBatch: a StepPlan flattened to one row per token (metadata only; identical on every rank).

    StepPlan.work[w] = SeqWork(seq_id, token_ids, start_pos, home_rank, ...)
        --> token t: seq_T[t], pos_T[t], token_T[t], home_T[t], work_T[t], is_prefill_T[t]
        --> last_W[w]: the token whose logits give work w its next token

Legend: T tokens of the step, W work items (sequences) of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epserve.engine.plan import StepPlan


@dataclass(frozen=True, eq=False)
class StepBatch:
    plan: StepPlan
    seq_T: np.ndarray
    pos_T: np.ndarray
    token_T: np.ndarray
    home_T: np.ndarray
    work_T: np.ndarray
    is_prefill_T: np.ndarray
    last_W: np.ndarray

    @classmethod
    def from_plan(cls, plan: StepPlan, *, world_size: int, vocab_size: int) -> "StepBatch":
        for w in plan.work:
            if not 0 <= w.home_rank < world_size:
                raise ValueError(f"step {plan.step}, seq {w.seq_id}: home rank {w.home_rank} is not in "
                                 f"[0, {world_size})")
            bad = [t for t in w.token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"step {plan.step}, seq {w.seq_id}: token id {bad[0]} is not in [0, {vocab_size})")
        n_W = np.array([len(w.token_ids) for w in plan.work], dtype=np.int64)
        work_T = np.repeat(np.arange(len(plan.work)), n_W)
        offset_T = np.arange(int(n_W.sum())) - np.repeat(np.cumsum(n_W) - n_W, n_W)
        per_work = lambda f, dtype: np.array([f(w) for w in plan.work], dtype=dtype)[work_T]  # noqa: E731
        tokens = [t for w in plan.work for t in w.token_ids]
        return cls(plan=plan,
                   seq_T=per_work(lambda w: w.seq_id, np.int64),
                   pos_T=per_work(lambda w: w.start_pos, np.int64) + offset_T,
                   token_T=np.array(tokens, dtype=np.int64),
                   home_T=per_work(lambda w: w.home_rank, np.int64),
                   work_T=work_T,
                   is_prefill_T=per_work(lambda w: w.is_prefill, bool),
                   last_W=np.cumsum(n_W) - 1)

    @property
    def num_tokens(self) -> int:
        return len(self.token_T)

    @property
    def num_work(self) -> int:
        return len(self.plan.work)

    @property
    def has_prefill(self) -> bool:
        return bool(self.is_prefill_T.any())
