"""The batch record: an OpenAI-style batch object, stored flat in one Redis hash."""

import json
from collections.abc import Mapping
from typing import Any

from batchgen.jobs.defaults import MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS
from batchgen.jobs.states import BatchStatus, Outcome
from pydantic import BaseModel

TIMESTAMP_FIELDS = (
    "created_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "cancelling_at",
    "cancelled_at",
    "expired_at",
    "expires_at",
)
COUNTER_FIELDS = tuple(o.counter for o in Outcome)
USAGE_FIELDS = ("usage.input_tokens", "usage.output_tokens")  # summed over succeeded requests as they are recorded
RESULT_TTL_FIELD = "result_ttl_s"  # read by the store's record script, which prefers it to the default TTL


def metadata_problem(metadata: Mapping[str, str]) -> str | None:
    """What breaks OpenAI's metadata limits, else None; the one check of submit (CLI, Python API) and serve."""
    if len(metadata) > MAX_METADATA_PAIRS:
        return f"metadata: at most {MAX_METADATA_PAIRS} key-value pairs, not {len(metadata)}"
    for key, value in metadata.items():
        shown = repr(key) if len(key) <= MAX_METADATA_KEY_CHARS else f"{key[:MAX_METADATA_KEY_CHARS]!r}..."
        if len(key) > MAX_METADATA_KEY_CHARS:
            return f"metadata: key {shown} has {len(key)} characters; at most {MAX_METADATA_KEY_CHARS}"
        if len(value) > MAX_METADATA_VALUE_CHARS:
            return f"metadata: the value of {shown} has {len(value)} characters; at most {MAX_METADATA_VALUE_CHARS}"
    return None


class Batch(BaseModel):
    id: str
    status: BatchStatus
    model: str
    endpoint: str = ""
    priority: str = "default"
    queue: str = ""
    output_dir: str | None = None
    input_file: str = ""
    total: int = 0
    num_chunks: int = 0
    chunk_size: int = 0
    counts: dict[str, int] = {}
    timestamps: dict[str, int] = {}
    metadata: dict[str, str] = {}
    input_file_id: str = ""  # the uploaded file a batch made through serve reads
    completion_window: str = ""  # as an API client wrote it; else it follows from expires_at
    errors: list[dict[str, Any]] = []  # lines --skip-invalid rejected, as OpenAI BatchErrors
    input_tokens: int = 0  # of the succeeded requests so far
    output_tokens: int = 0
    result_ttl_s: int = 0  # the API's output_expires_after: its keys' TTL once it ends; 0: the store's default

    @property
    def num_done(self) -> int:
        return sum(self.counts.get(f, 0) for f in COUNTER_FIELDS)

    @property
    def request_counts(self) -> dict[str, int]:
        """OpenAI's {total, completed, failed}; failed covers errored, cancelled and expired requests."""
        completed = self.counts.get(Outcome.SUCCEEDED.counter, 0)
        return {"total": self.total, "completed": completed, "failed": self.num_done - completed}

    @property
    def usage(self) -> dict[str, Any]:
        """OpenAI's BatchUsage; no prompt cache and no reasoning tokens here, so their details are 0."""
        return {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens}

    def to_hash(self) -> dict[str, str | int]:
        data: dict[str, str | int] = {
            "id": self.id,
            "status": self.status.value,
            "model": self.model,
            "endpoint": self.endpoint,
            "priority": self.priority,
            "queue": self.queue,
            "output_dir": self.output_dir or "",
            "input_file": self.input_file,
            "total": self.total,
            "num_chunks": self.num_chunks,
            "chunk_size": self.chunk_size,
        }
        data.update({f: self.counts.get(f, 0) for f in COUNTER_FIELDS})
        data.update(self.timestamps)
        data.update({f"meta.{k}": v for k, v in self.metadata.items()})
        if self.result_ttl_s:
            data[RESULT_TTL_FIELD] = self.result_ttl_s
        return data

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> "Batch":
        return cls(
            id=raw["id"],
            status=BatchStatus(raw["status"]),
            model=raw["model"],
            endpoint=raw.get("endpoint", ""),
            priority=raw.get("priority", "default"),
            queue=raw.get("queue", ""),
            output_dir=raw.get("output_dir") or None,
            input_file=raw.get("input_file", ""),
            total=int(raw.get("total", 0)),
            num_chunks=int(raw.get("num_chunks", 0)),
            chunk_size=int(raw.get("chunk_size", 0)),
            counts={f: int(raw.get(f, 0)) for f in COUNTER_FIELDS},
            timestamps={f: int(raw[f]) for f in TIMESTAMP_FIELDS if raw.get(f)},
            metadata={k[5:]: v for k, v in raw.items() if k.startswith("meta.")},
            input_file_id=raw.get("api.input_file_id", ""),
            completion_window=raw.get("api.completion_window", ""),
            errors=json.loads(raw["api.errors"]) if raw.get("api.errors") else [],
            input_tokens=int(raw.get(USAGE_FIELDS[0], 0)),
            output_tokens=int(raw.get(USAGE_FIELDS[1], 0)),
            result_ttl_s=int(raw.get(RESULT_TTL_FIELD, 0)),
        )
