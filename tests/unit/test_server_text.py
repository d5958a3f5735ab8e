"""Server text: our tokenizer against transformers' on the bundled model, incremental detokenization, and stop
strings (OpenAI semantics: the text is cut before the stop string; a possible partial one is withheld)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from epserve.engine.api import Delta, FinishReason
from epserve.server.streaming import TextEvent, TextStream
from epserve.server.text import ChatTemplateError, IncrementalDetokenizer, StopMatcher, Tokenizer
from tests.conftest import DEFAULT_MODEL_DIR as MODEL_DIR

TEXTS = [
    "def main():\n    return 0\n",
    "Héllo wörld — naïve café, 日本語のテキスト, emoji 🤖🎉 and ∑ x² ≤ ∞",
    "<s>special</s> tokens <|user|> inside <|end|> text",
    "   leading spaces\ttabs\n\n\nnewlines   ",
    "a",
]
CHATS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list ü"},
     {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "in place?"}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def theirs():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(ours, theirs, text):
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ids[0] == 0   # add_bos_token: <s> is id 0
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_equal_transformers(ours, theirs, messages):
    text = ours.render_chat(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|") and text.endswith("<|assistant|>\n")
    expected_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected_ids = expected_ids["input_ids"] if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys") \
        else expected_ids
    assert ours.encode_chat(messages) == list(expected_ids)


def test_chat_template_raise_exception_becomes_chat_template_error(ours):
    with pytest.raises(ChatTemplateError, match="unknown chat role: tool"):
        ours.render_chat([{"role": "tool", "content": "x"}])


def test_model_without_chat_template_says_so(tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["add_bos_token"] = False
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(model_dir)
    assert tok.encode("a")[0] != 0   # add_bos_token false rebuilds the post-processor without <s>
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_missing_tokenizer_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name, content, words", [
    ("tokenizer.json", "{broken", "tokenizer.json: not a valid tokenizer file"),
    ("tokenizer_config.json", "{broken", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json: must hold a JSON object"),
])
def test_broken_tokenizer_files_are_named(tmp_path, name, content, words):
    model_dir = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (model_dir / name).write_text(content)
    with pytest.raises(ValueError, match=words):
        Tokenizer.from_dir(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_deltas_join_to_decode(ours, text):
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == ours.decode(ids)
    assert not any("\ufffd" in d for d in deltas)   # no delta splits a UTF-8 character


def test_incremental_detokenizer_holds_a_split_character(ours):
    ids = ours.encode("🤖", add_special_tokens=False)
    assert len(ids) > 1                       # byte-level BPE spells the emoji in several tokens
    detok = IncrementalDetokenizer(ours)
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🤖"
    # an incomplete character at the very end is flushed as the replacement character decode() gives
    detok = IncrementalDetokenizer(ours)
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == ours.decode(ids[:1]) == "\ufffd"


def test_incremental_detokenizer_many_ids_at_once(ours):
    ids = ours.encode(TEXTS[1])
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [detok.flush()]
    assert "".join(deltas) == ours.decode(ids)


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = [matcher.feed(p) for p in pieces]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out, matcher.stopped


@pytest.mark.parametrize("stops, pieces, expected, stopped", [
    ((), ["ab", "cd"], ["ab", "cd", ""], False),
    (("STOP",), ["hello ", "ST", "O", "P and more"], ["hello ", "", "", ""], True),
    (("STOP",), ["hello ", "ST", "OX"], ["hello ", "", "STOX", ""], False),
    (("STOP",), ["abcSTOPdef"], ["abc"], True),
    (("\n\n", "END"), ["x\n", "y", "E", "N", "!"], ["x", "\ny", "", "", "EN!", ""], False),
    (("\n\n", "END"), ["x\n", "\nlater"], ["x", ""], True),
    (("aab",), ["a", "a", "a", "b"], ["", "", "a", ""], True),            # overlap: the prefix restarts
    (("bc", "abcd"), ["ab", "c"], ["", "a"], True),                        # "ab" could start "abcd"
    (("bc", "abcd"), ["abcd"], [""], True),                                # the earliest stop wins
    (("日本",), ["テ日", "本語"], ["テ", ""], True),
    (("END",), ["E"], ["", "E"], False),                                   # withheld text flushed at the end
])
def test_stop_matcher(stops, pieces, expected, stopped):
    out, was_stopped = feed_all(StopMatcher(stops), pieces)
    assert out == expected
    assert was_stopped is stopped


def test_stop_matcher_drops_everything_after_stop():
    m = StopMatcher(["#"])
    assert m.feed("a#b") == "a"
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_stop_matcher_refuses_empty_stop():
    with pytest.raises(ValueError, match="empty"):
        StopMatcher(["ok", ""])


class FixedStream:
    """A RequestStream that hands out the given Deltas (TextStream without an engine)."""

    request_id, num_prompt_tokens = "r", 1

    def __init__(self, deltas: list[Delta]) -> None:
        self.deltas, self.cancelled = deltas, False

    async def _iterate(self):
        for delta in self.deltas:
            yield delta

    def __aiter__(self):
        return self._iterate()

    def cancel(self) -> None:
        self.cancelled = True


def run_text_stream(ours, chunks, stops) -> tuple[TextStream, list[TextEvent]]:
    deltas = [Delta(tuple(c)) for c in chunks] + [Delta(finish_reason=FinishReason.LENGTH)]
    stream = TextStream(0, FixedStream(deltas), ours, stops, arrived=0.0)

    async def events():
        return [e async for e in stream.events()]

    return stream, asyncio.run(events())


def test_text_stream_counts_the_ids_up_to_the_one_that_completed_the_stop_string(ours):
    ids = ours.encode(" #  #  #  0x1, 2, 3", add_special_tokens=False)
    text = ours.decode(ids)
    need = next(n for n in range(1, len(ids) + 1) if "0x" in ours.decode(ids[:n]))
    assert 1 < need < len(ids) - 2
    # one delta with every id, the stop string split across two deltas, one id per delta
    for chunks in ([ids], [ids[:need - 1], ids[need - 1:]], [[t] for t in ids]):
        stream, events = run_text_stream(ours, chunks, ("0x",))
        assert "".join(e.text for e in events) == text[:text.index("0x")]
        assert events[-1].finish_reason == "stop" and stream.stream.cancelled
        assert stream.num_tokens == need == stream.timing.tokens
    stream, events = run_text_stream(ours, [ids[:3], ids[3:]], ())
    assert "".join(e.text for e in events) == text and events[-1].finish_reason == "length"
    assert stream.num_tokens == len(ids) and not stream.stream.cancelled
