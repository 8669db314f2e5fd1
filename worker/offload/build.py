"""Small-VRAM mode: serve a model whose int8 weights do not fit the VRAM cap, by streaming decoder layers.

The model loads in 8-bit on the host. A pure planner (plan.py) picks how many decoder layers stay on the device,
where the KV cache lives and how many rows a step takes; this module measures what it plans from, then builds
the weight streamer (layer_stream.py: the other layers copied in, still int8, into stage buffers on a side CUDA
stream, overlapping the compute), the runner (a ModelRunner over a device KV cache, or a HostAttentionRunner
whose KV the host CPU attends) and hands both, with the plan's budget, to an LLMEngine. The device is a
parameter: on CPU the same code copies between host buffers and the stream calls are no-ops (the tests).
"""

import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig, kv_cache_quantised
from batchgen.worker.engine.int8_linear import OUTLIER_KERNEL, Int8Runtime, calibrate_owners
from batchgen.worker.engine.int8_outliers import OutlierGuard, calibration_ids
from batchgen.worker.engine.llama import LlamaParts, head_dim_of, prefill_step
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.loader import load_model
from batchgen.worker.engine.model_runner import ModelRunner, memory_info, pack_prompts
from batchgen.worker.engine.setup import (
    LATE_OVERHEAD_BYTES,
    max_model_len_for,
    process_overhead_bytes,
    resolve_attention,
    resolve_device_dtype,
)
from batchgen.worker.offload.hook_stream import int8_model_bytes
from batchgen.worker.offload.host_attention import Kernel, cache_bytes
from batchgen.worker.offload.host_head import HostEmbedding
from batchgen.worker.offload.host_kv import measure_cpu_attention_cost
from batchgen.worker.offload.host_runner import HostAttentionRunner
from batchgen.worker.offload.layer_stream import LayerStreamer, layer_bytes, outlier_bytes
from batchgen.worker.offload.plan import STAGE_SLOTS, StreamPlan, int8_weights_bytes, plan_streaming

log = logging.getLogger(__name__)

# A prefill streams every weight once whatever its size, so it takes all the prompts it can (up to this many
# tokens, bounded by their pinned K/V staging) and runs each layer over groups of whole prompts of at most
# STREAMING_PREFILL_GROUP_TOKENS, which bounds its activations on the device.
STREAMING_MAX_PREFILL_TOKENS = 8192
STREAMING_PREFILL_GROUP_TOKENS = 1024
# Dense rows per int8 input for the outlier kernel's columns, fixed before the plan (which counts them): calibration
# keeps the largest columns that leave int8_outliers.OUTLIER_SLACK of them for the guard.
OUTLIER_SLOTS = 16


