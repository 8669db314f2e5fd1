"""The runner of small-VRAM's "cpu" KV placement: the KV cache lives in host memory and the host CPU attends over it
(host_kv.CpuAttention); a decode step runs as GPU pieces between the host attentions (piecewise.PiecewiseDecode)."""

import time

import torch
from batchgen.worker.engine.llama import LlamaParts, prefill_step
from batchgen.worker.engine.model_runner import free_cached_memory, memory_info, pack_prompts
from batchgen.worker.offload.host_attention import Kernel
from batchgen.worker.offload.host_kv import CpuAttention
from batchgen.worker.offload.layer_stream import LayerStreamer, device_kv_layers
from batchgen.worker.offload.piecewise import PiecewiseDecode, split_slots


class HostAttentionRunner:
    """The engine's runner (see llm_engine.Runner) with CPU attention. attention ("flash"/"sdpa") is what prefill
    and the layers whose KV the plan keeps on the device (num_device_kv_layers) use; graphs: capture the pieces
    (not with bnb's int8 kernel, whose outlier columns have data-dependent shapes)."""

    block_size: int | None = None  # no paged KV: the host cache keeps a slot of max_model_len tokens per row
    v_transposed = False  # nor V^T

    def __init__(self, parts: LlamaParts, streamer: LayerStreamer, *, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, attention: str, kv_dtype: torch.dtype, kernel: Kernel | None,
                 num_device_kv_layers: int, max_prefill_tokens: int, prefill_group_tokens: int, graphs: bool):
        # a piece runs the rest of layer i − 1 and layer i up to its attention: both layers' weights at once
        shared = [i for i in range(1, streamer.num_layers) if streamer.host[i - 1] is not None
                  and streamer.host[i] is not None and streamer.slot_of[i - 1] == streamer.slot_of[i]]
        if shared:
            raise ValueError(f"CPU attention's piecewise decode holds two adjacent layers' weights at once, but "
                             f"streamed layers {shared[0] - 1} and {shared[0]} share one of "
                             f"{len(streamer.stages)} stage slot(s): use at least 2")
        self.parts, self.streamer, self.device, self.dtype = parts, streamer, device, dtype
        self.max_model_len, self.attention, self.kv_dtype, self.kernel = max_model_len, attention, kv_dtype, kernel
        self.num_device_kv_layers = num_device_kv_layers
        self.max_prefill_tokens = max(max_prefill_tokens, max_model_len)  # the first prompt is always admitted
        self.prefill_group_tokens, self.piecewise_graphs = prefill_group_tokens, graphs
        self.use_graphs = False  # no whole-step graphs: a step stops for the host at every layer
        self.cpu_attention: CpuAttention | None = None
        self.piecewise: PiecewiseDecode | None = None

    @property
    def kv_dtype_bytes(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def allocate_kv(self, max_rows: int) -> None:
        self.cpu_attention = self.piecewise = None
        if max_rows == 0:
            return
        p = self.parts
        on_device = device_kv_layers(p.num_layers, self.streamer.resident, self.num_device_kv_layers)
        self.cpu_attention = CpuAttention(
            num_layers=p.num_layers, max_rows=max_rows, buffer_rows=split_slots(max_rows), num_heads=p.num_heads,
            num_kv_heads=p.num_kv_heads, max_model_len=self.max_model_len, head_dim=p.head_dim,
            max_tokens=self.max_prefill_tokens, scaling=p.scaling, dtype=self.dtype, device=self.device,
            kv_dtype=self.kv_dtype, kernel=self.kernel, device_layers=on_device, device_attention=self.attention)
        self.piecewise = PiecewiseDecode(p, self.streamer.layers, self.cpu_attention, max_rows=max_rows,
                                         device=self.device, dtype=self.dtype, graphs=self.piecewise_graphs)

    def capture_graphs(self) -> float:
        return 0.0 if self.piecewise is None else self.piecewise.capture_all()

    def drop_graphs(self) -> None:
        """Nothing captured goes stale: small-VRAM mode's outlier inputs add their dense product from the start
        (OutlierColumns.fixed_path), so a column the guard adds changes buffers, not the captured work."""

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        token_rows = [r for r, p in zip(rows, prompts, strict=True) for _ in p]
        positions = [i for p in prompts for i in range(len(p))]

        def forward() -> torch.Tensor:
            ids, device_positions, starts = pack_prompts(prompts, self.device)
            return prefill_step(self.parts, ids, device_positions, starts, self.cpu_attention.store_prompt,
                                self.attention, self.prefill_group_tokens)

        return self._step(token_rows, positions, False, forward)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        def forward() -> torch.Tensor:
            start = time.perf_counter()
            logits = self.piecewise.run(tokens, positions, self.streamer.schedule(lag=1))
            self.cpu_attention.seconds["forward"] += time.perf_counter() - start
            return logits

        return self._step(list(range(len(tokens))), positions, True, forward)

    def _step(self, rows: list[int], positions: list[int], decode: bool, forward) -> torch.Tensor:
        try:
            self.cpu_attention.begin(rows, positions, decode=decode)
            logits = forward()
            self.cpu_attention.end_step()
            return logits
        finally:
            self.cpu_attention.reset()

    def free_cached_memory(self) -> None:
        free_cached_memory(self.device)

    def memory_info(self) -> tuple[int, int]:
        return memory_info(self.device)

    def stats(self) -> dict:
        if self.cpu_attention is None:
            return {}
        return self.cpu_attention.stats() | self.piecewise.stats()

    def reset_timing(self) -> None:
        if self.cpu_attention is not None:
            self.cpu_attention.reset_timing()
