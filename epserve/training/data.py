"""Token streams for training and evaluating the default model.

    StdlibCorpus --train files--> BPE tokenizer (saved into the model folder)
        train files + chat examples (x CHAT_COPIES) --seeded shuffle of documents--> <s> doc </s> ... (uint16)
        held-out files (sorted order)                                            --> <s> doc </s> ... (uint16)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from epserve.training.corpus import StdlibCorpus, chat_examples
from epserve.training.tokenizer import EOS, render_chat
from placement.errors import InputError

CHAT_COPIES = 2  # chat examples are ~6% of the text; seen twice per epoch so the chat format is learnt


def encode_documents(tok: Tokenizer, texts: list[str], *, add_bos: bool) -> list[np.ndarray]:
    """Each text as uint16 ids ending in </s>; ``add_bos`` puts <s> in front (chat texts already have it)."""
    eos = tok.token_to_id(EOS)
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise InputError(f"vocabulary of {tok.get_vocab_size()} does not fit uint16 token streams")
    return [np.array(e.ids + [eos], dtype=np.uint16)
            for e in tok.encode_batch(texts, add_special_tokens=add_bos)]


def build_streams(corpus: StdlibCorpus, tok: Tokenizer, *, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train_stream, held_out_stream, stats)."""
    files = encode_documents(tok, [f.text for f in corpus.train], add_bos=True)
    chats = chat_examples(corpus.train, seed=seed)
    chat_docs = encode_documents(tok, [render_chat(m, add_generation_prompt=False) for m in chats], add_bos=False)
    docs = files + chat_docs * CHAT_COPIES
    order = np.random.default_rng(seed).permutation(len(docs))
    train = np.concatenate([docs[i] for i in order])
    held_out = np.concatenate(encode_documents(tok, [f.text for f in corpus.held_out], add_bos=True))
    stats = {"train_tokens": int(len(train)), "held_out_tokens": int(len(held_out)),
             "train_file_tokens": int(sum(len(d) for d in files)),
             "chat_examples": len(chats), "chat_copies": CHAT_COPIES,
             "chat_tokens_per_copy": int(sum(len(d) for d in chat_docs)),
             "held_out_chars_per_token": round(sum(len(f.text) for f in corpus.held_out) / len(held_out), 4)}
    return train, held_out, stats


def save_streams(work_dir: Path, train: np.ndarray, held_out: np.ndarray, info: dict) -> None:
    np.save(work_dir / "train_tokens.npy", train)
    np.save(work_dir / "held_out_tokens.npy", held_out)
    (work_dir / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")


def load_streams(work_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    paths = [work_dir / n for n in ("train_tokens.npy", "held_out_tokens.npy", "corpus.json")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"token streams not prepared ({', '.join(missing)} missing): run the "
                                f"'prepare' phase first")
    return np.load(paths[0]), np.load(paths[1]), json.loads(paths[2].read_text())
