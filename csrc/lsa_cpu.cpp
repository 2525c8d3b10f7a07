// lsa_kernels._C: the work BETWEEN the GEMMs of the cpu backend (lsa_kernels/backends/cpu/), in place.
//
// For a chunk of C rows the caller forms fp32 logits z [C, V] with one GEMM (bias included, softcap
// NOT applied), calls one op below, and feeds the overwritten z (now dz) to the gradient GEMMs. Each
// op is one parallel-for over rows; a row (V floats, or two rows for pairs) is read from memory once
// and swept 2-4 times while it sits in L2 (max, sums, [js: log-m sums], gradient write), so each
// chunk's logits make at most two trips through DRAM (the GEMM's write plus this read/write).
// The only [C, V] buffer is the chunk loop's own (za, zb are two blocks of it): K = 1 (backends/cpu/ext.py).
// One file over ~500 lines on purpose: the three ops (CE, pairs, dense targets) share the row sweeps, the
// softcap and fast-math helpers and one TORCH_LIBRARY block.
//
// Maths (docs/maths.md §3, §5; lsa_kernels/maths.py), per row, z = softcap(z_raw) = c·tanh(z_raw / c):
//
//   lse = m + log Σ e^{z - m},  loss = (1-ε)(lse - z_y) + ε(lse - mean z) + λ lse²   (0 if ignored)
//   dz  = coef · (softmax(z)(1 + 2λ lse) - (1-ε) onehot(y) - ε/V) · (1 - (z/c)²)
//
// Pairs: a = za/τ, b = zb/τ, p = softmax(a), q = softmax(b), u = a - b; statistics [8] per row:
//   LSE_P, LSE_Q (CE, 0 without CE), LSET_P = lse(a), LSET_Q = lse(b), X, Y, X2, Y2 (0 unless sym_kl):
//     sce     X = E_p[b]            Y = E_q[a]
//     kl      X = E_p[u]            Y = E_p[expm1(-u)]
//     kl_rev  X = E_q[expm1(u)]     Y = E_q[u]
//     sym_kl  X = E_p[u]            Y = E_q[u]        X2 = E_p[expm1(-u)]   Y2 = E_q[expm1(u)]
//     js      X = KL(p||m)          Y = KL(q||m)      log m = logaddexp(log p, log q) - log 2
//   computed from e^{a - max a} sums in the same sweep as the lse (js needs the lse first: one more
//   sweep). The op also returns each row's divergence D: kl, kl_rev, sym_kl from one more sweep per KL
//   centred on the row's mean difference (centred_kl; docs/maths.md §5), the others from the stats. Gradients (times coef_div/τ, plus the CE gradient of each view, then the softcap factor):
//     sce     dD/da = p - q - p(b - X)          dD/db = q - p - q(a - Y)
//     kl      dD/da = p(u - X)                  dD/db = q - p
//     kl_rev  dD/da = p - q                     dD/db = q(Y - u)
//     sym_kl  dD/da = p(u - X) + p - q          dD/db = q(Y - u) + q - p
//     js      dD/da = ½ p(log p - log m - X)    dD/db = ½ q(log q - log m - Y)
//
// Dense targets (docs/maths.md §11; backends/cpu/aten.py dense_chunk is the spec), per row with
// T = κ·t⊙c + β·c + α·onehot(y) (t any float dtype, read in place; c the class weights, 1 when absent):
//   sweep 1: softcap, max, Σ t c z, Σ t c, Σ c z;  sweep 2: lse = m + log Σ e^{z-m};  z_y (0 off-shard)
//   with coef (sweep 3, dz in place of z; dt first when asked, from the capped z):
//     coef_p = coef·(κ Σ t c + β Σ_V c + α + 2λω·lse) when fused (whole rows), else given
//     dz = (coef_p·e^{z-lse} - coef·κ·t c - coef·β·c) ⊙ (1 - (z/cap)²), dz_y -= coef·α·(1 - (z_y/cap)²)
//     dt = coef·κ·c ⊙ (lse - z)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Everything below may be if-converted and vectorised although fp compares could trap: the same
// -fno-trapping-math -fno-math-errno that torch itself is built with (GCC refuses to vectorise the
// clamps of fastmath.h under the default -ftrapping-math).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-math-errno")
#endif

#include "fastmath.h"

