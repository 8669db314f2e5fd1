"""ProducerConfig: one dataclass for the producer side, filled from CLI flags and env (REDIS_URL, BATCHGEN_*)."""

import os
from dataclasses import dataclass, field

from batchgen.jobs import defaults


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(f"BATCHGEN_{name}", default))


@dataclass
class ProducerConfig:
    redis_url: str = field(default_factory=lambda: os.environ.get("REDIS_URL", defaults.REDIS_URL))
    max_requests: int = field(default_factory=lambda: _env_int("MAX_REQUESTS", defaults.MAX_REQUESTS_PER_BATCH))
    max_line_bytes: int = field(default_factory=lambda: _env_int("MAX_LINE_BYTES", defaults.MAX_LINE_BYTES))
    max_tokens_limit: int = field(default_factory=lambda: _env_int("MAX_TOKENS_LIMIT", defaults.MAX_TOKENS_LIMIT))
    chunk_size: int = field(default_factory=lambda: _env_int("CHUNK_SIZE", defaults.CHUNK_SIZE))
    completion_window_s: int = field(
        default_factory=lambda: _env_int("COMPLETION_WINDOW_S", defaults.COMPLETION_WINDOW_S))

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_line_bytes", "max_tokens_limit", "chunk_size", "completion_window_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
