"""Text on the server side: tokenizer, chat template, incremental detokenization and stop strings.

    request text --chat template (jinja2, sandboxed, as HF renders it)--> prompt text --encode--> prompt ids
    engine ids --IncrementalDetokenizer (never splits a UTF-8 character)--> text deltas
               --StopMatcher (withholds a possible partial stop string; cuts before a stop string)--> client

Everything here matches Hugging Face transformers' tokenizer on the same directory (ids, decoded text and the
rendered chat template), without importing transformers at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

_REPLACEMENT = "\ufffd"   # what decoding an incomplete UTF-8 byte sequence yields


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``) or could not be rendered."""


def _token_content(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_chat_template(source: str) -> jinja2.Template:
    """The template compiled the way transformers compiles it (sandboxed, trim_blocks, lstrip_blocks)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(frozen=True)
class Tokenizer:
    """A model directory's tokenizer (tokenizer.json + tokenizer_config.json)."""

    backend: HFTokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: jinja2.Template | None
    clean_up_tokenization_spaces: bool = False

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: not found (the server needs the model's tokenizer.json)")
        try:
            backend = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:   # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{tok_file}: not a valid tokenizer file ({exc})") from None
        cfg_file = model_dir / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_file}: must hold a JSON object")
        bos, eos = _token_content(cfg.get("bos_token")), _token_content(cfg.get("eos_token"))
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            _set_post_processor(backend, bos if cfg.get("add_bos_token") else None,
                                eos if cfg.get("add_eos_token") else None)
        template = cfg.get("chat_template")
        if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return cls(backend=backend, bos_token=bos, eos_token=eos,
                   chat_template=_compile_chat_template(template) if template else None,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation (HF ``apply_chat_template(..., tokenize=False)``)."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json chat_template); "
                                    "use /v1/completions")
        try:
            return self.chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation: the template writes its own special tokens (HF tokenizes it with
        ``add_special_tokens=False``)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _set_post_processor(backend: HFTokenizer, bos: str | None, eos: str | None) -> None:
    """The template transformers builds from add_bos_token / add_eos_token."""
    single = f"{(bos + ':0 ') if bos else ''}$A:0{(' ' + eos + ':0') if eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if bos else ''} $B:1{(' ' + eos + ':1') if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class IncrementalDetokenizer:
    """Text deltas of a growing id sequence whose concatenation is ``decode(ids)``.

    It decodes a small window (from ``prefix`` to the end) and emits what the newest ids added to the text of
    the window's already-emitted part, so tokenizers whose decoding depends on the previous token (a
    sentencepiece leading space) stay right. A delta that ends in an incomplete UTF-8 character is held back
    until the character is complete (``flush`` emits whatever is left at the end).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0   # window start
        self._read = 0     # ids before this are already in the emitted text

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def add(self, new_ids) -> str:
        self._ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        whole = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        if not final and (len(whole) <= len(done) or whole.endswith(_REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return whole[len(done):]


class StopMatcher:
    """OpenAI stop strings over a stream of text deltas.

    ``feed`` returns the text that can be shown now: text that could still turn out to be the start of a stop
    string is withheld until decided. Once a stop string appears, the text is cut just before it, ``stopped``
    becomes True and everything after is dropped.
    """

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stops)
        self._pending = ""
        self.stopped = False

    @property
    def active(self) -> bool:
        """Whether there are stop strings to look for."""
        return bool(self._stops)

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._partial_len()
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def flush(self) -> str:
        """The withheld text, once the stream ended without a stop string."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(s[:k]):
                    longest = k
                    break
        return longest