namespace lsa {
namespace {

// Divergence ids and statistic columns: lsa_kernels/maths.py (Divergence, Stat) is the definition;
// tests/test_maths_defs.py pins these two enums to it.
enum Div : int64_t { SCE = 0, KL = 1, KL_REVERSE = 2, SYM_KL = 3, JS = 4 };
enum Stat : int { LSE_P = 0, LSE_Q = 1, LSET_P = 2, LSET_Q = 3, ST_X = 4, ST_Y = 5, ST_X2 = 6, ST_Y2 = 7, N_STATS = 8 };

struct CEParams {
  int64_t ignore_index;
  float eps;   // label smoothing
  float zl;    // z-loss
  float cap;   // softcap (> 0 when used)
  int64_t vocab_total;  // V of the ε/V gradient term (> 0: this weight is a vocab shard), 0: the local V
};

// Targets: ignore_index -> no loss, no gradient; 0 <= y < V -> one-hot at y; any other id (y >= V: a
// class in another vocab shard) -> a valid row with the softmax gradient but no one-hot, and a loss
// value computed with z[0] in place of z_y (unspecified: the caller merges shards), as backends/cpu/aten.py does.
LSA_INLINE bool in_shard(int64_t y, int64_t V) { return y >= 0 && y < V; }

LSA_INLINE float eps_over_v(const CEParams& P, int64_t V) {
  return P.eps / static_cast<float>(P.vocab_total > 0 ? P.vocab_total : V);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// In place z <- cap·tanh(z/cap); returns (max, Σ z) of the capped row.
template <bool SC>
static inline void sweep_cap_max_sum(float* __restrict z, int64_t V, float cap, float& mx, float& sum) {
  float m = kNegInf, s = 0.0f;
  if constexpr (SC) {
    const float ic = 1.0f / cap;
#pragma omp simd reduction(max : m) reduction(+ : s)
    for (int64_t v = 0; v < V; ++v) {
      const float t = cap * ftanh(z[v] * ic);
      z[v] = t;
      m = t > m ? t : m;
      s += t;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : s)
    for (int64_t v = 0; v < V; ++v) {
      const float t = z[v];
      m = t > m ? t : m;
      s += t;
    }
  }
  mx = m;
  sum = s;
}

template <bool SC>
static inline void sweep_cap(float* __restrict z, int64_t V, float cap) {
  if constexpr (SC) {
    const float ic = 1.0f / cap;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] = cap * ftanh(z[v] * ic);
  }
}

static inline float sum_exp(const float* __restrict z, int64_t V, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < V; ++v) s += fexp(z[v] - m);
  return s;
}

static inline float ce_loss(float lse, float zy, float zsum, int64_t V, const CEParams& P) {
  float l = (1.0f - P.eps) * (lse - zy);
  if (P.eps > 0.0f) l += P.eps * (lse - zsum / static_cast<float>(V));
  if (P.zl > 0.0f) l += P.zl * lse * lse;
  return l;
}

LSA_INLINE float cap_grad(float t, float cap) {
  const float r = t / cap;
  return 1.0f - r * r;
}

// ------------------------------------------------------------------------------------------- CE

template <bool SC>
static void ce_row(float* __restrict z, int64_t V, int64_t y, const CEParams& P, bool has_lse, float lse_in,
                   bool has_coef, float coef, float& loss_out, float& lse_out) {
  const bool valid = y != P.ignore_index;
  const bool hot = valid && in_shard(y, V);
  float lse;
  if (has_lse) {  // backward with saved lse: only the softcap is needed before the gradient
    sweep_cap<SC>(z, V, P.cap);
    lse = lse_in;
    loss_out = 0.0f;
  } else {
    float m, zsum;
    sweep_cap_max_sum<SC>(z, V, P.cap, m, zsum);
    lse = m + std::log(sum_exp(z, V, m));
    loss_out = valid ? ce_loss(lse, z[hot ? y : 0], zsum, V, P) : 0.0f;
  }
  lse_out = lse;
  if (!has_coef) return;
  const float zy = hot ? z[y] : 0.0f;
  const float k = coef * (1.0f + 2.0f * P.zl * lse);
  const float off = coef * eps_over_v(P, V);
  const float cap = P.cap;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float t = z[v];
    float g = k * fexp(t - lse) - off;
    if constexpr (SC) g *= cap_grad(t, cap);
    z[v] = g;
  }
  if (hot) {
    float g = coef * (1.0f - P.eps);
    if constexpr (SC) g *= cap_grad(zy, cap);
    z[y] -= g;
  }
}

std::tuple<at::Tensor, at::Tensor> ce_chunk(at::Tensor z, const at::Tensor& y, const std::optional<at::Tensor>& lse,
                                            const std::optional<at::Tensor>& coef, int64_t ignore_index,
                                            double label_smoothing, double z_loss, double softcap,
                                            int64_t vocab_total) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(),
              "ce_chunk: z must be a contiguous fp32 [C, V] CPU tensor");
  const int64_t C = z.size(0), V = z.size(1);
  TORCH_CHECK(y.scalar_type() == at::kLong && y.numel() == C, "ce_chunk: y must be int64 [C]");
  auto yc = y.contiguous();
  at::Tensor lse_c, coef_c;
  if (lse.has_value()) {
    lse_c = lse->to(at::kFloat).contiguous();
    TORCH_CHECK(lse_c.numel() == C, "ce_chunk: lse must be [C]");
  }
  if (coef.has_value()) {
    coef_c = coef->to(at::kFloat).contiguous();
    TORCH_CHECK(coef_c.numel() == C, "ce_chunk: coef must be [C]");
  }
  auto loss = at::empty({C}, z.options());
  auto lse_out = at::empty({C}, z.options());
  const CEParams P{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                   static_cast<float>(softcap), vocab_total};
  const bool sc = softcap > 0.0;
  float* zp = z.data_ptr<float>();
  const int64_t* yp = yc.data_ptr<int64_t>();
  const float* lp = lse.has_value() ? lse_c.data_ptr<float>() : nullptr;
  const float* cp = coef.has_value() ? coef_c.data_ptr<float>() : nullptr;
  float* lo = loss.data_ptr<float>();
  float* so = lse_out.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = zp + i * V;
      const float l_in = lp ? lp[i] : 0.0f;
      const float c = cp ? cp[i] : 0.0f;
      if (sc)
        ce_row<true>(row, V, yp[i], P, lp != nullptr, l_in, cp != nullptr, c, lo[i], so[i]);
      else
        ce_row<false>(row, V, yp[i], P, lp != nullptr, l_in, cp != nullptr, c, lo[i], so[i]);
    }
  });
  return {loss, lse_out};
}

