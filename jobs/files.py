"""FileStore: uploaded files of the OpenAI Files API. Content on disk under a root, the record in Redis.

Content is copied in and read out in fixed-size blocks, so memory does not grow with file size; both
halves outlive the server process. A batch's output and error files are not stored: they are views
over its recorded outcomes (see `output_file_id`), readable while the batch runs.
"""

import os
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

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> "StoredFile":
        return cls(id=raw["id"], filename=raw["filename"], bytes=int(raw["bytes"]), purpose=raw["purpose"],
                   created_at=int(raw["created_at"]), endpoints=tuple(filter(None, raw.get("endpoints", "").split(","))),
                   num_lines=int(raw.get("num_lines", 0)))


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
               num_lines: int) -> StoredFile:
        final = self.path(file_id)
        os.replace(staged, final)
        stored = StoredFile(id=file_id, filename=filename, bytes=final.stat().st_size, purpose=purpose,
                            created_at=now_s(), endpoints=tuple(sorted(endpoints)), num_lines=num_lines)
        with self.connection.pipeline() as pipe:
            pipe.hset(file_key(file_id), mapping={
                "id": stored.id, "filename": stored.filename, "bytes": stored.bytes, "purpose": stored.purpose,
                "created_at": stored.created_at, "endpoints": ",".join(stored.endpoints),
                "num_lines": stored.num_lines})
            pipe.zadd(files_index(), {file_id: stored.created_at})
            pipe.execute()
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        raw = self.connection.hgetall(file_key(file_id))
        return StoredFile.from_hash(raw) if raw else None

    def all(self) -> list[StoredFile]:
        """Every uploaded file (GET /v1/files merges them with the batches' result files before paging)."""
        pipe = self.connection.pipeline(transaction=False)
        for file_id in self.connection.zrange(files_index(), 0, -1):
            pipe.hgetall(file_key(file_id))
        return [StoredFile.from_hash(raw) for raw in pipe.execute() if raw]

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


def page_of_index(connection: Redis, index: str, limit: int, after: str | None,
                  newest_first: bool = True) -> tuple[list[str], bool]:
    """One cursor page of a time-scored ZSET: up to limit ids after the id `after`, and whether more follow."""
    start = 0
    if after:
        rank = connection.zrevrank(index, after) if newest_first else connection.zrank(index, after)
        if rank is None:
            return [], False
        start = rank + 1
    read = connection.zrevrange if newest_first else connection.zrange
    ids = read(index, start, start + limit)  # one extra tells whether another page exists
    return ids[:limit], len(ids) > limit
