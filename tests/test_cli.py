"""The `batchgen` command end to end with real subprocesses: submit, worker, status, wait, results, cancel."""

import json
import subprocess
import sys

from tests.cli import batchgen, eventually, start_worker
from tests.conftest import data_keys


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_producer_commands_do_not_import_torch():
    code = ("import sys, batchgen.producer.cli, batchgen.producer.client, batchgen.jobs.store, batchgen.jobs.chunks;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','bitsandbytes')];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_submit_worker_wait_results_with_echo_engine(redis_url, redis_conn, tmp_path):
    rows = [{"custom_id": f"id-{i}", "prompt": f"alpha beta gamma {i}", "max_tokens": 3} for i in range(30)]
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", "--json",
                   "--output-dir", str(tmp_path / "out"), redis_url=redis_url, check=True)
    batch = json.loads(sub.stdout)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 30

    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", "--json", "--name", "w-json",
                          redis_url=redis_url, log=tmp_path / "worker.log")
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    logged = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]  # every line JSON
    assert {"time", "level", "logger", "message"} <= set(logged[0])
    assert any("burst done" in rec.get("message", "") for rec in logged)
    assert logged[-1] == {"name": "w-json", "requests_done": 30}

    waited = batchgen("wait", batch["id"], "--timeout", "30", "--json", redis_url=redis_url)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["request_counts"] == {"total": 30, "completed": 30, "failed": 0}

    out = tmp_path / "results.jsonl"
    exported = batchgen("results", batch["id"], "-o", str(out), "--ordered", "--json", redis_url=redis_url, check=True)
    assert json.loads(exported.stdout) == {"batch_id": batch["id"], "results": 30, "errors": 0, "output": str(out)}
    to_stdout = batchgen("results", batch["id"], "--json", redis_url=redis_url, check=True)
    assert len(to_stdout.stdout.splitlines()) == 30 and json.loads(to_stdout.stderr)["results"] == 30
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [ln["custom_id"] for ln in lines] == [r["custom_id"] for r in rows]
    assert lines[7]["response"]["body"]["choices"][0]["text"] == "alpha beta gamma"
    assert lines[7]["response"]["body"]["usage"]["completion_tokens"] == 3

    status = batchgen("status", batch["id"], redis_url=redis_url, check=True)
    assert b"completed" in status.stdout
    listed = json.loads(batchgen("list", "--json", redis_url=redis_url, check=True).stdout)
    assert [b["id"] for b in listed] == [batch["id"]]


def test_invalid_input_is_rejected_with_line_numbers_and_nothing_enqueued(redis_url, redis_conn, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": 5}\nnot json\n{"prompt": "x", "temperature": -1}\n')
    proc = batchgen("submit", str(path), "--model", "m", redis_url=redis_url)
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert ":2: invalid_type" in err and ":3: invalid_json" in err and ":4: invalid_value" in err
    assert "nothing was enqueued" in err
    assert data_keys(redis_conn) == []


def test_skip_invalid_puts_bad_lines_in_the_error_output(redis_url, redis_conn, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"custom_id": "good", "prompt": "a b"}\n{"custom_id": "bad", "prompt": ""}\n')
    proc = batchgen("submit", str(path), "--model", "m", "--skip-invalid", "--json", redis_url=redis_url, check=True)
    batch = json.loads(proc.stdout)
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 1}
    errors = tmp_path / "err.jsonl"
    batchgen("results", batch["id"], "-o", str(tmp_path / "ok.jsonl"), "--errors", str(errors),
             redis_url=redis_url, check=True)
    (err_line,) = [json.loads(x) for x in errors.read_text().splitlines()]
    assert err_line["custom_id"] == "bad" and err_line["response"]["body"]["error"]["code"] == "invalid_value"
    assert "line 2" in err_line["response"]["body"]["error"]["message"]


