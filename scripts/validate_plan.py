"""Validate `lsa plan` (lsa_kernels/train/plan.py) against the measured CPU peak of one training step.

    python scripts/validate_plan.py                       # every configuration, one fresh process each
    python scripts/validate_plan.py --only tiny-ce-4k     # some of them
    python scripts/validate_plan.py --report-only         # redo table.md from results.json
    python scripts/validate_plan.py --long-context        # the longest-context table (planner + committed measurements)

Each configuration runs in a FRESH process, measured as benchmarks/train_step.py measures a train step: build the
model (randomly initialised transformers Llama, SDPA attention, CPU) and AdamW, one warm-up step at 64 tokens
(optimizer state, the fused head's probe, library initialisation), ``gc.collect()`` + ``malloc_trim(0)``, VmHWM
reset to the current RSS (``/proc/self/clear_refs``), then one step (forward, backward, ``AdamW.step()``,
``zero_grad(set_to_none=True)``) and VmHWM read. ``runtime`` = the RSS of the process once torch, transformers
and lsa_kernels are imported, before the model is built.

``--long-context`` writes benchmarks/results/long_context/{table.md,results.json}: the longest T per objective
for the train-step benchmark's model in 8 GiB (planned, beside what benchmarks/results/train_step measured), the
planned Llama-3-8B rows (LoRA r=32, bf16, 80 GiB, with and without activation offload) and the published
figures of Unsloth and Arctic Long Sequence Training.

Compared: the planner's peak above its runtime term against VmHWM - runtime (``step peak``: weights, optimizer
state, activations, loss buffers, gradients and every transient; PASS when within +-10 %), and, as a check of
the parts, the planner's resident state against the RSS after the warm-up. Writes
benchmarks/results/plan_validation/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness import malloc_trim as _malloc_trim, reset_hwm as _reset_hwm, status_kb as _status_kb  # noqa: E402
OUT = os.path.join(ROOT, "benchmarks", "results", "plan_validation")
MIB = 2**20

TINY = "train-step"  # benchmarks/train_step.py's model: Llama, V=128256, H=256, 2 layers, fp32
BODY = "train-step-v8k"  # its body with an 8192-token vocabulary: a cheap loss, so that long T is affordable and
# the activations (what the long-context levers change) dominate the step


class Cfg(NamedTuple):
    shape: str
    layers: Optional[int]
    dtype: str
    lora: int
    obj: str
    views: str
    ckpt: bool
    tiled: Optional[int]  # tiled MLP: None = off, 0 = one tile per hidden-size tokens, n = n tiles
    T: int
    norms: Optional[int] = None  # tiled norms, the same convention


CONFIGS = {
    "tiny-ce-2k": Cfg(TINY, None, "fp32", 0, "ce", "joint", False, None, 2048),
    "tiny-hf-2k": Cfg(TINY, None, "fp32", 0, "hf", "joint", False, None, 2048),
    "tiny-ls-joint-2k": Cfg(TINY, None, "fp32", 0, "long-short", "joint", False, None, 2048),
    "tiny-ls-seq-2k": Cfg(TINY, None, "fp32", 0, "long-short", "sequential", False, None, 2048),
    "tiny-ls-joint-ckpt-4k": Cfg(TINY, None, "fp32", 0, "long-short", "joint", True, None, 4096),
    "tiny-ls-seq-ckpt-tiled-2k": Cfg(TINY, None, "fp32", 0, "long-short", "sequential", True, 0, 2048),
    "tiny-ce-16k": Cfg(TINY, None, "fp32", 0, "ce", "joint", False, None, 16384),
    "tiny-ls-seq-16k": Cfg(TINY, None, "fp32", 0, "long-short", "sequential", False, None, 16384),
    "body-ls-joint-ckpt-32k": Cfg(BODY, None, "fp32", 0, "long-short", "joint", True, None, 32768),
    "body-ls-seq-ckpt-tiled-32k": Cfg(BODY, None, "fp32", 0, "long-short", "sequential", True, 0, 32768),
    "body-ls-seq-ckpt-tiled-norms-32k": Cfg(BODY, None, "fp32", 0, "long-short", "sequential", True, 0, 32768, 0),
    "body-ls-joint-ckpt-64k": Cfg(BODY, None, "fp32", 0, "long-short", "joint", True, None, 65536),
    "body-ls-seq-ckpt-tiled-64k": Cfg(BODY, None, "fp32", 0, "long-short", "sequential", True, 0, 65536),
    "body-ls-seq-ckpt-tiled-norms-64k": Cfg(BODY, None, "fp32", 0, "long-short", "sequential", True, 0, 65536, 0),
    "body-ls-seq-ckpt-tiled-norms-128k": Cfg(BODY, None, "fp32", 0, "long-short", "sequential", True, 0, 131072, 0),
    "tiny-lora-ls-seq-ckpt-tiled-norms-4k": Cfg(TINY, None, "fp32", 8, "long-short", "sequential", True, 0, 4096, 0),
    "l8b-1L-bf16-lora-ce-512": Cfg("llama3-8b", 1, "bf16", 32, "ce", "joint", False, None, 512),
    "l8b-1L-bf16-lora-hf-512": Cfg("llama3-8b", 1, "bf16", 32, "hf", "joint", False, None, 512),
    "l8b-2L-bf16-lora-ls-joint-256": Cfg("llama3-8b", 2, "bf16", 32, "long-short", "joint", False, None, 256),
    "l8b-2L-bf16-lora-ls-seq-ckpt-tiled-512": Cfg("llama3-8b", 2, "bf16", 32, "long-short", "sequential", True, 0, 512),
}


def _shape_dict(c: Cfg) -> dict:
    """The transformers config of ``c``'s model (a named shape of lsa plan, or the benchmark body)."""
    from lsa_kernels.train.plan import NAMED

    d = dict(NAMED[TINY], vocab_size=8192) if c.shape == BODY else dict(NAMED[c.shape])
    if c.layers:
        d["num_hidden_layers"] = c.layers
    return d


