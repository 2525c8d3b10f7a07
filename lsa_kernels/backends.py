"""The contract between the autograd layer and a compute backend (cpu, triton).

A backend is a module exposing the five functions below. All tensors are 2-D and contiguous:
``x [N, H]`` (fp32/bf16/fp16), ``w [V, H]`` and ``b [V]`` (or None) of x's dtype, targets ``y [N]``
int64 (ignored rows hold ``opts.ignore_index``). Every statistic, loss and gradient is fp32.

Forward functions return per-row values; reductions happen in :mod:`lsa_kernels.autograd`.
Backward functions take per-row fp32 coefficients ``coef`` (the upstream gradient times the
reduction weight; zero on ignored / unselected rows) and

* write ``dx_out`` (fp32 ``[N, H]``, overwritten) when it is not None,
* ACCUMULATE into ``dw_out`` (fp32 ``[V, H]``) and ``db_out`` (fp32 ``[V]``) when not None,

Targets ``y >= V`` (other than ignore_index) mean "valid row whose class is not in this weight" (a
vocab shard, :mod:`lsa_kernels.distributed`): the row gets its softmax gradient but no one-hot; its
forward loss value is unspecified (the caller merges shards). ``opts.vocab_total`` (when set) is the V of
the label-smoothing term ``ε/V``.

So that one fp32 dW buffer serves every call of a loss (CE rows and paired rows) with no V×H
temporaries. No backend ever holds a rows×V tensor larger than its chunk budget (cpu) or writes one
to global memory (triton).

    ce_forward(x, w, b, y, opts: CEOptions) -> (loss_row [N], lse [N])
        loss_row = (1-ε)(lse - z_y) + ε(lse - mean_v z) + λ·lse²   (0 on ignored rows)

    ce_backward(x, w, b, y, lse, coef, opts, dx_out, dw_out, db_out) -> None
        dz = coef ⊙ (softmax(z)(1 + 2λ·lse) - (1-ε)·onehot(y) - ε/V) ⊙ softcap'(z_raw)
        dx = dz W,  dW += dzᵀ x,  db += Σ_rows dz

    pair_forward(xp, xq, w, b, yp, yq, opts: PairOptions) -> (ce_p [N], ce_q [N], div [N], stats [N, 8])
        ce_* as above when opts.with_ce (zeros otherwise; yp/yq may then be None);
        div and stats as documented in lsa_kernels.maths (divergence on every row; callers mask).

    pair_backward(xp, xq, w, b, yp, yq, stats, coef_ce_p, coef_ce_q, coef_div, opts,
                  dxp_out, dxq_out, dw_out, db_out) -> None
        dz_p = coef_ce_p·(CE grad of z_p) + coef_div/τ·dD/da   (the second term only if opts.grad_p)
        dz_q likewise; then the softcap derivative, and dx/dW/db as for CE (dW gets both views).
        coef_ce_* are None when not opts.with_ce.

    pair_js_partial(xp, xq, w, b, lset [N, 2], opts) -> [N, 2]
        Σ_v p_v log(p_v/m_v), Σ_v q_v log(q_v/m_v) over the rows of w for GIVEN normalisers lset of
        a = z_p/τ and b = z_q/τ (js's X and Y when lset is w's own; a vocab shard's share of them when
        lset is the whole vocabulary's: lsa_kernels.distributed needs it for js).

Optionally a backend may also expose ``ce_forward_backward`` / ``pair_forward_backward`` with the
union of the arguments (forward outputs plus the backward's out buffers) computing both in ONE pass
over the logits; the autograd layer uses them to fold the gradient into the forward when it knows the
coefficients in advance (reduction mean/sum), which saves one GEMM per view on the CPU.
"""

from __future__ import annotations

from types import ModuleType


def get(name) -> ModuleType:
    """The backend module for ``name`` ('cpu' or 'triton'), imported on first use. A backend object
    (e.g. :class:`lsa_kernels.distributed.VocabParallel`) is returned as it is."""
    if not isinstance(name, str):
        return name
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "triton":
        from . import kernels

        return kernels
    raise ValueError(f"no compute backend named {name!r}")


from ._env import interpreting  # noqa: E402,F401  (re-exported)
