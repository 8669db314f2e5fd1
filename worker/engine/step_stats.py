"""StepStats: where an engine's time goes, step by step (both engine paths keep one; benchmarks read it)."""

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

STEP_LOG_INTERVAL_S = 30.0

log = logging.getLogger("batchgen.engine")


@dataclass
class StepStats:
    """Where the engine's time goes: forward + sampling per step (it ends in a host sync, so this is GPU
    time plus launch overhead); the worker's wall time minus this is queue and bookkeeping time."""

    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_rows: int = 0
    num_overlapped_steps: int = 0  # decode steps queued before the previous one was read
    num_overlapped_prefills: int = 0  # prefill steps launched before being read (--overlap-prefill)
    num_queued_refills: int = 0  # of those, launched behind a decode step still running (a refill of freed rows)
    num_mixed_steps: int = 0  # prefill steps that also decoded the running rows (--mixed-steps), and those rows
    num_mixed_rows: int = 0
    # What rows held over the run: the widest decode step, KV tokens and blocks in use summed over decode steps
    # (of num_kv_blocks in the pool: 0 without paging)
    num_kv_blocks: int = 0
    max_decode_batch: int = 0
    sum_kv_tokens: int = 0
    num_rows_computed: int = 0  # rows the decode steps computed: the running ones and the holes below the highest
    sum_kv_blocks_used: int = 0
    max_kv_blocks_used: int = 0
    # Named host phases (timed(), add_host()): seconds and counts by name. Those run inside a step are part of its
    # prefill_s/decode_s and kept apart (step_host_*), so a run's wall time less prefill_s, decode_s and host_s is
    # what nothing timed.
    host_s: dict[str, float] = field(default_factory=dict)
    host_n: dict[str, int] = field(default_factory=dict)
    step_host_s: dict[str, float] = field(default_factory=dict)
    step_host_n: dict[str, int] = field(default_factory=dict)
    engine_s: float = 0.0  # inside the engine's add() and step() calls (where the engine times it)
    last_log: float = field(default_factory=time.monotonic)
    _in_step: bool = field(default=False, init=False, repr=False)
    _nested: list[float] = field(default_factory=list, init=False, repr=False)  # open phases' inner seconds

    def add(self, seconds: float, num_rows: int, num_prefill_tokens: int, num_kv_tokens: int = 0,
            num_kv_blocks_used: int = 0, overlapped: bool = False, num_mixed_rows: int = 0) -> None:
        """One step: its rows; a decode step's KV tokens held (the rows' tokens) and blocks in use (paged); a
        prefill step's rows decoded in the same forward (a mixed step)."""
        if num_prefill_tokens:
            self.num_prefill_steps += 1
            self.prefill_s += seconds
            self.num_prefill_tokens += num_prefill_tokens
            self.num_overlapped_prefills += overlapped
            self.num_mixed_steps += bool(num_mixed_rows)
            self.num_mixed_rows += num_mixed_rows
        else:
            self.num_decode_steps += 1
            self.decode_s += seconds
            self.num_decode_rows += num_rows
            self.num_overlapped_steps += overlapped
            self.max_decode_batch = max(self.max_decode_batch, num_rows)
            self.sum_kv_tokens += num_kv_tokens
            self.sum_kv_blocks_used += num_kv_blocks_used
            self.max_kv_blocks_used = max(self.max_kv_blocks_used, num_kv_blocks_used)
        if time.monotonic() - self.last_log > STEP_LOG_INTERVAL_S:
            self.last_log = time.monotonic()
            log.info("engine steps: %s", json.dumps(self.as_stats()))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Times a named phase of host work, less the phases nested in it (so the names never overlap). Host time
        only: perf_counter and no device sync, so a phase that queues GPU work counts its launches, not that work."""
        self._nested.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.add_host(name, elapsed - self._nested.pop(), nested=elapsed)

    def add_host(self, name: str, seconds: float, *, nested: float | None = None) -> None:
        """seconds of phase `name` (measured elsewhere, e.g. a graph capture); nested: the time an enclosing phase
        should not count again (default: seconds)."""
        if self._nested:
            self._nested[-1] += seconds if nested is None else nested
        total, count = (self.step_host_s, self.step_host_n) if self._in_step else (self.host_s, self.host_n)
        total[name] = total.get(name, 0.0) + seconds
        count[name] = count.get(name, 0) + 1

    @contextmanager
    def stepping(self) -> Iterator[None]:
        """A step's timed region: the phases inside it go to step_host_* (its prefill_s/decode_s hold them)."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    @contextmanager
    def engine_call(self) -> Iterator[None]:
        """One call into the engine (add, step): engine_s, what a caller's wall time less it spent outside."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.engine_s += time.perf_counter() - start

    def as_stats(self) -> dict[str, float | int | dict[str, float | int]]:
        steps = max(1, self.num_decode_steps)
        return {
            "num_prefill_steps": self.num_prefill_steps, "num_decode_steps": self.num_decode_steps,
            "num_overlapped_steps": self.num_overlapped_steps,
            "num_overlapped_prefills": self.num_overlapped_prefills, "num_queued_refills": self.num_queued_refills,
            "num_mixed_steps": self.num_mixed_steps, "num_mixed_rows": self.num_mixed_rows,
            "prefill_s": round(self.prefill_s, 3), "decode_s": round(self.decode_s, 3),
            "num_prefill_tokens": self.num_prefill_tokens,
            "mean_decode_batch": round(self.num_decode_rows / steps, 1),
            "mean_decode_rows_computed": round(self.num_rows_computed / steps, 1),
            "max_decode_batch": self.max_decode_batch,
            "mean_kv_tokens": round(self.sum_kv_tokens / steps, 1),
            "mean_kv_blocks_used": round(self.sum_kv_blocks_used / steps, 1),
            "max_kv_blocks_used": self.max_kv_blocks_used, "num_kv_blocks": self.num_kv_blocks,
            "decode_ms_per_step": round(1000 * self.decode_s / max(1, self.num_decode_steps), 2),
            "host_s": _rounded(self.host_s), "host_n": dict(self.host_n),
            "step_host_s": _rounded(self.step_host_s), "step_host_n": dict(self.step_host_n),
            **({"engine_s": round(self.engine_s, 3)} if self.engine_s else {}),
        }


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(s, 4) for name, s in sorted(seconds.items())}
