"""The contract between the autograd layer (:mod:`lsa_kernels.autograd`) and a compute backend.

A backend is an object with the methods of :class:`Backend` and a :class:`Capabilities` record. The
maths it implements is docs/maths.md §3 (cross-entropy, its options and gradient), §4 (the two views and
which rows pair) and §5 (their divergences, per-row statistics and gradients); the shared definitions (divergence ids, statistic
columns, the CE row loss, a divergence from its statistics) are in :mod:`lsa_kernels.maths`.

Tensors. All are 2-D (or 1-D per-row) and contiguous: rows ``x [N, H]`` (fp32, bf16, fp16; fp64 on the
cpu backend for gradcheck), weight ``w [V, H]`` and bias ``b [V]`` (or None) of x's dtype, targets
``y [N]`` int64 whose ignored rows hold ``opts.ignore_index``. Every statistic, loss and gradient is
fp32 (fp64 for fp64 inputs).

Forward methods return per-row values (:class:`CEOut`, :class:`PairOut`); reductions happen in the
autograd layer. Backward methods take per-row coefficients — the upstream gradient times the reduction
weight, zero on ignored or unselected rows — and write into out buffers (:class:`Grads`,
:class:`PairGrads`): every ``dx*`` buffer given is OVERWRITTEN (rows with no gradient get zeros), ``dw``
and ``db`` are ACCUMULATED into (so one fp32 ``dW`` serves every call of a loss with no V×H temporary).
No backend holds a rows×V tensor larger than its chunk budget (cpu) or writes one to global memory
(triton).

The pair ops take :class:`PairRows`: rows ``xp``/``xq`` paired row by row (the long and the short view of
the same tokens, §4) and, optionally, rows ``xu`` that take CE only (long-short's unpaired rows: the first
``l_extra`` rows of the long view and the last ``l_extra`` of the short one). A backend may run those in the
same pass over the vocabulary as the pairs (the cpu backend does: one set of GEMMs per chunk).

A second head (docs/maths.md §12, distillation: teacher = view p, student = view q): every pair method
takes keyword arguments ``wq`` ``[V, Hq]`` / ``bq`` ``[V]``; with ``wq`` view q's logits are ``x_q W_qᵀ +
b_q`` (``xq [N, Hq]``; same V and dtype as ``w``; no CE-only rows ``xu``), the backward ACCUMULATES view p's
weight gradient into ``grads.dw``/``grads.db`` and view q's into ``grads.dwq``/``grads.dbq``. Without
``wq`` (the default) both views share ``w``/``b`` exactly as before. With ``opts.with_ce`` a view whose
target (``rows.yp``/``rows.yq``) or CE coefficient (``coefs.ce_p``/``coefs.ce_q``) is None takes no CE
(its ``ce_*`` are zeros); with ``opts.detach == "p"`` and no CE on p, no p-side gradient is formed at all
(``grads.dxp`` is zeros, ``dw``/``db`` of a second head untouched).

    ce_forward(x, w, b, y, opts: CEOptions) -> CEOut(loss [N], lse [N])
        loss = (1−ε)(lse − z_y) + ε(lse − mean_v z) + λ·lse²     (0 on ignored rows), z = softcap(x Wᵀ + b)
        with opts.entropy / opts.argmax also, in the same pass: entropy [N] of softmax(z) (every row) and
        argmax [N] int64 of z (ties: lowest index), docs/maths.md §3 per-token outputs
    ce_backward(x, w, b, y, lse, coef [N], opts, grads: Grads, *, coef_entropy=None, entropy=None) -> None
        dz = coef ⊙ (softmax(z)(1 + 2λ·lse) − (1−ε)·onehot(y) − ε/V_total) ⊙ softcap'(z_raw)
        dx = dz W,   dW += dzᵀ x,   db += Σ_rows dz
        with coef_entropy [N] (and the forward's entropy [N]): dz += coef_entropy ⊙ (−p ⊙ (log p + H)) (every row)

    pair_forward(rows: PairRows, w, b, opts: PairOptions, *, wq=None, bq=None) -> PairOut
        ce_p, ce_q (CE of each view when opts.with_ce, zeros otherwise), div (the divergence of every row;
        callers mask), stats [N, 8] (lsa_kernels.maths.Stat), and ce_u / lse_u for rows.xu.
    pair_backward(rows, w, b, saved: PairOut, coefs: PairCoefs, opts, grads: PairGrads, *, wq=None, bq=None)
        dz_p = coefs.ce_p·(CE gradient of z_p) + coefs.div/τ·∂D/∂a   (the second term only if opts.grad_p)
        dz_q likewise with ∂D/∂b; dz_u = coefs.ce_u·(CE gradient of z_u); then the softcap derivative and
        dx / dW / db as for CE (dW and db get every row of every view). ``saved`` is the forward's output
        (its stats and lse_u are read; for a vocab shard they are the whole vocabulary's, merged).

    Per-view extras (long-short's per-token outputs, docs/maths.md §4; one head, τ-independent: of the views'
    z at temperature 1): with opts.ce.entropy / opts.ce.argmax, pair_forward also returns, in the same pass
    over V, PairOut.entropy / .argmax [N, 2] (columns p, q) and .entropy_u / .argmax_u [M] for rows.xu;
    pair_backward with coefs.entropy [N, 2] / coefs.entropy_u [M] (and saved.entropy / saved.entropy_u, the
    forward's) adds coef_entropy ⊙ (−p ⊙ (log p + H)), p = softmax(z), to each view's dz (before softcap').
    They are kept out of the stats columns (whose layout csrc/ and the vocab-parallel merge pin); the
    vocab-parallel wrapper merges them in columns of its own (docs/maths.md §15).

    pair_js_partial(xp, xq, w, b, lset [N, 2], opts, *, wq=None, bq=None) -> [N, 2]   (capability js_partial)
        Σ_v p_v log(p_v/m_v), Σ_v q_v log(q_v/m_v) over the rows of ``w`` for GIVEN normalisers
        lset = (lse(a), lse(b)) of a = z_p/τ, b = z_q/τ: js's X and Y when lset is w's own; a vocab
        shard's share of them when lset is the whole vocabulary's (§5 js; the vocab-parallel wrapper).

    ce_forward_backward(x, w, b, y, opts, coef, grads) -> CEOut          (capability fused_forward_backward)
    pair_forward_backward(rows, w, b, opts, coefs, grads, *, wq=None, bq=None) -> PairOut
                                                                         (capability fused_forward_backward)
        the forward AND the backward with coefficients known in advance, in ONE pass over the logits (the
        autograd layer uses them for mean/sum reductions: one GEMM per view fewer on the cpu backend).

Dense targets (docs/maths.md §11: probability targets, class-weighted label smoothing): the row loss
``ℓ_i = A_i·lse_i + λ·ω_i·lse_i² − Σ_v T_iv z_iv`` with the target mass ``T`` of a :class:`DenseTarget`
``T_iv = κ·t_iv·c_v + β·c_v + α_i·[v = y_i]`` (t ``[N, V]`` the user's probabilities, c ``[V]`` class weights,
1 where None; y the index targets, no one-hot where out of this weight's range) read tile by tile next to the
logits, and ``A_i = Σ_v T_iv`` (over the whole vocabulary) formed by the caller from the sums below:

    ce_dense_forward(x, w, b, y, T, opts) -> DenseOut(lse, tz = Σ_v t c z, tm = Σ_v t c, cz = Σ_v c z, zy = z_y)
        (all [N], z softcapped; sums over this weight's columns: a vocab shard's shares sum over the shards)
    ce_dense_backward(x, w, b, y, T, lse, coef_p [N], coef [N], opts, grads, *, dt=None) -> None
        dz = (coef_p ⊙ softmax(z) − coef ⊙ T) ⊙ softcap'(z_raw),  then dx / dW / db as for CE;
        with ``dt [N, V]`` (fp32, overwritten): dt = coef·κ·c ⊙ (lse − z)  (∂ℓ/∂t, docs/maths.md §11)
    ce_dense_forward_backward(x, w, b, y, T, opts, coef, grads, *, dt=None) -> DenseOut
        (capability fused_forward_backward; no shards) both in one pass with coef_p = coef·(A + 2λω·lse)
        formed per row inside the pass, A = κ·tm + β·T.c_sum + α.

Vocabulary shards (only through :class:`lsa_kernels.backends.vocab_parallel.VocabParallel`): a target
``y >= V`` that is not ignore_index means "a valid row whose class is in another shard" — the row gets its
softmax gradient but no one-hot, and its forward CE value is unspecified (the wrapper merges the shards'
statistics instead). ``opts.vocab_total`` (when set) is the V of the label-smoothing gradient term
``ε/V_total``; the forward's ``mean_v z`` is over the weight's own rows (the wrapper merges the sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from ..options import CEOptions, PairOptions
from ..targets import DenseOut, DenseTarget  # re-exported: the dense-target records live below the kernels

Tensor = torch.Tensor

__all__ = [
    "Backend",
    "Capabilities",
    "CEOut",
    "DenseOut",
    "DenseTarget",
    "Grads",
    "PairCoefs",
    "PairGrads",
    "PairOut",
    "PairRows",
]


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond the four required methods (checked instead of ``hasattr``)."""

    #: ``ce_forward_backward`` / ``pair_forward_backward`` compute forward and gradient in one pass
    fused_forward_backward: bool = False
    #: ``pair_js_partial`` is available (the vocab-parallel js needs it from its local backend)
    js_partial: bool = False


