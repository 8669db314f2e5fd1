"""How far each int8 path drifts from fp32 on a Llama with planted outlier features (issue #20).

    python3 -m benchmarks.quality --device cuda --out docs/benchmarks/quality.json          # + --speed on a GPU
    .venv/bin/python -m benchmarks.quality --device cpu --out docs/benchmarks/quality_cpu.json
    .venv/bin/python -m benchmarks.quality --device cpu --kv-only --out /tmp/quality_kv_cpu.json    # KV cache only
    .venv/bin/python -m benchmarks.quality --device cpu --shape gpu --no-kv \
        --variants default,default_rotated,weight_only --out docs/benchmarks/quality_rotated_cpu.json

Random weights only produce near-tie noise, so the model gets what real LLMs above ~6.7B carry (Dettmers et
al., 2022): NUM_OUTLIER_CHANNELS residual channels whose input-norm weights are scaled so that their mean |x|
at the q/k/v and gate/up inputs is S, for S in STRENGTHS; "massive" adds, on S = 20, a few tokens (BOS and
MASSIVE_TOKENS) carrying |x| in the hundreds in two down_proj input channels; lm_head is scaled so the model
is confident. Each variant is teacher-forced over the same tokens and compared with the fp32 model: mean
KL(fp32 ‖ variant), top-1 agreement, and the share of greedy tokens equal to fp32's. --seeds N builds N planted
models per strength (other random weights, the same outlier channels) and reports each metric's mean.

Variants: default (batchgen's auto kernel: int_mm_outliers, calibrated as the engine does, with --int8-rotate none:
LLM.int8()'s arithmetic), default_rotated (the same with --int8-rotate down, the down projections' inputs rotated by
block Hadamard matrices: the engine's default, --int8-rotate auto, since it met #20 here), default_fp16_ends (the
same with the first and last decoder layers in fp16: --fp16-modules), bnb_t6 (bitsandbytes' Linear8bitLt, LLM.int8()
at threshold 6), bnb_t0, int_mm (batchgen at threshold 0) and weight_only.

--kv (on by default on CUDA; --kv-only skips the int8 variants): the KV cache's own drift, at S in KV_STRENGTHS. The
default int8 model runs through the engine's ModelRunner, teacher-forced: each sequence's first half prefilled,
the second half decoded one token a step on the true tokens, so every logit after the first comes from a decode
step reading the cache. KL(fp32 ‖ runner) and top-1 for the default int8 weights (rotated, KV_WEIGHTS) under each
kv_cache_dtype of model_runner.KV_TORCH_DTYPES (the runner's names): auto (the compute dtype), fp8 and fp8v (e4m3,
scales calibrated on the calibration ids as the engine does) and int8 (a scale per token and KV head); kl_vs_auto
is KL(auto runner ‖ that runner). #20's references (bnb threshold 6, weight-only) run with the auto cache, and each
default row gives its KL's ratio to theirs: whether a cache dtype keeps the default inside #20's bounds. On CUDA the
runner decodes with the Triton kernel, on CPU with masked sdpa.

--speed (CUDA): a random Llama-3-8B-shape model of SPEED_LAYERS layers through the engine's ModelRunner: the
decode step at SPEED_ROWS rows (CUDA graphs) and the prefill tok/s, default and default_rotated vs int_mm, with the
issue's bounds.
--speed-outliers F plants outlier channels in it (norm weights × F), so the default keeps columns at the q/k/v and
gate/up inputs as well, as real models make it.
"""

import argparse
import contextlib
import datetime
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.model_runner import KV_TORCH_DTYPES

