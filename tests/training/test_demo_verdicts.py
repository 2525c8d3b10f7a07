"""The demo's verdict rule at its edges: a paired t-test p between 0.05 and 0.1 is not called, a seed whose
value equals the reference's (a tie) is neither lower nor higher and is dropped by the sign test."""

import pytest

from lsa_kernels.train import demo_stats as S

REF = {0: 100.0, 1: 100.0, 2: 100.0, 3: 100.0, 4: 100.0}


def test_p_between_five_and_ten_percent_is_not_called():
    d = S.paired({0: 97.0, 1: 98.0, 2: 96.0, 3: 99.0, 4: 100.5}, REF)  # -3, -2, -4, -1, +0.5 %
    assert 0.05 < d["p_t"] < 0.1
    assert d["p_t"] == pytest.approx(0.07177, abs=1e-4)  # scipy.stats.ttest_rel on the relative differences
    assert S.call(d) == "no significant difference"
    assert S.verdict("sce", "ce1", "PPL@64", d).endswith("(paired t-test p = 0.072, sign test p = 0.38) "
                                                          "-> no significant difference")
    up = S.paired({s: 2 * REF[s] - v for s, v in {0: 97.0, 1: 98.0, 2: 96.0, 3: 99.0, 4: 100.5}.items()}, REF)
    assert 0.05 < up["p_t"] < 0.1 and S.call(up) == "no significant difference"
    assert S.call(d, level=0.1) == "lower" and S.call(up, level=0.1) == "higher"  # the level is what decides


def test_a_tied_seed_is_neither_lower_nor_higher():
    d = S.paired({0: 97.0, 1: 98.0, 2: 96.0, 3: 99.0, 4: 100.0}, REF)  # seed 4 tied
    assert d["n"] == 5 and (d["k_lower"], d["k_higher"]) == (4, 0)
    assert d["p_sign"] == pytest.approx(2 / 16)  # 4 vs 0 of 4 non-tied seeds (ties dropped); 5 of 5 would be 2/32
    assert d["p_t"] == pytest.approx(0.04742, abs=1e-4) and S.call(d) == "lower"
    assert S.verdict("sce", "ce1", "PPL@64", d) == ("sce vs ce1: PPL@64 lower on 4 of 5 seeds, mean -2.0 % ± 1.6 "
                                                    "(paired t-test p = 0.047, sign test p = 0.12) -> lower")
    two = S.paired({0: 97.0, 1: 98.0, 2: 96.0, 3: 100.0, 4: 100.0}, REF)  # two ties
    assert (two["k_lower"], two["k_higher"]) == (3, 0) and two["p_sign"] == pytest.approx(2 / 8)
    assert "lower on 3 of 5 seeds" in S.verdict("a", "b", "m", two) and S.call(two) == "no significant difference"
    rise = S.paired({0: 103.0, 1: 100.0, 2: 104.0}, {0: 100.0, 1: 100.0, 2: 100.0})  # a tie among rises
    assert (rise["k_lower"], rise["k_higher"]) == (0, 2) and rise["p_sign"] == pytest.approx(0.5)
