"""Small-VRAM mode: serve a model whose int8 weights do not fit the VRAM cap, by streaming decoder layers.

The model loads in 8-bit on the CPU (bitsandbytes: an int8 CB matrix and float32 SCB row scales per
linear). As many decoder layers as the budget allows are copied to the GPU for good; the others live
in pinned CPU memory and stream in, still int8, into two stage buffers (STAGE_SLOTS) on a side CUDA stream: the copy
of layer i+1 overlaps the compute of layer i, and events order the two streams (layer_stream.LayerStreamer). A streamed byte is
paid once per forward whatever the batch, so micro-batches are made large: throughput ≈ rows ÷
(bytes streamed per step ÷ host→device bandwidth). When the KV cache of that many rows does not fit
on the GPU either, it lives in pinned CPU memory, position-major, streams in beside its layer, and
each step's new K/V go back once per layer (`HostKV`), or, what the planner picks when the host is fast
enough, stays there and decode attention runs on the host CPU (`CpuAttention`, host_attention's kernel):
then only weights cross the bus, resident layers are spread between the streamed ones so the copies never
stop, the GPU work between two host attentions replays from CUDA graphs (piecewise.PiecewiseDecode), and
where the host cannot hold every layer's K/V for the rows the planner keeps a few layers' KV on the device,
attended there. The embedding table stays on the host (`HostEmbedding`).

Layers run the resident engine's int8 kernels (int8_linear; bitsandbytes' own matmul with int8_kernel "bnb")
on the streamed CB/SCB, so a streamed layer computes what the resident one would. The device is a
parameter: on CPU the same code moves weights between two CPU buffers and the stream/event calls are
no-ops; that is how the tests run it. The plan is pure arithmetic (stream_plan.py); the host KV caches and
their cost probe are host_kv.py.
"""

import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from batchgen.worker.engine import budget as budget_math
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.int8_linear import KERNELS, resolve_int8_kernel
from batchgen.worker.engine.llama import KVStore, head_dim_of
from batchgen.worker.engine.llm_engine import LLMEngine
from batchgen.worker.engine.loader import load_model, resolve_device, resolve_dtype
from batchgen.worker.engine.model_runner import ModelRunner
from batchgen.worker.offload.host_attention import Kernel, cache_bytes
from batchgen.worker.offload.host_kv import CpuAttention, HostKV, measure_cpu_attention_cost
from batchgen.worker.offload.layer_stream import LayerStreamer, device_kv_layers, int8_layer_bytes
from batchgen.worker.offload.piecewise import PiecewiseDecode
from batchgen.worker.offload.plan import (
    StreamPlan,
    int8_weights_bytes,
    plan_streaming,
    prefill_peak,
    stage_slots,
)

log = logging.getLogger(__name__)

# A prefill streams every weight once whatever its size, so it takes all the prompts it can (up to this many
# tokens: ~host staging of 3.4 GB for a 13B model in fp16) and runs each layer over groups of whole prompts
# of at most STREAMING_PREFILL_GROUP_TOKENS, which bounds its activations on the device.
STREAMING_MAX_PREFILL_TOKENS = 8192
STREAMING_PREFILL_GROUP_TOKENS = 1024


# Device memory a streaming process takes after its plan is made, outside PyTorch's allocator: kernels loaded on
# first use (cuBLAS, FlashAttention, the Triton int8 kernels) and the piecewise decode's CUDA graph execs (~500
# for a 13B model). Counted up front, or it comes out of the reserve: on an H100 (2026-11-25 11:56 UTC, 13B) the
# process had 0.68 GiB outside the allocator when it planned and 1.39 GiB at its peak (NVML 5.70 − 4.31 GiB
# reserved); an earlier plan that counted none of it peaked at 5.99 of its 6 GiB.
LATE_OVERHEAD_BYTES = 700 * 2**20

# -- whether to stream ----------------------------------------------------------------------------

