"""Per-chunk functions of the cpu backend in ATen: what happens to a chunk of logits between the GEMMs.

Each function takes a chunk of RAW logits ``z = x Wᵀ + b`` (fp32, or fp64 for gradcheck; ``[c, V]``,
contiguous, a view of the chunk loop's buffer), applies the softcap, reduces every row to its
statistics, and — given gradient coefficients — overwrites ``z`` with ``dz = ∂(Σ coef·loss)/∂z_raw``,
which the loop then feeds to the gradient GEMMs. Without coefficients the contents of ``z`` afterwards
are unspecified.

Maths: docs/maths.md §3 (CE: row loss, lse, ∂ℓ/∂z, softcap derivative) and §5 (the per-row statistics
of :class:`lsa_kernels.maths.Stat`, each divergence's ∂D/∂a and ∂D/∂b, the expm1 and log-space js forms):

    CE      lse = logsumexp(z),  ℓ = maths.ce_row_loss(lse, z_y, mean z),
            dz = coef ⊙ (softmax(z)(1 + 2λ·lse) − (1−ε)·onehot(y) − ε/V_total) ⊙ (1 − (z/c)²)
    dense   (probability targets, class-weighted smoothing; §11, contract.DenseTarget) T = κ·t⊙c + β·c + α·onehot(y):
            sums Σ t c z, Σ t c, Σ c z, z_y;  dz = (coef_p ⊙ softmax(z) − coef ⊙ T) ⊙ (1 − (z/c)²),
            coef_p = coef·(A + 2λω·lse) (given, or formed here in a fused pass), dt = coef·κ·c ⊙ (lse − z)
    pairs   a = z_p/τ, b = z_q/τ, p = softmax(a), q = softmax(b): stats (maths.py table), then
            dz_p = coef_ce_p·(CE gradient of z_p) + coef_div/τ·∂D/∂a,  dz_q likewise, ⊙ softcap'

Memory (``K`` of :mod:`lsa_kernels.backends.cpu`: fp32 ``[c, V]`` buffers alive at once, the chunk's own
included, per row of the chunk): CE 3, pairs 9 per pair of rows (a, b, p, q, u or the js log ratios,
∂D/∂a, ∂D/∂b, the CE softmax), i.e. ``K_PAIR = 5`` per chunk row (both views' rows count). Checked by
tests/backends/test_memory.py.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...maths import EXPM1_AGREE, EXPM1_CLAMP, Stat, ce_row_loss, divergence_from_stats
from ...options import N_PAIR_STATS, CEOptions, PairOptions
from ..contract import DenseTarget, PairCoefs

Tensor = torch.Tensor

#: fp32 [rows, V] buffers alive at once per row of a chunk (module docstring; tests/backends/test_memory.py)
K_CE = 3
K_PAIR = 5
K_DENSE = 4  # dense_chunk, at most: z, logsumexp's temporary / p (softcap), t promoted to fp32 or t ⊙ c, c-term


def k_dense(T: DenseTarget, acc: torch.dtype, opts: CEOptions, inplace: bool = False) -> int:
    """fp32 ``[rows, V]`` buffers :func:`dense_chunk` keeps alive per chunk row for this target: z and
    logsumexp's temporary (or p; ``inplace``: z only — a gradient pass without softcap or dt), + 1 with a
    softcap (p beside the capped z), + 1 for t promoted or t ⊙ c, + 1 for the smoothing term's ``coef·β·c``
    with class weights (≤ K_DENSE). The compiled op needs fewer: :func:`.ext.k_dense` (1; 2 for a t it copies)."""
    k = (1 if inplace else 2) + bool(opts.has_softcap)
    if T.t is not None and (T.t.dtype != acc or T.c is not None):
        k += 1
    if T.beta != 0 and T.c is not None:
        k += 1
    return min(k, K_DENSE)
K_CE_EXT = 4  # ce_chunk_ext: z, log p, p (+ the entropy's two temporaries in forward)
# long-short's per-view extras (view_extras / entropy_grad on one part's rows at a time, each part at most the
# chunk's rows): the forward's 2 temporaries (K >= 3), the backward's entropy terms of both views kept across
# pair_chunk (+1) and the 3 buffers of one part's entropy_grad while another's term is alive (K >= 4)
K_PAIR_EXTRA = 1
K_VIEW_EXTRAS_FWD = 3
K_VIEW_EXTRAS_BWD = 4


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a[i, v] b[i, v] without a [c, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _softcap_(z: Tensor, softcap: Optional[float]) -> Tensor:
    if softcap is not None and softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _softcap_grad_(dz: Tensor, zc: Tensor, softcap: Optional[float], scale: float = 1.0) -> Tensor:
    """``dz *= 1 − (zc·scale/c)²`` where ``zc·scale`` is the softcapped logit (chain rule through tanh)."""
    if softcap is None or not softcap > 0:
        return dz
    d = zc * (scale / softcap)
    d.square_().neg_().add_(1.0)
    return dz.mul_(d)


def _safe_targets(y: Tensor, V: int, ignore_index: int) -> Tensor:
    """Targets with a one-hot in this weight, else −1 (ignored rows, and ids >= V: another vocab shard)."""
    return torch.where((y != ignore_index) & (y >= 0) & (y < V), y, torch.full_like(y, -1))


def _ce_rows(z: Tensor, y: Tensor, opts: CEOptions) -> Tuple[Tensor, Tensor]:
    """(loss_row, lse) of a chunk of softcapped logits."""
    ys = _safe_targets(y, z.shape[1], opts.ignore_index)
    lse = torch.logsumexp(z, dim=1)
    zy = z.gather(1, ys.clamp(min=0).unsqueeze(1)).squeeze(1)
    zmean = z.mean(dim=1) if opts.label_smoothing > 0 else None
    return ce_row_loss(lse, zy, zmean, y != opts.ignore_index, opts.label_smoothing, opts.z_loss), lse


def _ce_grad_(p: Tensor, lse: Tensor, y: Tensor, coef: Tensor, opts: CEOptions) -> Tensor:
    """Turn ``p = softmax(z)`` in place into ``coef ⊙ ∂ℓ/∂z`` (before the softcap derivative)."""
    eps, V = opts.label_smoothing, p.shape[1]
    ys = _safe_targets(y, V, opts.ignore_index)
    if opts.z_loss > 0:
        p.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(1))
    hot = (ys >= 0).to(p.dtype)
    p.scatter_add_(1, ys.clamp(min=0).unsqueeze(1), (hot * -(1.0 - eps)).unsqueeze(1))
    if eps > 0:
        p.sub_(eps / (opts.vocab_total or V))
    return p.mul_(coef.unsqueeze(1))


def ce_chunk(z: Tensor, y: Tensor, opts: CEOptions, lse: Optional[Tensor] = None,
             coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(loss [c], lse [c]) of a chunk; with ``coef`` also ``z ← dz``. With ``lse`` given (backward from saved
    statistics) the loss is not computed (zeros) and only the gradient is formed."""
    _softcap_(z, opts.softcap)
    if lse is None:
        loss, lse = _ce_rows(z, y, opts)
    else:
        loss = torch.zeros_like(lse)
    if coef is not None:
        capped = opts.has_softcap
        # with a softcap the capped logits are still needed for the chain rule: softmax into a new buffer
        p = (z - lse.unsqueeze(1)).exp_() if capped else z.sub_(lse.unsqueeze(1)).exp_()
        dz = _softcap_grad_(_ce_grad_(p, lse, y, coef, opts), z, opts.softcap)
        if capped:
            z.copy_(dz)
    return loss, lse