// ----------------------------------------------------------------------------------------- pairs

constexpr int64_t kStats = N_STATS;  // lsa_kernels.maths.N_PAIR_STATS
constexpr double kExpm1Agree = 1e-6;  // lsa_kernels.maths.EXPM1_AGREE
constexpr double kPsiMax = 1.0;       // backends/cpu/aten.py PSI_MAX

struct PairRow {
  int64_t yp, yq;       // targets (ignore_index when no CE)
  const float* st_in;   // saved statistics [8] or nullptr
  float* st;            // statistics out [8]
  float* div;           // the row's divergence out (forward)
  float* ce_p;
  float* ce_q;
  bool has_coef;
  float cp, cq, cd;     // coef_ce_p, coef_ce_q, coef_div
};

struct PairParams {
  CEParams ce;
  bool with_ce, grad_p, grad_q;
  float tau;
};

// divergence parts of the per-element gradient (per unit of a and b), before the coef_div/τ factor
template <int DIV>
LSA_INLINE void div_grad(float a, float b, float p, float q, float lta, float ltb, float X, float Y, float& gp,
                            float& gq) {
  if constexpr (DIV == SCE) {
    gp = p - q - p * (b - X);
    gq = q - p - q * (a - Y);
  } else if constexpr (DIV == KL) {
    gp = p * ((a - b) - X);
    gq = q - p;
  } else if constexpr (DIV == KL_REVERSE) {
    gp = p - q;
    gq = q * (Y - (a - b));
  } else if constexpr (DIV == SYM_KL) {
    const float u = a - b;
    gp = p * (u - X) + p - q;
    gq = q * (Y - u) + q - p;
  } else {  // JS
    const float lp = a - lta, lq = b - ltb;
    const float lm = flogaddexp(lp, lq) - kLn2;
    gp = 0.5f * p * (lp - lm - X);
    gq = 0.5f * q * (lq - lm - Y);
  }
}

// expm1(v) - v: its Taylor series v²/2! + ... + v⁹/9! for |v| <= 0.5 (truncation < 2e-9 relative),
// e - v (e = expm1(v)) beyond, where it cancels by less than 5x (backends/cpu/aten.py _centred_kl)
LSA_INLINE float phi_expm1(float v, float e) {
  const float series = expm1_minus_x(v);
  const float av = v < 0.0f ? -v : v;
  return av <= 0.5f ? series : e - v;
}

// A KL of a row from differences centred on the row's mean c = E_w[u] (backends/cpu/aten.py _centred_kl
// is the spec): v = sign·(u - c), s = E_w[expm1 v], KL = E_w[φ(v)] - ψ(s), ψ(s) = s - log1p(s), for |s| <= 1
// (log1p(s) - E_w[v] beyond); where the expm1 clamp bit, the plain sign·(lse_a - lse_b - c).
// sign +1: w = q, KL(q||p); -1: w = p, KL(p||q).
// the KL from the sums of one view's centred sweep: Σw, Σw·expm1(v), Σw·φ(v), Σw·v
static double centred_kl_value(float sw, float sx, float sphi, float sy, int sign, float lta, float ltb, float c) {
  const double xc = static_cast<double>(sx) / sw, phi = static_cast<double>(sphi) / sw;
  const double yc = static_cast<double>(sy) / sw;
  const double la = lta, lb = ltb;
  const double direct = sign * ((la - lb) - static_cast<double>(c));
  if (std::isfinite(xc) && xc > -1.0) {
    const double via = std::log1p(xc);
    if (std::abs(via - direct) <= kExpm1Agree * (1.0 + std::abs(la) + std::abs(lb)))
      return std::abs(xc) <= kPsiMax ? phi - (xc - via) : via - yc;
  }
  return direct;
}

// KL(p||q) (PQ, centred on cp = E_p[u]) and/or KL(q||p) (QP, centred on cq = E_q[u]) of a row, one sweep for both
template <bool PQ, bool QP>
static double centred_kl(const float* __restrict za, const float* __restrict zb, int64_t V, float it, float lta,
                         float ltb, float cp, float cq) {
  float swp = 0.f, sxp = 0.f, sphp = 0.f, syp = 0.f, swq = 0.f, sxq = 0.f, sphq = 0.f, syq = 0.f;
#pragma omp simd reduction(+ : swp, sxp, sphp, syp, swq, sxq, sphq, syq)
  for (int64_t v = 0; v < V; ++v) {
    const float a = za[v] * it, b = zb[v] * it;
    const float u = a - b;
    if constexpr (PQ) {
      const float w = fexp(a - lta), d = cp - u, e = fexpm1(d);
      swp += w;
      sxp += w * e;
      sphp += w * phi_expm1(d, e);
      syp += w * d;
    }
    if constexpr (QP) {
      const float w = fexp(b - ltb), d = u - cq, e = fexpm1(d);
      swq += w;
      sxq += w * e;
      sphq += w * phi_expm1(d, e);
      syq += w * d;
    }
  }
  double out = 0.0;
  if constexpr (PQ) out += centred_kl_value(swp, sxp, sphp, syp, -1, lta, ltb, cp);
  if constexpr (QP) out += centred_kl_value(swq, sxq, sphq, syq, 1, lta, ltb, cq);
  return out;
}

