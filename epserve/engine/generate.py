"""generate(): batched generation across ranks, driving Runner.execute with StepPlans. Every rank calls it
with the same arguments and so builds the same plans (no scheduler, no broadcast needed).

    prompts --admit (all at step 0, or one every ``stagger`` steps)--> home rank = index % G (or predicted)
      --> each step: prefill chunk (``prefill_chunk`` tokens, or the whole prompt) or one decode token per
          live sequence --> Runner.execute --> append sampled ids --> release finished sequences

Used by the tests (lossless checks against ``MoEModel.greedy_reference``) and the comm benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from epserve.engine.plan import GREEDY, SamplingParams, SeqWork, StepPlan
from epserve.engine.runner import Runner


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    home: int
    fed: int = 0                                   # prompt tokens fed so far
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True)
class GenerateOutput:
    tokens: list[list[int]]                        # new tokens of each prompt
    logits: list[list[torch.Tensor]] | None        # logits that produced each new token (return_logits=True)
    steps: int


def generate(runner: Runner, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: SamplingParams = GREEDY, eos_token_ids=(), prefill_chunk: int | None = None,
             stagger: int = 0, return_logits: bool = False, seq_id_base: int = 0,
             before_step: Callable[[StepPlan], StepPlan] | None = None) -> GenerateOutput:
    """New tokens of every prompt (an EOS in ``eos_token_ids`` is kept and ends that prompt).
    ``before_step(plan)``: called at each step boundary on every rank; returns the plan to run (tests and
    benchmarks of live re-placement set its ``replace`` op and run the boundary there)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    G, eos = runner.topology.world_size, set(eos_token_ids)
    seqs = []
    for i, p in enumerate(prompts):
        preferred = runner.preferred_home_rank(p)
        seqs.append(_Seq(i, list(p), i % G if preferred is None else preferred))
    step, release = 0, []
    while not all(s.done for s in seqs):
        works = [_work(s, seq_id_base, sampling, prefill_chunk) for s in seqs
                 if not s.done and s.index * stagger <= step]
        plan = StepPlan(step=step, work=tuple(works), release=tuple(release))
        result = runner.execute(plan if before_step is None else before_step(plan), return_logits=return_logits)
        release = []
        for w in works:
            s = seqs[w.seq_id - seq_id_base]
            if s.fed < len(s.prompt):
                s.fed += len(w.token_ids)
            if not w.sample:
                continue
            s.out.append(result.next_token_ids[w.seq_id])
            if return_logits:
                s.logits.append(result.last_logits[w.seq_id])
            if len(s.out) >= max_new_tokens or s.out[-1] in eos:
                s.done = True
                release.append(w.seq_id)
        step += 1
    runner.execute(StepPlan(step=step, release=tuple(release)))
    return GenerateOutput([s.out for s in seqs], [s.logits for s in seqs] if return_logits else None, step)


def _work(s: _Seq, seq_id_base: int, sampling: SamplingParams, prefill_chunk: int | None) -> SeqWork:
    if s.fed < len(s.prompt):
        end = len(s.prompt) if prefill_chunk is None else min(len(s.prompt), s.fed + prefill_chunk)
        return SeqWork(seq_id_base + s.index, tuple(s.prompt[s.fed:end]), s.fed, s.home, sampling,
                       sample=end == len(s.prompt))
    return SeqWork(seq_id_base + s.index, (s.out[-1],), len(s.prompt) + len(s.out) - 1, s.home, sampling)