def wants_streaming(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """offload=None (auto): stream when the int8 weights (--fp16-modules' in the compute dtype) plus the reserve
    exceed max_vram_bytes on CUDA."""
    if cfg.offload is not None:
        return cfg.offload
    if cfg.max_vram_bytes is None or device.type != "cuda":
        return False
    from transformers import AutoConfig

    config, dtype_bytes = AutoConfig.from_pretrained(cfg.model), torch.empty(0, dtype=dtype).element_size()
    weights = int8_weights_bytes(config, dtype_bytes)
    if cfg.fp16_modules:  # what they name weighs the compute dtype: counted on the model built weightless
        weights = int8_model_bytes(config, dtype_bytes, cfg.fp16_modules)
    return weights + cfg.vram_reserve_bytes > cfg.max_vram_bytes


def host_kv_dtype(cfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The CPU-attention cache's dtype: cfg.host_kv_dtype, "auto" being the compute dtype (exact)."""
    return dtype if cfg.host_kv_dtype == "auto" else getattr(torch, cfg.host_kv_dtype)


def streaming_prefill_tokens(config, dtype_bytes: int, host_bytes: int | None) -> int:
    """Tokens a small-VRAM prefill admits: STREAMING_MAX_PREFILL_TOKENS, fewer where their pinned K/V staging
    would take more than 1/8 of the host's free memory (most of it holds the pinned weights); never fewer than
    one group."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype_bytes
    if host_bytes is None:
        return STREAMING_MAX_PREFILL_TOKENS
    return max(STREAMING_PREFILL_GROUP_TOKENS, min(STREAMING_MAX_PREFILL_TOKENS, host_bytes // 8 // per_token))


def streamed_parts(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> LlamaParts:
    """The forward's parts of a host-loaded model: final norm and lm_head copied to the device (in the compute dtype
    whatever the loader left them in: a CPU-attention kernel compiling in another thread can race with
    from_pretrained over the process default dtype), the embedding table on the host; the layers come from the
    streamer (set as layer_executor)."""
    parts = LlamaParts.from_hf(model)
    parts.norm, parts.lm_head = (copy.deepcopy(m).to(device, dtype) for m in (parts.norm, parts.lm_head))
    # the table stays in host memory: a step reads a few rows, which on a small card would take a resident
    # decoder layer's room for nothing (the piecewise decode passes host ids: no sync there)
    parts.embed = HostEmbedding(parts.embed.to("cpu", dtype), device)
    parts.rotary = copy.deepcopy(parts.rotary).to(device)  # its inverse frequencies stay float32
    return parts


def device_fixed_bytes(parts: LlamaParts) -> int:
    """lm_head and the final norm: always on the device (the embedding table stays on the host)."""
    mods = (parts.norm, parts.lm_head)
    return sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers()))


@dataclass
class Offload:
    """What small-VRAM mode set up beside the runner: its plan, the weight streamer, and what the plan was made
    from (the CPU attention cost, the device memory outside the allocator); reports them as engine stats."""

    plan: StreamPlan
    streamer: LayerStreamer
    device: torch.device
    cpu_attention_cost: float | None = None  # measured at start-up (CUDA, auto placement)
    overhead_at_plan: int | None = None  # CUDA: device memory outside the allocator when planning

    def stats(self) -> dict:
        out: dict = {}
        if self.overhead_at_plan is not None:  # and now: what LATE_OVERHEAD_BYTES stands for, measured
            out["offload_overhead_at_plan_gib"] = round(self.overhead_at_plan / 2**30, 3)
            out["offload_overhead_now_gib"] = round(process_overhead_bytes(self.device) / 2**30, 3)
        if self.cpu_attention_cost is not None:
            out["offload_cpu_attention_cost"] = round(self.cpu_attention_cost, 3)
        return out | self.streamer.stats() | self.plan.stats()

    def reset_timing(self) -> None:
        self.streamer.reset_timing()


def calibrate_streamed(int8: Int8Runtime, parts: LlamaParts, streamer: LayerStreamer, tokenizer, *, threshold: float,
                       slots: int, attention: str, device: torch.device, dtype: torch.dtype) -> None:
    """The outlier kernel's columns from a prefill of the calibration text through the streamed layers (their K/V
    dropped), `slots` per input; every input takes the dense path from the start, so piecewise graphs captured
    once stay valid as the guard adds columns. Sets int8's guard and logs the kernel."""
    ids, positions, starts = pack_prompts(calibration_ids(tokenizer, device).tolist(), device)

    def run() -> torch.Tensor:
        return prefill_step(parts, ids, positions, starts, lambda *_: None, attention, STREAMING_PREFILL_GROUP_TOKENS)

    inputs = calibrate_owners(streamer.owners(), threshold, device, dtype, run, capacity=slots)
    for o in inputs:
        o.fixed_path = True
    int8.guard = OutlierGuard(inputs, threshold)
    int8.announce(threshold)