def _setup(c: Cfg):
    from lsa_kernels.train.plan import Setup

    return Setup(dtype=c.dtype, lora=c.lora, grad_ckpt=c.ckpt, tiled_mlp=c.tiled, tiled_norms=c.norms, views=c.views,
                 objective=c.obj, device="cpu")


def child(name: str) -> dict:
    import torch
    from transformers import LlamaConfig

    from lsa_kernels.integrations import hf
    from lsa_kernels.integrations.tiling import tile_mlp, tile_norms

    c = CONFIGS[name]
    dtype, lora, obj, views, ckpt, tiled, T = c.dtype, c.lora, c.obj, c.views, c.ckpt, c.tiled, c.T
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    def build(d):
        torch.manual_seed(0)
        model = hf.load_causal_lm(LlamaConfig(**d, max_position_embeddings=max(32768, 2 * T)), dtype=tdtype,
                                  attn="sdpa").train()
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, bias="none",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tiled is not None:
            tile_mlp(model, tiled or None)
        if c.norms is not None:
            tile_norms(model, c.norms or None)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    d = _shape_dict(c)
    gen = torch.Generator().manual_seed(1234)
    marks = []

    def fwd_bwd(model, V: int, t: int) -> float:  # the loss (and its graph) is dropped before the optimizer step
        n = t + t // 4 + 1 if obj == "long-short" else t
        x = torch.randint(0, V, (1, n), generator=gen)
        marks.append((time.perf_counter(), "forward"))
        if obj == "hf":
            loss = model(input_ids=x, labels=x).loss
        elif obj == "ce":
            loss = hf.causal_lm_loss(model, x, x)
        else:
            loss = hf.long_short_step(model, x, t // 4, alpha=0.1, views=views).loss
        marks.append((time.perf_counter(), "backward"))
        loss.backward()
        return float(loss.detach())

    def step(model, opt, V: int, t: int) -> float:
        loss = fwd_bwd(model, V, t)
        marks.append((time.perf_counter(), "optimizer"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), "end"))
        return loss

    # the runtime: the libraries' one-time initialisation (lazy imports, oneDNN, peft), done on a throwaway model
    small = dict(d, vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)
    m0, o0 = build(small)
    step(m0, o0, 512, 64)
    del m0, o0
    gc.collect()
    _malloc_trim()
    runtime_kb = _status_kb("VmRSS")
    model, opt = build(d)
    V = d["vocab_size"]
    step(model, opt, V, 64)
    gc.collect()
    _malloc_trim()
    base_kb = _status_kb("VmRSS")
    samples, stop = [], threading.Event()

    def sampler():  # RSS every ~2 ms: which phase of the step reaches the peak (VmHWM is the measurement)
        while not stop.is_set():
            samples.append((time.perf_counter(), _status_kb("VmRSS")))
            time.sleep(0.002)

    marks.clear()
    ok = _reset_hwm()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    loss = step(model, opt, V, T)
    dt = time.perf_counter() - t0
    hwm_kb = _status_kb("VmHWM")
    stop.set()
    th.join()
    phases = {}
    for (a0, n), (a1, _) in zip(marks, marks[1:]):
        vals = [r for t, r in samples if a0 <= t <= a1]
        phases[n] = round((max(vals) - runtime_kb) / 1024, 1) if vals else None
    return {"name": name, "T": T, "runtime_mib": runtime_kb / 1024, "base_mib": base_kb / 1024,
            "peak_mib": hwm_kb / 1024, "step_s": dt, "loss": loss, "hwm_reset": ok,
            "sampled_phase_max_mib": phases,
            "threads": torch.get_num_threads()}


