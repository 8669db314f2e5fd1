"""A small-VRAM decode step in pieces: the GPU work between two host attentions, replayed from CUDA graphs.

With the KV cache attended on the host CPU (host_kv.CpuAttention) a decode step cannot be one graph: every
layer stops for the CPU. Launched op by op from Python, the GPU work takes host time that the CPU then does
not spend on attention. So the step is cut into
num_layers + 1 pieces: piece 0 runs layer 0 up to its attention from the tokens' embeddings; piece i runs the
rest of layer i − 1 from the attention output the host sent back, then layer i up to its attention; the last
piece ends with lm_head. A piece reads and writes only static buffers (token ids and embeddings, positions,
rope tables, two residual buffers it alternates between, CpuAttention's pinned q/k/v and output buffers), so
running it twice gives the same result and it can be captured once per (half-)batch bucket and replayed (vLLM's
piecewise graphs), all before the first row runs. A step runs as two halves, piece by piece in turn, so the GPU
works on one while the host attends the other. The weight stream's waits and releases stay outside the graphs
(LayerStreamer.schedule with lag 1: a layer's weights are in use across two pieces). Without CUDA the same
pieces run eagerly.
"""

import logging
import time
from collections.abc import Iterator

import torch
from batchgen.worker.engine.cuda_graphs import batch_buckets, capture
from batchgen.worker.engine.llama import (
    CacheAttention,
    LlamaParts,
    attention_inputs,
    layer_output,
    rope_tables,
)

log = logging.getLogger(__name__)


