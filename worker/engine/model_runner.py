"""The runner: owns the KV cache on the device (slots, or blocks behind a block table) and runs prefill and decode
(eager or from CUDA graphs)."""

import torch
from batchgen.worker.engine.config import refuse_flash_with
from batchgen.worker.engine.cuda_graphs import DecodeGraphs
from batchgen.worker.engine.faults import FaultInjector
from batchgen.worker.engine.host_copy import to_device
from batchgen.worker.engine.kernels.attention import BLOCK_N, fp8_kv_scale, vt_pool
from batchgen.worker.engine.kv_blocks import SCRATCH_BLOCK
from batchgen.worker.engine.llama import (
    CacheAttention,
    LlamaParts,
    cache_store,
    decode_path,
    decode_step,
    mixed_step,
    prefill_step,
)

KV_LEN_BUCKET = 256
# An fp8 cache's scale is the calibration's absmax per layer and KV head times this: K/V up to twice what the
# calibration text produced stay inside e4m3's range (448); e4m3's relative rounding (3 mantissa bits) is the same
# at any scale, so the margin costs precision only in the subnormals (values under 2^-6 / 224 of that largest).
KV_SCALE_MARGIN = 2.0
# (K, V) cache dtypes; None: the compute dtype. fp8v: V only in e4m3, K exact (where activations carry outlier
# channels, K holds about half of fp8's drift: docs/benchmarks.md, "fp8 KV cache").
# int8: K and V rounded per token and KV head on their own absmax, a float32 scale each beside them.
KV_TORCH_DTYPES = {"auto": (None, None), "fp8": (torch.float8_e4m3fn, torch.float8_e4m3fn),
                   "fp8v": (None, torch.float8_e4m3fn), "int8": (torch.int8, torch.int8)}
TOKEN_SCALE_BYTES = 4  # an int8 cache's float32 scale per token and KV head
KV_BLOCK_SIZE = BLOCK_N  # tokens per block of a paged cache: one inner step of the Triton kernel reads one block


