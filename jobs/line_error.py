"""LineError and the few field rules every line format shares (formats.py, embeddings.py): one home, so a format
in a module of its own raises the same errors without importing formats back."""

import unicodedata
from collections.abc import Mapping
from typing import Any

_BLANK_CATEGORIES = frozenset({"Cc", "Cf"})  # control and format characters (NUL, zero-width space, BOM)


class LineError(Exception):
    """A record that cannot become a Request; code is one of the documented error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def is_blank(text: str) -> bool:
    """The one rule for empty prompts: nothing but whitespace and control or format characters."""
    return all(ch.isspace() or unicodedata.category(ch) in _BLANK_CATEGORIES for ch in text.strip())


def not_blank(text: str, field: str) -> str:
    if not text:
        raise LineError("invalid_value", f"{field}: must not be empty")
    if is_blank(text):
        raise LineError("invalid_value", f"{field}: must not be empty (it has only whitespace or control characters)")
    return text


def check_model(body: Mapping[str, Any], prefix: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise LineError("invalid_type", f"{prefix}model: must be a string")
    if model == "":
        raise LineError("invalid_value", f"{prefix}model: must not be empty")


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