def ce_chunk_ext(z: Tensor, y: Tensor, opts: CEOptions, lse: Optional[Tensor] = None, coef: Optional[Tensor] = None,
                 entropy: Optional[Tensor] = None, coef_entropy: Optional[Tensor] = None):
    """:func:`ce_chunk` with the per-token extras (docs/maths.md §3) -> (loss, lse, entropy, argmax).

    Forward (``lse`` None): with ``opts.entropy`` the entropy ``H = log Σ_v e^{z_v−m} − E_p[z − m]`` (two
    non-negative terms: no cancellation for a confident row), with ``opts.argmax`` the argmax of the softcapped
    z (ties: the lowest index, as torch.argmax); else None. Gradient (``coef`` given): ``z ← dz`` of
    :func:`ce_chunk` plus ``coef_entropy ⊙ ∂H/∂z = −coef_entropy ⊙ p ⊙ (log p + H)`` (every row) with ``entropy``
    the forward's H. Memory: K_CE_EXT fp32 [c, V] buffers per chunk row."""
    _softcap_(z, opts.softcap)
    ent = am = None
    if lse is None:
        loss, lse = _ce_rows(z, y, opts)
        if opts.argmax:
            am = z.argmax(1)
        if opts.entropy:
            zm = z - z.amax(1, keepdim=True)
            e = zm.exp()
            s = e.sum(1)
            ent = s.log() - _rowdot(e, zm) / s
            del zm, e
    else:
        loss = torch.zeros_like(lse)
    if coef is not None:
        lp = z - lse.unsqueeze(1)  # log p
        p = lp.exp()
        if coef_entropy is not None:
            h = entropy if entropy is not None else ent
            lp.add_(h.to(lp.dtype).unsqueeze(1)).mul_(p).mul_(coef_entropy.to(lp.dtype).unsqueeze(1))
        dz = _ce_grad_(p, lse, y, coef, opts)
        if coef_entropy is not None:
            dz.sub_(lp)
        del lp
        z.copy_(_softcap_grad_(dz, z, opts.softcap))
    return loss, lse, ent, am


