"""Byte-level BPE tokenizer for the default model, and the chat format it is trained with.

    training texts --tokenizers BpeTrainer (byte-level, special tokens first)--> Tokenizer
        --> tokenizer.json (+ post-processor: BOS in front of every single sequence)
        --> tokenizer_config.json (bos/eos/pad, Jinja chat_template)

Chat format (one line per message, roles are special tokens)::

    <s><|user|>\\nHello<|end|>\\n<|assistant|>\\n ... <|end|>\\n

Generation stops at ``</s>`` or ``<|end|>`` (both listed as eos in generation_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, END = "<s>", "</s>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (BOS, EOS, *(f"<|{r}|>" for r in ROLES), END)  # ids 0..5, in this order

# messages -> prompt text; with add_generation_prompt it ends with the assistant prefix.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def render_chat(messages: list[dict], *, add_generation_prompt: bool) -> str:
    """What CHAT_TEMPLATE renders, in plain Python (training builds its chat examples with this; a test
    checks the two agree through transformers' apply_chat_template)."""
    parts = [BOS]
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown chat role: {m['role']} (use system, user or assistant)")
        parts.append(f"<|{m['role']}|>\n{m['content']}{END}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with SPECIAL_TOKENS at ids 0..5."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, bos_id)])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, *, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (read by transformers' AutoTokenizer and by epserve)."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS)],
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def stop_token_ids(tok: Tokenizer) -> list[int]:
    return [tok.token_to_id(EOS), tok.token_to_id(END)]
