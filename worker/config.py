"""WorkerConfig: the worker side's settings, built once from the CLI's flags; it holds the EngineConfig whole."""

import math
import os
import socket
import uuid
from dataclasses import dataclass, field

from batchgen.jobs import defaults
from batchgen.worker.engine.config import EngineConfig


def default_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerConfig:
    engine_config: EngineConfig
    redis_url: str = defaults.REDIS_URL
    engine: str = "llm"  # "llm" | "echo"
    priorities: tuple[str, ...] = defaults.PRIORITIES
    burst: bool = False  # exit when the queues are empty (RQ's --burst)
    name: str = field(default_factory=default_name)
    worker_ttl_s: int = defaults.WORKER_TTL_S
    heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S
    shutdown_grace_s: float = defaults.SHUTDOWN_GRACE_S
    echo_step_delay_s: float = 0.0
    results_root: str | None = None  # batches' --output-dir must lie inside it; None: anywhere (trusted submitters)

    def __post_init__(self) -> None:
        if self.engine not in ("llm", "echo"):
            raise ValueError(f"unknown engine {self.engine!r}: use llm or echo")
        if not set(self.priorities) <= set(defaults.PRIORITIES) or not self.priorities:
            raise ValueError(f"priorities must be among {defaults.PRIORITIES}")
        # an interval of 0 spins the heartbeat thread; NaN passes every comparison below
        if not (0 < self.heartbeat_interval_s < math.inf and 0 <= self.shutdown_grace_s < math.inf):
            raise ValueError("heartbeat_interval_s must be a positive number of seconds, shutdown_grace_s a finite one")
        if self.heartbeat_interval_s * 2 >= self.worker_ttl_s:
            raise ValueError("worker_ttl_s must be more than twice heartbeat_interval_s")

    @property
    def served_name(self) -> str:
        """The model name batches ask for: --served-model-name, else --model."""
        return self.engine_config.served_model_name or self.engine_config.model
