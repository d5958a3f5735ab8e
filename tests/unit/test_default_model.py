"""The bundled default model (epserve/assets/default_model) and the pieces of the script that trains it.

The shipped-file tests read the committed artifacts through transformers (a dev dependency); loading through
epserve's own loader is tested with the model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from epserve.training.corpus import chat_examples, load_stdlib_corpus
from epserve.training.evaluate import affinity_report, expert_load, mutual_information_bits, placement_report
from epserve.training.tokenizer import SPECIAL_TOKENS, render_chat
from epserve.training.trainer import TrainConfig, balance_loss, batch_order, windows_of
from placement.trace import RoutingTrace
from tests.conftest import REPO_ROOT

MODEL_DIR = REPO_ROOT / "epserve" / "assets" / "default_model"
TRACE = REPO_ROOT / "bench" / "results" / "default_model_trace.npz"
SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "training_report.json", "MODEL_CARD.md")

# Greedy continuation of "def " (16 new tokens), recorded from the shipped weights after training.
# "def " ends in a lone space token, which the training text rarely has, so the greedy text is odd (an
# encodings table comment); it pins the weights, not the model's taste.
EXPECTED_DEF_IDS = [300, 226, 300, 226, 300, 226, 334, 93, 22, 17, 263, 300, 226, 334, 93, 343]
EXPECTED_DEF_TEXT = " #  #  #  0x1,     #  0x00"


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---- shipped files ----------------------------------------------------------------------------------------
def test_shipped_files_exist_and_stay_small():
    sizes = {name: (MODEL_DIR / name).stat().st_size for name in SHIPPED}
    assert set(p.name for p in MODEL_DIR.iterdir()) == set(SHIPPED)
    assert sum(sizes.values()) + TRACE.stat().st_size < 25 * 2 ** 20
    assert TRACE.stat().st_size < 2 * 2 ** 20


def test_config_is_a_valid_mixtral_config():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(MODEL_DIR)
    raw = json.loads((MODEL_DIR / "config.json").read_text())
    assert raw["model_type"] == "mixtral" and raw["architectures"] == ["MixtralForCausalLM"]
    assert (config.num_local_experts, config.num_experts_per_tok, config.num_hidden_layers) == (16, 2, 6)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (128, 96, 4096)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    assert raw["rope_theta"] == 10000.0 and config.max_position_embeddings == 512
    assert config.tie_word_embeddings is False and raw["dtype"] == "float32"
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == raw["eos_token_id"] == [1, 5] and gen["bos_token_id"] == raw["bos_token_id"] == 0


def test_safetensors_use_the_hub_per_expert_layout():
    from safetensors import safe_open

    D, I, E, V, L, KV = 128, 96, 16, 4096, 6, 64
    want = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    for l in range(L):
        p = f"model.layers.{l}."
        want.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                     p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (KV, D),
                     p + "self_attn.v_proj.weight": (KV, D), p + "self_attn.o_proj.weight": (D, D),
                     p + "block_sparse_moe.gate.weight": (E, D)})
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            want.update({q + "w1.weight": (I, D), q + "w3.weight": (I, D), q + "w2.weight": (D, I)})
    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert got == want
        w = f.get_tensor("model.layers.3.block_sparse_moe.experts.7.w2.weight")
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and w.std() > 0.01


# ---- tokenizer --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.mark.parametrize("text", ["def f(x):\n\treturn x ** 2  # square\n",
                                  "naïve café — π ≈ 3.14159, 日本語, emoji 🐍\r\n",
                                  "    if not line.startswith('#'):\n        yield line.rstrip()\n\n\n"])
def test_tokenizer_round_trips_text(hf_tokenizer, text):
    ids = hf_tokenizer(text).input_ids
    assert ids[0] == 0  # <s> in front of every single sequence
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert hf_tokenizer.decode(ids[1:]) == text


def test_tokenizer_special_tokens(hf_tokenizer):
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, len(hf_tokenizer)) == ("<s>", "</s>", 4096)
    # a role marker written in a message is one token, exactly as in training
    assert hf_tokenizer("<|user|>\nhi<|end|>", add_special_tokens=False).input_ids[0] == 3


def test_chat_template_renders_the_training_format(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."},
                {"role": "assistant", "content": "sorted(xs)"}, {"role": "user", "content": "In place?"}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages, add_generation_prompt=True)
    assert text == ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nSort a list.<|end|>\n<|assistant|>\nsorted(xs)"
                    "<|end|>\n<|user|>\nIn place?<|end|>\n<|assistant|>\n")
    with pytest.raises(Exception, match="unknown chat role: tool"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---- model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_model_gives_finite_logits_that_prefer_python(hf_model, hf_tokenizer):
    ids = hf_tokenizer("import os\nimport sys\n\n\ndef main():\n    ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 4096) and torch.isfinite(logits).all()
    probs = logits[0].softmax(-1)
    word = lambda i: hf_tokenizer.decode([int(i)])  # noqa: E731
    # after "import os\n" a trained model expects another import (random weights: ~1/4096 each)
    assert word(probs[3].argmax()) == "import" and float(probs[3].max()) > 0.5
    # after "import os\nimport" it expects module names
    assert {" os", " sys"} <= {word(i) for i in probs[4].topk(3).indices}


def test_greedy_continuation_of_def_is_reproducible(hf_model, hf_tokenizer):
    ids = hf_tokenizer("def ", return_tensors="pt").input_ids
    out = hf_model.generate(ids, do_sample=False, max_new_tokens=16)[0, ids.shape[1]:].tolist()
    assert out == EXPECTED_DEF_IDS
    assert hf_tokenizer.decode(out) == EXPECTED_DEF_TEXT


def test_shipped_trace_is_a_valid_routing_trace():
    trace = RoutingTrace.load(TRACE)
    assert (trace.num_experts, trace.num_layers, trace.top_k) == (16, 6, 2)
    assert trace.num_tokens == 64 * 512 and trace.has_token_ids
    assert int(trace.token_ids_T.max()) < 4096 and int(trace.positions_T.max()) == 511
    np.testing.assert_allclose(trace.weights_TLK.sum(-1), 1.0, atol=1e-5)
    assert (trace.weights_TLK[..., 0] >= trace.weights_TLK[..., 1]).all()
    report = json.loads((MODEL_DIR / "training_report.json").read_text())
    assert report["trace"]["tokens"] == trace.num_tokens


# ---- the training script's pieces -------------------------------------------------------------------------
def test_corpus_is_sorted_and_split_by_file(tmp_path):
    for i in range(41):
        (tmp_path / "pkg" if i % 2 else tmp_path).mkdir(exist_ok=True)
        path = (tmp_path / "pkg" if i % 2 else tmp_path) / f"m{i:02d}.py"
        path.write_text(f"x = {i}\n")
    (tmp_path / "m04.py").write_bytes(b"s = '\xe9'\n")  # latin-1: not UTF-8, skipped but still counted
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "thirdparty.py").write_text("y = 1\n")
    corpus = load_stdlib_corpus(tmp_path)
    names = sorted([f"m{i:02d}.py" for i in range(0, 41, 2)] + [f"pkg/m{i:02d}.py" for i in range(1, 41, 2)])
    assert corpus.skipped == ("m04.py",)
    assert [f.relpath for f in corpus.held_out] == [names[19], names[39]]
    assert [f.relpath for f in corpus.train] == [n for i, n in enumerate(names) if i not in (19, 39) and n != "m04.py"]
    assert corpus.describe()["held_out_files"] == 2


def test_chat_examples_use_public_documented_definitions(tmp_path):
    src = ('import functools\n\n@functools.cache\ndef area(r):\n    """Area of a circle."""\n    return 3.14 * r * r\n'
           '\n\ndef _hidden():\n    """Private."""\n\n\ndef nodoc():\n    pass\n\n\nclass Box:\n    """A box."""\n')
    (tmp_path / "geo.py").write_text(src)
    for i in range(19):
        (tmp_path / f"z{i:02d}.py").write_text("pass\n")
    corpus = load_stdlib_corpus(tmp_path)
    examples = chat_examples(corpus.train, seed=0)
    answers = [m[1]["content"] for m in examples]
    assert answers == ['@functools.cache\ndef area(r):\n    """Area of a circle."""\n    return 3.14 * r * r',
                       'class Box:\n    """A box."""']
    assert [m[0]["content"] for m in examples] == ["Implement `area` in Python. Area of a circle.",
                                                   "Show me the source of `geo.Box`."]
    assert chat_examples(corpus.train, seed=0) == examples


def test_lr_schedule_and_batch_order():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert math.isclose(cfg.lr_at(0), 1e-4) and math.isclose(cfg.lr_at(10), 1e-3)
    assert math.isclose(cfg.lr_at(55), 0.55e-3) and math.isclose(cfg.lr_at(100), 1e-4)
    epoch = np.concatenate([batch_order(10, 3, seed=5, step=s) for s in range(3)])
    assert sorted(epoch.tolist()) == sorted(set(epoch.tolist())) and len(epoch) == 9
    assert batch_order(10, 3, seed=5, step=4).tolist() == batch_order(10, 3, seed=5, step=4).tolist()
    assert windows_of(np.arange(11, dtype=np.uint16), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_balance_loss_is_one_when_even_and_large_when_collapsed():
    even = (torch.zeros(6, 4),)
    assert math.isclose(float(balance_loss(even, top_k=2)), 1.0, rel_tol=1e-6)
    collapsed = (torch.tensor([[20.0, 20.0, 0.0, 0.0]] * 6),)  # every token to experts 0 and 1
    assert math.isclose(float(balance_loss(collapsed, top_k=2)), 2.0, rel_tol=1e-6)


def test_affinity_statistics_on_known_routing():
    rng = np.random.default_rng(0)
    a_T = rng.integers(0, 4, 4000)
    assert math.isclose(mutual_information_bits(a_T, a_T, 4), 2.0, abs_tol=0.01)  # I(A;A) = H(A) ~ 2 bits
    assert mutual_information_bits(a_T, rng.integers(0, 4, 4000), 4) < 0.01
    # top-1 at layer 1 = top-1 at layer 0 + 2 (mod 4): perfect affinity
    experts_TLK = np.stack([np.stack([a_T, (a_T + 1) % 4], 1), np.stack([(a_T + 2) % 4, (a_T + 3) % 4], 1)], 1)
    rep = affinity_report(experts_TLK.astype(np.int16), 4, seed=0)
    assert rep["mi_bits_mean"] > 1.99 and rep["mi_bits_shuffled_mean"] < 0.01
    count_E = np.bincount(a_T, minlength=4)
    layer0_E = (count_E + np.roll(count_E, 1)) / 8000  # expert e is chosen by tokens with a == e or a == e - 1
    np.testing.assert_allclose(expert_load(experts_TLK, 4), [layer0_E, np.roll(layer0_E, 2)])
    # contiguous blocks {0,1},{2,3}: a -> a+2 always changes block; the solver pairs them on one GPU
    trace = RoutingTrace(experts_TLK, np.full(experts_TLK.shape, 0.5, np.float32), 4)
    fit, test = trace.split(0.5)
    rep = placement_report(fit, test, gpus=(2,))
    assert rep["contiguous"] == {"2": 1.0} and rep["solved"] == {"2": 0.0} and rep["solved_in_sample"] == {"2": 0.0}
    assert (rep["fit_tokens"], rep["test_tokens"]) == (2000, 2000)


def test_training_script_refuses_missing_inputs_and_bad_options(tmp_path, capsys):
    from launch.train_default_model import main

    work, out = tmp_path / "work", tmp_path / "out"
    for phase, missing in (("train", "train_tokens.npy"), ("export", "train_tokens.npy"),
                           ("evaluate", "train_tokens.npy")):
        assert main(["--phase", phase, "--work-dir", str(work), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"phase '{phase}' needs {work / missing}" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "0", "--work-dir", str(work)])
    assert exc.value.code == 2 and "--steps must be >= 1, got 0" in capsys.readouterr().err

