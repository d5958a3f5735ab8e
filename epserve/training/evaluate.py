"""Evaluate the exported default model with transformers' own Mixtral (what we ship, not the training copy).

Shapes: N windows, S tokens per window, T tokens (= N * S), L MoE layers, K = top-k, E experts, G GPUs.

    model folder --AutoModelForCausalLM--> every held-out window: logits + router logits
        --> held-out loss / perplexity
        --> routing experts_TLK, weights_TLK (softmax -> top-k -> renormalised, as Mixtral routes)
            --> expert load per layer, adjacent-layer mutual information (vs a shuffled control),
                top-1 cross-GPU rate under contiguous placement
            --> a RoutingTrace of evenly spread windows (--trace-out)
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
    """Adjacent-layer MI of top-1 experts, the same with layer l+1 shuffled across tokens (control), and the
    top-1 cross-GPU rate when experts sit in contiguous blocks on 2 and 4 GPUs."""
    top1_TL = experts_TLK[:, :, 0].astype(np.int64)
    rng = np.random.default_rng(seed)
    L = top1_TL.shape[1]
    mi = [mutual_information_bits(top1_TL[:, l], top1_TL[:, l + 1], num_experts) for l in range(L - 1)]
    mi_shuffled = [mutual_information_bits(top1_TL[:, l], rng.permutation(top1_TL[:, l + 1]), num_experts)
                   for l in range(L - 1)]
    contiguous = {}
    for G in (2, 4):
        gpu_TL = top1_TL // (num_experts // G)
        contiguous[str(G)] = round(float((gpu_TL[:, 1:] != gpu_TL[:, :-1]).mean()), 4)
    return {"mi_bits_adjacent": [round(x, 4) for x in mi], "mi_bits_mean": round(float(np.mean(mi)), 4),
            "mi_bits_shuffled": [round(x, 4) for x in mi_shuffled],
            "mi_bits_shuffled_mean": round(float(np.mean(mi_shuffled)), 4),
            "top1_entropy_bits_max": round(math.log2(num_experts), 4),
            "top1_cross_gpu_rate_contiguous": contiguous}


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


def evaluate_export(model_dir: Path, held_out: np.ndarray, *, window: int, trace_windows: int,
                    trace_out: Path, chars_per_token: float, log: Callable[[dict], None], seed: int = 0) -> dict:
    """Everything the model card reports; ``chars_per_token`` (of the held-out stream) gives bits per char."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    E = model.config.num_local_experts
    windows_NS = windows_of(held_out, window)
    loss, experts_TLK, weights_TLK = route_and_score(model, windows_NS, batch=8)
    log({"event": "held_out_scored", "loss": round(loss, 4), "tokens": int(windows_NS.size),
         "seconds": round(time.time() - t0)})
    load_LE = expert_load(experts_TLK, E)
    pick = np.linspace(0, len(windows_NS) - 1, min(trace_windows, len(windows_NS))).round().astype(int)
    rows = (pick[:, None] * window + np.arange(window)[None, :]).ravel()
    trace = RoutingTrace(experts_TLK[rows], weights_TLK[rows], E,
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
    samples = greedy_samples(model, tokenizer)
    for s in samples:
        log({"event": "sample", "prompt": s["prompt"], "text": s["text"]})
    return {
        "held_out": {"loss_nats_per_token": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                     "bits_per_char": round(loss / math.log(2) / chars_per_token, 4), "tokens": int(windows_NS.size), "windows": int(len(windows_NS))},
        "expert_load": {"fraction_LE": np.round(load_LE, 4).tolist(),
                        "max_over_mean_per_layer": np.round(load_LE.max(1) * E, 3).tolist(),
                        "min_over_mean_per_layer": np.round(load_LE.min(1) * E, 3).tolist()},
        "affinity": affinity_report(experts_TLK, E, seed=seed),
        "trace": {"path": str(trace_out.name), "tokens": trace.num_tokens, "windows": pick.tolist(),
                  "bytes": trace_out.stat().st_size},
        "samples": samples,
    }
