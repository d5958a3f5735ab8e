"""Evaluate the exported default model with transformers' own Mixtral (what we ship, not the training copy).

Shapes: N windows, S tokens per window, T tokens (= N * S), L MoE layers, K = top-k, E experts, G GPUs.

    model folder --AutoModelForCausalLM--> every held-out window: logits + router logits
        --> held-out loss / perplexity
        --> routing experts_TLK, weights_TLK (softmax -> top-k -> renormalised, as Mixtral routes)
            --> expert load per layer, adjacent-layer mutual information (vs a shuffled control)
            --> a RoutingTrace of evenly spread windows (--trace-out)
            --> top-1 cross-GPU rate on the other windows: contiguous vs the local solver fitted on the trace
    prompts --greedy generate--> samples
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from epserve.training.trainer import lm_loss, windows_of
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement
from placement.simulate import Strategy, simulate
from placement.solvers import SolveOptions, SolverKind, solve
from placement.stats import StatsOptions, compute_stats
from placement.trace import RoutingTrace

SAMPLE_PROMPTS = ("def ", "import os\n", "class ", "    for ")
CHAT_PROMPT = [{"role": "user", "content": "Write a Python function `is_prime(n)`."}]
SAMPLE_TOKENS = 48


@torch.no_grad()
def route_and_score(model, windows_NS: np.ndarray, *, batch: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean next-token CE in nats, experts_TLK int16, weights_TLK float32) over all windows, in order."""
    k = model.config.num_experts_per_tok
    total, count, experts, weights = 0.0, 0, [], []
    for i in range(0, len(windows_NS), batch):
        ids_BS = torch.from_numpy(windows_NS[i:i + batch])
        out = model(input_ids=ids_BS, output_router_logits=True)
        n = ids_BS[:, 1:].numel()
        total += float(lm_loss(out.logits, ids_BS)) * n  # host sync per batch (offline evaluation)
        count += n
        probs_LTE = torch.stack([r.float().softmax(-1) for r in out.router_logits])
        top_w, top_i = probs_LTE.topk(k, dim=-1)
        experts.append(top_i.permute(1, 0, 2).numpy().astype(np.int16))
        weights.append((top_w / top_w.sum(-1, keepdim=True)).permute(1, 0, 2).numpy())
    return total / count, np.concatenate(experts), np.concatenate(weights).astype(np.float32)


def expert_load(experts_TLK: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] fraction of a layer's activations that went to each expert (rows sum to 1)."""
    T, L, K = experts_TLK.shape
    return np.stack([np.bincount(experts_TLK[:, l].ravel(), minlength=num_experts) / (T * K) for l in range(L)])


def mutual_information_bits(a_T: np.ndarray, b_T: np.ndarray, num_experts: int) -> float:
    """I(A; B) in bits from the empirical joint distribution of two expert-id sequences."""
    joint = np.bincount(a_T.astype(np.int64) * num_experts + b_T, minlength=num_experts ** 2)
    p_AB = joint.reshape(num_experts, num_experts) / len(a_T)
    p_A, p_B = p_AB.sum(1, keepdims=True), p_AB.sum(0, keepdims=True)
    nz = p_AB > 0
    return float((p_AB[nz] * np.log2(p_AB[nz] / (p_A @ p_B)[nz])).sum())


def affinity_report(experts_TLK: np.ndarray, num_experts: int, *, seed: int) -> dict:
    """Adjacent-layer MI of top-1 experts, and the same with layer l+1 shuffled across tokens (control)."""
    top1_TL = experts_TLK[:, :, 0].astype(np.int64)
    rng = np.random.default_rng(seed)
    L = top1_TL.shape[1]
    mi = [mutual_information_bits(top1_TL[:, l], top1_TL[:, l + 1], num_experts) for l in range(L - 1)]
    mi_shuffled = [mutual_information_bits(top1_TL[:, l], rng.permutation(top1_TL[:, l + 1]), num_experts)
                   for l in range(L - 1)]
    return {"mi_bits_adjacent": [round(x, 4) for x in mi], "mi_bits_mean": round(float(np.mean(mi)), 4),
            "mi_bits_shuffled": [round(x, 4) for x in mi_shuffled],
            "mi_bits_shuffled_mean": round(float(np.mean(mi_shuffled)), 4),
            "top1_entropy_bits_max": round(math.log2(num_experts), 4)}


def placement_report(fit: RoutingTrace, test: RoutingTrace, *, gpus: tuple[int, ...] = (2, 4),
                     seed: int = 0) -> dict:
    """Top-1 cross-GPU rate on ``test`` with experts in contiguous blocks vs a placement that the ``local``
    solver fits on ``fit`` (objective: top-1 -> top-1 affinity only, ExFlow's metric), for each GPU count."""
    stats = compute_stats(fit, StatsOptions(slot_decay=0.0, coact_weight=0.0))
    rate = lambda trace, p: round(simulate(trace, p, Strategy.COHERENT).top1_cross_gpu_rate, 4)  # noqa: E731
    out = {"solver": "local", "stats_options": stats.options.to_dict(), "fit_tokens": fit.num_tokens,
           "test_tokens": test.num_tokens, "contiguous": {}, "solved": {}, "solved_in_sample": {},
           "solver_gap": {}}
    for G in gpus:
        cluster = ClusterShape(nodes=1, gpus_per_node=G)
        solved = solve(stats, cluster, SolveOptions(solver=SolverKind.LOCAL, seed=seed, time_limit=60.0))
        out["contiguous"][str(G)] = rate(test, contiguous_placement(test.num_layers, test.num_experts, cluster))
        out["solved"][str(G)] = rate(test, solved)
        out["solved_in_sample"][str(G)] = rate(fit, solved)
        out["solver_gap"][str(G)] = round(float(solved.objective["gap"]), 4)
    return out


