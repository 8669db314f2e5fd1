"""What a user moving an OpenAI Batch or vLLM run-batch script over meets: the batch object validates as the
openai package's own `Batch`, output lines have OpenAI's shapes, `run` writes like `vllm run-batch`, and the
CLI says what it is doing (wait's rates, `workers --json`, the engine's start-up block)."""

import json
import logging
import signal
import subprocess

import openai.types
import pytest
from batchgen.jobs.batch import Batch
from batchgen.jobs.openai_batch import format_window, parse_window, status_object
from batchgen.jobs.schema import error_line, error_of, outcome_of
from batchgen.jobs.states import BatchStatus
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.producer.progress import batch_rates, postfix
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine, echo_text
from batchgen.worker.worker import BatchWorker
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.cli import BATCHGEN, batchgen, cli_env, eventually, start_worker

ERROR_BODY_KEYS = {"message", "type", "param", "code"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def check_line(line: dict) -> None:
    """Every output line in one of OpenAI's three shapes: success, request error, batch-level error."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    if line["response"] is None:  # batch-level: the request never ran
        assert set(line["error"]) == {"code", "message"}
        return
    assert line["error"] is None
    body = line["response"]["body"]
    if line["response"]["status_code"] == 200:
        kinds = {"chat.completion": ChatCompletion, "text_completion": Completion, "response": Response}
        kinds[body["object"]].model_validate(body)
    else:
        assert set(body["error"]) == ERROR_BODY_KEYS
        kind = "server_error" if line["response"]["status_code"] >= 500 else "invalid_request_error"
        assert line["response"]["status_code"] in (400, 500) and body["error"]["type"] == kind


# -- the batch object ---------------------------------------------------------------------------------------

def test_status_and_list_json_validate_as_openai_batch_with_every_new_field(redis_url, redis_conn, tmp_path):
    rows = [{"custom_id": "a", "prompt": "one two three"},
            {"custom_id": "b", "prompt": "x", "top_p": 7},  # rejected, skipped
            {"custom_id": "c", "prompt": "bad\u0000byte"}]  # the engine refuses it
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    sub = batchgen("submit", src, "--model", "echo-m", "--skip-invalid", "--completion-window", "30m", "--json",
                   redis_url=redis_url, check=True)
    submitted = openai.types.Batch.model_validate(json.loads(sub.stdout))
    assert submitted.completion_window == "30m" and submitted.expires_at - submitted.created_at == 1800
    assert submitted.input_file_id == src and submitted.endpoint == "/v1/completions"
    (error,) = submitted.errors.data
    assert (error.code, error.line, error.param) == ("invalid_value", 2, "top_p")
    assert submitted.output_file_id is None  # nothing succeeded yet

    worker = start_worker("--model", "echo-m", "--engine", "echo", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()
    status = batchgen("status", submitted.id, "--json", redis_url=redis_url, check=True)
    done = openai.types.Batch.model_validate(json.loads(status.stdout))
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 1, 2)
    assert done.output_file_id == f"file-output-{done.id}" and done.error_file_id == f"file-errors-{done.id}"
    assert done.errors == submitted.errors
    listed = json.loads(batchgen("list", "--json", redis_url=redis_url, check=True).stdout)
    assert [openai.types.Batch.model_validate(b).id for b in listed] == [done.id]

    lines = [json.loads(x) for x in batchgen("results", done.id, "--ordered", redis_url=redis_url,
                                               check=True).stdout.splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["a", "b", "c"]
    for line in lines:
        check_line(line)
    assert [outcome_of(ln) for ln in lines] == ["succeeded", "errored", "errored"]
    assert error_of(lines[1])["param"] == "top_p" and error_of(lines[2])["code"] == "invalid_prompt"


@pytest.mark.parametrize(("text", "seconds"), [("24h", 86400), ("1h", 3600), ("30m", 1800), ("90s", 90), ("90", 90)])
def test_the_completion_window_reads_hours_minutes_or_seconds(text, seconds):
    assert parse_window(text) == seconds
    assert parse_window(format_window(seconds)) == seconds


@pytest.mark.parametrize("text", ["1d", "0h", "", "h", "-1h", "8761h", "9" * 5000 + "h", "\u0662\u0664h"])
def test_a_bad_completion_window_is_a_usage_error(text, redis_url, redis_conn, tmp_path):
    with pytest.raises(ValueError, match="completion-window"):
        parse_window(text)
    proc = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]), "--model", "m",
                    "--completion-window", text, redis_url=redis_url)
    assert proc.returncode == 2 and "completion-window" in proc.stderr.decode()


def test_the_completion_window_drives_expiry(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(completion_window_s=parse_window("1s")), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])], model="nobody").batch
    assert status_object(batch)["completion_window"] == "1s"
    eventually(lambda: client.get(batch.id).status == BatchStatus.EXPIRED, "the batch to expire", timeout_s=10)
    (line,) = client.results(batch.id)
    check_line(line)
    assert line["response"] is None and line["error"]["code"] == "batch_expired"
    assert openai.types.Batch.model_validate(status_object(client.get(batch.id))).error_file_id


def test_a_file_mixing_chat_and_completion_lines_is_accepted_by_submit_and_run(redis_conn, tmp_path):
    rows = [{"custom_id": "p", "prompt": "one two"}, {"custom_id": "m", "messages": [{"role": "user", "content": "hi"}]}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    batch = BatchClient(connection=redis_conn).submit([src], model="echo-m").batch
    shown = openai.types.Batch.model_validate(status_object(batch))
    assert shown.endpoint == "/v1/chat/completions,/v1/completions"  # both named, neither dropped
    out = tmp_path / "out.jsonl"
    batchgen("run", src, "-o", str(out), "--model", "echo-m", "--engine", "echo", redis_url="redis://unused", check=True)
    assert [ln["response"]["body"]["object"] for ln in read_jsonl(out)] == ["text_completion", "chat.completion"]


def test_cancelled_requests_get_batch_level_error_lines(redis_conn, tmp_path):
    client = BatchClient(connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}, {"prompt": "y"}])], model="m").batch
    client.cancel(batch.id)
    lines = list(client.results(batch.id))
    for line in lines:
        check_line(line)
    assert {(ln["response"] is None, ln["error"]["code"], outcome_of(ln)) for ln in lines} == {
        (True, "batch_cancelled", "cancelled")}


def test_error_lines_put_a_failed_request_in_the_response_and_a_batch_failure_in_error():
    failed = error_line("r1", "invalid_value", "temperature: must be <= 2", param="temperature")
    assert failed["error"] is None and failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"] == {"message": "temperature: must be <= 2", "param": "temperature",
                                                   "type": "invalid_request_error", "code": "invalid_value"}
    assert outcome_of(failed) == "errored" and error_of(failed)["code"] == "invalid_value"
    server = error_line("r2", "out_of_memory", "no room")  # ours, not the request's: a 500
    assert server["response"]["status_code"] == 500 and server["response"]["body"]["error"]["type"] == "server_error"
    expired = error_line("r3", "batch_expired", "window ended", status_code=None)
    assert expired["response"] is None and expired["error"] == {"code": "batch_expired", "message": "window ended"}
    assert outcome_of(expired) == "expired"


def test_skip_invalid_keeps_every_valid_line_after_a_skipped_one(redis_conn, tmp_path):
    """Regression: the valid lines after a skipped one were stored one index early, so the last was lost."""
    rows = [{"custom_id": "a", "prompt": "one"}, {"custom_id": "bad", "prompt": "x", "top_p": 7},
            {"custom_id": "c", "prompt": "three four"}, {"custom_id": "d", "prompt": "five"}]
    client = BatchClient(ProducerConfig(chunk_size=2), connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m", skip_invalid=True).batch
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run() == 3
    lines = {ln["custom_id"]: ln for ln in client.results(batch.id)}
    assert sorted(lines) == ["a", "bad", "c", "d"]
    for cid in ("a", "c", "d"):
        assert lines[cid]["response"]["body"]["choices"][0]["text"] == echo_text(rows[["a", "bad", "c", "d"].index(cid)]
                                                                                ["prompt"], 256)[0]


# -- batchgen run ---------------------------------------------------------------------------------------------

def test_run_writes_in_input_order_by_default_and_as_finished_with_no_ordered(tmp_path):
    # The echo engine rejects a NUL prompt the moment it is added, before the earlier line finishes.
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "one"},
                                               {"custom_id": "nul", "prompt": "bad\u0000byte"},
                                               {"custom_id": "b", "prompt": "two"}])
    ordered, unordered = tmp_path / "ordered.jsonl", tmp_path / "unordered.jsonl"
    batchgen("run", src, "-o", str(ordered), "--model", "m", "--engine", "echo", redis_url="x", check=True)
    batchgen("run", src, "-o", str(unordered), "--no-ordered", "--model", "m", "--engine", "echo", redis_url="x",
             check=True)
    assert [ln["custom_id"] for ln in read_jsonl(ordered)] == ["a", "nul", "b"]
    assert [ln["custom_id"] for ln in read_jsonl(unordered)] == ["nul", "a", "b"]
    for line in read_jsonl(ordered):
        check_line(line)


@pytest.mark.slow
def test_a_responses_line_answers_as_the_responses_api_with_its_chat_twins_text(demo_model_dir, tmp_path):
    """/v1/responses on the 8-bit demo model: the output line's body validates as the openai package's Response,
    and its text and usage are those of the same request sent as chat (instructions a system message)."""
    ask = {"instructions": "Answer briefly.", "input": "the quick brown fox"}
    chat = [{"role": "system", "content": ask["instructions"]}, {"role": "user", "content": ask["input"]}]
    rows = [{"custom_id": f"r{n}", "method": "POST", "url": "/v1/responses",
             "body": {**ask, "max_output_tokens": n, "temperature": 0}} for n in (1, 12)]
    rows += [{"custom_id": f"c{n}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": chat, "max_tokens": n, "temperature": 0}} for n in (1, 12)]
    out = tmp_path / "out.jsonl"
    batchgen("run", write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(out), "--model", str(demo_model_dir),
             redis_url="x", check=True)
    lines = {line["custom_id"]: line for line in read_jsonl(out)}
    for line in lines.values():
        check_line(line)
    for n in (1, 12):
        response = Response.model_validate(lines[f"r{n}"]["response"]["body"])
        twin = ChatCompletion.model_validate(lines[f"c{n}"]["response"]["body"])
        assert response.object == "response" and response.output_text == twin.choices[0].message.content
        assert (response.usage.input_tokens, response.usage.output_tokens) == (
            twin.usage.prompt_tokens, twin.usage.completion_tokens)
        assert response.max_output_tokens == n and response.temperature == 0
        (message,) = response.output
        stopped = twin.choices[0].finish_reason == "stop"
        assert response.status == message.status == ("completed" if stopped else "incomplete")
        assert (None if stopped else "max_output_tokens") == (
            response.incomplete_details and response.incomplete_details.reason)
    assert lines["r1"]["response"]["body"]["status"] == "incomplete"  # one token: the limit, not EOS, ends it


def test_run_output_dash_writes_the_result_lines_to_stdout_and_nothing_else(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "one"},
                                               {"custom_id": "bad", "prompt": "x", "top_p": 7},
                                               {"custom_id": "b", "prompt": "two"}])

    def run(*args: str) -> subprocess.CompletedProcess:  # in tmp_path: a file named "-" must not appear
        return subprocess.run([*BATCHGEN, "run", src, *args, "--model", "m", "--engine", "echo"], cwd=tmp_path,
                              capture_output=True, text=True, env=cli_env("x"), timeout=120)

    proc = run("-o", "-", "--skip-invalid")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["a", "bad", "b"]
    for line in lines:
        check_line(line)
    assert "2 succeeded, 1 errored -> stdout" in proc.stderr and not (tmp_path / "-").exists()
    # --json's summary object owns stdout, so it cannot share it with the lines: one line on stderr, exit 2
    refused = run("-o", "-", "--json")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--json" in refused.stderr
    assert json.loads(refused.stdout)["error"]["code"] == "usage" and not (tmp_path / "-").exists()
    errors_only = run("-o", str(tmp_path / "out.jsonl"), "--errors", "-", "--skip-invalid")
    assert [json.loads(x)["custom_id"] for x in errors_only.stdout.splitlines()] == ["bad"]
    assert [ln["custom_id"] for ln in read_jsonl(tmp_path / "out.jsonl")] == ["a", "b"]


def test_run_skip_invalid_keeps_rejected_lines_at_their_input_position(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "one"},
                                               {"custom_id": "bad", "prompt": "x", "top_p": 7},
                                               {"custom_id": "b", "prompt": "two"}])
    out = tmp_path / "out.jsonl"
    batchgen("run", src, "-o", str(out), "--skip-invalid", "--model", "m", "--engine", "echo", redis_url="x",
             check=True)
    lines = read_jsonl(out)
    assert [ln["custom_id"] for ln in lines] == ["a", "bad", "b"]
    assert lines[1]["response"]["body"]["error"]["param"] == "top_p"


def test_run_creates_the_errors_file_even_when_nothing_fails(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])
    errors = tmp_path / "sub" / "err.jsonl"
    batchgen("run", src, "-o", str(tmp_path / "out.jsonl"), "--errors", str(errors), "--model", "m", "--engine",
             "echo", redis_url="x", check=True)
    assert errors.exists() and errors.read_text() == ""


def test_results_creates_the_errors_file_even_when_nothing_fails(redis_url, redis_conn, tmp_path):
    client = BatchClient(connection=redis_conn)
    batch = client.submit([write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}])], model="echo-m").batch
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run()
    errors = tmp_path / "err.jsonl"
    batchgen("results", batch.id, "-o", str(tmp_path / "out.jsonl"), "--errors", str(errors), redis_url=redis_url,
             check=True)
    assert errors.exists() and errors.read_text() == ""


def test_run_rejects_a_bad_file_before_loading_any_model(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "top_p": 7}])
    proc = batchgen("run", src, "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-such-model"),
                    redis_url="x")
    stderr = proc.stderr.decode()
    assert proc.returncode == 3, stderr  # invalid input, not "model not found": the model was never looked at
    assert "top_p" in stderr and "engine path" not in stderr and not (tmp_path / "out.jsonl").exists()


def test_run_refuses_an_unwritable_output_before_loading_any_model(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    out = tmp_path / "in.jsonl" / "out.jsonl"  # its directory is a file
    proc = batchgen("run", src, "-o", str(out), "--model", str(tmp_path / "no-such-model"), "--json", redis_url="x")
    assert proc.returncode == 2, proc.stderr  # a usage error, found before the model was looked for
    assert json.loads(proc.stdout)["error"]["code"] == "unwritable_output"
    assert b"Traceback" not in proc.stderr and b"engine path" not in proc.stderr
    ok = batchgen("run", src, "-o", str(tmp_path / "new" / "out.jsonl"), "--model", str(tmp_path / "no-such-model"),
                  redis_url="x")
    assert ok.returncode == 10 and not (tmp_path / "new" / "out.jsonl").exists()  # the test left no empty file


def test_model_overriding_body_model_is_logged_with_a_count(redis_url, redis_conn, tmp_path):
    rows = [{"prompt": "a", "model": "gpt-4o"}, {"prompt": "b", "model": "gpt-4o"}, {"prompt": "c", "model": "m"},
            {"prompt": "d"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    ran = batchgen("run", src, "-o", str(tmp_path / "out.jsonl"), "--model", "m", "--engine", "echo", "--json",
                   redis_url="x", check=True)
    assert json.loads(ran.stdout)["model_overridden"] == 2
    assert "--model m overrides body.model on 2 line(s)" in ran.stderr.decode()
    sub = batchgen("submit", src, "--model", "m", redis_url=redis_url, check=True)
    assert "--model m overrides body.model on 2 line(s)" in sub.stderr.decode()
    quiet = batchgen("submit", write_jsonl(tmp_path / "same.jsonl", rows[2:]), "--model", "m", redis_url=redis_url,
                     check=True)
    assert "overrides" not in quiet.stderr.decode()


# -- the CLI says what it is doing -------------------------------------------------------------------------------

def test_wait_shows_tokens_per_second_and_an_eta_from_the_batch_and_its_workers():
    batch = Batch(id="b", status=BatchStatus.IN_PROGRESS, model="m", queue="batchgen:m:default", total=30,
                  counts={"num_succeeded": 8, "num_errored": 2}, timestamps={"in_progress_at": 1000})
    workers = [{"queues": "batchgen:m:high,batchgen:m:default", "tokens_per_s": "120.5"},
               {"queues": "batchgen:other:default", "tokens_per_s": "999"}]
    rates = batch_rates(batch, workers, now=1020.0)
    assert (rates.requests_per_s, rates.tokens_per_s, rates.eta_s) == (0.5, 120.5, 40.0)
    assert postfix(batch, rates) == "in_progress, 0.50 req/s, 120 tok/s, ETA 0m40s"
    ended = batch.model_copy(update={"status": BatchStatus.COMPLETED})
    assert batch_rates(ended, workers, now=1020.0).tokens_per_s == 0.0
    assert postfix(ended, batch_rates(ended, workers, now=1020.0)) == "completed"


def test_workers_json_has_numbers_as_numbers_and_names_the_device(redis_url, redis_conn, tmp_path):
    worker = start_worker("--model", "echo-m", "--engine", "echo", "--name", "w1", "--heartbeat-interval", "0.2",
                          redis_url=redis_url, log=tmp_path / "worker.log")
    try:
        def listed():
            proc = batchgen("workers", "--json", redis_url=redis_url, check=True)
            return json.loads(proc.stdout)
        (info,) = eventually(listed, "the worker to heartbeat")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    for key in ("batch_size", "max_batch_size", "num_unfinished", "vram_used_bytes", "vram_free_bytes",
                "requests_done", "chunks_held", "last_heartbeat"):
        assert type(info[key]) is int, (key, info[key])
    assert isinstance(info["tokens_per_s"], float | int) and info["gpu_temperature_c"] is None
    assert info["name"] == "w1" and info["device"] == "cpu"  # --device auto, no GPU memory: named, not "auto"


def test_the_worker_logs_one_start_up_block(redis_conn, caplog):
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    with caplog.at_level(logging.INFO, logger="batchgen.startup"):
        BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run()
    (block,) = [r.getMessage() for r in caplog.records if r.name == "batchgen.startup"]
    assert block.startswith("engine up: 'echo-m'") and "echo (no model)" in block


def test_the_start_up_block_of_the_8bit_engine_names_what_runs_where(demo_model_dir):
    from batchgen.worker.engine.llm_engine import LLMEngine
    from batchgen.worker.startup import startup_block, startup_facts

    cfg = WorkerConfig(EngineConfig(model=str(demo_model_dir), served_model_name="demo", max_batch_size=4))
    engine = LLMEngine.from_config(cfg.engine_config)
    stats = engine.stats()
    facts = startup_facts(stats, cfg)
    assert facts["engine_path"] == "fast" and facts["device"] == "cpu" and facts["compute_dtype"] == "float32"
    assert facts["int8_kernel"] == stats.extra["int8_kernel"]
    assert facts["kv_bytes_per_token"] == stats.extra["kv_bytes_per_token"] > 0
    assert facts["max_rows"] == 4 and facts["max_model_len"] == stats.extra["max_model_len"]
    block = startup_block(stats, cfg).splitlines()
    assert block[0] == f"engine up: 'demo' ({demo_model_dir})"
    shown = {line.split(maxsplit=1)[0] for line in block[1:]}
    assert shown == {"engine", "device", "compute", "int8", "VRAM", "KV", "max_model_len", "decode", "rows"}
    assert "  decode steps   eager" in block  # CUDA graphs need a GPU
    assert f"  KV bytes/token {stats.extra['kv_bytes_per_token']:,}" in block
    assert "  VRAM           n/a (not a GPU), reserve 500 MiB" in block


def test_fields_accepted_without_effect_are_named_in_one_log_line(tmp_path):
    rows = [{"prompt": "a", "user": "u1"}, {"prompt": "b", "user": "u2", "metadata": {"k": "v"}}, {"prompt": "c"},
            {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "d", "store": False}}]
    ran = batchgen("run", write_jsonl(tmp_path / "in.jsonl", rows), "-o", str(tmp_path / "out.jsonl"), "--model", "m",
                   "--engine", "echo", redis_url="x", check=True)
    stderr = ran.stderr.decode()
    assert "ignored (no effect on generation): metadata (1 line), store (1 line), user (2 lines)" in stderr
    assert stderr.count("ignored (no effect") == 1


def test_wait_on_a_terminal_draws_req_s_tok_s_and_eta_beside_the_bar(redis_url, redis_conn, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    from tests.cli import BATCHGEN, cli_env

    rows = [{"prompt": "a b c d e f", "max_tokens": 3} for _ in range(24)]
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", redis_url=redis_url,
                   check=True)
    batch_id = sub.stdout.decode().strip()
    worker = start_worker("--model", "echo-m", "--engine", "echo", "--burst", "--max-batch", "2", "--echo-step-delay",
                          "0.2", "--heartbeat-interval", "0.2", redis_url=redis_url, log=tmp_path / "worker.log")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `batchgen wait` on a terminal 120 columns wide
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.execve(BATCHGEN[0], [*BATCHGEN, "wait", batch_id, "--poll", "0.2"], cli_env(redis_url))
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except OSError:  # the child closed the terminal
        pass
    assert os.waitpid(pid, 0)[1] == 0
    assert worker.wait(timeout=60) == 0
    frames = [f for f in out.decode(errors="replace").replace("\r", "\n").splitlines() if f.strip()]
    assert any("req/s" in f and "tok/s" in f and "ETA" in f and "in_progress" in f for f in frames), frames[-5:]
    assert frames[-1].startswith(f"{batch_id}  completed")