// CE2: CE with τ != 1 (the CE softmax needs its own exponentials)
template <int DIV, bool SC, bool CE2>
static void pair_row(float* __restrict za, float* __restrict zb, int64_t V, const PairParams& P, const PairRow& R) {
  const CEParams& ce = P.ce;
  const bool with_ce = P.with_ce;
  const bool vp = with_ce && R.yp != ce.ignore_index;
  const bool vq = with_ce && R.yq != ce.ignore_index;
  const bool hp = vp && in_shard(R.yp, V), hq = vq && in_shard(R.yq, V);
  const float it = 1.0f / P.tau;
  float lse_p, lse_q, lta, ltb, X, Y, X2 = 0.0f, Y2 = 0.0f;
  if (R.st_in) {
    sweep_cap<SC>(za, V, ce.cap);
    sweep_cap<SC>(zb, V, ce.cap);
    lse_p = R.st_in[LSE_P], lse_q = R.st_in[LSE_Q], lta = R.st_in[LSET_P], ltb = R.st_in[LSET_Q];
    X = R.st_in[ST_X], Y = R.st_in[ST_Y], X2 = R.st_in[ST_X2], Y2 = R.st_in[ST_Y2];
    *R.ce_p = 0.0f;
    *R.ce_q = 0.0f;
  } else {
    float ma, mb, sza, szb;
    sweep_cap_max_sum<SC>(za, V, ce.cap, ma, sza);
    sweep_cap_max_sum<SC>(zb, V, ce.cap, mb, szb);
    const float mta = ma * it, mtb = mb * it;  // τ > 0
    float sa = 0.f, sb = 0.f, sp = 0.f, sq = 0.f, tx = 0.f, ty = 0.f, tx2 = 0.f, ty2 = 0.f;
#pragma omp simd reduction(+ : sa, sb, sp, sq, tx, ty, tx2, ty2)
    for (int64_t v = 0; v < V; ++v) {
      const float a = za[v] * it, b = zb[v] * it;
      const float ea = fexp(a - mta), eb = fexp(b - mtb);
      sa += ea;
      sb += eb;
      if constexpr (CE2) {
        sp += fexp(za[v] - ma);
        sq += fexp(zb[v] - mb);
      }
      if constexpr (DIV == SCE) {
        tx += ea * b;
        ty += eb * a;
      } else if constexpr (DIV == KL) {
        const float u = a - b;
        tx += ea * u;
        ty += ea * fexpm1(-u);
      } else if constexpr (DIV == KL_REVERSE) {
        const float u = a - b;
        tx += eb * fexpm1(u);
        ty += eb * u;
      } else if constexpr (DIV == SYM_KL) {
        const float u = a - b;
        tx += ea * u;
        ty += eb * u;
        tx2 += ea * fexpm1(-u);
        ty2 += eb * fexpm1(u);
      }
    }
    lta = mta + std::log(sa);
    ltb = mtb + std::log(sb);
    if constexpr (DIV == SCE) {
      X = tx / sa;
      Y = ty / sb;
    } else if constexpr (DIV == SYM_KL) {
      X = tx / sa;
      Y = ty / sb;
      X2 = tx2 / sa;
      Y2 = ty2 / sb;
    } else if constexpr (DIV == KL) {
      X = tx / sa;
      Y = ty / sa;
    } else if constexpr (DIV == KL_REVERSE) {
      X = tx / sb;
      Y = ty / sb;
    } else {  // JS: KL(p||m), KL(q||m) in log space, one more sweep now that the lse are known
      float kx = 0.f, ky = 0.f;
#pragma omp simd reduction(+ : kx, ky)
      for (int64_t v = 0; v < V; ++v) {
        const float lp = za[v] * it - lta, lq = zb[v] * it - ltb;
        const float lm = flogaddexp(lp, lq) - kLn2;
        kx += fexp(lp) * (lp - lm);
        ky += fexp(lq) * (lq - lm);
      }
      X = kx;
      Y = ky;
    }
    // the row's divergence (stats above stay the mergeable sums of lsa_kernels/maths.py)
    if constexpr (DIV == SCE) {
      *R.div = lta + ltb - X - Y;
    } else if constexpr (DIV == KL) {
      *R.div = static_cast<float>(centred_kl<true, false>(za, zb, V, it, lta, ltb, X, 0.0f));
    } else if constexpr (DIV == KL_REVERSE) {
      *R.div = static_cast<float>(centred_kl<false, true>(za, zb, V, it, lta, ltb, 0.0f, Y));
    } else if constexpr (DIV == SYM_KL) {
      *R.div = static_cast<float>(centred_kl<true, true>(za, zb, V, it, lta, ltb, X, Y));
    } else {
      *R.div = 0.5f * (X + Y);
    }
    if (with_ce) {
      if constexpr (CE2) {
        lse_p = ma + std::log(sp);
        lse_q = mb + std::log(sq);
      } else {
        lse_p = lta;
        lse_q = ltb;
      }
      *R.ce_p = vp ? ce_loss(lse_p, za[hp ? R.yp : 0], sza, V, ce) : 0.0f;
      *R.ce_q = vq ? ce_loss(lse_q, zb[hq ? R.yq : 0], szb, V, ce) : 0.0f;
    } else {
      lse_p = lse_q = 0.0f;
      *R.ce_p = 0.0f;
      *R.ce_q = 0.0f;
    }
  }
  float* st = R.st;
  st[LSE_P] = lse_p, st[LSE_Q] = lse_q, st[LSET_P] = lta, st[LSET_Q] = ltb;
  st[ST_X] = X, st[ST_Y] = Y, st[ST_X2] = X2, st[ST_Y2] = Y2;
  if (!R.has_coef) return;

  // gradient sweep: za <- dz_p, zb <- dz_q
  const float cdp = P.grad_p ? R.cd * it : 0.0f;
  const float cdq = P.grad_q ? R.cd * it : 0.0f;
  const float cp = with_ce ? R.cp : 0.0f, cq = with_ce ? R.cq : 0.0f;
  const float kp = cp * (1.0f + 2.0f * ce.zl * lse_p), kq = cq * (1.0f + 2.0f * ce.zl * lse_q);
  const float offp = cp * eps_over_v(ce, V), offq = cq * eps_over_v(ce, V);
  const float zyp = hp ? za[R.yp] : 0.0f, zyq = hq ? zb[R.yq] : 0.0f;
  const float cap = ce.cap;
  if (with_ce) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float ta = za[v], tb = zb[v];
      const float a = ta * it, b = tb * it;
      const float p = fexp(a - lta), q = fexp(b - ltb);
      float gp, gq;
      div_grad<DIV>(a, b, p, q, lta, ltb, X, Y, gp, gq);
      float smp, smq;
      if constexpr (CE2) {
        smp = fexp(ta - lse_p);
        smq = fexp(tb - lse_q);
      } else {
        smp = p;
        smq = q;
      }
      float dp = cdp * gp + (kp * smp - offp);
      float dq = cdq * gq + (kq * smq - offq);
      if constexpr (SC) {
        dp *= cap_grad(ta, cap);
        dq *= cap_grad(tb, cap);
      }
      za[v] = dp;
      zb[v] = dq;
    }
    if (hp) {
      float g = cp * (1.0f - ce.eps);
      if constexpr (SC) g *= cap_grad(zyp, cap);
      za[R.yp] -= g;
    }
    if (hq) {
      float g = cq * (1.0f - ce.eps);
      if constexpr (SC) g *= cap_grad(zyq, cap);
      zb[R.yq] -= g;
    }
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      const float ta = za[v], tb = zb[v];
      const float a = ta * it, b = tb * it;
      const float p = fexp(a - lta), q = fexp(b - ltb);
      float gp, gq;
      div_grad<DIV>(a, b, p, q, lta, ltb, X, Y, gp, gq);
      float dp = cdp * gp, dq = cdq * gq;
      if constexpr (SC) {
        dp *= cap_grad(ta, cap);
        dq *= cap_grad(tb, cap);
      }
      za[v] = dp;
      zb[v] = dq;
    }
  }
}

