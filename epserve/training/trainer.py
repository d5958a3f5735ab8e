"""Train the default model: a tiny Mixtral (transformers' MixtralForCausalLM) on packed stdlib text, on CPU.

Shapes: B windows per batch, S tokens per window, V vocabulary, E experts, L layers.

    token stream (uint16, documents joined: <s> text </s>) --cut into S-token windows-->
    per epoch: seeded permutation of windows --> batches ids_BS
    step: logits_BSV, router_logits[L] = model(ids_BS) --> next-token CE + aux_coef * per-layer balance loss
          --> AdamW (clip 1.0), warmup + cosine LR --> every eval_every steps: held-out loss, checkpoint

A checkpoint holds model, optimizer, step and the RNG state of the data order, so a stopped run resumes
exactly where it was. Everything is seeded; given the same corpus and torch build the run is repeatable.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from placement.errors import InputError


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    moe_intermediate: int = 96
    max_positions: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InputError(f"hidden_size {self.hidden_size} / heads {self.num_heads} / kv heads "
                             f"{self.num_kv_heads} do not divide evenly")
        if not 1 <= self.top_k <= self.num_experts:
            raise InputError(f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_windows: int = 8        # B
    window: int = 512             # S
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.02
    eval_every: int = 250
    eval_windows: int = 16
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_windows", "window", "eval_every", "eval_windows", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise InputError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine down to ``lr * min_lr_ratio`` at ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def mixtral_config(shape: ModelShape, *, bos_id: int, eos_ids: list[int], aux_loss_coef: float):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.moe_intermediate,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.hidden_size // shape.num_heads,
        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
        max_position_embeddings=shape.max_positions, rope_theta=shape.rope_theta, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=shape.tie_embeddings, router_aux_loss_coef=aux_loss_coef,
        router_jitter_noise=0.0, output_router_logits=False, sliding_window=None,
        bos_token_id=bos_id, eos_token_id=eos_ids[0], pad_token_id=eos_ids[0], initializer_range=0.02)


def build_model(shape: ModelShape, *, bos_id: int, eos_ids: list[int], aux_loss_coef: float, seed: int):
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    config = mixtral_config(shape, bos_id=bos_id, eos_ids=eos_ids, aux_loss_coef=aux_loss_coef)
    config._experts_implementation = "grouped_mm"  # training speed only; the same maths as "eager"
    config._attn_implementation = "sdpa"
    return MixtralForCausalLM(config)


# ---- data -----------------------------------------------------------------------------------------------
def windows_of(stream: np.ndarray, window: int) -> np.ndarray:
    """[N, S] int64: the stream cut into whole S-token windows (the tail that does not fill one is dropped)."""
    n = len(stream) // window
    if n == 0:
        raise InputError(f"token stream of {len(stream)} tokens is shorter than one {window}-token window")
    return stream[: n * window].reshape(n, window).astype(np.int64)


def batch_order(num_windows: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Window indices of batch ``step``: epochs are seeded permutations, so any step can be recomputed."""
    per_epoch = num_windows // batch
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_windows)
    return perm[k * batch:(k + 1) * batch]


# ---- loss -----------------------------------------------------------------------------------------------
def lm_loss(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats/token) over the S-1 predictions of each window."""
    return F.cross_entropy(logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]), ids_BS[:, 1:].reshape(-1))


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss per layer (E * sum_e f_e * p_e; 1.0 when perfectly even), averaged
    over layers. transformers' own version pools all layers, which lets single layers stay unbalanced."""
    losses = []
    for logits_NE in router_logits:
        probs_NE = logits_NE.float().softmax(-1)
        E = probs_NE.shape[-1]
        chosen_NK = probs_NE.topk(top_k, dim=-1).indices
        frac_E = torch.zeros(E).scatter_add_(0, chosen_NK.reshape(-1), torch.ones(chosen_NK.numel())) / chosen_NK.numel()
        losses.append(E * (frac_E * probs_NE.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def held_out_loss(model, windows_NS: np.ndarray, *, batch: int) -> float:
    """Mean next-token CE (nats/token) over the given windows, weighting every prediction equally."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows_NS), batch):
        ids_BS = torch.from_numpy(windows_NS[i:i + batch])
        logits = model(input_ids=ids_BS).logits
        n = ids_BS[:, 1:].numel()
        total += float(lm_loss(logits, ids_BS)) * n  # host sync: once per eval batch, not on the train path
        count += n
    model.train()
    return total / count


# ---- loop -----------------------------------------------------------------------------------------------
def train(model, cfg: TrainConfig, *, train_NS: np.ndarray, eval_NS: np.ndarray, ckpt_dir: Path,
          max_seconds: float, log: Callable[[dict], None]) -> dict:
    """Run (or resume) training until ``cfg.steps`` or ``max_seconds``; returns the state summary."""
    torch.set_num_threads(cfg.threads)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    state = {"step": 0, "history": [], "best_eval": None, "best_step": None, "train_seconds": 0.0,
             "config": asdict(cfg)}
    last = ckpt_dir / "last.pt"
    if last.is_file():
        ck = torch.load(last, weights_only=False)
        if ck["state"]["config"] != asdict(cfg):
            raise InputError(f"{last} was written with a different training config; use another --work-dir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log({"event": "resume", "step": state["step"]})
    model.train()
    top_k = model.config.num_experts_per_tok
    t0, seconds_before = time.time(), state["train_seconds"]
    window_tokens = 0
    while state["step"] < cfg.steps:
        step = state["step"]
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        ids_BS = torch.from_numpy(train_NS[batch_order(len(train_NS), cfg.batch_windows, cfg.seed, step)])
        out = model(input_ids=ids_BS, output_router_logits=True)
        ce = lm_loss(out.logits, ids_BS)
        aux = balance_loss(out.router_logits, top_k)
        (ce + cfg.aux_loss_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        window_tokens += ids_BS.numel()
        if state["step"] % 25 == 0 or state["step"] == cfg.steps:
            elapsed = time.time() - t0
            log({"step": state["step"], "loss": round(ce.item(), 4), "aux": round(aux.item(), 4),  # host sync
                 "gnorm": round(gnorm.item(), 3), "lr": round(cfg.lr_at(step), 6),
                 "tok_per_s": round(window_tokens / max(elapsed, 1e-9)), "elapsed_s": round(elapsed)})
        at_eval = state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps
        out_of_time = time.time() - t0 >= max_seconds
        if at_eval or out_of_time:
            ev = held_out_loss(model, eval_NS[: cfg.eval_windows], batch=cfg.batch_windows)
            state["train_seconds"] = seconds_before + time.time() - t0
            state["history"].append({"step": state["step"], "eval_loss": round(ev, 4),
                                     "train_seconds": round(state["train_seconds"])})
            if state["best_eval"] is None or ev < state["best_eval"]:
                state["best_eval"], state["best_step"] = ev, state["step"]
                torch.save(model.state_dict(), ckpt_dir / "best_model.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt_dir / "tmp.pt")
            (ckpt_dir / "tmp.pt").replace(last)
            log({"event": "eval", **state["history"][-1]})
            if out_of_time:
                log({"event": "out_of_time", "step": state["step"], "planned_steps": cfg.steps})
                break
    (ckpt_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    return state
