"""The multi-seed demo: its statistics on hand-made numbers, and a tiny end-to-end run (lsa demo)."""

import dataclasses
import json
import math
import os

import pytest

from lsa_kernels.train import demo_stats as S

# ------------------------------------------------------------------------------------ statistics


def test_student_t_and_sign_test_match_tables():
    # two-sided 5 % critical values of Student's t (any statistics table)
    assert S.student_t_p(2.776445, 4) == pytest.approx(0.05, abs=1e-6)
    assert S.student_t_p(2.570582, 5) == pytest.approx(0.05, abs=1e-6)
    assert S.student_t_p(12.7062, 1) == pytest.approx(0.05, abs=1e-5)
    assert S.student_t_p(-1.0, 1) == pytest.approx(0.5)  # Cauchy
    assert S.student_t_p(0.0, 3) == pytest.approx(1.0)
    # exact two-sided sign test: 5 of 5 -> 2/32; 4 of 5 -> 2*6/32; ties dropped
    assert S.sign_test_p(5, 0) == pytest.approx(0.0625)
    assert S.sign_test_p(1, 4) == pytest.approx(0.375)
    assert S.sign_test_p(3, 2) == 1.0 and S.sign_test_p(0, 0) == 1.0
    assert S.sign_test_p(10, 0) == pytest.approx(2 / 1024)


def test_paired_differences_and_verdict_text():
    ref = {0: 100.0, 1: 200.0, 2: 50.0, 3: 100.0, 4: 100.0}
    arm = {0: 97.0, 1: 196.0, 2: 48.0, 3: 99.0, 4: 101.0}  # -3 %, -2 %, -4 %, -1 %, +1 %
    d = S.paired(arm, ref)
    assert d["seeds"] == [0, 1, 2, 3, 4] and d["n"] == 5
    assert d["rel_pct"] == pytest.approx([-3.0, -2.0, -4.0, -1.0, 1.0])
    assert d["abs"] == pytest.approx([-3.0, -4.0, -2.0, -1.0, 1.0])
    assert d["mean"] == pytest.approx(-1.8)
    assert d["std"] == pytest.approx(math.sqrt(((1.2**2) + 0.2**2 + 2.2**2 + 0.8**2 + 2.8**2) / 4))
    assert (d["k_lower"], d["k_higher"]) == (4, 1)
    t = -1.8 / (d["std"] / math.sqrt(5))
    assert d["t"] == pytest.approx(t) and d["p_t"] == pytest.approx(0.10454, abs=2e-5)  # scipy.stats.ttest_rel
    assert d["p_sign"] == pytest.approx(0.375)
    line = S.verdict("sce", "ce1", "PPL@1024", d)
    assert line == ("sce vs ce1: PPL@1024 lower on 4 of 5 seeds, mean -1.8 % ± 1.9 (paired t-test p = 0.10, "
                    "sign test p = 0.38) -> no significant difference")
    # a consistent drop is called "lower"; a consistent rise "higher"
    d2 = S.paired({s: 0.97 * v + 0.001 * s for s, v in ref.items()}, ref)
    assert d2["k_lower"] == 5 and d2["p_t"] < 0.05 and S.call(d2) == "lower"
    assert S.verdict("symkl", "ce2", "LongPPL@1024", d2).endswith("-> lower")
    d3 = S.paired({s: 1.05 * v + 0.001 * s for s, v in ref.items()}, ref)
    assert S.call(d3) == "higher" and "lower on 0 of 5 seeds, mean +5.0 %" in S.verdict("a", "b", "m", d3)
    # the same shift on every seed: std 0, still called
    d4 = S.paired({s: 0.9 * v for s, v in ref.items()}, ref)
    assert d4["std"] == pytest.approx(0.0, abs=1e-12) and d4["p_t"] == 0.0 and S.call(d4) == "lower"


def test_paired_drops_missing_seeds():
    d = S.paired({0: 1.0, 1: float("nan"), 2: 3.0, 5: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0})
    assert d["seeds"] == [0, 2] and d["n"] == 2 and d["rel_pct"] == pytest.approx([-50.0, 50.0])
    assert S.call(d) == "no significant difference"
    assert "no seeds" in S.verdict("a", "b", "m", S.paired({0: None}, {0: 1.0}))


