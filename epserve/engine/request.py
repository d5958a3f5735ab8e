"""Request state (engine thread) and the stream the server reads (event-loop thread).

    submit(GenerationRequest) --> RequestState (scheduler, engine thread only): waiting -> running -> finished
                              --> Stream (RequestStream): engine thread --call_soon_threadsafe--> asyncio.Queue
                                  --> ``async for delta in stream`` on the server's loop, until a finish_reason

A Stream ends after exactly one Delta with a finish_reason; events that arrive after it are dropped.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from epserve.engine.api import Delta, FinishReason, GenerationRequest


class Phase(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestState:
    """One request inside the scheduler. ``fed`` counts prompt tokens already in the KV cache."""

    request: GenerationRequest
    seq_id: int
    phase: Phase = Phase.WAITING
    home_rank: int = -1
    kv_blocks: int = 0               # blocks reserved for its whole life (prompt + max_tokens - 1 positions)
    fed: int = 0
    out: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.fed < self.prompt_len

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.request.extra_stop_token_ids)


class Stream:
    """RequestStream for one request: an async iterator of Deltas fed from the engine thread."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[str], None]) -> None:
        self.request_id = request.request_id
        self.num_prompt_tokens = len(request.prompt_ids)
        self.loop = loop          # the event loop that reads it
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._closed = False      # a final delta was queued (event-loop thread only)
        self._cancelled = False
        # coalesce: the reader wants the whole answer only (a non-streamed request without stop strings), so
        # the ids of non-final deltas are kept here and handed over with the final one: one wake-up of the
        # reader per request instead of one per token (event-loop thread only)
        self.coalesce = False
        self.first_token_at: float | None = None   # time.monotonic() of the first id's arrival
        self._held: list[int] = []

    # ---- engine thread -------------------------------------------------------------------------------------
    def push_threadsafe(self, delta: Delta) -> None:
        """Hand one delta to the stream's loop (a closed loop means nobody listens any more: dropped)."""
        try:
            self.loop.call_soon_threadsafe(self.push, delta)
        except RuntimeError:   # the loop is closed
            pass

    # ---- event-loop thread ---------------------------------------------------------------------------------
    def push(self, delta: Delta) -> None:
        """On the stream's loop (the engine batches a step's deltas into one thread-safe call)."""
        if self._closed:
            return
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._closed = delta.finish_reason is not None
        if self.coalesce:
            self._held.extend(delta.token_ids)
            if not self._closed:
                return
            delta = replace(delta, token_ids=tuple(self._held))
        self._queue.put_nowait(delta)

    def cancel(self) -> None:
        if not self._cancelled and not self._closed:
            self._cancelled = True
            self._on_cancel(self.request_id)

    @property
    def finished(self) -> bool:
        return self._closed

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return