NUM_OUTLIER_CHANNELS = 6
OUTLIER_CHANNELS_SEED = 7
STRENGTHS: tuple[float | str, ...] = (0, 10, 20, 40, "massive")
MASSIVE_BASE_STRENGTH = 20.0
MASSIVE_VALUE = 300.0  # |x| of the massive tokens in their two down_proj input channels
MASSIVE_TOKENS = (1, 5, 6)  # BOS and two ordinary ids, placed every MASSIVE_EVERY tokens
MASSIVE_EVERY = 32
MASSIVE_LAYER = 1
LOGIT_STD = 4.0  # lm_head scaled to this logit spread: a confident model, so int8 noise shows as flips
THRESHOLD = 6.0
# default_fp16_ends: the default with the first and last decoder layers kept in fp16 (--fp16-modules)
# default_rotated: the default with --int8-rotate down (the down projections' inputs rotated, rotation.py)
VARIANTS = ("default", "default_rotated", "default_fp16_ends", "bnb_t6", "bnb_t0", "int_mm", "weight_only")
CPU_VARIANTS = ("default", "default_rotated", "default_fp16_ends", "bnb_t6", "int_mm", "weight_only")  # bnb_t0 is int_mm's arithmetic, and bnb is slow here
KV_STRENGTHS: tuple[float, ...] = (0, 20)
KV_WEIGHTS = "default_rotated"  # the engine's default int8 weights, under each KV cache dtype
KV_REFERENCES = ("bnb_t6", "weight_only")  # #20's bounds, teacher-forced through the same runner (auto cache)
SPEED_LAYERS = 16
SPEED_ROWS = 256
SPEED_PREFILL = (16, 256)  # prompts x tokens


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    num_seqs: int  # teacher-forced sequences x seq_len tokens
    seq_len: int
    num_prompts: int  # greedy: prompts of prompt_len tokens, new_tokens each
    prompt_len: int
    new_tokens: int


GPU_SHAPE = Shape(1024, 4, 16, 4, 2816, 8192, 32, 128, 16, 16, 32)
CPU_SHAPE = Shape(256, 4, 4, 2, 704, 1024, 8, 32, 4, 8, 12)  # a few minutes on two busy cores