def greedy_samples(model, tokenizer) -> list[dict]:
    out = []
    prompts = [(p, tokenizer(p, return_tensors="pt").input_ids) for p in SAMPLE_PROMPTS]
    chat_ids = tokenizer.apply_chat_template(CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    prompts.append(("<chat> " + CHAT_PROMPT[0]["content"], chat_ids))
    for label, ids in prompts:
        gen = model.generate(ids, do_sample=False, max_new_tokens=SAMPLE_TOKENS)[0, ids.shape[1]:]
        out.append({"prompt": label, "prompt_ids": ids[0].tolist(), "new_ids": gen.tolist(),
                    "text": tokenizer.decode(gen, skip_special_tokens=False)})
    return out


def routing_figures(model, windows_NS: np.ndarray, trace_rows: np.ndarray, *, seed: int) -> dict:
    """Held-out loss, expert load, MI and placement rates of one model (the trace rows fit the placement,
    every other held-out token measures it); also returns the routing arrays under "_routing"."""
    E = model.config.num_local_experts
    loss, experts_TLK, weights_TLK = route_and_score(model, windows_NS, batch=8)
    load_LE = expert_load(experts_TLK, E)
    fit = RoutingTrace(experts_TLK[trace_rows], weights_TLK[trace_rows], E)
    test = RoutingTrace(np.delete(experts_TLK, trace_rows, 0), np.delete(weights_TLK, trace_rows, 0), E)
    return {"loss": loss,
            "expert_load": {"fraction_LE": np.round(load_LE, 4).tolist(),
                            "max_over_mean_per_layer": np.round(load_LE.max(1) * E, 3).tolist(),
                            "min_over_mean_per_layer": np.round(load_LE.min(1) * E, 3).tolist()},
            "affinity": affinity_report(experts_TLK, E, seed=seed),
            "placement": placement_report(fit, test, seed=seed),
            "_routing": (experts_TLK, weights_TLK)}


def evaluate_export(model_dir: Path, held_out: np.ndarray, *, window: int, trace_windows: int, trace_out: Path,
                    chars_per_token: float, init_model, log: Callable[[dict], None], seed: int = 0) -> dict:
    """Everything the model card reports. ``chars_per_token`` (of the held-out stream) gives bits per char;
    ``init_model`` (the same architecture before training) is the control for the routing figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows_NS = windows_of(held_out, window)
    pick = np.linspace(0, len(windows_NS) - 1, min(trace_windows, len(windows_NS))).round().astype(int)
    rows = (pick[:, None] * window + np.arange(window)[None, :]).ravel()
    figures = routing_figures(model, windows_NS, rows, seed=seed)
    experts_TLK, weights_TLK = figures.pop("_routing")
    loss = figures.pop("loss")
    log({"event": "held_out_scored", "loss": round(loss, 4), "tokens": int(windows_NS.size),
         "seconds": round(time.time() - t0)})
    trace = RoutingTrace(experts_TLK[rows], weights_TLK[rows], model.config.num_local_experts,
                         token_ids_T=windows_NS[pick].ravel().astype(np.int32),
                         seq_ids_T=np.repeat(pick, window).astype(np.int32),
                         positions_T=np.tile(np.arange(window), len(pick)).astype(np.int32),
                         meta={"model": "epserve-default (tiny Mixtral, epserve/assets/default_model)",
                               "moe_layers": list(range(model.config.num_hidden_layers)),
                               "source": f"held-out stdlib files, {len(pick)} evenly spread {window}-token "
                                         f"windows of {len(windows_NS)} (seq_id = window index)",
                               "weights": "softmax over experts, top-k, renormalised (Mixtral routing)"})
    trace_out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(trace_out)
    control = routing_figures(init_model.eval(), windows_NS, rows, seed=seed)
    control.pop("_routing")
    log({"event": "init_control_scored", "loss": round(control["loss"], 4)})
    samples = greedy_samples(model, tokenizer)
    for s in samples:
        log({"event": "sample", "prompt": s["prompt"], "text": s["text"]})
    return {
        "held_out": {"loss_nats_per_token": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                     "bits_per_char": round(loss / math.log(2) / chars_per_token, 4),
                     "tokens": int(windows_NS.size), "windows": int(len(windows_NS))},
        **figures,
        "init_control": {"what": "the same seeded model before training, same held-out windows",
                         "loss_nats_per_token": round(control.pop("loss"), 4), **control},
        "trace": {"path": str(trace_out.name), "tokens": trace.num_tokens, "windows": pick.tolist(),
                  "bytes": trace_out.stat().st_size},
        "samples": samples,
    }
