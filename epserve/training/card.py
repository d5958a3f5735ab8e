"""MODEL_CARD.md for the shipped default model, written from training_report.json (no hand-copied numbers)."""

from __future__ import annotations


def _fmt_rate(rates: dict) -> str:
    return ", ".join(f"{g} GPUs {float(r):.3f}" for g, r in sorted(rates.items(), key=lambda kv: int(kv[0])))


def model_card(report: dict) -> str:
    c, tok, shape, tr = report["corpus"], report["tokens"], report["shape"], report["training"]
    ho, aff, load, pl = report["held_out"], report["affinity"], report["expert_load"], report["placement"]
    ctl = report["init_control"]
    steps_line = (f"{tr['step']} of {report['train']['steps']} planned steps"
                  if tr["step"] < report["train"]["steps"] else f"{tr['step']} steps")
    lines = [
        "# epserve default model",
        "",
        "A tiny Mixtral-format Mixture-of-Experts language model trained from scratch on the Python standard "
        "library, so that `epserve serve` works offline with real (not random) weights and real inter-layer "
        "expert affinity. It writes Python-looking code; it is not a useful assistant.",
        "",
        "## How it was trained",
        "",
        f"- Command: `{report['command']}` (wall time {tr['train_seconds'] / 60:.0f} min of training, "
        f"{steps_line}, best held-out checkpoint at step {tr['best_step']}; torch {report['torch']}, "
        f"transformers {report['transformers']}, CPU float32, 1 thread).",
        f"- Corpus: every `*.py` file of the Python {c['python_version']} standard library "
        f"(site-packages excluded), sorted by path; file i is held out when i % 20 == 19 "
        f"({c['train_files']} train files, {c['held_out_files']} held-out files; "
        f"{len(c['skipped_not_utf8'])} non-UTF-8 files skipped). Corpus sha256 `{c['sha256'][:16]}...`.",
        f"- Plus {tok['chat_examples']} chat examples built from the training files (documented public "
        f"functions/classes as answers to a request, pydoc topics as answers to a question), each seen "
        f"{tok['chat_copies']}x per epoch, in the chat template of tokenizer_config.json.",
        f"- Tokenizer: byte-level BPE, {shape['vocab_size']} tokens, trained on the training files; special "
        f"tokens `<s>` `</s>` `<|system|>` `<|user|>` `<|assistant|>` `<|end|>` (ids 0-5); generation stops "
        f"at `</s>` or `<|end|>`.",
        f"- Training stream: {tok['train_tokens']:,} tokens, packed into {report['train']['window']}-token "
        f"windows, batches of {report['train']['batch_windows']}; AdamW lr {report['train']['lr']} "
        f"(warmup {report['train']['warmup_steps']}, cosine), per-layer load-balancing loss x "
        f"{report['train']['aux_loss_coef']}, seed {report['train']['seed']}.",
        "",
        "## Shape",
        "",
        f"{shape['num_layers']} layers, hidden {shape['hidden_size']}, {shape['num_heads']} heads / "
        f"{shape['num_kv_heads']} KV heads, {shape['num_experts']} experts per layer, top-{shape['top_k']}, "
        f"expert intermediate {shape['moe_intermediate']}, context {shape['max_positions']}, untied "
        f"embeddings: {report['params']:,} parameters, stored in float32 (hub per-expert tensor names).",
        "",
        "## Held-out quality",
        "",
        f"{ho['loss_nats_per_token']:.3f} nats/token (perplexity {ho['perplexity']:.1f}, "
        f"{ho['bits_per_char']:.3f} bits/char) over {ho['tokens']:,} tokens of the held-out files.",
        "",
        "## Routing",
        "",
        f"- Expert load (share of a layer's activations, 1.0 = even): max/mean per layer "
        f"{load['max_over_mean_per_layer']}, min/mean {load['min_over_mean_per_layer']}.",
        f"- Adjacent-layer mutual information of top-1 experts: {aff['mi_bits_mean']:.3f} bits on average "
        f"(per pair {aff['mi_bits_adjacent']}), against {aff['mi_bits_shuffled_mean']:.4f} bits when layer "
        f"l+1 is shuffled across tokens (the maximum is {aff['top1_entropy_bits_max']:.0f} bits).",
        f"- Top-1 cross-GPU rate (fraction of token steps l -> l+1 whose top-1 expert changes GPU) on "
        f"{pl['test_tokens']:,} held-out tokens, with a placement that the `{pl['solver']}` solver fitted "
        f"(top-1 affinity objective) on the {pl['fit_tokens']:,}-token routing trace below: "
        f"{_fmt_rate(pl['solved'])}; experts in contiguous blocks: {_fmt_rate(pl['contiguous'])}.",
        f"- Control, the same seeded model before training (held-out loss {ctl['loss_nats_per_token']:.2f}): "
        f"MI {ctl['affinity']['mi_bits_mean']:.3f} bits; top-1 cross-GPU rate solved "
        f"{_fmt_rate(ctl['placement']['solved'])}, contiguous {_fmt_rate(ctl['placement']['contiguous'])}. "
        f"Random routers already show affinity (a token's hidden state changes little from layer to layer); "
        f"what training adds is what the figures above minus these say.",
    ]
    lines += ["", f"Routing trace of held-out text: `bench/results/{report['trace']['path']}` "
                  f"({report['trace']['tokens']:,} tokens).", "", "## Greedy samples", ""]
    for s in report["samples"]:
        lines += [f"Prompt `` {s['prompt']!r} ``:", "", "```", s["text"], "```", ""]
    return "\n".join(lines)
