"""EngineConfig: what the LLM engine (and its small-VRAM mode) is built from; filled once from the worker's flags.

It imports no torch, so the queue side (and an echo worker) can build its config without loading it.
"""

from dataclasses import dataclass

from batchgen.jobs import defaults

INT8_ROTATE = ("auto", "none", "down")  # EngineConfig.int8_rotate, and int8_linear.convert_model's rotate
INT8_KERNELS = ("bnb", "int_mm", "int_mm_outliers", "weight_only")  # int8_linear's kernels, named here so the config needs no torch
# auto: triton (flash prefill + the split-KV Triton decode kernel) on CUDA in fp16/bf16 where Triton runs, else
# flash there, else sdpa (masked)
ATTENTIONS = ("auto", "flash", "triton", "sdpa")
HOST_KV_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")  # auto: the model's compute dtype
# The resident engine's KV cache: auto is int8 where the fast path decodes with the Triton kernel on CUDA in fp16
# (its drift inside the fidelity bounds, more rows and a faster run: docs/benchmarks.md, "The int8 cache by default")
# and the compute dtype elsewhere; compute is the compute dtype always (exact); fp8 is float8_e4m3fn with a
# calibrated scale per layer and KV head (half the bytes of fp16, so about twice the rows; decoded by the Triton
# kernel or masked sdpa); fp8v: V only; int8: K and V rounded per token and KV head on their own absmax (the fast
# path only)
KV_CACHE_DTYPES = ("auto", "compute", "fp8", "fp8v", "int8")
KV_LAYOUTS = ("paged", "slots")
COMPILE_SHAPES = ("dynamic", "static-features")  # kernels/compiled.py
# EngineConfig.int8_kv_scales: kernels/attention.py's INT8_V_SCALES ("auto": the device's tuned table decides)
INT8_KV_SCALES = ("auto", "v", "p", "v32", "p32", "v-early", "p-early", "v-bias", "p-bias", "v-q8", "v-q8-early",
                  "v-q16", "v-q16-early", "v-q16-keys", "v-q16-keys-vt")
TASKS = ("auto", "generate", "embed")  # what the model does with a request (task.py decides auto)


def kv_cache_quantised(kv_cache_dtype: str) -> bool:
    """A quantised KV cache asked for by name (auto is the compute dtype wherever a quantised one cannot run)."""
    return kv_cache_dtype not in ("auto", "compute")


def refuse_flash_with(kv_cache_dtype: str, attention: str, why: str | None = None) -> None:
    """A quantised KV cache decodes with the Triton kernel or sdpa: the one check the config, the runner and
    resolve_attention make (why: what the error gives as the reason flash was reached)."""
    if kv_cache_quantised(kv_cache_dtype) and attention == "flash":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype} needs attention triton or sdpa (or auto), and "
                         f"{why or 'FlashAttention reads no quantised cache'}: use --attention sdpa or "
                         "--kv-cache-dtype auto")


