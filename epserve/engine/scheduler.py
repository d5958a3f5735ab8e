"""Scheduler: continuous batching on rank 0. Pure and deterministic: requests in, StepPlans and Deltas out.

    add(request) --refused now if it can never run (ValueError naming the field) or the queue is full
        --> waiting (FIFO) --admit (head first; stops at the first that does not fit)--> running
    schedule(step) --> StepPlan:
        release: sequences that finished or were cancelled since the last plan (their KV is freed first)
        work:    1. one decode token for every running sequence past its prompt
                 2. prefill chunks of running sequences still in their prompt (admission order)
                 3. new admissions from the waiting queue, while seats (max_running_seqs), tokens
                    (max_batched_tokens) and KV blocks last; each gets a prompt chunk that fits the budget
    on_result(plan, result) --> (request_id, Delta) events: new token, and STOP / LENGTH when it ends

KV admission is exact and never needs preemption: a request reserves, when admitted, the blocks of its whole
life (prompt + max_tokens - 1 positions: the last sampled token is never fed), on its home rank (two_a2a) or
on every rank (replicated KV under coherent EP). The runner's ledgers grow lazily inside that reservation.
Home rank: ``preferred_home(prompt)`` when it names one with room (speculative_two_a2a), else the rank with
the fewest reserved blocks (lowest rank on ties).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from epserve.engine.api import Delta, FinishReason, GenerationRequest, QueueFullError
from epserve.engine.plan import SeqWork, StepPlan, StepResult
from epserve.engine.request import Phase, RequestState

Event = tuple[str, Delta]   # (request_id, delta)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    world_size: int
    vocab_size: int
    max_model_len: int                  # prompt + generated tokens of one sequence
    eos_token_ids: tuple[int, ...]
    kv_block_size: int
    kv_blocks_per_rank: int
    replicated_kv: bool                 # coherent EP: every rank holds the KV of every sequence
    max_running_seqs: int = 32
    max_batched_tokens: int = 512
    max_waiting: int = 256
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "vocab_size", "max_model_len", "kv_block_size", "kv_blocks_per_rank",
                     "max_running_seqs", "max_batched_tokens", "max_waiting", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scheduler {name} must be a positive integer, got {value!r}")
        if self.max_running_seqs > self.max_batched_tokens:
            raise ValueError(f"max_running_seqs ({self.max_running_seqs}) must be <= max_batched_tokens "
                             f"({self.max_batched_tokens}): every running sequence decodes every step")

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.kv_block_size)


class Scheduler:
    """Not thread-safe: the engine calls it under one lock."""

    def __init__(self, config: SchedulerConfig,
                 preferred_home: Callable[[tuple[int, ...]], int | None] | None = None) -> None:
        self.config = config
        self._preferred_home = preferred_home
        self._waiting: deque[RequestState] = deque()
        self._running: list[RequestState] = []          # admission order
        self._live: dict[str, RequestState] = {}         # request_id -> waiting or running state
        self._by_seq: dict[int, RequestState] = {}       # seq_id -> running state
        self._pending_release: list[int] = []
        self._homed_blocks = [0] * config.world_size     # blocks reserved by the sequences homed on each rank
        self._next_seq_id = 0
        self.prompt_tokens = 0        # prompt tokens fed so far
        self.generation_tokens = 0    # tokens sampled and handed out

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._pending_release)

    def reserved_blocks(self) -> list[int]:
        """Blocks reserved on each rank (what the runner's ledgers may grow to)."""
        if self.config.replicated_kv:
            return [sum(self._homed_blocks)] * self.config.world_size
        return list(self._homed_blocks)

    # ---- requests in ---------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """ValueError naming the field when the request can never run on this engine."""
        c, P = self.config, len(request.prompt_ids)
        bad = [t for t in request.prompt_ids if not isinstance(t, int) or not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]!r} is not in [0, {c.vocab_size})")
        if P >= c.max_model_len:
            raise ValueError(f"prompt: {P} tokens leave no room to generate within max_model_len "
                             f"{c.max_model_len}")
        if P + request.max_tokens > c.max_model_len:
            raise ValueError(f"max_tokens: {request.max_tokens} + {P} prompt tokens exceeds max_model_len "
                             f"{c.max_model_len} (at most {c.max_model_len - P})")
        capacity = c.kv_blocks_per_rank * c.kv_block_size
        if c.blocks_for(P) > c.kv_blocks_per_rank:
            raise ValueError(f"prompt: {P} tokens exceed the KV cache of a rank ({capacity} tokens)")
        if c.blocks_for(P + request.max_tokens - 1) > c.kv_blocks_per_rank:
            raise ValueError(f"max_tokens: {request.max_tokens} + {P} prompt tokens exceed the KV cache of a "
                             f"rank ({capacity} tokens; at most {capacity - P + 1} new tokens)")

    def add(self, request: GenerationRequest) -> RequestState:
        self.check(request)
        if request.request_id in self._live:
            raise ValueError(f"request_id: {request.request_id!r} is already queued or running")
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)",
                                 retry_after_s=self.config.retry_after_s)
        state = RequestState(request, self._next_seq_id)
        self._next_seq_id += 1
        self._waiting.append(state)
        self._live[request.request_id] = state
        return state

    def cancel(self, request_id: str) -> list[Event]:
        """End a waiting or running request with CANCELLED (its KV is released by the next plan)."""
        state = self._live.get(request_id)
        if state is None:
            return []
        self._finish(state, FinishReason.CANCELLED)
        return [(request_id, Delta(finish_reason=FinishReason.CANCELLED))]

    def abort_all(self, error: str) -> list[Event]:
        """End every waiting and running request with ERROR (shutdown); their KV goes in the next release."""
        states = list(self._live.values())
        for state in states:
            self._finish(state, FinishReason.ERROR)
        return [(s.request_id, Delta(finish_reason=FinishReason.ERROR, error=error)) for s in states]

    # ---- the step ------------------------------------------------------------------------------------------
    def schedule(self, step: int, **flags) -> StepPlan:
        """The next plan (``flags``: StepPlan's extra fields, e.g. stats=True). Commits its prompt chunks."""
        release, self._pending_release = tuple(self._pending_release), []
        budget = self.config.max_batched_tokens
        works = [self._decode(s) for s in self._running if not s.in_prefill and s.out]
        budget -= len(works)
        for state in [s for s in self._running if s.in_prefill]:
            if budget <= 0:
                break
            works.append(self._prefill_chunk(state, budget))
            budget -= len(works[-1].token_ids)
        while budget > 0 and self._waiting and len(self._running) < self.config.max_running_seqs:
            if not self._admit(self._waiting[0]):
                break
            works.append(self._prefill_chunk(self._running[-1], budget))
            budget -= len(works[-1].token_ids)
        return StepPlan(step=step, work=tuple(works), release=release, **flags)

    def on_result(self, plan: StepPlan, result: StepResult) -> list[Event]:
        """New tokens of the sequences this plan sampled (a sequence cancelled meanwhile gets nothing)."""
        events = []
        for work in plan.work:
            state = self._by_seq.get(work.seq_id)
            if not work.sample or state is None:
                continue
            token = result.next_token_ids[work.seq_id]
            state.out.append(token)
            self.generation_tokens += 1
            reason = self._finish_reason(state, token)
            if reason is not None:
                self._finish(state, reason)
            events.append((state.request_id, Delta((token,), reason)))
        return events

    # ---- internals -----------------------------------------------------------------------------------------
    def _decode(self, state: RequestState) -> SeqWork:
        pos = state.prompt_len + len(state.out) - 1
        return SeqWork(state.seq_id, (state.out[-1],), pos, state.home_rank, state.request.sampling)

    def _prefill_chunk(self, state: RequestState, budget: int) -> SeqWork:
        start, end = state.fed, min(state.prompt_len, state.fed + budget)
        state.fed = end
        self.prompt_tokens += end - start
        return SeqWork(state.seq_id, tuple(state.request.prompt_ids[start:end]), start, state.home_rank,
                       state.request.sampling, sample=end == state.prompt_len)

    def _admit(self, state: RequestState) -> bool:
        need = self.config.blocks_for(state.prompt_len + state.request.max_tokens - 1)
        home = self._home_rank(state.request.prompt_ids, need)
        if home is None:
            return False
        self._waiting.popleft()
        state.phase, state.home_rank, state.kv_blocks = Phase.RUNNING, home, need
        self._homed_blocks[home] += need
        self._running.append(state)
        self._by_seq[state.seq_id] = state
        return True

    def _fits(self, rank: int, need: int) -> bool:
        used = sum(self._homed_blocks) if self.config.replicated_kv else self._homed_blocks[rank]
        return used + need <= self.config.kv_blocks_per_rank

    def _home_rank(self, prompt_ids: tuple[int, ...], need: int) -> int | None:
        preferred = None if self._preferred_home is None else self._preferred_home(prompt_ids)
        if preferred is not None and self._fits(preferred, need):
            return preferred
        least = min(range(self.config.world_size), key=lambda g: (self._homed_blocks[g], g))
        return least if self._fits(least, need) else None

    def _finish_reason(self, state: RequestState, token: int) -> FinishReason | None:
        request = state.request
        if (not request.ignore_eos and token in self.config.eos_token_ids) or token in state.stop_ids:
            return FinishReason.STOP
        if len(state.out) >= request.max_tokens or state.prompt_len + len(state.out) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        if state.phase is Phase.WAITING:
            self._waiting.remove(state)
        elif state.phase is Phase.RUNNING:
            self._running.remove(state)
            del self._by_seq[state.seq_id]
            self._homed_blocks[state.home_rank] -= state.kv_blocks
            self._pending_release.append(state.seq_id)
        state.phase, state.finish_reason = Phase.FINISHED, reason
        self._live.pop(state.request_id, None)
