"""`batchgen serve` through the official OpenAI SDK: a real server subprocess, a real Redis, a real worker.

The main flow runs the tiny 8-bit model in a worker subprocess and compares every custom_id with
`batchgen run` on the same file (the in-process path, itself checked against HF generate in test_e2e_llm).
"""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from batchgen.jobs.keys import BatchKeys
from batchgen.jobs.states import BatchStatus
from openai.types import Batch, FileObject
from openai.types.responses import Response as ResponseObject
from redis import Redis

from tests.cli import BATCHGEN, batchgen, cli_env, eventually, start_worker
from tests.redis_server import RedisServer

PROMPTS = [
    "the quick brown fox",
    "write a short poem about the sea and the stars",
    "hello",
    "what is the capital of france and why is it famous",
    "list three prime numbers",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `batchgen serve` subprocess on a free port; restartable on the same files dir and Redis."""

    def __init__(self, redis_url: str, files_dir: Path, log: Path, *args: str):
        self.redis_url, self.files_dir, self.log, self.args = redis_url, files_dir, log, args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        fh = open(self.log, "ab")  # noqa: SIM115 - the file lives as long as the process
        self.proc = subprocess.Popen(
            [*BATCHGEN, "serve", "--port", str(self.port), "--files-dir", str(self.files_dir),
             "--history-interval", "1", *self.args],
            stdout=fh, stderr=subprocess.STDOUT, env=cli_env(self.redis_url), start_new_session=True)
        eventually(self._up, f"batchgen serve on port {self.port}", timeout_s=60, poll_s=0.2)
        return self

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(self.base + "/", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def sdk(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=60) as res:
            return json.load(res)


def completion_lines(model: str, prompts=PROMPTS) -> list[dict]:
    return [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": p, "max_tokens": 4 + 3 * (i % 4), "temperature": 0}}
            for i, p in enumerate(prompts)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(jsonl: str) -> dict[str, str]:
    return {ln["custom_id"]: ln["response"]["body"]["choices"][0]["text"]
            for ln in map(json.loads, jsonl.splitlines())}


def run_until_done(poll, worker: subprocess.Popen, oracle: subprocess.Popen, log: Path):
    """poll() every half second until it returns the ended batch, the worker up all along; then the worker and the
    oracle run (`batchgen run` on the same file) must exit cleanly."""
    try:
        while (done := poll()) is None:
            assert worker.poll() in (None, 0), log.read_text()[-3000:]
            time.sleep(0.5)
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert oracle.wait(timeout=300) == 0, oracle.stderr.read()[-2000:]
    return done


def upload_and_create(sdk: openai.OpenAI, path: Path, **kw) -> Batch:
    with open(path, "rb") as fh:
        uploaded = sdk.files.create(file=fh, purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h", **kw)


@pytest.mark.slow
def test_an_sdk_batch_script_runs_to_completion_and_matches_the_oracle(server, demo_model_dir, redis_url, tmp_path):
    src = write_jsonl(tmp_path / "batch.jsonl", completion_lines("demo"))
    sdk = server.sdk()
    with open(src, "rb") as fh:
        uploaded = sdk.files.create(file=fh, purpose="batch")
    assert FileObject.model_validate(server.get_json(f"/v1/files/{uploaded.id}")).bytes == src.stat().st_size
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h",
                               metadata={"job": "nightly"})
    assert batch.status == "in_progress" and batch.input_file_id == uploaded.id
    assert batch.metadata == {"job": "nightly"} and batch.request_counts.total == len(PROMPTS)

    oracle_out = tmp_path / "oracle.jsonl"
    oracle = subprocess.Popen([*BATCHGEN, "run", str(src), "-o", str(oracle_out), "--model", str(demo_model_dir),
                               "--served-model-name", "demo", "--json"], env=cli_env(redis_url),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker = start_worker("--model", str(demo_model_dir), "--served-model-name", "demo", "--max-batch", "2",
                          "--burst", redis_url=redis_url, log=tmp_path / "worker.log")

    def poll() -> Batch | None:
        now = sdk.batches.retrieve(batch.id)
        Batch.model_validate(server.get_json(f"/v1/batches/{batch.id}"))  # strict, not the SDK's lenient build
        if now.output_file_id:  # readable while the batch runs
            assert set(texts(sdk.files.content(now.output_file_id).text)) <= {f"p{i}" for i in range(len(PROMPTS))}
        return now if now.status in ("completed", "failed", "expired", "cancelled") else None

    batch = run_until_done(poll, worker, oracle, tmp_path / "worker.log")

    assert batch.status == "completed", batch
    final = Batch.model_validate(server.get_json(f"/v1/batches/{batch.id}"))
    assert final.request_counts.completed == len(PROMPTS) and final.request_counts.failed == 0
    assert final.completed_at and final.in_progress_at and final.error_file_id is None
    got = texts(sdk.files.content(final.output_file_id).text)
    assert got == texts(oracle_out.read_text()) and len(got) == len(PROMPTS)
    assert sdk.files.retrieve(final.output_file_id).purpose == "batch_output"


def test_cancel_closes_every_request_and_lists_them_in_the_error_file(server, tmp_path):
    sdk = server.sdk()
    batch = upload_and_create(sdk, write_jsonl(tmp_path / "b.jsonl", completion_lines("nobody-serves-this")))
    cancelled = sdk.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.cancelling_at
    assert cancelled.in_progress_at is None  # no worker ever started it
    assert cancelled.request_counts.failed == len(PROMPTS) and cancelled.request_counts.completed == 0
    errors = [json.loads(x) for x in sdk.files.content(cancelled.error_file_id).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == [f"p{i}" for i in range(len(PROMPTS))]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert cancelled.output_file_id is None  # no request succeeded: no output file, as OpenAI
    assert sdk.batches.cancel(batch.id).status == "cancelled"  # idempotent


def test_batches_and_files_page_with_a_cursor(server, tmp_path):
    sdk = server.sdk()
    src = write_jsonl(tmp_path / "b.jsonl", completion_lines("m", PROMPTS[:1]))
    with open(src, "rb") as fh:
        file_id = sdk.files.create(file=fh, purpose="batch").id
    created = [sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id
               for _ in range(5)]
    first = sdk.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    everything = [b.id for b in sdk.batches.list(limit=2)]  # the SDK follows `after` through every page
    assert sorted(everything) == sorted(created) and len(everything) == 5
    page = server.get_json(f"/v1/batches?limit=2&after={first.data[-1].id}")
    assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
    assert [b["id"] for b in page["data"]] == everything[2:4] and page["has_more"]
    last = server.get_json(f"/v1/batches?limit=2&after={everything[3]}")
    assert [b["id"] for b in last["data"]] == everything[4:] and not last["has_more"]
    assert [f.id for f in sdk.files.list()] == [file_id]


def test_files_list_shows_a_batchs_output_and_error_files_once_they_exist(server, redis_url, tmp_path):
    sdk = server.sdk()
    rows = completion_lines("echo-m", ["fine", "bad\u0000byte"])  # the echo engine fails a NUL prompt
    with open(write_jsonl(tmp_path / "b.jsonl", rows), "rb") as fh:
        upload = sdk.files.create(file=fh, purpose="batch").id
    batch = sdk.batches.create(input_file_id=upload, endpoint="/v1/completions", completion_window="24h")
    assert [f.id for f in sdk.files.list()] == [upload]  # nothing has run: no result file yet
    assert sdk.batches.retrieve(batch.id).in_progress_at is None  # queued, not started processing
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id and batch.error_file_id
    assert batch.created_at <= batch.in_progress_at <= batch.completed_at
    results = {batch.output_file_id, batch.error_file_id}

    assert {f.id for f in sdk.files.list()} == {upload, *results}
    listed = sdk.files.list(purpose="batch_output").data
    assert {f.id for f in listed} == results and {f.purpose for f in listed} == {"batch_output"}
    for f in listed:  # strict, not the SDK's lenient build; bytes as the content has them
        assert FileObject.model_validate(f.model_dump()).bytes == len(sdk.files.content(f.id).content) > 0
    assert [f.id for f in sdk.files.list(purpose="batch")] == [upload]
    assert len([f.id for f in sdk.files.list(limit=1)]) == 3  # the SDK pages through them with `after`
    pages = {order: server.get_json(f"/v1/files?order={order}") for order in ("asc", "desc")}
    ids = {order: [FileObject.model_validate(f).id for f in page["data"]] for order, page in pages.items()}
    assert ids["asc"] == ids["desc"][::-1] and ids["asc"][0] == upload and not pages["asc"]["has_more"]


def test_a_responses_batch_runs_through_the_sdk_and_answers_as_responses(server, redis_url, tmp_path):
    """endpoint /v1/responses, as the OpenAI SDK creates it: every line must use it, and each output line's body
    validates as the openai package's Response (the echo engine answers with the input's first words)."""
    sdk = server.sdk()
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
             "body": {"model": "echo-m", "input": prompt, "max_output_tokens": 3}} for i, prompt in enumerate(PROMPTS)]
    with open(write_jsonl(tmp_path / "r.jsonl", rows), "rb") as fh:
        upload = sdk.files.create(file=fh, purpose="batch").id
    with pytest.raises(openai.BadRequestError):  # OpenAI's rule: the batch's endpoint is every line's url
        sdk.batches.create(input_file_id=upload, endpoint="/v1/chat/completions", completion_window="24h")
    batch = sdk.batches.create(input_file_id=upload, endpoint="/v1/responses", completion_window="24h")
    assert batch.endpoint == "/v1/responses"
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == len(PROMPTS)
    lines = [json.loads(x) for x in sdk.files.content(batch.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: ResponseObject.model_validate(line["response"]["body"]) for line in lines}
    for i, prompt in enumerate(PROMPTS):
        words = prompt.split()
        assert by_id[f"r{i}"].output_text == " ".join(words[:3])
        assert by_id[f"r{i}"].status == ("incomplete" if len(words) > 3 else "completed")


def test_a_final_batchs_result_file_sizes_are_kept_so_listing_does_not_read_its_lines_again(server, redis_url,
                                                                                            redis_conn, tmp_path):
    sdk = server.sdk()
    with open(write_jsonl(tmp_path / "b.jsonl", completion_lines("echo-m", ["fine", "bad\u0000byte"])), "rb") as fh:
        upload = sdk.files.create(file=fh, purpose="batch").id
    batch = sdk.batches.create(input_file_id=upload, endpoint="/v1/completions", completion_window="24h")
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed"
    sizes = BatchKeys(batch.id).sizes
    assert not redis_conn.exists(sizes)
    listed = {f.id: f.bytes for f in sdk.files.list(purpose="batch_output")}
    content = {file_id: len(sdk.files.content(file_id).content) for file_id in listed}
    assert listed == content and min(content.values()) > 0
    assert {k: int(v) for k, v in redis_conn.hgetall(sizes).items()} == {
        "output": content[batch.output_file_id], "errors": content[batch.error_file_id]}
    record_ttl = redis_conn.ttl(BatchKeys(batch.id).record)
    assert record_ttl > 0 and abs(redis_conn.ttl(sizes) - record_ttl) <= 1  # gone with the batch
    redis_conn.hset(sizes, "output", 7)  # what a later listing shows is the kept size, not the lines read again
    assert {f.id: f.bytes for f in sdk.files.list(purpose="batch_output")}[batch.output_file_id] == 7


def test_a_bad_file_is_refused_with_its_line_errors_and_nothing_is_stored(server, tmp_path):
    sdk = server.sdk()
    rows = completion_lines("m", PROMPTS[:3])
    bad = "".join(json.dumps(r) + "\n" for r in rows[:1]) + "{not json\n" + json.dumps({**rows[1], "custom_id": ""}) + "\n"
    (tmp_path / "bad.jsonl").write_text(bad)
    with open(tmp_path / "bad.jsonl", "rb") as fh, pytest.raises(openai.BadRequestError) as err:
        sdk.files.create(file=fh, purpose="batch")
    body = err.value.body
    assert body["code"] == "invalid_file" and body["type"] == "invalid_request_error"
    assert [e["line"] for e in body["errors"]["data"]] == [2, 3]
    assert [e["param"] for e in body["errors"]["data"]] == [None, "custom_id"]  # the field, as `submit` names it
    assert "line 2" in body["message"]
    assert list(sdk.files.list()) == [] and list((tmp_path / "files").iterdir()) == []


def test_an_empty_upload_is_refused_by_its_own_name_not_the_servers_staging_path(server, tmp_path):
    with pytest.raises(openai.BadRequestError) as err:
        server.sdk().files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    (line_error,) = err.value.body["errors"]["data"]
    assert line_error["code"] == "empty_input" and line_error["message"].startswith("empty.jsonl: ")
    assert str(tmp_path) not in err.value.body["message"] and ".part" not in err.value.body["message"]


def test_the_batch_endpoint_must_match_every_line(server, tmp_path):
    sdk = server.sdk()
    with open(write_jsonl(tmp_path / "b.jsonl", completion_lines("m")), "rb") as fh:
        file_id = sdk.files.create(file=fh, purpose="batch").id
    with pytest.raises(openai.BadRequestError) as err:
        sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert err.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_doesnotexist")


def test_metadata_over_openais_limits_is_refused_and_at_them_accepted(server, tmp_path):
    sdk = server.sdk()
    with open(write_jsonl(tmp_path / "b.jsonl", completion_lines("m", PROMPTS[:1])), "rb") as fh:
        file_id = sdk.files.create(file=fh, purpose="batch").id
    create = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    for metadata, what in [({"k" * 65: "v"}, "at most 64"), ({"k": "v" * 513}, "at most 512"),
                           ({f"k{i}": "v" for i in range(17)}, "16 key-value pairs")]:
        with pytest.raises(openai.BadRequestError) as err:
            sdk.batches.create(**create, metadata=metadata)
        body = err.value.body
        assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", "metadata", "invalid_value")
        assert what in body["message"]
    assert list(sdk.batches.list()) == []
    at_limits = {"k" * 64: "v" * 512, **{f"k{i}": "v" for i in range(15)}}
    assert sdk.batches.create(**create, metadata=at_limits).metadata == at_limits


def test_a_wrong_url_and_a_malformed_body_get_openais_error_shape(server):
    wrong = openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0)  # "/v1" left out
    with pytest.raises(openai.NotFoundError) as err:
        wrong.batches.list()
    assert err.value.body == {"message": "Invalid URL (GET /batches)", "type": "invalid_request_error",
                              "param": None, "code": None}
    request = urllib.request.Request(server.base + "/v1/batches", data=b'{"input_file_id": "f"', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=30)
    error = json.load(bad.value)["error"]
    assert bad.value.code == 400 and error["param"] is None and error["code"] == "invalid_json"
    assert error["message"].startswith("the request body is not valid JSON")


def test_api_keys_are_required_when_set(redis_url, redis_conn, tmp_path):
    srv = Server(redis_url, tmp_path / "files", tmp_path / "serve.log", "--api-key", "k1", "--api-key", "k2").start()
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            list(srv.sdk("wrong").batches.list())
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key" and err.value.body["type"] == "invalid_request_error"
        with pytest.raises(urllib.error.HTTPError) as http_err:
            srv.get_json("/dashboard/state")
        assert http_err.value.code == 401
        assert list(srv.sdk("k2").batches.list()) == []
    finally:
        srv.stop()


def test_serve_without_redis_exits_6_with_one_line(tmp_path):
    proc = batchgen("serve", "--port", str(free_port()), "--files-dir", str(tmp_path / "files"),
                    redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout=60)
    assert proc.returncode == 6, proc.stderr  # README: 6 is "Redis unreachable", as for every other command
    assert b"Traceback" not in proc.stderr and b"cannot reach Redis" in proc.stderr


def test_serve_refuses_an_evicting_redis_at_start_as_submit_does(tmp_path):
    with RedisServer(tmp_path / "redis") as redis_server:
        Redis.from_url(redis_server.url).config_set("maxmemory-policy", "allkeys-lru")
        proc = batchgen("serve", "--port", str(free_port()), "--files-dir", str(tmp_path / "files"),
                        redis_url=redis_server.url, timeout=20)  # before the check it served on
    assert proc.returncode == 8, proc.stderr  # not a server whose every batches.create is a bare 500
    assert b"maxmemory-policy" in proc.stderr and b"Traceback" not in proc.stderr


def test_without_a_key_it_refuses_to_listen_beyond_this_machine(redis_url):
    proc = batchgen("serve", "--host", "0.0.0.0", "--port", str(free_port()), redis_url=redis_url, timeout=60)
    assert proc.returncode == 2 and b"--api-key" in proc.stderr


def test_a_100k_line_upload_streams_in_and_out_and_survives_a_restart(server, tmp_path):
    src = tmp_path / "big.jsonl"
    with open(src, "w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "m", "messages": [{"role": "user", "content": f"row {i}"}],
                                          "max_tokens": 8}}) + "\n")
    sdk = server.sdk()
    with open(src, "rb") as fh:
        uploaded = sdk.files.create(file=fh, purpose="batch")
    assert uploaded.bytes == src.stat().st_size
    server.stop()
    server.start()
    assert [f.id for f in server.sdk().files.list()] == [uploaded.id]
    down = tmp_path / "down.jsonl"
    server.sdk().files.content(uploaded.id).write_to_file(down)
    assert down.read_bytes() == src.read_bytes()
    assert server.sdk().files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        server.sdk().files.retrieve(uploaded.id)


def test_the_cli_loads_no_web_stack_until_serve_runs():
    code = ("import sys; from click.testing import CliRunner; from batchgen.producer.cli import main; "
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_compose_serves_the_api_from_the_project_image():
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    serve = compose["services"]["serve"]
    assert serve["command"][0] == "serve" and serve["build"] == "."
    assert serve["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert all(p.startswith("127.0.0.1:") for p in serve["ports"])  # no key by default: this host only
    assert any(v.endswith(":" + serve["environment"]["BATCHGEN_FILES_DIR"]) for v in serve["volumes"])


@pytest.mark.parametrize("status", list(BatchStatus))
def test_every_status_renders_as_a_valid_openai_batch(status):
    from batchgen.jobs.batch import Batch as OurBatch
    from batchgen.jobs.openai_batch import render

    ours = OurBatch(id="batch_x", status=status, model="m", endpoint="/v1/completions", total=3,
                    counts={"num_succeeded": 1, "num_errored": 1}, timestamps={"created_at": 5, "expires_at": 9},
                    metadata={"k": "v"})
    batch = Batch.model_validate(render(ours, {"input_file_id": "file-1", "completion_window": "24h"}))
    assert batch.request_counts.failed == 1 and batch.input_file_id == "file-1"
    assert batch.output_file_id == "file-output-batch_x" and batch.error_file_id == "file-errors-batch_x"