def test_skip_invalid_gives_each_custom_id_one_result_line(redis_url, redis_conn, tmp_path):
    """A skipped line whose custom_id an earlier line owns gets an error line named after its line number."""
    rows = [{"custom_id": "a", "prompt": "one two"},
            {"custom_id": "a", "prompt": "three"},  # a duplicate of line 1
            {"custom_id": "b", "prompt": ""},  # invalid: it owns b all the same (its error line carries it)
            {"custom_id": "b", "prompt": "four"},
            {"custom_id": "line-2", "prompt": "five"},  # the name line 2's error line took
            {"custom_id": "a", "prompt": "six", "temperature": 5}]  # its own error, and a duplicate
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", "--skip-invalid",
                   "--json", redis_url=redis_url, check=True)
    batch = json.loads(sub.stdout)
    assert batch["request_counts"] == {"total": 6, "completed": 0, "failed": 5}
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (2, "duplicate_custom_id"), (3, "invalid_value"), (4, "duplicate_custom_id"), (5, "duplicate_custom_id"),
        (6, "invalid_value")]
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    out, errors = tmp_path / "ok.jsonl", tmp_path / "err.jsonl"
    batchgen("results", batch["id"], "-o", str(out), "--errors", str(errors), redis_url=redis_url, check=True)
    (ok,) = [json.loads(x) for x in out.read_text().splitlines()]
    failed = {e["custom_id"]: e["response"]["body"]["error"] for e in map(json.loads, errors.read_text().splitlines())}
    assert ok["custom_id"] == "a" and ok["response"]["body"]["choices"][0]["text"] == "one two"
    assert sorted(failed) == ["b", "line-2", "line-4", "line-5", "line-6"]  # no id twice, none beside "a"'s
    assert failed["b"]["code"] == "invalid_value" and failed["b"]["message"].startswith("line 3: ")
    assert failed["line-2"] == {"code": "duplicate_custom_id", "param": "custom_id", "type": "invalid_request_error",
                                "message": "line 2: custom_id 'a' was already used on line 1"}
    assert failed["line-4"]["message"] == "line 4: custom_id 'b' was already used on line 3"
    assert failed["line-5"]["message"] == ("line 5: custom_id 'line-2' was already used on line 2 to name that "
                                           "skipped line's error line")
    assert failed["line-6"]["code"] == "invalid_value" and failed["line-6"]["param"] == "temperature"
    assert failed["line-6"]["message"].endswith("; and custom_id 'a' was already used on line 1")


