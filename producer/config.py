"""ProducerConfig: the producer side's settings, built once from the CLI's flags (which read REDIS_URL, BATCHGEN_*)."""

from dataclasses import dataclass

from batchgen.jobs import defaults


@dataclass
class ProducerConfig:
    redis_url: str = defaults.REDIS_URL
    max_requests: int = defaults.MAX_REQUESTS_PER_BATCH
    max_line_bytes: int = defaults.MAX_LINE_BYTES
    max_tokens_limit: int = defaults.MAX_TOKENS_LIMIT
    chunk_size: int = defaults.CHUNK_SIZE
    completion_window_s: int = defaults.COMPLETION_WINDOW_S

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_line_bytes", "max_tokens_limit", "chunk_size", "completion_window_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
