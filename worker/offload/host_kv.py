"""The small-VRAM KV cache in host memory, attended there by the host CPU (`CpuAttention`, host_attention's
kernel), and the start-up probe that tells the planner what a byte of that attention costs on this host.
"""

import itertools
import logging
import time

import torch
from batchgen.worker.engine.llama import KVStore, cache_store
from batchgen.worker.offload.host_attention import (
    Kernel,
    cache_bytes,
    length_bias,
    native_store,
    quantize,
    sample_inputs,
)

log = logging.getLogger(__name__)


class CpuAttention:
    """The KV cache in host memory, attended on the host CPU (FlexGen's CPU attention): a decode step sends
    each layer's q/k/v of the new tokens to the host (a few MB) and gets the attention output back, so the
    cache itself never crosses PCIe and the bus carries only weights.

    K and V are [layers, rows, kv_heads, max_len, head_dim], read by host_attention's fused kernel. Stored in
    kv_dtype: the compute dtype by default (exact), or int8 with a float32 scale per (row, head, token).
    Prefill writes go through a pinned staging area, one strided copy per prompt and layer. A decode step's layer
    is split in send (device), compute (host: waits for its q/k/v, stores, attends) and receive (device), so
    PiecewiseDecode can put the device parts in CUDA graphs; the weight copies keep running meanwhile.
    buffer_rows: rows of the pinned q/k/v and output buffers (PiecewiseDecode's two halves may pad past max_rows).
    """

    def __init__(self, *, num_layers: int, max_rows: int, buffer_rows: int, num_heads: int, num_kv_heads: int,
                 max_model_len: int, head_dim: int, max_tokens: int, scaling: float, dtype: torch.dtype,
                 device: torch.device, kv_dtype: torch.dtype | None = None, kernel: Kernel | None = None,
                 device_layers: tuple[int, ...] = (), device_attention: str = "sdpa"):
        pin, slots = device.type == "cuda", buffer_rows
        staging = (num_layers, max(max_tokens, max_rows), num_kv_heads, head_dim)
        self.staging = [torch.empty(staging, dtype=dtype, pin_memory=pin) for _ in range(2)]
        self.num_layers, self.device = num_layers, device
        self.prefilling = False
        self._rows = self._positions = None
        self._kv_len = 0
        self.kv_dtype = kv_dtype or dtype
        # Layers whose K/V the planner put on the device after all (where host memory would not hold every
        # layer's for the rows, or asked for): attended there, inside the GPU work (llama.CacheAttention).
        # The host cache holds only the others' (host_index: layer -> its index there).
        self.device_layers = tuple(sorted(device_layers))
        self.device_index = {layer: j for j, layer in enumerate(self.device_layers)}
        self.host_index = {layer: j for j, layer in enumerate(i for i in range(num_layers) if i not in self.device_index)}
        shape = (len(self.host_index), max_rows, num_kv_heads, max_model_len, head_dim)
        self.keys, self.values = (torch.zeros(shape, dtype=self.kv_dtype) for _ in range(2))
        self.scales = None  # int8: K and V scales [host layers, rows, kv_heads, max_len]
        if self.kv_dtype == torch.int8:  # prefill quantizes on the device: int8 + scales cross the bus
            self.scales = [torch.zeros(shape[:4]) for _ in range(2)]
            self.staging = [torch.empty_like(t, dtype=torch.int8) for t in self.staging]
            self.scale_staging = [torch.empty(t.shape[:3], pin_memory=pin) for t in self.staging]
            self.kv8 = torch.empty(slots, 2 * num_kv_heads, head_dim, dtype=torch.int8, pin_memory=pin)
            self.kv_scales = torch.empty(slots, 2 * num_kv_heads, pin_memory=pin)
        # the new tokens' q/k/v as send() copies them to the host: q only for int8 (K/V go through kv8). Each
        # copy fills a whole leading slice: a copy into a strided host slice is staged on the host, which a CUDA
        # graph cannot hold (that turned the int8 path's graphs off)
        width = num_heads + (0 if self.kv_dtype == torch.int8 else 2 * num_kv_heads)
        self.qkv = torch.empty(slots, width, head_dim, dtype=dtype, pin_memory=pin)
        self.out = torch.empty(slots, num_heads, head_dim, dtype=dtype, pin_memory=pin)
        self.num_heads, self.num_kv_heads, self.scaling = num_heads, num_kv_heads, scaling
        self.kernel = kernel or Kernel.build(self.kv_dtype, num_kv_heads=num_kv_heads,
                                             group=num_heads // num_kv_heads, head_dim=head_dim)
        self._bias = None
        self._native_store = native_store()  # a decode step's K/V writes (else index_put)
        self._rows_in_order = False  # a decode step's rows are cache rows 0 … n − 1 (what the kernel call assumes)
        self._segments: list[tuple[int, int, int, int]] = []
        self._prompt_copied: dict[int, torch.cuda.Event] = {}  # layer -> event after its prefill copies
        # where a decode step's host time goes (seconds, summed over steps): waiting for the GPU's q/k/v
        # (its compute and the weight copy before it), writing the new K/V, the kernel, and the whole forward
        # (the rest of it: launching the layers' GPU work); and a prefill's, after its GPU work is queued: waiting
        # for a layer's K/V to reach the host, and putting them into the cache (waits > 0: it overlaps the GPU)
        self.wait_by_layer = [0.0] * num_layers  # seconds["wait"] by layer: which layers' GPU work lags
        self.seconds = {"wait": 0.0, "store": 0.0, "kernel": 0.0, "forward": 0.0, "prefill_wait": 0.0,
                        "prefill_store": 0.0}
        device_shape = (len(self.device_layers), slots, max_model_len, num_kv_heads, head_dim)
        self.device_k, self.device_v = (torch.zeros(device_shape, dtype=dtype, device=device) for _ in range(2))
        self.device_attention = device_attention  # "flash" or "sdpa", as the resident engine's
        self._device_store: KVStore | None = None  # a prefill's writes into those layers' device cache

    def begin(self, rows: list[int], positions: list[int], *, decode: bool) -> None:
        """rows/positions: where each token of the step goes (decode: one per row; prefill: every prompt token)."""
        self.prefilling = not decode
        self._rows = torch.tensor(rows, dtype=torch.long)
        self._positions = torch.tensor(positions, dtype=torch.long)
        self._kv_len = max(positions) + 1
        self._segments = [] if decode else _segments(rows, positions)
        self._prompt_copied = {}
        if not decode and self.device_layers:  # prefill writes the device layers' K/V straight into their cache
            self._device_store = cache_store(self.device_k, self.device_v, self._rows.to(self.device),
                                             self._positions.to(self.device))
        self._bias = length_bias(self._positions + 1, self._kv_len) if decode else None
        self._rows_in_order = decode and torch.equal(self._rows, torch.arange(len(rows)))

    def on_device(self, layer: int) -> bool:
        return layer in self.device_index

    def store_prompt(self, layer: int, tokens: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """A prefill's K/V [t, kv_heads, head_dim] of tokens (of the rows/positions given to begin()) -> staging."""
        if layer in self.device_index:
            return self._device_store(self.device_index[layer], tokens, k, v)
        if self.scales is None:
            for which, value in enumerate((k, v)):
                self.staging[which][layer, tokens].copy_(value, non_blocking=True)
        else:
            for which, value in enumerate((k, v)):
                q8, scale = quantize(value)
                self.staging[which][layer, tokens].copy_(q8, non_blocking=True)
                self.scale_staging[which][layer, tokens].copy_(scale, non_blocking=True)
        if self.device.type == "cuda":  # the layer's last group's copies: end_step waits for them
            self._prompt_copied[layer] = torch.cuda.current_stream().record_event()

    def _store(self, layer, rows, positions, k: torch.Tensor, v: torch.Tensor,
               scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Writes K/V [..., d] at cache[layer, rows, :, positions]: decode passes index tensors, prefill a layer
        slice, one row and a position slice; for an int8 cache they come quantized on the device, with their
        scales."""
        layer = self.host_index[layer]
        if self.scales is None:
            self.keys[layer, rows, :, positions] = k.to(self.kv_dtype)
            self.values[layer, rows, :, positions] = v.to(self.kv_dtype)
            return
        self.keys[layer, rows, :, positions], self.scales[0][layer, rows, :, positions] = k, scales[0]
        self.values[layer, rows, :, positions], self.scales[1][layer, rows, :, positions] = v, scales[1]

    def _store_step(self, layer: int, lo: int, hi: int, k: torch.Tensor, v: torch.Tensor,
                    scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """A decode step's new K/V [n, kv_heads, d] of rows [lo, hi) at their positions: the native store where it
        is built and the K/V come in the cache's dtype, else _store's index_put."""
        if self._native_store is None or not self._rows_in_order or k.dtype != self.kv_dtype:
            return self._store(layer, self._rows[lo:hi], self._positions[lo:hi], k, v, scales)
        j = self.host_index[layer]
        cache_scales = (None, None) if self.scales is None else (self.scales[0][j, lo:hi], self.scales[1][j, lo:hi])
        self._native_store(self.keys[j, lo:hi], self.values[j, lo:hi], *cache_scales, k, v,
                           *(scales or (None, None)), self._positions[lo:hi])

    def send(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int = 0) -> None:
        """Device side of a decode step's layer: q [b, heads, 1, d] and k/v [b, kv_heads, 1, d] of the new
        tokens of rows [lo, lo + b) -> the pinned buffers (int8 K/V quantized first, where it is a few small
        kernels instead of host passes). Only device ops and copies: a CUDA graph can hold it."""
        rows = slice(lo, lo + q.shape[0])
        if self.scales is None:
            self.qkv[rows].copy_(torch.cat([q, k, v], dim=1)[:, :, 0], non_blocking=True)
            return
        self.qkv[rows].copy_(q[:, :, 0], non_blocking=True)
        kv8, kv_scales = quantize(torch.cat([k, v], dim=1)[:, :, 0])
        self.kv8[rows].copy_(kv8, non_blocking=True)
        self.kv_scales[rows].copy_(kv_scales, non_blocking=True)

    def compute(self, layer: int, lo: int, hi: int, ready: torch.cuda.Event | None = None) -> None:
        """Host side: waits for send's copies (the `ready` event recorded after them, or the whole stream),
        writes rows [lo, hi)'s new K/V into the cache and attends over it; the output goes to the pinned `out`
        buffer, which receive() brings back."""
        heads, kv_heads, length, n = self.num_heads, self.num_kv_heads, self._kv_len, hi - lo
        t0 = time.perf_counter()
        if ready is not None:
            ready.synchronize()
        else:
            self._wait_for_device()
        t1 = time.perf_counter()
        rows = slice(lo, hi)
        if self.scales is None:
            q_host, k_host, v_host = self.qkv[rows].split([heads, kv_heads, kv_heads], dim=1)
            self._store_step(layer, lo, hi, k_host, v_host)
        else:
            q_host = self.qkv[rows]
            (k8, v8), scales = self.kv8[rows].chunk(2, dim=1), self.kv_scales[rows].chunk(2, dim=1)
            self._store_step(layer, lo, hi, k8, v8, scales)
        t2 = time.perf_counter()
        j = self.host_index[layer]  # a decode step's rows are cache rows 0 … n − 1
        scales = (None, None) if self.scales is None else (s[j, rows, :, :length] for s in self.scales)
        o = self.kernel(q_host.float().view(n, kv_heads, heads // kv_heads, -1), self.keys[j, rows, :, :length],
                        self.values[j, rows, :, :length], *scales, self._bias[rows], self.scaling)
        self.out[rows].copy_(o.view(n, heads, -1))
        t3 = time.perf_counter()
        for key, dt in (("wait", t1 - t0), ("store", t2 - t1), ("kernel", t3 - t2)):
            self.seconds[key] += dt
        self.wait_by_layer[layer] += t1 - t0

    def reset_timing(self) -> None:
        """Zeroes seconds and wait_by_layer (a benchmark's timed part apart from its warm-up)."""
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.wait_by_layer = [0.0] * len(self.wait_by_layer)

    def stats(self) -> dict[str, float | int | list[float]]:
        """Where the host's time went, which layers it waited for, and which kernel attended."""
        out: dict[str, float | int | list[float]] = {
            f"offload_cpu_attention_{key}_s": round(seconds, 3) for key, seconds in self.seconds.items()}
        out["offload_cpu_attention_wait_s_by_layer"] = [round(w, 3) for w in self.wait_by_layer]
        out["offload_cpu_attention_native"] = int(self.kernel.native)
        return out

    def receive(self, b: int, lo: int = 0) -> torch.Tensor:
        """Device side: rows [lo, lo + b) of the attention output, [b, heads, 1, d] on the device. On CUDA the copy
        is queued before the next layer's wait, so `out` is free again by the time compute() writes it."""
        return self.out[lo:lo + b].to(self.device, non_blocking=True)[:, :, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """send, compute, receive in a row: llama's Attend, for one layer run eagerly."""
        self.send(q, k, v)
        self.compute(layer, 0, q.shape[0])
        return self.receive(q.shape[0])

    def end_step(self) -> None:
        """After a prefill: puts its K/V into the host cache layer by layer, each as soon as that layer's
        device→host copies are done, so the host's copying overlaps the GPU's later layers."""
        if self.prefilling:
            for layer in range(self.num_layers):
                if layer in self.device_index:
                    continue
                t0 = time.perf_counter()
                if layer in self._prompt_copied:
                    self._prompt_copied[layer].synchronize()
                t1 = time.perf_counter()
                self.seconds["prefill_wait"] += t1 - t0
                for row, start, first, length in self._segments:  # one strided copy per prompt, not per token
                    k, v = (self.staging[which][layer, start: start + length].transpose(0, 1) for which in range(2))
                    scales = None
                    if self.scales is not None:
                        scales = tuple(t[layer, start: start + length].transpose(0, 1) for t in self.scale_staging)
                    self._store(layer, row, slice(first, first + length), k, v, scales)
                self.seconds["prefill_store"] += time.perf_counter() - t1
            self._wait_for_device()
        self._prompt_copied = {}
        self.reset()

    def _wait_for_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    def reset(self) -> None:
        self.prefilling = False


def _segments(rows: list[int], positions: list[int]) -> list[tuple[int, int, int, int]]:
    """(row, first token index, first position, length) of each run of consecutive positions in one row."""
    out: list[list[int]] = []
    for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
        if out and out[-1][0] == row and out[-1][2] + out[-1][3] == pos:
            out[-1][3] += 1
        else:
            out.append([row, i, pos, 1])
    return [tuple(x) for x in out]


def measure_cpu_attention_cost(device: torch.device, kernel: Kernel, kv_dtype: torch.dtype, *, num_kv_heads: int,
                               group: int, head_dim: int, seconds: float = 0.3) -> float:
    """PCIe bytes/s ÷ CPU attention bytes/s on this host, measured (CUDA only): how many streamed bytes one
    byte of host KV read by CpuAttention costs. plan_streaming weighs the "cpu" KV placement with it. The
    kernel is timed while host→device copies run, as in a decode step: both read host memory, and the kernel
    is much slower beside the copies than alone."""
    src = torch.empty(256 * 2**20, dtype=torch.int8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(8):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    pcie = 8 * src.numel() / (time.perf_counter() - start)
    # a layer's cache is a few hundred MB and a step reads every layer's once, so none of it is in the L3 cache
    # when it is read again: the kernel rotates over 4 such samples (one alone may nearly fit a large L3). Built
    # before the copies are queued: building them outlasts the copies, and the kernel must be timed beside them
    rows, length = 64, 256
    args = itertools.cycle([sample_inputs(kv_dtype, rows, num_kv_heads, group, length, head_dim) for _ in range(4)])
    kernel(*next(args))
    for _ in range(int(2 * pcie * seconds / src.numel()) + 4):  # queued: they outlast the kernel's timing below
        dst.copy_(src, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 2:
        kernel(*next(args))
        runs += 1
    elapsed, outlasted = time.perf_counter() - start, not copied.query()
    torch.cuda.synchronize(device)
    if not outlasted:
        log.warning("CPU attention cost probe: the copies ran out before the kernel's timing ended")
    return pcie / (runs * rows * length * cache_bytes(kv_dtype, num_kv_heads, head_dim) / elapsed)
