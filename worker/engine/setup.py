"""What an LLMEngine is built from, shared by the resident and the small-VRAM builds: device and dtype, context
length, attention kernel; and the resident engine's budget (measured on CUDA, estimated on CPU)."""

import torch
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig, refuse_flash_with
from batchgen.worker.engine.kernels.backend import HAS_TRITON
from batchgen.worker.engine.llama import flash_works
from batchgen.worker.engine.loader import SUPPORTED_MODEL_TYPES, resolve_device, resolve_dtype
from batchgen.worker.engine.model_runner import ModelRunner

DEFAULT_MAX_MODEL_LEN = 4096
CUDA_ALLOCATOR_SLACK = 0.03
CUDA_MIN_PREFILL_TOKENS = 4096  # a packed prefill of a few thousand tokens keeps the tensor cores busy
# the fast path's: a step's host launches are the same at any token count, and with its warm-up (warm_up.py) twice the
# tokens a step measured faster end to end on the bulk workload (docs/benchmarks.md; 16,384 was slower again)
FAST_CUDA_MIN_PREFILL_TOKENS = 8192
CPU_MAX_BATCH_SIZE = 64
# Device memory taken after the plan is made, outside PyTorch's allocator: kernels loaded on first use (cuBLAS,
# FlashAttention, the Triton int8 kernels) and the piecewise decode's CUDA graph execs. Counted up front under a
# --max-vram cap, or it comes out of the reserve (docs/benchmarks.md has the measurement; the small-VRAM stats
# report it as offload_overhead_*).
LATE_OVERHEAD_BYTES = 700 * 2**20
FP8_MIN_CAPABILITY = (8, 9)  # Triton's float8_e4m3fn (fp8e4nv) needs Ada or Hopper  # without a cap, CPU batches are limited by cores long before memory


def process_overhead_bytes(device: torch.device) -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, library workspaces, other processes): a
    --max-vram cap models a whole card, so it counts against it too (on a shared GPU it errs on the safe side)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, (total - free) - torch.cuda.memory_reserved(device))


def resolve_device_dtype(cfg: EngineConfig, *, streaming: bool = False) -> tuple[torch.device, torch.dtype]:
    """cfg's device and compute dtype; small-VRAM mode prefers bfloat16 where the card runs it natively (sm80+):
    the host CPU reads a bfloat16 KV cache faster than a float16 one, and it holds exactly what the GPU computed."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    if streaming and cfg.compute_dtype is None and device.type == "cuda" and torch.cuda.is_bf16_supported(
            including_emulation=False):
        dtype = torch.bfloat16
    return device, dtype


def max_model_len_for(cfg: EngineConfig, config) -> int:
    """The context length rows are sized for; raises for a model type the forward does not cover."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not supported "
                         f"(supported: {sorted(SUPPORTED_MODEL_TYPES)})")
    max_pos = config.max_position_embeddings
    # No window clamp: the forward applies each sliding layer's window (FamilySpec), the context stays max_pos.
    return min(cfg.max_model_len or min(max_pos, DEFAULT_MAX_MODEL_LEN), max_pos)


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> str:
    """The attention kernel for cfg.attention; an fp8 or int8 KV cache decodes with triton or sdpa, never flash."""
    attention = name
    if name == "auto":
        attention = "sdpa"
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_works(device, dtype):
            attention = "triton" if HAS_TRITON else "flash"
    refuse_flash_with(kv_cache_dtype, attention, "Triton is not installed here" if name == "auto" else None)
    if (kv_cache_dtype.startswith("fp8") and attention == "triton" and device.type == "cuda"
            and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: Triton reads e4m3 on sm89+ (Ada, Hopper) only: use "
                         "--attention sdpa (dequantised, slower) or --kv-cache-dtype auto")
    return attention


def resolve_kv_cache_dtype(name: str, device: torch.device, dtype: torch.dtype, decode: str) -> str:
    """The resident fast path's KV cache for cfg.kv_cache_dtype, as ModelRunner names it ("auto": the compute
    dtype). decode: the attention its decode steps run over a quantised cache (llama.decode_path). auto is int8
    where that is the Triton kernel on CUDA with an fp16 q (the int8 scores' path), else the compute dtype."""
    if name == "compute":
        return "auto"
    if name == "auto" and device.type == "cuda" and dtype == torch.float16 and decode == "triton":
        return "int8"
    return name


def resident_max_prefill_tokens(cfg: EngineConfig, device: torch.device, max_model_len: int,
                                cuda_min: int = CUDA_MIN_PREFILL_TOKENS) -> int:
    if cfg.max_prefill_tokens:
        return cfg.max_prefill_tokens
    return max(max_model_len, cuda_min) if device.type == "cuda" else max_model_len


def resident_budget(cfg: EngineConfig, runner: ModelRunner, config, weights_bytes: int,
                    max_prefill_tokens: int) -> budget_math.Budget:
    """Rows (and a paged runner's KV blocks) for a model resident on the device: the warm-up's allocator peaks on
    CUDA, estimates on CPU."""
    parts, device = runner.parts, runner.device
    kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim,
                                                  runner.kv_dtype_bytes)
    if device.type == "cuda":
        with torch.inference_mode():
            prefill_bytes, act_per_row = runner.measure_cuda(
                num_probe_rows=min(8, cfg.max_batch_size or 8), prefill_tokens=max_prefill_tokens)
        _, free = runner.memory_info()
        free -= int(CUDA_ALLOCATOR_SLACK * free)  # fragmentation: the allocator never packs perfectly
        weights_bytes = torch.cuda.memory_allocated(device)
    else:
        act_per_row, prefill_bytes = budget_math.estimate_activations(
            config, head_dim=parts.head_dim, max_model_len=runner.max_model_len, prefill_tokens=max_prefill_tokens,
            dtype_bytes=torch.empty(0, dtype=runner.dtype).element_size(), scores=True)  # activations: compute dtype
        free = budget_math.available_ram_bytes()
    return plan_rows(cfg, device, free_bytes=free, weights_bytes=weights_bytes, kv_bytes_per_token=kv_per_token,
                     max_model_len=runner.max_model_len, activation_bytes_per_row=act_per_row,
                     prefill_bytes=prefill_bytes, block_size=runner.block_size)


def plan_rows(cfg: EngineConfig, device: torch.device, *, free_bytes: int | None, weights_bytes: int,
              kv_bytes_per_token: int, max_model_len: int, activation_bytes_per_row: int,
              prefill_bytes: int, block_size: int | None = None) -> budget_math.Budget:
    """The rows that fit what is free, within the user's caps: the last step of every engine path's budget.
    block_size: a paged cache's, whose KV blocks then take what the rows' activations leave."""
    total = budget_math.budget_bytes(free_bytes=free_bytes, reserve_bytes=cfg.vram_reserve_bytes,
                                     max_bytes=cfg.max_vram_bytes, weights_bytes=weights_bytes)
    cap = cfg.max_batch_size
    if cap is None and device.type != "cuda":
        cap = CPU_MAX_BATCH_SIZE
    if block_size:
        return budget_math.plan_paged(budget_bytes=total, kv_bytes_per_token=kv_bytes_per_token,
                                      max_model_len=max_model_len, activation_bytes_per_row=activation_bytes_per_row,
                                      prefill_bytes=prefill_bytes, block_size=block_size, max_batch_size=cap)
    return budget_math.plan(budget_bytes=total, kv_bytes_per_token=kv_bytes_per_token, max_model_len=max_model_len,
                            activation_bytes_per_row=activation_bytes_per_row, prefill_bytes=prefill_bytes,
                            max_batch_size=cap)