def split_slots(max_rows: int) -> int:
    """Rows of the static buffers a step's two halves use: the second half starts where the first one's bucket
    ends and is padded to the same bucket (at most ceil(max_rows / 2) each)."""
    return 2 * ((max_rows + 1) // 2)


def split_halves(n: int, buckets: list[int] | None) -> list[tuple[int, int, int]]:
    """(lo, hi, b) of each half of a step of n rows: rows [lo, hi) in buffer rows [lo, lo + b). With graphs
    (buckets: the captured half sizes) the first half is a whole bucket, so no padding lands on a row of the
    second, and the second is padded to the same bucket; without, the halves are n / 2 each, unpadded."""
    if n == 1:
        return [(0, 1, 1)]
    if buckets is None:
        return [(0, (n + 1) // 2, (n + 1) // 2), ((n + 1) // 2, n, n // 2)]
    b = next(s for s in buckets if 2 * s >= n)
    return [(0, b, b), (b, n, b)]


class PiecewiseDecode:
    """layers: the executor's decoder layers (weights at fixed device addresses); attention: a CpuAttention
    (send(q, k, v, lo), compute(layer, lo, hi, ready), receive(b, lo); layers it keeps on the device are
    attended inside the piece and do not stop for the host).

    A step of n ≥ 2 rows runs as two halves, rows [0, b) and [b, n) with b = the half bucket ≥ n / 2, piece by
    piece in turn, so the GPU runs one half's piece while the host attends the other half: with one batch the
    host would wait for every piece and the GPU for every attention.
    """

    def __init__(self, parts: LlamaParts, layers: list, attention, *, max_rows: int, device: torch.device,
                 dtype: torch.dtype, graphs: bool):
        self.parts, self.layers, self.attention, self.device = parts, layers, attention, device
        hidden, slots = parts.embed.weight.shape[1], split_slots(max_rows)
        self.inputs = torch.zeros(2, slots, 1, dtype=torch.long, device=device)  # token ids, positions
        self.embedded = torch.zeros(slots, 1, hidden, dtype=dtype, device=device)  # the tokens' embeddings
        self.hidden = [torch.zeros(slots, 1, hidden, dtype=dtype, device=device) for _ in range(2)]
        self.rope = torch.zeros(2, slots, 1, 1, parts.head_dim, dtype=dtype, device=device)  # cos, sin
        # device-KV layers' attention outputs, for the next piece (two: piece i reads one and writes the other)
        self.attended = torch.zeros(2, slots, parts.num_heads, 1, parts.head_dim, dtype=dtype, device=device)
        self.buckets = batch_buckets(slots // 2)  # per half
        self.use_graphs = graphs and device.type == "cuda"
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = None
        self.capture_stream = torch.cuda.Stream(device) if self.use_graphs else None

    def run(self, tokens: list[int], positions: list[int], schedule: Iterator[int]) -> torch.Tensor:
        """One decode step of rows [0, n) -> logits [n, vocab]; schedule yields the pieces in order."""
        n = len(tokens)
        halves = split_halves(n, self.buckets if self.use_graphs else None)
        pad = [0] * (halves[-1][0] + halves[-1][2] - n)
        inputs = torch.tensor([tokens + pad, positions + pad])
        self.inputs[:, :inputs.shape[1], 0].copy_(inputs)
        # outside the graphs: the table may live on the host (host_head.HostEmbedding), which a graph cannot read
        self.embedded[:inputs.shape[1]].copy_(self.parts.embed(inputs[0, :, None].to(self.parts.embed.weight.device)))
        pieces = iter(schedule)
        i = next(pieces, None)
        ready = [self._launch(i, lo, b) for lo, _, b in halves]
        logits: list[torch.Tensor] = []
        while i is not None:
            # before the host attends: the schedule releases layer i − 1's weight slot and queues its next copy
            # now, so the copy runs during this layer's host attention (and the stream's wait for it is queued
            # after both halves' pieces)
            following = next(pieces, None)
            for k, (lo, hi, b) in enumerate(halves):
                if i == self.parts.num_layers:
                    logits.append(ready[k][:hi - lo])
                elif not self.attention.on_device(i):
                    self.attention.compute(i, lo, hi, ready[k])  # meanwhile the GPU runs the other half's piece
                if following is not None:
                    ready[k] = self._launch(following, lo, b)
            i = following
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _launch(self, i: int, lo: int, b: int):
        """Piece i of the half at lo: its logits for the last piece, else the event the host waits for (None
        without CUDA)."""
        out = self.piece(i, lo, b) if not self.use_graphs else self._replay(i, lo, b)
        if i == self.parts.num_layers:
            return out
        return torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None

    def piece(self, i: int, lo: int, b: int) -> torch.Tensor | None:
        """Piece i over buffer rows [lo, lo + b): the rest of layer i − 1, then layer i up to its attention (sent
        to the host); the last piece returns the logits."""
        p, att, rows = self.parts, self.attention, slice(lo, lo + b)
        if i == 0:
            h = self.embedded[rows]
            self.rope[:, rows].copy_(torch.stack(rope_tables(p, h, self.inputs[1, rows])))
        else:
            o = self.attended[(i - 1) % 2, rows] if att.on_device(i - 1) else att.receive(b, lo)
            h = layer_output(self.layers[i - 1], self.hidden[i % 2][rows], o)
        if i == p.num_layers:
            return p.lm_head(p.norm(h)[:, 0])
        self.hidden[(i + 1) % 2][rows].copy_(h)
        q, k, v = attention_inputs(p, self.layers[i], h, self.rope[0, rows], self.rope[1, rows])
        if not att.on_device(i):
            att.send(q, k, v, lo)
            return None
        on_device = CacheAttention(p, att.device_k[:, rows], att.device_v[:, rows], self.inputs[1, rows, 0],
                                   att.device_k.shape[2], att.device_attention)
        self.attended[i % 2, rows].copy_(on_device(att.device_index[i], q, k, v))
        return None

    def capture_all(self) -> float:
        """Captures every piece of both halves of every bucket, largest bucket first (the shared pool is sized
        once), in the order a step replays them, before any row runs; returns the seconds it took. A piece that
        cannot be captured turns graphs off (eager pieces compute the same thing)."""
        if not self.use_graphs:
            return 0.0
        start = time.perf_counter()
        try:
            for b in sorted(self.buckets, reverse=True):
                for i in range(self.parts.num_layers + 1):
                    for lo in (0, b):
                        self._capture(i, lo, b)
        except RuntimeError as exc:
            log.warning("piecewise CUDA graphs off (capture failed: %s)", str(exc).splitlines()[0], exc_info=True)
            self.use_graphs, self.graphs = False, {}
            torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-ups' blocks: the budget has no room for them
        return time.perf_counter() - start

    def stats(self) -> dict[str, int]:
        """Whether the pieces replay from graphs, and how many (each holds device memory outside the allocator)."""
        return {"offload_piecewise_graphs": int(self.use_graphs), "offload_piecewise_graph_count": len(self.graphs)}

    def _replay(self, i: int, lo: int, b: int) -> torch.Tensor | None:
        graph, out = self.graphs[(b, i, lo)]
        graph.replay()
        return out

    def _capture(self, i: int, lo: int, b: int) -> None:
        graph, out, _ = capture(lambda: self.piece(i, lo, b), self.capture_stream, self.pool)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(b, i, lo)] = (graph, out)