def test_run_skip_invalid_names_a_duplicates_error_line_after_its_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "x y"}, {"custom_id": "a", "prompt": "z"}])
    out = tmp_path / "out.jsonl"
    batchgen("run", src, "-o", str(out), "--model", "m", "--engine", "echo", "--skip-invalid", redis_url="x",
             check=True)
    lines = {ln["custom_id"]: ln for ln in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == ["a", "line-2"] and lines["a"]["response"]["status_code"] == 200
    assert lines["line-2"]["response"]["body"]["error"]["code"] == "duplicate_custom_id"


def test_a_metadata_flag_without_a_value_is_a_usage_error_not_dropped(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    proc = batchgen("submit", src, "--model", "m", "--metadata", "team", "--json", redis_url=redis_url)
    assert proc.returncode == 2 and b"'team' is not key=value" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["error"]["code"] == "usage"
    assert data_keys(redis_conn) == []
    kept = batchgen("submit", src, "--model", "m", "--metadata", "a=b=c", "--json", redis_url=redis_url, check=True)
    assert json.loads(kept.stdout)["metadata"] == {"a": "b=c"}


def test_submit_metadata_keeps_openais_limits_as_serve_does(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    too_many = [arg for i in range(17) for arg in ("--metadata", f"k{i}=v")]
    for args, what in [(too_many, "16 key-value pairs"), (["--metadata", "k" * 65 + "=v"], "at most 64"),
                       (["--metadata", "k=" + "v" * 513], "at most 512")]:
        proc = batchgen("submit", src, "--model", "m", *args, "--json", redis_url=redis_url)
        assert proc.returncode == 2 and what.encode() in proc.stderr, proc.stderr
        assert json.loads(proc.stdout)["error"]["code"] == "usage"
    assert data_keys(redis_conn) == []
    kept = batchgen("submit", src, "--model", "m", "--metadata", "k" * 64 + "=" + "v" * 512, "--json",
                    redis_url=redis_url, check=True)
    assert json.loads(kept.stdout)["metadata"] == {"k" * 64: "v" * 512}


def test_list_limit_below_one_is_a_usage_error_not_every_batch(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for _ in range(2):
        batchgen("submit", src, "--model", "m", redis_url=redis_url, check=True)
    assert len(json.loads(batchgen("list", "--limit", "1", "--json", redis_url=redis_url, check=True).stdout)) == 1
    for limit in ("0", "-1"):
        assert batchgen("list", "--limit", limit, redis_url=redis_url).returncode == 2


def test_exit_codes_for_scripts(redis_url, redis_conn, tmp_path):
    assert batchgen("status", "batch_nope", redis_url=redis_url).returncode == 4
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]), "--model", "nobody-serves",
                   redis_url=redis_url, check=True)
    batch_id = sub.stdout.decode().strip()
    assert batchgen("wait", batch_id, "--timeout", "0.5", "--poll", "0.1", redis_url=redis_url).returncode == 5
    cancelled = batchgen("cancel", batch_id, "--json", redis_url=redis_url, check=True)
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert batchgen("wait", batch_id, redis_url=redis_url).returncode == 1
    assert batchgen("list", redis_url="redis://127.0.0.1:1/0").returncode == 6


def test_stdin_and_text_inputs(redis_url, redis_conn, tmp_path):
    proc = batchgen("submit", "-", "--model", "m", "--json", redis_url=redis_url, check=True,
                    input=b"first prompt\nsecond prompt\n")
    assert json.loads(proc.stdout)["request_counts"]["total"] == 2


def test_list_shows_an_overdue_batch_as_expired_as_status_does(redis_url, redis_conn, tmp_path):
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}]), "--model", "nobody-serves",
                   "--completion-window", "1s", redis_url=redis_url, check=True)
    batch_id = sub.stdout.decode().strip()

    def listed_expired() -> bool:
        (listed,) = json.loads(batchgen("list", "--json", redis_url=redis_url, check=True).stdout)
        return listed["status"] == "expired" and listed["request_counts"]["failed"] == 1

    eventually(listed_expired, "list to show the overdue batch as expired", timeout_s=10, poll_s=0.2)
    assert json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url).stdout)["status"] == "expired"


def test_an_expired_batch_leaves_no_chunk_on_its_queue_as_a_cancelled_one(redis_url, redis_conn, tmp_path):
    """Nothing would run the chunks, but `rq info` and idle workers counted them as waiting."""
    from batchgen.jobs.chunks import make_queue, pending_chunks_key

    rows = [{"prompt": f"p{i}"} for i in range(5)]
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "nobody-serves", "--chunk-size",
                   "1", "--completion-window", "4s", redis_url=redis_url, check=True)
    batch_id = sub.stdout.decode().strip()
    queue = make_queue("nobody-serves", "default", redis_conn)
    # whole seconds: a 1s window could end before submit returned on a slow host, and submit's own closing read
    # (client.get expires overdue batches) swept it
    assert redis_conn.llen(queue.key) == 2 and redis_conn.llen(pending_chunks_key(batch_id)) == 3  # the window
    eventually(lambda: json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url).stdout)["status"]
               == "expired", "the batch to expire", timeout_s=20, poll_s=0.3)
    assert redis_conn.llen(queue.key) == 0 and not redis_conn.exists(pending_chunks_key(batch_id))