def pack_prompts(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompts packed into one sequence: token ids [T], positions [T] (restarting at 0 per prompt), each prompt's
    offset plus T at the end."""
    starts = [0]
    for p in prompts:
        starts.append(starts[-1] + len(p))
    ids = to_device([t for p in prompts for t in p], device)  # pinned, asynchronous: no wait for queued steps
    positions = to_device([i for p in prompts for i in range(len(p))], device)
    return ids, positions, starts


def memory_info(device: torch.device) -> tuple[int, int]:
    """(used, free) bytes on the GPU; (0, 0) on CPU."""
    if device.type != "cuda":
        return 0, 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free, free


def free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kv_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, heads_major: bool,
            transposed: bool = False) -> torch.Tensor:
    """A zeroed cache of shape [layers, rows or blocks, tokens, kv_heads, head_dim]. heads_major: stored with each
    block's heads outermost ([.., blocks, kv_heads, tokens, head_dim], seen through a transpose), so that a decode
    program's keys of a block are one run of tokens * head_dim bytes, not head_dim-byte pieces a token apart: an
    int8 pool's 128-byte pieces read slower than the bus (docs/benchmarks.md, "Each block's heads outermost").
    transposed: each block's heads outermost and each head's values as [head_dim, tokens] (V for
    int8_keys._vt_kernel). The kernels and stores take any strides."""
    if not (heads_major or transposed):
        return torch.zeros(shape, dtype=dtype, device=device)
    layers, blocks, tokens, heads, head_dim = shape
    if transposed:
        return torch.zeros(layers, blocks, heads, head_dim, tokens, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)
    return torch.zeros(layers, blocks, heads, tokens, head_dim, dtype=dtype, device=device).transpose(2, 3)


class ModelRunner:
    """Owns the KV cache on the device; runs prefill and decode for the engine.

    attention: "flash" (FlashAttention varlen, CUDA fp16/bf16), "triton" (flash prefill, the split-KV Triton
    decode kernel) or "sdpa" (masked, any device).
    cuda_graphs: replay decode steps from CUDA graphs (cuda_graphs.DecodeGraphs).
    prefill_group_tokens: run each layer over groups of whole prompts of at most that many tokens (None: all at once).
    kv_cache_dtype: "auto" (the compute dtype) or "fp8": float8_e4m3fn K/V divided by a scale per layer and KV
    head (k_scale/v_scale [layers, kv_heads]; 1 until calibrate_kv sets them), decoded by "triton" or "sdpa";
    "fp8v": V so, K in the compute dtype (its scale stays 1); "int8": K/V rounded to int8 per token and KV head,
    k_scale/v_scale their scales [layers, rows or blocks, kv_heads, tokens] (allocate_kv makes them).
    paged: keep K/V in blocks of KV_BLOCK_SIZE tokens behind a block table (block_size says whether it does: a
    decode that runs FlashAttention wants each row contiguous, so it keeps slots of max_model_len tokens).
    """

    def __init__(self, parts: LlamaParts, *, device: torch.device, dtype: torch.dtype, max_model_len: int,
                 inject_oom: str | None = None, attention: str = "sdpa", cuda_graphs: bool = False,
                 prefill_group_tokens: int | None = None, kv_cache_dtype: str = "auto", paged: bool = False):
        if attention not in ("flash", "triton", "sdpa"):
            raise ValueError(f"unknown attention {attention!r}: use flash, triton or sdpa")
        if kv_cache_dtype not in KV_TORCH_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}: use {' or '.join(KV_TORCH_DTYPES)}")
        refuse_flash_with(kv_cache_dtype, attention)
        self.parts = parts
        self.device, self.dtype, self.max_model_len = device, dtype, max_model_len
        self.kv_cache_dtype = kv_cache_dtype
        self.k_dtype, self.v_dtype = (d or dtype for d in KV_TORCH_DTYPES[kv_cache_dtype])
        self.k_scale = self.v_scale = None
        self.token_scales = kv_cache_dtype == "int8"  # allocate_kv makes them with the cache
        if kv_cache_dtype != "auto" and not self.token_scales:  # calibrate_kv fills them in place (graphs read them)
            self.k_scale = torch.ones(parts.num_layers, parts.num_kv_heads, dtype=torch.float32, device=device)
            self.v_scale = torch.ones_like(self.k_scale)
        self.attention = attention
        self.block_size: int | None = None  # None: a slot cache
        if paged and decode_path(parts.spec, attention, kv_cache_dtype != "auto") != "flash":
            self.block_size = KV_BLOCK_SIZE
        self.k_cache = self.v_cache = torch.empty(0)
        self.v_transposed = False
        self.block_table: torch.Tensor | None = None  # [max_rows, max_blocks_per_row] int32, updated in place
        self.host_table = torch.empty(0, dtype=torch.int32)  # its host copy, where set_blocks edits rows
        self.max_rows = 0
        self.fault = None
        self.use_graphs = cuda_graphs and device.type == "cuda" and not inject_oom  # the fault hook is Python
        self.graphs: DecodeGraphs | None = None
        self.takes_device_tokens = not inject_oom  # decode() fed the previous step's picks (overlapped decode)
        self.prefill_group_tokens = prefill_group_tokens
        if inject_oom:
            self.fault = FaultInjector(inject_oom, device)
            self.parts.layers[-1].mlp.register_forward_pre_hook(self.fault)

    @property
    def kv_dtype_bytes(self) -> float:
        """Bytes a cached K or V element takes, on average over the two (fp8v: 1.5; int8: 1 + its scale's share)."""
        scale = TOKEN_SCALE_BYTES / self.parts.head_dim if self.token_scales else 0.0
        return (self.k_dtype.itemsize + self.v_dtype.itemsize) / 2 + scale

    def calibrate_kv(self, ids: torch.Tensor) -> None:
        """Sets an fp8 cache's scales from a prefill of ids [num_seqs, seq_len] (the int8 calibration text): each
        layer's K and V absmax per KV head / 448, times KV_SCALE_MARGIN (fp8v: V's only; K's stays 1). Nothing to
        do for an "auto" or int8 cache."""
        if self.k_scale is None or self.token_scales:
            return
        prompts = ids[:, :self.max_model_len].tolist()
        amax = torch.zeros(2, *self.k_scale.shape, dtype=torch.float32, device=self.device)

        def probe(layer: int, tokens: slice, k: torch.Tensor, v: torch.Tensor) -> None:
            amax[0, layer] = torch.maximum(amax[0, layer], fp8_kv_scale(k, per_head=True))
            amax[1, layer] = torch.maximum(amax[1, layer], fp8_kv_scale(v, per_head=True))

        packed, positions, starts = pack_prompts(prompts, self.device)
        with torch.inference_mode():
            prefill_step(self.parts, packed, positions, starts, probe, self.attention, self.prefill_group_tokens)
            if self.k_dtype.itemsize == 1:
                self.k_scale.copy_(amax[0] * KV_SCALE_MARGIN)
            self.v_scale.copy_(amax[1] * KV_SCALE_MARGIN)

    @property
    def max_blocks_per_row(self) -> int:
        return -(-self.max_model_len // self.block_size) if self.block_size else 0

    def allocate_kv(self, max_rows: int, num_blocks: int | None = None) -> None:
        """A cache for max_rows rows. Paged: num_blocks blocks (plus the scratch block) that set_blocks hands to
        rows; without num_blocks every row gets max_model_len tokens of its own, as a slot cache would."""
        self.graphs = None  # captured graphs point into the old cache
        self.k_cache = self.v_cache = torch.empty(0)
        if self.token_scales:
            self.k_scale = self.v_scale = None
        p = self.parts
        shape = (p.num_layers, max_rows, self.max_model_len, p.num_kv_heads, p.head_dim)
        if self.block_size:
            per_row = self.max_blocks_per_row
            shape = (p.num_layers, 1 + (max_rows * per_row if num_blocks is None else num_blocks), self.block_size,
                     p.num_kv_heads, p.head_dim)
            self.host_table = torch.full((max_rows, per_row), SCRATCH_BLOCK, dtype=torch.int32)
            if num_blocks is None:
                self.host_table.copy_(torch.arange(max_rows * per_row, dtype=torch.int32).view(max_rows, per_row) + 1)
            self.block_table = self.host_table.to(self.device)
        heads_major = self.block_size is not None and self.token_scales
        self.k_cache = kv_pool(shape, self.k_dtype, self.device, heads_major)
        # V^T where _vt_kernel decodes every step (its partial blocks are read as written: no other path reads them)
        transposed = (heads_major and decode_path(p.spec, self.attention, True) == "triton"
                      and vt_pool(p.num_heads, p.num_kv_heads, p.head_dim, self.dtype))
        self.v_cache = kv_pool(shape, self.v_dtype, self.device, heads_major, transposed)
        self.v_transposed = transposed
        if self.token_scales:  # one per token and KV head; a head's tokens side by side (one load per key block)
            scales = (shape[0], shape[1], shape[3], shape[2])
            self.k_scale = torch.zeros(scales, dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(scales, dtype=torch.float32, device=self.device)
        self.max_rows = max_rows

    def set_blocks(self, rows: dict[int, list[int]]) -> None:
        """Rows' new blocks ([]: none, its writes go to the scratch block) into the device block table, in place:
        captured graphs read it where it is."""
        if not rows:
            return
        with torch.inference_mode():  # the tables were made in it (LLMEngine's allocate_kv)
            for row, blocks in rows.items():
                self.host_table[row] = SCRATCH_BLOCK
                self.host_table[row, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            # through a fresh pinned copy, asynchronously: a pageable copy would wait for the steps still queued
            staged = self.host_table.pin_memory() if self.block_table.is_cuda else self.host_table
            self.block_table.copy_(staged, non_blocking=True)

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        ids, positions, starts, store = self._packed(rows, prompts)
        return prefill_step(self.parts, ids, positions, starts, store, self.attention, self.prefill_group_tokens)

    def _packed(self, rows: list[int], prompts: list[list[int]]):
        """Prompts packed (pack_prompts) and the store that writes their K/V into their rows."""
        ids, positions, starts = pack_prompts(prompts, self.device)
        token_rows = to_device([r for r, p in zip(rows, prompts, strict=True) for _ in p], self.device)
        store = cache_store(self.k_cache, self.v_cache, token_rows, positions, self.k_scale, self.v_scale,
                            self.block_table)
        return ids, positions, starts, store

    def mixed(self, tokens: list[int], positions: list[int], rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """A decode step of rows [0, len(positions)) (as decode_eager) and a prefill of prompts into rows (as
        prefill) in one forward (llama.mixed_step) -> logits [len(positions) + len(prompts), vocab]."""
        n = len(positions)
        ids, prompt_positions, starts, store = self._packed(rows, prompts)
        decode_positions = to_device(positions, self.device)
        attend = CacheAttention(self.parts, self.k_cache, self.v_cache, decode_positions,
                                self._kv_len(max(positions) + 1), self.attention, self.k_scale, self.v_scale,
                                self.block_table)
        return mixed_step(self.parts, torch.cat([to_device(tokens, self.device), ids]),
                          torch.cat([decode_positions, prompt_positions]), n, attend, starts, store, self.attention,
                          self.prefill_group_tokens)

    def decode(self, tokens: list[int] | torch.Tensor, positions: list[int]) -> torch.Tensor:
        """tokens/positions for rows [0, len(positions)); holes carry token 0 at position 0 and are ignored.
        tokens may be the device's (the previous step's picks per row: a step queued before that one is read)."""
        kv_len = self._kv_len(max(positions) + 1)
        if self.use_graphs:
            if self.graphs is None:
                self.graphs = DecodeGraphs(self._decode_static, self.max_rows, self.device)
            return self.graphs.run(tokens, positions, kv_len)
        return self.decode_eager(tokens, positions, kv_len)

    def decode_eager(self, tokens: list[int] | torch.Tensor, positions: list[int],
                     kv_len: int | None = None) -> torch.Tensor:
        ids = tokens[:len(positions)] if isinstance(tokens, torch.Tensor) else to_device(tokens, self.device)
        pos = to_device(positions, self.device)
        return decode_step(self.parts, ids, pos, self.k_cache, self.v_cache,
                           kv_len or self._kv_len(max(positions) + 1), self.attention, self.k_scale, self.v_scale,
                           self.block_table)

    def drop_graphs(self) -> None:
        """The model's kernels changed shape (a new int8 outlier input): decode graphs are captured again on
        first use, which is safe mid-run (the capture's warm-up writes the K/V its replay writes)."""
        self.graphs = None

    def capture_graphs(self) -> float:
        """Captures every decode graph now (only while no row is running: warm-ups write K/V at position 0);
        returns the seconds it took."""
        if not self.use_graphs:
            return 0.0
        self.graphs = DecodeGraphs(self._decode_static, self.max_rows, self.device)
        self.graphs.capture_all(self._kv_len(self.max_model_len))
        return self.graphs.capture_s

    def _decode_static(self, ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        return decode_step(self.parts, ids, positions, self.k_cache, self.v_cache, kv_len, self.attention,
                           self.k_scale, self.v_scale, self.block_table)

    def _kv_len(self, needed: int) -> int:
        """Keys a decode step covers. Flash reads each row's own length (kv_len only sizes the launch); masked
        attention reads [0, kv_len) of every row, so graphs bucket it to bound how many get captured."""
        if self.attention in ("flash", "triton"):
            return self.max_model_len
        if self.use_graphs:
            return min(self.max_model_len, -(-needed // KV_LEN_BUCKET) * KV_LEN_BUCKET)
        return needed

    def free_cached_memory(self) -> None:
        free_cached_memory(self.device)

    def memory_info(self) -> tuple[int, int]:
        return memory_info(self.device)

    def stats(self) -> dict[str, float | int | str]:
        return {"kv_cache_dtype": self.kv_cache_dtype}

    def reset_timing(self) -> None:
        """Nothing timed here: the engine's StepStats time the steps."""

    def measure_cuda(self, *, num_probe_rows: int, prefill_tokens: int) -> tuple[int, int]:
        """Warm-up at the worst case: (prefill peak bytes, decode activation bytes per row) from the
        allocator's peak, with a small probe KV cache that is freed again."""
        # The worst prefill packs prefill_tokens tokens as prompts of up to max_model_len, each in its own row.
        lengths = [self.max_model_len] * (prefill_tokens // self.max_model_len)
        if prefill_tokens % self.max_model_len:
            lengths.append(prefill_tokens % self.max_model_len)
        probe_rows = max(1, num_probe_rows, len(lengths))
        self.allocate_kv(probe_rows)
        # Once unmeasured: the first calls also allocate library workspaces (cuBLAS) that stay for good.
        self.prefill([0], [[0] * 8])
        self.decode_eager([0] * probe_rows, [8] * probe_rows)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.prefill(list(range(len(lengths))), [[0] * n for n in lengths])
        torch.cuda.synchronize(self.device)
        prefill_bytes = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.reset_peak_memory_stats(self.device)
        self.decode_eager([0] * probe_rows, [self.max_model_len - 1] * probe_rows)
        torch.cuda.synchronize(self.device)
        decode_bytes = torch.cuda.max_memory_allocated(self.device) - base
        self.allocate_kv(0)
        torch.cuda.empty_cache()
        return prefill_bytes, -(-decode_bytes // probe_rows)
