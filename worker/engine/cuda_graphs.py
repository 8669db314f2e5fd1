"""CUDA graphs of the decode step: one graph per (batch-size bucket, kv_len), captured on first use.

A decode step is ~1,000 small kernels; launched one by one from Python the GPU waits on the CPU whatever
the batch. Replaying a captured graph launches them all at once. Inputs live in static buffers; a step of n rows runs the graph of the smallest bucket
>= n, the extra rows carrying token 0 at position 0 (they are free rows, whose K/V a prefill rewrites).
"""

import time
from collections.abc import Callable

import torch
from batchgen.worker.engine.host_copy import to_device

DecodeFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (ids [b], positions [b], kv_len) -> logits


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16 up to 64, steps of 32 up to 256, steps of 64 beyond; max_rows last."""
    sizes = [1, 2, 4, 8]
    size = 16
    while size < max_rows:
        sizes.append(size)
        size += 16 if size < 64 else 32 if size < 256 else 64
    return sorted({s for s in sizes if s < max_rows} | {max_rows})


def capture(fn: Callable[[], torch.Tensor | None], stream: torch.cuda.Stream,
            pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None, torch.Tensor | None]:
    """fn run once on stream (compiles kernels, creates cuBLAS workspaces), then captured there into pool; returns
    the graph, fn's output in it (static: each replay rewrites it) and the output of that first, real run. Without
    torch.cuda.graph's per-capture flushes of the device and pinned-host caches, after which the next steps would
    allocate afresh."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        first = fn()
    torch.cuda.synchronize(stream.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            end_capture(graph)
    current.wait_stream(stream)
    if isinstance(first, torch.Tensor):
        first.record_stream(current)  # made on stream, read on the caller's
    return graph, out, first


def end_capture(graph: torch.cuda.CUDAGraph) -> None:
    """graph.capture_end(), its out-of-memory (the graph's instantiation: a torch.AcceleratorError, not an
    OutOfMemoryError) raised as torch.OutOfMemoryError, so that the engine shrinks the batch and retries as it does
    for any other OOM instead of the worker dying."""
    try:
        graph.capture_end()
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" not in str(exc):
            raise
        raise torch.OutOfMemoryError(f"CUDA graph capture: {exc}") from exc


class DecodeGraphs:
    def __init__(self, decode: DecodeFn, max_rows: int, device: torch.device):
        self.decode = decode
        self.buckets = batch_buckets(max_rows)
        self.inputs = torch.zeros(2, max_rows, dtype=torch.long, device=device)  # ids, positions
        self.device = device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # every capture on one side stream: its blocks are reused
        self.capture_s = 0.0

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, tokens: list[int] | torch.Tensor, positions: list[int], kv_len: int) -> torch.Tensor:
        """tokens: host ids, or the device's [>= len(positions)] (a step fed by the previous one's picks)."""
        n = len(positions)
        b = self.bucket(n)
        pad = [0] * (b - n)
        if isinstance(tokens, torch.Tensor):
            self.inputs[1, :b].copy_(to_device(positions + pad, self.device))
            self.inputs[0, :n].copy_(tokens[:n])
            self.inputs[0, n:b].zero_()
        else:
            self.inputs[:, :b].copy_(to_device([tokens + pad, positions + pad], self.device))
        key = (b, kv_len)
        if key not in self.graphs:  # the capture's warm-up ran this step: its logits (a replay would run it twice)
            return self._capture(key)[:n]
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _capture(self, key: tuple[int, int]) -> torch.Tensor:
        """Warm-up once, then capture; the warm-up's logits. The warm-up runs the step for real on the current
        inputs, so this step is done: replaying it too would run it twice, and a step is not always idempotent (a
        V^T pool's store and seal turn a block that fills over again, into garbage)."""
        start = time.perf_counter()
        b, kv_len = key
        ids, positions = self.inputs[0, :b], self.inputs[1, :b]
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        graph, logits, first = capture(lambda: self.decode(ids, positions, kv_len), self.stream, self.pool)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, logits)
        self.capture_s += time.perf_counter() - start
        return first

    def capture_all(self, kv_len: int) -> None:
        """Captures every bucket up front, largest first (the shared pool is sized once, by the largest)."""
        self.inputs.zero_()
        for b in sorted(self.buckets, reverse=True):
            if (b, kv_len) not in self.graphs:
                self._capture((b, kv_len))