def test_in_progress_at_is_when_a_worker_starts_the_batch_not_when_it_is_queued(redis_url, redis_conn, tmp_path):
    """OpenAI's in_progress_at is "when the batch started processing": a queued batch has none, so no rate or ETA."""
    from batchgen.jobs.store import BatchStore
    from batchgen.producer.progress import batch_rates, postfix

    rows = [{"custom_id": f"id-{i}", "prompt": f"p {i}"} for i in range(3)]
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", "--json",
                   redis_url=redis_url, check=True)
    batch_id = json.loads(sub.stdout)["id"]
    queued = json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url, check=True).stdout)
    (listed,) = json.loads(batchgen("list", "--json", redis_url=redis_url, check=True).stdout)
    assert queued["status"] == listed["status"] == "in_progress"
    assert json.loads(sub.stdout)["in_progress_at"] is None
    assert "in_progress_at" in queued and queued["in_progress_at"] is None and listed["in_progress_at"] is None
    waiting = BatchStore(redis_conn).get(batch_id)
    rates = batch_rates(waiting, [], now=queued["created_at"] + 60.0)
    assert rates.requests_per_s is None and rates.eta_s is None
    assert postfix(waiting, rates).startswith("in_progress, ? req/s")

    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    done = json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url, check=True).stdout)
    assert done["status"] == "completed"
    assert queued["created_at"] <= done["in_progress_at"] <= done["completed_at"]


