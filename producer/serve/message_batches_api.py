"""/v1/messages/batches: Anthropic's Message Batches API over the same BatchClient, so its SDK runs a batch here.

A create validates every request with the validator `submit` uses (the requests are the lines of a Message
Batches file) and enqueues nothing unless all pass. Results stream in Anthropic's shape (message_batch).
"""

import io
import json
from collections.abc import Iterator
from typing import Annotated, Any

from batchgen.jobs.batch import Batch
from batchgen.jobs.message_batch import render, result_line
from batchgen.jobs.schema import MESSAGES_URL
from batchgen.producer.client import BatchClient, BatchNotFound
from batchgen.producer.serve.errors import ApiError, not_found
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

MAX_SHOWN_ERRORS = 5


class CreateMessageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not know is refused by name, not dropped

    requests: list[Any]


def message_batches_router(client: BatchClient) -> APIRouter:
    router = APIRouter()

    def message_batch(batch_id: str) -> Batch:
        """The batch, if it is a Message Batch: a batch of OpenAI lines has no Anthropic results to show."""
        try:
            batch = client.get(batch_id)  # also expires overdue batches
        except BatchNotFound:
            batch = None
        if batch is None or batch.endpoint != MESSAGES_URL:
            raise not_found("message batch", batch_id)
        return batch

    def one(batch_id: str, request: Request) -> dict[str, Any]:
        return render(message_batch(batch_id), f"{request.base_url}v1/messages/batches/{batch_id}/results")

    @router.post("/messages/batches")
    def create(body: CreateMessageBatch, request: Request) -> dict[str, Any]:
        if not body.requests:
            raise ApiError(400, "requests: must not be empty", param="requests")
        for i, item in enumerate(body.requests):  # an OpenAI line here would be read as one: say what is expected
            if not (isinstance(item, dict) and "params" in item):
                raise ApiError(400, f"requests.{i}: must be an object with custom_id and params",
                               param=f"requests.{i}")
        data = b"".join(map(request_line, body.requests))
        result = client.submit(["-"], stdin=io.BytesIO(data))
        if result.batch is None:
            shown = "; ".join(f"requests.{e.line - 1}: {e.code}: {e.message}" if e.line else e.message
                              for e in result.errors[:MAX_SHOWN_ERRORS])
            raise ApiError(400, f"{result.num_errors} invalid request(s): {shown}", code="invalid_request",
                           param="requests")
        return one(result.batch.id, request)

    @router.get("/messages/batches/{batch_id}")
    def retrieve(batch_id: str, request: Request) -> dict[str, Any]:
        return one(batch_id, request)

    @router.get("/messages/batches")
    def list_(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 20,
              after_id: str | None = None, before_id: str | None = None) -> dict[str, Any]:
        """Newest first, Message Batches only (a batch of OpenAI lines is /v1/batches')."""
        if before_id is not None:
            raise ApiError(400, "before_id: paging backwards is not supported; page with after_id", param="before_id")
        client.expire_overdue()
        batches, has_more = client.store.page(limit, after_id, keep=lambda b: b.endpoint == MESSAGES_URL)
        page = [render(b, f"{request.base_url}v1/messages/batches/{b.id}/results") for b in batches]
        return {"data": page, "has_more": has_more,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    @router.post("/messages/batches/{batch_id}/cancel")
    def cancel(batch_id: str, request: Request) -> dict[str, Any]:
        client.cancel(message_batch(batch_id).id)
        return one(batch_id, request)

    @router.delete("/messages/batches/{batch_id}")
    def delete(batch_id: str) -> dict[str, Any]:
        """As Anthropic: only an ended batch is deleted (an in-progress one is cancelled first), results and all."""
        batch = message_batch(batch_id)
        if not batch.status.is_terminal:
            raise ApiError(400, f"message batch {batch_id} is still {batch.status.value}; cancel it, then delete it "
                           "once processing has ended", param="message_batch_id")
        client.store.discard(batch_id)
        return {"id": batch_id, "type": "message_batch_deleted"}

    @router.get("/messages/batches/{batch_id}/results")
    def results(batch_id: str) -> StreamingResponse:
        batch = message_batch(batch_id)
        if not batch.status.is_terminal:  # as Anthropic: results once every request has ended
            raise ApiError(400, f"message batch {batch_id} is still {batch.status.value}; its results are "
                           "available once processing has ended", param="message_batch_id")
        return StreamingResponse(_lines(client, batch_id), media_type="application/binary")

    return router


def request_line(item: Any) -> bytes:
    """One request as a line of a Message Batches file; one holding a lone surrogate (which UTF-8 cannot encode)
    keeps it as a JSON escape, so the validator refuses it by field, as it does in an uploaded file."""
    try:
        return (json.dumps(item, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(item) + "\n").encode()


def _lines(client: BatchClient, batch_id: str) -> Iterator[bytes]:
    for line in client.results(batch_id):
        yield (json.dumps(result_line(line), ensure_ascii=False) + "\n").encode()
