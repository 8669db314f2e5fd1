"""Our Batch as OpenAI's `Batch` object: the one conversion behind `status --json`, `list --json` and serve's
/v1/batches, plus the completion window and the fields only some batches have.

What the HTTP API alone knows (the uploaded input_file_id, the window as the client wrote it) and the lines
`--skip-invalid` rejected live as `api.*` fields of the batch record itself, so they share its TTL.
"""

import json
import re
from collections.abc import Iterable
from typing import Any

from batchgen.jobs import keys
from batchgen.jobs.batch import TIMESTAMP_FIELDS, Batch
from batchgen.jobs.files import errors_file_id, output_file_id
from batchgen.jobs.inputs import param_of
from batchgen.jobs.states import Outcome
from redis import Redis

API_FIELDS = ("api.input_file_id", "api.completion_window")
ERRORS_FIELD = "api.errors"
DEFAULT_COMPLETION_WINDOW = "24h"
WINDOW = re.compile(r"([0-9]{1,9})([hms]?)")  # ASCII digits: int() reads other scripts' too
UNIT_S = {"h": 3600, "m": 60, "s": 1, "": 1}
MAX_WINDOW_S = 365 * 86400  # a year: a deadline, not a way to keep keys forever (and a score Redis stores exactly)


def parse_window(text: str, option: str = "--completion-window") -> int:
    """A completion window (or another duration) in seconds: "24h", "1h", "30m", "90s", or bare seconds."""
    match = WINDOW.fullmatch(text.strip())
    if match is None or not 1 <= int(match[1]) * UNIT_S[match[2]] <= MAX_WINDOW_S:
        raise ValueError(f"{option}: {text!r} is not a duration like 24h, 1h or 30m (at most {MAX_WINDOW_S // 3600}h)"
                         [:300])
    return int(match[1]) * UNIT_S[match[2]]


def format_window(seconds: int) -> str:
    """The shortest exact spelling: 86400 -> "24h", 1800 -> "30m", 90 -> "90s"."""
    for unit in ("h", "m"):
        if seconds > 0 and seconds % UNIT_S[unit] == 0:
            return f"{seconds // UNIT_S[unit]}{unit}"
    return f"{seconds}s"


def save_api_fields(connection: Redis, batch_id: str, input_file_id: str, completion_window: str) -> None:
    connection.hset(keys.BatchKeys(batch_id).record,
                    mapping={"api.input_file_id": input_file_id, "api.completion_window": completion_window})


def save_errors(connection: Redis, batch_id: str, errors: Iterable[Any]) -> None:
    """The rejected lines of a --skip-invalid submit (objects with line, code, message) as OpenAI BatchErrors."""
    data = [{"code": e.code, "message": e.message, "line": e.line, "param": param_of(e.message)} for e in errors]
    if data:
        connection.hset(keys.BatchKeys(batch_id).record, ERRORS_FIELD, json.dumps(data))


def load_api_fields(connection: Redis, batch_ids: list[str]) -> dict[str, dict[str, str]]:
    """Kept for callers that render with explicit fields; `Batch.from_hash` reads the same fields itself."""
    pipe = connection.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hmget(keys.BatchKeys(batch_id).record, API_FIELDS)
    out = {}
    for batch_id, (input_file_id, window) in zip(batch_ids, pipe.execute(), strict=True):
        out[batch_id] = {k: v for k, v in (("input_file_id", input_file_id), ("completion_window", window)) if v}
    return out


def completion_window_of(batch: Batch) -> str:
    """As the API client wrote it, else the window expires_at was set from."""
    if batch.completion_window:
        return batch.completion_window
    created, expires = batch.timestamps.get("created_at"), batch.timestamps.get("expires_at")
    return format_window(expires - created) if created and expires else DEFAULT_COMPLETION_WINDOW


def render(batch: Batch, api_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The OpenAI `Batch` dict. The output (error) file id is set once a request succeeded (failed); both are
    views over the recorded outcomes, readable while the batch runs. A batch mixing chat and completion
    lines (accepted by submit and run, as vLLM does) lists both urls as its endpoint."""
    api_fields = api_fields or {}
    counts = batch.request_counts
    out: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        # a CLI-submitted batch has no uploaded file: its input path(s) name the input instead
        "input_file_id": api_fields.get("input_file_id") or batch.input_file_id or batch.input_file,
        "completion_window": api_fields.get("completion_window") or completion_window_of(batch),
        "status": batch.status.value,
        "output_file_id": output_file_id(batch.id) if counts["completed"] else None,
        "error_file_id": errors_file_id(batch.id) if counts["failed"] else None,
        "request_counts": counts,
        "usage": batch.usage,
        "metadata": batch.metadata or None,
    }
    out.update({f: batch.timestamps.get(f) for f in TIMESTAMP_FIELDS})
    out["created_at"] = batch.timestamps.get("created_at", 0)
    return out


def status_object(batch: Batch) -> dict[str, Any]:
    """What `status --json` (and submit, wait, cancel, list) print: OpenAI's Batch plus our own fields."""
    return render(batch) | {
        "priority": batch.priority,
        "input_file": batch.input_file,
        "output_dir": batch.output_dir,
        "outcome_counts": {o.value: batch.counts.get(o.counter, 0) for o in Outcome},
    }