@dataclass(frozen=True)
class PairRows:
    """The rows of a pair op: ``xp``/``xq [N, H]`` paired row by row, their targets ``yp``/``yq [N]`` (None
    without CE), and optional CE-only rows ``xu [M, H]`` with targets ``yu [M]``."""

    xp: Tensor
    xq: Tensor
    yp: Optional[Tensor] = None
    yq: Optional[Tensor] = None
    xu: Optional[Tensor] = None
    yu: Optional[Tensor] = None

    @property
    def has_unpaired(self) -> bool:
        return self.xu is not None


@dataclass(frozen=True)
class PairCoefs:
    """Per-row gradient coefficients of a pair op: ``div [N]`` for the divergence, ``ce_p``/``ce_q [N]`` for
    the CE of each view and ``ce_u [M]`` for the CE-only rows (None where there is no such term)."""

    div: Tensor
    ce_p: Optional[Tensor] = None
    ce_q: Optional[Tensor] = None
    ce_u: Optional[Tensor] = None
    #: the per-view entropies' coefficients ``[N, 2]`` (columns p, q) and ``[M]`` (rows xu); None: no such term
    entropy: Optional[Tensor] = None
    entropy_u: Optional[Tensor] = None


@dataclass(frozen=True)
class Grads:
    """Out buffers of a CE gradient (fp32, or fp64 for fp64 inputs): ``dx [N, H]`` overwritten, ``dw [V, H]``
    and ``db [V]`` accumulated into; None: not wanted."""

    dx: Optional[Tensor] = None
    dw: Optional[Tensor] = None
    db: Optional[Tensor] = None


