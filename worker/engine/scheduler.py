"""The request pool and row planner: pure Python, no torch.

Rows are slots of the preallocated KV cache. Each step admits pending sequences into the lowest free
rows (so active rows stay packed at the front and a decode step runs over rows [0, hi)), up to the
current max batch size and a prefill token budget. An OOM halves the max batch size and sends the
rows at or above the new limit back to the front of the pending queue.

With a block pool (a paged KV cache) a sequence is admitted only if the blocks for its prompt + max_tokens
are free, so admission is limited by the tokens rows can really reach, not by max_model_len × rows; a row
gives its blocks back when it finishes, is aborted or requeued.
"""

import logging
from collections import deque
from collections.abc import Iterable
from itertools import islice

from batchgen.worker.engine.kv_blocks import BlockPool
from batchgen.worker.engine.sequence import SeqStatus, Sequence

log = logging.getLogger("batchgen.engine")

ADMIT_GROUP_DIVISOR = 8  # prefill once 1/8 of the rows are free


class Scheduler:
    def __init__(self, max_rows: int, *, max_prefill_tokens: int, prefetch: int | None = None,
                 blocks: BlockPool | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_rows = max_rows  # rows the KV cache holds
        self.max_batch_size = max_rows  # current limit; shrinks on OOM
        self.max_prefill_tokens = max_prefill_tokens
        self.prefetch = prefetch if prefetch is not None else max(2, max_rows // 4)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # row -> sequence
        self.blocks = blocks  # None: every row holds max_model_len tokens of its own
        self._num_added = 0

    def add(self, seq: Sequence) -> None:
        seq.status, seq.arrival = SeqStatus.WAITING, self._num_added
        self._num_added += 1
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_free_rows(self) -> int:
        return max(0, self.max_batch_size - len(self.running))

    @property
    def num_admittable(self) -> int:
        """Sequences a prefill could take now: free rows; with a block pool, no more than its free blocks hold
        at the running rows' mean reservation (a full row's while none runs)."""
        if self.blocks is None:
            return self.num_free_rows
        per_row = self.blocks.num_used / len(self.running) if self.running else self.blocks.max_blocks_per_row
        return min(self.num_free_rows, int(self.blocks.num_free / max(1.0, per_row)))

    @property
    def num_wanted(self) -> int:
        """Admittable sequences plus a small prefetch margin, minus what is already pending."""
        return max(0, self.num_admittable + self.prefetch - len(self.waiting))

    @property
    def next_prefill_is_full(self) -> bool:
        """Whether the pending sequences fill a prefill step: every row it could admit, or its token budget."""
        if len(self.waiting) >= self.num_admittable:
            return True
        return sum(s.num_prompt_tokens for s in self.waiting) >= self.max_prefill_tokens

    def num_kv_tokens(self, seq: Sequence) -> int:
        """Tokens a sequence can reach: what its blocks are reserved for."""
        return seq.num_prompt_tokens + seq.params.max_tokens

    def free_rows(self) -> list[int]:
        return [r for r in range(self.max_batch_size) if r not in self.running]

    @property
    def min_admit(self) -> int:
        """Sequences worth a prefill while others decode: an eager prefill step costs its launches whatever its
        size, so refilling one freed row per step would spend most of the time there."""
        return max(1, self.max_batch_size // ADMIT_GROUP_DIVISOR)

    def wants_admission(self, freeing: int = 0) -> bool:
        """Whether admit() would take anything in now (its rule, without moving anything), or once `freeing` of
        the running rows have ended."""
        if not self.waiting:
            return False
        return len(self.running) <= freeing or (self.num_free_rows + freeing >= min(len(self.waiting), self.min_admit)
                                                and self._enough_free_blocks())

    def admit(self, max_tokens: int | None = None) -> list[Sequence]:
        """Moves pending sequences into free rows, lowest row first, within the prefill token budget (max_tokens:
        a smaller one, e.g. what a mixed step's decode rows leave of it; the first one is always admitted, so a
        long prompt cannot starve). While rows are decoding, waits until min_admit rows (or every pending
        sequence) can be admitted together."""
        if not self.wants_admission():
            return []
        budget = self.max_prefill_tokens if max_tokens is None else max_tokens
        admitted: list[Sequence] = []
        num_tokens = 0
        for row in self.free_rows():
            if not self.waiting:
                break
            seq = self.waiting[0]
            if admitted and num_tokens + seq.num_prompt_tokens > budget:
                break
            if self.blocks is not None:
                if not self.blocks.can_reserve(self.num_kv_tokens(seq)):
                    break
                self.blocks.reserve(row, self.num_kv_tokens(seq))
            self.waiting.popleft()
            seq.row, seq.status = row, SeqStatus.RUNNING
            self.running[row] = seq
            admitted.append(seq)
            num_tokens += seq.num_prompt_tokens
        return admitted

    def _enough_free_blocks(self) -> bool:
        """A block pool's share of min_admit: free blocks for the next min_admit pending sequences, or for
        1/ADMIT_GROUP_DIVISOR of the pool, whichever is less."""
        if self.blocks is None:
            return True
        head = islice(self.waiting, self.min_admit)
        needed = sum(self.blocks.blocks_for(self.num_kv_tokens(s)) for s in head)
        return self.blocks.num_free >= min(needed, self.blocks.num_blocks // ADMIT_GROUP_DIVISOR)

    def _release(self, row: int) -> None:
        del self.running[row]
        if self.blocks is not None:
            self.blocks.release(row)

    def compact(self) -> dict[int, int]:
        """With a block pool: moves the sequences of the highest rows into the lowest free ones, so that the running
        rows are [0, len(running)) again and a decode step computes no holes (the rows finished since the last
        step leave them anywhere). Only block-table rows move. Returns {old row: new row}."""
        moves: dict[int, int] = {}
        if self.blocks is None:
            return moves
        holes = iter(self.free_rows())
        for top in sorted(self.running, reverse=True):
            if top < len(self.running):
                break
            hole = next(holes)
            seq = self.running.pop(top)
            self.blocks.move(top, hole)
            seq.row, self.running[hole] = hole, seq
            moves[top] = hole
        return moves

    def running_seqs(self) -> list[Sequence]:
        return [self.running[r] for r in sorted(self.running)]

    @property
    def num_decode_rows(self) -> int:
        """Rows a decode step covers: [0, highest running row]; holes are computed and ignored."""
        return max(self.running) + 1 if self.running else 0

    def finish(self, seq: Sequence, reason: str | None) -> None:
        if seq.row is not None and self.running.get(seq.row) is seq:
            self._release(seq.row)
        seq.row, seq.status, seq.finish_reason = None, SeqStatus.FINISHED, reason

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        """Restarts running sequences and puts them back among the pending ones in arrival order
        (they arrived before anything still pending, so in practice: at the front)."""
        for seq in seqs:
            if seq.row is not None and self.running.get(seq.row) is seq:
                self._release(seq.row)
            seq.restart()
            self.waiting.append(seq)
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.arrival))

    def shrink(self, also_requeue: Iterable[Sequence] = ()) -> list[Sequence]:
        """Halves the max batch size (min 1) after an OOM and restarts the rows at or above the new limit,
        plus also_requeue (e.g. the sequences of a failed prefill); returns every sequence sent back."""
        self.max_batch_size = max(1, self.max_batch_size // 2)
        evicted = [s for r, s in self.running.items() if r >= self.max_batch_size]
        evicted += [s for s in also_requeue if s.status == SeqStatus.RUNNING and s not in evicted]
        self.requeue(evicted)
        log.warning("out of GPU memory: a batch holds at most %d rows now; %d start again", self.max_batch_size,
                    len(evicted))
        return evicted

    def abort(self, keys: Iterable[str]) -> list[Sequence]:
        keys = set(keys)
        dropped = [s for s in self.waiting if s.key in keys]
        self.waiting = deque(s for s in self.waiting if s.key not in keys)
        for row, seq in list(self.running.items()):
            if seq.key in keys:
                self._release(row)
                dropped.append(seq)
        for seq in dropped:
            seq.row, seq.status = None, SeqStatus.FINISHED
        return dropped