def test_correlations_and_final_train_ce():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    pe = S.pearson(x, y)  # scipy.stats.pearsonr: 0.7745967, p 0.1240271
    assert pe["r"] == pytest.approx(0.7745967, abs=1e-6) and pe["p"] == pytest.approx(0.1240271, abs=1e-6)
    sp = S.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])  # scipy.stats.spearmanr: 0.8207827, p 0.0885870
    assert sp["r"] == pytest.approx(0.8207827, abs=1e-6) and sp["p"] == pytest.approx(0.0885870, abs=1e-6)
    assert S.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert S.pearson([1, 2, 3], [3, 2, 1])["r"] == pytest.approx(-1.0)
    assert math.isnan(S.pearson([1, 1, 1], [1, 2, 3])["r"])
    assert S.pearson([1, 2, None, 4], [1, 2, 3, float("nan")])["n"] == 2
    rows = [{"ce": float(i)} for i in range(1, 21)]  # last 10 % of 20 rows = the last 2
    assert S.final_train_ce(rows) == pytest.approx(19.5)
    assert S.final_train_ce(rows[:5]) == pytest.approx(5.0)  # at least one row
    assert math.isnan(S.final_train_ce([]))


def _fake_runs():
    base = {0: 100.0, 1: 110.0, 2: 90.0}
    runs = []
    for arm, f in (("ce1", 1.0), ("ce2", 0.99), ("sce", 1.03)):
        for s, v in base.items():
            runs.append({"arm": arm, "seed": s, "metrics": {"PPL@64": v * f, "LongPPL@64": v * f / 10 + s,
                                                            "LSM(sce)": f + 0.01 * s, "train CE": 4.0 + s}})
    return runs


def test_build_stats_markdown_and_plot(tmp_path):
    runs = _fake_runs()
    ms = ["PPL@64", "LongPPL@64", "LSM(sce)", "train CE"]
    st = S.build_stats(runs, ms, verdict_metrics=["PPL@64"], corr_target="PPL@64", corr_predictors=["LSM(sce)", "train CE"])
    assert st["arms"] == ["ce1", "ce2", "sce"]
    assert st["summary"]["ce1"]["PPL@64"]["mean"] == pytest.approx(100.0)
    assert st["summary"]["ce1"]["PPL@64"]["std"] == pytest.approx(10.0)
    assert set(st["paired"]) == {"ce1", "ce2"} and set(st["paired"]["ce1"]) == {"ce2", "sce"}
    assert st["paired"]["ce1"]["sce"]["PPL@64"]["rel_pct"] == pytest.approx([3.0, 3.0, 3.0])
    assert st["verdicts"][0] == ("ce2 vs ce1: PPL@64 lower on 3 of 3 seeds, mean -1.0 % ± 0.0 (paired t-test "
                                 "p < 0.0001, Holm-adjusted p < 0.0001, sign test p = 0.25) -> lower")
    assert len(st["verdicts"]) == 3  # ce2, sce vs ce1; sce vs ce2 (no mirrored "ce1 vs ce2")
    assert not any(v.startswith("ce1 vs ") for v in st["verdicts"])
    assert st["correlation"]["train CE"]["pearson"]["n"] == 9
    text = S.markdown(st, {"base x4": {"PPL@64": 120.0, "LSM(sce)": 1.5}})
    assert "| base x4 | 1 | 120.00 | n/a | 1.5 | n/a |" in text
    assert "| ce1 | 3 | 100.00 ± 10.00 |" in text
    assert "| sce | +3.0 ± 0.0 (0/3) |" in text
    assert "- sce vs ce2: PPL@64 lower on 0 of 3 seeds" in text and "Spearman" in text
    S.plot(st, [64], str(tmp_path / "d.png"), runs=runs, reference_rows={"base x4": {"PPL@64": 120.0}}, l_train=64,
           scatter=["LSM(sce)", "train CE"])
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_parse_arm_and_bad_options(capsys, tmp_path):
    from lsa_kernels.train.demo import demo_main, parse_arm
    from lsa_kernels.train.config import ConfigError

    assert parse_arm("sce@0.5") == ("sce@0.5", {"alpha": 0.5, "ce_views": 0, "divergence": "sce"})
    assert parse_arm("symkl@1.0")[0] == "symkl@1"
    for bad in ("sce", "sce@0", "foo@0.1", "sce@x", "sce@nan"):
        with pytest.raises(ConfigError, match="--extra-arms"):
            parse_arm(bad)
    with pytest.raises(ConfigError, match=r"longce is an arm of the protocol \(--arms"):
        parse_arm("longce@5")
    out = tmp_path / "d"
    bad = [(["--seeds", "0"], "--seeds"), (["--extra-arms", "sce@-1"], "--extra-arms"),
           (["--rope-factor", "0.5"], "--rope-factor"), (["--threads", "-1"], "--threads"),
           (["--data", "text", "--base-l-train", "10", "--rope-factor", "1.25"], "whole length"),
           (["--data", "text", "--rope-scaling", "yarn"], "--rope-scaling linear only")]
    for argv, msg in bad:
        try:  # a value outside a flag's declared range is refused by the parser itself (SystemExit 2, as lsa demo)
            rc = demo_main(["--out", str(out), *argv])
        except SystemExit as e:
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lsa demo: error:") and msg in err[0], err
        assert not out.exists()