@dataclass
class EngineConfig:
    model: str  # HF id or local path
    served_model_name: str | None = None
    task: str = "auto"  # one of TASKS: generate text, or embed it (/v1/embeddings)
    device: str = "auto"  # "cuda" if available else "cpu"
    load_in_8bit: bool = True
    compute_dtype: str | None = None  # None: "float16" on CUDA ("bfloat16" in small-VRAM mode), "float32" on CPU
    vram_reserve_bytes: int = defaults.VRAM_RESERVE_BYTES
    max_vram_bytes: int | None = None  # cap on total use; on CPU the memory budget (weights + KV + activations)
    max_batch_size: int | None = None  # hard cap on rows
    max_model_len: int | None = None  # None: min(max_position_embeddings, 4096)
    max_prefill_tokens: int | None = None  # tokens per packed prefill; None: max_model_len
    int8_threshold: float = 6.0  # bnb's outlier threshold; only the "bnb" kernel has outlier columns
    int8_kernel: str = "auto"  # auto: int_mm where torch._int_mm runs (CUDA, CPU), else bnb
    # "down": each gated MLP's down projection rotates its input by block Hadamard matrices, folded into its int8
    # weights (rotation.py): a finer int8 scale on that heavy-tailed input; "none": LLM.int8()'s arithmetic;
    # "auto": down where the outlier kernel (int_mm_outliers) runs and the path rotates, else none
    int8_rotate: str = "auto"
    # bnb's llm_int8_skip_modules: modules kept in the compute dtype (the output head always is), e.g.
    # ("model.layers.0", "model.layers.31"); matched as transformers matches them (prefix, regex or suffix)
    fp16_modules: tuple[str, ...] = ()
    attention: str = "auto"  # one of ATTENTIONS
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (CUDA only)
    # the fast path queues the next decode step before reading this one's tokens (llm_engine.py)
    overlap_decode: bool = True
    # the fast path launches the next prefill (newly admitted prompts) before reading this one's first tokens, so
    # the host's packing and launches overlap the GPU across a run of prefill steps (llm_engine.py)
    overlap_prefill: bool = True
    # the fast path moves running rows down into the rows finished sequences freed (paged KV: block-table rows
    # only), so a decode step computes its running rows and not the holes up to the highest one (llm_engine.py)
    compact_rows: bool = True
    # the fast path decodes its running rows in the forward that prefills newly admitted prompts (llama.mixed_step),
    # instead of a prefill step and then a decode step
    mixed_steps: bool = False
    # the fast path's norms, RoPE and gated activation, and the generic path's chained GELUs, as one compiled kernel
    # each (fused.py; CUDA only)
    fused_elementwise: bool = True
    # int8 kernel launches benchmarks.int8_tune measured best on this GPU model (kernels/tuned/<device>.json), where
    # a table holds the shape; off: every kernel keeps its default launch
    tuned_kernels: bool = True
    # an int8 KV cache's V scales in the Triton decode attention: "v" on each V element, "p" on the softmax weights,
    # in fp16; "v32"/"p32" the same through float32; "v-early"/"p-early" in fp16 with each tile converted where it
    # is loaded (cvt_early); "v-bias"/"p-bias" as those, K (and V under "p") left 1152 over its values and each dot
    # corrected (bias); "v-q16-early" (the plain cache's drift in fewer instructions a key) scores q as two int8
    # terms against K on the int8 tensor cores; "v-q16-keys" (where no table names another) puts the keys on the
    # tiles' rows where each query head has its own KV head (kernels/int8_keys.py), else is v-q16-early
    # (kernels/attention.py; benchmarks.kernels times them); "v-q16-keys-vt" as v-q16-keys with a paged pool's V
    # transposed in each block and P · V on the int8 tensor cores (int8_keys._vt_kernel). "auto" (the default): the
    # mode the device's tuned table names (kernels/tuned.py), else v-q16-keys
    int8_kv_scales: str = "auto"
    # how the fused and int8 elementwise functions compile (kernels/compiled.py): "static-features" (only the
    # token/row dimensions symbolic: the measured faster one) or "dynamic" (every dimension symbolic)
    compile_shapes: str = "static-features"
    # CUDA, resident engine: prompts of the calibration text through the engine's steps before its first job, so
    # that job does not pay the first run's Triton compiles at new row counts (warm_up.py)
    warm_up: bool = True
    inject_oom: str | None = None  # test hook, see model_runner.FaultInjector
    # Small-VRAM mode (worker/offload/): stream decoder layers from host memory. None: when the int8
    # weights do not fit max_vram_bytes on CUDA.
    offload: bool | None = None
    # Its host KV cache when attention runs on the CPU: "auto" is the compute dtype, which holds the K/V
    # exactly; int8 (a scale per token and head) reads about half the bytes at int8 rounding.
    host_kv_dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES
    # "paged": the resident cache is KV blocks, a row reserving what its prompt + max_tokens reach (FlashAttention
    # decode keeps slots); "slots": every row holds max_model_len tokens of its own.
    kv_layout: str = "paged"
    # The generic path's small-VRAM mode: the rows' K/V in pinned host memory, each layer's streamed in with its
    # weights (worker/offload/kv_stream.py), so rows are bounded by host memory rather than the card.
    stream_kv: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required")
        for name in ("max_batch_size", "max_model_len", "max_prefill_tokens", "max_vram_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.vram_reserve_bytes < 0:
            raise ValueError("vram_reserve_bytes must be >= 0")
        if self.int8_threshold < 0:
            raise ValueError("int8_threshold must be >= 0")
        if self.int8_kernel not in ("auto", *INT8_KERNELS):
            raise ValueError(f"int8_kernel must be auto or one of {INT8_KERNELS}, got {self.int8_kernel!r}")
        if self.host_kv_dtype not in HOST_KV_DTYPES:
            raise ValueError(f"host_kv_dtype must be one of {HOST_KV_DTYPES}, got {self.host_kv_dtype!r}")
        if any(not name.strip() for name in self.fp16_modules):
            raise ValueError("fp16_modules: empty module name")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.int8_rotate not in INT8_ROTATE:
            raise ValueError(f"int8_rotate must be one of {INT8_ROTATE}, got {self.int8_rotate!r}")
        if self.int8_kv_scales not in INT8_KV_SCALES:
            raise ValueError(f"int8_kv_scales must be one of {INT8_KV_SCALES}, got {self.int8_kv_scales!r}")
        if self.compile_shapes not in COMPILE_SHAPES:
            raise ValueError(f"compile_shapes must be one of {COMPILE_SHAPES}, got {self.compile_shapes!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        refuse_flash_with(self.kv_cache_dtype, self.attention)