using PairRowFn = void (*)(float*, float*, int64_t, const PairParams&, const PairRow&);

template <int DIV>
static PairRowFn pick_sc(bool sc, bool ce2) {
  if (sc) return ce2 ? &pair_row<DIV, true, true> : &pair_row<DIV, true, false>;
  return ce2 ? &pair_row<DIV, false, true> : &pair_row<DIV, false, false>;
}

static PairRowFn pick(int64_t div, bool sc, bool ce2) {
  switch (div) {
    case SCE: return pick_sc<SCE>(sc, ce2);
    case KL: return pick_sc<KL>(sc, ce2);
    case KL_REVERSE: return pick_sc<KL_REVERSE>(sc, ce2);
    case SYM_KL: return pick_sc<SYM_KL>(sc, ce2);
    case JS: return pick_sc<JS>(sc, ce2);
  }
  TORCH_CHECK(false, "pair_chunk: unknown divergence code ", div);
}

static at::Tensor opt_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return at::Tensor();
  auto c = t->to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == n, "pair_chunk: ", name, " must have ", n, " elements");
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_chunk(
    at::Tensor za, at::Tensor zb, const std::optional<at::Tensor>& yp, const std::optional<at::Tensor>& yq,
    const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& coef_ce_p,
    const std::optional<at::Tensor>& coef_ce_q, const std::optional<at::Tensor>& coef_div, int64_t divergence,
    double temperature, bool grad_p, bool grad_q, bool with_ce, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, int64_t vocab_total) {
  for (const auto* t : {&za, &zb})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                "pair_chunk: za, zb must be contiguous fp32 [C, V] CPU tensors");
  TORCH_CHECK(za.sizes() == zb.sizes(), "pair_chunk: za and zb differ in shape");
  TORCH_CHECK(temperature > 0.0, "pair_chunk: temperature must be > 0");
  const int64_t C = za.size(0), V = za.size(1);
  at::Tensor ypc, yqc;
  if (with_ce) {
    TORCH_CHECK(yp.has_value() && yq.has_value(), "pair_chunk: with_ce needs yp and yq");
    ypc = yp->contiguous();
    yqc = yq->contiguous();
    TORCH_CHECK(ypc.scalar_type() == at::kLong && ypc.numel() == C && yqc.scalar_type() == at::kLong &&
                    yqc.numel() == C,
                "pair_chunk: yp, yq must be int64 [C]");
  }
  at::Tensor st_in;
  if (stats.has_value()) {
    st_in = stats->to(at::kFloat).contiguous();
    TORCH_CHECK(st_in.dim() == 2 && st_in.size(0) == C && st_in.size(1) == kStats, "pair_chunk: stats must be [C, 8]");
  }
  auto cdv = opt_f32(coef_div, C, "coef_div");
  auto ccp = opt_f32(coef_ce_p, C, "coef_ce_p");
  auto ccq = opt_f32(coef_ce_q, C, "coef_ce_q");
  const bool has_coef = cdv.defined();
  if (has_coef && with_ce) TORCH_CHECK(ccp.defined() && ccq.defined(), "pair_chunk: with_ce needs coef_ce_p/q");

  auto ce_p = at::empty({C}, za.options());
  auto ce_q = at::empty({C}, za.options());
  auto st = at::empty({C, kStats}, za.options());
  auto dv = st_in.defined() ? at::empty({0}, za.options()) : at::empty({C}, za.options());
  const PairParams P{{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                      static_cast<float>(softcap), vocab_total},
                     with_ce, grad_p, grad_q, static_cast<float>(temperature)};
  const bool ce2 = with_ce && temperature != 1.0;
  const PairRowFn fn = pick(divergence, softcap > 0.0, ce2);
  float* a = za.data_ptr<float>();
  float* b = zb.data_ptr<float>();
  const int64_t* ypp = with_ce ? ypc.data_ptr<int64_t>() : nullptr;
  const int64_t* yqp = with_ce ? yqc.data_ptr<int64_t>() : nullptr;
  const float* sip = st_in.defined() ? st_in.data_ptr<float>() : nullptr;
  const float* cdp = has_coef ? cdv.data_ptr<float>() : nullptr;
  const float* cpp = ccp.defined() ? ccp.data_ptr<float>() : nullptr;
  const float* cqp = ccq.defined() ? ccq.data_ptr<float>() : nullptr;
  float* stp = st.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  float* cep = ce_p.data_ptr<float>();
  float* ceq = ce_q.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      PairRow R{ypp ? ypp[i] : ignore_index,
                yqp ? yqp[i] : ignore_index,
                sip ? sip + kStats * i : nullptr,
                stp + kStats * i,
                sip ? nullptr : dvp + i,
                cep + i,
                ceq + i,
                has_coef,
                cpp ? cpp[i] : 0.0f,
                cqp ? cqp[i] : 0.0f,
                cdp ? cdp[i] : 0.0f};
      fn(a + i * V, b + i * V, V, P, R);
    }
  });
  return {ce_p, ce_q, st, dv};
}

