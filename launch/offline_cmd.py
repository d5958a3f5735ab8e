"""``epserve trace`` and ``epserve batch``: the model in this process (world size 1, no torchrun).

    trace: prompts (text lines or JSONL {"prompt": ...}) --tokenizer--> ids --generate (batches of
           --batch-size, greedy)--> RoutingRecorder (first --record-tokens tokens) --> trace.npz with vocabulary
           ids (input to `epserve place`)
    batch: OpenAI batch-input JSONL --> each line through the real app in-process (engine + create_app +
           httpx.ASGITransport: the server's own validation) --> one output line per input line

Every input is read and checked before anything is written; bad input is an InputError (exit status 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from placement.errors import InputError

from launch.serve_cmd import default_model_dir

KV_BLOCK = 16   # tokens per KV cache block


def register(subparsers) -> None:
    trace = subparsers.add_parser("trace", help="record a routing trace of the model generating from prompts",
                                  description="Generate greedily from prompts in this process and write the "
                                              "routing of every token (with vocabulary ids) as a trace .npz.")
    trace.add_argument("--model", help="checkpoint directory (default: the bundled default model)")
    trace.add_argument("--prompts", required=True, help="text file: one prompt per line, or JSONL {\"prompt\": ...}")
    trace.add_argument("-o", "--output", required=True, help="trace .npz to write")
    trace.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    trace.add_argument("--record-tokens", type=int, default=65536, help="tokens to record at most")
    trace.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    trace.set_defaults(func=run_trace)

    batch = subparsers.add_parser("batch", help="run an OpenAI batch-input JSONL file through the server",
                                  description="Run every line of an OpenAI batch-input file through the real "
                                              "server app in this process; write one output line per input line.")
    batch.add_argument("--model", help="checkpoint directory (default: the bundled default model)")
    batch.add_argument("input", help="batch input .jsonl")
    batch.add_argument("output", help="batch output .jsonl to write")
    batch.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    batch.set_defaults(func=run_batch)


# ---- trace --------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one per non-empty line) or a JSONL file (one {"prompt": str} per line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None
    jsonl = path.suffix == ".jsonl" or (bool(lines) and lines[0].lstrip().startswith("{"))
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise InputError(f"{path}:{n}: expected an object with a non-empty string 'prompt'")
        prompts.append(obj["prompt"])
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def run_trace(args) -> int:
    for flag, value in (("--max-tokens", args.max_tokens), ("--record-tokens", args.record_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    out = Path(args.output)
    if out.suffix != ".npz":
        raise InputError(f"output must be a .npz file, got {out}")
    if not out.resolve().parent.is_dir():
        raise InputError(f"output directory does not exist: {out.parent}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    from epserve.model.loader import check_checkpoint
    config = check_checkpoint(model_dir)
    prompts = read_prompts(args.prompts)
    ids = encode_prompts(model_dir, prompts)
    too_long = [i for i, p in enumerate(ids) if len(p) + args.max_tokens > config.max_position_embeddings]
    if too_long:
        raise InputError(f"prompt {too_long[0] + 1}: {len(ids[too_long[0]])} tokens + --max-tokens "
                         f"{args.max_tokens} exceed the model's context ({config.max_position_embeddings})")
    trace, generated = _record(model_dir, config, ids, args)
    print(f"wrote {out}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers x top-{trace.top_k} "
          f"({len(ids)} prompts, {generated} tokens generated)")
    return 0


def encode_prompts(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    """Token ids as the server makes them for /v1/completions (its own Tokenizer)."""
    from epserve.server.text import Tokenizer
    if not (model_dir / "tokenizer.json").is_file():
        raise InputError(f"{model_dir}: no tokenizer.json")
    tok = Tokenizer.from_dir(model_dir)
    ids = [tok.encode(p) for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise InputError(f"prompt {empty[0] + 1} encodes to no tokens")
    return ids


def _record(model_dir: Path, config, ids: list[list[int]], args):
    from tqdm import tqdm

    from comm.strategy import Strategy
    from comm.topology import EPTopology
    from epserve.engine.builder import build_runner
    from epserve.engine.generate import generate

    blocks_per_seq = -(-max(len(p) + args.max_tokens for p in ids) // KV_BLOCK)
    runner = build_runner(model_dir, EPTopology.single(), strategy=Strategy.TWO_A2A,
                          kv_cache_tokens=blocks_per_seq * KV_BLOCK * args.batch_size, kv_block_size=KV_BLOCK,
                          record_tokens=args.record_tokens)
    generated = 0
    with tqdm(total=len(ids), unit="prompt", desc="trace") as bar:
        for start in range(0, len(ids), args.batch_size):
            if runner.recorder.full:
                break
            chunk = ids[start:start + args.batch_size]
            result = generate(runner, chunk, args.max_tokens, eos_token_ids=config.eos_token_ids,
                              seq_id_base=start)
            generated += sum(len(t) for t in result.tokens)
            bar.update(len(chunk))
    return runner.recorder.save(runner.coll, args.output), generated


# ---- batch --------------------------------------------------------------------------------------------------
BATCH_URLS = ("/v1/completions", "/v1/chat/completions")


def run_batch(args) -> int:
    if args.concurrency < 1:
        raise InputError(f"--concurrency must be >= 1, got {args.concurrency}")
    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise InputError(f"batch input not found: {src}")
    if not out.resolve().parent.is_dir():
        raise InputError(f"output directory does not exist: {out.parent}")
    if out.resolve() == src.resolve():
        raise InputError("the output file must not be the input file")
    model_dir = Path(args.model) if args.model else default_model_dir()
    from epserve.model.loader import check_checkpoint
    check_checkpoint(model_dir)
    try:
        lines = [line for line in src.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise InputError(f"{src}: not UTF-8 text ({exc})") from None
    if not lines:
        raise InputError(f"{src}: no requests")
    parsed = parse_batch_lines(lines)
    results = _run_batch_requests(model_dir, parsed, args.concurrency)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    tmp.replace(out)
    ok = sum(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    print(f"wrote {out}: {len(results)} lines, {ok} answered, {len(results) - ok} errors")
    return 0


def parse_batch_lines(lines: list[str]) -> list[dict]:
    """Each line -> {"line", "custom_id", "url", "body"} or {"line", "custom_id", "error"} (message)."""
    seen: set[str] = set()
    out = []
    for n, line in enumerate(lines, 1):
        item, problem = {"line": n, "custom_id": None}, None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj, problem = None, f"line {n}: not valid JSON ({exc})"
        if obj is not None:
            if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
                item["custom_id"] = obj["custom_id"]
            problem = _batch_line_problem(n, obj, seen)
        if problem is None:
            seen.add(obj["custom_id"])
            item.update(url=obj["url"], body=obj["body"])
        else:
            item["error"] = problem
        out.append(item)
    return out


def _batch_line_problem(n: int, obj, seen: set[str]) -> str | None:
    if not isinstance(obj, dict):
        return f"line {n}: expected a JSON object"
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        return f"line {n}: unknown field '{extra[0]}'"
    if not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        return f"line {n}: 'custom_id' must be a non-empty string"
    if obj["custom_id"] in seen:
        return f"line {n}: custom_id '{obj['custom_id']}' appears on an earlier line"
    if obj.get("method") != "POST":
        return f"line {n}: 'method' must be \"POST\", got {obj.get('method')!r}"
    if obj.get("url") not in BATCH_URLS:
        return f"line {n}: 'url' must be one of {', '.join(BATCH_URLS)}, got {obj.get('url')!r}"
    if not isinstance(obj.get("body"), dict):
        return f"line {n}: 'body' must be a JSON object"
    if obj["body"].get("stream"):
        return f"line {n}: 'body.stream' is not supported in a batch"
    return None


def _run_batch_requests(model_dir: Path, parsed: list[dict], concurrency: int) -> list[dict]:
    """Every well-formed line through the real app (world size 1 engine, in this process)."""
    import asyncio

    import httpx
    from tqdm import tqdm

    from comm.strategy import Strategy
    from comm.topology import EPTopology
    from epserve.engine.builder import build_runner
    from epserve.engine.engine import EngineConfig, start_engine
    from epserve.server.app import ServerConfig, create_app

    runner = build_runner(model_dir, EPTopology.single(), strategy=Strategy.TWO_A2A)
    engine = start_engine(runner, EngineConfig.from_model_dir(model_dir))
    app = create_app(engine, ServerConfig(model_dir=model_dir))

    async def main() -> list[dict]:
        gate = asyncio.Semaphore(concurrency)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://epserve-batch", timeout=None) as client:
            with tqdm(total=len(parsed), unit="request", desc="batch") as bar:
                async def one(item: dict) -> dict:
                    async with gate:
                        result = await _batch_one(client, item)
                    bar.update(1)
                    return result

                return await asyncio.gather(*(one(item) for item in parsed))

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


async def _batch_one(client, item: dict) -> dict:
    rid = f"batch_req_{item['line']}"
    if "error" in item:
        return {"id": rid, "custom_id": item["custom_id"], "response": None,
                "error": {"code": "invalid_request", "message": item["error"]}}
    r = await client.post(item["url"], json=item["body"])
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
    request_id = body.get("id") if isinstance(body, dict) and "id" in body else f"req_{item['line']}"
    return {"id": rid, "custom_id": item["custom_id"],
            "response": {"status_code": r.status_code, "request_id": request_id, "body": body}, "error": None}
