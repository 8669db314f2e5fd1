"""FileStore: uploaded files of the OpenAI Files API. Content on disk under a root, the record in Redis.

Content is copied in and read out in fixed-size blocks, so memory does not grow with file size; both
halves outlive the server process. A batch's output and error files are not stored: they are views
over its recorded outcomes (see `output_file_id`), readable while the batch runs.

An upload with an expiry (the API's expires_after) has a record that Redis expires then; its bytes and index
entry go lazily, when a lookup or a listing next meets the id without its record (`_forget`).
"""

import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batchgen.jobs import defaults
from batchgen.jobs.store import now_s
from redis import Redis

BLOCK_BYTES = 1 << 16
OUTPUT_PREFIX = "file-output-"
ERRORS_PREFIX = "file-errors-"
UPLOAD_ID = re.compile(r"file-[0-9a-f]{24}")  # what `stage` makes; only such an id may name a path to remove


def files_index(prefix: str = defaults.KEY_PREFIX) -> str:
    """ZSET: uploaded file id scored by creation time, for GET /v1/files."""
    return f"{prefix}:files"


def file_key(file_id: str, prefix: str = defaults.KEY_PREFIX) -> str:
    """HASH: one uploaded file's record (name, bytes, purpose, endpoints of its lines)."""
    return f"{prefix}:file:{file_id}"


def output_file_id(batch_id: str) -> str:
    return OUTPUT_PREFIX + batch_id


def errors_file_id(batch_id: str) -> str:
    return ERRORS_PREFIX + batch_id


def result_file_of(file_id: str) -> tuple[str, bool] | None:
    """(batch id, errors?) for a batch's output or error file id; None for an uploaded file."""
    for prefix, errors in ((OUTPUT_PREFIX, False), (ERRORS_PREFIX, True)):
        if file_id.startswith(prefix):
            return file_id[len(prefix):], errors
    return None


@dataclass
class StoredFile:
    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: int
    endpoints: tuple[str, ...] = ()  # the urls its lines use, so a batch can check its endpoint cheaply
    num_lines: int = 0
    expires_at: int | None = None

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> "StoredFile":
        return cls(id=raw["id"], filename=raw["filename"], bytes=int(raw["bytes"]), purpose=raw["purpose"],
                   created_at=int(raw["created_at"]), endpoints=tuple(filter(None, raw.get("endpoints", "").split(","))),
                   num_lines=int(raw.get("num_lines", 0)),
                   expires_at=int(raw["expires_at"]) if raw.get("expires_at") else None)


class FileStore:
    def __init__(self, connection: Redis, root: str | os.PathLike):
        self.connection = connection
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def stage(self, stream: IO[bytes]) -> tuple[str, Path]:
        """Copies an upload to disk block by block under a fresh id; `commit` makes it visible."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        staged = self.root / f".{file_id}.part.jsonl"  # the suffix picks JSONL, as for the stored file
        with open(staged, "wb") as out:
            shutil.copyfileobj(stream, out, BLOCK_BYTES)
        return file_id, staged

    def commit(self, file_id: str, staged: Path, filename: str, purpose: str, endpoints: set[str],
               num_lines: int, expires_after_s: int = 0) -> StoredFile:
        """Makes a staged upload visible; with expires_after_s its record expires that long after creation."""
        final = self.path(file_id)
        os.replace(staged, final)
        created_at = now_s()
        stored = StoredFile(id=file_id, filename=filename, bytes=final.stat().st_size, purpose=purpose,
                            created_at=created_at, endpoints=tuple(sorted(endpoints)), num_lines=num_lines,
                            expires_at=created_at + expires_after_s if expires_after_s else None)
        with self.connection.pipeline() as pipe:
            pipe.hset(file_key(file_id), mapping={
                "id": stored.id, "filename": stored.filename, "bytes": stored.bytes, "purpose": stored.purpose,
                "created_at": stored.created_at, "endpoints": ",".join(stored.endpoints),
                "num_lines": stored.num_lines, **({"expires_at": stored.expires_at} if stored.expires_at else {})})
            if stored.expires_at:
                pipe.expireat(file_key(file_id), stored.expires_at)
            pipe.zadd(files_index(), {file_id: stored.created_at})
            pipe.execute()
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        raw = self.connection.hgetall(file_key(file_id))
        if not raw:
            self._forget(file_id)
            return None
        return StoredFile.from_hash(raw)

    def all(self) -> list[StoredFile]:
        """Every uploaded file (GET /v1/files merges them with the batches' result files before paging)."""
        file_ids = self.connection.zrange(files_index(), 0, -1)
        pipe = self.connection.pipeline(transaction=False)
        for file_id in file_ids:
            pipe.hgetall(file_key(file_id))
        out = []
        for file_id, raw in zip(file_ids, pipe.execute(), strict=True):
            if raw:
                out.append(StoredFile.from_hash(raw))
            else:
                self._forget(file_id)
        return out

    def _forget(self, file_id: str) -> None:
        """An upload whose record is gone (expired by Redis at its expires_at): its index entry and bytes go too."""
        if UPLOAD_ID.fullmatch(file_id) is None:
            return  # an id from a request body that is not one of ours must never name a path
        self.connection.zrem(files_index(), file_id)
        self.path(file_id).unlink(missing_ok=True)

    def read(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as fh:
            while block := fh.read(BLOCK_BYTES):
                yield block

    def delete(self, file_id: str) -> bool:
        with self.connection.pipeline() as pipe:
            pipe.delete(file_key(file_id))
            pipe.zrem(files_index(), file_id)
            existed = pipe.execute()[0]
        self.path(file_id).unlink(missing_ok=True)
        return bool(existed)


def page_after(ids: Sequence[str], limit: int, after: str | None) -> tuple[list[str], bool]:
    """One cursor page of ids already in list order: up to limit ids after the id `after`, and whether more follow."""
    start = 0
    if after:
        if after not in ids:
            return [], False
        start = ids.index(after) + 1
    return list(ids[start:start + limit]), len(ids) > start + limit
