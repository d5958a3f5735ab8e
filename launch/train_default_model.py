"""Train the default model that ships in epserve/assets/default_model (``python -m launch.train_default_model``).

    prepare:  stdlib corpus --> BPE tokenizer (out/) --> token streams (work-dir/)
    train:    tiny Mixtral, CPU float32, resumable checkpoints (work-dir/ckpt/), bounded by --max-minutes
    export:   best checkpoint --> out/: config.json, model.safetensors (hub per-expert names),
              generation_config.json
    evaluate: held-out loss, greedy samples, expert load, inter-layer affinity --> out/training_report.json,
              routing trace --> --trace-out

``--phase all`` (default) runs the four in order and skips a finished prepare/train (so an interrupted run is
resumed by running the same command again). Run it under ``nice -n 10``: it uses --threads CPU threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from placement.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "epserve" / "assets" / "default_model"
DEFAULT_WORK = REPO_ROOT / "build" / "default_model"
DEFAULT_TRACE = REPO_ROOT / "bench" / "results" / "default_model_trace.npz"
PHASES = ("prepare", "train", "export", "evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.train_default_model", description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("all",) + PHASES, default="all")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (default: the shipped one)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="token streams and checkpoints")
    p.add_argument("--trace-out", type=Path, default=DEFAULT_TRACE, help="routing trace of held-out text (.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=90.0, help="stop training after this much wall time")
    p.add_argument("--threads", type=int, default=1,
                   help="1 is fastest when the cores are shared (2 threads ran 3-5x slower under load)")
    p.add_argument("--trace-windows", type=int, default=64, help="held-out 512-token windows in the trace")
    args = p.parse_args(argv)
    for name, low in (("steps", 1), ("threads", 1), ("trace_windows", 1), ("vocab_size", 512)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.max_minutes > 0:
        p.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    return args


def log_to(path: Path):
    def log(record: dict) -> None:
        line = json.dumps({"time": time.strftime("%H:%M:%S"), **record})
        print(line, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")
    return log


def phase_prepare(args, log) -> None:
    from epserve.training.corpus import load_stdlib_corpus
    from epserve.training.data import build_streams, save_streams
    from epserve.training.tokenizer import save_tokenizer, train_tokenizer

    corpus = load_stdlib_corpus()
    log({"event": "corpus", **{k: v for k, v in corpus.describe().items() if k != "skipped_not_utf8"}})
    tok = train_tokenizer((f.text for f in corpus.train), vocab_size=args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, args.out, max_length=512)
    train, held_out, stats = build_streams(corpus, tok, seed=args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    save_streams(args.work_dir, train, held_out, {"corpus": corpus.describe(), "tokens": stats,
                                                  "vocab_size": tok.get_vocab_size()})
    log({"event": "prepared", **stats})


def _setup(args):
    """(model, train config, model shape, token streams info) built the same way by every phase."""
    from tokenizers import Tokenizer

    from epserve.training.data import load_streams
    from epserve.training.tokenizer import BOS, stop_token_ids
    from epserve.training.trainer import ModelShape, TrainConfig, build_model

    train, held_out, info = load_streams(args.work_dir)
    tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    shape = ModelShape(vocab_size=tok.get_vocab_size())
    cfg = TrainConfig(seed=args.seed, steps=args.steps, threads=args.threads, warmup_steps=min(150, args.steps // 10))
    model = build_model(shape, bos_id=tok.token_to_id(BOS), eos_ids=stop_token_ids(tok),
                        aux_loss_coef=cfg.aux_loss_coef, seed=args.seed)
    return model, cfg, shape, tok, train, held_out, info


def eval_windows(held_out: np.ndarray, cfg) -> np.ndarray:
    """The held-out windows scored during training: evenly spread over the held-out files."""
    from epserve.training.trainer import windows_of

    all_NS = windows_of(held_out, cfg.window)
    return all_NS[np.linspace(0, len(all_NS) - 1, cfg.eval_windows).round().astype(int)]


def phase_train(args, log) -> None:
    import torch

    from epserve.training.trainer import train, windows_of

    model, cfg, shape, _, train_stream, held_out, _ = _setup(args)
    n_params = sum(p.numel() for p in model.parameters())
    log({"event": "model", "params": n_params, "shape": asdict(shape), "train": asdict(cfg),
         "torch": torch.__version__, "train_windows": len(train_stream) // cfg.window})
    ckpt = args.work_dir / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)  # parents: the work dir too
    (args.work_dir / "train_argv.json").write_text(json.dumps(sys.argv[1:]) + "\n")
    state = train(model, cfg, train_NS=windows_of(train_stream, cfg.window), eval_NS=eval_windows(held_out, cfg),
                  ckpt_dir=ckpt, max_seconds=args.max_minutes * 60, log=log)
    log({"event": "trained", "step": state["step"], "best_step": state["best_step"],
         "best_eval": state["best_eval"], "train_seconds": round(state["train_seconds"])})


def _train_state(args) -> dict:
    return json.loads((args.work_dir / "ckpt" / "state.json").read_text())


def phase_export(args, log) -> None:
    import torch
    from transformers import GenerationConfig

    from epserve.training.tokenizer import stop_token_ids

    model, cfg, shape, tok, *_ = _setup(args)
    state = _train_state(args)
    model.load_state_dict(torch.load(args.work_dir / "ckpt" / "best_model.pt", weights_only=True))
    model.config._experts_implementation = "eager"
    stops = stop_token_ids(tok)
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=stops,
                                               pad_token_id=stops[0], do_sample=False, max_new_tokens=128)
    model.save_pretrained(args.out, safe_serialization=True)
    # transformers 5 writes rope_theta only inside rope_parameters; older readers look for it at the top.
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", shape.rope_theta)
    config["eos_token_id"] = stops  # both stop tokens, as in generation_config.json
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log({"event": "exported", "out": str(args.out), "step": state["best_step"],
         "files": {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}})


def phase_evaluate(args, log) -> None:
    import torch
    import transformers

    from epserve.training.card import model_card
    from epserve.training.evaluate import evaluate_export

    model, cfg, shape, _, _, held_out, info = _setup(args)
    state = _train_state(args)
    report = evaluate_export(args.out, held_out, window=cfg.window, trace_windows=args.trace_windows,
                             trace_out=args.trace_out,
                             chars_per_token=info["tokens"]["held_out_chars_per_token"], init_model=model,
                             log=log)
    argv_path = args.work_dir / "train_argv.json"
    train_argv = [a for a in json.loads(argv_path.read_text()) if a not in ("--phase", "train")] \
        if argv_path.is_file() else []
    report = {"command": " ".join(["nice -n 10 python -m launch.train_default_model", *train_argv]),
              "corpus": info["corpus"], "tokens": info["tokens"], "shape": asdict(shape), "train": asdict(cfg),
              "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
              "transformers": transformers.__version__,
              "training": {k: state[k] for k in ("step", "best_step", "best_eval", "train_seconds", "history")},
              **report}
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(report))
    log({"event": "evaluated", "held_out_loss": report["held_out"]["loss_nats_per_token"]})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = log_to(args.work_dir / "log.jsonl")
    phases = PHASES if args.phase == "all" else (args.phase,)
    try:
        _require_inputs(args, phases[0])  # before anything is written
        run_phases(args, phases, log)
    except InputError as exc:
        print(f"train_default_model: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _require_inputs(args, phase: str) -> None:
    """What a phase reads that an earlier phase writes; raises InputError naming the first missing file."""
    needs = {"prepare": [],
             "train": [args.work_dir / "train_tokens.npy", args.work_dir / "held_out_tokens.npy",
                       args.work_dir / "corpus.json", args.out / "tokenizer.json"]}
    needs["export"] = needs["train"] + [args.work_dir / "ckpt" / "state.json", args.work_dir / "ckpt" / "best_model.pt"]
    needs["evaluate"] = needs["export"] + [args.out / "config.json", args.out / "model.safetensors"]
    for path in needs[phase]:
        if not path.is_file():
            raise InputError(f"phase '{phase}' needs {path}, which is missing: run the earlier phases first "
                             f"(or --phase all)")


def run_phases(args, phases: tuple[str, ...], log) -> None:
    for phase in phases:
        done = {"prepare": (args.work_dir / "train_tokens.npy").is_file() and (args.out / "tokenizer.json").is_file(),
                "train": (args.work_dir / "ckpt" / "state.json").is_file()}.get(phase, False)
        if args.phase == "all" and done:
            log({"event": "skip", "phase": phase, "reason": "already done in --work-dir"})
            continue
        log({"event": "phase", "phase": phase})
        globals()[f"phase_{phase}"](args, log)


if __name__ == "__main__":
    sys.exit(main())
