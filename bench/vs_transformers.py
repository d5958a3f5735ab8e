"""One rank against the simplest peer a user has: transformers' own ``generate`` on the same checkpoint.

    the default model's tokenizer (epserve.server.text) --> 32 fixed code prompts as token ids (the same for both)
    transformers: AutoModelForCausalLM (float32, one thread), left-padded static batch, greedy, no EOS stop
        --> generate(max_new_tokens=32): one warm-up, then --repeats timed runs (model load excluded)
    epserve: the real ``epserve serve`` at world size 1 (torchrun, OMP_NUM_THREADS=1, --max-running 32), HTTP
        included: one warm-up request, then per repeat
        (a) ONE /v1/completions request whose prompt is the list of 32 token-id prompts (max_tokens 32,
            temperature 0, ignore_eos), and
        (b) 32 concurrent /v1/completions requests (one prompt each, asyncio client on one connection pool)
    epserve in-process: build_runner (one rank, no server) + engine.generate on the same batch: what the step
        loop costs without the engine thread, HTTP, JSON and detokenising
    --> output tokens/s (medians over the repeats), ratios against transformers, and how many of the prompts
        get the same greedy text from both sides (epserve's text against transformers' ids decoded by the
        same tokenizer) --> bench/results/local/vs_transformers.json + .md

Run:  nice -n 10 python bench/vs_transformers.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT, OUT_HELP  # noqa: E402  (--out default: untracked)

import httpx  # noqa: E402
import torch  # noqa: E402

from comm.spawn import free_port  # noqa: E402
from launch.serve_cmd import default_model_dir  # noqa: E402
from launch.serve_process import ServeProcess  # noqa: E402

PROMPTS = [   # Python code: what the default model was trained on (32 prompts, 2-16 tokens each)
    "def ", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):",
    "def fibonacci(n):\n", "with open(path) as f:\n", "    return sorted(", "if __name__ == \"__main__\":\n",
    "x = [i * i for i in", "try:\n    import numpy as np\nexcept", "def __init__(self, name):\n        self.",
    "print(\"hello", "def read_config(path):\n    ", "while True:\n    line = ", "return {k: v for k, v in",
    "raise ValueError(", "import sys\nimport json\n", "def main():\n    args = ", "class Node:\n",
    "for key, value in d.items():", "assert len(", "lambda x:", "def __repr__(self):\n        return",
    "self.items = []\n", "from collections import", "if x is None:\n    ", "def add(a, b):\n    return",
    "result = []\nfor", "with torch.no_grad():\n", "def test_", "elif ", "# compute the",
]


def tree_description() -> str:
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("+uncommitted" if dirty else "")


def load_prompts(model_dir: Path, n: int) -> list[list[int]]:
    from epserve.server.text import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    return [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]


# ---- transformers ---------------------------------------------------------------------------------------------
def run_transformers(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Static left-padded batch, greedy, EOS does not stop (the same as ignore_eos), one thread."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids_BS = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask_BS = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids_BS[b, width - len(p):] = torch.tensor(p)
        mask_BS[b, width - len(p):] = 1

    def once(n: int) -> tuple[float, torch.Tensor]:
        gen = copy.deepcopy(model.generation_config)
        # EOS must not stop: None falls back to config.json's eos ids, so name an id no logit can be
        gen.eos_token_id, gen.pad_token_id = [model.config.vocab_size], pad
        gen.do_sample, gen.max_new_tokens = False, n
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids_BS, attention_mask=mask_BS, generation_config=gen)
        return time.perf_counter() - t0, out[:, width:]

    once(4)   # warm-up
    walls, new_BN = [], None
    for _ in range(repeats):
        wall, new_BN = once(new_tokens)
        walls.append(wall)
    tokens = int(new_BN.numel())
    return {"wall_s": walls, "output_tokens": tokens, "output_tokens_per_s": tokens / statistics.median(walls),
            "token_ids": new_BN.tolist(), "transformers_version": __import__("transformers").__version__}


# ---- epserve, in-process runner (no server) --------------------------------------------------------------------
def run_inprocess(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int,
                  profile_to: Path | None = None) -> dict:
    from comm.strategy import Strategy
    from comm.topology import EPTopology
    from epserve.engine.builder import build_runner
    from epserve.engine.generate import generate
    torch.set_num_threads(1)
    runner = build_runner(model_dir, EPTopology.single(), strategy=Strategy.TWO_A2A)
    generate(runner, prompts, 4)   # warm-up
    walls, tokens = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        if profile_to is not None and r == 0:
            import cProfile
            with cProfile.Profile() as prof:
                out = generate(runner, prompts, new_tokens, seq_id_base=1000 * (r + 1))
            prof.dump_stats(str(profile_to))
        else:
            out = generate(runner, prompts, new_tokens, seq_id_base=1000 * (r + 1))
        walls.append(time.perf_counter() - t0)
        tokens = out.tokens
    n = sum(len(t) for t in tokens)
    return {"wall_s": walls, "output_tokens": n, "output_tokens_per_s": n / statistics.median(walls),
            "token_ids": tokens}


# ---- epserve serve ------------------------------------------------------------------------------------------
def _body(prompt, max_tokens: int) -> dict:
    return {"model": "default_model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def batched_request(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=_body(prompts, max_tokens), timeout=120)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    doc = r.json()
    texts = [c["text"] for c in sorted(doc["choices"], key=lambda c: c["index"])]
    return {"wall_s": wall, "output_tokens": doc["usage"]["completion_tokens"], "texts": texts}


async def _concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await client.get("/health")
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(client.post("/v1/completions", json=_body(p, max_tokens))
                                         for p in prompts))
        wall = time.perf_counter() - t0
    for a in answers:
        a.raise_for_status()
    docs = [a.json() for a in answers]
    return {"wall_s": wall, "output_tokens": sum(d["usage"]["completion_tokens"] for d in docs),
            "texts": [d["choices"][0]["text"] for d in docs]}


def concurrent_requests(url: str, prompts: list[list[int]], max_tokens: int) -> dict:
    return asyncio.run(_concurrent(url, prompts, max_tokens))


def run_server(prompts: list[list[int]], new_tokens: int, repeats: int, work: Path, ready_timeout: float) -> dict:
    argv = ["--nproc-per-node", "1", "--max-running", str(len(prompts))]
    server = ServeProcess(argv, port=free_port(), log_path=work / "serve.log")
    try:
        t0 = time.perf_counter()
        server.wait_ready(ready_timeout)
        startup = time.perf_counter() - t0
        batched_request(server.url, prompts[:2], 4)   # warm-up
        batched, concurrent = [], []
        for _ in range(repeats):
            batched.append(batched_request(server.url, prompts, new_tokens))
            concurrent.append(concurrent_requests(server.url, prompts, new_tokens))
    finally:
        code = server.stop()
    out = {"startup_s": startup, "exit_status": code}
    for name, runs in (("batched", batched), ("concurrent", concurrent)):
        walls = [r["wall_s"] for r in runs]
        out[name] = {"wall_s": walls, "output_tokens": runs[-1]["output_tokens"],
                     "output_tokens_per_s": runs[-1]["output_tokens"] / statistics.median(walls),
                     "texts": runs[-1]["texts"], "same_texts_every_repeat": all(r["texts"] == runs[0]["texts"]
                                                                                for r in runs)}
    return out


# ---- profile of the serve path (in this process: engine thread + uvicorn thread, client in a child) ---------
_CLIENT = """
import json, sys, time, httpx
url, body, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
httpx.post(url + "/v1/completions", json=dict(body, prompt=body["prompt"][:2], max_tokens=4), timeout=60)
walls = []
for _ in range(n):
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    walls.append(time.perf_counter() - t0)
    r.raise_for_status()
