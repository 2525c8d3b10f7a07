"""The shared definitions (lsa_kernels/maths.py) are the only ones: the C++ enums, the Triton ids, the
extension's codes and the option names all agree with them."""

import pathlib
import re

import torch

from lsa_kernels import _ext, maths, options
from lsa_kernels.maths import Divergence, Stat

CPP = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "lsa_cpu.cpp"


def _cpp_enum(name: str) -> dict:
    body = re.search(r"enum\s+" + name + r"\s*:\s*\w+\s*\{([^}]*)\}", CPP.read_text()).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def test_cpp_divergence_ids_match():
    assert _cpp_enum("Div") == {d.name: int(d) for d in Divergence}


def test_cpp_stat_columns_match():
    cpp = _cpp_enum("Stat")
    n = cpp.pop("N_STATS")
    assert n == maths.N_PAIR_STATS == len(Stat)
    assert {k.removeprefix("ST_"): v for k, v in cpp.items()} == {s.name: int(s) for s in Stat}


def test_python_tables_derive_from_maths():
    assert options.DIVERGENCES == maths.DIVERGENCES == ("sce", "kl", "kl_reverse", "sym_kl", "js")
    assert _ext.DIVERGENCE_CODES == {d.label: int(d) for d in Divergence}
    cols = (options.STAT_LSE_P, options.STAT_LSE_Q, options.STAT_LSET_P, options.STAT_LSET_Q,
            options.STAT_X, options.STAT_Y, options.STAT_X2, options.STAT_Y2)
    assert cols == tuple(range(8))


def test_divergence_of_names_the_choices():
    assert Divergence.of("kl_reverse") is Divergence.KL_REVERSE
    try:
        Divergence.of("kld")
    except ValueError as e:
        assert "divergence must be one of" in str(e) and "'kld'" in str(e)
    else:
        raise AssertionError("no error")


def test_ce_row_loss_matches_torch():
    torch.manual_seed(1)
    z = torch.randn(7, 13, dtype=torch.float64)
    y = torch.tensor([0, 3, 12, -100, 5, 5, 1])
    valid = y != -100
    lse = torch.logsumexp(z, 1)
    zy = z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    got = maths.ce_row_loss(lse, zy, z.mean(1), valid, 0.1, 1e-3)
    want = torch.nn.functional.cross_entropy(z, y, reduction="none", label_smoothing=0.1) + 1e-3 * lse**2 * valid
    torch.testing.assert_close(got, want)


def test_under_p_and_q_partition_the_expectations():
    """Every X/Y column of a one-pass divergence is an expectation under exactly one of p, q (maths.py table)."""
    for d in maths.Divergence:
        if d == Divergence.JS:
            assert d not in maths.UNDER_P and d not in maths.UNDER_Q
            continue
        used = {Stat.X, Stat.Y} | ({Stat.X2, Stat.Y2} if d == Divergence.SYM_KL else set())
        p, q = set(maths.UNDER_P[d]), set(maths.UNDER_Q[d])
        assert not (p & q) and (p | q) == used, d