def predict(name: str, runtime_mib: float) -> dict:
    from lsa_kernels.train.plan import plan, shape_from_dict

    c = CONFIGS[name]
    p = plan(shape_from_dict(_shape_dict(c), c.shape), _setup(c), c.T)
    rt = p.terms["runtime"]
    return {"pred_peak_step_mib": (p.peak - rt) / MIB, "pred_resident_mib": (p.terms["weights"] + p.terms["optimizer state"]) / MIB,
            "pred_phase": p.phase, "pred_terms_mib": {k: round(v / MIB, 1) for k, v in p.terms.items()},
            "pred_phases_mib": {k: round((v - rt) / MIB, 1) for k, v in p.phases.items()}}


def describe(name: str) -> str:
    c = CONFIGS[name]
    shape, layers, dtype, lora, obj, views, ckpt, tiled = c.shape, c.layers, c.dtype, c.lora, c.obj, c.views, c.ckpt, c.tiled
    shape = "train-step body, V = 8192" if shape == BODY else shape
    parts = [f"{shape}" + (f" ({layers} layer{'s' if layers > 1 else ''})" if layers else ""), dtype]
    if lora:
        parts.append(f"LoRA r={lora}")
    parts.append(obj + (f" {views}" if obj == "long-short" else ""))
    if ckpt:
        parts.append("ckpt")
    if tiled is not None:
        parts.append("tiled MLP")
    if c.norms is not None:
        parts.append("tiled norms")
    return ", ".join(parts)


def train_step_crosscheck() -> list:
    """The planner against every measured point of benchmarks/results/train_step/train_step.csv."""
    import csv

    from lsa_kernels.train.plan import Setup, load_shape, plan

    path = os.path.join(ROOT, "benchmarks", "results", "train_step", "train_step.csv")
    if not os.path.exists(path):
        return []
    s = load_shape(TINY)
    obj = {"hf": "hf", "fused_ce": "ce", "long_short": "long-short"}
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["status"] != "ok" or r["optimizer"] != "adamw" or int(r["H"]) != s.hidden:
                continue
            st = Setup(device="cpu", objective=obj[r["objective"]], grad_ckpt=r["grad_ckpt"] == "True", runtime=0)
            p = plan(s, st, int(r["T"]))
            pred = (p.peak - p.terms["weights"] - p.terms["optimizer state"]) / MIB
            meas = float(r["peak_extra_mib"])
            out.append({"objective": r["objective"], "grad_ckpt": r["grad_ckpt"] == "True", "T": int(r["T"]),
                        "pred_extra_mib": pred, "meas_extra_mib": meas, "ratio": pred / meas})
    return sorted(out, key=lambda c: (c["objective"], c["grad_ckpt"], c["T"]))


