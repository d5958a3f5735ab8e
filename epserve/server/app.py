"""create_app: the OpenAI-compatible FastAPI app over an EngineClient (rank 0).

    HTTP body (size-limited) --auth--> parse + validate (protocol.py) --> prompt ids (text.py), limits checked
      --> engine.submit() once per prompt (a batch is submitted together) --> TextStream per prompt
      --> merge --> one JSON response, or SSE chunks (streaming.py)
    client gone --> every engine request of the HTTP request is cancelled (KV freed at the next step)

Also /v1/models, /health, /metrics (the app's own Prometheus registry) and /placement (GET: the placement in
use, its version and live traffic; POST, with the API key: swap in a posted placement, or {"solve": true} to
solve one from live routing, while serving: epserve/engine/replace*.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from epserve.engine.api import EngineClient, EngineUnavailableError, GenerationRequest, QueueFullError
from epserve.engine.plan import SamplingParams
from epserve.engine.replace_control import ReplaceBusyError, ReplaceUnavailableError
from epserve.model.config import ModelConfig
from epserve.server import errors, protocol
from epserve.server import schemas as S
from epserve.server.placement_input import posted_placement
from epserve.server.metrics import CONTENT_TYPE, ServerMetrics
from epserve.server.protocol import ChatCompletionRequest, CompletionRequest
from epserve.server.streaming import SSE_DONE, TextEvent, TextStream, merge, sse
from epserve.server.text import ChatTemplateError, Tokenizer
from placement.placement import Placement

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/placement")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How the app serves. ``model_dir`` holds tokenizer.json, tokenizer_config.json and config.json."""

    model_dir: str | Path
    served_model_names: tuple[str, ...] = ()   # empty: the engine's model_name
    api_key: str | None = None                 # None: no authentication
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0               # a request body must arrive whole this soon (else 408)
    default_max_tokens: int = 16               # when a request gives no max_tokens (capped by the context)
    default_temperature: float = 1.0           # OpenAI's default

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise ValueError(f"default_temperature must be in [0, 2], got {self.default_temperature}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None disables authentication)")
        if any(not n for n in self.served_model_names):
            raise ValueError("served_model_names must not hold an empty name")


@dataclass(frozen=True)
class _Job:
    """One HTTP generation request after validation: one prompt-id list per choice."""

    rid: str
    model: str
    created: int
    arrived: float
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: tuple[int, ...]
    sampling: tuple[SamplingParams, ...]     # per prompt: a seed is drawn for each when the client gave none
    prompt_params: tuple[str, ...]           # per prompt: the request field it came from (errors name it)
    max_tokens_param: str
    stops: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    include_usage: bool


