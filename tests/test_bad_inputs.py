"""Malformed inputs: every file in tests/data/bad/ is rejected with a known first error.

EXPECTED.json maps each corpus file to the code and line number of its first error (and, for the limit
cases, the reduced InputLimits that trigger them). The property tests feed arbitrary bytes and
JSON-ish lines to the reader: it must never raise, only report.
"""

import io
import json
import tracemalloc
from pathlib import Path

import pytest
from batchgen.jobs.inputs import InputLimits, ModelResolver, ParsedLine, read_inputs
from batchgen.jobs.schema import ErrorInfo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BAD = Path(__file__).parent / "data" / "bad"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text())


def first_error(path: Path, limits: InputLimits | None = None) -> ErrorInfo | None:
    """The first error the CLI would report: a line's own error, or its model clashing with earlier lines."""
    resolver = ModelResolver(cli_model=None)
    for parsed in read_inputs([str(path)], limits=limits or InputLimits()):
        error = parsed.error or resolver.see(parsed)
        if error is not None:
            return error
    return None


def test_every_corpus_file_has_an_expectation():
    on_disk = {p.name for p in BAD.iterdir()} - {"EXPECTED.json"}
    assert on_disk == set(EXPECTED)
    assert len(on_disk) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_reports_its_first_error(name):
    expected = EXPECTED[name]
    error = first_error(BAD / name, InputLimits(**expected.get("limits", {})))
    assert error is not None, f"{name} was accepted"
    assert (error.code, error.line) == (expected["code"], expected["line"]), error.message
    assert error.message


def test_error_messages_name_the_field():
    assert first_error(BAD / "temperature_3.jsonl").message == "body.temperature: must be <= 2"
    assert first_error(BAD / "seed_negative.jsonl").message == "body.seed: must be >= 0"
    assert first_error(BAD / "role_unknown.jsonl").message.startswith("messages.0.role: must be one of")
    assert "line 1" in first_error(BAD / "duplicate_custom_id.jsonl").message


def test_a_10_mb_line_is_skipped_without_being_held_in_memory(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"prompt": "before"}\n{"prompt": "' + b"x" * 10_000_000 + b'"}\n{"prompt": "after"}\n')
    tracemalloc.start()
    try:
        lines = list(read_inputs([str(path)]))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(p.line, p.error.code if p.error else None) for p in lines] == [
        (1, None), (2, "line_too_long"), (3, None)]
    assert lines[2].request.prompt == "after"
    assert peak_bytes < 4_000_000  # one bounded read (1 MB limit), never the 10 MB line


def test_too_many_requests_ends_the_stream():
    lines = list(read_inputs([str(BAD / "too_many_requests.jsonl")], limits=InputLimits(max_requests=3)))
    assert [p.error.code if p.error else "ok" for p in lines] == ["ok", "ok", "ok", "too_many_requests"]


def test_missing_file_is_reported_not_raised(tmp_path):
    [parsed] = read_inputs([str(tmp_path / "nope.jsonl")])
    assert (parsed.error.code, parsed.line) == ("unreadable_input", 0)


def check_invariants(lines: list[ParsedLine]) -> None:
    numbers = [p.line for p in lines if p.line > 0]
    assert numbers == sorted(set(numbers)), "line numbers must strictly increase"
    for parsed in lines:
        assert (parsed.request is None) != (parsed.error is None)
        assert parsed.custom_id
        # everything stored or echoed must encode, or one bad line makes the batch unexportable
        (parsed.source + parsed.custom_id + (parsed.model or "")).encode("utf-8")
        (parsed.error or parsed.request).model_dump_json()
        if parsed.error is not None:
            assert parsed.error.code and parsed.error.line == parsed.line
        else:
            assert parsed.request.line == parsed.line == parsed.request.line


SMALL_LIMITS = InputLimits(max_line_bytes=300, max_requests=50, max_tokens=1000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data):
    check_invariants(list(read_inputs(["-"], stdin=io.BytesIO(data), limits=SMALL_LIMITS)))


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from([
    "custom_id", "method", "url", "body", "model", "prompt", "messages", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "seed", "stop", "n", "user", "frequency_penalty", "ignore_eos", "role", "content",
])
special = st.sampled_from(["POST", "GET", "/v1/chat/completions", "/v1/completions", "user", "m", "", "\ud800"])
fields = st.dictionaries(keys, json_values | special, max_size=6)
objects = st.recursive(fields, lambda inner: st.dictionaries(keys, inner | st.lists(inner, max_size=2), max_size=3),
                       max_leaves=6)
jsonish_line = objects.map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(jsonish_line, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_jsonish_lines_never_raise(lines, newline):
    data = newline.join(line.replace("\n", " ").replace("\r", " ") for line in lines)
    data_bytes = data.encode("utf-8", "surrogatepass")
    check_invariants(list(read_inputs(["-"], stdin=io.BytesIO(data_bytes), limits=SMALL_LIMITS)))


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b""])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_line_limit_counts_content_bytes_only(newline, bom):
    limit = 50
    data = bom + b"a" * limit + newline + b"b" * (limit + 1) + newline + b"c" * (limit + 2) + newline + b"d"
    lines = list(read_inputs(["-"], stdin=io.BytesIO(data), limits=InputLimits(max_line_bytes=limit)))
    if newline == b"":  # one line of 50 + 51 + 52 + 1 bytes
        assert [(p.line, p.error.code) for p in lines] == [(1, "line_too_long")]
        return
    assert [(p.line, p.error.code if p.error else p.request.prompt) for p in lines] == [
        (1, "a" * limit), (2, "line_too_long"), (3, "line_too_long"), (4, "d")]
