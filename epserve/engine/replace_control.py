"""Live re-placement, rank 0's side: requests, the background solve, the order of the swap's steps, status.

    POST /placement {placement document} --request_swap--> pending Bundle (version + 1)
    POST /placement {"solve": true}, or every ``every_tokens`` generated tokens --request_solve--> COLLECT
        --> the window's trace --background process (spawn, niced): placement.pipeline.refit--> a Bundle when the
            new placement cuts transfers on the window by ``min_gain``, else nothing (the report says why)
    engine thread, each plan: next_op() --> BEGIN (bundle + schedule) --> schedule step i, one per plan (a layer's
        moves in chunks of at most ``step_bytes`` per rank) --> COMMIT
    every step: after_step(op, seconds) --> the longest step of each swap against recent normal steps

One swap or solve at a time: a request while one runs is refused (ReplaceBusyError: HTTP 409) and the running
placement is untouched. Methods are called under the engine's lock (server thread and engine thread).
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from epserve.engine.plan import REPLACE_BEGIN, REPLACE_COLLECT, REPLACE_COMMIT, REPLACE_NONE
from epserve.engine.replace import Bundle
from placement.pipeline import RefitOptions, refit_niced
from placement.placement import Placement


class ReplaceBusyError(RuntimeError):
    """A swap or a solve is already running (HTTP 409)."""


class ReplaceUnavailableError(RuntimeError):
    """This server cannot do what was asked (e.g. solve without a live routing window)."""


@dataclass(frozen=True, kw_only=True)
class ReplaceConfig:
    every_tokens: int = 0            # solve + swap after this many generated tokens (0: only on request)
    min_window_tokens: int = 64      # a solve needs at least this many tokens of live routing
    step_bytes: int | None = 8 << 20    # expert weights one rank sends or receives per step (None: a layer)
    refit: RefitOptions = RefitOptions()

    def __post_init__(self) -> None:
        for name in ("every_tokens", "min_window_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"replace {name} must be an integer >= 0, got {value!r}")
        if self.step_bytes is not None and self.step_bytes < 1:
            raise ValueError(f"replace step_bytes must be >= 1 or None, got {self.step_bytes!r}")


class ReplaceCoordinator:
    def __init__(self, placement: Placement, config: ReplaceConfig, *, strategy, has_window: bool,
                 expert_bytes: int, wake: Callable[[], None]) -> None:
        self.config, self.strategy, self.has_window, self._wake = config, strategy, has_window, wake
        self.expert_bytes = expert_bytes
        self.placement = placement
        self.version, self.changed_at = 1, time.time()
        self.swaps = 0
        self._pending: Bundle | None = None           # ready to BEGIN
        self._pending_source = ""                     # who asked for it (status)
        self._bundle: Bundle | None = None            # the running swap's
        self._solve_started = 0.0
        self._ops: collections.deque[int] = collections.deque()   # the running swap's remaining ops
        self._swap: dict | None = None                # the running swap's status
        self._collect = False                         # COLLECT at the next plan
        self._gathering = False                       # a COLLECT plan is out; its trace comes in after_step
        self._solve: concurrent.futures.Future | None = None
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._tokens_at_last_solve = 0
        self.last_solve: dict | None = None
        self.last_swap: dict | None = None
        self._normal_s: collections.deque[float] = collections.deque(maxlen=256)

    # ---- requests (server thread) ---------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._pending or self._swap or self._collect or self._gathering or self._solve)

    def _check_idle(self) -> None:
        if self._swap is not None or self._pending is not None:
            raise ReplaceBusyError(f"a placement swap to version {self.version + 1} is running; try again when "
                                   f"GET /placement shows it done")
        if self._collect or self._gathering or self._solve is not None:
            raise ReplaceBusyError("a placement is being solved from live routing; try again when GET /placement "
                                   "shows it done")

    def request_swap(self, placement: Placement, source: str = "POST /placement") -> int:
        """Swap in ``placement`` (already checked against the model and cluster). Returns its version."""
        self._check_idle()
        self._pending, self._pending_source = Bundle(placement, None, self.version + 1), source
        return self.version + 1

    def request_solve(self) -> None:
        self._check_idle()
        if not self.has_window:
            raise ReplaceUnavailableError("this server records no live routing (started with --replace-window 0)")
        self._collect = True

    # ---- the engine thread ------------------------------------------------------------------------------
    def has_op(self) -> bool:
        """A plan should go out now (even with no work): an op is due or the background solve finished."""
        return bool(self._collect or self._pending or self._ops or (self._solve is not None and self._solve.done()))

    def next_op(self, generated_tokens: int) -> tuple[int, Bundle | None]:
        """The replace op of the next plan, and the bundle for REPLACE_BEGIN."""
        self._poll_solve()
        every = self.config.every_tokens
        if every and not self.busy and generated_tokens - self._tokens_at_last_solve >= every and self.has_window:
            self._collect = True
        if self._collect:
            self._collect, self._gathering = False, True
            self._tokens_at_last_solve = generated_tokens
            return REPLACE_COLLECT, None
        if self._ops:
            return self._ops.popleft(), None
        if self._pending is not None:
            bundle = self._pending.scheduled(self.placement, expert_bytes=self.expert_bytes,
                                             step_bytes=self.config.step_bytes)
            self._pending = None
            self._ops.extend(list(range(len(bundle.schedule))) + [REPLACE_COMMIT])
            moves = sum(len(s.moves) for s in bundle.schedule)
            self._swap = {"to_version": bundle.version, "source": self._pending_source,
                          "started_at": time.time(), "layers": sum(s.last for s in bundle.schedule),
                          "layers_done": 0, "schedule_steps": len(bundle.schedule), "expert_moves": moves,
                          "moved_bytes": moves * self.expert_bytes, "longest_step_s": 0.0, "steps": 0}
            self._bundle = bundle
            return REPLACE_BEGIN, bundle
        return REPLACE_NONE, None

    def after_step(self, op: int, seconds: float, *, had_work: bool, window=None, moved_bytes: int = 0) -> None:
        """Every plan, after it ran (``seconds``: its boundary + step on rank 0)."""
        if op == REPLACE_COLLECT:
            self._gathering = False
            self._start_solve(window)
        if self._swap is None:
            if op == REPLACE_NONE and had_work:
                self._normal_s.append(seconds)
            return
        swap = self._swap
        swap["steps"] += 1
        swap["longest_step_s"] = max(swap["longest_step_s"], seconds)
        swap["layers_done"] += op >= 0 and self._bundle.schedule[op].last
        if op == REPLACE_COMMIT:
            normal = statistics.median(self._normal_s) if self._normal_s else None
            self.placement, self.version, self.changed_at = self._bundle.placement, self._bundle.version, time.time()
            self.swaps += 1
            self.last_swap = {**swap, "finished_at": self.changed_at, "sent_bytes_rank0": moved_bytes,
                              "normal_step_p50_s": normal,
                              "longest_over_normal": swap["longest_step_s"] / normal if normal else None}
            self._swap = self._bundle = None

    def status(self) -> dict:
        state = "swapping" if self._swap or self._pending else "solving" if self._collect or self._gathering or self._solve \
            else "idle"
        return {"version": self.version, "changed_at": self.changed_at, "swaps": self.swaps, "state": state,
                "swap": dict(self._swap) if self._swap else None, "last_swap": self.last_swap,
                "last_solve": self.last_solve, "every_tokens": self.config.every_tokens,
                "live_window": self.has_window}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the background solve ---------------------------------------------------------------------------
    def _start_solve(self, window) -> None:
        if window is None or window.num_tokens < self.config.min_window_tokens:
            self.last_solve = {"finished_at": time.time(), "swapped": False,
                               "reason": f"the live window holds {0 if window is None else window.num_tokens} "
                                         f"tokens, fewer than {self.config.min_window_tokens}"}
            return
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._solve_started = time.time()
        self._solve = self._executor.submit(refit_niced, window, self.placement, self.strategy,
                                            self.config.refit)
        self._solve.add_done_callback(lambda _: self._wake())

    def _poll_solve(self) -> None:
        if self._solve is None or not self._solve.done():
            return
        future, self._solve = self._solve, None
        try:
            placement, predictor, report = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed solve is reported; serving goes on
            self.last_solve = {"finished_at": time.time(), "swapped": False,
                               "reason": f"the solve failed: {type(exc).__name__}: {exc}"}
            return
        self.last_solve = {**report, "started_at": self._solve_started, "finished_at": time.time(),
                           "swapped": placement is not None,
                           "reason": None if placement is not None else
                           f"transfers fall by {report['gain']:.1%} < min_gain {report['min_gain']:.1%}"}
        if placement is not None:
            self._pending = Bundle(placement, predictor, self.version + 1)
            self._pending_source = "solved from live routing"
