"""`lsa plan`: the peak memory of one training step and the longest context that fits a budget, from a model
config alone (no weights loaded): arithmetic over the tensors the step holds, phase by phase.

    lsa plan --model llama3-8b --budget 80GiB --lora 32 --dtype bf16 --grad-checkpointing --tiled-mlp \\
             --tiled-norms --views sequential --objective long-short --offload-activations
    lsa plan --model path/to/hf_dir_or_config.json --budget 24GiB --tokens 8192 --json

What is counted (a Llama-style decoder: RMSNorm, RoPE, grouped-query SDPA attention, gated MLP; batch ``B``,
``T`` tokens per view, ``N = B*T`` rows; ``a`` = bytes of the weight/activation dtype):

* resident: the weights (``--lora``: the frozen base plus fp32 adapters on q/k/v/o, as peft keeps them) and
  AdamW's two moments of every trainable parameter (in its dtype);
* saved activations per token per layer: what autograd keeps (counted tensor by tensor on transformers' Llama
  layer: the residual each RMSNorm saves, upcast to fp32; its normalised output; q and k after RoPE, v, the
  attention output and its fp32 logsumexp — the memory-efficient SDPA path, linear in T; the MLP's gate, up,
  SiLU and product rows. A frozen weight saves no input; peft's fp32 adapters save an fp32 copy of their input
  per module under bf16). With ``--grad-checkpointing`` one ``[N, H]`` input per layer plus, in the backward,
  one layer recomputed (its first norm's saved input is that checkpointed input, not a copy); ``--tiled-mlp``
  keeps no MLP rows (one tile of ``[rows, I]`` at a time), only the tiles' input, with the norm that feeds the
  MLP run inside the tiles (neither its output nor its rows kept);
  ``--tiled-norms``: each norm keeps only its input (in the weights' dtype), no fp32 upcast or normalised rows,
  and the linear layers it feeds (q/k/v, gate/up; fp32 LoRA adapters) keep that input, not the norm's output;
* the loss: the fused losses keep ``dL/dH`` in fp32 ``[rows, H]`` and, when the head trains, ``dL/dW`` in fp32
  ``[V, H]``, from their forward until their own backward has run (not through the model's backward); the
  sequential views' recomputed final hidden states give their storage back (nothing saves them), and each
  view's ``dL/dH`` is freed once the final norm's backward has used it; on the CPU backend a 64 MiB logits chunk and, under bf16, an fp32 copy of ``W`` while the loss
  runs. transformers' loss (``--objective hf``) holds ``[rows, V]`` fp32 logits: three at once in its backward;
* transients: one layer's backward (three ``[rows, I]`` MLP gradients), the no-grad forward of the sequential
  views, the gradients and AdamW's update temporaries (two of the largest parameter);
* ``--device cpu``: glibc serves blocks under its 32 MiB mmap threshold from the heap, reuses the holes freed
  tensors leave but does not give them back, so every temporary the forward allocates under 32 MiB (the
  norms' squares, RoPE's rotations, ... — listed in ``_layer_allocs``) stays resident through the step, while
  larger tensors are mmapped and given back when freed (only those count as transients).

The peak is the largest of the step's phases (loss forward, start of the backward, end of the backward,
optimizer step); ``--offload-activations`` (CUDA) moves the saved activations to host memory, reported
apart. ``runtime`` is a fixed term: the process itself (CPU: the interpreter with torch, transformers and this
package loaded, measured on the validation machine) or the CUDA context and allocator slack (assumed).
Validated against measured peaks by scripts/validate_plan.py (benchmarks/results/plan_validation/).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

MIB = 2**20
GIB = 2**30
#: bytes the process needs besides the step's tensors. CPU: RSS of a fresh process once torch, transformers and
#: lsa_kernels are imported and one tiny step ran (scripts/validate_plan.py measures it as ``runtime_mib``);
#: CUDA: the context, cuBLAS workspaces and caching-allocator slack (an assumption, not measured here).
RUNTIME = {"cpu": 435 * MIB, "cuda": 1 * GIB}
CPU_MMAP_MAX = 32 * MIB  # glibc's largest mmap threshold (64-bit): smaller blocks come from the heap
CPU_LOSS_CHUNK = 64 * MIB  # lsa_kernels.backends.cpu.loop.DEFAULT_BUDGET: the fused loss's [rows, V] chunk buffers
DTYPES = {"bf16": 2, "fp32": 4}
OBJECTIVES = ("hf", "ce", "long-short")
VIEWS = ("joint", "sequential")

# published Llama-3-8B config (meta-llama/Meta-Llama-3-8B config.json)
NAMED = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # benchmarks/train_step.py's model (FULL_MODEL): the longest-context table's CPU model
    "train-step": dict(vocab_size=128256, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


class PlanError(ValueError):
    """Bad input to the planner (one line)."""


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's sizes."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False
    name: str = ""

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def qd(self) -> int:
        return self.heads * self.head_dim

    def layer_params(self) -> int:
        H, I = self.hidden, self.intermediate
        attn = H * self.qd + 2 * H * self.kvd + self.qd * H
        if self.attn_bias:
            attn += self.qd + 2 * self.kvd
        mlp = 3 * H * I + (2 * I + H if self.mlp_bias else 0)
        return attn + mlp + 2 * H

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int) -> int:
        """peft LoRA rank ``r`` on q_proj, k_proj, v_proj, o_proj (lsa train's default targets)."""
        H = self.hidden
        return self.layers * r * ((H + self.qd) + 2 * (H + self.kvd) + (self.qd + H))


def shape_from_dict(d: dict, name: str = "", layers: Optional[int] = None) -> Shape:
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if not d.get(k)]
    if missing:
        raise PlanError(f"--model {name}: not a Llama-style decoder config (missing {', '.join(missing)}); "
                        "the planner knows RMSNorm + RoPE attention + gated-MLP decoders (Llama, Mistral, Qwen2)")
    if d.get("num_local_experts") or d.get("num_experts"):
        raise PlanError(f"--model {name}: a mixture-of-experts config; the planner knows dense gated-MLP decoders")
    H, nh = int(d["hidden_size"]), int(d["num_attention_heads"])
    L = int(d["num_hidden_layers"])
    if layers is not None:
        L = layers
    return Shape(vocab=int(d["vocab_size"]), hidden=H, intermediate=int(d["intermediate_size"]), layers=L,
                 heads=nh, kv_heads=int(d.get("num_key_value_heads") or nh),
                 head_dim=int(d.get("head_dim") or H // nh), tied=bool(d.get("tie_word_embeddings", False)),
                 attn_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                 name=name)


def load_shape(model: str, layers: Optional[int] = None) -> Shape:
    """A named shape (``llama3-8b``, ``train-step``), a config.json file, or a transformers model directory."""
    if model in NAMED:
        return shape_from_dict(NAMED[model], model, layers)
    if os.path.isdir(model):
        try:
            from transformers import AutoConfig

            d = AutoConfig.from_pretrained(model).to_dict()
        except Exception as e:  # noqa: BLE001 - any failure to read the directory is the user's input
            raise PlanError(f"--model {model}: cannot read a transformers config there "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return shape_from_dict(d.get("text_config") or d, model, layers)
    if os.path.isfile(model):
        try:
            with open(model) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise PlanError(f"--model {model}: not a JSON config ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise PlanError(f"--model {model}: not a JSON object")
        return shape_from_dict(d.get("text_config") or d, model, layers)
    raise PlanError(f"--model {model!r}: no such file or directory, and not a named shape "
                    f"({', '.join(NAMED)})")


_UNITS = {"": None, "b": 1, "kib": 2**10, "mib": MIB, "gib": GIB, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(s: str) -> int:
    """``80GiB``, ``8192MiB``, ``80GB`` (10^9), ``1.5TiB`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    unit = m and _UNITS.get(m.group(2).lower(), 0)
    if not m or not unit:
        raise PlanError(f"--budget {s!r}: expected a size with a unit, e.g. 80GiB, 8192MiB or 80GB")
    v = float(m.group(1)) * unit
    if v <= 0:
        raise PlanError(f"--budget {s!r}: must be > 0")
    return int(v)


@dataclass(frozen=True)
class Setup:
    """How the step runs (the flags of ``lsa plan``)."""

    dtype: str = "fp32"
    lora: int = 0
    grad_ckpt: bool = False
    tiled_mlp: Optional[int] = None  # None: off; 0: one tile per hidden-size tokens; n: n tiles
    tiled_norms: Optional[int] = None  # the same for the norms
    views: str = "joint"
    objective: str = "long-short"
    offload: bool = False
    batch: int = 1
    device: str = "cuda"
    runtime: Optional[int] = None  # bytes; None: RUNTIME[device]

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise PlanError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.objective not in OBJECTIVES:
            raise PlanError(f"--objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.views not in VIEWS:
            raise PlanError(f"--views {self.views!r}: expected one of {', '.join(VIEWS)}")
        if self.views == "sequential" and self.objective != "long-short":
            raise PlanError("--views sequential: only with --objective long-short (the other objectives run one view)")
        if self.device not in RUNTIME:
            raise PlanError(f"--device {self.device!r}: expected one of {', '.join(RUNTIME)}")
        if self.offload and self.device != "cuda":
            raise PlanError("--offload-activations: CUDA only (host memory is the device's memory on the CPU)")
        if self.lora < 0 or self.batch < 1 or any(t is not None and t < 0 for t in (self.tiled_mlp, self.tiled_norms)):
            raise PlanError("--lora must be >= 0, --batch >= 1, --tiled-mlp / --tiled-norms TILES >= 1")


@dataclass
class Plan:
    T: int
    peak: int
    phase: str
    terms: Dict[str, int] = field(default_factory=dict)  # named bytes
    phases: Dict[str, int] = field(default_factory=dict)
    per_token_layer: Dict[str, float] = field(default_factory=dict)  # bytes per token per layer
    host: int = 0  # offloaded activations (host memory)


def _layer_saved(s: Shape, st: Setup) -> Dict[str, float]:
    """Bytes autograd saves per token in one decoder layer (no checkpointing), by part."""
    a, H, I = DTYPES[st.dtype], s.hidden, s.intermediate
    norm_in = 4 * H + 4  # RMSNorm saves its input upcast to fp32 (the fp32 residual itself) and rsqrt
    attn = a * s.qd + 2 * a * s.kvd + a * s.qd + 4 * s.heads  # q, k after RoPE, v, output; fp32 logsumexp
    if not st.lora:  # full fine-tuning: the norms' scaled rows (weight grad) and outputs (linears' weight grads)
        norms = 2 * (norm_in + 2 * a * H)
        mlp = 4 * a * I  # gate, up, silu(gate), silu * up
        lora = 0.0
    else:  # frozen base: no input saved for a frozen weight; fp32 adapters save their (fp32) input and A x
        norms = 2 * norm_in
        lora = (4 * H if a == 4 else 3 * 4 * H) + (0 if a == 4 else 4 * s.qd) + 4 * 4 * st.lora
        mlp = 3 * a * I  # gate, up, silu(gate); the product feeds a frozen down_proj
    if st.tiled_norms is not None:  # each norm keeps its input (weights' dtype); the linears it feeds keep that input
        norms = 2 * a * H  # too and recompute its output for their weight gradients; fp32 adapters alike
        lora = 4 * 4 * st.lora if st.lora and a == 4 else lora
    if st.tiled_mlp is not None:  # the norm that feeds the MLP runs inside its tiles, which keep only their input
        norms, mlp = norms / 2, a * H  # (the residual stream): neither the norm's saved rows nor its output
    return {"norms": norms, "attention": attn, "lora": lora, "mlp": mlp}


def _layer_allocs(s: Shape, st: Setup) -> Dict[str, List[int]]:
    """Bytes per row of every tensor one decoder layer's forward allocates (saved or temporary), by part: the
    RMSNorms (fp32 upcast, square, rsqrt, scaled rows, bf16 downcast, weight product), q/k/v, RoPE (two products,
    the rotated half's negation and concatenation, the sum, for q and k), attention output, o_proj, the peft
    adapters (fp32 input cast, A x, B A x, its scaling, the sum and its downcast), the MLP and the residuals."""
    a, H, I, r = DTYPES[st.dtype], s.hidden, s.intermediate, st.lora
    up = a == 2
    norm = ([4 * H] if up else []) + [4 * H, 4 * H] + ([2 * H] if up else []) + [a * H, 12]
    attn = [a * s.qd, a * s.kvd, a * s.kvd] + [a * s.qd] * 4 + [a * s.qd // 2] + [a * s.kvd] * 4 + [a * s.kvd // 2]
    attn += [a * s.qd, 4 * s.heads, a * H, a * H]  # attention output, logsumexp, o_proj, residual
    lora = []
    for d_in, d_out in ((H, s.qd), (H, s.kvd), (H, s.kvd), (s.qd, H)) if r else ():
        lora += ([4 * d_in] if up else []) + [4 * r, 4 * d_out, 4 * d_out, 4 * d_out] + ([2 * d_out] if up else [])
    mlp = [a * I] * 4 + [a * H, a * H]  # gate, up, silu, product; down_proj, residual
    return {"norms": norm * 2, "attention": attn, "lora": lora, "mlp": mlp}


def _heap(sizes: List[int], rows: int) -> int:
    """Bytes of those tensors that glibc serves from its heap (under its 32 MiB mmap threshold)."""
    return sum(rows * b for b in sizes if rows * b < CPU_MMAP_MAX)


def _big(total_per_row: float, width_bytes: int, rows: int) -> float:
    """Rows * bytes of tensors of ``width_bytes`` per row that are mmapped (given back to the system when freed)."""
    return rows * total_per_row if rows * width_bytes >= CPU_MMAP_MAX else 0.0


def _tile_rows(s: Shape, st: Setup, rows: int, T: int, tiles: Optional[int] = -1) -> int:
    """Rows of one tile (T/n tokens of every sequence) of the MLP (or of ``tiles`` given: the norms), or all rows
    without tiling. With one tile per H tokens (``--tiled-mlp`` alone) a tile has ``ceil(T / ceil(T / H)) <= H``
    tokens: the bound H is used, so the plan grows monotonically with T."""
    tiles = st.tiled_mlp if tiles == -1 else tiles
    if tiles is None:
        return rows
    tokens = min(T, s.hidden) if tiles == 0 else math.ceil(T / min(tiles, T))
    return (rows // T) * tokens


def plan(s: Shape, st: Setup, T: int) -> Plan:
    """The step's memory at ``T`` tokens per view (bytes)."""
    st.check()
    a, H, I, V, L = DTYPES[st.dtype], s.hidden, s.intermediate, s.vocab, s.layers
    cpu = st.device == "cpu"
    two = st.objective == "long-short"
    N = st.batch * T
    M = 2 * N if (two and st.views == "joint") else N  # rows through the decoder at once
    R = 2 * N if two else N  # rows of the loss
    lora = st.lora
    # --- resident: weights (bf16/fp32 base, fp32 adapters), AdamW moments; the step's gradients
    base_p = s.params()
    head_trains = not lora
    train_p = s.lora_params(lora) if lora else base_p
    tb = 4 if lora else a  # peft keeps the adapters in fp32
    weights = base_p * a + (train_p * 4 if lora else 0)
    optim = 2 * train_p * tb
    grads = train_p * tb
    largest = max(V * H, H * I) if not lora else H * max(lora, 1)
    opt_tmp = 2 * largest * tb  # single-tensor AdamW: sqrt(v) and its scaled copy
    runtime = RUNTIME[st.device] if st.runtime is None else st.runtime
    # --- activations autograd saves
    per = _layer_saved(s, st)
    layer = sum(per.values())
    rope = 2 * s.head_dim * a  # cos, sin per token (shared by the layers and the views)
    final = 4 * H + 4 + (a * H if head_trains else 0)  # the final norm's saved input (+ scaled rows)
    if st.tiled_norms is not None:
        final = a * H  # its input only
    first_norm = 0 if not lora else (a * H if st.tiled_norms is not None else 4 * H + 4)  # a frozen embedding:
    # layer 0's first norm saves nothing
    saved_tok = L * a * H + final if st.grad_ckpt else L * layer - first_norm + final
    saved = M * saved_tok + T * rope + M * 8
    hid = a * H  # the final hidden states, per row
    tile = _tile_rows(s, st, M, T)
    mlp_bwd = (3 if lora else 2) * a * I * tile + (4 * a * I * tile if st.tiled_mlp is not None else 0)
    tiled_dx = M * a * H if st.tiled_mlp is not None else 0  # the tiled backward's preallocated input gradient
    attn_bwd = M * (s.qd + 2 * s.kvd) * 4
    if cpu:  # the CPU flash kernel's backward buffers: two [rows, q heads x head dim] fp32 (measured, GQA and MHA)
        attn_bwd += M * 2 * s.qd * 4
    # under checkpointing the recomputed layer's first norm saves the checkpointed input itself (its fp32 upcast is
    # the tensor itself in fp32; tiled, it keeps its input), which is counted as the checkpointed input already
    alias = a * H if st.tiled_norms is not None else (4 * H if a == 4 else 0)
    layer_bwd = max(mlp_bwd + tiled_dx, attn_bwd) + (M * (layer - alias) if st.grad_ckpt else 0)
    layer_grads = 0 if lora else s.layer_params() * a
    host = 0
    if st.offload:  # saved tensors wait in host memory; the device holds the layer being run or recomputed
        host = saved - M * final
        saved = M * final + T * rope + M * 8 + M * (a * H if st.grad_ckpt else layer)
    retained = 0
    if cpu:
        # glibc: tensors under 32 MiB come from the heap, whose freed holes are reused but not given back, so the
        # forward's temporaries stay resident through the step; mmapped (larger) tensors are given back when freed
        alloc = _layer_allocs(s, st)
        nonmlp = sum(_heap(v, M) for k, v in alloc.items() if k not in ("mlp", "norms"))
        fused = st.tiled_mlp is not None  # the pre-MLP norm allocates per MLP tile
        half = len(alloc["norms"]) // 2
        nonmlp += _heap(alloc["norms"][half:] if fused else alloc["norms"], _tile_rows(s, st, M, T, st.tiled_norms))
        mlp = _heap(alloc["mlp"] + (alloc["norms"][:half] if fused else []), tile)
        reps = 1 if st.grad_ckpt else L  # with checkpointing each layer's temporaries reuse the previous holes
        retained = reps * nonmlp + (1 if st.tiled_mlp is not None else reps) * mlp
        retained += (L * M * a * H if st.grad_ckpt and M * a * H < CPU_MMAP_MAX else 0)
        retained += _heap([4 * H, 4 * H, 4 * H, a * H, 8], M)  # embedding output, final norm
        # saved tensors that are mmapped are live on top of the heap until the backward frees them
        big_saved = (L if not st.grad_ckpt else 0) * (_big(per["mlp"], a * I, M) + _big(
            per["norms"] + per["attention"] + per["lora"], 4 * H, M)) + _big(L * a * H if st.grad_ckpt else 0, a * H, M)
        saved = big_saved + T * rope
        # backward transients under 32 MiB reuse the forward's heap holes; larger ones are new memory
        layer_bwd = max((mlp_bwd if tile * a * I >= CPU_MMAP_MAX else 0) + (tiled_dx if tiled_dx >= CPU_MMAP_MAX else 0),
                        attn_bwd if M * 4 * H >= CPU_MMAP_MAX else 0)
        if st.grad_ckpt:  # the layer recomputed for its backward
            layer_bwd += _big(per["mlp"], a * I if st.tiled_mlp is None else a * H, M) + _big(
                per["norms"] + per["attention"] + per["lora"] - alias, 4 * H, M)
        opt_tmp = opt_tmp if largest * tb >= CPU_MMAP_MAX else 0
    # --- the loss
    head_grad = V * H * a if head_trains else 0
    dW32 = V * H * 4 if head_trains else 0
    if st.objective == "hf":
        loss_fwd = R * V * (a + 4 + (4 if a == 2 else 0))  # logits, the fp32 upcast, log_softmax
        loss_keep = 0
        loss_bwd = 3 * R * V * 4  # log_softmax output, its gradient and nll's gradient
        dW32 = 0
    else:
        loss_fwd = (CPU_LOSS_CHUNK + (V * H * 4 if a == 2 else 0)) if cpu else 0
        loss_keep = R * H * 4  # dL/dH, fp32, computed in the forward
        loss_bwd = R * H * a  # its cast to the hidden states' dtype
    terms = {"runtime": runtime, "weights": weights, "optimizer state": optim, "gradients": grads,
             "saved activations": saved, "final hidden states": R * hid, "loss (forward)": loss_fwd,
             "loss (kept for backward)": loss_keep + dW32, "layer backward": layer_bwd,
             "optimizer temporaries": opt_tmp}
    if cpu:
        terms["CPU heap kept from the forward"] = retained
    resident = runtime + weights + optim + retained
    phases = {}
    if st.views == "sequential":
        # a trainable embedding runs once on both views, outside the recompute, while they hold <= 2V tokens;
        # past 2V it runs inside each view's recompute: one more [V, H] gradient (and its sum into .grad)
        inside = not lora and 2 * N > 2 * V
        emb_out = 2 * N * a * H if not lora and not inside else 0
        layer_grads += 2 * V * H * a if inside else 0
        nograd = 0 if cpu else N * (3 * a * I if st.tiled_mlp is None else 0) + 3 * a * I * _tile_rows(s, st, N, T)
        terms["no-grad forward"] = nograd
        phases["view forwards (no grad)"] = resident + emb_out + 2 * N * hid + nograd
        phases["loss"] = resident + emb_out + R * hid + loss_fwd + loss_keep + dW32
        phases["loss backward"] = resident + emb_out + R * hid + loss_keep + dW32 + loss_bwd + head_grad
        # the loss's fp32 buffers died with its backward; the recomputed view's output gives its storage back, and
        # its dL/dH is freed once the final norm's backward used it: the other view's dL/dH waits
        phases["view backward"] = resident + emb_out + loss_bwd / 2 + head_grad + saved + layer_bwd + layer_grads
    else:
        phases["loss"] = resident + saved + R * hid + loss_fwd + loss_keep + dW32
        if st.objective == "hf":
            phases["loss backward"] = resident + saved + loss_bwd
            phases["layer backward"] = resident + saved + R * V * a + R * hid + head_grad + layer_bwd + layer_grads
        else:
            phases["loss backward"] = resident + saved + R * hid + loss_keep + dW32 + loss_bwd + head_grad
            phases["layer backward"] = resident + saved + loss_bwd + head_grad + layer_bwd + layer_grads
    phases["end of backward"] = resident + grads  # the loss's fp32 buffers are freed once its backward ran
    phases["optimizer step"] = resident + grads + opt_tmp
    phase = max(phases, key=phases.get)
    per_tok = dict(per)
    per_tok["checkpointed input"] = a * H if st.grad_ckpt else 0
    return Plan(T=T, peak=int(phases[phase]), phase=phase, terms={k: int(v) for k, v in terms.items()},
                phases={k: int(v) for k, v in phases.items()}, per_token_layer=per_tok, host=int(host))


def longest(s: Shape, st: Setup, budget: int, cap: int = 1 << 31) -> int:
    """The largest T with ``plan(T).peak <= budget`` (0 if none), by doubling then bisection."""
    if plan(s, st, 1).peak > budget:
        return 0
    lo, hi = 1, 2
    while hi < cap and plan(s, st, hi).peak <= budget:
        lo, hi = hi, hi * 2
    if hi >= cap:
        return cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan(s, st, mid).peak <= budget:
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------------- command line


def build_parser():
    from .._cli_types import Parser, nonneg_int, positive_int

    p = Parser(prog="lsa plan", description=__doc__.split("\n\n")[1] if __doc__ else "")
    p.add_argument("--model", required=True, help="a named shape (" + ", ".join(NAMED) + "), a config.json file "
                   "or a transformers model directory (its config only: no weights are read)")
    p.add_argument("--budget", required=True, help="memory budget, e.g. 80GiB, 8192MiB, 80GB (10^9 bytes)")
    p.add_argument("--layers", type=positive_int, default=None, help="plan a slice of this many decoder layers")
    p.add_argument("--lora", type=nonneg_int, default=0, help="LoRA rank on q/k/v/o (0: full fine-tuning)")
    p.add_argument("--dtype", default="fp32", help="weights and activations: bf16 or fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--tiled-mlp", nargs="?", type=positive_int, const=0, default=None, metavar="TILES",
                   help="sequence-tiled MLP (alone: one tile per hidden-size tokens)")
    p.add_argument("--tiled-norms", nargs="?", type=positive_int, const=0, default=None, metavar="TILES",
                   help="sequence-tiled norms: each keeps only its input (alone: one tile per hidden-size tokens)")
    p.add_argument("--views", default="joint", help="joint or sequential (long-short objective)")
    p.add_argument("--objective", default="long-short", help="hf (transformers' loss), ce (fused CE) or long-short")
    p.add_argument("--offload-activations", action="store_true", help="saved activations in host memory (CUDA)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (the CPU loss backend's buffers, the runtime term)")
    p.add_argument("--tokens", type=positive_int, default=None, help="tokens per view T: print the step at this T")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per step")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _mib(b: float) -> str:
    return f"{b / MIB:,.0f} MiB" if abs(b) < 10 * GIB else f"{b / GIB:,.2f} GiB"


def _table(s: Shape, st: Setup, budget: int, p: Plan, best: int, asked: bool) -> str:
    out = [f"model: {s.name}: V={s.vocab} H={s.hidden} I={s.intermediate} layers={s.layers} heads={s.heads}/"
           f"{s.kv_heads} (head dim {s.head_dim}), {'tied' if s.tied else 'untied'} head, "
           f"{s.params() / 1e9:.3f} B parameters",
           f"step: {st.objective}" + (f" ({st.views} views)" if st.objective == "long-short" else "")
           + f", {st.dtype}, " + (f"LoRA r={st.lora}" if st.lora else "full fine-tuning") + ", AdamW"
           + (", checkpointing" if st.grad_ckpt else "")
           + (f", tiled MLP ({st.tiled_mlp or 'auto'})" if st.tiled_mlp is not None else "")
           + (f", tiled norms ({st.tiled_norms or 'auto'})" if st.tiled_norms is not None else "")
           + (", activations offloaded" if st.offload else "") + f", batch {st.batch}, device {st.device}",
           "", f"at T = {p.T} tokens per view{'' if asked else ' (the longest that fits)'}:",
           f"  {'term':<28}{'memory':>14}"]
    out += [f"  {k:<28}{_mib(v):>14}" for k, v in p.terms.items()]
    out += ["  saved per token per layer: " + ", ".join(f"{k} {v:,.0f} B" for k, v in p.per_token_layer.items() if v)]
    out += ["", "  phases (everything live at that point):"]
    out += [f"  {k:<28}{_mib(v):>14}" + ("  <- peak" if k == p.phase else "") for k, v in p.phases.items()]
    if p.host:
        out.append(f"  host memory for the offloaded activations: {_mib(p.host)}")
    out += ["", f"predicted peak at T = {p.T}: {_mib(p.peak)} ({'fits' if p.peak <= budget else 'does NOT fit'} "
            f"in {_mib(budget)})", f"longest T that fits {_mib(budget)}: {best:,} tokens per view"]
    return "\n".join(out)


def plan_main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        budget = parse_size(a.budget)
        s = load_shape(a.model, a.layers)
        st = Setup(dtype=a.dtype, lora=a.lora, grad_ckpt=a.grad_checkpointing, tiled_mlp=a.tiled_mlp,
                   tiled_norms=a.tiled_norms, views=a.views, objective=a.objective, offload=a.offload_activations, batch=a.batch,
                   device=a.device)
        st.check()
        p1 = plan(s, st, 1)
        fixed = p1.terms["runtime"] + p1.terms["weights"] + p1.terms["optimizer state"]
        if fixed > budget:
            raise PlanError(f"--budget {a.budget}: smaller than the weights and optimizer state alone "
                            f"({_mib(fixed)}, runtime included)")
    except PlanError as e:
        print(f"lsa plan: error: {e}", file=sys.stderr)
        return 2
    best = longest(s, st, budget)
    p = plan(s, st, a.tokens or max(best, 1))
    if a.json:
        print(json.dumps({"model": asdict(s), "setup": asdict(st), "budget": budget, "longest_T": best,
                          "T": p.T, "peak": p.peak, "fits": p.peak <= budget, "phase": p.phase, "terms": p.terms,
                          "phases": p.phases, "per_token_layer": p.per_token_layer, "host": p.host}, indent=1))
    else:
        print(_table(s, st, budget, p, best, a.tokens is not None))
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
