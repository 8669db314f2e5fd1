"""A decode step as two half-batches (--decode-halves), so that one half's int8 projections, compute-bound at a
bulk step's rows, run while the other half's attention reads its K/V, bound by the bus.

Each half is the same layer loop as llama.forward_layers over its own rows (its own CacheAttention over its rows
of the block table). On CUDA the work goes to two streams by what holds it back: the norms and projections of
both halves on a high-priority compute stream, the attentions (with their K/V stores) on the step's own stream.
Each stream runs its work in order: compute takes pre(A, 0), pre(B, 0), then post(A, i), pre(A, i + 1),
post(B, i), pre(B, i + 1); attention takes A's and B's of each layer in turn. So while one half attends the other
runs its o/MLP projections and its next layer's norm and q/k/v projection, and the compute stream's priority
gives its GEMMs the SMs first as attention programs retire. Every row's arithmetic is the one-batch step's (the
int8 GEMMs accumulate in int32; norms, RoPE and attention are per row), so the logits match it. Without CUDA
the same order runs on one thread (the CPU tests check it against the one-batch step).
"""

import contextlib
import functools
from dataclasses import dataclass, field

import torch
from batchgen.worker.engine.llama import (
    Attend,
    CacheAttention,
    LlamaParts,
    attention_inputs,
    layer_output,
    logits_of,
    rope_tables,
)

MIN_ROWS = 128  # fewer rows: their GEMMs read weights rather than compute, so there is nothing to overlap


def halves_apply(parts: LlamaParts, num_rows: int, block_table: torch.Tensor | None) -> bool:
    """Whether a decode step of num_rows rows runs as two halves: a paged cache (a half is its rows of the block
    table), every layer resident, at least MIN_ROWS rows."""
    return block_table is not None and parts.layer_executor is None and num_rows >= MIN_ROWS


@functools.cache
def compute_stream(device: torch.device) -> torch.cuda.Stream:
    """The projections' stream, one per device, above the default priority (graph captures fork onto it, join)."""
    return torch.cuda.Stream(device, priority=-1)


@dataclass
class Half:
    """One half's rows through the layers: its residual stream, rotary tables, attention, and the tensors and events
    passed between its steps."""

    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attend: Attend
    rope: bool  # whether q and k are roped before attend (not where attend ropes them with its K/V store)
    qkv: tuple = ()
    o: torch.Tensor | None = None
    events: list = field(default_factory=list)  # kept until the join: a capture records them


class Streams:
    """Where a half's steps run: compute and attention streams on CUDA (None elsewhere: one thread, in order)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.attention = torch.cuda.current_stream(device) if self.cuda else None
        self.compute = compute_stream(device) if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def after(self, half: Half, stream) -> None:
        """stream waits for the last event half recorded (on the other stream)."""
        if self.cuda:
            stream.wait_event(half.events[-1])

    def mark(self, half: Half, stream) -> None:
        if self.cuda:
            half.events.append(torch.cuda.Event())
            half.events[-1].record(stream)


def decode_halves(parts: LlamaParts, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, kv_len: int, attention: str, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None, block_table: torch.Tensor) -> torch.Tensor:
    """llama.decode_step over a paged cache, rows [0, n // 2) and [n // 2, n) as the two halves -> logits
    [n, vocab]."""
    n = positions.shape[0]
    h = parts.embed(input_ids[:, None])
    cos, sin = rope_tables(parts, h, positions[:, None])
    halves = []
    for rows in (slice(0, n // 2), slice(n // 2, n)):
        attend = CacheAttention(parts, k_cache, v_cache, positions[rows], kv_len, attention, k_scale, v_scale,
                                block_table[rows])
        rope = not attend.take_rope(cos[rows], sin[rows])
        halves.append(Half(h[rows], cos[rows], sin[rows], attend, rope))
    s = Streams(h.device)
    layers = parts.layers

    def pre(half: Half, i: int) -> None:  # norm and q/k/v projection
        with s.on(s.compute):
            half.qkv = attention_inputs(parts, layers[i], half.h, half.cos, half.sin, half.rope)
            s.mark(half, s.compute)

    def attend(half: Half, i: int) -> None:  # K/V store and attention
        with s.on(s.attention):
            s.after(half, s.attention)
            half.o = half.attend(i, *half.qkv)
            s.mark(half, s.attention)

    def post(half: Half, i: int) -> None:  # o projection and MLP
        with s.on(s.compute):
            s.after(half, s.compute)
            half.h = layer_output(layers[i], half.h, half.o, parts.spec)

    if s.cuda:
        s.compute.wait_stream(s.attention)
    for half in halves:
        pre(half, 0)
    for i in range(len(layers)):
        for half in halves:
            attend(half, i)
        for half in halves:
            post(half, i)
            if i + 1 < len(layers):
                pre(half, i + 1)
    if s.cuda:
        s.attention.wait_stream(s.compute)
    out = parts.norm(torch.cat([half.h for half in halves]))
    return logits_of(parts, out[:, 0])
