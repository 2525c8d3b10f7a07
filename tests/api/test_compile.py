"""torch.compile(fullgraph=True) over a module that uses every loss gives eager's values and gradients,
with ignore_index rows present (a known failure mode of peers: a silently wrong loss under compile)."""

import pytest
import torch
from torch import nn

import lsa_kernels as L

from _util import IGN

B, T, H, V = 2, 7, 16, 101


class Head(nn.Module):
    """A toy 'model tail': projection + all three fused losses."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V, bias=True)

    def forward(self, hl, hs, yl, ys):
        a, b = torch.tanh(self.proj(hl)), torch.tanh(self.proj(hs))
        w, bias = self.lm_head.weight, self.lm_head.bias
        ce = L.linear_cross_entropy(a, w, yl, linear_bias=bias, label_smoothing=0.1, backend="cpu", check_targets=False)
        div = L.linear_divergence(a, b, w, linear_bias=bias, divergence="js", mask=yl != IGN, backend="cpu")
        ls = L.long_short_loss(a, b, w, yl, ys, l_extra=3, alpha=0.2, linear_bias=bias, softcap=20.0, backend="cpu",
                               check_targets=False)
        return ce + div + ls.loss + 0.5 * ls.misalign


@pytest.mark.parametrize("compile_backend", ["inductor"])
def test_compiled_matches_eager(compile_backend):
    torch.manual_seed(0)
    mod = Head()
    hl, hs = torch.randn(B, T, H), torch.randn(B, T, H)
    yl, ys = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    yl[0, :4] = IGN
    ys[1, 2] = IGN

    def run(m):
        m.zero_grad()
        out = m(hl, hs, yl, ys)
        out.backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    eager = run(mod)
    compiled = run(torch.compile(mod, fullgraph=True, backend=compile_backend))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for gc, ge in zip(compiled[1], eager[1]):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)
