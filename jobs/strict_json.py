"""One input line read as strict JSON: the checks that json.loads leaves out.

json.loads lets the last of two equal keys win silently, turns "\\ud800" escapes into strings that no
encoder (Redis client, tokenizer, output file) accepts, and nests as deep as the C stack allows. Each
of those would pass validation and fail later, in the worker or in an export, so a line is checked
whole here, once, and every problem is named by its field path ("body.messages.0.content").
"""

import json
import re
from typing import Any

# A valid request nests about 6 deep (envelope, body, messages, message, content parts, part); the
# bound only has to sit far below what pydantic and json can serialise, so results stay writable.
MAX_DEPTH = 32
MAX_SHOWN_PARTS = 8  # of a field path in a message; past that it is "…"
_SURROGATE = re.compile("[\ud800-\udfff]")
_Node = tuple[Any, str | int, int, Any]  # (parent node or None, key or index in it, depth, value)


class StrictJsonError(ValueError):
    """code is a documented error code; message is "field: what is wrong", always encodable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _DuplicatedKeys(dict):
    """An object whose text repeated a key; kept so that check() can name it by its path."""

    def __init__(self, pairs: list[tuple[str, Any]], duplicate: str) -> None:
        super().__init__(pairs)
        self.duplicate = duplicate


def loads(text: str) -> Any:
    """json.loads that remembers repeated keys; errors are StrictJsonError (invalid_json, nesting_too_deep)."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except RecursionError:
        raise StrictJsonError("nesting_too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        hint = " (a JSON array is not JSONL: write one object per line)" if text.lstrip().startswith("[") else ""
        raise StrictJsonError("invalid_json", f"not valid JSON: {escape(str(exc))[:200]}{hint}") from None


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise for a repeated key, a lone surrogate, or objects and arrays nested more than max_depth deep.

    An explicit stack of containers (no RecursionError); a node links to its parent, so the field path is
    only spelled out for an error, and the strings of a container are checked where it is visited.
    """
    stack: list[_Node] = [(None, "", 1, value)]
    while stack:
        node = stack.pop()
        _, _, depth, item = node
        if depth > max_depth:
            raise StrictJsonError("nesting_too_deep", f"{_field(node)}: nested deeper than {max_depth} levels")
        if isinstance(item, _DuplicatedKeys):
            where = _field((node, item.duplicate, depth + 1, None))
            raise StrictJsonError("duplicate_key", f"{where}: the key appears twice (JSON keys must be unique)")
        if isinstance(item, str):  # only a line that is one string: the strings of containers are checked below
            if not is_encodable(item):
                raise StrictJsonError("invalid_encoding", _surrogate_message(node))
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            if type(key) is str and not key.isascii() and _SURROGATE.search(key):
                raise StrictJsonError("invalid_encoding", f"{_field((node, key, depth + 1, None))}: the key "
                                                          "contains a lone surrogate (\\ud800-\\udfff escape)")
            if type(child) is str:  # inline is_encodable: this loop runs for every string of every line
                if not child.isascii() and _SURROGATE.search(child):
                    raise StrictJsonError("invalid_encoding", _surrogate_message((node, key, depth + 1, child)))
            elif isinstance(child, dict | list):
                stack.append((node, key, depth + 1, child))


def _surrogate_message(node: "_Node") -> str:
    return f"{_field(node)}: contains a lone surrogate (\\ud800-\\udfff escape), which is not UTF-8 text"


def is_encodable(text: str) -> bool:
    """Strict UTF-8 decoding yields no surrogates, so only JSON escapes (or surrogateescape) can add them."""
    return text.isascii() or _SURROGATE.search(text) is None


def escape(text: str) -> str:
    """text with each lone surrogate written as its escape, so an error message can always be stored and printed."""
    return text if is_encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field(node: "_Node") -> str:
    path = []
    while node[0] is not None:
        path.append(str(node[1]))
        node = node[0]
    path.reverse()
    shown = ".".join(path[:MAX_SHOWN_PARTS]) + (".…" if len(path) > MAX_SHOWN_PARTS else "")
    return escape(shown) if path else "the line"


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
    return _DuplicatedKeys(pairs, duplicate)


def opens_array(line: bytes) -> bool:
    """A first line that starts a JSON array ("[", "[{...", or a whole array): JSON, never a text prompt."""
    if not line.startswith(b"["):
        return False
    if line[1:].lstrip()[:1] in (b"", b"{"):
        return True
    try:
        return isinstance(json.loads(line), list)
    except (ValueError, RecursionError):
        return False  # "[INST] write a poem" is a prompt