def dense_chunk(z: Tensor, y: Optional[Tensor], T: DenseTarget, opts: CEOptions, lse: Optional[Tensor] = None,
                coef_p: Optional[Tensor] = None, coef: Optional[Tensor] = None, dt: Optional[Tensor] = None,
                fused: bool = False):
    """Dense-target sums of a chunk -> (lse, tz, tm, cz, zy) (contract.DenseOut's columns; None where not formed:
    tz, tm without ``T.t``, cz with ``T.beta == 0``, zy without ``y``). With ``coef`` also ``z ← dz`` (module
    docstring): ``coef_p`` given, or with ``fused`` formed here from this chunk's sums (no shards). With ``lse``
    given (backward) no sums are formed. ``dt`` ([c, V] out, overwritten): ∂(Σ coef·ℓ)/∂t. Memory: K_DENSE."""
    _softcap_(z, opts.softcap)
    acc = z.dtype
    V = z.shape[1]
    c = None if T.c is None else T.c.to(acc)
    tc = None  # t ⊙ c of the chunk (fp32)
    if T.t is not None and (lse is None or coef is not None):
        tc = T.t.to(acc)
        if c is not None:
            tc = tc * c
    ys = None if y is None else _safe_targets(y, V, opts.ignore_index)
    tz = tm = cz = zy = None
    capped = opts.has_softcap
    # in place (no [c, V] temporary) when z is not needed after the softmax: no softcap derivative, no dt
    inplace = coef is not None and not capped and dt is None
    scale = None  # the in-place forward leaves e = exp(z − m) in z: p = e·scale
    if lse is None:
        if tc is not None:
            tz, tm = _rowdot(tc, z), tc.sum(1)
        if T.beta != 0:
            cz = z.sum(1) if c is None else z @ c
        if ys is not None:
            zy = z.gather(1, ys.clamp(min=0).unsqueeze(1)).squeeze(1) * (ys >= 0).to(acc)
        if inplace:
            m = z.amax(1)
            ssum = z.sub_(m.unsqueeze(1)).exp_().sum(1)
            lse, scale = m + ssum.log(), 1.0 / ssum
        else:
            lse = torch.logsumexp(z, dim=1)
    if coef is None:
        return lse, tz, tm, cz, zy
    if fused:
        A = torch.zeros_like(lse)
        if tm is not None:
            A = A + T.kappa * tm
        if T.beta != 0:
            A = A + T.beta * T.c_sum
        if T.alpha is not None:
            A = A + T.alpha
        if opts.z_loss > 0:
            A = A + 2.0 * opts.z_loss * lse * (1.0 if T.omega is None else T.omega)
        coef_p = coef * A
    if dt is not None:  # ∂/∂t_v = coef·κ·c_v·(lse − z_v)   (before z is overwritten)
        d = torch.sub(lse.unsqueeze(1), z, out=dt) if dt.dtype == acc else lse.unsqueeze(1) - z
        d.mul_((coef * T.kappa).unsqueeze(1))
        if c is not None:
            d.mul_(c)
        if d is not dt:
            dt.copy_(d)
    if scale is not None:
        p = z.mul_((coef_p * scale).unsqueeze(1))
    else:
        p = (z - lse.unsqueeze(1)).exp_() if capped else z.sub_(lse.unsqueeze(1)).exp_()
        p.mul_(coef_p.unsqueeze(1))
    if tc is not None:
        p.addcmul_(tc, (coef * T.kappa).unsqueeze(1), value=-1.0)  # tc may be the user's t: not in place
    if T.beta != 0:
        cb = (coef * T.beta).unsqueeze(1)
        p.sub_(cb if c is None else cb * c)
    if ys is not None and T.alpha is not None:
        hot = (ys >= 0).to(acc) * T.alpha * coef
        p.scatter_add_(1, ys.clamp(min=0).unsqueeze(1), (-hot).unsqueeze(1))
    dz = _softcap_grad_(p, z, opts.softcap)
    if capped:
        z.copy_(dz)
    return lse, tz, tm, cz, zy


