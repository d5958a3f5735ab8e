"""Engine: the EngineClient on rank 0 (a daemon thread drives every rank in lockstep) and ``follow`` for the
other ranks.

    server loop: submit() / stream.cancel() --(lock + condition)--> scheduler (pure, scheduler.py)
    engine thread (rank 0), one iteration per plan:
        wait for work (at most heartbeat_s; idle: an empty heartbeat plan keeps followers inside the timeout)
        --> plan = scheduler.schedule(step, flags) --> ControlChannel.send(plan)
        --> runner.execute(plan) --> after_step: [stats all-gather] [recorder save] (collectives, every rank)
        --> scheduler.on_result --> Deltas --one call_soon_threadsafe per step--> each request's Stream
    ranks > 0: follow(runner, channel): recv(plan) --> replacement boundary --> runner.execute(plan) --> after_step;
        until a shutdown plan
    live re-placement (replace.py: every rank; replace_control.py: rank 0's requests, solve and swap order): a
        plan's ``replace`` op runs at its boundary, before the step, on every rank

Any exception in the engine thread (a rank died: gloo raises on a broken connection or at its timeout) makes
the engine dead: ``diagnose()`` (comm/liveness.py, given by the launcher) names the rank or node that was lost,
every open stream ends with an ERROR Delta naming the cause, health() says why, and ``on_fatal(reason)`` tells
the launcher to stop the server and exit non-zero.

Drain (SIGTERM): ``drain()`` refuses new requests (EngineUnavailableError; the server answers 503 with
Retry-After and /health 503) while the running and waiting ones finish; ``in_flight()`` says how many remain.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from epserve.engine.api import (Delta, EngineHealth, EngineSnapshot, EngineUnavailableError, FinishReason,
                                GenerationRequest)
from epserve.engine.control import ControlChannel
from epserve.engine.live_stats import GroupTraffic, LiveStats
from epserve.engine.plan import REPLACE_COMMIT, REPLACE_NONE, StepPlan, StepResult
from epserve.engine.replace import LiveReplacement, expert_bytes_of
from epserve.engine.replace_control import ReplaceConfig, ReplaceCoordinator
from epserve.engine.request import Stream
from epserve.engine.runner import Runner
from epserve.engine.scheduler import Event, Scheduler, SchedulerConfig


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model_name: str
    max_model_len: int                       # prompt + generated tokens of one sequence
    eos_token_ids: tuple[int, ...]
    max_running_seqs: int = 32
    max_batched_tokens: int = 512
    max_waiting: int = 256
    retry_after_s: int = 1                   # QueueFullError's hint
    stuck_after_s: float = 60.0              # health() fails when no plan finished for this long
    heartbeat_s: float = 0.5                 # idle: an empty plan at least this often
    stats_interval_steps: int = 16           # live stats all-gather every N steps ...
    stats_min_interval_s: float = 1.0        # ... and at most this often
    record_trace_path: str | None = None     # with build_runner(record_tokens=N): written when full and at exit
    shutdown_timeout_s: float = 30.0
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)   # live re-placement

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"engine model_name must be a non-empty string, got {self.model_name!r}")
        for name in ("max_model_len", "max_running_seqs", "max_batched_tokens", "max_waiting", "retry_after_s",
                     "stats_interval_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"engine {name} must be a positive integer, got {value!r}")
        for name in ("stuck_after_s", "heartbeat_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"engine {name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.stats_min_interval_s, (int, float)) or self.stats_min_interval_s < 0:
            raise ValueError(f"engine stats_min_interval_s must be >= 0, got {self.stats_min_interval_s!r}")
        if self.heartbeat_s >= self.stuck_after_s:
            raise ValueError(f"engine heartbeat_s ({self.heartbeat_s}) must be < stuck_after_s "
                             f"({self.stuck_after_s})")
        if any(not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ValueError(f"engine eos_token_ids must be token ids >= 0, got {self.eos_token_ids!r}")
        if self.max_running_seqs > self.max_batched_tokens:
            raise ValueError(f"engine max_running_seqs ({self.max_running_seqs}) must be <= max_batched_tokens "
                             f"({self.max_batched_tokens})")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides) -> "EngineConfig":
        """Defaults from a checkpoint: its directory name, max_position_embeddings, and the eos ids of
        generation_config.json (config.json's when it has none). ``overrides`` win."""
        from epserve.model.config import ModelConfig
        model_dir = Path(model_dir)
        config = ModelConfig.from_dir(model_dir)
        eos = config.eos_token_ids
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if gen_eos is not None:
                eos = (gen_eos,) if isinstance(gen_eos, int) else tuple(gen_eos)
        values = dict(model_name=model_dir.resolve().name, max_model_len=config.max_position_embeddings,
                      eos_token_ids=tuple(eos))
        values.update(overrides)
        return cls(**values)


def attach_live_stats(runner: Runner) -> LiveStats:
    """Every rank, before its first step: count live traffic in the runner."""
    if runner.live_stats is None:
        runner.live_stats = LiveStats(topology=runner.topology,
                                      expert_to_rank_LE=runner.dispatcher.expert_to_rank_LE)
    return runner.live_stats


def after_step(runner: Runner, plan: StepPlan) -> GroupTraffic | None:
    """The plan's flags, in the same order on every rank (each is a collective over the group)."""
    traffic = runner.live_stats.gather(runner.counters) if plan.stats else None
    if plan.save_trace_to is not None:
        if runner.recorder is None:
            raise RuntimeError(f"rank {runner.topology.rank}: asked to save a routing trace but the runner "
                               f"records none (build_runner(record_tokens=...))")
        trace = runner.recorder.save(runner.coll, plan.save_trace_to)
        if runner.topology.rank == 0:
            print(f"epserve: wrote the routing of {trace.num_tokens} live tokens to {plan.save_trace_to}",
                  file=sys.stderr, flush=True)
    return traffic


def follow(runner: Runner, channel: ControlChannel | None = None) -> int:
    """Ranks > 0: run every plan rank 0 broadcasts until a shutdown plan; returns the number of plans run.
    Raises whatever breaks (a collective error when rank 0 or a peer died)."""
    channel = channel or ControlChannel(runner.topology, counters=runner.counters)
    attach_live_stats(runner)
    live = LiveReplacement(runner, channel)
    while True:
        plan = channel.recv()
        live.boundary(plan)
        runner.execute(plan)
        after_step(runner, plan)
        if plan.shutdown:
            return channel.sent


def _push_all(batch: list[tuple[Stream, Delta]]) -> None:
    """On the streams' event loop: each delta to its stream, in order."""
    for stream, delta in batch:
        stream.push(delta)


def start_engine(runner: Runner, config: EngineConfig, *, placement_document: dict | None = None,
                 on_fatal: Callable[[str], None] | None = None, channel: ControlChannel | None = None,
                 diagnose: Callable[[], str] | None = None) -> "Engine":
    """Rank 0: the engine, its thread started. ``placement_document`` defaults to the runner's placement.
    ``on_fatal(reason)`` is called once, from the engine thread, when the engine dies (use
    ``loop.call_soon_threadsafe`` to reach the server's loop). The other ranks call :func:`follow`."""
    if runner.topology.rank != 0:
        raise RuntimeError(f"start_engine runs on rank 0; rank {runner.topology.rank} calls follow()")
    attach_live_stats(runner)
    if placement_document is None:
        placement_document = runner.placement.to_dict()
    engine = Engine(runner, config, placement_document=placement_document, on_fatal=on_fatal,
                    channel=channel or ControlChannel(runner.topology, counters=runner.counters), diagnose=diagnose)
    engine.start()
    return engine


class Engine:
    """EngineClient (epserve/engine/api.py). Public methods are called from the server's event-loop thread."""

    def __init__(self, runner: Runner, config: EngineConfig, *, placement_document: dict,
                 on_fatal: Callable[[str], None] | None, channel: ControlChannel,
                 diagnose: Callable[[], str] | None = None) -> None:
        model = runner.model.config
        if config.max_model_len > model.max_position_embeddings:
            raise ValueError(f"engine max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {model.max_position_embeddings}")
        if config.record_trace_path is not None:
            if runner.recorder is None:
                raise ValueError("engine record_trace_path needs a runner built with record_tokens > 0")
            if not Path(config.record_trace_path).parent.is_dir():
                raise ValueError(f"engine record_trace_path: folder {Path(config.record_trace_path).parent} "
                                 f"does not exist")
        self.model_name, self.max_model_len = config.model_name, config.max_model_len
        self.max_waiting = config.max_waiting
        self.eos_token_ids = tuple(config.eos_token_ids)
        self.config, self._runner, self._channel, self._on_fatal = config, runner, channel, on_fatal
        self._placement_document = copy.deepcopy(placement_document)
        kv = runner.kv.config
        self._scheduler = Scheduler(SchedulerConfig(
            world_size=runner.topology.world_size, vocab_size=model.vocab_size, max_model_len=config.max_model_len,
            eos_token_ids=self.eos_token_ids, kv_block_size=kv.block_size, kv_blocks_per_rank=kv.num_blocks,
            replicated_kv=runner.kv.replicated, max_running_seqs=config.max_running_seqs,
            max_batched_tokens=config.max_batched_tokens, max_waiting=config.max_waiting,
            retry_after_s=config.retry_after_s), preferred_home=runner.preferred_home_rank)
        self._cond = threading.Condition()
        self._streams: dict[str, Stream] = {}
        self._shutdown_requested = False
        self._draining = False
        self._diagnose = diagnose
        self._dead_reason: str | None = None
        self._plans = 0                     # plans sent (heartbeats included): the next plan's step number
        self._steps = 0                     # plans with work
        self._last_plan_end = time.monotonic()
        self._steps_since_stats, self._last_stats = 0, time.monotonic()
        self._trace_saved_count = 0
        self._traffic = GroupTraffic((), ())
        self._kv_used, self._kv_capacity = 0, kv.num_blocks * kv.block_size
        self._live = LiveReplacement(runner, channel)
        self._replace = ReplaceCoordinator(runner.placement, config.replace, strategy=runner.strategy,
                                           has_window=runner.window is not None,
                                           expert_bytes=expert_bytes_of(runner), wake=self._wake)
        self._bundle = None                 # the next REPLACE_BEGIN's bundle
        self._thread = threading.Thread(target=self._run, name="epserve-engine", daemon=True)

    def start(self) -> None:
        self._last_plan_end = time.monotonic()
        self._thread.start()

    # ---- EngineClient ------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Stream:
        loop = asyncio.get_running_loop()   # RuntimeError outside the server's event loop
        with self._cond:
            self._check_available()
            self._scheduler.add(request)    # ValueError / QueueFullError
            stream = Stream(request, loop, self._cancel)
            self._streams[request.request_id] = stream
            self._cond.notify_all()
        return stream

    def health(self) -> EngineHealth:
        with self._cond:
            if self._dead_reason is not None:
                return EngineHealth(False, self._dead_reason)
            if self._shutdown_requested:
                return EngineHealth(False, "shutting down")
            if self._draining:
                return EngineHealth(False, f"draining: {self._scheduler.num_running + self._scheduler.num_waiting} "
                                           f"request(s) still in flight, no new ones accepted")
            age = time.monotonic() - self._last_plan_end
        if age > self.config.stuck_after_s:
            return EngineHealth(False, f"no step finished for {age:.0f} s")
        if not self._thread.is_alive():
            return EngineHealth(False, "the engine thread is not running")
        return EngineHealth(True)

    def snapshot(self) -> EngineSnapshot:
        with self._cond:
            s, traffic = self._scheduler, self._traffic
            return EngineSnapshot(strategy=self._runner.strategy_label, world_size=self._runner.topology.world_size,
                                  waiting=s.num_waiting, running=s.num_running, steps=self._steps,
                                  prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens,
                                  kv_used_tokens=self._kv_used, kv_capacity_tokens=self._kv_capacity,
                                  layers=traffic.layers, gpu_load=traffic.gpu_load)

    def placement_document(self) -> dict:
        with self._cond:
            return copy.deepcopy(self._placement_document)

    def placement_status(self) -> dict:
        with self._cond:
            return self._replace.status()

    def replace_placement(self, placement) -> int:
        with self._cond:
            self._check_available()
            version = self._replace.request_swap(placement)
            self._cond.notify_all()
            return version

    def solve_placement(self) -> None:
        with self._cond:
            self._check_available()
            self._replace.request_solve()
            self._cond.notify_all()

    def _wake(self) -> None:
        """The background solve finished (its executor's thread): let the engine thread plan."""
        with self._cond:
            self._cond.notify_all()

    def drain(self) -> None:
        """Refuse new requests from now on; the running and waiting ones go on. Idempotent."""
        with self._cond:
            self._draining = True

    def in_flight(self) -> int:
        """Requests admitted and not finished (running + waiting)."""
        with self._cond:
            return self._scheduler.num_running + self._scheduler.num_waiting

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown_requested = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.config.shutdown_timeout_s)

    # ---- extras (tests, launcher) --------------------------------------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine thread to end; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- event-loop side ---------------------------------------------------------------------------------
    def _check_available(self) -> None:
        if self._dead_reason is not None:
            raise EngineUnavailableError(f"the engine is down: {self._dead_reason}")
        if self._shutdown_requested:
            raise EngineUnavailableError("the engine is shutting down")
        if self._draining:
            raise EngineUnavailableError("the server is draining (stopping): no new requests; retry on another "
                                         "replica")

    def _cancel(self, request_id: str) -> None:
        with self._cond:
            self._deliver(self._scheduler.cancel(request_id))
            self._cond.notify_all()

    def _deliver(self, events: list[Event]) -> None:
        """Hand events to their streams (lock held); a stream's final event drops it. One thread-safe call per
        event loop for the whole list: each call wakes the loop and hands it the GIL (measured ~50 us per call
        at world size 1, i.e. 1.6 ms per decode step of 32 sequences when it was one call per event)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Delta]]] = {}
        for request_id, delta in events:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            by_loop.setdefault(stream.loop, []).append((stream, delta))
            if delta.finish_reason is not None:
                del self._streams[request_id]
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, batch)
            except RuntimeError:   # the loop is closed: nobody listens any more
                pass

    # ---- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                plan = self._next_plan()
                self._channel.send(plan)
                started = time.monotonic()
                window = self._live.boundary(plan, bundle=self._bundle)
                result = self._runner.execute(plan)
                traffic = after_step(self._runner, plan)
                self._after_plan(plan, result, traffic, time.monotonic() - started, window)
                if plan.shutdown:
                    self._replace.close()
                    return
        except BaseException as exc:  # noqa: BLE001 - any failure ends the engine; the reason goes out
            lost = self._diagnose() if self._diagnose is not None else ""
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            self._die(lost or f"engine step failed ({type(exc).__name__}: {first}); a rank may be down", exc,
                      explained=bool(lost))

    def _next_plan(self) -> StepPlan:
        with self._cond:
            deadline = time.monotonic() + self.config.heartbeat_s
            while not (self._scheduler.has_work or self._shutdown_requested or self._replace.has_op()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            step, self._plans = self._plans, self._plans + 1
            if self._shutdown_requested:
                self._deliver(self._scheduler.abort_all("the engine is shutting down"))
                return self._scheduler.schedule(step, shutdown=True, stats=True,
                                                save_trace_to=self._trace_to_save(final=True))
            idle = not self._scheduler.has_work
            plan = self._scheduler.schedule(step, stats=self._stats_due(idle),
                                            save_trace_to=self._trace_to_save(final=False))
            op, self._bundle = self._replace.next_op(self._scheduler.generation_tokens)
            return plan if op == REPLACE_NONE else dataclasses.replace(plan, replace=op)

    def _stats_due(self, idle: bool) -> bool:
        due = self._steps_since_stats >= self.config.stats_interval_steps or (idle and self._steps_since_stats > 0)
        return due and time.monotonic() - self._last_stats >= self.config.stats_min_interval_s

    def _trace_to_save(self, *, final: bool) -> str | None:
        recorder, path = self._runner.recorder, self.config.record_trace_path
        if recorder is None or path is None or recorder.count == self._trace_saved_count:
            return None
        return path if (final or recorder.full) else None

    def _after_plan(self, plan: StepPlan, result: StepResult, traffic: GroupTraffic | None, seconds: float,
                    window) -> None:
        kv = self._runner.kv_stats()
        with self._cond:
            self._replace.after_step(plan.replace, seconds, had_work=bool(plan.work), window=window,
                                     moved_bytes=self._live.moved_bytes)
            if plan.replace == REPLACE_COMMIT:
                self._placement_document = self._runner.placement.to_dict()
            self._deliver(self._scheduler.on_result(plan, result) if plan.work else [])
            self._steps += bool(plan.work)
            self._steps_since_stats += bool(plan.work)
            self._last_plan_end = time.monotonic()
            self._kv_used = max(r.used_tokens for r in kv.per_rank)
            if traffic is not None:
                self._traffic, self._steps_since_stats, self._last_stats = traffic, 0, time.monotonic()
            if plan.save_trace_to is not None:
                self._trace_saved_count = self._runner.recorder.count

    def _die(self, reason: str, exc: BaseException, *, explained: bool = False) -> None:
        with self._cond:
            self._dead_reason = reason
            self._deliver(self._scheduler.abort_all(reason))
            for request_id in list(self._streams):   # none expected: every live request was just aborted
                self._deliver([(request_id, Delta(finish_reason=FinishReason.ERROR, error=reason))])
        if not explained:   # a lost rank explains the failed collective; anything else deserves its traceback
            traceback.print_exception(exc)
        if self._on_fatal is not None:
            try:
                self._on_fatal(reason)
            except Exception:  # noqa: BLE001 - the callback's own failure must not hide the first one
                traceback.print_exc()
