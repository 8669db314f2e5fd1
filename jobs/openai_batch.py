"""Our Batch as OpenAI's `Batch` object, plus the two fields only the HTTP API knows about.

input_file_id and completion_window live as `api.*` fields of the batch record itself, so they share its
TTL and `Batch.from_hash` (which ignores unknown fields) is untouched.
"""

from typing import Any

from batchgen.jobs import keys
from batchgen.jobs.batch import TIMESTAMP_FIELDS, Batch
from batchgen.jobs.files import errors_file_id, output_file_id
from batchgen.jobs.states import BatchStatus
from redis import Redis

API_FIELDS = ("api.input_file_id", "api.completion_window")
DEFAULT_COMPLETION_WINDOW = "24h"


def save_api_fields(connection: Redis, batch_id: str, input_file_id: str, completion_window: str) -> None:
    connection.hset(keys.BatchKeys(batch_id).record,
                    mapping={"api.input_file_id": input_file_id, "api.completion_window": completion_window})


def load_api_fields(connection: Redis, batch_ids: list[str]) -> dict[str, dict[str, str]]:
    pipe = connection.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hmget(keys.BatchKeys(batch_id).record, API_FIELDS)
    out = {}
    for batch_id, (input_file_id, window) in zip(batch_ids, pipe.execute(), strict=True):
        out[batch_id] = {"input_file_id": input_file_id or "", "completion_window": window or DEFAULT_COMPLETION_WINDOW}
    return out


def render(batch: Batch, api_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The OpenAI `Batch` dict; output and error files exist from the moment the batch runs."""
    api_fields = api_fields or {}
    counts = batch.request_counts
    running = batch.status != BatchStatus.VALIDATING
    out: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": None,
        "input_file_id": api_fields.get("input_file_id", ""),
        "completion_window": api_fields.get("completion_window", DEFAULT_COMPLETION_WINDOW),
        "status": batch.status.value,
        "output_file_id": output_file_id(batch.id) if running else None,
        "error_file_id": errors_file_id(batch.id) if running and counts["failed"] else None,
        "request_counts": counts,
        "metadata": batch.metadata or None,
    }
    out.update({f: batch.timestamps.get(f) for f in TIMESTAMP_FIELDS})
    out["created_at"] = batch.timestamps.get("created_at", 0)
    return out
