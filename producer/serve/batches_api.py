"""/v1/batches: create from an uploaded file through BatchClient.submit, retrieve, list with a cursor, cancel."""

import dataclasses
import re
from typing import Annotated, Any

from batchgen.jobs import strict_json
from batchgen.jobs.batch import metadata_problem
from batchgen.jobs.files import FileStore, result_file_of
from batchgen.jobs.inputs import param_of
from batchgen.jobs.openai_batch import MAX_WINDOW_S, render, save_api_fields
from batchgen.producer.client import BatchClient, BatchNotFound
from batchgen.producer.serve.errors import ApiError, not_found
from batchgen.producer.serve.expiry import ExpiresAfter, expiry_seconds
from batchgen.producer.serve.files_api import result_file_ids
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

WINDOW = re.compile(r"([0-9]{1,6})h")  # whole hours; OpenAI takes only "24h"
MAX_WINDOW_H = MAX_WINDOW_S // 3600


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not serve is refused by name, not dropped
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None  # its limits: metadata_problem, shared with submit
    output_expires_after: ExpiresAfter | None = None  # how long its results stay once it ends


def batches_router(client: BatchClient, files: FileStore) -> APIRouter:
    router = APIRouter()

    def is_result_file(file_id: str) -> bool:
        """A batch's output or error file, as GET /v1/files/{file_id} shows it."""
        which = result_file_of(file_id)
        batch = client.store.get(which[0]) if which is not None else None
        return batch is not None and file_id in result_file_ids(batch)

    def one(batch_id: str) -> dict[str, Any]:
        try:
            return render(client.get(batch_id))  # get also expires overdue batches
        except BatchNotFound:
            raise not_found("batch", batch_id) from None

    @router.post("/batches")
    def create_batch(body: CreateBatch) -> dict[str, Any]:
        for name, value in body.model_dump(exclude_none=True).items():  # a lone surrogate cannot be stored
            try:
                strict_json.check({name: value})
            except strict_json.StrictJsonError as exc:
                raise ApiError(400, exc.message, code=exc.code, param=param_of(exc.message) or name) from None
        window = WINDOW.fullmatch(body.completion_window)
        if window is None or not 1 <= int(window[1]) <= MAX_WINDOW_H:
            raise ApiError(400, f"completion_window must be like '24h' (whole hours, at most {MAX_WINDOW_H})",
                           code="invalid_value", param="completion_window")
        if body.metadata and (problem := metadata_problem(body.metadata)):
            raise ApiError(400, problem, code="invalid_value", param="metadata")
        expiry = body.output_expires_after
        result_ttl_s = expiry_seconds(expiry.anchor, expiry.seconds, "output_expires_after") if expiry else 0
        stored = files.get(body.input_file_id)
        if stored is None:
            if is_result_file(body.input_file_id):
                raise ApiError(400, f"file {body.input_file_id} has purpose 'batch_output'; a batch's input file "
                               "must have purpose 'batch'", code="invalid_value", param="input_file_id")
            raise not_found("file", body.input_file_id)
        if set(stored.endpoints) != {body.endpoint}:  # as OpenAI: every line's url must be the batch's endpoint
            raise ApiError(400, f"the batch endpoint is {body.endpoint!r} but the file's lines use "
                           f"{', '.join(stored.endpoints)}", code="invalid_value", param="endpoint")
        cfg = dataclasses.replace(client.cfg, completion_window_s=int(window[1]) * 3600)
        path = str(files.path(stored.id))
        result = BatchClient(cfg, client.connection).submit([path], metadata=body.metadata,
                                                            result_ttl_s=result_ttl_s)
        if result.batch is None:  # the file changed on disk, or the limits did since upload
            shown = "; ".join(f"line {e.line}: {e.code}: {e.message.replace(path, stored.filename)}"
                              for e in result.errors[:5])
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
        batches, has_more = client.store.page(limit, after)
        data = [render(batch) for batch in batches]
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
