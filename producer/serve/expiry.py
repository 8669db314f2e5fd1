"""OpenAI's expiry policies: a file's `expires_after` and a batch's `output_expires_after`, both
{"anchor": "created_at", "seconds": N}. Refusals name the part that is wrong, as OpenAI's do."""

import re

from batchgen.producer.serve.errors import ApiError
from pydantic import BaseModel, ConfigDict

MIN_SECONDS = 3600  # OpenAI's bounds: one hour to thirty days
MAX_SECONDS = 2_592_000
ANCHOR = "created_at"  # the only anchor OpenAI supports
INTEGER = re.compile(r"-?[0-9]{1,18}")  # longer is out of bounds anyway, and int() refuses 4300+ digits


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: str
    seconds: int


def expiry_seconds(anchor: str | None, seconds: int | str | None, param: str) -> int:
    """The policy's seconds if OpenAI would take it, else an ApiError naming `param.anchor` or `param.seconds`."""
    if anchor != ANCHOR:
        raise ApiError(400, f"{param}.anchor must be '{ANCHOR}', got {anchor!r}", code="invalid_value",
                       param=f"{param}.anchor")
    if isinstance(seconds, str) and INTEGER.fullmatch(seconds.strip()):  # a multipart form sends text
        seconds = int(seconds)
    if not isinstance(seconds, int) or not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ApiError(400, f"{param}.seconds must be an integer from {MIN_SECONDS} to {MAX_SECONDS}, "
                            f"got {seconds!r}", code="invalid_value", param=f"{param}.seconds")
    return seconds
