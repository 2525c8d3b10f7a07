"""Synthetic study of the paper's §3 (lsa_kernels.studies.synthetic): data, inverses, and the headline finding."""
import math

import pytest
import torch

from lsa_kernels.studies import synthetic as syn
from lsa_kernels.studies.synthetic_model import PES, Regressors, init_params


def test_make_batch_and_targets():
    g = torch.Generator().manual_seed(0)
    lengths = syn.sample_train_lengths(g, 4000, 1, 10)
    assert int(lengths.min()) == 1 and int(lengths.max()) == 10
    counts = torch.bincount(lengths, minlength=11)[1:].double()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.03  # uniform on 1..10
    ids = syn.make_batch(g, lengths)
    assert ids.shape == (4000, 11)
    assert (ids[:, 0] == syn.BOS).all()
    bits = ids[:, 1:]
    assert set(bits.unique().tolist()) <= {0, 1}
    pad = torch.arange(10)[None, :] >= lengths[:, None]
    assert (bits[pad] == 0).all()  # padding past the length is zero
    assert abs(bits[~pad].double().mean().item() - 0.5) < 0.02  # fair bits
    mean = syn.natural_target("mean", bits, lengths)
    ref = torch.tensor([bits[i, : lengths[i]].double().mean().item() for i in range(4000)], dtype=torch.float64)
    assert torch.allclose(mean, ref)
    for task in syn.TASKS[1:]:
        assert torch.equal(syn.natural_target(task, bits, lengths), lengths.double())


@pytest.mark.parametrize("task", syn.TASKS)
def test_reparameterisation_inverses(task):
    n = torch.arange(1, 51, dtype=torch.float64)
    y = n / 50 if task == "mean" else n
    p = syn.target_transform(task, y)
    assert torch.allclose(syn.target_inverse(task, p), y, rtol=1e-12, atol=1e-12)
    if task == "length_log":
        assert p[0] == 0.0  # log 1 = 0
    if task == "length_invsqrt":  # non-positive predictions give a large but finite length
        assert torch.isfinite(syn.target_inverse(task, torch.tensor([-1.0, 0.0], dtype=torch.float64))).all()


def test_train_target_stats_exact():
    m, v = syn.train_target_stats("length", 1, 10)
    assert m == pytest.approx(5.5) and v == pytest.approx(8.25)
    m, v = syn.train_target_stats("mean", 1, 10)
    # E[mean] = 1/2; Var = E_n[1/(4n)]
    assert m == pytest.approx(0.5) and v == pytest.approx(sum(0.25 / n for n in range(1, 11)) / 10)
    m, v = syn.train_target_stats("length_log", 1, 10)
    assert m == pytest.approx(sum(math.log(n) for n in range(1, 11)) / 10)


def test_model_is_causal_and_reads_last_token():
    torch.manual_seed(0)
    for pe in PES:
        model = Regressors(pe, 2, 11, [init_params(pe, 16, 1, 11)], [0.0], [1.0]).eval()
        g = torch.Generator().manual_seed(1)
        lengths = torch.tensor([3, 7, 12])  # 12 > table: learned PE clamps
        ids = syn.make_batch(g, lengths)
        out = model(ids, lengths)[0]
        garbage = ids.clone()
        for i, L in enumerate(lengths.tolist()):
            garbage[i, L + 1:] = 1  # change only the padding
        assert torch.allclose(out, model(garbage, lengths)[0], atol=1e-6)
        single = torch.stack([model(ids[i:i + 1, : L + 1], lengths[i:i + 1])[0, 0] for i, L in enumerate(lengths.tolist())])
        assert torch.allclose(out, single, atol=1e-5)


def test_misalignment_suffix_is_exact():
    # a model whose output is the exact mean of the bits: misalignment = E[(mean(x) - mean(suffix))^2] / var
    class Oracle(torch.nn.Module):
        def forward(self, ids, lengths):
            return syn.natural_target("mean", ids[:, 1:], lengths).float()

    n, lo, hi = 20000, 5, 10
    got = syn.misalignment(Oracle(), lo, hi, n, 1.0, seed=0)
    # mean(x) - mean(s) for x = (r, s), |x| = a, |s| = b: (1/a - 1/b) sum(s) + (1/a) sum(r); variance
    # 1/4 [b (1/a - 1/b)^2 + (a - b)/a^2] = 1/4 (1/b - 1/a)
    ls = range(lo, hi + 1)
    exact = sum(0.25 * (1 / min(a, b) - 1 / max(a, b)) for a in ls for b in ls) / len(ls) ** 2
    assert got == pytest.approx(exact, rel=0.08)


def test_ensemble_matches_single_model_training():
    """Training M models as one stacked Regressors is the same computation as training each alone."""
    cfg = syn.StudyConfig(steps=4, batch_size=8, warmup=2)
    members, ens, _ = syn.train_group(("mean", "length_log"), "rope", (3,), cfg)
    for i, (task, seed) in enumerate(members):
        _, single, _ = syn.train_group((task,), "rope", (seed,), cfg)
        for (k, a), b in zip(ens.member(i).state_dict().items(), single.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5), k


def test_cli_writes_results(tmp_path):
    rc = syn.main(["--quick", "--tasks", "mean,length", "--pe", "learned", "--seeds", "1", "--steps", "3",
                   "--workers", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    for f in ("results.json", "table.md", "error_vs_length.png", "misalignment_vs_error.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert syn.main(["--tasks", "bogus", "--out", str(tmp_path)]) == 2


def test_mean_generalises_length_does_not():
    """The paper's §3 finding on a reduced study (NoPE, 3 seeds, 120 steps, all six models in one ensemble).

    Relative RMSE at lengths 30–50 (error / RMS target, so the mean task's [0, 1] and the length task's
    growing target are on one scale). Measured with this configuration over seeds 0..5 when the margins were
    set: mean/NoPE 0.015–0.034, length/NoPE 0.64–0.69 (ratio ≥ 19×), length error at L=50 / at L=15 ≥ 2.9,
    in-range error ≤ 0.021 (mean) and ≤ 0.048 (length). The test asks for 5× and 2× on every seed.
    """
    cfg = syn.StudyConfig(steps=120, n_eval=32, n_misalign=32)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead (and contend on shared cores)
    try:
        members, ens, _ = syn.train_group(("mean", "length"), "nope", (0, 1, 2), cfg)
        res = {m: r for m, r in zip(members, syn.evaluate(ens, [t for t, _ in members], cfg))}
    finally:
        torch.set_num_threads(n_threads)
    for s in (0, 1, 2):
        mean, length = res[("mean", s)], res[("length", s)]
        # both fit the training range
        assert mean["rel_in"] < 0.05 and length["rel_in"] < 0.1, (mean["rel_in"], length["rel_in"])
        assert mean["rel_long"] < 0.1, mean["rel_long"]
        assert length["rel_long"] > 0.3, length["rel_long"]
        assert length["rel_long"] > 5 * mean["rel_long"], (mean["rel_long"], length["rel_long"])
        # the length model's error grows with the test length; the mean model's stays small
        assert length["rel_rmse"][49] > 2 * length["rel_rmse"][14]
        assert mean["rel_rmse"][49] < 0.1