def process_overhead_bytes(device: torch.device) -> int:
    """Device memory in use outside PyTorch's allocator (CUDA context, library workspaces, other processes).

    A --max-vram cap models a whole card, so this counts against it too; measured, not guessed. On a
    shared GPU it also counts other processes' memory, which errs on the safe side.
    """
    free, total = torch.cuda.mem_get_info(device)
    return max(0, (total - free) - torch.cuda.memory_reserved(device))


def wants_streaming(cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """offload=None (auto): stream when the int8 weights plus the reserve exceed max_vram_bytes on CUDA."""
    if cfg.offload is not None:
        return cfg.offload
    if cfg.max_vram_bytes is None or device.type != "cuda":
        return False
    from transformers import AutoConfig

    weights = int8_weights_bytes(AutoConfig.from_pretrained(cfg.model), torch.empty(0, dtype=dtype).element_size())
    return weights + cfg.vram_reserve_bytes > cfg.max_vram_bytes


class HostEmbedding(torch.nn.Module):
    """The token embedding table in host memory, its looked-up rows sent to the device.

    A step reads a few rows of it (64 × 10 KB for a 13B decode step), so keeping the table (328 MB for a 13B
    model) on a 6 GB card would take the room of a resident decoder layer for nothing. The lookup is the
    same gather wherever it runs; CUDA token ids cost one sync (prefill and the eager decode paths; the
    piecewise decode passes host ids).
    """

    def __init__(self, embed: torch.nn.Embedding, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(embed.weight.detach().to("cpu", dtype), requires_grad=False)
        self.padding_idx, self.device = embed.padding_idx, device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(ids.cpu(), self.weight, self.padding_idx)
        return rows.to(self.device, non_blocking=True)


class StreamingRunner(ModelRunner):
    """ModelRunner whose decoder layers come from a LayerStreamer and whose KV may live on the host.

    A streamed step has host-side work between layers (events, copies, CPU attention), so it is not one CUDA
    graph: with CPU attention the GPU work between two host attentions is (piecewise.PiecewiseDecode, where
    cuda_graphs and the int8 kernel allow: bnb's outlier columns have data-dependent shapes); the other
    placements launch eagerly.
    """

    def __init__(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype, max_model_len: int,
                 attention: str, kernel: str, threshold: float, host_kv_dtype: torch.dtype | None = None,
                 cpu_kernel: Kernel | None = None, cuda_graphs: bool = True):
        super().__init__(model, device=device, dtype=dtype, max_model_len=max_model_len, attention=attention)
        self.host_kv_dtype = host_kv_dtype or dtype  # CPU attention's cache
        self._cpu_kernel = cpu_kernel  # built on first use unless the engine built it while loading
        p = self.parts
        # in the compute dtype whatever the loader left them in: while CpuAttention's kernel compiles in another
        # thread, dynamo restoring the process default dtype can race with from_pretrained setting it (seen:
        # a float32 lm_head on a first, cold compile)
        p.norm, p.lm_head = (copy.deepcopy(m).to(device, dtype) for m in (p.norm, p.lm_head))
        p.embed = HostEmbedding(p.embed, device, dtype)
        p.rotary = copy.deepcopy(p.rotary).to(device)  # its inverse frequencies stay float32
        self.kernel, self.threshold = kernel, threshold
        self.streamer: LayerStreamer | None = None
        self.host_kv: HostKV | CpuAttention | None = None
        self.piecewise: PiecewiseDecode | None = None
        self.piecewise_graphs = cuda_graphs and kernel != "bnb"
        self.kv_placement = "device"
        self.num_device_kv_layers = 0  # CPU attention: layers whose KV stays on the device after all
        self.max_prefill_tokens = max_model_len

    @property
    def fixed_bytes(self) -> int:
        """lm_head and the final norm: always on the device (the embedding table stays on the host)."""
        mods = (self.parts.norm, self.parts.lm_head)
        return sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers()))

    def host_layer_bytes(self) -> int:
        return int8_layer_bytes(self.parts.layers[0])

    def cpu_attention_kernel(self) -> Kernel:
        """host_attention's kernel for this model's attention shape and the host KV dtype, compiled once."""
        if self._cpu_kernel is None:
            p = self.parts
            self._cpu_kernel = Kernel.build(self.host_kv_dtype, num_kv_heads=p.num_kv_heads,
                                            group=p.num_heads // p.num_kv_heads, head_dim=p.head_dim)
        return self._cpu_kernel

    def configure(self, plan: StreamPlan, max_prefill_tokens: int) -> None:
        self.streamer = LayerStreamer(self.parts.layers, device=self.device, dtype=self.dtype,
                                      num_resident=plan.num_resident,
                                      kernel=self.kernel, threshold=self.threshold,
                                      kv_streamed=plan.kv_placement == "host",
                                      num_slots=stage_slots(plan.kv_placement))
        self.parts.layer_executor = self.streamer
        self.kv_placement = plan.kv_placement
        self.num_device_kv_layers = plan.num_device_kv_layers
        if plan.kv_placement == "host":  # decode reads a strided device view of the streamed KV
            self.attention = "sdpa"
        self.max_prefill_tokens = max(max_prefill_tokens, self.max_model_len)  # the first prompt is always admitted
        self.prefill_group_tokens = STREAMING_PREFILL_GROUP_TOKENS

    def allocate_kv(self, max_rows: int) -> None:
        self.host_kv = self.piecewise = None
        if self.streamer is not None:
            self.streamer.kv = None
        if self.kv_placement == "device" or max_rows == 0:
            return super().allocate_kv(max_rows)
        p = self.parts
        self.k_cache = self.v_cache = torch.empty(0)
        shape = dict(num_layers=p.num_layers, max_rows=max_rows, num_kv_heads=p.num_kv_heads,
                     max_model_len=self.max_model_len, head_dim=p.head_dim, max_tokens=self.max_prefill_tokens,
                     dtype=self.dtype, device=self.device)
        if self.kv_placement == "cpu":
            on_device = device_kv_layers(p.num_layers, self.streamer.resident, self.num_device_kv_layers)
            self.host_kv = CpuAttention(num_heads=p.num_heads, scaling=p.scaling, kv_dtype=self.host_kv_dtype,
                                        kernel=self.cpu_attention_kernel(), device_layers=on_device,
                                        device_attention=self.attention, **shape)
            self.piecewise = PiecewiseDecode(p, self.streamer.layers, self.host_kv, max_rows=max_rows,
                                             device=self.device, dtype=self.dtype, graphs=self.piecewise_graphs)
        else:
            self.host_kv = HostKV(**shape)
            self.streamer.kv = self.host_kv
        self.k_cache, self.v_cache = self.host_kv.k, self.host_kv.v
        self.max_rows = max_rows

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        if self.host_kv is None:
            return super().prefill(rows, prompts)
        token_rows = [r for r, p in zip(rows, prompts, strict=True) for _ in p]
        positions = [i for p in prompts for i in range(len(p))]
        return self._with_host_kv(token_rows, positions, False, lambda: super(StreamingRunner, self).prefill(rows, prompts))

    def capture_graphs(self) -> float:
        return 0.0 if self.piecewise is None else self.piecewise.capture_all()

    def prompt_store(self, rows: list[int], prompts: list[list[int]], positions: torch.Tensor) -> KVStore:
        if self.host_kv is None:
            return super().prompt_store(rows, prompts, positions)
        return self.host_kv.store_prompt

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        if self.host_kv is None:
            return super().decode(tokens, positions)
        forward = self._decode_cpu_attention if self.kv_placement == "cpu" else self.decode_eager
        return self._with_host_kv(list(range(len(tokens))), positions, True, lambda: forward(tokens, positions))

    def _decode_cpu_attention(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.piecewise.run(tokens, positions, self.streamer.schedule(lag=1))
        self.host_kv.seconds["forward"] += time.perf_counter() - start
        return logits

    def _with_host_kv(self, rows: list[int], positions: list[int], decode: bool, forward) -> torch.Tensor:
        try:
            self.host_kv.begin(rows, positions, decode=decode)
            logits = forward()
            self.host_kv.end_step()
            return logits
        finally:
            self.host_kv.reset()


def host_kv_dtype(cfg: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The CPU-attention cache's dtype: cfg.host_kv_dtype, "auto" being the compute dtype (exact)."""
    return dtype if cfg.host_kv_dtype == "auto" else getattr(torch, cfg.host_kv_dtype)


def streaming_prefill_tokens(config, dtype_bytes: int, host_bytes: int | None) -> int:
    """Tokens a small-VRAM prefill admits: STREAMING_MAX_PREFILL_TOKENS, fewer where their pinned K/V staging
    would take more than 1/8 of the host's free memory (a 6 GB card's host may have 32 GB, most of it
    holding the pinned weights); never fewer than one group."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * dtype_bytes
    if host_bytes is None:
        return STREAMING_MAX_PREFILL_TOKENS
    return max(STREAMING_PREFILL_GROUP_TOKENS, min(STREAMING_MAX_PREFILL_TOKENS, host_bytes // 8 // per_token))


class StreamingLLMEngine(LLMEngine):
    """LLMEngine over a StreamingRunner: the model is loaded in 8-bit on the host, the budget is a StreamPlan.

    kv_placement, num_resident and num_device_kv_layers override the planner's choice (tests, benchmarks).
    """

    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, tokenizer, *, device: torch.device,
                 dtype: torch.dtype, weights_bytes: int, kv_placement: str = "auto", num_resident: int | None = None,
                 num_device_kv_layers: int | None = None, cpu_kernel: Kernel | None = None):
        self.kv_placement, self.num_resident, self._cpu_kernel = kv_placement, num_resident, cpu_kernel
        self.num_device_kv_layers = num_device_kv_layers
        self.cpu_attention_cost: float | None = None  # measured at start-up for the planner (CUDA, "auto")
        self.plan: StreamPlan | None = None
        self.overhead_at_plan: int | None = None  # CUDA: device memory outside the allocator when planning
        if cfg.max_prefill_tokens is None:
            cfg = dataclasses.replace(cfg, max_prefill_tokens=streaming_prefill_tokens(
                model.config, torch.empty(0, dtype=dtype).element_size(), budget_math.available_ram_bytes()))
        super().__init__(cfg, model, tokenizer, device=device, dtype=dtype, weights_bytes=weights_bytes)

    @classmethod
    def from_config(cls, cfg: EngineConfig, **kwargs) -> "StreamingLLMEngine":
        if not cfg.load_in_8bit:
            raise ValueError("small-VRAM mode streams int8 weights: load_in_8bit must be on")
        from transformers import AutoConfig

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.compute_dtype, device)
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)  # sm80+
        if cfg.compute_dtype is None and native_bf16:
            # the host CPU reads a bfloat16 KV cache faster than a float16 one (H100 host, 13B, 64 rows: 207 vs
            # 235 ms of attention a step), and the cache holds exactly what the GPU computed; older cards
            # (a 6 GB Turing) only emulate bfloat16 and keep float16
            dtype = torch.bfloat16
        placement = kwargs.get("kv_placement", "auto")
        # the CPU attention kernel is needed for "cpu", and for "auto" on CUDA (its start-up cost probe)
        needs_kernel = placement == "cpu" or (placement == "auto" and device.type == "cuda")
        with ThreadPoolExecutor(1) as pool:  # inductor's first build takes about as long as loading a 13B model
            kernel = None
            if needs_kernel and "cpu_kernel" not in kwargs:
                c = AutoConfig.from_pretrained(cfg.model)
                kernel = pool.submit(Kernel.build, host_kv_dtype(cfg, dtype), num_kv_heads=c.num_key_value_heads,
                                     group=c.num_attention_heads // c.num_key_value_heads, head_dim=head_dim_of(c))
            loaded = load_model(cfg.model, device=torch.device("cpu"), dtype=dtype, load_in_8bit=True,
                                int8_threshold=cfg.int8_threshold)
            if kernel is not None:
                kwargs["cpu_kernel"] = kernel.result()
        return cls(cfg, loaded.model, loaded.tokenizer, device=device, dtype=dtype,
                   weights_bytes=loaded.weights_bytes, **kwargs)

    def _make_runner(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        if self.cfg.inject_oom:
            log.warning("BATCHGEN_INJECT_OOM is ignored in small-VRAM mode")
        kernel = resolve_int8_kernel(self.cfg.int8_kernel, device)
        if kernel != "bnb" and device.type == "cuda":
            KERNELS.compile()
        return StreamingRunner(model, device=device, dtype=dtype, max_model_len=self.max_model_len,
                               attention=self.attention, kernel=kernel, threshold=self.cfg.int8_threshold,
                               host_kv_dtype=host_kv_dtype(self.cfg, dtype), cpu_kernel=self._cpu_kernel,
                               cuda_graphs=self.cfg.cuda_graphs)

    def _plan_budget(self, weights_bytes: int, max_prefill_tokens: int) -> budget_math.Budget:
        cfg, c, runner = self.cfg, self.model.config, self.runner
        parts, dtype_bytes = runner.parts, runner.kv_dtype_bytes
        act_per_row = budget_math.estimate_decode_activation_bytes(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
            num_heads=parts.num_heads, max_model_len=self.max_model_len, dtype_bytes=dtype_bytes,
            head_dim=parts.head_dim)
        attention_per_row = budget_math.estimate_decode_attention_bytes(  # its share of act_per_row
            num_heads=parts.num_heads, head_dim=parts.head_dim, max_model_len=self.max_model_len,
            dtype_bytes=dtype_bytes)
        # each layer runs over groups of whole prompts of at most this many tokens, or one longer prompt
        group = min(max_prefill_tokens, max(STREAMING_PREFILL_GROUP_TOKENS, self.max_model_len))
        residual = 2 * max_prefill_tokens * c.hidden_size * dtype_bytes  # the whole batch's residual stream
        prefill_bytes, masked_prefill_bytes = (residual + budget_math.estimate_prefill_bytes(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_heads=parts.num_heads,
            num_tokens=group, dtype_bytes=dtype_bytes, scores=scores) for scores in (runner.attention != "flash", True))
        if self.device.type == "cuda":
            _, free = runner.memory_info()
            self.overhead_at_plan = process_overhead_bytes(self.device)
            fixed = torch.cuda.memory_allocated(self.device) + self.overhead_at_plan + LATE_OVERHEAD_BYTES
        else:
            free, fixed = budget_math.available_ram_bytes(), runner.fixed_bytes
        total = budget_math.budget_bytes(free_bytes=free, reserve_bytes=cfg.vram_reserve_bytes,
                                         max_bytes=cfg.max_vram_bytes, weights_bytes=fixed)
        host = budget_math.available_ram_bytes()
        cost = None
        if self.device.type == "cuda" and self.kv_placement == "auto":
            cost = measure_cpu_attention_cost(
                self.device, runner.cpu_attention_kernel(), runner.host_kv_dtype, num_kv_heads=parts.num_kv_heads,
                group=parts.num_heads // parts.num_kv_heads, head_dim=parts.head_dim)
            log.info("CPU attention costs %.2f streamed bytes per host KV byte", cost)
        self.cpu_attention_cost = cost
        kv_elements = 2 * parts.num_kv_heads * parts.head_dim  # K and V of one token in one layer
        plan = plan_streaming(
            budget_bytes=total, layer_bytes=runner.host_layer_bytes(), num_layers=parts.num_layers,
            kv_bytes_per_token_layer=kv_elements * dtype_bytes,
            max_model_len=self.max_model_len, activation_bytes_per_row=act_per_row, prefill_bytes=prefill_bytes,
            masked_prefill_bytes=masked_prefill_bytes,
            max_rows=cfg.max_batch_size or budget_math.MAX_ROWS_CEILING,
            host_bytes=None if host is None else host // 2, kv_placement=self.kv_placement,
            num_resident=self.num_resident, num_device_kv_layers=self.num_device_kv_layers,
            cpu_kv_bytes_per_token_layer=cache_bytes(runner.host_kv_dtype, parts.num_kv_heads, parts.head_dim),
            cpu_attention_cost=cost, attention_bytes_per_row=attention_per_row)
        kv_per_token = budget_math.kv_bytes_per_token(parts.num_layers, parts.num_kv_heads, parts.head_dim,
                                                      dtype_bytes)
        if plan is not None:
            self.plan = plan
            runner.configure(plan, max_prefill_tokens)
            self.attention = runner.attention
            log.info("small-VRAM plan: %s", plan)
        if plan is not None:
            prefill_bytes = prefill_peak(plan.kv_placement, prefill_bytes, masked_prefill_bytes)
        return budget_math.Budget(total, kv_per_token, kv_per_token * self.max_model_len, act_per_row,
                                  prefill_bytes, 0 if plan is None else plan.max_rows)

    def reset_offload_stats(self) -> None:
        """Zeroes the cumulative host-attention and copy timings (a benchmark's warm-up apart from its timed run)."""
        if isinstance(self.runner.host_kv, CpuAttention):  # HostKV (the "host" placement) keeps no timings
            self.runner.host_kv.reset_timing()
        streams = getattr(getattr(self.runner, "streamer", None), "streams", None)
        if streams is not None:
            streams.reset_timing()

    def stats(self):
        s = super().stats()
        if self.plan is not None:
            host_kv = self.runner.host_kv
            if isinstance(host_kv, CpuAttention):  # where the host's time went, and which layers it waited for
                for key, seconds in host_kv.seconds.items():
                    s.extra[f"offload_cpu_attention_{key}_s"] = round(seconds, 3)
                s.extra["offload_cpu_attention_wait_s_by_layer"] = [round(w, 3) for w in host_kv.wait_by_layer]
            if self.overhead_at_plan is not None:  # and now: what LATE_OVERHEAD_BYTES stands for, measured
                s.extra["offload_overhead_at_plan_gib"] = round(self.overhead_at_plan / 2**30, 3)
                s.extra["offload_overhead_now_gib"] = round(process_overhead_bytes(self.device) / 2**30, 3)
            if self.cpu_attention_cost is not None:  # measured (CUDA, auto placement)
                s.extra["offload_cpu_attention_cost"] = round(self.cpu_attention_cost, 3)
            streams = getattr(self.runner.streamer, "streams", None)
            if streams is not None and streams.cuda:  # the weight stream's copies, timed on the GPU
                streams.harvest()
                s.extra.update(offload_copy_busy_s=round(streams.busy_s, 3),
                               offload_copy_bytes=streams.copied_bytes,
                               offload_copy_gb_s_while_busy=round(streams.copied_bytes / 1e9 / max(streams.busy_s, 1e-9), 1),
                               offload_copy_gap_s=round(sum(streams.gap_by_layer.values()), 3),
                               offload_copy_gap_s_by_layer={str(i): round(g, 3) for i, g in sorted(streams.gap_by_layer.items())})
            kernel = getattr(self.runner, "_cpu_kernel", None)  # the one the host attention runs
            if kernel is not None:
                s.extra["offload_cpu_attention_native"] = int(kernel.native)
            piecewise = getattr(self.runner, "piecewise", None)
            if piecewise is not None:  # each graph holds some device memory outside the allocator
                s.extra.update(offload_piecewise_graphs=int(piecewise.use_graphs),
                               offload_piecewise_graph_count=len(piecewise.graphs))
            s.extra.update(offload_kv_on_host=int(self.plan.kv_on_host),
                           offload_cpu_attention=int(self.plan.kv_placement == "cpu"),
                           offload_resident_layers=self.plan.num_resident,
                           offload_device_kv_layers=self.plan.num_device_kv_layers,
                           offload_streamed_bytes_per_step=self.plan.streamed_bytes_per_step)
        return s
