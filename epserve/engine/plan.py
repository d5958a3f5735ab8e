"""The contract between the scheduler (rank 0) and the step executor that every rank runs in lockstep.

    rank 0: scheduler --StepPlan--> broadcast (CPU control group) --> every rank: Runner.execute(plan)
                                                                            |
    rank 0: scheduler <----------- StepResult (identical on every rank) <---+

A plan names, for each sequence that takes part in the step, the tokens it feeds this step (a prompt chunk
for prefill, one token for decode), where they start, its home rank and how to sample its next token.
Plans are small, picklable and hold no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (``top_p``/``top_k`` then unused).

    ``seed`` is always set by the time a plan is built (rank 0 draws one for requests that gave none), so the
    same token comes out whichever rank samples it: the generator for position p is seeded from (seed, p).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()

# StepPlan.replace: live re-placement (epserve/engine/replace.py), acted on by every rank at the step boundary,
# before the step's tokens run. A value >= 0 swaps that MoE layer into the placement being swapped in.
REPLACE_NONE = -1      # nothing
REPLACE_COLLECT = -2   # gather the live routing window (collective); rank 0 solves on it in the background
REPLACE_BEGIN = -3     # rank 0 broadcasts the new placement (+ predictor); every rank plans the expert moves
REPLACE_COMMIT = -4    # the last layer is in: every table, the predictor and the version switch


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step."""

    seq_id: int                    # engine-wide id; the KV cache is keyed by it
    token_ids: tuple[int, ...]     # tokens fed this step (>= 1)
    start_pos: int                 # position of token_ids[0]; the KV cache already holds positions < start_pos
    home_rank: int                 # rank that owns the sequence (two_a2a attention, coherent prefill)
    sampling: SamplingParams = GREEDY
    sample: bool = True            # False for a prefill chunk that is not the prompt's last

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"seq {self.seq_id}: a step must feed at least one token")
        if self.start_pos < 0:
            raise ValueError(f"seq {self.seq_id}: start_pos must be >= 0")

    @property
    def is_prefill(self) -> bool:
        return self.start_pos == 0 or len(self.token_ids) > 1


@dataclass(frozen=True)
class StepPlan:
    step: int
    work: tuple[SeqWork, ...] = ()
    release: tuple[int, ...] = ()  # seq_ids whose KV cache is freed before this step runs
    shutdown: bool = False         # every rank leaves its loop after this plan
    # Engine flags, acted on by every rank after the step (collectives on the CPU group; see engine.py):
    stats: bool = False            # all-gather the live traffic counters (live_stats.py)
    save_trace_to: str | None = None   # every rank calls recorder.save(coll, path); rank 0 writes the file
    replace: int = REPLACE_NONE        # at the step boundary, before the step (the REPLACE_* values above)

    def __post_init__(self) -> None:
        ids = [w.seq_id for w in self.work]
        if len(set(ids)) != len(ids):
            raise ValueError(f"step {self.step}: a sequence appears twice in one plan")


@dataclass(frozen=True)
class StepResult:
    step: int
    next_token_ids: dict[int, int] = field(default_factory=dict)  # seq_id -> sampled id (sample=True only)
    # Tests only (Runner.execute(return_logits=True)): seq_id -> logits of the step's last token, [V] tensor.
    last_logits: dict | None = None