def write_report(rows: list) -> str:
    L = ["# `lsa plan` against measured CPU peaks", "",
         "One training step (forward, backward, AdamW step, zero_grad) per configuration, each in a fresh process "
         "(`python scripts/validate_plan.py`; the method of `benchmarks/train_step.py`: warm-up step at 64 tokens, "
         "gc + malloc_trim, VmHWM reset, one step, VmHWM). `step peak` = VmHWM − the process's RSS once torch, "
         "transformers and lsa_kernels are imported (the runtime); predicted = `lsa plan`'s peak less its runtime "
         "term. `resident` = RSS after the warm-up − runtime (weights + AdamW state) against the planner's. "
         "`above resident` = the step's own memory (activations, loss buffers, gradients, transients), the stricter "
         "comparison. PASS: step peak within ±10 %. T = tokens per view (the long-short step runs two views of T tokens).", "",
         "| configuration | T | predicted step peak (MiB) | measured (MiB) | ratio | within ±10 % | predicted phase | "
         "resident pred / meas (MiB) | above resident: pred / meas (ratio) | step s |",
         "|---|---:|---:|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {describe(r['name'])} | {CONFIGS[r['name']].T} | – | error: {r['error']} | – | FAIL | – | – | – |")
            continue
        meas = r["peak_mib"] - r["runtime_mib"]
        ratio = r["pred_peak_step_mib"] / meas
        ok = "PASS" if abs(ratio - 1) <= 0.10 else "FAIL"
        pe, me = r["pred_peak_step_mib"] - r["pred_resident_mib"], r["peak_mib"] - r["base_mib"]
        L.append(f"| {describe(r['name'])} | {r['T']} | {r['pred_peak_step_mib']:.0f} | {meas:.0f} | {ratio:.3f} | {ok} | "
                 f"{r['pred_phase']} | {r['pred_resident_mib']:.0f} / {r['base_mib'] - r['runtime_mib']:.0f} | "
                 f"{pe:.0f} / {me:.0f} ({pe / me:.2f}) | {r['step_s']:.0f} |")
    n_ok = sum(1 for r in rows if "error" not in r and abs(r["pred_peak_step_mib"] / (r["peak_mib"] - r["runtime_mib"]) - 1) <= 0.10)
    L += ["", f"{n_ok} of {len(rows)} configurations within ±10 %.", ""]
    cross = train_step_crosscheck()
    if cross:
        n_in = sum(1 for c in cross if abs(c["ratio"] - 1) <= 0.10)
        L += ["## Cross-check: the committed train-step benchmark", "",
              "benchmarks/results/train_step/train_step.csv (the same model and method, measured earlier in fresh "
              "processes, fp32, AdamW; `extra` = VmHWM − RSS after the warm-up, i.e. the step's memory on top of "
              f"weights and optimizer state) against the planner's peak less its runtime, weights and optimizer state: "
              f"{n_in} of {len(cross)} within ±10 %, ratios {min(c['ratio'] for c in cross):.2f}–"
              f"{max(c['ratio'] for c in cross):.2f}.", "",
              "| objective | ckpt | T | predicted extra (MiB) | measured extra (MiB) | ratio |", "|---|---|---:|---:|---:|---:|"]
        for c in cross:
            L.append(f"| {c['objective']} | {'on' if c['grad_ckpt'] else 'off'} | {c['T']} | {c['pred_extra_mib']:.0f} | "
                     f"{c['meas_extra_mib']:.0f} | {c['ratio']:.2f} |")
        L.append("")
    rts = [r["runtime_mib"] for r in rows if "runtime_mib" in r]
    if rts:
        L.append(f"Runtime (RSS after imports) measured {min(rts):.0f}–{max(rts):.0f} MiB; the planner's CPU runtime "
                 "term is a constant (lsa_kernels.train.plan.RUNTIME) that also covers the libraries' first-step "
                 "initialisation.")
    return "\n".join(L) + "\n"


