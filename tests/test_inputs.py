"""Reading inputs: every accepted format becomes the same validated Requests.

`batchgen run` and `batchgen submit` parse inputs only through read_inputs(); these tests show what each
input format turns into, how CLI flags combine with per-line values, and how the batch's model is chosen.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from batchgen.jobs.formats import is_blank
from batchgen.jobs.inputs import (
    InputLimits,
    ModelResolver,
    ParamDefaults,
    invalid_output_line,
    read_inputs,
    validate_batch,
)
from batchgen.jobs.schema import CHAT_URL, COMPLETIONS_URL, ChatMessage, SamplingParams
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import data_keys

GOOD = Path(__file__).parent / "data" / "good"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def requests_of(paths, **kwargs):
    lines = list(read_inputs([str(p) for p in paths], **kwargs))
    assert [p.error for p in lines if p.error] == []
    return [p.request for p in lines]


def test_openai_batch_lines():
    first, second, third = requests_of([GOOD / "batch.jsonl"])
    assert first.custom_id == "req-1" and first.url == CHAT_URL and first.line == 1
    assert first.messages == (ChatMessage(role="system", content="You are terse."),
                              ChatMessage(role="user", content="Name a prime."))
    assert first.params == SamplingParams(max_tokens=32, temperature=0.0)
    # content-part lists are joined; max_completion_tokens is max_tokens; harmless keys are ignored
    assert second.messages[0].content == "Say\nhello"
    assert second.params == SamplingParams(max_tokens=16, top_p=0.9, seed=7, stop=("\n",))
    # completions take one prompt (a one-element list is fine); null means "not given"
    assert (third.url, third.prompt, third.params.stop, third.params.seed) == (
        COMPLETIONS_URL, "Once upon a time", ("\n\n", "THE END"), None)


def test_batch_lines_report_their_model():
    lines = list(read_inputs([str(GOOD / "batch.jsonl")]))
    assert {p.model for p in lines} == {MODEL}


def test_simple_lines_default_to_their_line_number():
    lines = list(read_inputs([str(GOOD / "simple.jsonl")]))
    assert [(p.custom_id, p.line) for p in lines] == [("1", 1), ("2", 2), ("mine", 4)]  # line 3 is blank
    haiku, chat = lines[2].request, lines[1].request
    assert lines[0].request.prompt == "Translate to French: cheese"
    assert chat.url == CHAT_URL and chat.params == SamplingParams(max_tokens=8, temperature=0.2)
    assert haiku.params.stop == ("\n",) and haiku.params.temperature == 1.0  # OpenAI's default


def test_text_file_is_one_prompt_per_line():
    lines = list(read_inputs([str(GOOD / "prompts.txt")]))
    assert [(p.custom_id, p.request.prompt) for p in lines] == [
        ("1", "First prompt"),
        ("3", "Second prompt with a literal \\n escape"),  # escapes are not interpreted
        ("5", "Third prompt"),
    ]
    assert all(p.request.url == COMPLETIONS_URL for p in lines)


def test_directory_holds_one_prompt_per_txt_file():
    lines = list(read_inputs([str(GOOD / "prompts_dir")]))
    assert [(p.custom_id, p.line, p.request.prompt) for p in lines] == [
        ("a.txt", 1, "Summarise the plot of Hamlet."),
        ("b.txt", 1, "Explain recursion\n  to a child."),  # whole file, stripped; README.md is skipped
    ]
    assert lines[0].source.endswith("a.txt")


def test_stdin_is_jsonl_when_it_starts_with_a_brace():
    stdin = io.BytesIO(b'\n  {"prompt": "from a pipe"}\n{"prompt": "again", "seed": 3}\n')
    lines = list(read_inputs(["-"], stdin=stdin))
    assert [(p.source, p.custom_id, p.request.prompt) for p in lines] == [("-", "2", "from a pipe"),
                                                                         ("-", "3", "again")]


def test_stdin_is_text_otherwise():
    lines = list(read_inputs(["-"], stdin=io.BytesIO(b"tell me a joke\n{not json, just a prompt}\n")))
    assert [p.request.prompt for p in lines] == ["tell me a joke", "{not json, just a prompt}"]


def test_files_without_a_known_suffix_are_sniffed_like_stdin(tmp_path):
    (tmp_path / "queue").write_text('{"prompt": "json after all"}\n')
    (tmp_path / "notes").write_text("a plain prompt\n")
    assert [r.prompt for r in requests_of([tmp_path / "queue", tmp_path / "notes"])] == [
        "json after all", "a plain prompt"]


def test_bom_and_crlf_are_accepted():
    lines = list(read_inputs([str(GOOD / "crlf_bom.jsonl")]))
    assert [(p.line, p.request.prompt) for p in lines] == [(1, "one"), (2, "two"), (4, "three")]


def test_cli_defaults_fill_only_what_a_line_omits():
    cli = ParamDefaults(max_tokens=64, temperature=0.0, top_p=0.5, seed=1)
    _, chat, haiku = requests_of([GOOD / "simple.jsonl"], defaults=cli)
    assert chat.params == SamplingParams(max_tokens=8, temperature=0.2, top_p=0.5, seed=1)
    assert haiku.params == SamplingParams(max_tokens=64, temperature=0.0, top_p=0.5, seed=1, stop=("\n",))
    [prompt] = requests_of([GOOD / "prompts_dir" / "a.txt"], defaults=cli)
    assert prompt.params == SamplingParams(max_tokens=64, temperature=0.0, top_p=0.5, seed=1)


@pytest.mark.parametrize(("flags", "message"), [
    ({"temperature": 2.5}, "--temperature: must be <= 2"),
    ({"top_p": 0.0}, "--top-p: must be > 0"),
    ({"max_tokens": 0}, "--max-tokens: must be >= 1"),
    ({"seed": -3}, "--seed: must be >= 0"),
])
def test_bad_cli_defaults_fail_once_up_front(flags, message):
    with pytest.raises(ValueError, match=message):
        ParamDefaults(**flags)


def test_default_max_tokens_respects_a_lower_limit():
    [request] = requests_of([GOOD / "prompts_dir" / "a.txt"], limits=InputLimits(max_tokens=100))
    assert request.params.max_tokens == 100


def test_several_inputs_prefix_generated_ids_with_the_file_name():
    lines = list(read_inputs([str(GOOD / "simple.jsonl"), str(GOOD / "prompts.txt"),
                              str(GOOD / "prompts_dir"), "-"], stdin=io.BytesIO(b"from stdin\n")))
    assert [p.custom_id for p in lines] == [
        "simple.jsonl:1", "simple.jsonl:2", "mine",  # ids the user chose are kept as they are
        "prompts.txt:1", "prompts.txt:3", "prompts.txt:5",
        "prompts_dir/a.txt", "prompts_dir/b.txt",
        "stdin:1",
    ]


def test_same_file_names_in_different_folders_use_the_path(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(GOOD / "prompts.txt", tmp_path / folder / "prompts.txt")
    ids = [r.custom_id for r in requests_of([tmp_path / "x" / "prompts.txt", tmp_path / "y" / "prompts.txt"])]
    assert len(set(ids)) == 6 and ids[0] == f"{tmp_path / 'x' / 'prompts.txt'}:1"


def test_a_duplicate_of_a_default_custom_id_says_it_is_the_line_number(tmp_path):
    """A line without custom_id is named by its line number; a clash with it must not read as if that line set one."""
    path = tmp_path / "lines.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "custom_id": "2"}\n'
                    '{"prompt": "d", "custom_id": "5"}\n{"prompt": "e"}\n')
    errors = {p.line: p.error.message for p in read_inputs([str(path)]) if p.error}
    assert errors == {
        3: "custom_id '2' was already used on line 2 as that line's default custom_id "
           "(its line number: line 2 sets none)",
        5: "custom_id '5', this line's default custom_id (its line number: the line sets none), "
           "was already used on line 4",
    }


def test_empty_inputs_are_reported_per_source(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    lines = list(read_inputs([str(GOOD / "prompts.txt"), str(tmp_path / "empty.txt")]))
    assert [(p.line, p.error.code if p.error else None) for p in lines] == [
        (1, None), (3, None), (5, None), (0, "empty_input")]


def test_cli_model_wins_over_line_models():
    resolver = ModelResolver(cli_model="my/finetune")
    lines = list(validate_batch(read_inputs([str(GOOD / "batch.jsonl")]), resolver))
    assert [p.error for p in lines] == [None] * 3
    assert resolver.model == "my/finetune"


def test_lines_must_agree_on_the_model(tmp_path):
    path = tmp_path / "models.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a"}, {"prompt": "b", "model": "m1"}, {"prompt": "c"}, {"prompt": "d", "model": "m2"}]))
    resolver = ModelResolver(cli_model=None)
    lines = list(validate_batch(read_inputs([str(path)]), resolver))
    assert [p.error for p in lines[:3]] == [None, None, None]
    assert (lines[3].error.code, lines[3].error.line, lines[3].request) == ("mixed_models", 4, None)
    assert "'m2' differs from 'm1' (line 2)" in lines[3].error.message
    assert invalid_output_line(lines[3])["response"]["body"]["error"]["code"] == "mixed_models"
    assert resolver.model == "m1"


def test_no_model_anywhere_is_a_clear_error_and_nothing_is_enqueued(redis_conn):
    from batchgen.producer.client import BatchClient

    result = BatchClient(connection=redis_conn).submit([str(GOOD / "prompts.txt")])
    assert result.batch is None and [e.code for e in result.errors] == ["missing_model"]
    assert "--model" in result.errors[0].message
    assert data_keys(redis_conn) == []


def test_100k_lines_are_parsed_as_a_stream(tmp_path):
    path = tmp_path / "big.jsonl"
    num_lines = 100_000
    with path.open("w") as f:
        for i in range(num_lines):
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": CHAT_URL, "body": {
                "model": MODEL, "messages": [{"role": "user", "content": f"Question number {i}?"}],
                "max_tokens": 64, "temperature": 0.7}}) + "\n")
    stream = read_inputs([str(path)])
    first = next(stream)  # the first line is available before the file is read to the end
    assert first.custom_id == "q0"
    count, num_errors = 1, 0
    for parsed in stream:
        count += 1
        num_errors += parsed.error is not None
    assert (count, num_errors) == (num_lines, 0)


def test_the_reader_never_imports_the_gpu_stack():
    code = "import sys, batchgen.jobs.inputs; sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


params = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(1, 32_768),
    "temperature": st.floats(0.0, 2.0) | st.integers(0, 2),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "seed": st.integers(0, 2**63 - 1) | st.none(),
    "stop": st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), max_size=4),
})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=30).filter(lambda t: not is_blank(t)), params),
                min_size=1, max_size=10))
def test_valid_simple_lines_keep_their_values(lines):
    data = "\n".join(json.dumps({"prompt": prompt, **p}) for prompt, p in lines).encode()
    parsed = list(read_inputs(["-"], stdin=io.BytesIO(data)))
    assert [p.error for p in parsed] == [None] * len(lines)
    for (prompt, given_params), got in zip(lines, parsed, strict=True):
        assert got.request.prompt == prompt
        for key, value in given_params.items():
            expected = (value,) if key == "stop" and isinstance(value, str) else value
            expected = tuple(expected) if key == "stop" else expected
            assert getattr(got.request.params, key) == expected