@dataclass(frozen=True)
class PairGrads:
    """Out buffers of a pair gradient: ``dxp``/``dxq [N, H]`` and ``dxu [M, H]`` overwritten, ``dw``/``db``
    accumulated into; with a second head (``wq``) ``dwq [V, Hq]``/``dbq [V]`` get view q's head's gradient
    (accumulated) and ``dw``/``db`` view p's only; None: not wanted."""

    dxp: Optional[Tensor] = None
    dxq: Optional[Tensor] = None
    dxu: Optional[Tensor] = None
    dw: Optional[Tensor] = None
    db: Optional[Tensor] = None
    dwq: Optional[Tensor] = None
    dbq: Optional[Tensor] = None

    def any(self) -> bool:
        return any(t is not None for t in (self.dxp, self.dxq, self.dxu, self.dw, self.db, self.dwq, self.dbq))


@dataclass(frozen=True)
class CEOut:
    """Per-row CE loss and lse ``[N]``; entropy ``[N]`` and argmax ``[N]`` (int64) when the options ask."""

    loss: Tensor
    lse: Tensor
    entropy: Optional[Tensor] = None
    argmax: Optional[Tensor] = None


@dataclass(frozen=True)
class PairOut:
    """Per-row outputs of a pair forward: ``ce_p``, ``ce_q``, ``div [N]``, ``stats [N, 8]``
    (:class:`lsa_kernels.maths.Stat`), and ``ce_u``, ``lse_u [M]`` for the CE-only rows (None without); the
    per-view extras when the options ask (module docstring)."""

    ce_p: Tensor
    ce_q: Tensor
    div: Tensor
    stats: Tensor
    ce_u: Optional[Tensor] = None
    lse_u: Optional[Tensor] = None
    #: per-view extras (opts.ce.entropy / opts.ce.argmax; else None): entropy of softmax(z) ``[N, 2]``
    #: (columns p, q) and ``[M]`` for xu; argmax of z (int64, ties → lowest index) ``[N, 2]`` and ``[M]``
    entropy: Optional[Tensor] = None
    argmax: Optional[Tensor] = None
    entropy_u: Optional[Tensor] = None
    argmax_u: Optional[Tensor] = None


