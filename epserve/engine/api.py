"""The contract between the server (asyncio, rank 0) and the engine (one thread on rank 0 driving every rank).

    server (event loop)                                engine thread (rank 0)            ranks 1..G-1
      text --tokenizer--> GenerationRequest --submit()--> inbox --> scheduler --> StepPlan --broadcast--> follow()
      <--RequestStream: async iterator of Delta-------- StepResult (sampled ids) <-- Runner.execute (lockstep)
      detokenize, stop strings --> cancel()

The engine deals in token ids only. Text (tokenizer, chat template, incremental detokenization, stop strings)
is the server's business: a stop string found by the server cancels the request, and the engine frees its KV
at the next step boundary. End-of-sequence token ids are the engine's (they end a request with ``stop``).

Every call here is made from the server's event-loop thread; the engine hands events back to that loop with
``call_soon_threadsafe``. Nothing here is a module-level singleton: the launcher builds one engine per process.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from epserve.engine.plan import SamplingParams


class FinishReason(enum.Enum):
    STOP = "stop"            # an end-of-sequence token (or, decided by the server, a stop string)
    LENGTH = "length"        # max_tokens reached, or the model's context is full
    CANCELLED = "cancelled"  # the client went away or the server cancelled (stop string)
    ERROR = "error"          # the engine failed (a rank died, a collective timed out); ``Delta.error`` says why


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One sequence to generate. ``sampling.seed`` is always set (the server draws one when the client gave
    none), so a request gives the same tokens whatever the world size, strategy or batch it runs in."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    ignore_eos: bool = False
    extra_stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.request_id}: empty prompt")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Delta:
    """What one engine step produced for one request: new token ids, and (last event only) why it ended."""

    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None   # set exactly when finish_reason is ERROR


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit: answer 503 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailableError(RuntimeError):
    """The engine is dead or shutting down: answer 503; the process is about to exit."""


class RequestStream(Protocol):
    request_id: str
    num_prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    def cancel(self) -> None:
        """Idempotent. The stream then ends with a CANCELLED delta (unless it had already finished)."""


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    reason: str = ""   # why not ok: "rank 2 is down: ...", "no step finished for 31 s", "shutting down"


@dataclass(frozen=True, kw_only=True)
class LayerTraffic:
    """Live traffic of one MoE layer, summed over every rank since the engine started."""

    moe_layer: int
    a2a_calls: int            # all-to-all calls (per rank; the same on every rank)
    a2a_bytes: int            # bytes sent by all ranks in this layer's all-to-alls
    transfers: int            # hidden-state vectors sent between ranks (DESIGN.md "transfer")
    activations: int          # (token, expert) choices made by the router
    local_activations: int    # ... whose expert was on the token's current rank
    expert_load: tuple[int, ...]   # activations per expert
    kv_bytes: int = 0         # K/V copies sent by all ranks for the attention layers up to this MoE layer
                              # (coherent strategies replicate every sequence's context on every rank)
    cross_node_bytes: int = 0   # the part of a2a_bytes + kv_bytes that crossed between nodes

    @property
    def lar(self) -> float:
        return self.local_activations / self.activations if self.activations else 0.0

    @property
    def imbalance(self) -> float:
        """max / mean load of the GPUs of this layer is the ExFlow figure; here per expert (max / mean)."""
        if not self.expert_load or not sum(self.expert_load):
            return 0.0
        return max(self.expert_load) * len(self.expert_load) / sum(self.expert_load)


@dataclass(frozen=True, kw_only=True)
class EngineSnapshot:
    """The engine's state for /metrics and /placement (cheap to build; read from the event loop)."""

    strategy: str
    world_size: int
    waiting: int                 # requests queued, not yet admitted
    running: int                 # sequences in the running batch
    steps: int                   # engine steps executed
    prompt_tokens: int           # totals since start
    generation_tokens: int
    kv_used_tokens: int          # rank 0's view of the busiest rank
    kv_capacity_tokens: int
    layers: tuple[LayerTraffic, ...] = field(default=())
    gpu_load: tuple[tuple[int, ...], ...] = field(default=())   # [moe layer][gpu] activations


class EngineClient(Protocol):
    """What the server sees of the engine (rank 0 only)."""

    model_name: str        # served model name (the checkpoint directory's name unless overridden)
    max_model_len: int     # prompt + generated tokens of one sequence
    max_waiting: int       # requests the waiting queue holds: a batch of more could never be queued whole
    eos_token_ids: tuple[int, ...]

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request. Raises QueueFullError, EngineUnavailableError, or ValueError (a request that can
        never run, e.g. longer than the KV cache of a rank: the message names the field)."""

    def health(self) -> EngineHealth: ...

    def snapshot(self) -> EngineSnapshot: ...

    def placement_document(self) -> dict:
        """The placement in use, as its JSON document (DESIGN.md "Data formats")."""

    def placement_status(self) -> dict:
        """Live re-placement: version, when it changed, the running swap or solve, the last ones."""

    def replace_placement(self, placement) -> int:
        """Swap in ``placement`` (checked against the model and cluster by the caller) while serving; returns
        the version it will have. Raises ReplaceBusyError while a swap or solve runs."""

    def solve_placement(self) -> None:
        """Solve a placement from live routing in the background and swap it in if it pays. Raises
        ReplaceBusyError while a swap or solve runs, ReplaceUnavailableError without a live window."""

    def shutdown(self) -> None:
        """Stop every rank's loop (a shutdown plan) and fail what is still running. Idempotent."""
