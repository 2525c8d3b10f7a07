"""Pass-key retrieval for ``lsa eval --passkey``: prompts with a 5-digit key hidden at a depth in filler text,
scored with one teacher-forced forward (greedy decoding reproduces the key iff the argmax at every key
position is the key's token), and the accuracy / key log-prob grid over (length, depth)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .config import ConfigError
from .eval_metrics import HiddenFn, rows_per_forward

PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    length: int  # the requested length (prompt + key tokens <= length)
    depth: float
    trial: int
    key: str
    ids: List[int]  # prompt + key tokens
    n_answer: int  # the key's tokens are ids[-n_answer:]


def passkey_prompts(tok, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                    skip_short: bool = False) -> List[PasskeyPrompt]:
    """One prompt per (length, depth, trial): filler sentences (whole ones, as many as fit), the key sentence
    after ``round(depth * n)`` of the ``n`` filler sentences, the question; the key's tokens follow and the
    whole sequence has at most ``length`` tokens. Keys are 5-digit, seeded. Tokenised as one string each.
    A length that cannot hold the key sentence, the question and the key is an error, or (``skip_short``)
    left out."""
    g = torch.Generator().manual_seed(seed)
    avg = max(1.0, sum(len(x) for x in tok.encode_batch([" ".join(PASSKEY_FILLER)])) / len(PASSKEY_FILLER))
    out = []

    def build(n, depth, key):
        fill = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n)]
        p = int(round(depth * n))
        text = " ".join(fill[:p] + [PASSKEY_SENTENCE.format(key=key)] + fill[p:] + [PASSKEY_QUESTION])
        ids_p, ids_f = tok.encode_batch([text, f"{text} {key}"])
        if ids_f[: len(ids_p)] != ids_p or len(ids_f) == len(ids_p):  # tokenisation merged across the boundary
            ids_f = list(ids_p) + tok.encode_batch([f" {key}"])[0]
        return list(ids_f), len(ids_f) - len(ids_p)

    for L in lengths:
        for d in depths:
            for t in range(trials):
                key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
                base, _ = build(0, d, key)
                n = max(0, int((L - len(base)) / avg))
                ids, k = build(n, d, key)
                while len(ids) > L and n > 0:
                    n = max(0, n - max(1, int((len(ids) - L) / avg)))
                    ids, k = build(n, d, key)
                while True:  # as many whole sentences as fit
                    nxt, k2 = build(n + 1, d, key)
                    if len(nxt) > L:
                        break
                    n, ids, k = n + 1, nxt, k2
                if len(ids) > L:
                    if skip_short:
                        continue
                    raise ConfigError(f"--passkey-lengths: {L} tokens cannot hold the key sentence and the question "
                                      f"({len(ids)} tokens without any filler)")
                out.append(PasskeyPrompt(L, float(d), t, key, ids, k))
    return out


@torch.no_grad()
def passkey_scores(hidden_fn: HiddenFn, head, prompts: Sequence[PasskeyPrompt], budget_tokens: int) -> List[tuple]:
    """``[(correct, mean key-token log-prob)]`` per prompt, from one teacher-forced forward of prompt + key
    (greedy decoding reproduces the key iff the argmax at each key position is the key's token)."""
    dev = head.weight.device
    res: List[Optional[tuple]] = [None] * len(prompts)
    by_len: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.ids), []).append(i)
    for T, idx in by_len.items():
        rows = rows_per_forward(budget_tokens, T)
        for j in range(0, len(idx), rows):
            ii = idx[j : j + rows]
            K = max(prompts[i].n_answer for i in ii)
            x = torch.tensor([prompts[i].ids for i in ii], dtype=torch.long)
            logits = head.logits(hidden_fn(x[:, :-1].to(dev))[:, -K:].float()).float()  # [B, K, V]: small
            logp = torch.log_softmax(logits, -1).cpu()
            for r, i in enumerate(ii):
                k = prompts[i].n_answer
                tgt = x[r, -k:]
                lp = logp[r, -k:]
                ok = bool((lp.argmax(-1) == tgt).all())
                res[i] = (ok, lp.gather(-1, tgt[:, None]).mean().item())
    return res  # type: ignore[return-value]


def passkey_grid(prompts: Sequence[PasskeyPrompt], scores: Sequence[tuple], lengths, depths) -> dict:
    acc = [[0.0] * len(depths) for _ in lengths]
    lp = [[0.0] * len(depths) for _ in lengths]
    cnt = [[0] * len(depths) for _ in lengths]
    li, di = {L: a for a, L in enumerate(lengths)}, {float(d): b for b, d in enumerate(depths)}
    for p, (ok, l) in zip(prompts, scores):
        a, b = li[p.length], di[p.depth]
        acc[a][b] += float(ok)
        lp[a][b] += l
        cnt[a][b] += 1
    acc = [[v / max(1, c) for v, c in zip(ra, rc)] for ra, rc in zip(acc, cnt)]
    lp = [[v / max(1, c) for v, c in zip(ra, rc)] for ra, rc in zip(lp, cnt)]
    n = sum(map(sum, cnt))
    return {
        "accuracy": sum(float(ok) for ok, _ in scores) / max(1, n),
        "key_logprob": sum(l for _, l in scores) / max(1, n),
        "accuracy_grid": acc, "key_logprob_grid": lp,
    }