@runtime_checkable
class Backend(Protocol):
    """A compute backend (module docstring). Optional methods exist on every backend; call them only when
    :attr:`caps` says so (a backend without the capability raises NotImplementedError)."""

    name: str
    caps: Capabilities

    def ce_forward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions) -> CEOut: ...

    def ce_backward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, lse: Tensor, coef: Tensor,
                    opts: CEOptions, grads: Grads, *, coef_entropy: Optional[Tensor] = None,
                    entropy: Optional[Tensor] = None) -> None: ...

    def ce_dense_forward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Optional[Tensor], T: DenseTarget,
                         opts: CEOptions) -> DenseOut: ...

    def ce_dense_backward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Optional[Tensor], T: DenseTarget,
                          lse: Tensor, coef_p: Tensor, coef: Tensor, opts: CEOptions, grads: Grads, *,
                          dt: Optional[Tensor] = None) -> None: ...

    def ce_dense_forward_backward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Optional[Tensor],
                                  T: DenseTarget, opts: CEOptions, coef: Tensor, grads: Grads, *,
                                  dt: Optional[Tensor] = None) -> DenseOut: ...

    def pair_forward(self, rows: PairRows, w: Tensor, b: Optional[Tensor], opts: PairOptions, *,
                     wq: Optional[Tensor] = None, bq: Optional[Tensor] = None) -> PairOut: ...

    def pair_backward(self, rows: PairRows, w: Tensor, b: Optional[Tensor], saved: PairOut, coefs: PairCoefs,
                      opts: PairOptions, grads: PairGrads, *, wq: Optional[Tensor] = None,
                      bq: Optional[Tensor] = None) -> None: ...

    def pair_js_partial(self, xp: Tensor, xq: Tensor, w: Tensor, b: Optional[Tensor], lset: Tensor,
                        opts: PairOptions, *, wq: Optional[Tensor] = None, bq: Optional[Tensor] = None) -> Tensor: ...

    def ce_forward_backward(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, opts: CEOptions,
                            coef: Tensor, grads: Grads) -> CEOut: ...

    def pair_forward_backward(self, rows: PairRows, w: Tensor, b: Optional[Tensor], opts: PairOptions,
                              coefs: PairCoefs, grads: PairGrads, *, wq: Optional[Tensor] = None,
                              bq: Optional[Tensor] = None) -> PairOut: ...
