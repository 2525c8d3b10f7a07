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


def test_student_t_p_in_both_branches_of_the_incomplete_beta():
    """p-values near 1 (small |t|) come from the symmetric branch I_x(a, b) = 1 - I_{1-x}(b, a); the largest
    df need it (the direct continued fraction does not converge there). Truths: mpmath.betainc at 40 digits."""
    assert S.student_t_p(0.3, 4) == pytest.approx(0.7791214282774597, rel=1e-10)
    assert S.student_t_p(2.0, 3) == pytest.approx(0.1393259685588432, rel=1e-10)
    assert S.student_t_p(0.01, 1000) == pytest.approx(0.9920232819321873, rel=1e-9)
    assert S.student_t_p(1e-3, 5000) == pytest.approx(0.9992021554654282, rel=1e-9)


def test_pearson_degenerate_and_rounded_past_one():
    """A constant y (like a constant x) has no correlation: r nan, not a division by zero; an exactly linear
    relation whose r rounds to 1.0000000000000002 is clamped to 1 (p 0)."""
    import math

    assert math.isnan(S.pearson([1, 2, 3, 4], [5, 5, 5, 5])["r"])
    x = [-2.839012506100234, 7.833213196413649, -5.6311454616953664, -7.214525896036948, -7.205084300666423,
         -8.103384730462881]
    y = [4.017072612997003 * v + 1.3 for v in x]
    pe = S.pearson(x, y)
    assert pe["r"] == 1.0 and pe["p"] == 0.0
