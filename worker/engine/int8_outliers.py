"""LLM.int8()'s outlier columns, kept fixed so the int8 kernel stays capturable in CUDA graphs.

LLM.int8() runs every activation column holding an |x| of at least the threshold through fp16 weights and
the rest through int8. bitsandbytes finds those columns anew in every batch (a host sync and a
data-dependent shape); in real models they are the same few hidden channels in most tokens (Dettmers et
al., 2022), so here a calibration pass at load finds them per linear input and they stay fixed. A column
counts as an outlier feature as the paper defines one: it reaches the threshold systematically (on at least
SYSTEMATIC_RATE of the tokens), or it ever reaches MASSIVE_FACTOR × the threshold (the "massive activations"
a few tokens such as BOS carry). A column that crosses the threshold only now and then stays in int8: it
coarsens that one token's quantisation a little (benchmarks/quality.py measures it), while decomposing every
such column would send most of a wide input through the dense weights (a random model's down_proj input
crosses 6 somewhere in most of its columns, none of them systematically).

- `OutlierColumns`: one input's columns in fixed-size device buffers (a 0/1 keep mask, the column indices,
  and per owning linear the dequantised weight rows of those columns). Free slots point at column 0 with
  zero weights; adding a column writes the buffers in place, so captured graphs see it on their next replay.
- `OutlierGuard`: every forward records, per token, the largest |x| among the int8 columns and where it is
  (scatters into flat device buffers: the column's max and how many tokens had it at or above the
  threshold; no sync, fixed shapes). `poll(num_tokens)`, after a step is launched, queues a snapshot of
  which columns became outlier features (copied to the host, no sync) and adds those of an earlier snapshot the
  device has finished, for later steps, and logs them.
"""

import bisect
import logging
from collections.abc import Iterable
from typing import Protocol

import torch
from batchgen.worker.engine.kernels.int8_gemv import GuardBuffers, fold

log = logging.getLogger("batchgen.int8")

OUTLIER_SLACK = 8  # free slots per input for columns the guard finds after calibration
SYSTEMATIC_RATE = 0.02  # outlier features reach the threshold on >= 2% of the tokens (the paper counts 6%; 2% measured closer to bnb)
MASSIVE_FACTOR = 4.0  # |x| >= 4x the threshold: dense after a single token
GUARD_WINDOW_TOKENS = 4096  # the guard's rate is counted over windows of this many tokens
MAX_CALIBRATED_FRACTION = 1 / 4  # beyond this share of an input's columns, the largest ones only: bounds memory
SLOT_MULTIPLE = 8  # slot count rounded up: tensor-core friendly inner dimension for the dense matmul

# Prose, code, numbers and other scripts: outlier features show up on most tokens, a few hundred are plenty.
CALIBRATION_TEXT = """\
The committee met on Tuesday to review the budget for the coming year. After a long discussion about the costs
of the new library, the members agreed to postpone the decision until more information was available.
def merge(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        out.append(a[i] if a[i] <= b[j] else b[j]); i, j = (i + 1, j) if a[i] <= b[j] else (i, j + 1)
    return out + a[i:] + b[j:]
Q: What is 17 * 23? A: 391. Q: Name three rivers in Europe. A: The Danube, the Rhine and the Loire.
Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2, in the chloroplasts.
Le chat dort sur le canapé pendant que la pluie tombe. Der Zug nach Berlin fährt um 14:35 Uhr ab. 東京は日本の首都です。
{"id": 42, "name": "widget", "price": 9.99, "tags": ["blue", "small"], "in_stock": true}
Dear Sir or Madam, I am writing to enquire about the position advertised on your website last week.
"""