// --------------------------------------------------------------------------------------- dense targets

struct NoT {};  // no probability target in this row

struct DenseParams {
  int64_t ignore_index;
  float zl, cap, kappa, beta;
  float beta_csum;  // β·Σ_v c_v over the whole vocabulary (the fused A)
  bool fused;
};

struct DenseRow {
  int64_t y;  // target id (ignore_index or an id outside [0, V): no one-hot); has_y false: none given
  bool has_y;
  float alpha, omega;  // 0 / 1 when absent
  const float* lse_in;
  const float* coef;
  const float* coef_p;
  float* dt;  // row of dt or nullptr
  float *lse, *tz, *tm, *cz, *zy;
};

template <typename TT>
LSA_INLINE float tload(const TT* __restrict t, int64_t v) {
  return static_cast<float>(t[v]);
}

template <bool SC, bool HC, typename TT>
static void dense_row(float* __restrict z, int64_t V, const float* __restrict c, const TT* __restrict t,
                      const DenseParams& P, const DenseRow& R) {
  constexpr bool HT = !std::is_same_v<TT, NoT>;
  const float cap = P.cap;
  const bool hot = R.has_y && R.y != P.ignore_index && in_shard(R.y, V);
  float lse, tm = 0.0f;
  if (R.lse_in == nullptr) {
    float m = kNegInf, tz = 0.0f, tmv = 0.0f, cz = 0.0f;
    const float ic = SC ? 1.0f / cap : 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : tz, tmv, cz)
    for (int64_t v = 0; v < V; ++v) {
      float zv = z[v];
      if constexpr (SC) {
        zv = cap * ftanh(zv * ic);
        z[v] = zv;
      }
      m = zv > m ? zv : m;
      float cv = 1.0f;
      if constexpr (HC) cv = c[v];
      if constexpr (HT) {
        const float tc = tload(t, v) * cv;
        tz += tc * zv;
        tmv += tc;
      }
      cz += cv * zv;
    }
    lse = m + std::log(sum_exp(z, V, m));
    tm = tmv;
    *R.lse = lse;
    *R.tz = tz;
    *R.tm = tmv;
    *R.cz = cz;
    *R.zy = hot ? z[R.y] : 0.0f;
  } else {
    sweep_cap<SC>(z, V, cap);
    lse = *R.lse_in;
    *R.lse = lse;
    *R.tz = *R.tm = *R.cz = *R.zy = 0.0f;
  }
  if (R.coef == nullptr) return;
  const float coef = *R.coef;
  float coef_p;
  if (P.fused) {
    float A = P.beta_csum + R.alpha + 2.0f * P.zl * lse * R.omega;
    if constexpr (HT) A += P.kappa * tm;
    coef_p = coef * A;
  } else {
    coef_p = *R.coef_p;
  }
  const float ck = coef * P.kappa, cb = coef * P.beta;
  if (R.dt != nullptr) {  // ∂/∂t_v = coef·κ·c_v·(lse − z_v), before z is overwritten
    float* __restrict dt = R.dt;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      float cv = 1.0f;
      if constexpr (HC) cv = c[v];
      dt[v] = ck * cv * (lse - z[v]);
    }
  }
  const float zy = hot ? z[R.y] : 0.0f;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float zv = z[v];
    float cv = 1.0f;
    if constexpr (HC) cv = c[v];
    float g = coef_p * fexp(zv - lse) - cb * cv;
    if constexpr (HT) g -= ck * tload(t, v) * cv;
    if constexpr (SC) g *= cap_grad(zv, cap);
    z[v] = g;
  }
  if (hot) {
    float g = coef * R.alpha;
    if constexpr (SC) g *= cap_grad(zy, cap);
    z[R.y] -= g;
  }
}

