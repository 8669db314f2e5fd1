"""The generic path's running batch in preallocated row slots: K/V written in place, rows joining and leaving
without copying the others.

A transformers DynamicCache concatenates every layer's K/V each decode step, and TGI's filter/concatenate copies
the whole cache again whenever a row leaves or joins: at a few hundred rows three passes over tens of GB per
step, against the one that attention needs. Here each layer owns buffers [rows, kv_heads, columns, head_dim];
the model sees views of the active columns [start, end), so its own forward (masks, ALiBi, windows) runs
unchanged. Every row's tokens are contiguous and end at column end (left padding, as HF's batches): a decode
writes column end of every row, a new row's prompt lands in columns [end - p, end) of a free slot, a finished
row's slot is refilled by the last row (one row copied, not the batch). Columns run max_model_len plus a slack of
1/16 wide; when end reaches the right edge the active columns move back so that end = max_model_len (once per
slack's worth of steps), which keeps room for any prompt to the left of end.

kv_cache_dtype fp8: the slots hold float8_e4m3fn K/V divided by a scale per layer and KV head, set from the first
prefill's absmax (times the fast path's margin; larger values saturate); each layer's forward attends over a
dequantized copy of its active columns, which lives only while that layer runs: half the bytes per row, so about
twice the rows where memory bounds them (small-VRAM mode), for one extra pass over one layer's K/V per step.

With a KVStream (--stream-kv, small-VRAM mode) the slots live in pinned host memory and each layer attends over a
device stage the stream filled ahead of it (worker/offload/kv_stream.py); a decode's new column goes to the stage
and out to a pinned buffer, landing in the host slots once the step has synced.

The host work a batch does (allocating and growing slots, joins, window moves, landing columns, row moves) is timed
by name in the engine's StepStats (`stats`).
"""

import torch
from batchgen.worker.engine.kernels.attention import FP8_MAX, fp8_kv_scale
from batchgen.worker.engine.model_runner import KV_SCALE_MARGIN
from batchgen.worker.engine.padded_batch import PaddedBatch
from batchgen.worker.engine.step_stats import StepStats
from transformers.cache_utils import DynamicCache, DynamicLayer

SLACK_DIVISOR = 16  # a row's slot is 1/16 longer than its context: one move of the window per that many steps
HOST_SLACK_DIVISOR = 4  # host slots: memory is cheap there, and a window move is a host copy
CPU_INITIAL_ROWS = 8  # host RAM budgets are large: grow the slots on demand there, allocate them at once on CUDA


