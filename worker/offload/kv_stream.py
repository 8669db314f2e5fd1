"""Small-VRAM mode's K/V on the host for the generic path (--stream-kv): each layer's K/V streams in beside its
weights, so rows are no longer capped by what their K/V takes of the card.

Under a 6 GiB cap the rows' device K/V is what bounds the generic streamer (a 13B shape: a few dozen rows, while
every step streams 15 GB of layers whatever the rows). Here the slots (slot_batch.py) live in pinned host memory;
two device stages each hold one layer's slots. A forward pre-hook on each decoder layer points that layer at its
stage and starts copying the next layer's slots into the other stage on a side stream, as the layer streamer does
with weights; a decode writes its new column into the stage and copies it out to a pinned column buffer, which the
batch writes into the host slots once the step has synced. A step then moves rows × columns × K/V bytes more over
the bus, small beside the weights at short contexts, and the rows are bounded by host memory.

The copies move whole rows (every column of the first n slots, one contiguous block) rather than the active
columns alone: a strided host-to-device copy would be staged through the CPU.
"""

import torch
from batchgen.worker.offload.side_copy import copy_ahead


class KVStream:
    """Two device stages for the layers' K/V, filled from the decoding batch's host slots ahead of each layer."""

    def __init__(self, layers: torch.nn.ModuleList, device: torch.device):
        self.device, self.num_layers = device, len(layers)
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.stages: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.batch = None  # the SlotBatch whose decode forward is running; None in prefills
        self.copied_bytes = 0
        self.reserved: list[tuple[torch.Tensor, torch.Tensor]] = []  # host slots made at load (reserve)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._hook(i))

    def reserve(self, num_layers: int, rows: int, heads: int, columns: int, head_dim: int, dtype: torch.dtype) -> int:
        """Every layer's host slots (K, V) for `rows` rows, zeroed and pinned now, at load: pinning GBs of host
        memory takes seconds, which the first prefill would otherwise spend. Returns their bytes."""
        self.reserved = [tuple(torch.zeros(rows, heads, columns, head_dim, dtype=dtype, pin_memory=self.cuda)
                               for _ in range(2)) for _ in range(num_layers)]
        return 2 * num_layers * self.reserved[0][0].numel() * self.reserved[0][0].element_size()

    def take_slots(self, rows: int, shapes: list[tuple[int, ...]], dtype: torch.dtype
                   ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The reserved slots, handed over once, where they fit: the same per-row shape (heads, columns, head_dim)
        for every layer, the dtype, and at least `rows` rows. None: the caller allocates its own."""
        fits = (len(self.reserved) == len(shapes) and all(
            k.dtype == dtype and k.shape[0] >= rows and tuple(k.shape[1:]) == shape
            for (k, _), shape in zip(self.reserved, shapes, strict=True)))
        if not fits:
            return None
        slots, self.reserved = self.reserved, []
        return slots

    def allocate(self, like: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Two stages shaped like one layer's host slots (K, V), on the device."""
        if not self.stages or self.stages[0][0].shape != like[0].shape or self.stages[0][0].dtype != like[0].dtype:
            self.stages = [tuple(torch.zeros_like(t, device=self.device) for t in like) for _ in range(2)]

    def start(self, batch) -> None:
        """A decode forward over batch begins: layer 0's K/V starts copying into stage 0."""
        self.batch = batch
        self._prefetch(0)

    def stop(self) -> None:
        self.batch = None

    def _hook(self, i: int):
        def before_layer(module, args):
            if self.batch is not None:
                self._before(i)
        return before_layer

    def _before(self, i: int) -> None:
        stage = i % 2
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[stage])
        self.batch.layers[i].stage = self.stages[stage]
        if i + 1 < self.num_layers:  # the next forward's layer 0 waits for this step's columns: start() copies it
            self._prefetch(i + 1)

    def _prefetch(self, i: int) -> None:
        """Layer i's first n host slots (every column) into stage i % 2, after the compute queued so far (the
        layer that read that stage last is queued before this copy)."""
        layer, n = self.batch.layers[i], self.batch.num_rows
        pairs = [(dst[:n], src[:n]) for dst, src in zip(self.stages[i % 2], (layer.key_slots, layer.value_slots),
                                                        strict=True)]
        self.ready[i % 2] = copy_ahead(self.copy_stream, self.device, pairs)
        self.copied_bytes += 2 * layer.key_slots[:n].numel() * layer.key_slots.element_size()

    def stats(self) -> dict[str, float]:
        return {"kv_stream_copied_gib": round(self.copied_bytes / 2**30, 3)}
