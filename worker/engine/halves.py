"""A decode step as two half-batches on two CUDA streams (--decode-halves), so that one half's int8 projections,
compute-bound at a bulk step's rows, run while the other half's attention reads its K/V, bound by the bus.

Each half is the same layer loop as llama.forward_layers over its own rows (its own CacheAttention over its rows
of the block table); the halves' attentions take turns: half B's attention of layer i waits for half A's, and A's
of layer i + 1 for B's of layer i. So while one half attends, the other runs its o/MLP projections and its next
layer's norm and q/k/v projection. Every row's arithmetic is the one-batch step's (the int8 GEMMs accumulate in
int32; norms, RoPE and attention are per row), so the logits match it. Without CUDA the halves run one after the
other in the same order (the CPU tests check them against the one-batch step).
"""

import contextlib
import functools
from dataclasses import dataclass

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
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second half's stream, one per device (graph captures fork onto it and join back)."""
    return torch.cuda.Stream(device)


@dataclass
class Half:
    """One half's rows through the layers: its residual stream, rotary tables and attention."""

    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attend: Attend
    rope: bool  # whether q and k are roped before attend (not where attend ropes them with its K/V store)
    stream: torch.cuda.Stream | None


def decode_halves(parts: LlamaParts, input_ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, kv_len: int, attention: str, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None, block_table: torch.Tensor) -> torch.Tensor:
    """llama.decode_step over a paged cache, rows [0, n // 2) and [n // 2, n) as the two halves -> logits
    [n, vocab]."""
    n = positions.shape[0]
    h = parts.embed(input_ids[:, None])
    cos, sin = rope_tables(parts, h, positions[:, None])
    cuda = h.is_cuda
    main = torch.cuda.current_stream(h.device) if cuda else None
    halves = []
    for rows, stream in ((slice(0, n // 2), main), (slice(n // 2, n), side_stream(h.device) if cuda else None)):
        attend = CacheAttention(parts, k_cache, v_cache, positions[rows], kv_len, attention, k_scale, v_scale,
                                block_table[rows])
        rope = not attend.take_rope(cos[rows], sin[rows])
        halves.append(Half(h[rows], cos[rows], sin[rows], attend, rope, stream))
    if cuda:
        halves[1].stream.wait_stream(main)
    events: list[torch.cuda.Event] = []  # each attention's end, kept until the join (a capture records them)
    for i, layer in enumerate(parts.layers):
        for half in halves:
            with torch.cuda.stream(half.stream) if cuda else contextlib.nullcontext():
                q, k, v = attention_inputs(parts, layer, half.h, half.cos, half.sin, half.rope)
                if events:  # the other half's last attention first: the two never share the bus
                    half.stream.wait_event(events[-1])
                o = half.attend(i, q, k, v)
                if cuda:
                    events.append(torch.cuda.Event())
                    events[-1].record(half.stream)
                half.h = layer_output(layer, half.h, o, parts.spec)
    if cuda:
        main.wait_stream(halves[1].stream)
    out = parts.norm(torch.cat([half.h for half in halves]))
    return logits_of(parts, out[:, 0])
