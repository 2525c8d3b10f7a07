"""Dense targets: the record a dense-target cross-entropy passes down, and the per-row sums its forward returns.

Shared by the layers that build them (:mod:`lsa_kernels.weights`), the backend contract
(:mod:`lsa_kernels.backends.contract`, which re-exports both) and the kernels (kernels/dense.py, the cpu
backend's dense chunk), so that no kernel imports from the backends above it. The maths is docs/maths.md §11:
the row loss

    ℓ_i = A_i·lse_i + λ·ω_i·lse_i² − Σ_v T_iv z_iv,      T_iv = κ·t_iv·c_v + β·c_v + α_i·[v = y_i],

with ``A_i = Σ_v T_iv`` over the whole vocabulary (formed by the caller from the forward's sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor

__all__ = ["DenseOut", "DenseTarget"]


@dataclass(frozen=True)
class DenseTarget:
    """A row's target mass ``T = κ·t ⊙ c + β·c + α·onehot(y)`` (module docstring; docs/maths.md §11).

    ``t [N, V]`` probabilities (any float dtype, read tile by tile; None: no such term), ``c [V]`` class
    weights in the accumulation dtype (None: 1), ``alpha [N]`` the one-hot's weight per row (None: 0; the
    target ids are the ops' ``y``), ``omega [N]`` the z-loss weight per row (None: 1), ``c_sum`` Σ_v c_v over
    the WHOLE vocabulary (a float or a 0-d tensor) for A in the fused op."""

    t: Optional[Tensor] = None
    c: Optional[Tensor] = None
    kappa: float = 1.0
    beta: float = 0.0
    alpha: Optional[Tensor] = None
    omega: Optional[Tensor] = None
    c_sum: object = 0.0

    def rows(self, s) -> "DenseTarget":
        """The same target for the rows ``s`` (a slice)."""
        return DenseTarget(None if self.t is None else self.t[s], self.c, self.kappa, self.beta,
                           None if self.alpha is None else self.alpha[s], None if self.omega is None else self.omega[s],
                           self.c_sum)


@dataclass(frozen=True)
class DenseOut:
    """Per-row sums of a dense-target forward, all ``[N]`` in the accumulation dtype: ``lse``, ``tz = Σ_v t c z``,
    ``tm = Σ_v t c``, ``cz = Σ_v c z``, ``zy = z_y`` (z softcapped; sums over this weight's columns)."""

    lse: Tensor
    tz: Tensor
    tm: Tensor
    cz: Tensor
    zy: Tensor
