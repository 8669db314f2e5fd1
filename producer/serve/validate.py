"""Checks an uploaded file with the validator `submit` uses (read_inputs + the model resolver), storing nothing."""

from dataclasses import dataclass, field
from pathlib import Path

from batchgen.jobs.inputs import InputLimits, ModelResolver, read_inputs, validate_batch

MAX_LINE_ERRORS = 100


@dataclass
class FileCheck:
    num_lines: int = 0
    num_errors: int = 0
    endpoints: set[str] = field(default_factory=set)
    line_errors: list[dict] = field(default_factory=list)  # OpenAI BatchError shape: code, line, message, param

    def add(self, line: int, code: str, message: str, param: str | None = None) -> None:
        self.num_errors += 1
        if len(self.line_errors) < MAX_LINE_ERRORS:
            self.line_errors.append({"code": code, "line": line, "message": message, "param": param})


def check_file(path: Path, limits: InputLimits, name: str) -> FileCheck:
    """name: the client's file name, shown in messages in place of the server's staging path."""
    check = FileCheck()
    resolver = ModelResolver(None)
    for parsed in validate_batch(read_inputs([str(path)], limits=limits), resolver):
        if parsed.error is not None:
            check.add(parsed.line, parsed.error.code, parsed.error.message.replace(str(path), name),
                      parsed.error.param)
            continue
        assert parsed.request is not None
        check.num_lines += 1
        check.endpoints.add(parsed.request.url)
    if check.num_lines and not check.num_errors and resolver.model is None:
        check.add(0, "missing_model", "no model given: set body.model in the input lines")
    return check