def build_planted(shape: Shape, strength: float | str, *, seed: int = 0, device: torch.device | None = None):
    """The fp32 reference model with its outliers planted, on device (planting runs a few forwards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval().to(device or torch.device("cpu"))
    massive = strength == "massive"
    s = MASSIVE_BASE_STRENGTH if massive else float(strength)
    gen = torch.Generator().manual_seed(OUTLIER_CHANNELS_SEED)
    channels = torch.randperm(shape.hidden, generator=gen)[:NUM_OUTLIER_CHANNELS + 1]
    planted, massive_channel = channels[:NUM_OUTLIER_CHANNELS], int(channels[-1])
    probe = eval_ids(shape, seed=1).to(model.device)
    with torch.no_grad():
        if massive:
            _plant_massive(model, probe, massive_channel, gen)
        if s > 0:
            for _ in range(3):  # the norms feed each other through the residual: converge on mean |x| = S
                means = _norm_output_means(model, probe, planted)
                for norm, mean in means.items():
                    norm.weight[planted] *= s / mean
        logits = model(input_ids=probe).logits
        model.lm_head.weight *= LOGIT_STD / logits.std()
    return model


def _norms(model) -> list[torch.nn.Module]:
    return [n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]


def _norm_output_means(model, ids: torch.Tensor, channels: torch.Tensor) -> dict:
    means, hooks = {}, []
    for norm in _norms(model):
        hooks.append(norm.register_forward_hook(
            lambda m, a, out: means.__setitem__(m, out[..., channels].abs().mean(dim=(0, 1)))))
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return means


def _plant_massive(model, ids: torch.Tensor, channel: int, gen: torch.Generator) -> None:
    """MASSIVE_TOKENS get a large residual channel; layer MASSIVE_LAYER's gate/up turn it into |x| of about
    MASSIVE_VALUE in two down_proj input channels, for those tokens only."""
    model.model.embed_tokens.weight[list(MASSIVE_TOKENS), channel] = 1.0
    mlp = model.model.layers[MASSIVE_LAYER].mlp
    cols = torch.randperm(mlp.down_proj.in_features, generator=gen)[:2]
    mlp.down_proj.weight[:, cols] *= 0.1  # a bias-like push into the residual, not a blow-up
    mask = torch.isin(ids, torch.tensor(MASSIVE_TOKENS, device=ids.device))
    weight, seen = 1.0, {}
    for _ in range(4):
        mlp.gate_proj.weight[cols, channel] = weight
        mlp.up_proj.weight[cols, channel] = weight
        hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        try:
            model(input_ids=ids)
        finally:
            hook.remove()
        value = seen["x"][..., cols][mask].abs().mean()
        weight *= (MASSIVE_VALUE / value).sqrt().item()  # silu(g) * u grows as weight²


def eval_ids(shape: Shape, *, seed: int, num_seqs: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    """Random ids starting with BOS, MASSIVE_TOKENS every MASSIVE_EVERY tokens (ordinary ids unless planted)."""
    num_seqs, seq_len = num_seqs or shape.num_seqs, seq_len or shape.seq_len
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, shape.vocab, (num_seqs, seq_len), generator=gen)
    ids[:, 0] = 1
    for i, pos in enumerate(range(MASSIVE_EVERY // 2, seq_len, MASSIVE_EVERY)):
        ids[:, pos] = MASSIVE_TOKENS[1 + i % (len(MASSIVE_TOKENS) - 1)]
    return ids


def load_variant(model_dir: Path, variant: str, device: torch.device, dtype: torch.dtype, calibration: torch.Tensor):
    from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, convert_model
    from batchgen.worker.engine.loader import skip_modules
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    default = variant in ("default", "default_rotated", "default_fp16_ends")
    threshold = THRESHOLD if default or variant == "bnb_t6" else 0.0
    fp16_modules = ()
    if variant == "default_fp16_ends":
        fp16_modules = ("model.layers.0", f"model.layers.{AutoConfig.from_pretrained(model_dir).num_hidden_layers - 1}")
    # as loader.load_model loads it (the planted model has no tokenizer to load)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map={"": device},
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold,
                                               llm_int8_skip_modules=skip_modules(str(model_dir), fp16_modules))).eval()
    if default:  # what LLMEngine.from_config does, with random ids for the calibration text
        convert_model(model, OUTLIER_KERNEL, threshold=THRESHOLD, calibration_ids=calibration.to(device),
                      rotate="down" if variant == "default_rotated" else "none")
    elif variant in ("int_mm", "weight_only"):
        convert_model(model, variant)
    return model


@torch.inference_mode()
def logits_of(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


@torch.inference_mode()
def greedy(model, prompts: torch.Tensor, new_tokens: int, device: torch.device) -> torch.Tensor:
    """new_tokens greedy tokens per prompt, decoding one token a step over HF's KV cache (as generate does)."""
    out = model(input_ids=prompts.to(device), use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1).cpu()


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref ‖ logits) over positions and the share of positions with the same argmax."""
    logp, logq = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return kl, (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()


def compare(ref_logits: torch.Tensor, logits: torch.Tensor, ref_greedy: torch.Tensor, out_greedy: torch.Tensor
            ) -> dict[str, float]:
    kl, top1 = kl_top1(ref_logits, logits)
    return {"kl": round(kl, 6), "top1": round(top1, 4), "greedy": round((ref_greedy == out_greedy).double().mean().item(), 4)}


def run_strength(shape: Shape, strength: float | str, device: torch.device, dtype: torch.dtype,
                 variants: tuple[str, ...] = VARIANTS, seed: int = 0) -> list[dict]:
    ref = build_planted(shape, strength, seed=seed, device=device)
    ids = eval_ids(shape, seed=2)
    prompts = eval_ids(shape, seed=3, num_seqs=shape.num_prompts, seq_len=shape.prompt_len)
    calibration = eval_ids(shape, seed=4, num_seqs=4, seq_len=shape.seq_len)
    ref_logits, ref_greedy = logits_of(ref, ids, device), greedy(ref, prompts, shape.new_tokens, device)
    confidence = ref_logits.softmax(-1).amax(-1).mean().item()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        del ref
        for variant in variants:
            model = load_variant(Path(tmp), variant, device, dtype, calibration)
            row = {"strength": strength, "variant": variant, "seed": seed,
                   **compare(ref_logits, logits_of(model, ids, device), ref_greedy,
                             greedy(model, prompts, shape.new_tokens, device)),
                   "fp32_mean_max_prob": round(confidence, 3)}
            if variant.startswith("default"):
                row["outlier_columns"] = _num_outlier_columns(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def teacher_forced(runner, ids: torch.Tensor) -> torch.Tensor:
    """ids [num_seqs, seq_len] through a ModelRunner: the first half of each row prefilled, then one decode step
    per later token, fed the true token. Logits [num_seqs, seq_len - seq_len // 2, vocab] for positions
    seq_len // 2 - 1 .. seq_len - 2 (the first from the prefill, the rest from decode steps). The runner's cache
    is sized to the rows and then back to what it had (its contents are not kept)."""
    num_seqs, seq_len = ids.shape
    half, previous_rows = seq_len // 2, runner.max_rows
    runner.allocate_kv(num_seqs)
    rows = list(range(num_seqs))
    out = [runner.prefill(rows, ids[:, :half].tolist())]
    for pos in range(half, seq_len - 1):
        out.append(runner.decode(ids[:, pos].tolist(), [pos] * num_seqs))
    runner.allocate_kv(previous_rows)
    return torch.stack(out, dim=1).float().cpu()


def kv_runner(model, kv_cache_dtype: str, device: torch.device, dtype: torch.dtype, max_model_len: int,
              calibration: torch.Tensor, attention: str = "auto", paged: bool = False):
    """The engine's ModelRunner over model, its attention picked as the engine picks it, its elementwise kernels
    fused as the engine's (compiled on CUDA), an fp8 cache calibrated (an int8 cache needs none). paged: a paged
    pool (a "-vt" mode's V^T is one)."""
    from batchgen.worker.engine.fused import fuse_layers
    from batchgen.worker.engine.llama import LlamaParts
    from batchgen.worker.engine.model_runner import ModelRunner
    from batchgen.worker.engine.setup import resolve_attention

    fuse_layers(model, compile_kernels=device.type == "cuda")
    runner = ModelRunner(LlamaParts.from_hf(model), device=device, dtype=dtype, max_model_len=max_model_len,
                         attention=resolve_attention(attention, device, dtype, kv_cache_dtype),
                         kv_cache_dtype=kv_cache_dtype, paged=paged)
    runner.calibrate_kv(calibration.to(device))
    return runner


def int8_terms(x: torch.Tensor, terms: int) -> torch.Tensor:
    """x (float32) as qk_int8 holds it: rounded to int8 over each last-dim row's absmax, then (terms 2) what that
    left rounded over its own absmax and added back."""
    out, rest = torch.zeros_like(x), x
    for _ in range(terms):
        absmax = rest.abs().amax(dim=-1, keepdim=True)
        rounded = torch.round(rest * (127.0 / absmax.clamp(min=1e-30))) * (absmax / 127.0)
        out, rest = out + rounded, rest - rounded
    return out


@contextlib.contextmanager
def rounded_q(mode: str | None, attention: str):
    """Where the runner decodes an int8 cache without the Triton kernel (sdpa on the CPU), a "-q8" or "-q16" mode's
    arithmetic over it: each head's q as qk_int8 holds it (int8_terms) before the scores (the kernel equals attention
    over that q within float32 rounding: tests/test_kernels.py). The kernel itself does it."""
    from batchgen.worker.engine import llama
    from batchgen.worker.engine.kernels.attention import qk_int8_terms
    from batchgen.worker.engine.kernels.int8_keys import keys_apply, keys_q

    terms = qk_int8_terms(mode or "")
    if not terms or attention == "triton":
        yield
        return
    attend = llama.CacheAttention.__call__

    def call(self, layer, q, k, v):
        if self.k_cache.dtype == torch.int8:  # "-keys" where int8_keys' kernel takes the model: its rounding
            keys = "-keys" in (mode or "") and keys_apply(q.shape[-2], self.k_cache.shape[-2], q.shape[-1])
            q = (keys_q(q) if keys else int8_terms(q.float(), terms)).to(q.dtype)
        return attend(self, layer, q, k, v)

    llama.CacheAttention.__call__ = call
    try:
        yield
    finally:
        llama.CacheAttention.__call__ = attend


def run_kv(shape: Shape, strength: float, device: torch.device, dtype: torch.dtype,
           kv_dtypes: tuple[str, ...] = tuple(KV_TORCH_DTYPES), attention: str = "auto",
           int8_modes: tuple[str, ...] = ("v",)) -> list[dict]:
    """KL(fp32 ‖ runner) with the default int8 weights (rotated, as the engine's) for each KV cache dtype of
    kv_dtypes (an int8 cache once per kernel mode of int8_modes, --int8-kv-scales), and with #20's references
    (KV_REFERENCES) over the auto cache; each default row's ratios to them (the module docstring's --kv)."""
    from batchgen.worker.engine.kernels import attention as kernels

    runs = [(kv, mode) for kv in dict.fromkeys(("auto", *kv_dtypes))
            for mode in (int8_modes if kv == "int8" else (None,))]
    ref = build_planted(shape, strength, device=device)
    ids = eval_ids(shape, seed=2)
    calibration = eval_ids(shape, seed=4, num_seqs=4, seq_len=shape.seq_len)
    half = shape.seq_len // 2
    ref_logits = logits_of(ref, ids, device)[:, half - 1:-1]
    rows, logits = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        del ref
        for variant in (KV_WEIGHTS, *KV_REFERENCES):
            model = load_variant(Path(tmp), variant, device, dtype, calibration)
            for kv, mode in runs if variant == KV_WEIGHTS else (("auto", None),):
                kernels.INT8_V_SCALES = mode or "v"
                runner = kv_runner(model, kv, device, dtype, shape.seq_len, calibration, attention,
                                   paged=bool(mode and mode.endswith("-vt")))
                with rounded_q(mode, runner.attention):
                    out = teacher_forced(runner, ids)
                kernels.INT8_V_SCALES = "v"
                if variant == KV_WEIGHTS and kv == "auto":
                    logits[kv] = out
                kl, top1 = kl_top1(ref_logits, out)
                rows.append({"strength": strength, "variant": variant, "kv_cache_dtype": kv,
                             **({"int8_kv_scales": mode} if mode else {}),
                             "attention": runner.attention, "kl": round(kl, 6), "top1": round(top1, 4),
                             "kl_vs_auto": round(kl_top1(logits["auto"], out)[0], 6) if variant == KV_WEIGHTS
                             else None})
                print(json.dumps(rows[-1]), flush=True)
                del runner
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    references = {r["variant"]: r["kl"] for r in rows if r["variant"] in KV_REFERENCES}
    for r in rows:
        if r["variant"] == KV_WEIGHTS:
            r.update({f"vs_{name}": round(r["kl"] / max(kl, 1e-12), 3) for name, kl in references.items()})
    return rows


def kv_table(rows: list[dict]) -> str:
    lines = ["| S | weights | KV cache | attention | KL(fp32 ‖ runner) | top-1 | KL(auto ‖ cache) | ÷ bnb t6 (≤ 1.25) | "
             "÷ weight-only (≤ 2) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['kl_vs_auto']:.5f}" if r["kl_vs_auto"] is not None else "",
                 *(f"{r[key]:.2f}" if key in r else "" for key in ("vs_bnb_t6", "vs_weight_only"))]
        cache = r["kv_cache_dtype"] + (f" ({r['int8_kv_scales']})" if r.get("int8_kv_scales") else "")
        lines.append(f"| {r['strength']} | {r['variant']} | {cache} | {r['attention']} | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num_outlier_columns(model) -> int:
    from batchgen.worker.engine.int8_linear import outlier_guard

    return outlier_guard(model, THRESHOLD).num_columns


def mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (strength, variant): each metric's mean over the seeded models, each seed's KL kept. One
    random model is one sample of the ratios; the goals read the means."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["strength"], r["variant"]), []).append(r)
    out = []
    for (strength, variant), group in groups.items():
        row = {"strength": strength, "variant": variant}
        for key in ("kl", "top1", "greedy", "fp32_mean_max_prob", "outlier_columns"):
            if key in group[0]:
                row[key] = round(sum(g[key] for g in group) / len(group), 6)
        row["kl_by_seed"] = [g["kl"] for g in group]
        out.append(row)
    return out


def goals(rows: list[dict], variant: str = "default") -> list[dict]:
    """The issue's goal per strength: the variant's KL <= 1.25x bnb threshold 6's and <= 2x weight-only's (the
    keys say default_ for every variant, so tables read the same)."""
    out = []
    for strength in dict.fromkeys(r["strength"] for r in rows):
        kl = {r["variant"]: r["kl"] for r in rows if r["strength"] == strength}
        if not {variant, "bnb_t6", "weight_only"} <= kl.keys():
            continue
        vs_bnb = kl[variant] / max(kl["bnb_t6"], 1e-12)
        vs_wo = kl[variant] / max(kl["weight_only"], 1e-12)
        out.append({"strength": strength, "default_vs_bnb_t6": round(vs_bnb, 3), "default_vs_weight_only":
                    round(vs_wo, 3), "met": vs_bnb <= 1.25 and vs_wo <= 2.0})
    return out


def table(rows: list[dict], goal_rows: list[dict]) -> str:
    lines = ["| S | variant | KL(fp32 ‖ variant) | top-1 | greedy |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['variant']}**" if r["variant"] == "default" else r["variant"]
        lines.append(f"| {r['strength']} | {name} | {r['kl']:.4f} | {r['top1']:.3f} | {r['greedy']:.2f} |")
    lines += ["", "| S | default ÷ bnb_t6 (≤ 1.25) | default ÷ weight_only (≤ 2) | met |", "|---|---|---|---|"]
    lines += [f"| {g['strength']} | {g['default_vs_bnb_t6']:.2f} | {g['default_vs_weight_only']:.2f} | "
              f"{'yes' if g['met'] else 'NO'} |" for g in goal_rows]
    return "\n".join(lines)


# -- speed (CUDA) ---------------------------------------------------------------------------------------------


def speed_model(device: torch.device, num_layers: int = SPEED_LAYERS, outliers: float = 0.0, *, hidden: int = 4096,
                intermediate: int = 14336):
    """A random Llama-3-8B-shape model of num_layers layers in fp16, its projections as Int8Linear over their
    own row-wise int8 quantisation (what bnb stores), built on the GPU without a checkpoint. outliers > 0: every
    input and post-attention norm scales NUM_OUTLIER_CHANNELS channels by it, so the q/k/v and gate/up inputs carry
    outlier features in most tokens (|x| about 0.8 × outliers), as real models above ~6.7B do, and the weight
    columns reading them shrink by as much; the random model's own go to the down projection only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    channels = torch.randperm(hidden, generator=torch.Generator().manual_seed(OUTLIER_CHANNELS_SEED))
    planted = channels[:NUM_OUTLIER_CHANNELS].to(device)
    for layer in model.model.layers:
        if outliers > 0:
            with torch.no_grad():
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[planted] *= outliers
                # the weight columns that read them shrink as much: each layer computes what it did unplanted, so
                # the down projection's input is not inflated past the threshold (random-model MLPs sit near it)
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                             layer.mlp.gate_proj, layer.mlp.up_proj):
                    proj.weight[:, planted] /= outliers
        int8_linears(layer.self_attn, layer.mlp)
    return model


def int8_state(w: torch.Tensor):
    """A weight's row-wise int8 quantisation, what bnb stores (CB, SCB)."""
    from batchgen.worker.engine.int8_linear import Int8State

    w = w.detach().float()
    scb = w.abs().amax(dim=1).clamp_min(1e-8)
    return Int8State(torch.round(w * (127.0 / scb[:, None])).to(torch.int8), scb, None)


def int8_linears(*parents: torch.nn.Module) -> None:
    """Each nn.Linear child of parents swapped for an int_mm Int8Linear over its own int8_state."""
    from batchgen.worker.engine.int8_linear import Int8Linear

    for parent in parents:
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(int8_state(child.weight), "int_mm"))


def time_kernel(model, kernel: str, device: torch.device, calibration: torch.Tensor, rotate: str = "none"
                ) -> dict[str, float]:
    from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, convert_model
    from batchgen.worker.engine.llama import LlamaParts, flash_works
    from batchgen.worker.engine.model_runner import ModelRunner

    convert_model(model, kernel, threshold=THRESHOLD, calibration_ids=calibration if kernel == OUTLIER_KERNEL else None,
                  rotate=rotate)
    dtype = model.get_input_embeddings().weight.dtype
    attention = "flash" if device.type == "cuda" and flash_works(device, dtype) else "sdpa"
    n_prompts, prompt_len = SPEED_PREFILL
    runner = ModelRunner(LlamaParts.from_hf(model), device=device, dtype=dtype, max_model_len=2 * prompt_len,
                         attention=attention, cuda_graphs=True)
    runner.allocate_kv(SPEED_ROWS)
    gen, vocab = torch.Generator().manual_seed(0), model.config.vocab_size
    prompts = torch.randint(8, vocab, (n_prompts, prompt_len), generator=gen).tolist()
    tokens = torch.randint(8, vocab, (SPEED_ROWS,), generator=gen).tolist()
    positions = [prompt_len] * SPEED_ROWS
    with torch.inference_mode():
        for _ in range(2):  # compiles, cuBLAS workspaces, the graph's capture
            runner.prefill(list(range(n_prompts)), prompts)
            runner.decode(tokens, positions)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        num_prefills = 5
        for _ in range(num_prefills):
            runner.prefill(list(range(n_prompts)), prompts)
        torch.cuda.synchronize(device)
        prefill_s = (time.perf_counter() - start) / num_prefills
        num_steps = 50
        start = time.perf_counter()
        for _ in range(num_steps):
            runner.decode(tokens, positions)
        torch.cuda.synchronize(device)
        decode_s = (time.perf_counter() - start) / num_steps
    runner.allocate_kv(0)
    del runner
    torch.cuda.empty_cache()
    return {"decode_ms": round(1000 * decode_s, 3), "prefill_tok_s": round(n_prompts * prompt_len / prefill_s, 1)}


def run_speed(device: torch.device, outliers: float = 0.0) -> dict:
    from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, outlier_guard

    def fresh_model():  # the same random weights whichever sections ran before: their outlier columns set the cost
        torch.manual_seed(0)
        return speed_model(device, outliers=outliers)

    model = fresh_model()
    rotated = fresh_model()  # its down projections' weights are rotated once, at its first conversion
    calibration = torch.randint(8, 32000, (4, 128), generator=torch.Generator().manual_seed(4)).to(device)
    calibration[:, 0] = 1
    from batchgen.worker.engine.kernels import int8_ops

    rot = f"{OUTLIER_KERNEL}_rotated"
    res: dict = {"layers": SPEED_LAYERS, "rows": SPEED_ROWS, "prefill": list(SPEED_PREFILL), "planted": outliers}
    # twice each, interleaved: drift shows; "apart": the default with its dense product computed outside the GEMM;
    # "rotated": the default with --int8-rotate down
    for name in ("int_mm", OUTLIER_KERNEL, f"{OUTLIER_KERNEL}_apart", rot) * 2:
        int8_ops.FUSE_DENSE = not name.endswith("_apart")
        try:
            kernel = name.removesuffix("_apart").removesuffix("_rotated")
            timed = time_kernel(rotated, kernel, device, calibration, rotate="down") if name == rot else \
                time_kernel(model, kernel, device, calibration)
            res.setdefault(name, []).append(timed)
        finally:
            int8_ops.FUSE_DENSE = True
        print(name, json.dumps(res[name][-1]), flush=True)
    guard = outlier_guard(model, THRESHOLD)
    res["outlier_columns"] = guard.num_columns
    res["outlier_slots"] = sum(o.capacity for o in guard.inputs)
    res["inputs_with_columns"] = sum(1 for o in guard.inputs if o.columns)  # of 4 a layer: q/k/v, o, gate/up, down
    res["outlier_columns_rotated"] = outlier_guard(rotated, THRESHOLD).num_columns
    best = {k: {"decode_ms": min(r["decode_ms"] for r in res[k]), "prefill_tok_s": max(r["prefill_tok_s"] for r in res[k])}
            for k in ("int_mm", OUTLIER_KERNEL, f"{OUTLIER_KERNEL}_apart", rot)}
    res["best"] = best
    for key, variant in (("", OUTLIER_KERNEL), ("rotated_", rot)):
        decode_ratio = best[variant]["decode_ms"] / best["int_mm"]["decode_ms"]
        prefill_ratio = best[variant]["prefill_tok_s"] / best["int_mm"]["prefill_tok_s"]
        res.update({f"{key}decode_ratio": round(decode_ratio, 3), f"{key}prefill_ratio": round(prefill_ratio, 3),
                    f"{key}decode_bound_met": decode_ratio <= 1.15, f"{key}prefill_bound_met": prefill_ratio >= 0.85})
        print(f"decode step at {SPEED_ROWS} rows: {variant} {best[variant]['decode_ms']:.2f} ms, int_mm "
              f"{best['int_mm']['decode_ms']:.2f} ms -> {decode_ratio:.3f}x (bound <= 1.15)")
        print(f"prefill: {variant} {best[variant]['prefill_tok_s']:.0f} tok/s, int_mm "
              f"{best['int_mm']['prefill_tok_s']:.0f} tok/s -> {prefill_ratio:.3f}x (bound >= 0.85)")
    apart = best[f"{OUTLIER_KERNEL}_apart"]
    print(f"dense product apart: decode {apart['decode_ms']:.2f} ms, prefill {apart['prefill_tok_s']:.0f} tok/s "
          f"({res['inputs_with_columns']} inputs with outlier columns; rotated: {res['outlier_columns_rotated']} "
          f"columns against {res['outlier_columns']})")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/quality.json"))
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                        help="time default vs int_mm (default: on for CUDA)")
    parser.add_argument("--speed-outliers", type=float, default=0.0,
                        help="--speed: plant outlier channels at the q/k/v and gate/up inputs, their norm weights "
                             "times this (e.g. 20), so the default kernel keeps columns at every input")
    parser.add_argument("--kv", action=argparse.BooleanOptionalAction, default=None,
                        help="each KV cache dtype against auto through the ModelRunner (default: on for CUDA)")
    parser.add_argument("--kv-only", action="store_true", help="only the --kv section (no int8 variants)")
    parser.add_argument("--kv-dtypes", default=",".join(KV_TORCH_DTYPES), help="--kv: the cache dtypes (auto always)")
    parser.add_argument("--kv-attention", default="auto", choices=("auto", "triton", "sdpa"),
                        help="--kv: the decode attention (triton on the CPU: the Triton kernels under the interpreter)")
    parser.add_argument("--int8-kv-scales", default=EngineConfig.int8_kv_scales,
                        help="--kv: the int8 cache's kernel modes, comma-separated (the engine's --int8-kv-scales)")
    parser.add_argument("--speed-only", action="store_true", help="only the --speed section")
    parser.add_argument("--shape", choices=("auto", "cpu", "gpu"), default="auto",
                        help="the planted model's shape (auto: the device's; gpu on the CPU gives the GPU's ratios)")
    parser.add_argument("--mha", action="store_true",
                        help="a KV head for each query head (Llama-2's layout, where --int8-kv-scales v-q16-keys applies)")
    parser.add_argument("--variants", default="", help="comma-separated, of VARIANTS (default: the device's set)")
    parser.add_argument("--dtype", choices=("auto", "float16", "float32"), default="auto",
                        help="the compute dtype (auto: the engine's, float32 on the CPU); float16 on the CPU with --mha "
                             "--kv-attention triton runs int8_keys' kernels under the interpreter (they take fp16)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="planted models per strength (seeds 0..N-1); rows and goals are their means")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.kv_attention == "triton" and device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported (run_kv's import)
    if (args.speed or args.speed_only) and device.type != "cuda":
        parser.error("--speed times CUDA kernels: it needs --device cuda")
    shape = GPU_SHAPE if (device.type == "cuda" if args.shape == "auto" else args.shape == "gpu") else CPU_SHAPE
    if args.mha:
        shape = replace(shape, kv_heads=shape.heads)
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(  # auto: the engine's compute dtype
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    # bnb casts float32 inputs to float16 and warns on every call: expected here, as in the loader
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    variants = tuple(args.variants.split(",")) if args.variants else VARIANTS if device.type == "cuda" else CPU_VARIANTS
    start = time.perf_counter()
    seed_rows = [] if args.kv_only or args.speed_only else [r for s in STRENGTHS for seed in range(args.seeds)
                                         for r in run_strength(shape, s, device, dtype, variants, seed)]
    rows = mean_over_seeds(seed_rows)
    goal_rows = goals(rows)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "shape": asdict(shape), "threshold": THRESHOLD, "num_outlier_channels": NUM_OUTLIER_CHANNELS,
           "massive": {"base_strength": MASSIVE_BASE_STRENGTH, "value": MASSIVE_VALUE, "layer": MASSIVE_LAYER},
           "compute_dtype": str(dtype).removeprefix("torch."), "seeds": args.seeds, "rows": rows,
           "seed_rows": seed_rows, "goals": goal_rows, "goals_rotated": goals(rows, "default_rotated")}
    if rows:
        print(table(rows, goal_rows))
        print("default_rotated (--int8-rotate down):\n" + table([], out["goals_rotated"]))
    if not args.speed_only and (args.kv_only or args.kv or (args.kv is None and device.type == "cuda")):
        out["kv"] = [r for s in KV_STRENGTHS for r in run_kv(shape, s, device, dtype, tuple(args.kv_dtypes.split(",")),
                                                             args.kv_attention, tuple(args.int8_kv_scales.split(",")))]
        print(kv_table(out["kv"]))
    if args.speed_only or args.speed or (args.speed is None and device.type == "cuda" and not args.kv_only):
        out["speed"] = run_speed(device, args.speed_outliers)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['wall_s']} s")


if __name__ == "__main__":
    main()
