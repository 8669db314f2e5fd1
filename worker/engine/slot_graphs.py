"""CUDA graphs of the generic path's decode step over K/V slots (slot_batch.py).

Launched op by op from Python, a transformers forward keeps the GPU waiting: a BLOOM-7b1 decode step of a few
dozen rows spends most of its wall time on the host. The fast path replays captured graphs (cuda_graphs.py);
here the HF forward itself is captured, which needs every shape and address fixed:
- rows: the smallest bucket >= the batch's rows; the extra rows are free slots that attend to their own new
  column only (no empty softmax), their logits dropped;
- columns: the model attends over the last `width` columns of the slots, width the smallest of a few buckets
  that holds the active window, and a static 2-D mask hides the columns outside each row's tokens (and right of
  the new one); the new K/V column is written at a device index (SlotLayer.show_static).
The mask and the rows' positions go in as tensors, so ALiBi (from the mask), rotary and learned positions (from
position ids) come out as in the eager step; the new column's place in the width goes in as the cache's query
offset, from which transformers' masks count causality and sliding windows. GPT-Neo's local attention, counted
from the last key whatever the cache says, stays eager, as do host-streamed slots. A forward that
reads a device value on the host or indexes with Python data (Falcon's K/V split before transformers 5.25) fails to capture and
the engine goes on eagerly.
"""

import torch
from batchgen.worker.engine.cuda_graphs import DecodeGraphs, batch_buckets
from batchgen.worker.engine.padded_batch import ModelCalls, forward
from batchgen.worker.engine.slot_batch import SlotBatch
from transformers.cache_utils import Cache

WIDTH_BUCKETS = 8  # attended columns: multiples of 1/8 of the slots, so at most 1/8 of them is read in vain


def graphable(config) -> str | None:
    """None where the static decode answers as the eager one; else why not."""
    window = getattr(config, "sliding_window", None)
    windowed = (bool(window) and getattr(config, "use_sliding_window", True)) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or ())
    if windowed and not hasattr(Cache, "get_query_offset"):  # the hook SlotCache answers through
        return "sliding-window attention (CUDA graphs of it need transformers >= 5.24)"
    if any(t != "global" for t in getattr(config, "attention_layers", None) or ()):
        return "local attention layers"  # GPT-Neo's: a bias counted from the last key, whatever the cache says
    return None


class SlotDecodeGraphs:
    """The decode step of one SlotBatch, replayed from graphs per (rows bucket, width); capture=False runs the
    same static-shape forward eagerly (CPU, where the tests check it against the eager step)."""

    def __init__(self, model: torch.nn.Module, calls: ModelCalls, batch: SlotBatch, *, capture: bool):
        self.model, self.calls, self.batch = model, calls, batch
        self.columns = batch.layers[0].key_slots.shape[2]
        rows, device = batch.max_rows, batch.layers[0].key_slots.device
        self.mask = torch.zeros(rows, self.columns, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)  # the new column within the attended width
        step = -(-self.columns // WIDTH_BUCKETS)
        self.widths = sorted({min(self.columns, step * i) for i in range(1, WIDTH_BUCKETS + 1)})
        self.graphs = DecodeGraphs(self._forward, rows, device) if capture else None
        self.buckets = batch_buckets(rows)
        self.used: set[tuple[int, int]] = set()  # (rows bucket, width) of the steps run: the graphs captured

    def stats(self) -> dict[str, int | float]:
        """The graphs captured so far and the seconds their captures took (none without CUDA)."""
        if self.graphs is None:
            return {}
        return {"decode_graphs": len(self.graphs.graphs), "graph_capture_s": round(self.graphs.capture_s, 2)}

    @property
    def capture_s(self) -> float:
        """The seconds captures took so far (0 without CUDA): the engine times each capture as a host phase."""
        return 0.0 if self.graphs is None else self.graphs.capture_s

    def width(self) -> int:
        return next(w for w in self.widths if w >= self.columns - self.batch.start)

    def rows_bucket(self, n: int, width: int) -> int:
        """The rows a step of n runs: a bucket already captured at this width if at most twice n (as a batch
        drains, its rows cross every smaller bucket; a capture costs several steps), else the smallest >= n."""
        smallest = next(b for b in self.buckets if b >= n)
        held = [b for b, w in self.used if w == width and smallest <= b <= 2 * n]
        return min(held, default=smallest)

    def run(self, tokens: list[int]) -> torch.Tensor:
        """One decode step of the batch: next-token logits [rows, vocab]; the batch advances as decode() does."""
        batch = self.batch
        n, start, end = batch.num_rows, batch.start, batch.end
        self.mask.zero_()
        self.mask[:n, start:end] = batch.mask
        self.mask[:, end] = 1  # every row sees its new column; free rows see only it
        self.column.fill_(end)
        width = self.width()
        rows = self.rows_bucket(n, width)
        self.used.add((rows, width))
        # free rows up to the bucket: token 0 at position 0, attending to their own new column
        tokens = tokens + [0] * (rows - n)
        positions = batch.next_positions.tolist() + [0] * (rows - n)
        self.offset.fill_(end - (self.columns - width))
        if self.graphs is not None:
            stream = torch.cuda.current_stream(self.mask.device)
            try:
                logits = self.graphs.run(tokens, positions, width)
            except Exception:  # a failed capture may leave its side stream current: the caller goes on eagerly
                torch.cuda.set_stream(stream)
                raise
        else:
            ids = torch.tensor(tokens, device=self.mask.device)
            logits = self._forward(ids, torch.tensor(positions, device=ids.device), width)
        batch.advance(torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1))
        return logits[:n]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
        rows = ids.shape[0]
        layers = self.batch.layers
        for layer in layers:
            layer.show_static(rows, width, self.column)
        self.batch.cache.query_offset = self.offset
        try:
            return forward(self.model, self.calls, ids.unsqueeze(-1), self.mask[:rows, self.columns - width :],
                           positions.unsqueeze(-1), self.batch.cache)
        finally:  # the eager views back (advance() moves them on once the step has succeeded)
            self.batch.cache.query_offset = None
            for layer in layers:
                layer.static = None
                layer.show(self.batch.num_rows, self.batch.start, self.batch.end)
