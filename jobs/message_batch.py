"""Our Batch as Anthropic's Message Batch: the result lines and the batch object its SDK reads.

Redis keeps every result line in OpenAI's batch shape (a /v1/messages line's body is an Anthropic Message),
so counting, cancelling and the reaper know one shape. A batch whose every line is a Message Batches request
(endpoint /v1/messages) is shown in Anthropic's shape wherever its results leave us: the files a worker
writes, `batchgen results`, `batchgen run -o`, and serve's /v1/messages/batches.
"""

import time
from collections.abc import Callable
from typing import Any

from batchgen.jobs.batch import Batch
from batchgen.jobs.schema import MESSAGES_URL, outcome_of
from batchgen.jobs.states import BatchStatus, Outcome

Line = dict[str, Any]
# A batch-level end (the request never ran) is its own result type in Anthropic's shape.
NOT_RUN = {"cancelled": "canceled", "expired": "expired"}


def result_view(endpoint: str) -> Callable[[Line], Line]:
    """How a batch's stored lines leave us: Anthropic's shape for a Message Batches batch, else as stored."""
    return result_line if endpoint == MESSAGES_URL else _as_stored


def _as_stored(line: Line) -> Line:
    return line


def result_line(line: Line) -> Line:
    """A stored line as Anthropic's MessageBatchIndividualResponse: {"custom_id", "result": {"type", ...}}."""
    outcome = outcome_of(line)
    custom_id = line["custom_id"]
    if outcome == "succeeded":
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": line["response"]["body"]}}
    if outcome in NOT_RUN:
        return {"custom_id": custom_id, "result": {"type": NOT_RUN[outcome]}}
    response = line.get("response")
    if response is None:  # a batch-level failure (lost to dead workers, say): the server's fault
        kind, message, request_id = "api_error", line["error"]["message"], None
    else:
        error = response["body"]["error"]
        kind = "api_error" if response["status_code"] >= 500 else "invalid_request_error"
        message, request_id = f"{error['code']}: {error['message']}", response.get("request_id")
    error_response = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return {"custom_id": custom_id, "result": {"type": "errored", "error": error_response}}


def render(batch: Batch, results_url: str) -> dict[str, Any]:
    """Anthropic's MessageBatch. Counts are live (Anthropic shows them only at the end); results_url appears once
    processing ended, as the SDK's results() waits for it."""
    ended = batch.status.is_terminal
    stamps = batch.timestamps
    ended_at = next((stamps[f] for f in ("completed_at", "cancelled_at", "expired_at", "failed_at") if f in stamps),
                    None)
    done = {o: batch.counts.get(o.counter, 0) for o in Outcome}
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": "ended" if ended else "canceling" if batch.status == BatchStatus.CANCELLING
        else "in_progress",
        "request_counts": {"processing": max(0, batch.total - sum(done.values())),
                           "succeeded": done[Outcome.SUCCEEDED], "errored": done[Outcome.ERRORED],
                           "canceled": done[Outcome.CANCELLED], "expired": done[Outcome.EXPIRED]},
        "created_at": _rfc3339(stamps.get("created_at", 0)),
        "expires_at": _rfc3339(stamps.get("expires_at", stamps.get("created_at", 0))),
        "ended_at": _rfc3339(ended_at) if ended and ended_at else None,
        "cancel_initiated_at": _rfc3339(stamps["cancelling_at"]) if "cancelling_at" in stamps else None,
        "archived_at": None,
        "results_url": results_url if ended else None,
    }


def _rfc3339(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
