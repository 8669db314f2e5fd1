"""/v1/batches: create from an uploaded file through BatchClient.submit, retrieve, list with a cursor, cancel."""

import dataclasses
import re
from typing import Annotated, Any

from batchgen.jobs import keys
from batchgen.jobs.batch import metadata_problem
from batchgen.jobs.files import FileStore, page_of_index
from batchgen.jobs.openai_batch import load_api_fields, render, save_api_fields
from batchgen.producer.client import BatchClient, BatchNotFound
from batchgen.producer.serve.errors import ApiError, not_found
from batchgen.producer.serve.expiry import ExpiresAfter, expiry_seconds
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

WINDOW = re.compile(r"^(\d+)h$")


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not serve is refused by name, not dropped
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None  # its limits: metadata_problem, shared with submit
    output_expires_after: ExpiresAfter | None = None  # how long its results stay once it ends


def batches_router(client: BatchClient, files: FileStore) -> APIRouter:
    router = APIRouter()

    def rendered(batch_ids: list[str]) -> list[dict[str, Any]]:
        fields = load_api_fields(client.connection, batch_ids)
        out = []
        for batch_id in batch_ids:
            batch = client.store.get(batch_id)
            if batch is not None:
                out.append(render(batch, fields[batch_id]))
        return out

    def one(batch_id: str) -> dict[str, Any]:
        try:
            client.get(batch_id)  # also expires overdue batches
        except BatchNotFound:
            raise not_found("batch", batch_id) from None
        (out,) = rendered([batch_id])
        return out

    @router.post("/batches")
    def create_batch(body: CreateBatch) -> dict[str, Any]:
        window = WINDOW.match(body.completion_window)
        if window is None or int(window[1]) < 1:
            raise ApiError(400, "completion_window must be like '24h'", code="invalid_value", param="completion_window")
        if body.metadata and (problem := metadata_problem(body.metadata)):
            raise ApiError(400, problem, code="invalid_value", param="metadata")
        expiry = body.output_expires_after
        result_ttl_s = expiry_seconds(expiry.anchor, expiry.seconds, "output_expires_after") if expiry else 0
        stored = files.get(body.input_file_id)
        if stored is None:
            raise not_found("file", body.input_file_id)
        if set(stored.endpoints) != {body.endpoint}:  # as OpenAI: every line's url must be the batch's endpoint
            raise ApiError(400, f"the batch endpoint is {body.endpoint!r} but the file's lines use "
                           f"{', '.join(stored.endpoints)}", code="invalid_value", param="endpoint")
        cfg = dataclasses.replace(client.cfg, completion_window_s=int(window[1]) * 3600)
        result = BatchClient(cfg, client.connection).submit([str(files.path(stored.id))], metadata=body.metadata,
                                                            result_ttl_s=result_ttl_s)
        if result.batch is None:  # the file changed on disk, or the limits did since upload
            shown = "; ".join(f"line {e.line}: {e.code}: {e.message}" for e in result.errors[:5])
            raise ApiError(400, f"{result.num_errors} invalid line(s): {shown}", code="invalid_file",
                           param="input_file_id")
        save_api_fields(client.connection, result.batch.id, stored.id, body.completion_window)
        return one(result.batch.id)

    @router.get("/batches/{batch_id}")
    def retrieve_batch(batch_id: str) -> dict[str, Any]:
        return one(batch_id)

    @router.get("/batches")
    def list_batches(limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None) -> dict[str, Any]:
        client.expire_overdue()
        ids, has_more = page_of_index(client.connection, keys.batches_index(), limit, after)
        data = rendered(ids)
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @router.post("/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        try:
            client.cancel(batch_id)
        except BatchNotFound:
            raise not_found("batch", batch_id) from None
        return one(batch_id)

    return router