LC_OUT = os.path.join(ROOT, "benchmarks", "results", "long_context")
LC_ROWS = [  # label, objective, views, grad_ckpt, tiled MLP, tiled norms
    ("transformers' loss", "hf", "joint", False, None, None),
    ("transformers' loss, ckpt", "hf", "joint", True, None, None),
    ("fused CE", "ce", "joint", False, None, None),
    ("fused CE, ckpt", "ce", "joint", True, None, None),
    ("long-short joint", "long-short", "joint", False, None, None),
    ("long-short joint, ckpt", "long-short", "joint", True, None, None),
    ("long-short sequential", "long-short", "sequential", False, None, None),
    ("long-short sequential, ckpt", "long-short", "sequential", True, None, None),
    ("fused CE, ckpt, tiled MLP", "ce", "joint", True, 0, None),
    ("long-short joint, ckpt, tiled MLP", "long-short", "joint", True, 0, None),
    ("long-short sequential, ckpt, tiled MLP", "long-short", "sequential", True, 0, None),
    ("fused CE, ckpt, tiled MLP + norms", "ce", "joint", True, 0, 0),
    ("long-short joint, ckpt, tiled MLP + norms", "long-short", "joint", True, 0, 0),
    ("long-short sequential, ckpt, tiled MLP + norms", "long-short", "sequential", True, 0, 0),
]
TS_OBJ = {"hf": "hf", "ce": "fused_ce", "long-short": "long_short"}
PUBLISHED = [
    ("Unsloth: Llama-3.1-8B QLoRA (4-bit base), offloaded gradient checkpointing + chunked CE, 80 GB", 342_000,
     "transformers + FlashAttention-2: 28K", "unsloth.ai blog, 'Unsloth Gradient Checkpointing' / long-context "
     "announcements (figures as quoted in this project's issue)"),
    ("Arctic Long Sequence Training (Snowflake 2025): Llama-8B, one H100 80 GB, tiled loss + TiledMLP + activation "
     "offload", 500_000, "baseline: 32K", "ALST paper / Snowflake engineering blog (as quoted in this project's issue)"),
]


def _measured_train_step():
    """benchmarks/results/train_step/train_step.csv: per (objective, ckpt) the longest T measured to fit 8 GiB total
    peak, the shortest measured not to fit, and whether the longest was bounded."""
    import csv

    path = os.path.join(ROOT, "benchmarks", "results", "train_step", "train_step.csv")
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["objective"], r["grad_ckpt"] == "True")
            d = out.setdefault(key, {"fits": 0, "fails": None})
            T = int(r["T"])
            ok = r["status"] == "ok" and float(r["peak_total_mib"]) <= 8192
            if ok:
                d["fits"] = max(d["fits"], T)
            elif r["status"] in ("ok", "oom") and "not run" not in (r.get("reason") or ""):
                d["fails"] = T if d["fails"] is None else min(d["fails"], T)
    return out


def _validation_rows() -> dict:
    path = os.path.join(OUT, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["name"]: r for r in json.load(f)["rows"] if "error" not in r}


def _body_points() -> list:
    """One line per measured long-T point of the benchmark body (plan_validation/results.json)."""
    out = []
    for name, r in _validation_rows().items():
        if CONFIGS.get(name) and CONFIGS[name].shape == BODY and "pred_peak_step_mib" in r:
            meas = r["peak_mib"] - r["runtime_mib"]
            out.append(f"{describe(name).split(', ', 2)[2]}, T = {r['T']:,}: {r['pred_peak_step_mib']:,.0f} / "
                       f"{meas:,.0f} MiB ({r['pred_peak_step_mib'] / meas:.2f})")
    return out


def _seq_vs_ce() -> str:
    rows = _validation_rows()
    seq, ce = rows.get("tiny-ls-seq-16k"), rows.get("tiny-ce-16k")
    if not seq or not ce:
        return "(not measured)"
    a, b = seq["peak_mib"] - seq["runtime_mib"], ce["peak_mib"] - ce["runtime_mib"]
    return (f"a step peak of {a:,.0f} MiB against {b:,.0f} MiB for the one-view fused CE step: {a / b:.3f}x "
            f"({seq['peak_mib'] / ce['peak_mib']:.3f}x counting the whole process)")


def _measured_ratio() -> Optional[dict]:
    """The largest measured T_seq / T_joint on the benchmark body where the sequential + checkpointing + tiled MLP
    and norms step at T_seq peaked (whole process) no higher than the joint + checkpointing step at T_joint: the
    budget the joint step needs at T_joint then holds the sequential step at T_seq."""
    rows = _validation_rows()
    joint = [r for n, r in rows.items() if n in CONFIGS and CONFIGS[n].shape == BODY and CONFIGS[n].views == "joint"
             and CONFIGS[n].ckpt and CONFIGS[n].tiled is None]
    seq = [r for n, r in rows.items() if n in CONFIGS and CONFIGS[n].shape == BODY and CONFIGS[n].views == "sequential"
           and CONFIGS[n].ckpt and CONFIGS[n].tiled is not None and CONFIGS[n].norms is not None]
    pairs = [(s["T"] / j["T"], j, s) for j in joint for s in seq if s["T"] >= j["T"] and s["peak_mib"] <= j["peak_mib"]]
    if not pairs:
        return None
    ratio, j, s = max(pairs, key=lambda p: (p[0], -p[2]["peak_mib"]))
    return {"ratio": ratio, "joint_T": j["T"], "joint_peak_mib": j["peak_mib"], "seq_T": s["T"],
            "seq_peak_mib": s["peak_mib"]}


