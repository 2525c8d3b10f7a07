"""Windows with recall structure: long-range dependencies whose answers are known by construction.

Every window is filler (held-out or training text of the shipped corpus, or random rare tokens) with
structure written over it at chosen distances:

- **spans**: a random span of rare tokens (the rare-token *pool*: the tokenizer ids in the lower half by
  training-split frequency) repeated ``d`` tokens later. The answer tokens are the second copy's tokens
  after its first one (the first copied token follows filler, so nothing predicts it).
- **facts**: ``" NAME's number is DDDD."`` with a uniformly random 4-digit number, stated once and repeated
  later as the query; the answer tokens are the query's digits (the tokenizer writes a number one token per
  digit). Names are distinct within a window, so a model must match the name, not just ``"number is"``.

The distance ``d`` of an answer is the offset between its first answer token and the token it copies; it is
drawn uniformly inside a *bucket* (by default ``near`` = [16, 64], ``mid`` = (64, short], ``far`` = (short,
length - 16], where ``short`` is the short view's length, ``length // 2`` by default), so recall can be read by
distance. Every answer token is drawn independently of everything outside its own span / fact, so it is
recoverable only from the context that holds its source; :attr:`Answer.cut` is the first position after the
source, and a context that starts there ("truncated") leaves only chance.

Everything is a pure function of ``(seed, step)``: :meth:`RecallWindows.batch` draws the same windows for the
same arguments. :func:`copy_windows` makes the dense random-token copy windows used to pretrain an induction
mechanism (see docs/recall_testbed.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .data import Corpus, DataError

__all__ = ["NAMES", "DIGITS", "Answer", "RecallBatch", "RecallWindows", "rare_pool", "default_buckets",
           "copy_windows", "fact_tokens", "repeat_windows", "RecallSampler"]

NAMES = (
    "Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karla", "Lukas",
    "Marta", "Nikolai", "Olga", "Pavel", "Rosa", "Stefan", "Tanja", "Viktor", "Wanda", "Xaver", "Yara", "Zeno",
)
DIGITS = "0123456789"
N_DIGITS = 4


def rare_pool(corpus: Corpus, vocab_size: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """The rare-token pool: the ids in the lower half of the vocabulary by frequency in ``corpus`` (ties broken
    by id), minus ``exclude`` (special tokens, digits). Sorted ascending."""
    if vocab_size < 4:
        raise DataError(f"vocab_size must be >= 4, got {vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for d in corpus.docs:
        counts += torch.bincount(d.clamp(0, vocab_size - 1), minlength=vocab_size)[:vocab_size]
    order = sorted(range(vocab_size), key=lambda i: (int(counts[i]), i))
    ex = set(int(x) for x in exclude)
    pool = sorted(i for i in order[: vocab_size // 2] if i not in ex)
    return torch.tensor(pool, dtype=torch.long)


def default_buckets(length: int, short: Optional[int] = None) -> Tuple[Tuple[str, int, int], ...]:
    """``(name, lo, hi)`` distance ranges (inclusive): near [16, 64], mid (64, short], far (short, length - 16]."""
    short = length // 2 if short is None else int(short)
    if length < 160:
        raise DataError(f"length must be >= 160 for the default distance buckets, got {length}")
    if not 64 < short < length - 32:
        raise DataError(f"short must be in (64, {length - 32}), got {short}")
    return (("near", 16, 64), ("mid", 65, short), ("far", short + 1, length - 16))


def fact_tokens(tok, names: Sequence[str] = NAMES) -> Tuple[List[List[int]], List[int], List[int]]:
    """(the token ids of ``" NAME's number is "`` per name, the ids of the digits 0-9, the ids of ``"."``)."""
    check = tok.encode_batch([" 4821"])[0]
    digits = [tok.encode_batch([c])[0] for c in DIGITS]
    if any(len(x) != 1 for x in digits) or len(check) != 1 + N_DIGITS or check[1:] != [digits[i][0] for i in (4, 8, 2, 1)]:
        raise DataError("the tokenizer does not write a number as a space token and one token per digit; facts need that")
    pre = [p + check[:1] for p in tok.encode_batch([f" {n}'s number is" for n in names])]
    digits = [x[0] for x in digits]
    dot = tok.encode_batch(["."])[0]
    return pre, digits, dot


@dataclass
class Answer:
    """One recall target in window ``window``: the tokens at ``pos`` copy those at ``src`` (same order)."""

    window: int
    kind: str  # "span" or "fact"
    pos: torch.Tensor  # positions of the answer tokens (each predicted from the logits one position earlier)
    src: torch.Tensor  # positions of the tokens they repeat
    distance: int  # pos[0] - src[0]
    bucket: str
    cut: int  # first position after the source: a context starting here excludes it


@dataclass
class RecallBatch:
    ids: torch.Tensor  # [batch, length] int64
    answers: List[Answer]
    # [batch, length] bool: True where a token was written in (spans, facts, both copies); False on filler
    inserted: Optional[torch.Tensor] = None


class RecallWindows:
    """Windows of ``length`` tokens with ``n_spans`` repeated rare spans and ``n_facts`` stated-and-queried facts
    each, at distances drawn from ``buckets`` (cycled over windows and items, so a batch covers every (kind, bucket)).

    ``corpus``: the filler text (None: random pool tokens). ``pool``: the rare-token pool (:func:`rare_pool`).
    ``tok``: the tokenizer (needed for facts). Pure function of ``(seed, step)``."""

    def __init__(self, length: int, pool: torch.Tensor, seed: int = 0, corpus: Optional[Corpus] = None, tok=None,
                 n_spans: int = 1, n_facts: int = 2, span_len: int = 8,
                 buckets: Optional[Sequence[Tuple[str, int, int]]] = None):
        if n_spans < 0 or n_facts < 0 or n_spans + n_facts < 1:
            raise DataError(f"n_spans and n_facts must be >= 0 with at least one item, got {n_spans}, {n_facts}")
        if not 2 <= span_len <= 64:
            raise DataError(f"span_len must be in [2, 64], got {span_len}")
        if pool.numel() < 2 * span_len:
            raise DataError(f"the rare-token pool has {pool.numel()} tokens, need >= {2 * span_len}")
        if n_facts and tok is None:
            raise DataError("facts need the tokenizer (tok=...)")
        self.length, self.pool, self.seed = int(length), pool.long(), int(seed)
        self.corpus, self.n_spans, self.n_facts, self.span_len = corpus, int(n_spans), int(n_facts), int(span_len)
        self.buckets = tuple(buckets) if buckets is not None else default_buckets(self.length)
        for name, lo, hi in self.buckets:
            if not 1 <= lo <= hi <= self.length - 2:
                raise DataError(f"bucket {name!r}: need 1 <= lo <= hi <= length - 2, got [{lo}, {hi}]")
        if n_facts:
            self.pre, self.digits, self.dot = fact_tokens(tok)
            if n_facts > len(self.pre):
                raise DataError(f"n_facts must be <= {len(self.pre)} (distinct names), got {n_facts}")
        if corpus is not None and corpus.longest < self.length:
            raise DataError(f"the filler corpus's longest document has {corpus.longest} tokens, a window needs "
                            f"{self.length}")

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) * 7919 + 17)

    def _filler(self, g: torch.Generator, batch: int) -> torch.Tensor:
        if self.corpus is None:
            return self.pool[torch.randint(0, self.pool.numel(), (batch, self.length), generator=g)]
        counts = torch.tensor([max(int(d.numel()) - self.length + 1, 0) for d in self.corpus.docs], dtype=torch.float64)
        out = torch.empty(batch, self.length, dtype=torch.long)
        for i, di in enumerate(torch.multinomial(counts, batch, replacement=True, generator=g).tolist()):
            s = int(torch.randint(0, int(counts[di]), (1,), generator=g))
            out[i] = self.corpus.docs[di][s : s + self.length]
        return out

    def _randint(self, g, lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def batch(self, step: int, batch_size: int) -> RecallBatch:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        g = self.generator(step)
        ids = self._filler(g, batch_size)
        answers: List[Answer] = []
        inserted = torch.zeros(batch_size, self.length, dtype=torch.bool)
        n_items = self.n_spans + self.n_facts
        for w in range(batch_size):
            used = torch.zeros(self.length, dtype=torch.bool)
            names = torch.randperm(len(self.pre), generator=g)[: self.n_facts].tolist() if self.n_facts else []
            for k in range(n_items):
                name, lo, hi = self.buckets[(w + k + int(step)) % len(self.buckets)]
                if k < self.n_spans:
                    seg = self.pool[torch.randint(0, self.pool.numel(), (self.span_len,), generator=g)].tolist()
                    off = 1  # answer tokens: the copy's tokens after its first
                else:
                    num = torch.randint(0, 10, (N_DIGITS,), generator=g).tolist()
                    pre = self.pre[names[k - self.n_spans]]
                    seg = list(pre) + [self.digits[x] for x in num] + list(self.dot)
                    off = len(pre)  # answer tokens: the query's digits
                n_ans = (len(seg) - 1) if k < self.n_spans else N_DIGITS
                m = len(seg)
                lo = max(lo, m + 1)  # copies must not overlap their source (plus one filler token between)
                if lo > hi or m + hi > self.length:
                    raise DataError(f"bucket {name!r} [{lo}, {hi}] cannot hold an item of {m} tokens in a window of "
                                    f"{self.length}")
                for _ in range(400):
                    d = self._randint(g, lo, hi)
                    s = self._randint(g, 0, self.length - m - d)
                    a, b = slice(max(s - 1, 0), s + m + 1), slice(max(s + d - 1, 0), s + d + m + 1)
                    if not used[a].any() and not used[b].any():
                        break
                else:
                    raise DataError(f"could not place {n_items} items in a window of {self.length} tokens; "
                                    "use fewer items or a longer window")
                used[s : s + m] = True
                used[s + d : s + d + m] = True
                inserted[w, s : s + m] = True
                inserted[w, s + d : s + d + m] = True
                t = torch.tensor(seg, dtype=torch.long)
                ids[w, s : s + m] = t
                ids[w, s + d : s + d + m] = t
                src = torch.arange(s + off, s + off + n_ans)
                answers.append(Answer(w, "span" if k < self.n_spans else "fact", src + d, src, d, name, s + m))
        return RecallBatch(ids, answers, inserted)


def copy_windows(g: torch.Generator, batch: int, length: int, pool: torch.Tensor, p_copy: float = 0.5,
                 span: Tuple[int, int] = (8, 24)) -> torch.Tensor:
    """Dense copy windows for pretraining an induction mechanism: each window is built left to right from
    segments of ``span`` tokens (inclusive range); a segment is, with probability ``p_copy`` (once there is
    enough history), a copy of an earlier stretch of the window starting at a uniformly random earlier
    position, otherwise fresh uniform tokens from ``pool``. About ``p_copy`` of the tokens are copies, at
    distances spread over the whole window."""
    if not 0.0 <= p_copy < 1.0:
        raise DataError(f"p_copy must be in [0, 1), got {p_copy}")
    lo, hi = span
    if not 1 <= lo <= hi:
        raise DataError(f"span must be 1 <= lo <= hi, got {span}")
    out = torch.empty(batch, length, dtype=torch.long)
    for w in range(batch):
        seq: List[int] = []
        while len(seq) < length:
            m = int(torch.randint(lo, hi + 1, (1,), generator=g))
            if len(seq) >= 2 * m and float(torch.rand((), generator=g)) < p_copy:
                s = int(torch.randint(0, len(seq) - m + 1, (1,), generator=g))
                seq.extend(seq[s : s + m])
            else:
                seq.extend(pool[torch.randint(0, pool.numel(), (m,), generator=g)].tolist())
        out[w] = torch.tensor(seq[:length], dtype=torch.long)
    return out


def repeat_windows(g: torch.Generator, batch: int, length: int, pool: torch.Tensor,
                   span: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Windows of uniform ``pool`` tokens, each holding ONE span of ``k`` tokens (``span`` inclusive range,
    default ``length // 8 .. length // 2 - 1``) repeated later at a random distance: where the span starts, how
    long it is and how far back its first copy lies all vary per window, so a fixed positional offset cannot
    predict the copy, only matching content can (an induction mechanism). Returns ``(ids, copy_mask)``:
    ``copy_mask[w, t]`` is True where token ``t`` is predictable from the context (the second copy's tokens
    after its first, whose predecessor identifies the source)."""
    lo, hi = span or (max(1, length // 8), max(1, length // 2 - 1))
    if not 1 <= lo <= hi or 2 * hi > length:
        raise DataError(f"span must be 1 <= lo <= hi <= length/2, got {(lo, hi)} for length {length}")
    ids = pool[torch.randint(0, pool.numel(), (batch, length), generator=g)]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for w in range(batch):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        s = int(torch.randint(0, length - 2 * k + 1, (1,), generator=g))
        gap = int(torch.randint(0, length - 2 * k - s + 1, (1,), generator=g))
        t = s + k + gap
        ids[w, t : t + k] = ids[w, s : s + k]
        mask[w, t + 1 : t + k] = True
    return ids, mask


class RecallSampler:
    """The training loop's window sampler for ``--data recall``: windows of any ``length`` (>= 160) of the
    corpus with ``n_spans`` repeated rare spans and ``n_facts`` facts written in (:class:`RecallWindows`, default
    distance buckets), a pure function of ``(seed, rank, step)`` like :class:`~lsa_kernels.train.data.WindowSampler`."""

    def __init__(self, corpus: Corpus, tok, seed: int = 0, rank: int = 0, n_spans: int = 2, n_facts: int = 2,
                 pool: Optional[torch.Tensor] = None):
        self.corpus, self.tok, self.seed, self.rank = corpus, tok, int(seed), int(rank)
        self.n_spans, self.n_facts = int(n_spans), int(n_facts)
        self.pool = pool if pool is not None else rare_pool(corpus, tok.vocab_size, exclude=[tok.eos_id] + fact_tokens(tok)[1])
        self._by_length = {}

    def check(self, length: int) -> None:
        if length < 160:
            raise DataError(f"--data recall needs windows of >= 160 tokens (l_train + l_extra + 1), got {length}")
        if self.corpus.longest < length:
            raise DataError(f"corpus too short: its longest document has {self.corpus.longest} tokens, a window "
                            f"needs {length} (l_train + l_extra + 1)")

    def windows(self, step: int, batch: int, length: int) -> torch.Tensor:
        self.check(length)
        w = self._by_length.get(length)
        if w is None:
            w = self._by_length[length] = RecallWindows(length, self.pool, seed=self.seed * 1009 + self.rank,
                                                        corpus=self.corpus, tok=self.tok, n_spans=self.n_spans,
                                                        n_facts=self.n_facts)
        return w.batch(step, batch).ids