def calibration_ids(tokenizer, device: torch.device, *, num_seqs: int = 4, seq_len: int = 128) -> torch.Tensor:
    """[num_seqs, seq_len] token ids: windows of CALIBRATION_TEXT, each starting as a prompt does (BOS)."""
    ids = list(tokenizer(CALIBRATION_TEXT, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (bos is not None)
    while len(ids) < body * num_seqs:
        ids = ids + ids
    stride = max(1, (len(ids) - body) // max(1, num_seqs - 1))
    rows = [([bos] if bos is not None else []) + ids[i * stride:i * stride + body] for i in range(num_seqs)]
    return torch.tensor(rows, dtype=torch.long, device=device)


class DenseOwner(Protocol):
    """A linear that keeps dequantised weight rows for the outlier columns of its input."""

    def fill_dense(self, slots: torch.Tensor, columns: torch.Tensor) -> None: ...


class OutlierColumns:
    """The outlier columns of one linear input (q/k/v share one; gate/up share one)."""

    def __init__(self, in_features: int, threshold: float, device: torch.device):
        if threshold <= 0:
            raise ValueError("outlier columns need a threshold > 0 (threshold 0 is int_mm)")
        self.in_features, self.threshold = in_features, threshold
        self.keep = torch.ones(in_features, dtype=torch.float16, device=device)  # 0 where the column is dense
        self.idx = torch.zeros(0, dtype=torch.long, device=device)
        self.seen = torch.zeros(in_features, dtype=torch.float32, device=device)  # max |x| in the int8 columns
        self.hits = torch.zeros(in_features, dtype=torch.float32, device=device)  # tokens with |x| >= threshold
        self.num_tokens = 0  # calibration: the tokens observed
        self.columns: list[int] = []
        self.owners: list[DenseOwner] = []
        self.calibrating = False
        self.warned_full = False
        # the dense product runs before the first column too (over zero rows): the linears' path never changes, so
        # graphs captured once stay valid (small VRAM's piecewise graphs cannot be captured again mid-run)
        self.fixed_path = False

    @property
    def dense_path(self) -> bool:
        """Whether the linears add the outlier columns' dense product."""
        return self.fixed_path or bool(self.columns)

    @property
    def capacity(self) -> int:
        return self.idx.numel()

    def resize(self, capacity: int) -> None:
        """Before capture only: fresh buffers (the owners reallocate their dense rows when they attach)."""
        self.idx = torch.zeros(capacity, dtype=torch.long, device=self.keep.device)
        self.keep.fill_(1)
        self.columns = []

    def observe(self, x: torch.Tensor) -> None:
        """Calibration: the largest |x| of every column over x [m, in_features] and how often it reaches the
        threshold."""
        ax = x.detach().abs().float()
        torch.maximum(self.seen, ax.amax(dim=0), out=self.seen)
        self.hits += (ax >= self.threshold).sum(dim=0)
        self.num_tokens += ax.shape[0]

    def record(self, absmax: torch.Tensor, argmax: torch.Tensor) -> None:
        """The guard, per forward: each token's largest int8-column |x| at its column, and a hit there when it
        reaches the threshold (capturable, no sync)."""
        fold(GuardBuffers(self.keep, self.seen, self.hits, self.threshold), absmax, argmax)

    def add(self, columns: Iterable[int]) -> list[int]:
        """Routes columns through the dense weights from now on (in place); returns those that fit."""
        new = [c for c in dict.fromkeys(columns) if c not in self.columns]
        free = self.capacity - len(self.columns)
        if len(new) > free and not self.warned_full:
            self.warned_full = True
            log.warning("int8: %d outlier columns of an input of %d found no free slot (capacity %d); they stay "
                        "in int8", len(new) - free, self.in_features, self.capacity)
        new = new[:free]
        if not new:
            return []
        device = self.keep.device
        slots = torch.arange(len(self.columns), len(self.columns) + len(new), device=device)
        cols = torch.tensor(new, dtype=torch.long, device=device)
        for owner in self.owners:
            owner.fill_dense(slots, cols)
        self.idx[slots] = cols
        self.keep[cols] = 0
        self.columns.extend(new)
        return new

    def calibrated_columns(self) -> list[int]:
        """The outlier features seen while calibrating (systematic or massive), largest first."""
        cols = torch.nonzero(outlier_features(self.seen, self.hits, max(1, self.num_tokens), self.threshold)).flatten()
        cols = cols[self.seen[cols].argsort(descending=True)].tolist()
        limit = max(1, int(self.in_features * MAX_CALIBRATED_FRACTION))
        if len(cols) > limit:
            log.warning("int8: %d of %d input columns are outlier features; the %d largest go through the dense "
                        "weights", len(cols), self.in_features, limit)
        return cols[:limit]


def outlier_features(seen: torch.Tensor, hits: torch.Tensor, num_tokens: int, threshold: float) -> torch.Tensor:
    """Bool mask of the columns that are outlier features over num_tokens tokens."""
    return (hits >= max(1.0, SYSTEMATIC_RATE * num_tokens)) | (seen >= MASSIVE_FACTOR * threshold)


def slots_for(num_columns: int) -> int:
    return -(-(num_columns + OUTLIER_SLACK) // SLOT_MULTIPLE) * SLOT_MULTIPLE


class OutlierGuard:
    """Every input's `seen` and `hits` as views of two flat buffers: one comparison tells whether any int8 column of
    any linear became an outlier feature: massive since the last snapshot, or systematic over the current window of
    GUARD_WINDOW_TOKENS tokens.

    The comparison is a snapshot queued on the current stream (the mask and whether it holds any column, copied to
    pinned host memory, then the counters reset), read once the device has reached it: on CUDA nothing waits for
    the device, so columns are added a poll or more after the step that showed them. At most one snapshot is
    pending; off CUDA every copy is synchronous and a snapshot is read at once."""

    def __init__(self, inputs: list[OutlierColumns], threshold: float):
        self.inputs, self.threshold = inputs, threshold
        self.offsets = [0]
        for o in inputs:
            self.offsets.append(self.offsets[-1] + o.in_features)
        device = inputs[0].keep.device if inputs else torch.device("cpu")
        self.seen = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        self.hits = torch.zeros(self.offsets[-1], dtype=torch.float32, device=device)
        for o, start in zip(inputs, self.offsets, strict=False):
            o.seen = self.seen[start:start + o.in_features]
            o.hits = self.hits[start:start + o.in_features]
        pin = device.type == "cuda"  # non_blocking copies into pageable memory would sync
        self.found_host = torch.zeros(self.offsets[-1], dtype=torch.bool, pin_memory=pin)  # the last snapshot's mask
        self.any_host = torch.zeros((), dtype=torch.bool, pin_memory=pin)
        self.event: torch.cuda.Event | None = torch.cuda.Event() if pin else None  # recorded after the copies
        self.pending = False  # a snapshot queued and not read
        self.num_tokens = 0  # in the current window
        self.num_added = 0
        self.num_opened = 0  # inputs that got their first column from the guard

    @property
    def num_columns(self) -> int:
        return sum(len(o.columns) for o in self.inputs)

    def poll(self, num_tokens: int) -> int:
        """After a step over num_tokens tokens was launched: adds the columns of the pending snapshot if the device
        has reached it, then queues the next snapshot if none is pending. Returns how many columns were added (off
        CUDA, this call's own snapshot's). A systematic column is judged once its window is full."""
        if not self.inputs:
            return 0
        self.num_tokens += num_tokens
        added = self.read()
        if not self.pending:
            self.snapshot()
            added += self.read()  # off CUDA it is there already
        return added

    def snapshot(self) -> None:
        """Queues on the current stream, without a sync: the columns found since the last snapshot (massive) or over
        the window once it is full (systematic), copied to the host; then the counters reset for what follows."""
        window_full = self.num_tokens >= GUARD_WINDOW_TOKENS
        if window_full:
            found = outlier_features(self.seen, self.hits, self.num_tokens, self.threshold)
        else:
            found = self.seen >= MASSIVE_FACTOR * self.threshold
        self.found_host.copy_(found, non_blocking=True)
        self.any_host.copy_(found.any(), non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True
        if window_full:
            self.hits.zero_()
            self.num_tokens = 0
        self.seen.zero_()

    def read(self, *, wait: bool = False) -> int:
        """Adds the pending snapshot's columns if the device has reached it (wait: waits until it has); returns how
        many were added."""
        if not self.pending:
            return 0
        if self.event is not None:
            if wait:
                self.event.synchronize()
            elif not self.event.query():
                return 0
        self.pending = False
        if not self.any_host.item():
            return 0
        return self._add(torch.nonzero(self.found_host).flatten().tolist())

    def flush(self) -> int:
        """Reads the pending snapshot, waiting for the device (tests; callers that want the columns in place now)."""
        return self.read(wait=True)

    def restart(self) -> None:
        """Forgets every record and any snapshot not read: an engine's start-up passes (the budget's measurement,
        graph captures over placeholder rows, the warm-up's prompts cut from the calibration text that calibration
        already judged) are not traffic. A stale copy still in flight lands before the next snapshot's (one stream)."""
        self.pending = False
        self.seen.zero_()
        self.hits.zero_()
        self.num_tokens = 0

    def _add(self, hits: list[int]) -> int:
        """The flat column indices found, added to their inputs; logs them and returns how many were added."""
        by_input: dict[int, list[int]] = {}
        for flat in hits:
            i = bisect.bisect_right(self.offsets, flat) - 1
            by_input.setdefault(i, []).append(flat - self.offsets[i])
        added = 0
        for i, cols in by_input.items():
            self.num_opened += not self.inputs[i].columns
            new = self.inputs[i].add(cols)
            if new:
                log.info("int8: new outlier columns %s at input %d of %d; %d kept in %s now",
                         new, i, len(self.inputs), len(self.inputs[i].columns), "the dense weights")
            added += len(new)
        self.num_added += added
        return added