def view_extras(z: Tensor, opts: CEOptions, entropy: bool, argmax: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(entropy [c] or None, argmax [c] or None) of a chunk of RAW logits, left unchanged (long-short's per-view
    outputs, docs/maths.md §4; the forms of :func:`ce_chunk_ext`): ``H = log Σ e^{z−m} − E_p[z − m]`` of the
    softcapped z, the argmax of the softcapped z (ties: lowest index). Memory: 2 fp32 [c, V] temporaries."""
    zc = _softcap_(z.clone(), opts.softcap)
    am = zc.argmax(1) if argmax else None
    ent = None
    if entropy:
        zc.sub_(zc.amax(1, keepdim=True))
        e = zc.exp()
        s = e.sum(1)
        ent = s.log() - _rowdot(e, zc) / s
    return ent, am


def entropy_grad(z: Tensor, opts: CEOptions, lse: Tensor, entropy: Tensor, coef: Tensor) -> Tensor:
    """``coef ⊙ ∂H/∂z_raw = −coef ⊙ p ⊙ (log p + H) ⊙ softcap'`` ``[c, V]`` of a chunk of RAW logits (left
    unchanged), p = softmax(softcap(z)) with the forward's ``lse`` and ``entropy`` H (docs/maths.md §3, §4).
    Memory: the result plus 2 fp32 [c, V] temporaries."""
    zc = _softcap_(z.clone(), opts.softcap)
    lp = zc - lse.to(zc.dtype).unsqueeze(1)
    p = lp.exp()
    g = lp.add_(entropy.to(zc.dtype).unsqueeze(1)).mul_(p).mul_(coef.to(zc.dtype).neg().unsqueeze(1))
    del p
    return _softcap_grad_(g, zc, opts.softcap)


def _js_log_ratios(a: Tensor, b: Tensor, lta: Tensor, ltb: Tensor) -> Tuple[Tensor, Tensor]:
    """(log p − log m, log q − log m), m = (p + q)/2, all in log space (docs/maths.md §5 js);
    ``lta``/``ltb`` are the ``[c, 1]`` normalisers of a and b."""
    lp = a - lta
    lq = b - ltb
    lm = torch.logaddexp(lp, lq).sub_(math.log(2.0))
    return lp.sub_(lm), lq.sub_(lm)


def _expm1c(t: Tensor) -> Tensor:
    return torch.expm1(t.clamp(max=EXPM1_CLAMP))


#: φ(v) = expm1(v) − v by its Taylor series (v²/2! + v³/3! + ... + v⁹/9!) where |v| <= PHI_SERIES_MAX
#: (truncation < 2e-9 relative there; beyond it expm1(v) − v cancels by less than 5x)
PHI_SERIES_MAX = 0.5
#: ``KL = E[φ(v)] − ψ(s)`` for ``|s| <= PSI_MAX`` (s = E[expm1 v]); beyond, ``log1p(s) − E[v]`` (no cancellation
#: there, while E[φ(v)] − s would lose ``|s|/KL`` ulps)
PSI_MAX = 1.0
_PHI_COEFS = tuple(1.0 / math.factorial(k) for k in range(9, 1, -1))  # 1/9!, ..., 1/2!


def _centred_kl(w: Tensor, u: Tensor, c: Tensor, sign: float, lta: Tensor, ltb: Tensor) -> Tensor:
    """One KL of a chunk from the per-element differences centred on the row's own mean (docs/maths.md §5):
    ``KL = log1p(s) − E_w[v] = E_w[φ(v)] − ψ(s)``, ``s = E_w[expm1(v)]``, ``v = sign·(u − c)``,
    ``φ(v) = expm1(v) − v``, ``ψ(s) = s − log1p(s)`` (the φ form for ``|s| <= PSI_MAX``, the log1p one beyond);
    ``w = q, sign = +1`` gives KL(q‖p) (kl_reverse), ``w = p, sign = −1`` KL(p‖q) (kl); ``c [C]`` is E_w[u].

    Exact for any constant ``c`` (both views' softmax is shift-invariant); with ``c = E_w[u]`` the sums are
    of O(KL) and O(Var u) terms, so a common shift of the two views' logits costs no precision (the plain
    stats form ``log1p(E[expm1(u)]) − E[u]`` loses ``E[u]²/Var(u)`` ulps). Rows where the expm1 clamp bit
    (``log1p(E_w[expm1 v])`` disagrees with ``sign·(lse_a − lse_b − c)`` as in maths.divergence_from_stats)
    take that plain difference, which does not cancel there. The row-level combination runs in fp64.
    Memory: 3 fp32 [C, V] temporaries (+ a bool mask)."""
    v = u - c.unsqueeze(1)
    if sign < 0:
        v.neg_()
    small = v.abs() <= PHI_SERIES_MAX
    e = v.clamp(max=EXPM1_CLAMP).expm1_()
    xc = _rowdot(w, e)
    yc = _rowdot(w, v).double()
    s = torch.full_like(v, _PHI_COEFS[0])
    for k in _PHI_COEFS[1:]:
        s.mul_(v).add_(k)
    s.mul_(v).mul_(v)
    e.sub_(v)
    torch.where(small, s, e, out=e)
    del s, small, v
    phi = _rowdot(w, e).double()
    del e
    xc = xc.double()
    la, lb = lta.double().view(-1), ltb.double().view(-1)
    direct = sign * ((la - lb) - c.double())
    ok = torch.isfinite(xc) & (xc > -1.0)
    via = torch.log1p(torch.where(ok, xc, torch.zeros_like(xc)))
    agree = ok & ((via - direct).abs() <= EXPM1_AGREE * (1.0 + la.abs() + lb.abs()))
    return torch.where(agree, torch.where(xc.abs() <= PSI_MAX, phi - (xc - via), via - yc), direct)


def pair_chunk(za: Tensor, zb: Tensor, yp: Optional[Tensor], yq: Optional[Tensor], opts: PairOptions,
               stats: Optional[Tensor] = None,
               coefs: Optional[PairCoefs] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(ce_p [c], ce_q [c], stats [c, 8], div [c]) of a chunk of paired rows; with ``coefs`` also ``za ← dz_p``,
    ``zb ← dz_q``. With ``stats`` given (backward) they are not recomputed, ce_p, ce_q are zeros and div is
    None. ``div``: the divergence per row, for kl / kl_reverse / sym_kl from :func:`_centred_kl` (more precise
    than maths.divergence_from_stats of ``stats``, which stays what a vocab split merges), else from stats."""
    ce, tau, div = opts.ce, opts.temperature, opts.divergence
    _softcap_(za, ce.softcap)
    _softcap_(zb, ce.softcap)
    C = za.shape[0]
    forward = stats is None
    dv = None
    ce_p = ce_q = torch.zeros(C, dtype=za.dtype, device=za.device)
    if forward:
        stats = torch.zeros(C, N_PAIR_STATS, dtype=za.dtype, device=za.device)
        if opts.with_ce:
            ce_p, stats[:, Stat.LSE_P] = _ce_rows(za, yp, ce)
            ce_q, stats[:, Stat.LSE_Q] = _ce_rows(zb, yq, ce)
    # divergence on a = za/τ, b = zb/τ (scaled in place; τ·a is recovered where needed)
    if tau != 1.0:
        za.div_(tau)
        zb.div_(tau)
    a, b = za, zb
    if forward:
        if opts.with_ce and tau == 1.0:
            stats[:, Stat.LSET_P] = stats[:, Stat.LSE_P]
            stats[:, Stat.LSET_Q] = stats[:, Stat.LSE_Q]
        else:
            stats[:, Stat.LSET_P] = torch.logsumexp(a, dim=1)
            stats[:, Stat.LSET_Q] = torch.logsumexp(b, dim=1)
    lta, ltb = stats[:, Stat.LSET_P].unsqueeze(1), stats[:, Stat.LSET_Q].unsqueeze(1)
    p = (a - lta).exp_()
    q = (b - ltb).exp_()
    if forward:
        # normalised by their own sums: an lse one ulp off at large logits (|z| ≈ 300: ε ≈ 3e-5) would scale
        # every expectation by (1 − ε), an error of ε·|E[z]| in X and Y (found by the nightly property run).
        # Not in backward: a vocab shard's backward gets the GLOBAL lse, under which p sums to its share.
        p.div_(p.sum(1, keepdim=True))
        q.div_(q.sum(1, keepdim=True))
    u = a - b if div in ("kl", "kl_reverse", "sym_kl") else None
    lp = lq = None
    if div == "js":
        lp, lq = _js_log_ratios(a, b, lta, ltb)
    if forward:
        if div == "sce":
            X, Y = _rowdot(p, b), _rowdot(q, a)
        elif div == "kl":
            X, Y = _rowdot(p, u), _rowdot(p, _expm1c(-u))
        elif div == "kl_reverse":
            X, Y = _rowdot(q, _expm1c(u)), _rowdot(q, u)
        elif div == "sym_kl":
            X, Y = _rowdot(p, u), _rowdot(q, u)
            stats[:, Stat.X2], stats[:, Stat.Y2] = _rowdot(p, _expm1c(-u)), _rowdot(q, _expm1c(u))
        else:  # js
            X, Y = _rowdot(p, lp), _rowdot(q, lq)
        stats[:, Stat.X], stats[:, Stat.Y] = X, Y
        dv = _pair_div(p, q, u, stats, div)
    if coefs is None:
        return ce_p, ce_q, stats, dv

    X, Y = stats[:, Stat.X].unsqueeze(1), stats[:, Stat.Y].unsqueeze(1)
    cd = (coefs.div / tau).unsqueeze(1)
    gp = gq = None  # ∂D/∂a, ∂D/∂b (docs/maths.md §5 table) times coef_div/τ
    if opts.grad_p:
        if div == "sce":
            gp = (b - X).mul_(p).neg_().add_(p).sub_(q)
        elif div == "kl":
            gp = (u - X).mul_(p)
        elif div == "kl_reverse":
            gp = p - q
        elif div == "sym_kl":
            gp = (u - X).mul_(p).add_(p).sub_(q)
        else:
            gp = (lp - X).mul_(p).mul_(0.5)
        gp.mul_(cd)
    if opts.grad_q:
        if div == "sce":
            gq = (a - Y).mul_(q).neg_().add_(q).sub_(p)
        elif div == "kl":
            gq = q - p
        elif div == "kl_reverse":
            gq = (Y - u).mul_(q)
        elif div == "sym_kl":
            gq = (Y - u).mul_(q).add_(q).sub_(p)
        else:
            gq = (lq - Y).mul_(q).mul_(0.5)
        gq.mul_(cd)
    del u, lp, lq

    def view_grad(g: Optional[Tensor], z_over_tau: Tensor, p_t: Tensor, lse_col: Tensor, y, coef_ce) -> None:
        """z_over_tau ← the view's dz (CE gradient + g, through the softcap); zeros without either."""
        if opts.with_ce:
            # softmax(z) for CE: p itself when τ = 1, else exp(τ·a − lse)
            if tau == 1.0:
                sm = p_t.clone() if g is not None else p_t
            else:
                sm = (z_over_tau * tau).sub_(lse_col.unsqueeze(1)).exp_()
            sm = _ce_grad_(sm, lse_col, y, coef_ce, ce)
            g = sm if g is None else g.add_(sm)
        if g is None:
            z_over_tau.zero_()
            return
        z_over_tau.copy_(_softcap_grad_(g, z_over_tau, ce.softcap, scale=tau))

    view_grad(gp, a, p, stats[:, Stat.LSE_P], yp, coefs.ce_p)
    del gp
    view_grad(gq, b, q, stats[:, Stat.LSE_Q], yq, coefs.ce_q)
    return ce_p, ce_q, stats, dv


