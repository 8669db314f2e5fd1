"""WorkerConfig: one dataclass for the worker side, filled from CLI flags and BATCHGEN_* env."""

import os
import socket
import uuid
from dataclasses import dataclass, field

from batchgen.jobs import defaults


@dataclass
class WorkerConfig:
    model: str
    served_model_name: str | None = None  # the name batches ask for; defaults to `model`
    redis_url: str = field(default_factory=lambda: os.environ.get("REDIS_URL", defaults.REDIS_URL))
    engine: str = "llm"  # "llm" | "echo"
    priorities: tuple[str, ...] = defaults.PRIORITIES
    burst: bool = False  # exit when the queues are empty (RQ's --burst)
    name: str = field(default_factory=lambda: f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    device: str = "auto"
    vram_reserve_bytes: int = defaults.VRAM_RESERVE_BYTES
    max_vram_bytes: int | None = None
    max_batch_size: int | None = None
    max_model_len: int | None = None
    load_in_8bit: bool = True
    int8_threshold: float = 6.0
    worker_ttl_s: int = defaults.WORKER_TTL_S
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S
    shutdown_grace_s: float = defaults.SHUTDOWN_GRACE_S
    echo_step_delay_s: float = 0.0
    inject_oom: str | None = field(default_factory=lambda: os.environ.get("BATCHGEN_INJECT_OOM"))

    def __post_init__(self) -> None:
        if self.engine not in ("llm", "echo"):
            raise ValueError(f"unknown engine {self.engine!r}: use llm or echo")
        if not set(self.priorities) <= set(defaults.PRIORITIES) or not self.priorities:
            raise ValueError(f"priorities must be among {defaults.PRIORITIES}")
        if self.heartbeat_interval_s * 2 >= self.worker_ttl_s:
            raise ValueError("worker_ttl_s must be more than twice heartbeat_interval_s")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model
