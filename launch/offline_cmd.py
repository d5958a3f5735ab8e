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
def run_batch(args) -> int:
    raise InputError("epserve batch is not available yet (it needs the engine and the server)")