def test_a_batch_cancelled_or_expired_before_any_worker_ran_never_started(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    cancelled_id = batchgen("submit", src, "--model", "echo-m", redis_url=redis_url, check=True).stdout.decode().strip()
    cancelled = json.loads(batchgen("cancel", cancelled_id, "--json", redis_url=redis_url, check=True).stdout)
    assert cancelled["status"] == "cancelled" and cancelled["in_progress_at"] is None
    expiring_id = batchgen("submit", src, "--model", "echo-m", "--completion-window", "1s", redis_url=redis_url,
                           check=True).stdout.decode().strip()

    def expired() -> dict | None:
        shown = json.loads(batchgen("status", expiring_id, "--json", redis_url=redis_url).stdout)
        return shown if shown["status"] == "expired" else None

    assert eventually(expired, "the batch to expire", timeout_s=10, poll_s=0.2)["in_progress_at"] is None
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    for batch_id in (cancelled_id, expiring_id):  # a worker coming later does not start an ended batch
        assert json.loads(batchgen("status", batch_id, "--json", redis_url=redis_url).stdout)["in_progress_at"] is None


def test_demo_model_json_names_a_loadable_model(tmp_path):
    made = batchgen("demo-model", str(tmp_path / "demo"), "--json", redis_url="redis://unused", check=True)
    path = json.loads(made.stdout)["path"]
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert path == str(tmp_path / "demo") and config["model_type"] == "llama"


def test_submit_shows_validation_progress_on_a_terminal_only(redis_url, redis_conn, tmp_path):
    """On a terminal, submit shows a line counter while it validates and stores; piped or --json, stderr stays
    clean for scripts."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from batchgen.jobs.workers import WorkerRegistry

    from tests.cli import BATCHGEN, cli_env

    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p {i}", "max_tokens": 2} for i in range(500)])
    WorkerRegistry(redis_conn).heartbeat("w", {"name": "w", "model": "m"}, ttl_s=60)  # else: "no live worker" warning
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.run([*BATCHGEN, "submit", src, "--model", "m"], stderr=terminal, capture_output=False,
                          stdout=subprocess.PIPE, env=cli_env(redis_url), timeout=60)
    os.close(terminal)
    shown = b""
    while chunk := _read_available(controller):
        shown += chunk
    os.close(controller)
    assert proc.returncode == 0 and proc.stdout.startswith(b"batch_")
    assert shown.startswith(b"\rvalidating: 0 lines") and shown.endswith(b"\r")  # shown, then cleared
    piped = batchgen("submit", src, "--model", "m", redis_url=redis_url, check=True)
    assert piped.stderr == b""


def _read_available(fd: int) -> bytes:
    import os
    import select

    if not select.select([fd], [], [], 0.5)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal side is closed and drained
        return b""


def worker_params(*args: str) -> dict:
    """The `batchgen worker` flags as click parses them (flags, then env, then defaults)."""
    from batchgen.producer.cli import worker

    return worker.make_context("worker", ["--model", "m", *args]).params


def test_engine_knobs_are_flags_with_their_env_names(monkeypatch):
    from batchgen.producer.cli import engine_config

    default = engine_config(worker_params())
    assert (default.int8_kernel, default.attention, default.cuda_graphs, default.host_kv_dtype,
            default.inject_oom, default.tuned_kernels, default.mixed_steps,
            default.max_prefill_tokens) == ("auto", "auto", True, "auto", None, True, False, None)
    flags = engine_config(worker_params("--int8-kernel", "weight_only", "--attention", "sdpa", "--no-cuda-graphs",
                                        "--host-kv-dtype", "int8", "--inject-oom", "steps=2", "--no-tuned-kernels",
                                        "--mixed-steps", "--max-prefill-tokens", "8192"))
    assert (flags.int8_kernel, flags.attention, flags.cuda_graphs, flags.host_kv_dtype,
            flags.inject_oom, flags.tuned_kernels, flags.mixed_steps,
            flags.max_prefill_tokens) == ("weight_only", "sdpa", False, "int8", "steps=2", False, True, 8192)
    for name, value in {"INT8_KERNEL": "bnb", "ATTENTION": "flash", "CUDA_GRAPHS": "0", "HOST_KV_DTYPE": "bfloat16",
                        "INJECT_OOM": "p=0.5", "MAX_BATCH": "3", "VRAM_RESERVE": "1GiB", "TUNED_KERNELS": "0",
                        "MAX_PREFILL_TOKENS": "16384"}.items():
        monkeypatch.setenv(f"BATCHGEN_{name}", value)
    env = engine_config(worker_params())
    assert (env.int8_kernel, env.attention, env.cuda_graphs, env.host_kv_dtype, env.inject_oom, env.max_batch_size,
            env.vram_reserve_bytes, env.tuned_kernels, env.max_prefill_tokens) == ("bnb", "flash", False, "bfloat16",
                                                                                   "p=0.5", 3, 2**30, False, 16384)


def test_a_bad_engine_knob_is_a_usage_error_before_any_model_loads(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    bad_flag = batchgen("run", src, "-o", str(tmp_path / "out.jsonl"), "--model", "m", "--engine", "echo",
                        "--attention", "xformers", redis_url="unused")
    assert bad_flag.returncode == 2 and b"attention must be one of" in bad_flag.stderr
    bad_env = batchgen("run", src, "-o", str(tmp_path / "out.jsonl"), "--model", "m", "--engine", "echo",
                       redis_url="unused", BATCHGEN_INT8_KERNEL="fp4")
    assert bad_env.returncode == 2 and b"int8_kernel must be" in bad_env.stderr


def test_gpus_children_get_the_on_off_flags_the_user_gave():
    from batchgen.producer.cli import worker
    from batchgen.worker.launcher import command_line_args

    ctx = worker.make_context("worker", ["--model", "m", "--no-cuda-graphs", "--gpus", "0,1", "--attention", "sdpa"])
    assert command_line_args(ctx) == ["--model", "m", "--attention", "sdpa", "--no-cuda-graphs"]


def test_the_worker_config_loads_without_torch():
    """An echo worker (and the --gpus supervisor) builds its whole config without importing torch."""
    code = ("import sys, batchgen.worker.config, batchgen.worker.factory;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','bitsandbytes')];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_engine_config_names_the_int8_kernels_there_are():
    from batchgen.worker.engine import config, int8_linear

    assert set(config.INT8_KERNELS) == {"bnb", *int8_linear._FAST_KERNELS}