def long_context() -> int:
    from lsa_kernels.train.plan import GIB, Setup, load_shape, longest, plan

    os.makedirs(LC_OUT, exist_ok=True)
    meas = _measured_train_step()
    tiny, l8b = load_shape("train-step"), load_shape("llama3-8b")
    rows_cpu, rows_gpu = [], []
    for label, obj, views, ckpt, tiled, norms in LC_ROWS:
        st = Setup(dtype="fp32", objective=obj, views=views, grad_ckpt=ckpt, tiled_mlp=tiled, tiled_norms=norms,
                   device="cpu")
        best = longest(tiny, st, 8 * GIB)
        m = meas.get((TS_OBJ[obj], ckpt)) if views == "joint" and tiled is None else None
        if m and m["fails"] is not None and m["fits"]:
            mtxt, how = f"{m['fits']:,} (next measured {m['fails']:,} does not fit)", "measured"
        elif m and m["fits"]:
            mtxt, how = f">= {m['fits']:,} (longest measured; no failing length measured)", "planned"
        else:
            mtxt, how = "not measured", "planned"
        rows_cpu.append({"row": label, "objective": obj, "views": views, "grad_ckpt": ckpt, "tiled_mlp": tiled is not None,
                         "tiled_norms": norms is not None,
                         "planned_T": best, "measured": mtxt, "label": how,
                         "planned_peak_mib_at_planned_T": plan(tiny, st, best).peak / MIB})
        gpu = {}
        for off in (False, True):
            if off and not ckpt:
                pass
            stg = Setup(dtype="bf16", lora=32, objective=obj, views=views, grad_ckpt=ckpt, tiled_mlp=tiled,
                        tiled_norms=norms, offload=off, device="cuda")
            bt = longest(l8b, stg, 80 * GIB)
            gpu["offload" if off else "no_offload"] = {"T": bt, "host_gib": plan(l8b, stg, max(bt, 1)).host / GIB}
        rows_gpu.append({"row": label, **gpu})
    res = {"command": "python scripts/validate_plan.py --long-context",
           "train_step_model_8GiB_cpu": rows_cpu, "llama3_8b_lora32_bf16_80GiB_cuda": rows_gpu,
           "body_measured_ratio": _measured_ratio(),
           "published_not_measured_here": [{"what": w, "T": t, "baseline": b, "source": src} for w, t, b, src in PUBLISHED]}
    with open(os.path.join(LC_OUT, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    L = ["# The longest context a memory budget allows", "",
         "T = tokens per view (the long-short step runs two views of T tokens each, on windows of T + T/4 + 1 "
         "tokens). `planned` = `lsa plan` (lsa_kernels/train/plan.py, validated against measured CPU peaks in "
         "[plan_validation](../plan_validation/table.md)); `measured` = benchmarks/results/train_step (one fresh "
         "process per length, VmHWM of a full step with AdamW, bisected between grid lengths for transformers' loss). "
         "Regenerate: `python scripts/validate_plan.py --long-context`.", "",
         "## The train-step benchmark model in 8 GiB (CPU)", "",
         "Llama, V = 128256, H = 256, 2 layers, intermediate 704, untied head, fp32, full fine-tuning, AdamW, batch 1; "
         "8 GiB = the process's whole peak (interpreter and libraries included, as the benchmark counts it).", "",
         "| step | longest T (planned) | measured | label |", "|---|---:|---|---|"]
    for r in rows_cpu:
        L.append(f"| {r['row']} | {r['planned_T']:,} | {r['measured']} | {r['label']} |")
    by = {r["row"]: r["planned_T"] for r in rows_cpu}
    best_seq, joint = by["long-short sequential, ckpt, tiled MLP + norms"], by["long-short joint, ckpt"]
    L += ["", f"Long-short sequential + checkpointing + tiled MLP and norms against joint + checkpointing: "
          f"{best_seq / joint:.2f}x the longest T (planned: {best_seq:,} / {joint:,})."]
    L += ["", "Rows labelled `planned` were not run to their limit: on this shared 2-core machine one step at 32K tokens "
          "already takes 4-7 minutes, and the planned limits are 3-10x longer (attention's cost grows as T^2: one "
          "step at 400K tokens would take hours here). The measured lower bounds are all consistent with the plan. "
          "Where the planner's long-T terms were measured, on the same body with an 8192-token vocabulary (the "
          "vocabulary only moves fixed terms: the head, the embedding, the loss's chunk), "
          "predicted / measured step peak:", ""]
    for r in _body_points():
        L.append(f"- {r}")
    mr = _measured_ratio()
    if mr:
        L += ["", f"Measured on that body: the long-short sequential + checkpointing + tiled MLP and norms step at "
              f"T = {mr['seq_T']:,} peaked at {mr['seq_peak_mib']:,.0f} MiB (whole process), no more than the joint + "
              f"checkpointing step at T = {mr['joint_T']:,} ({mr['joint_peak_mib']:,.0f} MiB): in the memory the "
              f"joint step needs for {mr['joint_T']:,} tokens per view, the sequential step ran {mr['ratio']:.1f}x as "
              f"many."]
    L += ["", "The long-short sequential step at T = 16384 on this model measured "
          + _seq_vs_ce() + ".", "",
          "## Llama-3-8B, LoRA r = 32 (q/k/v/o), bf16 weights, 80 GiB GPU (planned, not measured)", "",
          "`lsa plan --model llama3-8b --budget 80GiB --lora 32 --dtype bf16 [...]` (device cuda: the CUDA context "
          "and allocator slack are an assumed 1 GiB; loss buffers of the Triton backend: dL/dH in fp32). With "
          "`--offload-activations` the saved activations live in pinned host memory (host column).", "",
          "| step | longest T | with --offload-activations | host memory then (GiB) |", "|---|---:|---:|---:|"]
    for r in rows_gpu:
        L.append(f"| {r['row']} | {r['no_offload']['T']:,} | {r['offload']['T']:,} | {r['offload']['host_gib']:.0f} |")
    L += ["", "Offload without checkpointing moves every saved activation to the host: the host column then asks for "
          "more than a GPU node's RAM (over 1 TB), so those rows show the device side only; with checkpointing only "
          "the layers' inputs move (about 50-90 GiB of pinned host memory). The runtime term and the loss buffers "
          "on CUDA were not measured here (no GPU run): these rows apply the CPU-validated activation counts.",
          "", "## Published figures (published, not measured here)", "",
          "| system | longest context | baseline | source |", "|---|---:|---|---|"]
    for w, t, b, src in PUBLISHED:
        L.append(f"| {w} | {t:,} | {b} | {src} |")
    L += ["", "Unsloth's figure is for a 4-bit (QLoRA) base (~5.5 GB of weights against 16 GB in bf16 here) and "
          "none of these systems trains the two-view long-short objective.", ""]
    with open(os.path.join(LC_OUT, "table.md"), "w") as f:
        f.write("\n".join(L))
    print("\n".join(L))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None)
    ap.add_argument("--child", default="")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--long-context", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    if a.long_context:
        return long_context()
    if a.child:
        print("@@" + json.dumps(child(a.child)), flush=True)
        return 0
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "results.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = {r["name"]: r for r in json.load(f)["rows"]}
    if not a.report_only:
        for name in a.only or list(CONFIGS):
            try:
                p = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                                   cwd=ROOT, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                r = {"name": name, "error": f"timed out after {a.timeout:.0f} s"}
            else:
                lines = [ln[2:] for ln in p.stdout.splitlines() if ln.startswith("@@")]
                r = json.loads(lines[0]) if lines else {"name": name,
                                                        "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
            old[name] = r
            print(json.dumps(r), flush=True)
            with open(path, "w") as f:  # after every configuration, so an interrupted run keeps what it measured
                json.dump({"command": "python scripts/validate_plan.py", "rows": list(old.values())}, f, indent=1)
    rows = []
    for name in CONFIGS:
        if name in old:
            r = dict(old[name])
            if "error" not in r:
                r.update(predict(name, r["runtime_mib"]))
            rows.append(r)
    with open(path, "w") as f:
        json.dump({"command": "python scripts/validate_plan.py", "rows": rows,
                   "train_step_crosscheck": train_step_crosscheck()}, f, indent=1)
    md = write_report(rows)
    with open(os.path.join(OUT, "table.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
