"""Result files on disk: `<batch_id>.output.jsonl` and `<batch_id>.errors.jsonl` in the batch's output dir.

Each line goes out in one O_APPEND write, so a crash leaves no torn line, and only after Redis
accepted the outcome (HSETNX), so a line is written at most once. Redis stays the source of truth:
`batchgen results` exports the complete set from there.
"""

import json
import os
from pathlib import Path
from typing import Any


def result_paths(output_dir: str | Path, batch_id: str) -> tuple[Path, Path]:
    out = Path(output_dir)
    return out / f"{batch_id}.output.jsonl", out / f"{batch_id}.errors.jsonl"


def append_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n" for line in lines)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def write_results(output_dir: str | Path, batch_id: str, lines: list[dict[str, Any]]) -> None:
    ok_path, err_path = result_paths(output_dir, batch_id)
    append_lines(ok_path, [line for line in lines if not line.get("error")])
    append_lines(err_path, [line for line in lines if line.get("error")])