def slot_columns(max_model_len: int, host: bool = False) -> int:
    """A row slot's columns: its context plus the decode steps between two moves of the window."""
    return max_model_len + max(8, max_model_len // (HOST_SLACK_DIVISOR if host else SLACK_DIVISOR))


class SlotCache(DynamicCache):
    """The layers' cache as the model sees it. In a static-shape decode the new token's column within the attended
    width is a device tensor (query_offset), which transformers' mask functions (>= 5.24) read through
    get_query_offset: causality and sliding windows then count from the new column, not the width's last."""

    query_offset: torch.Tensor | None = None

    def get_query_offset(self, layer_idx: int = 0):
        return super().get_query_offset(layer_idx) if self.query_offset is None else self.query_offset


class DequantScratch:
    """fp8 slots' dequantized K and V for the layer attending now, in buffers every layer of a batch shares (a
    layer's copy is dead once its attention has run): no allocation per layer and step, whose width grows a column
    a step and would leave the allocator a trail of segments just too small to reuse."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def dequantize(self, which: int, stored: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """stored (fp8, [rows, heads, width, head_dim], a view of slots shaped like `like`) times scale, in the
        compute dtype, as a view of buffer `which`."""
        key = (tuple(like.shape[1:]), like.device)
        held = self.buffers.get(key)
        if held is None or held[0].shape[0] < like.shape[0]:  # new, or the slots grew
            held = tuple(torch.empty(like.shape, dtype=self.dtype, device=like.device) for _ in range(2))
            self.buffers[key] = held
        rows, _, width, _ = stored.shape
        out = held[which][:rows, :, :width]
        out.copy_(stored)
        return out.mul_(scale.to(self.dtype))


class SlotLayer(DynamicLayer):
    """One layer's K/V slots; keys/values are the views [rows, heads, start:end] the model attends over (the
    stored ones: fp8 slots hand the forward a dequantized copy instead). scales: (K, V) [1, heads, 1, 1] for fp8."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None,
                 dtype: torch.dtype, scratch: DequantScratch):
        super().__init__()
        self.key_slots, self.value_slots, self.scales, self.dtype = keys, values, scales, dtype
        self.scratch = scratch
        self.device = keys.device
        self.is_initialized = True
        self.num_rows = self.start = self.end = 0
        self.stage: tuple[torch.Tensor, torch.Tensor] | None = None  # host slots: this decode's device copy
        self.columns_out: tuple[torch.Tensor, torch.Tensor] | None = None  # host slots: the new column, pinned
        self.static: tuple[int, int, torch.Tensor] | None = None  # (rows, width, column) in a static-shape decode

    def show(self, num_rows: int, start: int, end: int) -> None:
        self.num_rows, self.start, self.end = num_rows, start, end
        self.keys = self.key_slots[:num_rows, :, start:end]
        self.values = self.value_slots[:num_rows, :, start:end]

    def stored(self, which: int, x: torch.Tensor) -> torch.Tensor:
        """x as the slots hold it: quantized where they are fp8 (which: 0 for K, 1 for V)."""
        return x if self.scales is None else _to_fp8(x, self.scales[which])

    def store(self, slots: torch.Tensor, which: int, x: torch.Tensor) -> None:
        """x into the slots' region (a view)."""
        slots.copy_(self.stored(which, x))

    def show_static(self, rows: int, width: int, column: torch.Tensor) -> None:
        """A static-shape decode (slot_graphs.py) follows: it attends over the last `width` columns of the first
        `rows` slots and writes its column at the device index `column`; until then the model sees width - 1."""
        self.static = (rows, width, column)
        edge = self.key_slots.shape[2]
        self.keys = self.key_slots[:rows, :, edge - width : edge - 1]
        self.values = self.value_slots[:rows, :, edge - width : edge - 1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static is not None:  # every shape and address fixed, the column a tensor: a CUDA graph can hold it
            rows, width, column = self.static
            edge = self.key_slots.shape[2]
            for which, (slots, x) in enumerate(((self.key_slots, key_states), (self.value_slots, value_states))):
                x = self.stored(which, x)
                if self.scales is not None:  # fp8: index_copy_ has no float8 kernel; the bytes are the same
                    slots, x = slots.view(torch.uint8), x.view(torch.uint8)
                slots[:rows].index_copy_(2, column, x)
            self.keys, self.values = self.key_slots[:rows, :, edge - width :], self.value_slots[:rows, :, edge - width :]
            return self._attended()
        q, n, end = key_states.shape[-2], self.num_rows, self.end
        slots = (self.key_slots, self.value_slots) if self.stage is None else self.stage
        for which, (target, x) in enumerate(zip(slots, (key_states, value_states), strict=True)):
            self.store(target[:n, :, end : end + q], which, x)
            if self.stage is not None:  # one decode column (q = 1) out to the host, landed after the step syncs
                self.columns_out[which][:n].copy_(target[:n, :, end : end + q], non_blocking=True)
        self.end = end + q
        self.keys, self.values = (t[:n, :, self.start : self.end] for t in slots)
        return self._attended()

    def _attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the forward attends over: the stored views, or fp8 ones dequantized."""
        if self.scales is None:
            return self.keys, self.values
        like = self.key_slots if self.stage is None else self.stage[0]  # where the attended views point
        return tuple(self.scratch.dequantize(which, t, scale, like)
                     for which, (t, scale) in enumerate(zip((self.keys, self.values), self.scales, strict=True)))


class SlotBatch:
    """n rows in slots [0, n): each layer's K/V, the mask [n, end - start] and each row's next position.
    Same interface as PaddedBatch (the fallback for caches whose layers cannot be slotted)."""

    mergeable = True

    def __init__(self, first: PaddedBatch, *, max_rows: int, max_model_len: int, fp8: bool = False,
                 stream=None, expected_rows: int = 0, stats: StepStats | None = None):
        self.max_rows, self.max_model_len, self.stream = max_rows, max_model_len, stream
        self.stats = stats if stats is not None else StepStats()  # the engine's: where the host phases are timed
        self.host = stream is not None
        self.columns = slot_columns(max_model_len, self.host)
        device = first.mask.device
        grow = device.type != "cuda" or self.host
        # where slots grow: as many as the rows already in sight (running and pending) at once, since each growth
        # allocates (pinned, for host slots) and copies every layer's slots again
        rows = min(max_rows, max(CPU_INITIAL_ROWS, first.num_rows, expected_rows)) if grow else max_rows
        kv_dtype = torch.float8_e4m3fn if fp8 else None
        scratch = DequantScratch(first.cache.layers[0].keys.dtype)  # shared by the layers (fp8 slots use it)
        with self.stats.timed("slot_alloc"):  # device slots: the zero fills are queued, not timed
            slots = self._reserved(first, rows, kv_dtype) or [
                tuple(_zeros(t, rows, self.columns, kv_dtype, self.host) for t in (layer.keys, layer.values))
                for layer in first.cache.layers]
        scales = [None] * len(first.cache.layers)
        if fp8:
            with self.stats.timed("fp8_calibrate"):  # queued on the device: its launches only
                scales = [_calibrate(layer) for layer in first.cache.layers]
        self.layers = [SlotLayer(*kv, scale, layer.keys.dtype, scratch)
                       for kv, scale, layer in zip(slots, scales, first.cache.layers, strict=True)]
        self._host_buffers()
        self.cache = SlotCache()
        self.cache.layers = self.layers
        self.start = self.end = max_model_len
        self.num_row_moves = self.num_window_moves = 0  # rows copied into freed slots; window moves
        self.mask = first.mask[:0, :0]
        self.next_positions = first.next_positions[:0]
        self.extend(first)

    def _reserved(self, first: PaddedBatch, rows: int, kv_dtype: torch.dtype | None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Host slots the KVStream pinned at load (every row the budget allows), where their shapes fit."""
        if not self.host or not hasattr(self.stream, "take_slots"):
            return None
        keys = [layer.keys for layer in first.cache.layers]
        return self.stream.take_slots(rows, [(k.shape[1], self.columns, k.shape[3]) for k in keys],
                                      kv_dtype or keys[0].dtype)

    def restart(self, first: PaddedBatch) -> None:
        """This drained batch takes a fresh prefill's rows into its slots: no new allocation, and the decode graphs
        captured over these slots stay valid."""
        self.start = self.end = self.max_model_len
        self.mask, self.next_positions = first.mask[:0, :0], first.next_positions[:0]
        self.extend(first)

    @staticmethod
    def fits(batch: PaddedBatch) -> bool:
        """Whether every layer is a plain growing one holding [rows, heads, length, head_dim] K/V."""
        return all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
                   for layer in batch.cache.layers)

    @staticmethod
    def uniform(batch: PaddedBatch) -> bool:
        """Whether every layer's K/V has the same heads, head size and dtype (what one pair of stages holds)."""
        return len({(t.shape[1], t.shape[3], t.dtype) for layer in batch.cache.layers
                    for t in (layer.keys, layer.values)}) == 1

    @property
    def num_rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def slot_rows(self) -> int:
        """Rows the slots of every layer hold (a growth an OOM cut short leaves some layers' slots larger)."""
        return min(t.shape[0] for layer in self.layers for t in (layer.key_slots, layer.value_slots))

    def kv_bytes(self) -> int:
        """The slots' bytes (allocated, not only the active columns)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.key_slots, layer.value_slots))

    def extend(self, other: PaddedBatch) -> None:
        """Appends other's rows (a fresh prefill) in the next slots, their last prompt token at column end - 1."""
        n, m, p = self.num_rows, other.num_rows, other.length
        if n + m > self.slot_rows:
            self._grow(n + m)
        start = min(self.start, self.end - p)
        # into device slots the copies are queued (launches timed); into host slots they wait for the device
        with self.stats.timed("slot_join"):
            for mine, theirs in zip(self.layers, other.cache.layers, strict=True):
                mine.store(mine.key_slots[n : n + m, :, self.end - p : self.end], 0, theirs.keys)
                mine.store(mine.value_slots[n : n + m, :, self.end - p : self.end], 1, theirs.values)
        self.mask = torch.cat([_pad_left(self.mask, self.end - start), _pad_left(other.mask, self.end - start)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        self.start = start
        self._show()

    def before_decode(self) -> None:
        if self.stream is not None:
            self.stream.start(self)

    def advance(self, mask: torch.Tensor) -> None:
        """A decode step succeeded: its column is in every layer; move the window back if the edge is reached."""
        if self.stream is not None:
            self._land_columns()
        self.mask, self.next_positions = mask, self.next_positions + 1
        self.end += 1
        if self.end == self.columns:
            self._move_window()
        self._show()

    def select(self, rows: list[int]) -> list[int]:
        """Keeps these rows: kept rows past the new count move into the freed slots below it. Returns the old
        index of each row in its new slot order."""
        # timed up to the trim's read of the mask, which waits for the queued row copies on a device
        with self.stats.timed("row_select"):
            return self._select(rows)

    def _select(self, rows: list[int]) -> list[int]:
        keep = set(rows)
        holes = [i for i in range(len(rows)) if i not in keep]
        movers = [i for i in rows if i >= len(rows)]
        order = list(range(len(rows)))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self.num_row_moves += len(movers)
        if movers:
            src = torch.tensor(movers, device=self.layers[0].key_slots.device)
            dst = torch.tensor(holes, device=src.device)
            for layer in self.layers:
                for slots in (layer.key_slots, layer.value_slots):
                    slots[dst, :, self.start : self.end] = slots[src, :, self.start : self.end]
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask, self.next_positions = self.mask[index], self.next_positions[index]
        trim = int((self.mask.cumsum(-1) == 0).sum(-1).min()) if order else 0
        self.mask = self.mask[:, trim:]
        self.start += trim
        self._show()
        return order

    def crop(self) -> None:
        """Undoes the columns a failed forward wrote in some layers and not others."""
        if self.stream is not None:
            self.stream.stop()
            for layer in self.layers:
                layer.stage = None
        self._show()

    def _land_columns(self) -> None:
        """Host slots: the step's new column of every layer, from the pinned buffers into the slots."""
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the column copies out are asynchronous
        self.stream.stop()
        n = self.num_rows
        with self.stats.timed("kv_land"):  # after the sync above, which waits for the whole forward: not counted
            for layer in self.layers:
                for slots, column in zip((layer.key_slots, layer.value_slots), layer.columns_out, strict=True):
                    slots[:n, :, self.end : self.end + 1] = column[:n]
                layer.stage = None

    def _host_buffers(self) -> None:
        """Host slots: the pinned column buffers and the stream's device stages, sized to the slots."""
        if self.stream is None:
            return
        with self.stats.timed("kv_buffers"):
            for layer in self.layers:
                layer.columns_out = tuple(_zeros(t, t.shape[0], 1, t.dtype, True) for t in (layer.key_slots,
                                                                                           layer.value_slots))
            self.stream.allocate((self.layers[0].key_slots, self.layers[0].value_slots))

    def _show(self) -> None:
        for layer in self.layers:
            layer.show(self.num_rows, self.start, self.end)

    def _move_window(self) -> None:
        """Copies the active columns to end at max_model_len (a row never spans more, so they fit)."""
        width = self.end - self.start
        to = self.max_model_len - width
        with self.stats.timed("window_move"):  # device slots: queued copies, their launches timed; host: the copies
            for layer in self.layers:
                for slots in (layer.key_slots, layer.value_slots):
                    active = slots[: self.num_rows, :, self.start : self.end].clone()  # the ranges may overlap
                    slots[: self.num_rows, :, to : self.max_model_len] = active
        self.start, self.end = to, self.max_model_len
        self.num_window_moves += 1

    def _grow(self, needed: int) -> None:
        """Slots for `needed` rows (at least twice the rows now, within max_rows); slots already that large (grown
        before an OOM stopped the last growth) stay as they are."""
        rows = min(self.max_rows, max(needed, 2 * self.slot_rows))
        if needed > rows:
            raise ValueError(f"{needed} rows exceed the budget's {self.max_rows}")
        with self.stats.timed("slot_grow"):  # allocation (pinned for host slots) and the old rows copied over
            for layer in self.layers:  # one layer at a time: the peak is one layer's old slots beside the new ones
                for name in ("key_slots", "value_slots"):
                    old = getattr(layer, name)
                    if old.shape[0] >= rows:
                        continue
                    new = _zeros(old, rows, self.columns, old.dtype, self.host)
                    new[: self.num_rows] = old[: self.num_rows]
                    setattr(layer, name, new)
        self._host_buffers()


def _zeros(like: torch.Tensor, rows: int, columns: int, dtype: torch.dtype | None = None,
           host: bool = False) -> torch.Tensor:
    """Zeros, not empty: padding columns are masked, and a masked NaN would still poison eager softmax sums.
    host: in host memory, pinned where there is a GPU to copy to."""
    _, heads, _, head_dim = like.shape
    if host:  # allocated pinned: a pageable tensor then pinned would be written twice
        return torch.zeros(rows, heads, columns, head_dim, dtype=dtype or like.dtype,
                           pin_memory=torch.cuda.is_available())
    return torch.zeros(rows, heads, columns, head_dim, dtype=dtype or like.dtype, device=like.device)


def _calibrate(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V scales [1, kv_heads, 1, 1] from a prefill's K/V [rows, kv_heads, length, head_dim]."""
    return tuple((fp8_kv_scale(t.transpose(1, 2)) * KV_SCALE_MARGIN).view(1, -1, 1, 1)
                 for t in (layer.keys, layer.values))


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[1]
    return t if missing == 0 else torch.cat([t.new_zeros(t.shape[0], missing), t], dim=1)