print(json.dumps(walls))
"""


def profile_server(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int, out: Path) -> dict:
    """The serve path of world size 1 run in this process with cProfile on the engine thread and on the
    server's event-loop thread; the client (one batched request per repeat) runs in a child process so it does
    not share this process's GIL. Writes ``out``.engine.prof and ``out``.server.prof."""
    import cProfile
    import subprocess
    import threading

    import uvicorn

    from comm.topology import EPTopology
    from comm.strategy import Strategy
    from epserve.engine.builder import build_runner
    from epserve.engine.control import ControlChannel
    from epserve.engine.engine import Engine, EngineConfig, attach_live_stats
    from epserve.server.app import ServerConfig, create_app

    torch.set_num_threads(1)
    runner = build_runner(model_dir, EPTopology.single(), strategy=Strategy.TWO_A2A)
    attach_live_stats(runner)
    engine = Engine(runner, EngineConfig.from_model_dir(model_dir, max_running_seqs=len(prompts)),
                    placement_document=runner.placement.to_dict(), on_fatal=None,
                    channel=ControlChannel(runner.topology, counters=runner.counters))
    profs = {"engine": cProfile.Profile(), "server": cProfile.Profile()}

    def profiled(name, fn):
        def run():
            profs[name].enable()
            try:
                fn()
            finally:
                profs[name].disable()
        return run

    engine._thread = threading.Thread(target=profiled("engine", engine._run), daemon=True)   # noqa: SLF001
    engine.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(model_dir=model_dir)), host="127.0.0.1",
                                          port=port, log_level="warning"))
    thread = threading.Thread(target=profiled("server", server.run), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not server.started:
        time.sleep(0.05)
    body = json.dumps(_body(prompts, new_tokens))
    try:
        child = subprocess.run([sys.executable, "-c", _CLIENT, url, body, str(repeats)], capture_output=True,
                               text=True, timeout=300)
        if child.returncode != 0:
            raise RuntimeError(f"client failed:\n{child.stderr[-3000:]}")
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()
    for name, prof in profs.items():
        prof.dump_stats(f"{out}.{name}.prof")
    walls = json.loads(child.stdout)
    n = len(prompts) * new_tokens
    return {"wall_s": walls, "output_tokens_per_s": n / statistics.median(walls), "steps": engine._steps}


# ---- report -------------------------------------------------------------------------------------------------
def agreement(model_dir: Path, hf_ids: list[list[int]], texts: list[str]) -> int:
    """Prompts whose epserve text equals transformers' ids decoded by the same tokenizer (as the server does)."""
    from epserve.server.text import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    return sum(tok.decode(ids) == text for ids, text in zip(hf_ids, texts))


def reading(result: dict) -> str:
    """What the server adds over the in-process step loop, per output token (median walls)."""
    inproc = next((r for r in result["rows"] if "in-process" in r["system"]), None)
    hf = result["rows"][0]
    parts = [f"Per output token: transformers {1e3 * statistics.median(hf['wall_s']) / hf['output_tokens']:.3f} ms"]
    if inproc is not None:
        per = 1e3 * statistics.median(inproc["wall_s"]) / inproc["output_tokens"]
        parts.append(f"epserve's step loop alone {per:.3f} ms")
        for r in result["rows"]:
            if r["system"].startswith("epserve serve"):
                extra = 1e3 * statistics.median(r["wall_s"]) / r["output_tokens"] - per
                parts.append(f"the server ({r['system'].rsplit(', ', 1)[-1]}) adds {extra:.3f} ms")
    return "; ".join(parts) + f". Measured tree: {result['setup'].get('tree', '?')}."


def write_report(out: Path, result: dict) -> None:
    (out / "vs_transformers.json").write_text(json.dumps(result, indent=1) + "\n")
    s, rows = result["setup"], result["rows"]
    lines = ["# epserve (one rank) against transformers' generate, default model", "", s["summary"], "",
             "| system | what is timed | output tokens | wall s (each repeat) | output tok/s (median wall) | "
             "vs transformers | output tok/s (best wall) | same greedy text as transformers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        walls = ", ".join(f"{w:.3f}" for w in r["wall_s"])
        same = "-" if r["agree"] is None else f"{r['agree']}/{s['prompts']}"
        lines.append(f"| {r['system']} | {r['timed']} | {r['output_tokens']} | {walls} | "
                     f"{r['output_tokens_per_s']:.0f} | {r['vs_transformers']:.2f}x | "
                     f"{r['output_tokens'] / min(r['wall_s']):.0f} | {same} |")
    lines += ["", f"Target: epserve serve >= 1.0x transformers. {reading(result)}", ""]
    (out / "vs_transformers.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (medians reported)")
    p.add_argument("--quick", action="store_true", help="8 prompts x 8 tokens, one repeat (a smoke run)")
    p.add_argument("--no-server", action="store_true", help="skip epserve serve (transformers + in-process only)")
    p.add_argument("--profile", help="write a cProfile of the first in-process run to this file")
    p.add_argument("--profile-server", help="profile the serve path in this process instead (writes "
                                             "PREFIX.engine.prof and PREFIX.server.prof) and stop")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--out", default=str(LOCAL_OUT),
                   help=OUT_HELP)
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON in --out")
    args = p.parse_args(argv)
    if args.render_only:
        write_report(Path(args.out), json.loads((Path(args.out) / "vs_transformers.json").read_text()))
        print((Path(args.out) / "vs_transformers.md").read_text())
        return 0
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = 8, 8, 1
    model_dir = default_model_dir()
    prompts = load_prompts(model_dir, args.prompts)
    t_start = time.perf_counter()
    if args.profile_server:
        res = profile_server(model_dir, prompts, args.new_tokens, args.repeats, Path(args.profile_server))
        print(json.dumps(res))
        return 0
    hf = run_transformers(model_dir, prompts, args.new_tokens, args.repeats)
    print(f"[vs_transformers] transformers: {hf['output_tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    inproc = run_inprocess(model_dir, prompts, args.new_tokens, args.repeats,
                           Path(args.profile) if args.profile else None)
    print(f"[vs_transformers] epserve in-process: {inproc['output_tokens_per_s']:.0f} tok/s", file=sys.stderr,
          flush=True)
    served = None
    if not args.no_server:
        with tempfile.TemporaryDirectory(prefix="vs-transformers-") as tmp:
            served = run_server(prompts, args.new_tokens, args.repeats, Path(tmp), args.ready_timeout)
    base = hf["output_tokens_per_s"]
    ids_agree = sum(a == b for a, b in zip(hf["token_ids"], inproc["token_ids"]))
    rows = [{"system": f"transformers {hf['transformers_version']} generate", "timed": "generate() only",
             "output_tokens": hf["output_tokens"], "wall_s": hf["wall_s"], "output_tokens_per_s": base,
             "vs_transformers": 1.0, "agree": None},
            {"system": "epserve runner in-process (engine.generate, 1 rank)", "timed": "step loop, no server",
             "output_tokens": inproc["output_tokens"], "wall_s": inproc["wall_s"],
             "output_tokens_per_s": inproc["output_tokens_per_s"], "vs_transformers": inproc["output_tokens_per_s"] / base,
             "agree": ids_agree}]
    if served is not None:
        for key, what in (("batched", f"one HTTP request, a list of {args.prompts} prompts"),
                          ("concurrent", f"{args.prompts} concurrent HTTP requests")):
            r = served[key]
            rows.append({"system": f"epserve serve (1 rank), {key}", "timed": f"{what}, HTTP included",
                         "output_tokens": r["output_tokens"], "wall_s": r["wall_s"],
                         "output_tokens_per_s": r["output_tokens_per_s"],
                         "vs_transformers": r["output_tokens_per_s"] / base,
                         "agree": agreement(model_dir, hf["token_ids"], r["texts"]),
                         "same_texts_every_repeat": r["same_texts_every_repeat"]})
    summary = (f"One 2-core CPU machine shared with other work; the bundled default model (tiny Mixtral: 6 MoE "
               f"layers, 16 experts, top-2, hidden 128, vocab 4096, float32). The same {args.prompts} code prompts "
               f"as token ids (the model's tokenizer.json; {min(map(len, prompts))}-{max(map(len, prompts))} "
               f"tokens), {args.new_tokens} new tokens each, greedy, EOS does not stop either side (transformers: "
               f"generation_config.eos_token_id = [vocab_size], an id it cannot produce (None falls back to config.json's EOS ids and stops); epserve: ignore_eos). transformers: static left-padded batch, "
               f"torch.set_num_threads(1), model load and one warm-up excluded. epserve serve: world size 1 under "
               f"torchrun (OMP_NUM_THREADS=1, --max-running {args.prompts}), one warm-up request; the timed wall "
               f"includes HTTP, JSON, tokenizer-side detokenising and the client (httpx, in this process, on the "
               f"same 2 cores). In-process: build_runner + engine.generate, one thread, no server. "
               f"{args.repeats} repeat(s) per row; tok/s from the median wall. Agreement: epserve's text against "
               f"transformers' ids decoded by the same tokenizer (in-process row: token ids compared).")
    result = {"setup": {"prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
                        "prompt_texts": [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)],
                        "prompt_ids": prompts, "summary": summary, "torch": torch.__version__,
                        "tree": tree_description(),
                        "run_s": time.perf_counter() - t_start},
              "rows": rows, "server": None if served is None else {k: served[k] for k in ("startup_s", "exit_status")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    print((out / "vs_transformers.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