def refuse_kv_cache_dtype(cfg: EngineConfig) -> None:
    """The fast path's small-VRAM mode keeps its KV cache in the compute dtype or in --host-kv-dtype."""
    if kv_cache_quantised(cfg.kv_cache_dtype):
        raise ValueError(f"--kv-cache-dtype {cfg.kv_cache_dtype} is the resident engine's and the generic path's; "
                         "the fast path's small-VRAM host KV cache has its own --host-kv-dtype")


def build_streaming_engine(cfg: EngineConfig, *, kv_placement: str = "auto", num_resident: int | None = None,
                           num_device_kv_layers: int | None = None, num_slots: int = STAGE_SLOTS,
                           cpu_kernel: Kernel | None = None) -> LLMEngine:
    """The small-VRAM engine for cfg. kv_placement, num_resident, num_device_kv_layers and num_slots override
    the planner's choice (tests, benchmarks)."""
    if not cfg.load_in_8bit:
        raise ValueError("small-VRAM mode streams int8 weights: load_in_8bit must be on")
    refuse_kv_cache_dtype(cfg)
    from transformers import AutoConfig

    device, dtype = resolve_device_dtype(cfg, streaming=True)
    # the CPU attention kernel is needed for "cpu", and for "auto" on CUDA (its start-up cost probe)
    needs_kernel = kv_placement == "cpu" or (kv_placement == "auto" and device.type == "cuda")
    with ThreadPoolExecutor(1) as pool:  # inductor's first build takes about as long as loading a large model
        pending = None
        if needs_kernel and cpu_kernel is None:
            c = AutoConfig.from_pretrained(cfg.model)
            pending = pool.submit(Kernel.build, host_kv_dtype(cfg, dtype), num_kv_heads=c.num_key_value_heads,
                                  group=c.num_attention_heads // c.num_key_value_heads, head_dim=head_dim_of(c))
        loaded = load_model(cfg.model, device=torch.device("cpu"), dtype=dtype, load_in_8bit=True,
                            int8_threshold=cfg.int8_threshold,
                            fp16_modules=cfg.fp16_modules)
        if pending is not None:
            cpu_kernel = pending.result()
    model = loaded.model
    max_model_len = max_model_len_for(cfg, model.config)
    attention = resolve_attention(cfg.attention, device, dtype)
    if attention == "triton":  # the streamed runners decode with FlashAttention (the slot cache's Triton kernel is the resident engine's)
        attention = "flash"
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    max_prefill = cfg.max_prefill_tokens or streaming_prefill_tokens(model.config, dtype_bytes,
                                                                     budget_math.available_ram_bytes())
    if cfg.inject_oom:
        log.warning("BATCHGEN_INJECT_OOM is ignored in small-VRAM mode")
    # on the host: the int8 kernel the resident engine would run, down projections rotated where it rotates them;
    # the streamer copies those rows, and the outlier columns are found once the layers stream on the device
    int8 = Int8Runtime.convert(model, cfg.int8_kernel, threshold=cfg.int8_threshold, device=device,
                               fuse_projections=False, rotate=cfg.int8_rotate)
    parts = streamed_parts(model, device, dtype)
    slots = OUTLIER_SLOTS if int8.kernel == OUTLIER_KERNEL else 0
    outliers = sum(outlier_bytes(layer, dtype, slots) for layer in parts.layers) if slots else 0
    kv_dtype = host_kv_dtype(cfg, dtype)

    # -- what the plan is made from
    c = model.config
    # each layer runs over groups of whole prompts of at most this many tokens, or one longer prompt
    group = min(max_prefill, max(STREAMING_PREFILL_GROUP_TOKENS, max_model_len))
    act_per_row, prefill_bytes = budget_math.estimate_activations(
        c, head_dim=parts.head_dim, max_model_len=max_model_len, prefill_tokens=group, dtype_bytes=dtype_bytes,
        scores=attention != "flash")
    prefill_bytes += 2 * max_prefill * c.hidden_size * dtype_bytes  # the whole batch's residual stream
    attention_per_row = budget_math.estimate_decode_attention_bytes(  # its share of act_per_row
        num_heads=parts.num_heads, head_dim=parts.head_dim, max_model_len=max_model_len, dtype_bytes=dtype_bytes)
    overhead = None
    if device.type == "cuda":
        _, free = memory_info(device)
        overhead = process_overhead_bytes(device)
        fixed = torch.cuda.memory_allocated(device) + overhead + LATE_OVERHEAD_BYTES + outliers
    else:
        free, fixed = budget_math.available_ram_bytes(), device_fixed_bytes(parts) + outliers
    total = budget_math.budget_bytes(free_bytes=free, reserve_bytes=cfg.vram_reserve_bytes,
                                     max_bytes=cfg.max_vram_bytes, weights_bytes=fixed)
    host = budget_math.available_ram_bytes()
    cost = None
    if device.type == "cuda" and kv_placement == "auto":
        cost = measure_cpu_attention_cost(device, cpu_kernel, kv_dtype, num_kv_heads=parts.num_kv_heads,
                                          group=parts.num_heads // parts.num_kv_heads, head_dim=parts.head_dim)
        log.info("CPU attention costs %.2f streamed bytes per host KV byte", cost)
    plan = plan_streaming(
        budget_bytes=total, layer_bytes=[layer_bytes(layer, dtype) for layer in parts.layers], num_layers=parts.num_layers,
        kv_bytes_per_token_layer=2 * parts.num_kv_heads * parts.head_dim * dtype_bytes, max_model_len=max_model_len,
        activation_bytes_per_row=act_per_row, prefill_bytes=prefill_bytes,
        max_rows=cfg.max_batch_size or budget_math.MAX_ROWS_CEILING, host_bytes=None if host is None else host // 2,
        kv_placement=kv_placement, num_resident=num_resident, num_device_kv_layers=num_device_kv_layers,
        cpu_kv_bytes_per_token_layer=cache_bytes(kv_dtype, parts.num_kv_heads, parts.head_dim),
        cpu_attention_cost=cost, attention_bytes_per_row=attention_per_row, num_slots=num_slots)
    kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim, dtype_bytes)
    budget = budget_math.Budget(total, kv_per_token, kv_per_token * max_model_len, act_per_row, prefill_bytes,
                                0 if plan is None else plan.max_rows)
    if plan is None:
        raise ValueError(f"not enough memory for one row of {max_model_len} tokens: {budget}")
    log.info("small-VRAM plan: %s", plan)

    # -- what the plan says
    streamer = LayerStreamer(parts.layers, device=device, dtype=dtype, num_resident=plan.num_resident,
                             kernel=int8.kernel, threshold=cfg.int8_threshold, num_slots=plan.num_slots)
    parts.layer_executor = streamer
    if plan.kv_placement == "cpu":
        runner = HostAttentionRunner(
            parts, streamer, device=device, dtype=dtype, max_model_len=max_model_len, attention=attention,
            kv_dtype=kv_dtype, kernel=cpu_kernel, num_device_kv_layers=plan.num_device_kv_layers,
            max_prefill_tokens=max_prefill, prefill_group_tokens=STREAMING_PREFILL_GROUP_TOKENS,
            graphs=cfg.cuda_graphs and int8.kernel != "bnb")
    else:
        runner = ModelRunner(parts, device=device, dtype=dtype, max_model_len=max_model_len, attention=attention,
                             prefill_group_tokens=STREAMING_PREFILL_GROUP_TOKENS)
    if slots:  # before the engine's KV cache takes the room the calibration pass uses
        calibrate_streamed(int8, parts, streamer, loaded.tokenizer, threshold=cfg.int8_threshold, slots=slots,
                           attention=attention, device=device, dtype=dtype)
    else:
        int8.announce(cfg.int8_threshold)
    return LLMEngine(cfg, model, loaded.tokenizer, runner, budget, max_prefill_tokens=max_prefill, int8=int8,
                     reporters=[Offload(plan, streamer, device, cost, overhead)])
