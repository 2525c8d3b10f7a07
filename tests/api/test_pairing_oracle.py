"""An independent oracle for the two views of a window and how their rows pair (docs/maths.md §4).

Written from token windows, without lsa_kernels.pairing, lsa_kernels.maths or lsa_kernels.reference:

* a window ``win [B, T + l_extra + 1]`` of token ids gives the long view (window positions ``0 .. T-1``)
  and the short view (positions ``l_extra .. l_extra + T - 1``); the row at window position ``s`` predicts
  ``win[:, s + 1]`` in both views;
* a pair is the long row and the short row that sit on the SAME window position (so both predict the same
  token), and it counts when the targets of BOTH rows are valid; ``positions="last"`` keeps, per sequence,
  the pair with the largest window position among those that count;
* every quantity is a plain loop over rows and pairs in float64, divergences from their textbook sums.

The labels are built so that every hard case occurs: ignored labels on one view only (the other view's
label at the same window position valid, both ways round), a sequence with no valid pair at all (its
misalignment contributes nothing, its CE rows still count), trailing pairs that do not count after the
last one that does (what ``positions="last"`` must skip), a sequence whose only counted pair is its first,
and a sequence where every label is valid.
Every backend runs: the reference, the cpu backend on both of its paths (compiled kernels and ATen), and
Triton (under the interpreter on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch

import lsa_kernels as L
from lsa_kernels import _ext
from lsa_kernels.backends import cpu

from _util import IGN, triton_available

DIVERGENCES = ("sce", "kl", "kl_reverse", "sym_kl", "js")
B, T, H, V, L_EXTRA = 5, 11, 12, 29, 3
P = T - L_EXTRA  # pairs per sequence


# ----------------------------------------------------------------------------------------- the data


def _window_case(seed: int = 0):
    """Token windows, the two views' labels (with ignored positions) and hidden states for each row.

    Returns (win, labels_long, labels_short, hidden_long, hidden_short, w, bias) — labels as the public
    API wants them (``[B, T]``, row t of a view predicts the token after it), hidden states correlated
    through the token at each row (both views of one text look alike), all float64.
    """
    g = torch.Generator().manual_seed(seed)
    win = torch.randint(0, V, (B, T + L_EXTRA + 1), generator=g)
    labels_long = win[:, 1 : T + 1].clone()  # long row t sits on window position t
    labels_short = win[:, L_EXTRA + 1 : L_EXTRA + T + 1].clone()  # short row t sits on position l_extra + t

    def ignore_long(b, s):  # the long row on window position s loses its target
        labels_long[b, s] = IGN

    def ignore_short(b, s):
        labels_short[b, s - L_EXTRA] = IGN

    shared = range(L_EXTRA, T)  # window positions held by a row of each view
    # sequence 0: scattered one-sided ignores, both ways round, plus one position ignored in both views
    for s in (L_EXTRA, L_EXTRA + 3):
        ignore_long(0, s)
    for s in (L_EXTRA + 1, T - 2):
        ignore_short(0, s)
    ignore_long(0, L_EXTRA + 5)
    ignore_short(0, L_EXTRA + 5)
    ignore_long(0, 1)  # a long-only row outside the overlap: CE only
    # sequence 1: no valid pair, every label on the overlap valid in exactly one view
    for k, s in enumerate(shared):
        (ignore_long if k % 2 == 0 else ignore_short)(1, s)
    # sequence 2: valid pairs first, then the last three pairs one-sided (trailing pairs that do not count)
    ignore_long(2, T - 1)
    ignore_short(2, T - 2)
    ignore_long(2, T - 3)
    ignore_short(2, L_EXTRA + 1)
    # sequence 3: every label valid
    # sequence 4: only the FIRST pair counts (every later one one-sided): "last" must keep pair 0
    for k, s in enumerate(range(L_EXTRA + 1, T)):
        (ignore_long if k % 2 == 0 else ignore_short)(4, s)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64)
    tok_long = win[:, :T]
    tok_short = win[:, L_EXTRA : L_EXTRA + T]
    hidden_long = emb[tok_long] + 0.8 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    hidden_short = emb[tok_short] + 0.8 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (1.5 / H**0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    return win, labels_long, labels_short, hidden_long, hidden_short, w, bias


def test_the_case_has_every_hard_pattern():
    """The construction above really contains what the oracle is meant to judge."""
    win, yl, ys = _window_case()[:3]
    counts = []
    for b in range(B):
        flags = [(int(yl[b, s]) != IGN, int(ys[b, s - L_EXTRA]) != IGN) for s in range(L_EXTRA, T)]
        counts.append([i for i, (a, c) in enumerate(flags) if a and c])
        for i, (a, c) in enumerate(flags):
            if a and c:  # the two rows of a pair predict the same window token
                assert int(yl[b, L_EXTRA + i]) == int(ys[b, i]) == int(win[b, L_EXTRA + i + 1])
    one_sided = [(b, i) for b in range(B) for i in range(P)
                 if (int(yl[b, L_EXTRA + i]) != IGN) != (int(ys[b, i]) != IGN)]
    assert any(int(yl[b, L_EXTRA + i]) == IGN for b, i in one_sided)  # long ignored, short valid
    assert any(int(ys[b, i]) == IGN for b, i in one_sided)  # short ignored, long valid
    assert counts[1] == []  # a sequence with no valid pair
    assert len(counts[2]) >= 2 and counts[2][-1] < P - 1  # several valid pairs, then trailing invalid ones
    assert counts[3] == list(range(P))
    assert counts[4] == [0]


# ----------------------------------------------------------------------------------------- the oracle


def _capped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _row_ce(z, y, eps, zl):
    """CE of one row of logits (docs/maths.md §3): (1-ε)(lse - z_y) + ε(lse - mean z) + λ lse²."""
    lse = torch.logsumexp(z, 0)
    return (1 - eps) * (lse - z[y]) + eps * (lse - z.mean()) + zl * lse * lse


def _divergence(a, b, kind, tau):
    """D(softmax(a/τ), softmax(b/τ)) from the textbook sums."""
    lp, lq = torch.log_softmax(a / tau, 0), torch.log_softmax(b / tau, 0)
    p, q = lp.exp(), lq.exp()
    kl_pq = (p * (lp - lq)).sum()
    kl_qp = (q * (lq - lp)).sum()
    if kind == "sce":  # H(p, q) + H(q, p)
        return -(p * lq).sum() - (q * lp).sum()
    if kind == "kl":
        return kl_pq
    if kind == "kl_reverse":
        return kl_qp
    if kind == "sym_kl":
        return kl_pq + kl_qp
    if kind == "js":
        m = 0.5 * (p + q)
        return 0.5 * (p * (lp - m.log())).sum() + 0.5 * (q * (lq - m.log())).sum()
    raise KeyError(kind)


def oracle(hl, hs, w, bias, yl, ys, *, l_extra, alpha, divergence, temperature, detach, positions, softcap,
           label_smoothing, z_loss):
    """(loss, ce, misalign) by loops over rows and window positions."""
    Bn, Tn, _ = hl.shape
    ce_terms, div_terms = [], []
    for b in range(Bn):
        # window position s -> (row of the long view, row of the short view); a row exists where 0 <= row < T
        long_row = {s: s for s in range(Tn)}
        short_row = {s: s - l_extra for s in range(l_extra, l_extra + Tn)}
        for view_rows, h, y in ((long_row, hl, yl), (short_row, hs, ys)):
            for s, r in view_rows.items():
                if int(y[b, r]) != IGN:
                    z = _capped(h[b, r] @ w.T + bias, softcap)
                    ce_terms.append(_row_ce(z, int(y[b, r]), label_smoothing, z_loss))
        counted = [s for s in sorted(set(long_row) & set(short_row))
                   if int(yl[b, long_row[s]]) != IGN and int(ys[b, short_row[s]]) != IGN]
        if positions == "last":
            counted = counted[-1:]
        for s in counted:
            a = _capped(hl[b, long_row[s]] @ w.T + bias, softcap)
            c = _capped(hs[b, short_row[s]] @ w.T + bias, softcap)
            if detach == "long":
                a = a.detach()
            elif detach == "short":
                c = c.detach()
            div_terms.append(_divergence(a, c, divergence, temperature))
    zero = hl.sum() * 0.0
    ce = torch.stack(ce_terms).sum() / len(ce_terms) if ce_terms else zero
    misalign = torch.stack(div_terms).sum() / len(div_terms) if div_terms else zero
    return ce + alpha * misalign, ce, misalign


# ----------------------------------------------------------------------------------------- the backends


def _paths():
    out = ["reference", "cpu-aten"]
    if _ext.built():
        out.append("cpu-ext")
    if triton_available():
        out.append("triton")
    return out


def _run(path, fn, ins, yl, ys, kw):
    if path == "cpu-ext":
        assert _ext.built()
    backend = {"cpu-aten": "cpu", "cpu-ext": "cpu"}.get(path, path)
    with _ext.disable(path == "cpu-aten"):
        if path.startswith("cpu"):
            assert cpu.use_ext(ins[0]) == (path == "cpu-ext")
        return fn(ins[0], ins[1], ins[2], yl, ys, linear_bias=ins[3], backend=backend, **kw)


# option sets that vary with the divergence so that every divergence meets softcap, τ != 1, detach and the
# CE extras somewhere without a full cross product (each case runs 4 backends, Triton under the interpreter)
OPTIONS = {
    "sce": dict(temperature=1.0, detach=None, softcap=None, label_smoothing=0.0, z_loss=0.0),
    "kl": dict(temperature=0.7, detach="long", softcap=4.0, label_smoothing=0.1, z_loss=0.0),
    "kl_reverse": dict(temperature=1.3, detach="short", softcap=None, label_smoothing=0.0, z_loss=1e-3),
    "sym_kl": dict(temperature=1.0, detach=None, softcap=3.0, label_smoothing=0.0, z_loss=0.0),
    "js": dict(temperature=0.8, detach=None, softcap=None, label_smoothing=0.1, z_loss=1e-3),
}


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("positions", ["overlap", "last"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_short_against_window_oracle(path, positions, divergence):
    win, yl, ys, hl, hs, w, bias = _window_case(seed=DIVERGENCES.index(divergence))
    kw = dict(l_extra=L_EXTRA, alpha=0.7, divergence=divergence, positions=positions, **OPTIONS[divergence])
    coefs = (1.0, 0.5, -2.0)  # loss, ce and misalign each carry their own gradient weight

    t_ins = [t.clone().requires_grad_(True) for t in (hl, hs, w, bias)]
    want = oracle(*t_ins, yl, ys, **kw)
    g_want = torch.autograd.grad(sum(c * o for c, o in zip(coefs, want)), t_ins)

    o_ins = [t.float().requires_grad_(True) for t in (hl, hs, w, bias)]
    got = _run(path, L.long_short_loss, o_ins, yl, ys, kw)
    g_got = torch.autograd.grad(sum(c * o.double() for c, o in zip(coefs, got)), o_ins)

    assert want[2].item() > 0  # pairs were counted and their divergence is not trivially zero
    for name, a, b in zip(("loss", "ce", "misalign"), got, want):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-5, atol=2e-6, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(("d_long", "d_short", "dw", "db"), g_got, g_want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-6 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", _paths())
def test_misalign_of_one_sequence_alone(path):
    """Each hard sequence on its own: its misalignment is exactly the oracle's (no other sequence to
    average with): the no-pair sequence gives 0 (and only its CE gradient), the trailing one under
    "last" gives the divergence of its last counted pair."""
    win, yl, ys, hl, hs, w, bias = _window_case(seed=7)
    for b in range(B):
        for positions in ("overlap", "last"):
            kw = dict(l_extra=L_EXTRA, alpha=1.0, divergence="kl", positions=positions, temperature=1.0,
                      detach=None, softcap=None, label_smoothing=0.0, z_loss=0.0)
            sl = slice(b, b + 1)
            want = oracle(hl[sl], hs[sl], w, bias, yl[sl], ys[sl], **kw)
            ins = [t.float() for t in (hl[sl], hs[sl], w, bias)]
            got = _run(path, L.long_short_loss, ins, yl[sl], ys[sl], kw)
            torch.testing.assert_close(got.misalign.double(), want[2], rtol=2e-5, atol=1e-7,
                                       msg=lambda m: f"sequence {b}, {positions}: {m}")
            if b == 1:
                assert got.misalign.item() == 0.0


def test_oracle_sanity_identical_paired_rows_zero_misalign():
    """The oracle's own pairing: when each short row is a copy of the long row on the same window position
    the misalignment is 0 for every divergence but sce (whose value is then the two entropies), and a
    pairing shifted by one position would not be."""
    win, yl, ys, hl, hs, w, bias = _window_case(seed=3)
    hs = torch.randn_like(hs)
    hs[:, : T - L_EXTRA] = hl[:, L_EXTRA:]
    kw = dict(l_extra=L_EXTRA, alpha=1.0, temperature=1.0, detach=None, positions="overlap", softcap=None,
              label_smoothing=0.0, z_loss=0.0)
    for div in ("kl", "kl_reverse", "sym_kl", "js"):
        assert abs(oracle(hl, hs, w, bias, yl, ys, divergence=div, **kw)[2].item()) < 1e-12
        ours = L.long_short_loss(hl.float(), hs.float(), w.float(), yl, ys, linear_bias=bias.float(),
                                 divergence=div, backend="cpu", **kw)
        assert abs(ours.misalign.item()) < 1e-6
        shifted = oracle(hl, hs, w, bias, yl, ys, divergence=div, **{**kw, "l_extra": L_EXTRA + 1})
        assert shifted[2].item() > 1e-3
    assert math.isfinite(oracle(hl, hs, w, bias, yl, ys, divergence="sce", **kw)[2].item())


def test_make_views_cut_the_window_as_the_oracle_does():
    """lsa_kernels.pairing.make_views (what the training loop and the HF adapter use) against the window
    positions above: long = positions 0 .. n-1, short = positions l_extra .. l_extra + n - 1."""
    from lsa_kernels.pairing import make_views

    win = torch.arange(2 * (T + L_EXTRA + 1)).reshape(2, -1)
    long, short = make_views(win, L_EXTRA)
    n = T + 1
    assert long.shape == short.shape == (2, n)
    for s in range(n):
        assert torch.equal(long[:, s], win[:, s]) and torch.equal(short[:, s], win[:, L_EXTRA + s])
    # rows on the same window position hold the same token: long row l_extra + i <-> short row i
    assert torch.equal(long[:, L_EXTRA:], short[:, : n - L_EXTRA])


def test_pair_mask_against_the_window_oracle():
    """pairing.pair_mask itself (its default ignore_index too) against the pairs the oracle counts, and with
    a class id as ignore_index (labels below it stay valid)."""
    from lsa_kernels.pairing import pair_mask

    _, yl, ys = _window_case()[:3]
    for ign in (IGN, 7):
        yl2 = torch.where(yl == IGN, torch.full_like(yl, ign), yl)
        ys2 = torch.where(ys == IGN, torch.full_like(ys, ign), ys)
        assert bool(((yl2 >= 0) & (yl2 < ign)).any()) or ign == IGN
        for positions in ("overlap", "last"):
            want = torch.zeros(B, P, dtype=torch.bool)
            for b in range(B):
                counted = [i for i in range(P) if int(yl2[b, L_EXTRA + i]) != ign and int(ys2[b, i]) != ign]
                want[b, counted[-1:] if positions == "last" else counted] = True
            if ign == IGN:  # the default
                got = pair_mask(yl2, ys2, L_EXTRA) if positions == "overlap" else pair_mask(yl2, ys2, L_EXTRA, "last")
            else:
                got = pair_mask(yl2, ys2, L_EXTRA, positions, ign)
            assert torch.equal(got, want), (ign, positions)
            built = "".join(list(positions))  # an equal string that is not the interned literal
            assert torch.equal(pair_mask(yl2, ys2, L_EXTRA, built, ign), want), (ign, positions)


def test_make_views_refuses_exactly_what_does_not_fit():
    """Every window length n and l_extra: accepted iff 1 <= l_extra and both views (n - l_extra tokens) hold
    more than l_extra tokens; refusals name l_extra and the window length."""
    from lsa_kernels.pairing import make_views

    for n in range(2, 13):
        win = torch.arange(n)  # 1-D: the length is shape[-1], not shape[1]
        for l_extra in range(-1, n + 1):
            if l_extra >= 1 and n - l_extra >= l_extra + 1:
                long, short = make_views(win, l_extra)
                assert long.shape[-1] == short.shape[-1] == n - l_extra
            else:
                with pytest.raises(ValueError, match=f"l_extra={l_extra} does not fit a window of {n} tokens"):
                    make_views(win, l_extra)
                with pytest.raises(ValueError, match=f"a window of {n} tokens"):  # [B, n]: not the batch size
                    make_views(win.expand(3, n), l_extra)


def test_sample_l_extra_edges():
    g = torch.Generator().manual_seed(0)
    assert {L.sample_l_extra(2, generator=g) for _ in range(20)} == {1}  # the smallest l_train
    assert {L.sample_l_extra(3, generator=g) for _ in range(20)} == {1}
    for bad in (True, 4.0, "8"):
        with pytest.raises(TypeError, match="l_train must be an int"):
            L.sample_l_extra(bad)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="l_train must be >= 2"):
            L.sample_l_extra(bad)