template <bool SC, bool HC, typename TT>
static void dense_rows(float* zp, int64_t C, int64_t V, const float* c, const TT* tp, int64_t t_stride,
                       const DenseParams& P, const int64_t* yp, const float* ap, const float* op, const float* lp,
                       const float* cfp, const float* cpp, float* dtp, int64_t dt_stride, float* const* outs) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      DenseRow R{yp ? yp[i] : P.ignore_index,
                 yp != nullptr,
                 ap ? ap[i] : 0.0f,
                 op ? op[i] : 1.0f,
                 lp ? lp + i : nullptr,
                 cfp ? cfp + i : nullptr,
                 cpp ? cpp + i : nullptr,
                 dtp ? dtp + i * dt_stride : nullptr,
                 outs[0] + i, outs[1] + i, outs[2] + i, outs[3] + i, outs[4] + i};
      dense_row<SC, HC, TT>(zp + i * V, V, c, tp ? tp + i * t_stride : nullptr, P, R);
    }
  });
}

template <typename TT>
static void dense_dispatch(bool sc, bool hc, float* zp, int64_t C, int64_t V, const float* c, const TT* tp,
                           int64_t ts, const DenseParams& P, const int64_t* yp, const float* ap, const float* op,
                           const float* lp, const float* cfp, const float* cpp, float* dtp, int64_t ds,
                           float* const* outs) {
  if (sc) {
    if (hc) dense_rows<true, true, TT>(zp, C, V, c, tp, ts, P, yp, ap, op, lp, cfp, cpp, dtp, ds, outs);
    else dense_rows<true, false, TT>(zp, C, V, c, tp, ts, P, yp, ap, op, lp, cfp, cpp, dtp, ds, outs);
  } else {
    if (hc) dense_rows<false, true, TT>(zp, C, V, c, tp, ts, P, yp, ap, op, lp, cfp, cpp, dtp, ds, outs);
    else dense_rows<false, false, TT>(zp, C, V, c, tp, ts, P, yp, ap, op, lp, cfp, cpp, dtp, ds, outs);
  }
}

