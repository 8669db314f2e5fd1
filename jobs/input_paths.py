"""Which files the input paths name: each path once, and the prompt files of a directory.

File names come from the OS as bytes; Python hands undecodable bytes over as lone surrogates, which
no Redis client or output file can encode. They are refused here, shown as \\xNN escapes, instead of
failing later as a bare codec error.
"""

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from batchgen.jobs import strict_json

PROMPT_SUFFIX = ".txt"


@dataclass(frozen=True)
class PromptFile:
    """One *.txt entry of a directory; code/problem are set when it cannot be read as a prompt."""

    path: Path
    shown: str  # the name as printed and used in custom_ids: always encodable
    code: str | None = None
    problem: str | None = None


def unique_paths(paths: Sequence[str]) -> list[str]:
    """"d" and "d/" (or "a.jsonl" and "./a.jsonl") are one input: the first spelling is kept."""
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = path if path == "-" else os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def shown_name(path: str) -> str:
    """The path as text that can be printed and stored: undecodable bytes become \\xNN."""
    return path if strict_json.is_encodable(path) else os.fsencode(path).decode("utf-8", "backslashreplace")


def name_problem(path: str) -> str | None:
    """Why a path given as input cannot be used as it is named, or None."""
    if strict_json.is_encodable(path):
        return None
    return f"{shown_name(path)}: the file name is not valid UTF-8; rename the file"


def prompt_files(directory: Path) -> Iterator[PromptFile]:
    """*.txt entries (suffix in any case, sorted, not recursive, no hidden files); unreadable ones named."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries
                       if e.name.lower().endswith(PROMPT_SUFFIX) and not e.name.startswith("."))
    for name in names:
        path = directory / name
        shown = shown_name(name)
        if (problem := name_problem(name)) is not None:
            yield PromptFile(path, shown, "invalid_file_name", problem)
            continue
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:  # a dangling link, or removed since the listing
            continue
        except OSError as exc:  # a symbolic link loop (pathlib's is_file would hide it as False)
            yield PromptFile(path, shown, "unreadable_input", f"{shown}: {exc.strerror or exc}")
            continue
        if stat.S_ISREG(mode):  # a folder named x.txt is not a prompt
            yield PromptFile(path, shown)
