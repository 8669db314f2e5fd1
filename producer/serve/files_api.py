"""/v1/files: uploads stream to disk and are validated like `submit`; batch output/error files stream from Redis."""

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from batchgen.jobs import keys
from batchgen.jobs.batch import Batch
from batchgen.jobs.files import (
    FileStore,
    StoredFile,
    errors_file_id,
    output_file_id,
    page_after,
    result_file_of,
)
from batchgen.jobs.inputs import InputLimits
from batchgen.jobs.message_batch import result_view
from batchgen.jobs.schema import outcome_of
from batchgen.producer.client import BatchClient, BatchNotFound
from batchgen.producer.serve.errors import ApiError, not_found, unknown_parameter
from batchgen.producer.serve.expiry import expiry_seconds
from batchgen.producer.serve.validate import check_file
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

BLOCK_BYTES = 1 << 16
EXPIRES_ANCHOR = "expires_after[anchor]"  # how the OpenAI SDK sends expires_after in a multipart form
EXPIRES_SECONDS = "expires_after[seconds]"
UPLOAD_FIELDS = frozenset({"file", "purpose", EXPIRES_ANCHOR, EXPIRES_SECONDS})
BATCH_FILE_EXPIRY_S = 30 * 24 * 3600


async def only_upload_fields(request: Request) -> None:
    """Refuses an upload's form field we do not serve by name (FastAPI would drop it); the form is parsed once."""
    for name in await request.form():
        if name not in UPLOAD_FIELDS:
            raise unknown_parameter(name)


def upload_expiry_s(anchor: str | None, seconds: str | None) -> int:
    """expires_after's seconds; without one, OpenAI's default for batch files (they expire after 30 days)."""
    if anchor is None and seconds is None:
        return BATCH_FILE_EXPIRY_S
    return expiry_seconds(anchor, seconds, "expires_after")


def result_lines(client: BatchClient, batch_id: str, errors: bool) -> Iterator[bytes]:
    """A batch's output (or error) file, in blocks, from what is recorded so far."""
    block: list[bytes] = []
    size = 0
    view = result_view(client.get(batch_id).endpoint)  # get: as client.results does, the batch must exist
    for _, line in client.store.iter_outcomes(batch_id):
        if (outcome_of(line) != "succeeded") != errors:
            continue
        data = (json.dumps(view(line), ensure_ascii=False) + "\n").encode()
        block.append(data)
        size += len(data)
        if size >= BLOCK_BYTES:
            yield b"".join(block)
            block, size = [], 0
    if block:
        yield b"".join(block)


def results_expire_at(client: BatchClient, batch: Batch) -> int | None:
    """When a final batch's results, and so its output and error files, expire (its keys' TTL); None while it runs."""
    if not batch.status.is_terminal:
        return None
    ttl_ms = client.connection.pttl(keys.BatchKeys(batch.id).record)
    return int(time.time() + ttl_ms / 1000) if ttl_ms > 0 else None


def result_file_object(client: BatchClient, batch: Batch, errors: bool) -> dict[str, Any]:
    """A batch's output (error) file as OpenAI's FileObject; its bytes are those its content streams now (read
    once the batch is final: the store keeps them)."""
    size = client.store.file_size(batch, "errors" if errors else "output",
                                  lambda: sum(len(b) for b in result_lines(client, batch.id, errors)))
    return {"id": errors_file_id(batch.id) if errors else output_file_id(batch.id), "object": "file", "bytes": size,
            "created_at": batch.timestamps.get("created_at", 0),
            "filename": f"{batch.id}_{'error' if errors else 'output'}.jsonl", "purpose": "batch_output",
            "status": "processed", "expires_at": results_expire_at(client, batch), "status_details": None}


def result_file_ids(batch: Batch) -> list[str]:
    """The result files a batch has: those its rendered Batch names (openai_batch.render)."""
    counts = batch.request_counts
    return [file_id for file_id, n in ((output_file_id(batch.id), counts["completed"]),
                                       (errors_file_id(batch.id), counts["failed"])) if n]


