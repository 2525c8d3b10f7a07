"""The production kernel configurations: dtype × feature flags × block sizes, one record per specialisation.

Every entry is one specialisation the launchers in ce.py / pair.py / dense.py can emit on a GPU, with the
block sizes of ``_common.gpu_config`` (the tables ``_common.GPU_TABLE``) for that arch. The hand-written
list (:func:`production_configs`) covers every kernel, every divergence, both dot precisions (bf16 tensor
cores, fp32 via tf32x3) and the heaviest flag combination of each kernel; :data:`SMOKE` and
:data:`FAMILY_SMOKE` pick the ones compiled by default. :func:`dispatch_configs` finds EVERY flag set the
launchers can emit (it runs them with recording kernels over the whole option space): a few thousand
specialisations per dtype and arch, most of them pair-backward variants.

Compiling them for real GPU targets (shared memory, register spills, 64-bit offsets, relaxed atomics) is
the compile check, ``python -m benchmarks.compile_check`` (benchmarks/compile_check.py), which
tests/backends/test_triton_compile.py runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from ..maths import DIVERGENCES, N_PAIR_STATS, Divergence
from ._common import LaunchConfig, gpu_config


@dataclass(frozen=True)
class KernelConfig:
    """One specialisation: kernel kind, input dtype and the constexpr flags the launcher passes."""

    name: str
    kernel: str  # kernel kind: key of the _common.GPU_TABLE tables and of KERNELS
    dtype: str  # bf16 | fp16 | fp32
    flags: Dict[str, Any] = field(default_factory=dict)

    def launch(self, arch: int) -> LaunchConfig:
        return gpu_config(self.kernel, arch, self.dtype == "fp32")

    @property
    def atomic(self) -> bool:
        """A kernel of the atomic backward (one program per row block × V tile adds into dx, dW, db)."""
        return self.kernel in ATOMIC_KINDS

    @property
    def writes_atomically(self) -> bool:
        """An atomic kernel's flag set that asks for an accumulated output (dx, dW or db of any view); the
        dense backward asked for dt only stores it plainly and holds no atomic."""
        return self.atomic and any(self.flags.get(f, False) for f in ATOMIC_OUTPUTS)


# kernel kind → (module under lsa_kernels.kernels, kernel name)
KERNELS = {
    "ce_fwd": ("ce", "ce_fwd_kernel"),
    "ce_fwd_ext": ("ce", "ce_fwd_kernel"),  # the same kernel with ENTROPY / ARGMAX: its own block sizes
    "ce_bwd": ("ce", "ce_bwd_kernel"),
    "ce_dz": ("ce", "ce_dz_kernel"),
    "pair_fwd": ("pair_phase1", "pair_phase1_kernel"),
    "pair_fwd_ext": ("pair_phase1", "pair_phase1_kernel"),  # with ENTROPY / ARGMAX: its own block sizes
    "pair_js": ("pair_js", "pair_js_kernel"),
    "pair_bwd": ("pair_bwd", "pair_bwd_kernel"),
    "pair_dz": ("pair_bwd", "pair_dz_kernel"),
    "dense_fwd": ("dense", "dense_fwd_kernel"),
    "dense_bwd": ("dense", "dense_bwd_kernel"),
    "dense_dz": ("dense", "dense_dz_kernel"),
}
ATOMIC_KINDS = ("ce_bwd", "pair_bwd", "dense_bwd")
# the flags of those kernels' outputs added into with atomics (NEED_DT, the dense target's gradient, is stored)
ATOMIC_OUTPUTS = ("NEED_DX", "NEED_DW", "NEED_DB", "NEED_DXP", "NEED_DXQ", "NEED_DWQ", "NEED_DBQ")


def _module(name: str):
    import importlib

    return importlib.import_module(f"{__package__}.{name}")


def kernel_fn(kind: str):
    mod, name = KERNELS[kind]
    return getattr(_module(mod), name)


_CE_ALL = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True)
_CE_NONE = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_SMOOTHING=False)


def _ce_fwd_flags(all_on: bool, ext: bool = False) -> Dict[str, Any]:
    """ce_fwd_kernel; ``ext``: the per-token entropy and argmax."""
    return dict(_CE_ALL if all_on else _CE_NONE, ENTROPY=ext, ARGMAX=ext)


def _ce_bwd_flags(all_on: bool, entropy: bool = False, **need) -> Dict[str, Any]:
    base = dict(_CE_ALL if all_on else _CE_NONE)
    base["HAS_ZLOSS"] = all_on
    base["HAS_ENTROPY"] = entropy
    base.update(need)
    return base


def _pair_flags(div: Divergence, *, temp_one=True, with_ce=True, extras=False, two_heads=False, per_view=False,
                **more) -> Dict[str, Any]:
    # one shared head: HAS_BIAS_Q = HAS_BIAS (view q's bias pointer is view p's); per_view: long-short's
    # per-view entropy + argmax (ENTROPY / ARGMAX, docs/maths.md §4)
    f = dict(DIV=int(div), TEMP_ONE=temp_one, WITH_CE=with_ce, HAS_BIAS=extras, HAS_SOFTCAP=extras,
             HAS_SMOOTHING=extras, TWO_HEADS=two_heads, HAS_BIAS_Q=extras, ENTROPY=per_view, ARGMAX=per_view)
    f.update(more)
    return f


def _pair_bwd_flags(div: Divergence, *, grad_p=True, grad_q=True, with_ce=True, temp_one=True, extras=False,
                    two_heads=False, ce_p=None, dz=False, entropy=False, **need) -> Dict[str, Any]:
    """Flags of pair_bwd_kernel (``dz=False``) or pair_dz_kernel (``dz=True``); CE on view q whenever
    ``with_ce``, on view p too unless ``ce_p=False`` (distillation: the student's CE only); ``entropy``: the
    per-view entropies' gradient (HAS_ENTROPY, long-short's per-view outputs)."""
    f = dict(DIV=int(div), TEMP_ONE=temp_one, GRAD_P=grad_p, GRAD_Q=grad_q, WITH_CE=with_ce, HAS_BIAS=extras,
             HAS_SOFTCAP=extras, HAS_SMOOTHING=extras, HAS_ZLOSS=extras,
             CE_P=with_ce if ce_p is None else ce_p, CE_Q=with_ce, TWO_HEADS=two_heads, HAS_BIAS_Q=extras,
             NEED_DBQ=False, HAS_ENTROPY=entropy)
    if not dz:
        f["NEED_DWQ"] = False
    f.update(need)
    return f


def production_configs() -> List[KernelConfig]:
    out: List[KernelConfig] = []
    atomic_need = dict(NEED_DX=True, NEED_DW=True, NEED_DB=False)
    for dt in ("bf16", "fp32"):
        out.append(KernelConfig(f"ce_fwd_{dt}_plain", "ce_fwd", dt, _ce_fwd_flags(False)))
        out.append(KernelConfig(f"ce_bwd_{dt}_plain", "ce_bwd", dt, _ce_bwd_flags(False, **atomic_need)))
        out.append(KernelConfig(f"ce_dz_{dt}_all", "ce_dz", dt, _ce_bwd_flags(True, NEED_DB=True)))
    out.append(KernelConfig("ce_fwd_bf16_all", "ce_fwd", "bf16", _ce_fwd_flags(True)))
    out.append(KernelConfig("ce_fwd_fp16_plain", "ce_fwd", "fp16", _ce_fwd_flags(False)))
    out.append(KernelConfig("ce_bwd_bf16_all", "ce_bwd", "bf16",
                            _ce_bwd_flags(True, NEED_DX=True, NEED_DW=True, NEED_DB=True)))
    # per-token entropy + argmax in the forward, the entropy gradient in the backward (heaviest flags)
    for dt in ("bf16", "fp32"):
        out.append(KernelConfig(f"ce_fwd_{dt}_ext_all", "ce_fwd_ext", dt, _ce_fwd_flags(True, ext=True)))
        out.append(KernelConfig(f"ce_bwd_{dt}_entropy_all", "ce_bwd", dt,
                                _ce_bwd_flags(True, entropy=True, NEED_DX=True, NEED_DW=True, NEED_DB=True)))
        out.append(KernelConfig(f"ce_dz_{dt}_entropy_all", "ce_dz", dt, _ce_bwd_flags(True, entropy=True,
                                                                                      NEED_DB=True)))

    pair_need = dict(USE_GP=True, USE_GQ=True, NEED_DXP=True, NEED_DXQ=True, NEED_DW=True, NEED_DB=False)
    for div in Divergence:
        out.append(KernelConfig(f"pair_fwd_bf16_{div.label}", "pair_fwd", "bf16", _pair_flags(div)))
        out.append(KernelConfig(f"pair_bwd_bf16_{div.label}", "pair_bwd", "bf16", _pair_bwd_flags(div, **pair_need)))
    for dt in ("bf16", "fp32"):  # as pair_js_partial launches it, heaviest flags
        out.append(KernelConfig(f"pair_js_{dt}_all", "pair_js", dt,
                                dict(TEMP_ONE=False, HAS_BIAS=True, HAS_SOFTCAP=True, TWO_HEADS=False,
                                     HAS_BIAS_Q=True)))
    out.append(KernelConfig("pair_fwd_bf16_kl_temp_all", "pair_fwd", "bf16",
                            _pair_flags(Divergence.KL, temp_one=False, extras=True)))
    out.append(KernelConfig("pair_fwd_fp32_sce", "pair_fwd", "fp32", _pair_flags(Divergence.SCE)))
    out.append(KernelConfig("pair_bwd_bf16_sce_temp_all", "pair_bwd", "bf16",
                            _pair_bwd_flags(Divergence.SCE, temp_one=False, extras=True,
                                            **{**pair_need, "NEED_DB": True})))
    out.append(KernelConfig("pair_bwd_bf16_kl_detach_noce", "pair_bwd", "bf16",
                            _pair_bwd_flags(Divergence.KL, grad_p=False, with_ce=False,
                                            **{**pair_need, "USE_GP": False, "NEED_DXP": False})))
    out.append(KernelConfig("pair_bwd_fp32_sce", "pair_bwd", "fp32", _pair_bwd_flags(Divergence.SCE, **pair_need)))
    for dt in ("bf16", "fp32"):  # deterministic dz kernel, heaviest flags (js: two log-ratio terms per element)
        out.append(KernelConfig(f"pair_dz_{dt}_js_all", "pair_dz", dt,
                                _pair_bwd_flags(Divergence.JS, temp_one=False, extras=True, dz=True, USE_GP=True,
                                                USE_GQ=True, NEED_DB=True)))
    out.append(KernelConfig("pair_dz_bf16_sym_kl_all", "pair_dz", "bf16",
                            _pair_bwd_flags(Divergence.SYM_KL, temp_one=False, extras=True, dz=True, USE_GP=True,
                                            USE_GQ=True, NEED_DB=True)))
    out += _two_head_configs()
    out += _per_view_configs()
    out += _dense_configs()
    return out


def _dense_configs() -> List[KernelConfig]:
    """Dense targets (docs/maths.md §11; kernels/dense.py): probability targets with class weights,
    smoothing and softcap (heaviest flags), class-weighted smoothing of index targets, and the plain
    probability target; backward with dt and every buffer."""
    out: List[KernelConfig] = []
    full = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_Y=False, HAS_T=True, HAS_C=True)
    cw = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_Y=True, HAS_T=False, HAS_C=True)
    for dt in ("bf16", "fp32"):
        out.append(KernelConfig(f"dense_fwd_{dt}_prob_all", "dense_fwd", dt, dict(full, HAS_CZ=True)))
        out.append(KernelConfig(f"dense_fwd_{dt}_cw_ls", "dense_fwd", dt, dict(cw, HAS_CZ=True)))
        out.append(KernelConfig(f"dense_bwd_{dt}_prob_all", "dense_bwd", dt,
                                dict(full, HAS_CB=True, NEED_DT=True, NEED_DX=True, NEED_DW=True, NEED_DB=True)))
        out.append(KernelConfig(f"dense_bwd_{dt}_prob_plain", "dense_bwd", dt,
                                dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_Y=False, HAS_T=True, HAS_C=False,
                                     HAS_CB=False, NEED_DT=False, NEED_DX=True, NEED_DW=True, NEED_DB=False)))
        out.append(KernelConfig(f"dense_dz_{dt}_prob_all", "dense_dz", dt,
                                dict(full, HAS_CB=True, NEED_DT=True, NEED_DB=True)))
    return out


def _per_view_configs() -> List[KernelConfig]:
    """Long-short's per-view outputs (docs/maths.md §4), heaviest flags: phase 1 with both views'
    entropy and argmax (sym_kl: the most accumulators), the entropy gradient in the atomic and deterministic
    backward (all options, every buffer)."""
    out: List[KernelConfig] = []
    for dt in ("bf16", "fp32"):
        out.append(KernelConfig(f"pair_fwd_ext_{dt}_sym_kl_all", "pair_fwd_ext", dt,
                                _pair_flags(Divergence.SYM_KL, temp_one=False, extras=True, per_view=True)))
        out.append(KernelConfig(f"pair_bwd_{dt}_sce_entropy_all", "pair_bwd", dt,
                                _pair_bwd_flags(Divergence.SCE, temp_one=False, extras=True, entropy=True,
                                                USE_GP=True, USE_GQ=True, NEED_DXP=True, NEED_DXQ=True,
                                                NEED_DW=True, NEED_DB=True)))
        out.append(KernelConfig(f"pair_dz_{dt}_js_entropy_all", "pair_dz", dt,
                                _pair_bwd_flags(Divergence.JS, temp_one=False, extras=True, dz=True, entropy=True,
                                                USE_GP=True, USE_GQ=True, NEED_DB=True)))
    return out


def _two_head_configs() -> List[KernelConfig]:
    """Per-token-output and two-head specialisations: two heads (distillation, docs/maths.md §12), heaviest flags. Frozen
    teacher (detach="p", student CE only: USE_GP off) and both heads trained, atomic and deterministic."""
    out: List[KernelConfig] = []
    two = dict(two_heads=True)
    for dt in ("bf16", "fp32"):
        for div in (Divergence.KL, Divergence.SYM_KL):  # kl: the usual KD; sym_kl: the most accumulators
            out.append(KernelConfig(f"pair_fwd_{dt}_{div.label}_two_heads_all", "pair_fwd", dt,
                                    _pair_flags(div, temp_one=False, extras=True, **two)))
        out.append(KernelConfig(f"pair_js_{dt}_two_heads_all", "pair_js", dt,
                                dict(TEMP_ONE=False, HAS_BIAS=True, HAS_SOFTCAP=True, TWO_HEADS=True,
                                     HAS_BIAS_Q=True)))
        # frozen teacher: student dx, dW, db only
        out.append(KernelConfig(f"pair_bwd_{dt}_kl_two_heads_frozen", "pair_bwd", dt,
                                _pair_bwd_flags(Divergence.KL, grad_p=False, temp_one=False, extras=True, ce_p=False,
                                                USE_GP=False, USE_GQ=True, NEED_DXP=False, NEED_DXQ=True,
                                                NEED_DW=False, NEED_DB=False, NEED_DWQ=True, NEED_DBQ=True, **two)))
        # both heads trained, every buffer
        out.append(KernelConfig(f"pair_bwd_{dt}_sce_two_heads_all", "pair_bwd", dt,
                                _pair_bwd_flags(Divergence.SCE, temp_one=False, extras=True, USE_GP=True,
                                                USE_GQ=True, NEED_DXP=True, NEED_DXQ=True, NEED_DW=True,
                                                NEED_DB=True, NEED_DWQ=True, NEED_DBQ=True, **two)))
        out.append(KernelConfig(f"pair_dz_{dt}_js_two_heads_all", "pair_dz", dt,
                                _pair_bwd_flags(Divergence.JS, temp_one=False, extras=True, dz=True, USE_GP=True,
                                                USE_GQ=True, NEED_DB=True, NEED_DBQ=True, **two)))
        out.append(KernelConfig(f"pair_dz_{dt}_kl_two_heads_frozen", "pair_dz", dt,
                                _pair_bwd_flags(Divergence.KL, grad_p=False, temp_one=False, extras=True, dz=True,
                                                ce_p=False, USE_GP=False, USE_GQ=True, NEED_DB=False,
                                                NEED_DBQ=True, **two)))
    return out


# One config per kernel × dtype class, heaviest flags: what the default compile test runs (the full list
# runs with LSA_SLOW=1; it takes ~10 minutes on 2 cores).
SMOKE = (
    "ce_fwd_bf16_all", "ce_fwd_fp32_plain", "ce_bwd_bf16_all", "ce_bwd_fp32_plain", "ce_dz_bf16_all",
    "ce_dz_fp32_all", "pair_fwd_bf16_kl_temp_all", "pair_js_bf16_all", "pair_fwd_fp32_sce",
    "pair_bwd_bf16_sce_temp_all", "pair_bwd_bf16_js", "pair_bwd_fp32_sce", "pair_dz_bf16_js_all",
    "pair_dz_fp32_js_all",
    # per-token extras of the CE forward, the entropy gradient, two heads
    "ce_fwd_bf16_ext_all", "ce_bwd_bf16_entropy_all", "pair_bwd_bf16_sce_two_heads_all",
    "pair_dz_bf16_js_two_heads_all",
    # long-short's per-view entropy / argmax and the entropy gradient
    "pair_fwd_ext_bf16_sym_kl_all", "pair_bwd_bf16_sce_entropy_all", "pair_dz_bf16_js_entropy_all",
    # dense targets (probability targets, class-weighted smoothing; kernels/dense.py)
    "dense_fwd_bf16_prob_all", "dense_fwd_fp32_prob_all", "dense_bwd_bf16_prob_all", "dense_bwd_fp32_prob_all",
    "dense_dz_bf16_prob_all",
)


# ------------------------------------------------------------------------------ every dispatchable flag set

_LAUNCH_ONLY = {"UPCAST", "DOT_PREC", "BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP", "num_warps", "num_stages"}
_DT_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class _Recorder:
    """Stands in for a jitted kernel: records the constexprs of each launch instead of launching."""

    def __init__(self, kind: str, seen: Dict[tuple, "KernelConfig"]):
        self.kind, self.seen = kind, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            import torch

            x = args[0]
            dt = _DT_NAMES[str(x.dtype).replace("torch.", "")]
            flags = {k: v for k, v in kw.items() if k not in _LAUNCH_ONLY}
            kind = self.kind
            if kind in ("ce_fwd", "ce_fwd_ext"):  # one kernel, two table entries
                kind = "ce_fwd_ext" if (flags.get("ENTROPY") or flags.get("ARGMAX")) else "ce_fwd"
            if kind in ("pair_fwd", "pair_fwd_ext"):  # likewise
                kind = "pair_fwd_ext" if (flags.get("ENTROPY") or flags.get("ARGMAX")) else "pair_fwd"
            key = (kind, dt, tuple(sorted(flags.items())))
            if key not in self.seen:
                short = "_".join(f"{k.lower()}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(flags.items()))
                self.seen[key] = KernelConfig(f"{kind}_{dt}__{short}", kind, dt, dict(flags))
            del torch
        return launch


def dispatch_configs(dtypes=("bf16", "fp16", "fp32")) -> List[KernelConfig]:
    """Every (kernel, dtype, constexpr flags) specialisation the launchers of ce.py / pair.py can emit.

    Found by running the launchers themselves over the whole option space (bias, softcap, label smoothing,
    z-loss, temperature, every divergence, detach, CE on/off, deterministic, every subset of requested
    gradients) on tiny CPU tensors with the kernels replaced by recorders, so the list follows the
    dispatch code rather than a hand-written copy of it. The newer options: CE on view q only (one head),
    and two heads with CE on neither / the student / both views; for two heads view p's gradient buffers
    are requested together (all or none) and label smoothing with z-loss together, which keeps the
    enumeration's size in bounds (every subset of view q's buffers is still enumerated)."""
    import itertools

    import torch

    from ..options import CEOptions, PairOptions
    from . import ce, pair

    seen: Dict[tuple, KernelConfig] = {}
    saved = {kind: kernel_fn(kind) for kind in KERNELS}
    try:
        for kind, (mod, name) in KERNELS.items():
            setattr(_module(mod), name, _Recorder(kind, seen))
        N, H, V, Hq = 4, 8, 16, 24
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        for dn in dtypes:
            dt = tdt[dn]
            x = torch.zeros(N, H, dtype=dt)
            w = torch.zeros(V, H, dtype=dt)
            bias = torch.zeros(V, dtype=dt)
            y = torch.zeros(N, dtype=torch.int64)
            coef = torch.ones(N)
            bufs = {(N, H): torch.zeros(N, H), (V, H): torch.zeros(V, H), (V,): torch.zeros(V)}
            f32 = lambda *s: bufs[s]  # noqa: E731  (contents are never read: the kernels only record)
            for b, cap, eps, zl, det in itertools.product((None, bias), (None, 30.0), (0.0, 0.1), (0.0, 1e-4),
                                                          (False, True)):
                o = CEOptions(label_smoothing=eps, z_loss=zl, softcap=cap, deterministic=det)
                ce.ce_forward(x, w, b, y, o)
                for ent, am in itertools.product((False, True), repeat=2):  # per-token outputs
                    ce.ce_forward_ext(x, w, b, y, o, entropy=ent, argmax=am)
                for ndx, ndw, ndb, went in itertools.product((False, True), repeat=4):
                    ce.ce_backward(x, w, b, y, coef, coef, o, f32(N, H) if ndx else None,
                                   f32(V, H) if ndw else None, f32(V) if ndb else None,
                                   coef_entropy=coef if went else None, entropy=coef if went else None)
            stats = torch.zeros(N, N_PAIR_STATS)
            ents = torch.zeros(N, 2)
            for div, temp, with_ce, detach, b, cap, eps, zl, det in itertools.product(
                    DIVERGENCES, (1.0, 2.0), (False, True), (None, "p", "q"),
                    (None, bias), (None, 30.0), (0.0, 0.1), (0.0, 1e-4), (False, True)):
                if not with_ce and (eps or zl):
                    continue  # linear_divergence builds its CEOptions with no smoothing / z-loss
                o = PairOptions(divergence=div, temperature=temp, detach=detach, with_ce=with_ce,
                                ce=CEOptions(label_smoothing=eps, z_loss=zl, softcap=cap, deterministic=det))
                yy = y if with_ce else None
                if not det:  # the forward ignores `deterministic`
                    pair.pair_forward(x, x, w, b, yy, yy, o)
                    if with_ce:  # long-short's per-view entropy / argmax
                        for ent, am in itertools.product((False, True), repeat=2):
                            pair.pair_forward_ext(x, x, w, b, yy, yy, o, entropy=ent, argmax=am)
                cc = coef if with_ce else None
                for nxp, nxq, ndw, ndb in itertools.product((False, True), repeat=4):
                    for went in ((False, True) if with_ce else (False,)):  # long-short's entropy gradient
                        pair.pair_backward(x, x, w, b, yy, yy, stats, cc, cc, coef, o,
                                           f32(N, H) if nxp else None, f32(N, H) if nxq else None,
                                           f32(V, H) if ndw else None, f32(V) if ndb else None,
                                           coef_entropy=ents if went else None, entropy=ents if went else None)
            # CE on one view only (one head), and two heads (view q's own head wq [V, Hq])
            xq2 = torch.zeros(N, Hq, dtype=dt)
            wq = torch.zeros(V, Hq, dtype=dt)
            bufs.update({(N, Hq): torch.zeros(N, Hq), (V, Hq): torch.zeros(V, Hq)})
            for div, temp, detach, b, cap, det in itertools.product(
                    DIVERGENCES, (1.0, 2.0), (None, "p", "q"), (None, bias), (None, 30.0), (False, True)):
                o = PairOptions(divergence=div, temperature=temp, detach=detach,
                                ce=CEOptions(softcap=cap, deterministic=det))
                if not det:
                    pair.pair_forward(x, x, w, b, None, y, o)
                for nxp, nxq, ndw, ndb in itertools.product((False, True), repeat=4):
                    pair.pair_backward(x, x, w, b, None, y, stats, None, coef, coef, o,
                                       f32(N, H) if nxp else None, f32(N, H) if nxq else None,
                                       f32(V, H) if ndw else None, f32(V) if ndb else None)
            for div, temp, ce_mode, detach, b, bq, cap, extra, det in itertools.product(
                    DIVERGENCES, (1.0, 2.0), ("none", "q", "both"), (None, "p", "q"), (None, bias), (None, bias),
                    (None, 30.0), (False, True), (False, True)):
                if ce_mode == "none" and extra:
                    continue
                o = PairOptions(divergence=div, temperature=temp, detach=detach, with_ce=ce_mode != "none",
                                ce=CEOptions(label_smoothing=0.1 if extra else 0.0, z_loss=1e-4 if extra else 0.0,
                                             softcap=cap, deterministic=det))
                yp_ = y if ce_mode == "both" else None
                yq_ = y if ce_mode != "none" else None
                if not det:
                    pair.pair_forward(x, xq2, w, b, yp_, yq_, o, wq=wq, bq=bq)
                cp_ = coef if yp_ is not None else None
                cq_ = coef if yq_ is not None else None
                # view p's buffers (dx_p, dW_p, db_p) together (a frozen or a trained teacher), view q's subsets
                for tp, nxq, ndwq, ndbq in itertools.product((False, True), repeat=4):
                    pair.pair_backward(x, xq2, w, b, yp_, yq_, stats, cp_, cq_, coef, o,
                                       f32(N, H) if tp else None, f32(N, Hq) if nxq else None,
                                       f32(V, H) if tp else None, f32(V) if tp else None, wq=wq, bq=bq,
                                       dwq_out=f32(V, Hq) if ndwq else None, dbq_out=f32(V) if ndbq else None)
            # dense targets (kernels/dense.py): probability targets (with / without class weights and
            # smoothing) and class-weighted smoothing of index targets
            from ..targets import DenseTarget
            from . import dense

            tt = torch.zeros(N, V)
            cvec = torch.ones(V)
            for b, cap, det, kind_t, c_on, beta in itertools.product((None, bias), (None, 30.0), (False, True),
                                                                     ("prob", "index"), (False, True), (0.0, 0.1)):
                if kind_t == "index" and not (c_on and beta):
                    continue  # index targets take this path only with class weights and smoothing
                T = DenseTarget(tt if kind_t == "prob" else None, cvec if c_on else None,
                                1.0 if kind_t == "prob" else 0.0, beta, coef if kind_t == "index" else None)
                yy = y if kind_t == "index" else None
                o = CEOptions(softcap=cap, deterministic=det)
                if not det:
                    dense.dense_forward(x, w, b, yy, T, o)
                for ndx, ndw, ndb, ndt in itertools.product((False, True), repeat=4):
                    if ndt and kind_t != "prob":
                        continue
                    dense.dense_backward(x, w, b, yy, T, coef, coef, coef, o, f32(N, H) if ndx else None,
                                         f32(V, H) if ndw else None, f32(V) if ndb else None,
                                         torch.zeros(N, V) if ndt else None)
    finally:
        for kind, (mod, name) in KERNELS.items():
            setattr(_module(mod), name, saved[kind])
    return sorted(seen.values(), key=lambda c: c.name)


# The heaviest configs of each kernel family, compiled in CI for the tables of the other GPU families
# (sm_86: 99 KB shared memory; sm_100; sm_120) besides sm_80 / sm_90.
FAMILY_SMOKE = (
    "ce_fwd_bf16_all", "ce_bwd_bf16_all", "pair_fwd_bf16_kl_temp_all", "pair_bwd_bf16_sce_temp_all",
    "pair_bwd_fp32_sce", "pair_dz_bf16_js_all",
    "pair_fwd_ext_bf16_sym_kl_all",  # its own table kind: compiled spill-free on sm_86 / 100 / 120 as well
    "dense_fwd_bf16_prob_all", "dense_bwd_bf16_prob_all",  # dense targets (sm_120's forward has its own tile)
)


def by_name(name: str) -> KernelConfig:
    for c in production_configs():
        if c.name == name:
            return c
    raise KeyError(name)
