"""StepStats: where an engine's time goes, step by step (both engine paths keep one; benchmarks read it)."""

import json
import logging
import time
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
    # What rows held over the run: the widest decode step, KV tokens and blocks in use summed over decode steps
    # (of num_kv_blocks in the pool: 0 without paging)
    num_kv_blocks: int = 0
    max_decode_batch: int = 0
    sum_kv_tokens: int = 0
    sum_kv_blocks_used: int = 0
    max_kv_blocks_used: int = 0
    last_log: float = field(default_factory=time.monotonic)

    def add(self, seconds: float, num_rows: int, num_prefill_tokens: int, num_kv_tokens: int = 0,
            num_kv_blocks_used: int = 0, overlapped: bool = False) -> None:
        """One step: its rows; a decode step's KV tokens held (the rows' tokens) and blocks in use (paged)."""
        if num_prefill_tokens:
            self.num_prefill_steps += 1
            self.prefill_s += seconds
            self.num_prefill_tokens += num_prefill_tokens
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

    def as_stats(self) -> dict[str, float | int]:
        steps = max(1, self.num_decode_steps)
        return {
            "num_prefill_steps": self.num_prefill_steps, "num_decode_steps": self.num_decode_steps,
            "num_overlapped_steps": self.num_overlapped_steps,
            "prefill_s": round(self.prefill_s, 3), "decode_s": round(self.decode_s, 3),
            "num_prefill_tokens": self.num_prefill_tokens,
            "mean_decode_batch": round(self.num_decode_rows / steps, 1),
            "max_decode_batch": self.max_decode_batch,
            "mean_kv_tokens": round(self.sum_kv_tokens / steps, 1),
            "mean_kv_blocks_used": round(self.sum_kv_blocks_used / steps, 1),
            "max_kv_blocks_used": self.max_kv_blocks_used, "num_kv_blocks": self.num_kv_blocks,
            "decode_ms_per_step": round(1000 * self.decode_s / max(1, self.num_decode_steps), 2),
        }