def files_router(client: BatchClient, files: FileStore) -> APIRouter:
    router = APIRouter()
    limits = InputLimits(client.cfg.max_requests, client.cfg.max_line_bytes, client.cfg.max_tokens_limit)

    def result_batch(file_id: str) -> Batch | None:
        """The batch whose output or error file file_id is (404 if it names none); None for an upload's id."""
        which = result_file_of(file_id)
        if which is None:
            return None
        try:
            batch = client.get(which[0])
        except BatchNotFound:
            raise not_found("file", file_id) from None
        if file_id not in result_file_ids(batch):  # as its rendered output_file_id (error_file_id): null
            raise not_found("file", file_id)
        return batch

    def result_file(file_id: str) -> dict[str, Any] | None:
        batch = result_batch(file_id)
        return None if batch is None else result_file_object(client, batch, file_id == errors_file_id(batch.id))

    def listed_files(purpose: str | None) -> dict[str, tuple[int, StoredFile | Batch]]:
        """Every file GET /v1/files can show, by id: (created_at, the upload's record or the result file's batch)."""
        client.expire_overdue()  # as GET /v1/batches does: an overdue batch's error file appears with it
        out: dict[str, tuple[int, StoredFile | Batch]] = {
            f.id: (f.created_at, f) for f in files.all() if purpose in (None, f.purpose)}
        if purpose in (None, "batch_output"):
            batches = client.store.recent(limit=max(1, client.connection.zcard(keys.batches_index())))
            out.update({file_id: (batch.timestamps.get("created_at", 0), batch)
                        for batch in batches for file_id in result_file_ids(batch)})
        return out

    @router.post("/files", dependencies=[Depends(only_upload_fields)])
    def create_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()],
                    expires_anchor: Annotated[str | None, Form(alias=EXPIRES_ANCHOR)] = None,
                    expires_seconds: Annotated[str | None, Form(alias=EXPIRES_SECONDS)] = None) -> dict[str, Any]:
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch', got {purpose!r}", code="invalid_value", param="purpose")
        expires_after_s = upload_expiry_s(expires_anchor, expires_seconds)
        file_id, staged = files.stage(file.file)
        try:
            check = check_file(staged, limits, file.filename or file_id)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if check.num_errors:
            staged.unlink(missing_ok=True)
            shown = "; ".join(f"line {e['line']}: {e['code']}: {e['message']}" for e in check.line_errors[:5])
            raise ApiError(400, f"{file.filename}: {check.num_errors} invalid line(s): {shown}",
                           code="invalid_file", param="file",
                           errors={"object": "list", "data": check.line_errors})
        stored = files.commit(file_id, staged, file.filename or file_id, purpose, check.endpoints, check.num_lines,
                              expires_after_s)
        return stored.to_api()

    @router.get("/files")
    def list_files(limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, after: str | None = None,
                   order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> dict[str, Any]:
        listed = listed_files(purpose)
        ids = sorted(listed, key=lambda file_id: (listed[file_id][0], result_file_of(file_id) is not None, file_id),
                     reverse=order != "asc")  # in one second, an upload comes before the results it led to
        page, has_more = page_after(ids, limit, after)
        data = [render_listed(file_id, listed[file_id][1]) for file_id in page]
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def render_listed(file_id: str, source: StoredFile | Batch) -> dict[str, Any]:
        if isinstance(source, Batch):
            return result_file_object(client, source, file_id == errors_file_id(source.id))
        return source.to_api()

    @router.get("/files/{file_id}")
    def retrieve_file(file_id: str) -> dict[str, Any]:
        if (virtual := result_file(file_id)) is not None:
            return virtual
        stored = files.get(file_id)
        if stored is None:
            raise not_found("file", file_id)
        return stored.to_api()

    @router.get("/files/{file_id}/content")
    def file_content(file_id: str) -> StreamingResponse:
        media = "application/jsonl"
        if (batch := result_batch(file_id)) is not None:
            return StreamingResponse(result_lines(client, batch.id, file_id == errors_file_id(batch.id)),
                                     media_type=media)
        if files.get(file_id) is None:
            raise not_found("file", file_id)
        if not files.path(file_id).is_file():  # checked before streaming: a failed read then tears the response
            raise ApiError(500, f"the content of file {file_id} is missing from the server's files directory",
                           type_="server_error")
        return StreamingResponse(files.read(file_id), media_type=media)

    @router.delete("/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        if result_batch(file_id) is not None:
            raise ApiError(400, "a batch's output and error files go away with the batch", code="invalid_value")
        if not files.delete(file_id):
            raise not_found("file", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return router