class _Server:
    """The app's state and handlers; everything runs on the event loop."""

    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.top_k = ModelConfig.from_dir(config.model_dir).top_k
        self.names = config.served_model_names or (engine.model_name,)
        self.metrics = ServerMetrics(engine)
        self.started = int(time.time())

    # ------------------------------------------------------------ request intake

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.body_too_large(limit)
        body = bytearray()

        async def receive() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > limit:
                    raise errors.body_too_large(limit)

        try:   # a client that sends its body slowly, or never finishes it, holds only its own connection
            await asyncio.wait_for(receive(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise errors.APIError(408, f"The request body did not arrive within {self.config.body_timeout_s:g} s",
                                  code="request_timeout") from None
        return bytes(body)

    def check_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.config.api_key):
            raise errors.unauthorized()

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise errors.model_not_found(name, self.names)

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[int, ...]]:
        prompts, limit = protocol.prompt_list(req.prompt), self.engine.max_waiting
        if len(prompts) > limit:   # submitted together, they could never all be queued: 503 would never pass
            raise errors.bad_request(f"prompt: a batch of {len(prompts)} prompts is more than this server queues "
                                     f"at once; send at most {limit} per request", "prompt", "too_many_prompts")
        out = []
        vocab = self.tokenizer.vocab_size
        for i, p in enumerate(prompts):
            param = protocol.prompt_param(req.prompt, i)
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise errors.bad_request(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                             param, "invalid_token_id")
                ids = p
            out.append(self.check_prompt_len(ids, param))
        return out

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[int, ...]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.tokenizer.encode_chat(messages)
        except ChatTemplateError as exc:
            raise errors.bad_request(str(exc), "messages", "invalid_messages") from None
        return self.check_prompt_len(ids, "messages")

    def check_prompt_len(self, ids, param: str) -> tuple[int, ...]:
        ctx = self.engine.max_model_len
        if not ids:
            raise errors.bad_request(f"{param} encodes to no tokens", param, "empty_prompt")
        if len(ids) >= ctx:
            raise errors.bad_request(f"{param} is {len(ids)} tokens; the model's context is {ctx} tokens, which "
                                     "leaves no room to generate", param, "context_length_exceeded")
        return tuple(ids)

    def max_tokens_for(self, asked: int | None, prompt: tuple[int, ...], param: str) -> int:
        room = self.engine.max_model_len - len(prompt)
        if asked is None:
            return min(self.config.default_max_tokens, room)
        if asked > room:
            raise errors.bad_request(f"{param}={asked} is too large: the prompt is {len(prompt)} tokens and the "
                                     f"context {self.engine.max_model_len}, so at most {room} can be generated",
                                     param, "context_length_exceeded")
        return asked

    def make_job(self, req, prompts: list[tuple[int, ...]], *, chat: bool, arrived: float) -> _Job:
        asked, param = req.max_tokens, "max_tokens"
        if chat and req.max_completion_tokens is not None:
            asked, param = req.max_completion_tokens, "max_completion_tokens"
        temperature = self.config.default_temperature if req.temperature is None else req.temperature
        sampling = tuple(SamplingParams(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                                        top_k=req.top_k or 0,
                                        seed=secrets.randbits(63) if req.seed is None else req.seed)
                         for _ in prompts)
        return _Job(rid=protocol.new_id("chatcmpl" if chat else "cmpl"), model=req.model, created=protocol.now(),
                    arrived=arrived, prompts=tuple(prompts),
                    max_tokens=tuple(self.max_tokens_for(asked, p, param) for p in prompts), sampling=sampling,
                    prompt_params=("messages",) if chat else tuple(protocol.prompt_param(req.prompt, i)
                                                                  for i in range(len(prompts))),
                    max_tokens_param=param,
                    stops=req.stop_strings(), ignore_eos=req.ignore_eos, stream=req.stream,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))

    def submit(self, job: _Job) -> list[TextStream]:
        """Every prompt of the job submitted, or none (what was submitted is cancelled) and an APIError."""
        streams: list[TextStream] = []
        try:
            for i, (ids, max_tokens, sampling) in enumerate(zip(job.prompts, job.max_tokens, job.sampling)):
                request = GenerationRequest(request_id=f"{job.rid}-{i}", prompt_ids=ids, max_tokens=max_tokens,
                                            sampling=sampling, ignore_eos=job.ignore_eos)
                stream = self.engine.submit(request)
                # the whole answer at once: no per-token hand-over (stop strings need the text as it comes)
                stream.coalesce = not job.stream and not job.stops
                streams.append(TextStream(i, stream, self.tokenizer, job.stops,
                                          arrived=job.arrived, on_tokens=self.metrics.generation_tokens.inc,
                                          on_finish=self.metrics.observe_finish))
                self.metrics.prompt_tokens.inc(len(ids))
        except QueueFullError as exc:
            self._cancel(streams)
            raise errors.queue_full(str(exc), exc.retry_after_s) from None
        except EngineUnavailableError as exc:
            self._cancel(streams)
            raise errors.engine_unavailable(str(exc)) from None
        except ValueError as exc:
            self._cancel(streams)
            msg = str(exc)   # the engine's messages start with the field: "prompt: ...", "max_tokens: ..."
            failed = len(streams)   # the prompt after those submitted
            param = {"prompt": job.prompt_params[failed], "max_tokens": job.max_tokens_param}.get(msg.partition(":")[0])
            raise errors.bad_request(msg, param) from None
        return streams

    @staticmethod
    def _cancel(streams: list[TextStream]) -> None:
        for s in streams:
            s.stream.cancel()

    # ------------------------------------------------------------ answering

    async def answer(self, request: Request, job: _Job, *, chat: bool) -> Response:
        streams = self.submit(job)
        if job.stream:
            return StreamingResponse(self.sse_body(job, streams, chat=chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, finish = await self.collect(request, streams)
        use = _usage(streams)
        if chat:
            choices = [protocol.chat_choice(i, texts[i], finish[i]) for i in range(len(streams))]
            return JSONResponse(protocol.chat_response(job.rid, job.model, job.created, choices, use))
        choices = [protocol.completion_choice(i, texts[i], finish[i]) for i in range(len(streams))]
        return JSONResponse(protocol.completion_response(job.rid, job.model, job.created, choices, use))

    async def collect(self, request: Request, streams: list[TextStream]) -> tuple[list[str], list[str]]:
        """All text of every prompt, each stream drained by its own task (no merged queue between them: one
        task wake-up per token, not two). A client that goes away cancels them all (answered 499, to no one);
        an error in one prompt ends the others."""
        texts, finish = [""] * len(streams), [""] * len(streams)
        gone = asyncio.Event()

        def client_gone() -> None:
            gone.set()
            self._cancel(streams)

        async def drain(i: int, s: TextStream) -> TextEvent | None:
            async for event in s.events():
                texts[i] += event.text
                if event.finish_reason == "error":
                    return event
                if event.finish_reason is not None:
                    finish[i] = event.finish_reason
            return None

        watcher = asyncio.create_task(_on_disconnect(request, client_gone))
        tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
        try:
            for next_done in asyncio.as_completed(tasks):
                failed = await next_done
                if failed is not None:
                    raise errors.client_closed() if gone.is_set() else self.engine_error(failed)
        finally:
            watcher.cancel()
            self._cancel(streams)          # those still running (no-op for finished ones)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return texts, finish

    def engine_error(self, event: TextEvent) -> errors.APIError:
        health = self.engine.health()
        if not health.ok:
            said = event.error or ""
            return errors.engine_unavailable(said if health.reason in said else f"{said} ({health.reason})")
        return errors.engine_failed(event.error or "unknown error")

    async def sse_body(self, job: _Job, streams: list[TextStream], *, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if job.include_usage else {}

        def one(index: int, text: str, finish: str | None) -> bytes:
            choice = (protocol.chat_chunk_choice(index, {"content": text} if text else {}, finish) if chat
                      else protocol.completion_choice(index, text, finish))
            return sse(protocol.chunk(job.rid, obj, job.model, job.created, [choice]) | extra)

        if chat:
            for i in range(len(streams)):
                yield sse(protocol.chunk(job.rid, obj, job.model, job.created,
                                         [protocol.chat_chunk_choice(i, {"role": "assistant", "content": ""},
                                                                     None)]) | extra)
        async for event in merge(streams):
            if event.finish_reason == "error":
                yield sse(self.engine_error(event).body())
                yield SSE_DONE
                return
            if event.text or event.finish_reason is not None:
                yield one(event.index, event.text, event.finish_reason)
        if job.include_usage:
            yield sse(protocol.chunk(job.rid, obj, job.model, job.created, [], _usage(streams)))
        yield SSE_DONE

    # ------------------------------------------------------------ endpoints

    async def completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        self.check_auth(request)
        req = protocol.parse_body(await self.read_body(request), CompletionRequest)
        self.check_model(req.model)
        job = self.make_job(req, self.completion_prompts(req), chat=False, arrived=arrived)
        return await self.answer(request, job, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.monotonic()
        self.check_auth(request)
        req = protocol.parse_body(await self.read_body(request), ChatCompletionRequest)
        self.check_model(req.model)
        job = self.make_job(req, [self.chat_prompt(req)], chat=True, arrived=arrived)
        return await self.answer(request, job, chat=True)

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse(protocol.models_list(self.names, self.started, self.engine.max_model_len))

    async def health(self, request: Request) -> Response:
        h = self.engine.health()
        if h.ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": h.reason}, status_code=503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def placement(self, request: Request) -> Response:
        snap = self.engine.snapshot()
        layers = []
        for t in snap.layers:
            tokens = t.activations / self.top_k if self.top_k else 0
            layers.append({"moe_layer": t.moe_layer, "lar": t.lar, "imbalance": t.imbalance,
                           "transfers_per_token_layer": t.transfers / tokens if tokens else 0.0,
                           "a2a_calls": t.a2a_calls, "a2a_bytes": t.a2a_bytes, "kv_bytes": t.kv_bytes,
                           "cross_node_bytes": t.cross_node_bytes,
                           "transfers": t.transfers,
                           "activations": t.activations, "local_activations": t.local_activations,
                           "expert_load": list(t.expert_load)})
        status = self.engine.placement_status()
        return JSONResponse({"strategy": snap.strategy, "world_size": snap.world_size, "version": status["version"],
                             "changed_at": status["changed_at"], "replacement": status,
                             "placement": self.engine.placement_document(), "layers": layers,
                             "gpu_load": [list(row) for row in snap.gpu_load]})

    async def placement_post(self, request: Request) -> Response:
        """Swap in a placement while serving: the body is a placement document (version 1 or 2), or
        {"solve": true} to solve one from the live routing window. 202 when accepted (GET /placement follows
        the swap); the running placement is untouched by any refusal."""
        if self.config.api_key is None:
            raise errors.APIError(403, "POST /placement changes the running placement and needs the server to be "
                                       "started with an API key (--api-key)", type="authentication_error",
                                  code="api_key_required")
        self.check_auth(request)
        doc = protocol.parse_json(await self.read_body(request))
        try:
            if "solve" in doc:
                if len(doc) != 1 or doc["solve"] is not True:   # not == {"solve": True}: 1 == True
                    raise errors.bad_request("'solve' must be true, alone in the body", param="solve")
                self.engine.solve_placement()
                return JSONResponse({"status": "solving", "version": self.engine.placement_status()["version"]},
                                    status_code=202)
            placement = posted_placement(doc, Placement.from_dict(self.engine.placement_document()))
            version = self.engine.replace_placement(placement)
        except ReplaceBusyError as exc:
            raise errors.APIError(409, str(exc), code="placement_busy") from None
        except ReplaceUnavailableError as exc:
            raise errors.APIError(409, str(exc), param="solve", code="placement_unavailable") from None
        except EngineUnavailableError as exc:
            raise errors.engine_unavailable(str(exc)) from None
        return JSONResponse({"status": "swapping", "version": version}, status_code=202)


def _usage(streams: list[TextStream]) -> dict:
    """The usage of a finished job, the same in a JSON response and in a stream's last chunk."""
    return protocol.usage(sum(s.num_prompt_tokens for s in streams), sum(s.num_tokens for s in streams))


async def _on_disconnect(request: Request, callback) -> None:
    """Call ``callback`` when the client goes away (the body is already read: the next message is a
    disconnect, which the server also sends once the response is complete; the caller cancels us first)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            callback()
            return


class _RequestCounter:
    """Pure ASGI middleware counting responses by endpoint and status (BaseHTTPMiddleware would break
    disconnect detection and streaming)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            self.metrics.observe_request(path if path in _ENDPOINTS else "other", status["code"])


def create_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The app (rank 0). The caller owns the engine: it starts it before and shuts it down after serving."""
    server = _Server(engine, config)
    app = FastAPI(title="epserve", version=S.version(), description=S.DESCRIPTION, docs_url="/docs",
                  redoc_url=None)
    app.state.server = server
    route = app.add_api_route
    route("/v1/completions", server.completions, methods=["POST"], summary="Text completion",
          responses=S.generation_responses(S.CompletionResponse, S.CompletionChunk),
          openapi_extra=S.SECURED | S.request_body(S.inline_schema(CompletionRequest), S.COMPLETION_EXAMPLE))
    route("/v1/chat/completions", server.chat_completions, methods=["POST"], summary="Chat completion",
          responses=S.generation_responses(S.ChatCompletionResponse, S.ChatCompletionChunk),
          openapi_extra=S.SECURED | S.request_body(S.inline_schema(ChatCompletionRequest), S.CHAT_EXAMPLE))
    route("/v1/models", server.models, methods=["GET"], summary="The served model names",
          responses={200: {"model": S.ModelList}, **S.error_responses(401)}, openapi_extra=S.SECURED)
    route("/health", server.health, methods=["GET"], summary="Liveness of the engine",
          responses={200: {"model": S.HealthOk}, 503: {"model": S.HealthUnavailable,
                                                       "description": "The engine cannot serve"}})
    route("/metrics", server.metrics_endpoint, methods=["GET"], summary="Prometheus metrics",
          response_class=PlainTextResponse,
          responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                           "description": "Prometheus text format"}})
    route("/placement", server.placement, methods=["GET"], summary="The placement in use and live traffic",
          responses={200: {"model": S.PlacementView}})
    route("/placement", server.placement_post, methods=["POST"], summary="Swap in a placement while serving",
          status_code=202,
          responses={202: {"model": S.PlacementAccepted, "description": "Accepted: GET /placement follows it"},
                     **S.error_responses(400, 401, 403, 408, 409, 413, 503)},
          openapi_extra=S.SECURED | S.request_body(
              {"oneOf": [S.inline_schema(S.PlacementDocument), S.inline_schema(S.SolveRequest)]}, {"solve": True}))
    for path, get in (("/v1/models", server.models), ("/health", server.health),
                      ("/metrics", server.metrics_endpoint), ("/placement", server.placement)):
        route(path, _head(get), methods=["HEAD"], include_in_schema=False)
    S.complete_openapi(app)

    @app.exception_handler(errors.APIError)
    async def _api_error(request: Request, exc: errors.APIError) -> Response:
        return _bodyless(exc.response()) if request.method == "HEAD" else exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc) -> Response:
        return errors.APIError(404, f"No route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc) -> Response:
        return errors.APIError(405, f"Method {request.method} is not allowed on {request.url.path}",
                               code="method_not_allowed").response()

    app.add_middleware(_RequestCounter, metrics=server.metrics)
    return app


def _bodyless(response: Response) -> Response:
    """``response`` for a HEAD request: the same status and headers (Content-Length of the GET), no body."""
    out = Response(status_code=response.status_code)
    out.raw_headers = list(response.raw_headers)
    return out


def _head(get):
    """HEAD for a GET endpoint: the GET's status and headers, no body."""
    async def head(request: Request) -> Response:
        return _bodyless(await get(request))
    return head