def _pair_div(p: Tensor, q: Tensor, u: Optional[Tensor], stats: Tensor, div: str) -> Tensor:
    """Per-row divergence of a forward chunk (:func:`pair_chunk`'s ``div``)."""
    if div not in ("kl", "kl_reverse", "sym_kl"):
        return divergence_from_stats(stats, div)
    lta, ltb = stats[:, Stat.LSET_P], stats[:, Stat.LSET_Q]
    d = 0.0
    if div in ("kl", "sym_kl"):  # X = E_p[u]
        d = d + _centred_kl(p, u, stats[:, Stat.X], -1.0, lta, ltb)
    if div in ("kl_reverse", "sym_kl"):  # Y = E_q[u]
        d = d + _centred_kl(q, u, stats[:, Stat.Y], 1.0, lta, ltb)
    return d.to(stats.dtype)


def js_partial_chunk(za: Tensor, zb: Tensor, lset: Tensor, opts: PairOptions) -> Tensor:
    """``[c, 2]``: Σ_v p_v log(p_v/m_v), Σ_v q_v log(q_v/m_v) under the GIVEN normalisers ``lset [c, 2]`` of
    a = z_p/τ, b = z_q/τ (contract: pair_js_partial)."""
    tau = float(opts.temperature)
    a, b = _softcap_(za, opts.ce.softcap), _softcap_(zb, opts.ce.softcap)
    if tau != 1.0:
        a.div_(tau)
        b.div_(tau)
    lta, ltb = (lset[:, i : i + 1].to(a.dtype) for i in (0, 1))
    p, q = (a - lta).exp_(), (b - ltb).exp_()
    lp, lq = _js_log_ratios(a, b, lta, ltb)
    return torch.stack([_rowdot(p, lp), _rowdot(q, lq)], dim=1)
