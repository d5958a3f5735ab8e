"""From engine token ids to text events, and from text events to Server-Sent Events.

    RequestStream (Delta: token ids, finish) --TextStream: detokenize, stop strings, timings--> TextEvent
    TextEvent x N prompts --merge (interleaved as they come; each carries its prompt index)--> one iterator
    --sse()--> b"data: {chunk}\\n\\n" ... b"data: [DONE]\\n\\n"

A stop string found cancels the engine request (its KV is freed at the next step boundary). Leaving ``merge``
early (client gone, error in another prompt) cancels every engine request that is still running.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from epserve.engine.api import Delta, FinishReason, RequestStream
from epserve.server.text import IncrementalDetokenizer, StopMatcher, Tokenizer


@dataclass(frozen=True)
class TextEvent:
    """New text of prompt ``index``; the last event of a prompt has ``finish_reason`` ("stop", "length" or
    "error"; ``error`` then says why)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Timing:
    """One request's token times (time.monotonic seconds) for the latency histograms."""

    arrived: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0

    def add(self, n: int, *, first_at: float | None = None) -> None:
        """``n`` ids arrived now; ``first_at``: when the first of them reached the server, if earlier (a
        stream that hands its ids over at the end)."""
        t = time.monotonic()
        if self.first_token is None:
            self.first_token = t if first_at is None else first_at
        self.last_token, self.tokens = t, self.tokens + n


class TextStream:
    """One engine request seen as text. ``num_tokens`` counts the generated ids it used (usage): all it
    received, or with a stop string those up to and including the one that completed it."""

    def __init__(self, index: int, stream: RequestStream, tokenizer: Tokenizer, stops: tuple[str, ...], *,
                 arrived: float, on_tokens: Callable[[int], None] = lambda n: None,
                 on_finish: Callable[[Timing], None] = lambda t: None) -> None:
        self.index = index
        self.stream = stream
        self.timing = Timing(arrived=arrived)
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = StopMatcher(stops)
        self._on_tokens, self._on_finish = on_tokens, on_finish

    @property
    def num_prompt_tokens(self) -> int:
        return self.stream.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return self.timing.tokens

    async def events(self) -> AsyncIterator[TextEvent]:
        try:
            async for delta in self.stream:
                event = self._step(delta)
                if event is not None:
                    yield event
                if event is not None and event.finish_reason is not None:
                    return
            yield TextEvent(self.index, finish_reason="error", error="the engine ended the request without a "
                                                                       "finish reason")
        finally:
            self._on_finish(self.timing)

    def _step(self, delta: Delta) -> TextEvent | None:
        text, used = self._text_of(delta.token_ids)
        if used:
            self.timing.add(used, first_at=getattr(self.stream, "first_token_at", None))
            self._on_tokens(used)
        if self._stop.stopped:
            self.stream.cancel()
            return TextEvent(self.index, text, finish_reason="stop")
        if delta.finish_reason is None:
            return TextEvent(self.index, text) if text else None
        if delta.finish_reason is FinishReason.ERROR:
            return TextEvent(self.index, text, finish_reason="error", error=delta.error or "unknown engine error")
        if delta.finish_reason is FinishReason.CANCELLED:
            return TextEvent(self.index, text, finish_reason="error", error="the engine cancelled the request")
        text += self._stop.feed(self._detok.flush())
        if not self._stop.stopped:
            text += self._stop.flush()
        return TextEvent(self.index, text, finish_reason="stop" if self._stop.stopped else delta.finish_reason.value)

    def _text_of(self, token_ids: tuple[int, ...]) -> tuple[str, int]:
        """The text the new ids add, and how many of them count: fed one by one, so that with a stop string
        only the ids up to and including the one that completed it count (vLLM's usage rule)."""
        if not self._stop.active:
            return self._detok.add(token_ids), len(token_ids)
        text = ""
        for n, token in enumerate(token_ids, 1):
            text += self._stop.feed(self._detok.add((token,)))
            if self._stop.stopped:
                return text, n
        return text, len(token_ids)


async def merge(streams: list[TextStream]) -> AsyncIterator[TextEvent]:
    """Events of every stream, interleaved in arrival order. Closing the iterator early (or an exception in
    the consumer) cancels the engine requests still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(s: TextStream) -> None:
        try:
            async for event in s.events():
                await queue.put(event)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    left = len(streams)
    try:
        while left:
            event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield event
    finally:
        for s in streams:
            s.stream.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