static at::Tensor dense_rowvec(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return at::Tensor();
  auto c = t->to(at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == n, "dense_chunk: ", name, " must have ", n, " elements, got ", c.numel());
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_chunk(
    at::Tensor z, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& t,
    const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& omega, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& coef_p, const std::optional<at::Tensor>& coef,
    const std::optional<at::Tensor>& dt, const std::optional<at::Tensor>& c_sum, double c_sum_f, double kappa,
    double beta, bool fused, int64_t ignore_index, double z_loss, double softcap) {
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(),
              "dense_chunk: z must be a contiguous fp32 [C, V] CPU tensor");
  const int64_t C = z.size(0), V = z.size(1);
  at::Tensor yc, tc, cc;
  if (y.has_value()) {
    yc = y->contiguous();
    TORCH_CHECK(yc.scalar_type() == at::kLong && yc.numel() == C, "dense_chunk: y must be int64 [C]");
  }
  if (t.has_value()) {
    tc = *t;
    TORCH_CHECK(tc.dim() == 2 && tc.size(0) == C && tc.size(1) == V, "dense_chunk: t must be [C, V] = [", C, ", ",
                V, "], got ", tc.sizes());
    if (tc.stride(1) != 1) tc = tc.contiguous();
    const auto st = tc.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
                "dense_chunk: t must be fp32, fp64, bf16 or fp16, got ", st);
  }
  if (c.has_value()) {
    cc = c->to(at::kFloat).contiguous();
    TORCH_CHECK(cc.numel() == V, "dense_chunk: c must be [V] = [", V, "]");
  }
  auto al = dense_rowvec(alpha, C, "alpha");
  auto om = dense_rowvec(omega, C, "omega");
  auto ls = dense_rowvec(lse, C, "lse");
  auto cf = dense_rowvec(coef, C, "coef");
  auto cp = dense_rowvec(coef_p, C, "coef_p");
  TORCH_CHECK(!cf.defined() || fused || cp.defined(), "dense_chunk: coef needs coef_p (or fused)");
  TORCH_CHECK(!fused || !ls.defined(), "dense_chunk: fused forms A from the forward's sums: no lse");
  float* dtp = nullptr;
  int64_t ds = 0;
  if (dt.has_value()) {
    TORCH_CHECK(cf.defined(), "dense_chunk: dt needs coef");
    TORCH_CHECK(dt->scalar_type() == at::kFloat && dt->dim() == 2 && dt->size(0) == C && dt->size(1) == V &&
                    dt->stride(1) == 1,
                "dense_chunk: dt must be an fp32 [C, V] tensor with unit stride along V");
    dtp = dt->data_ptr<float>();
    ds = dt->stride(0);
  }
  double csum = c_sum_f;
  if (c_sum.has_value()) csum = c_sum->item<double>();
  const DenseParams P{ignore_index, static_cast<float>(z_loss), static_cast<float>(softcap),
                      static_cast<float>(kappa), static_cast<float>(beta), static_cast<float>(beta * csum), fused};
  std::vector<at::Tensor> outs;
  float* op[5];
  for (int k = 0; k < 5; ++k) {
    outs.push_back(at::empty({C}, z.options()));
    op[k] = outs.back().data_ptr<float>();
  }
  const bool sc = softcap > 0.0, hc = cc.defined();
  float* zp = z.data_ptr<float>();
  const float* cpt = hc ? cc.data_ptr<float>() : nullptr;
  const int64_t* yp = yc.defined() ? yc.data_ptr<int64_t>() : nullptr;
  const float* ap = al.defined() ? al.data_ptr<float>() : nullptr;
  const float* omp_ = om.defined() ? om.data_ptr<float>() : nullptr;
  const float* lp = ls.defined() ? ls.data_ptr<float>() : nullptr;
  const float* cfp = cf.defined() ? cf.data_ptr<float>() : nullptr;
  const float* cpp = cp.defined() ? cp.data_ptr<float>() : nullptr;
  if (!tc.defined()) {
    dense_dispatch<NoT>(sc, hc, zp, C, V, cpt, nullptr, 0, P, yp, ap, omp_, lp, cfp, cpp, dtp, ds, op);
  } else {
    const int64_t ts = tc.stride(0);
    switch (tc.scalar_type()) {
      case at::kFloat:
        dense_dispatch<float>(sc, hc, zp, C, V, cpt, tc.data_ptr<float>(), ts, P, yp, ap, omp_, lp, cfp, cpp, dtp,
                              ds, op);
        break;
      case at::kDouble:
        dense_dispatch<double>(sc, hc, zp, C, V, cpt, tc.data_ptr<double>(), ts, P, yp, ap, omp_, lp, cfp, cpp,
                               dtp, ds, op);
        break;
      case at::kBFloat16:
        dense_dispatch<c10::BFloat16>(sc, hc, zp, C, V, cpt, tc.data_ptr<c10::BFloat16>(), ts, P, yp, ap, omp_, lp,
                                      cfp, cpp, dtp, ds, op);
        break;
      default:
        dense_dispatch<c10::Half>(sc, hc, zp, C, V, cpt, tc.data_ptr<c10::Half>(), ts, P, yp, ap, omp_, lp, cfp,
                                  cpp, dtp, ds, op);
    }
  }
  return {outs[0], outs[1], outs[2], outs[3], outs[4]};
}

// elementwise fast-math functions, for accuracy tests only (which: 0 exp, 1 expm1, 2 tanh, 3 log1p on [0,1])
at::Tensor fastmath(const at::Tensor& x, int64_t which) {
  auto xc = x.to(at::kFloat).contiguous();
  auto out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = xc.numel();
  switch (which) {
    case 0:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = fexp(xp[i]);
      break;
    case 1:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = fexpm1(xp[i]);
      break;
    case 2:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = ftanh(xp[i]);
      break;
    case 3:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = flog1p01(xp[i]);
      break;
    default:
      TORCH_CHECK(false, "fastmath: unknown function ", which);
  }
  return out;
}

}  // namespace
}  // namespace lsa

TORCH_LIBRARY(lsa_kernels, m) {
  m.def(
      "ce_chunk(Tensor(a!) z, Tensor y, Tensor? lse, Tensor? coef, int ignore_index, float label_smoothing, "
      "float z_loss, float softcap, int vocab_total=0) -> (Tensor, Tensor)");
  m.def(
      "pair_chunk(Tensor(a!) za, Tensor(b!) zb, Tensor? yp, Tensor? yq, Tensor? stats, Tensor? coef_ce_p, "
      "Tensor? coef_ce_q, Tensor? coef_div, int divergence, float temperature, bool grad_p, bool grad_q, "
      "bool with_ce, int ignore_index, float label_smoothing, float z_loss, float softcap, int vocab_total=0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_chunk(Tensor(a!) z, Tensor? y, Tensor? t, Tensor? c, Tensor? alpha, Tensor? omega, Tensor? lse, "
      "Tensor? coef_p, Tensor? coef, Tensor(b!)? dt, Tensor? c_sum, float c_sum_f, float kappa, float beta, "
      "bool fused, int ignore_index, float z_loss, float softcap) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fastmath(Tensor x, int which) -> Tensor");
}

TORCH_LIBRARY_IMPL(lsa_kernels, CPU, m) {
  m.impl("ce_chunk", &lsa::ce_chunk);
  m.impl("pair_chunk", &lsa::pair_chunk);
  m.impl("dense_chunk", &lsa::dense_chunk);
  m.impl("fastmath", &lsa::fastmath);
}

// A plain extension module: importing lsa_kernels._C runs the TORCH_LIBRARY registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lsa_kernels CPU kernels; ops in torch.ops.lsa_kernels",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (!mod) return nullptr;
#if defined(__AVX512F__)
  PyModule_AddStringConstant(mod, "simd", "avx512");
#elif defined(__AVX2__)
  PyModule_AddStringConstant(mod, "simd", "avx2");
#else
  PyModule_AddStringConstant(mod, "simd", "sse2");
#endif
  return mod;
}