def test_protocol_arms_and_their_train_configs(tmp_path):
    from lsa_kernels.train.demo import _parser, plan

    p = plan(_parser().parse_args(["--data", "text", "--out", str(tmp_path / "d"), "--seeds", "2"]))
    assert list(p["arms"]) == ["ce1", "ce2", "sce", "symkl", "longce"]  # make demo's arms, in table order
    assert [(a, s) for a, s, _ in p["runs"]] == [(a, s) for s in (0, 1) for a in p["arms"]]
    cfg = {(a, s): c for a, s, c in p["runs"]}
    fields = ("alpha", "ce_views", "divergence", "ce_weighting", "longce_gamma")
    want = {"ce1": (0.0, 1, "sce", "none", 5.0), "ce2": (0.0, 2, "sce", "none", 5.0),
            "sce": (0.1, 0, "sce", "none", 5.0), "symkl": (0.1, 0, "sym_kl", "none", 5.0),
            "longce": (0.0, 2, "sce", "longce", 5.0)}
    for arm, w in want.items():
        assert tuple(getattr(cfg[(arm, 1)], f) for f in fields) == w, arm
    # longce differs from its comparison arm ce2 in the CE weighting only (and its output directory)
    d2, dl = vars(cfg[("ce2", 0)]), vars(cfg[("longce", 0)])
    assert {k for k in d2 if d2[k] != dl[k]} == {"ce_weighting", "out"}
    assert not any(c.ce_weighting == "longce" for a, _, c in p["runs"] if a != "longce")
    assert [a for a, _, _ in plan(_parser().parse_args(["--data", "text", "--out", "x", "--seeds", "1", "--arms", "longce"]))["runs"]] == ["longce"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_longce_arm_objective_is_longce_at_alpha_0(backend):
    """What the longce arm trains on (lsa train --alpha 0 --ce-views 2 --ce-weighting longce): CE over both views,
    each paired long row's CE times min(exp(CE_short - CE_long), gamma) (docs/maths.md §13), by hand from logits
    (at alpha 0 the objective once took the plain two-view CE path and dropped the weighting)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lsa_kernels.integrations.hf import LongShortObjective

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         tie_word_embeddings=True)).double()
    T, e, gamma = 16, 5, 1.02  # a random model: weights near 1; a gamma this small binds on some rows
    win = torch.randint(0, 97, (2, T + e + 1), generator=torch.Generator().manual_seed(1))
    out = LongShortObjective(model, backend=backend, ce_weighting="longce", longce_gamma=gamma)(win, e, 0.0, views=2)
    with torch.no_grad():
        long, short = win[:, : T + 1], win[:, e:]
        cl = torch.nn.functional.cross_entropy(model(long[:, :-1]).logits.transpose(1, 2), long[:, 1:], reduction="none")
        cs = torch.nn.functional.cross_entropy(model(short[:, :-1]).logits.transpose(1, 2), short[:, 1:], reduction="none")
    f = torch.ones_like(cl)
    f[:, e:] = torch.clamp(torch.exp(cs[:, : T - e] - cl[:, e:]), max=gamma)
    assert (f == gamma).any() and (f < 1).any()
    want = ((cl * f).sum() + cs.sum()) / (cl.numel() + cs.numel())
    torch.testing.assert_close(out.ce.detach(), want, rtol=1e-10, atol=1e-12)
    assert abs(want - (cl.sum() + cs.sum()) / (cl.numel() + cs.numel())) > 1e-5  # differs from ce2's loss
    out.loss.backward()  # and it trains: gradients reach the model
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_finished_reads_missing_fields_as_defaults(tmp_path):
    from lsa_kernels.train.config import TrainConfig
    from lsa_kernels.train.demo import finished

    out = tmp_path / "run"
    (out / "ckpt-000003").mkdir(parents=True)
    (out / "ckpt-000003" / "trainer.pt").write_bytes(b"")
    (out / "latest").write_text("ckpt-000003")
    (out / "metrics.json").write_text(json.dumps({"step": 3}))
    cfg = TrainConfig(steps=3, out=str(out), ce_views=2)
    d = dataclasses.asdict(cfg)
    for missing in ({}, {"ce_weighting", "longce_gamma"}):  # written before these fields existed: their defaults
        (out / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k not in missing}))
        assert finished(cfg), missing
    assert not finished(dataclasses.replace(cfg, ce_weighting="longce"))  # a missing field is not a wildcard
    (out / "config.json").write_text(json.dumps(dict(d, longce_gamma=2.0)))
    assert not finished(cfg) and not finished(dataclasses.replace(cfg, steps=4))


# ------------------------------------------------------------------------------------ end to end
TINY = ["--data", "text", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--ffn", "64", "--base-l-train", "16",
        "--base-steps", "3", "--base-batch-size", "4", "--steps", "2", "--batch-size", "2", "--n-windows", "2",
        "--lsm-samples", "4", "--quiet"]


def test_demo_end_to_end_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from _util import write_corpus_texts

    from lsa_kernels.train.demo import demo_main

    (tmp_path / "texts").mkdir()
    texts = write_corpus_texts(tmp_path / "texts")
    out = tmp_path / "demo"
    argv = TINY + ["--out", str(out), "--train-files", *texts["train"], "--eval-files", *texts["test"]]
    assert demo_main(argv + ["--seeds", "2", "--arms", "ce1", "ce2", "longce", "--extra-arms", "symkl@0.5"]) == 0
    for f in ("table.md", "results.json", "demo.png", "eval/results.json"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["l_train"] == 64 and res["protocol"]["lengths"] == [64, 128, 256]
    runs = res["runs"]
    assert [(r["arm"], r["seed"]) for r in runs] == [(a, s) for s in (0, 1) for a in ("ce1", "ce2", "longce", "symkl@0.5")]
    for r in runs:  # every run trained its steps at the extended length, from the extended base
        assert r["steps_logged"] == 2 and math.isfinite(r["metrics"]["PPL@256"]) and math.isfinite(r["metrics"]["train CE"])
        cfg = json.loads((out / "runs" / r["arm"] / f"seed{r['seed']}" / "config.json").read_text())
        assert cfg["l_train"] == 64 and cfg["rope_scaling"] == "linear" and cfg["rope_factor"] == 4
    by = {(r["arm"], r["seed"]): r for r in runs}
    assert by[("ce1", 0)]["train_misalign"] == 0 and by[("ce2", 0)]["train_misalign"] == 0
    assert by[("symkl@0.5", 0)]["train_misalign"] > 0
    cfg = json.loads((out / "runs" / "symkl@0.5" / "seed0" / "config.json").read_text())
    assert (cfg["alpha"], cfg["divergence"]) == (0.5, "sym_kl")
    cfg = json.loads((out / "runs" / "longce" / "seed0" / "config.json").read_text())
    assert (cfg["alpha"], cfg["ce_views"], cfg["ce_weighting"], cfg["longce_gamma"]) == (0, 2, "longce", 5)
    # the weighting reached the loss: same windows, same initial weights as ce2, a different logged CE at step 1
    ce_first = {a: json.loads((out / "runs" / a / "seed0" / "log.jsonl").read_text().splitlines()[0])["ce"]
                for a in ("ce2", "longce")}
    assert ce_first["longce"] != ce_first["ce2"], ce_first
    # the evaluated models carry the extension; the view past 64 positions changes no output
    assert res["wall_s"]["view_max_logit_diff"] == 0.0
    assert res["eval_runs"]["symkl@0.5/seed1"]["rope"]["rope_type"] == "linear"
    st = res["stats"]
    assert set(st["paired"]) == {"ce1", "ce2"} and set(st["paired"]["ce1"]) == {"ce2", "longce", "symkl@0.5"}
    assert set(st["paired"]["ce2"]) == {"longce", "symkl@0.5"}
    assert len(st["verdicts"]) == 3 * 5 and st["verdicts"][0].startswith("ce2 vs ce1: PPL@64 lower on ")
    for ref in ("ce1", "ce2"):
        for m in ("PPL@64", "PPL@256", "LongPPL@256"):
            assert sum(v.startswith(f"longce vs {ref}: {m}") for v in st["verdicts"]) == 1, (ref, m)
    assert all("Holm-adjusted" in v or v.endswith("no seeds to compare") for v in st["verdicts"])
    assert any("Holm-adjusted" in v for v in st["verdicts"])
    assert set(st["correlation"]) == {"LSM(sce)", "LSM(sym_kl)", "train CE", "train loss"}
    assert st["correlation"]["LSM(sce)"]["pearson"]["n"] == 8
    table = (out / "table.md").read_text()
    assert "| base x4 | 1 |" in table and "Verdicts" in table and "Wall time" in table
    assert "| longce | 2 |" in table and "longce (alpha 0, CE on both views, LongCE weights on the paired long rows, gamma 5)" in table
    # a second call reuses the finished base (and, with --resume, the finished run): only the evaluation runs
    assert demo_main(argv + ["--seeds", "1", "--arms", "ce1", "--resume"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["wall_s"]["base_reused"] is True and res2["runs"][0]["reused"] is True
    assert "(1 runs: 0 trained, 1 reused)" in (out / "table.md").read_text()
    assert res2["runs"][0]["metrics"]["PPL@256"] == pytest.approx(by[("ce1", 0)]["metrics"]["PPL@256"], rel=1e-6)
    # --replot redraws the figure from results.json alone
    (out / "demo.png").unlink()
    assert demo_main(["--out", str(out), "--replot"]) == 0 and (out / "demo.png").stat().st_size > 10_000
    assert demo_main(["--out", str(tmp_path / "nothing"), "--replot"]) == 2


def test_holm_adjustment():
    # the textbook example: p = 0.01, 0.04, 0.03, 0.005 -> 0.03, 0.06, 0.06, 0.02 (m = 4)
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, NaN left out of the family and kept NaN, monotone in the raw order
    out = S.holm([0.5, float("nan"), 0.4])
    assert out[0] == pytest.approx(0.8) and out[2] == pytest.approx(0.8) and out[1] != out[1]
    assert S.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    # a call made on the raw p but not after adjustment
    d = {"n": 3, "mean": -1.0, "std": 0.1, "k_lower": 3, "p_t": 0.03, "p_sign": 0.25, "p_holm": 0.09}
    assert S.call(d) == "no significant difference" and S.call({**d, "p_holm": 0.03}) == "lower"


def test_recall_metrics_are_compared_in_points():
    # recall can be 0 for the reference: compared as a difference (x 100), not relative to it
    d = S.paired({0: 0.3, 1: 0.5, 2: 0.4}, {0: 0.0, 1: 0.2, 2: 0.1}, absolute=True)
    assert d["n"] == 3 and d["rel_pct"] == pytest.approx([30.0, 30.0, 30.0])
    assert S.paired({0: 0.3}, {0: 0.0})["n"] == 0  # relative: the zero reference is dropped
    runs = [{"arm": a, "seed": s, "metrics": {"recall@256": v + s * 0.01, "copy gap d96": 2 * v}}
            for a, v in (("ce1", 0.0), ("ce2", 0.25)) for s in range(3)]
    st = S.build_stats(runs, ["recall@256", "copy gap d96"], verdict_metrics=["recall@256"])
    assert st["paired"]["ce1"]["ce2"]["recall@256"]["mean"] == pytest.approx(25.0)
    assert st["verdicts"] == [st["verdicts"][0]] and "+25.0 points (x 100)" in st["verdicts"][0]
    assert st["verdicts"][0].endswith("-> higher")


def _parts(kind, num, den):
    return {"kind": kind, "num": list(num), "den": list(den)}


def test_bootstrap_interval_over_windows():
    w = 40
    ref = {s: _parts("ppl", [2.0 + 0.1 * ((i * 7 + s) % 5) for i in range(w)], [1.0] * w) for s in range(3)}
    # the same model: every resample gives a difference of exactly 0
    same = S.bootstrap_ci(ref, ref)
    assert same["lo"] == same["hi"] == 0.0 and same["windows"] == w and same["n_boot"] == S.N_BOOT
    # lower NLL on every window: the whole interval lies below 0, and brackets the full-sample difference
    lower = {s: _parts("ppl", [x - 0.05 for x in p["num"]], p["den"]) for s, p in ref.items()}
    ci = S.bootstrap_ci(lower, ref)
    full = 100 * (math.exp(-0.05) - 1)
    assert ci["lo"] <= full + 1e-9 and ci["hi"] >= full - 1e-9 and ci["hi"] < 0
    # noisy differences centred on 0: the interval contains 0
    noisy = {s: _parts("ppl", [x + (0.3 if (i + s) % 2 else -0.3) for i, x in enumerate(p["num"])], p["den"])
             for s, p in ref.items()}
    ci = S.bootstrap_ci(noisy, ref)
    assert ci["lo"] < 0 < ci["hi"]
    # recall in points: 1 of 2 answers right per window vs 0 -> +50 points, every resample
    hit = {0: _parts("frac", [1.0] * w, [2.0] * w)}
    miss = {0: _parts("frac", [0.0] * w, [2.0] * w)}
    assert S.bootstrap_ci(hit, miss, absolute=True)["lo"] == pytest.approx(50.0)
    assert S.bootstrap_ci(hit, {}) is None
    with pytest.raises(ValueError, match="same windows"):
        S.bootstrap_ci({0: _parts("frac", [1.0] * 3, [1.0] * 3)}, {0: _parts("frac", [1.0] * 4, [1.0] * 4)})


def test_verdict_lines_carry_the_bootstrap_interval_when_runs_have_window_pieces():
    runs = []
    for seed in range(3):
        for arm, shift in (("ce1", 0.0), ("ce2", 0.0), ("symkl", -0.1)):
            num = [2.0 + shift + 0.01 * ((i + seed) % 3) for i in range(20)]
            runs.append({"arm": arm, "seed": seed, "metrics": {"keyPPL@256": math.exp(sum(num) / 20)},
                         "parts": {"keyPPL@256": _parts("ppl", num, [1.0] * 20)}})
    st = S.build_stats(runs, ["keyPPL@256"], verdict_metrics=["keyPPL@256"])
    line = next(v for v in st["verdicts"] if v.startswith("symkl vs ce1"))
    assert "bootstrap interval over 20 windows" in line and st["paired"]["ce1"]["symkl"]["keyPPL@256"]["ci"]["hi"] < 0
    no_parts = [dict(r, parts=None) for r in runs]
    assert "bootstrap" not in S.build_stats(no_parts, ["keyPPL@256"], verdict_metrics=["keyPPL@256"])["verdicts"][0]
