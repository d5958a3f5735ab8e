"""The default model's training text: the Python standard library that ships with the interpreter.

    sysconfig stdlib dir --rglob *.py (no site-packages), sorted by relative POSIX path
        --> drop files that are not UTF-8 (recorded) --> split BY FILE: index % 20 == 19 is held out
        --> documents: each file's text, plus chat examples built from the training files only
            (function/class source answering a request, pydoc topic text answering a question)

Everything is deterministic given the same stdlib (so the same Python version): no randomness except a seeded
``random.Random`` that picks the phrasing of chat requests.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from placement.errors import InputError

HELD_OUT_EVERY = 20  # file i (in sorted order) is held out when i % 20 == 19
MAX_CHAT_ANSWER_CHARS = 2400  # longer definitions / topics are not turned into chat examples
MAX_CHAT_PER_FILE = 12


@dataclass(frozen=True, kw_only=True)
class CorpusFile:
    relpath: str  # POSIX path relative to the stdlib directory
    text: str


@dataclass(frozen=True, kw_only=True)
class StdlibCorpus:
    """The sorted stdlib sources split by file. ``skipped`` lists files that are not valid UTF-8."""

    root: str
    python_version: str
    train: tuple[CorpusFile, ...]
    held_out: tuple[CorpusFile, ...]
    skipped: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.train or not self.held_out:
            raise InputError(f"stdlib corpus at {self.root} is empty or too small to split "
                             f"({len(self.train)} train / {len(self.held_out)} held-out files)")

    def describe(self) -> dict:
        """Provenance for the model card: where the text came from and how it was split."""
        digest = hashlib.sha256()
        for f in self.train + self.held_out:
            digest.update(f.relpath.encode() + b"\0" + f.text.encode() + b"\0")
        return {"source": "Python standard library *.py (sysconfig stdlib dir, site-packages excluded)",
                "python_version": self.python_version, "root": self.root,
                "split": f"sorted by relative path; file i held out when i % {HELD_OUT_EVERY} == "
                         f"{HELD_OUT_EVERY - 1}",
                "train_files": len(self.train), "held_out_files": len(self.held_out),
                "train_chars": sum(len(f.text) for f in self.train),
                "held_out_chars": sum(len(f.text) for f in self.held_out),
                "skipped_not_utf8": list(self.skipped), "sha256": digest.hexdigest()}


def load_stdlib_corpus(root: str | Path | None = None) -> StdlibCorpus:
    """Read every ``*.py`` under the stdlib directory (default: this interpreter's), in sorted order."""
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise InputError(f"stdlib directory not found: {root}")
    paths = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                   if "site-packages" not in p.relative_to(root).parts and p.is_file())
    train, held_out, skipped = [], [], []
    for i, (rel, path) in enumerate(paths):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        # The index counts every listed file, skipped ones too, so the split does not shift with decoding.
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(CorpusFile(relpath=rel, text=text))
    version = ".".join(map(str, sys.version_info[:3]))
    return StdlibCorpus(root=str(root), python_version=version, train=tuple(train), held_out=tuple(held_out),
                        skipped=tuple(skipped))


# ---- chat examples --------------------------------------------------------------------------------------
_DEF_REQUESTS = (
    "Write the function `{sig}` from the Python module `{mod}`.",
    "Show me how `{mod}` implements `{name}`.",
    "Write a Python function `{sig}`.{doc}",
    "Implement `{name}` in Python.{doc}",
)
_CLASS_REQUESTS = (
    "Write the class `{name}` from the Python module `{mod}`.",
    "Show me the source of `{mod}.{name}`.",
    "Write a Python class `{name}`.{doc}",
)
_TOPIC_REQUESTS = (
    "Explain the Python topic `{name}`.",
    "What does the Python reference say about `{name}`?",
    "help('{name}')",
)


def chat_examples(files: tuple[CorpusFile, ...], *, seed: int) -> list[list[dict]]:
    """[(user, assistant) message lists]: definitions with a docstring and pydoc topics, from ``files`` only."""
    rng = random.Random(seed)
    out: list[list[dict]] = []
    for f in files:
        if f.relpath == "pydoc_data/topics.py":
            out.extend(_topic_examples(f.text, rng))
        else:
            out.extend(_definition_examples(f, rng))
    return out


def _module_name(relpath: str) -> str:
    mod = relpath[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _definition_examples(f: CorpusFile, rng: random.Random) -> list[list[dict]]:
    try:
        tree = ast.parse(f.text)
    except (SyntaxError, ValueError):  # the stdlib ships deliberately broken files in test/
        return []
    mod, out, lines = _module_name(f.relpath), [], f.text.splitlines(keepends=True)
    for node in tree.body:
        if len(out) >= MAX_CHAT_PER_FILE:
            break
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = (ast.get_docstring(node) or "").strip()
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])  # decorators belong to it
        src = "".join(lines[start - 1:node.end_lineno]).rstrip()
        if not doc or len(src) > MAX_CHAT_ANSWER_CHARS:
            continue
        doc_part = " " + doc.splitlines()[0].strip()
        if isinstance(node, ast.ClassDef):
            request = rng.choice(_CLASS_REQUESTS).format(name=node.name, mod=mod, doc=doc_part)
        else:
            sig = f"{node.name}({ast.unparse(node.args)})"
            request = rng.choice(_DEF_REQUESTS).format(sig=sig, name=node.name, mod=mod, doc=doc_part)
        out.append([{"role": "user", "content": request}, {"role": "assistant", "content": src}])
    return out


def _topic_examples(text: str, rng: random.Random) -> list[list[dict]]:
    """pydoc_data/topics.py is ``topics = {name: text, ...}``: read it as a literal, without importing it."""
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            break
    else:
        return []
    out = []
    for name in sorted(topics):
        answer = topics[name].strip()
        if len(answer) > MAX_CHAT_ANSWER_CHARS:  # keep whole paragraphs, so answers end where text ends
            answer = answer[:MAX_CHAT_ANSWER_CHARS].rsplit("\n\n", 1)[0]
        out.append([{"role": "user", "content": rng.choice(_TOPIC_REQUESTS).format(name=name)},
                    {"role": "assistant", "content": answer}])
    return out
