"""Security: nothing but JSON on Redis, auth/ACL/TLS connections, hostile inputs, file names, limits.

- No pickle anywhere: after a full run every value in the database is UTF-8 text/JSON, or RQ's
  zlib-compressed JSON (job data); nothing starts with pickle's b"\\x80".
- REDIS_URL with a password, an ACL user and TLS (rediss://, self-signed CA made with openssl) all
  carry submit + worker + wait; a wrong password is exit 6 with a clear message.
- Every malformed-corpus file is refused by `batchgen submit` with exit 3, a line-numbered error, and
  an empty Redis.
- custom_ids are never file names; result files hold whole lines only; input limits come from env.
"""

import json
import multiprocessing
import os
import zlib
from pathlib import Path

import pytest
from batchgen.jobs.states import BatchStatus
from batchgen.producer.cli import main as cli_main
from batchgen.producer.client import BatchClient
from batchgen.producer.config import ProducerConfig
from batchgen.worker.config import WorkerConfig
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.result_files import append_lines
from batchgen.worker.worker import BatchWorker
from click.testing import CliRunner
from redis import Redis

from tests.cli import batchgen, start_worker
from tests.conftest import data_keys
from tests.redis_server import RedisServer, redis_supports_tls

BAD = Path(__file__).parent / "data" / "bad"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text())
LIMIT_ENV = {"max_line_bytes": "BATCHGEN_MAX_LINE_BYTES", "max_requests": "BATCHGEN_MAX_REQUESTS",
             "max_tokens": "BATCHGEN_MAX_TOKENS_LIMIT"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- (a) no pickle on Redis ----------------------------------------------------------------------------

def all_values(conn: Redis) -> list[tuple[str, bytes]]:
    """(key, value) for every value of every key: strings, hash values, list/set/zset members, streams."""
    out = []
    for key in conn.scan_iter(count=1000):
        name = key.decode()
        kind = conn.type(key).decode()
        if kind == "string":
            out.append((name, conn.get(key)))
        elif kind == "hash":
            out += [(f"{name}[{f.decode(errors='replace')}]", v) for f, v in conn.hgetall(key).items()]
        elif kind == "list":
            out += [(name, v) for v in conn.lrange(key, 0, -1)]
        elif kind == "set":
            out += [(name, v) for v in conn.smembers(key)]
        elif kind == "zset":
            out += [(name, v) for v in conn.zrange(key, 0, -1)]
        elif kind == "stream":
            for _, fields in conn.xrange(key):
                out += [(f"{name}[{f.decode()}]", v) for f, v in fields.items()]
        else:
            raise AssertionError(f"unexpected key type {kind} for {name}")
    return out


def assert_json_or_text(key: str, value: bytes) -> None:
    assert not value.startswith(b"\x80"), f"{key} holds a pickle"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        # Binary is only allowed as RQ's zlib-compressed job data, and it must be JSON inside.
        raw = zlib.decompress(value)
        assert not raw.startswith(b"\x80"), f"{key} holds a compressed pickle"
        json.loads(raw)
        return
    if text[:1] in ("{", "["):
        json.loads(text)


def test_nothing_on_redis_is_pickle_after_submit_work_results_and_cancel(redis_conn, tmp_path):
    client = BatchClient(ProducerConfig(chunk_size=4), connection=redis_conn)
    rows = [{"custom_id": f"r{i}", "prompt": f"a b c {i}", "max_tokens": 2} for i in range(10)]
    done = client.submit([write_jsonl(tmp_path / "a.jsonl", rows)], model="echo-m").batch
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m", max_batch_size=4), redis_conn).run() == 10
    assert len(list(client.results(done.id))) == 10
    cancelled = client.submit([write_jsonl(tmp_path / "b.jsonl", rows)], model="echo-m").batch
    assert client.cancel(cancelled.id).status == BatchStatus.CANCELLED

    raw = Redis(connection_pool=redis_conn.connection_pool.__class__(
        **{**redis_conn.connection_pool.connection_kwargs, "decode_responses": False}))
    values = all_values(raw)
    assert any(k.startswith("rq:job:") for k, _ in values), "RQ job hashes should be there"
    compressed = 0
    for key, value in values:
        assert_json_or_text(key, value)
        compressed += key.endswith("[data]")
    assert compressed >= 3  # job data was checked through zlib + JSON, not skipped


# -- (b) password, ACL user, TLS -------------------------------------------------------------------------

def run_batch_through(url: str, tmp_path: Path) -> None:
    """submit (CLI) -> worker subprocess -> wait (CLI) -> results, all through `url`."""
    rows = [{"custom_id": f"r{i}", "prompt": "one two three", "max_tokens": 2} for i in range(5)]
    sub = batchgen("submit", write_jsonl(tmp_path / "in.jsonl", rows), "--model", "echo-m", redis_url=url)
    assert sub.returncode == 0, sub.stderr.decode()
    batch_id = sub.stdout.decode().strip()
    worker = start_worker("--engine", "echo", "--model", "echo-m", "--burst", redis_url=url,
                          log=tmp_path / "worker.log")
    assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()
    waited = batchgen("wait", batch_id, "--timeout", "30", redis_url=url)
    assert waited.returncode == 0, waited.stderr.decode()
    out = tmp_path / "out.jsonl"
    batchgen("results", batch_id, "-o", str(out), redis_url=url, check=True)
    assert len(out.read_text().splitlines()) == 5


@pytest.mark.slow
def test_password_protected_redis_and_a_wrong_password(tmp_path):
    with RedisServer(tmp_path / "redis", password="s3cret pass/word") as server:
        run_batch_through(server.url, tmp_path)
        wrong = batchgen("list", redis_url=server.url_for(password="nope"))
        assert wrong.returncode == 6
        assert b"Redis refused the credentials in REDIS_URL" in wrong.stderr
        none = batchgen("list", redis_url=server.url_for())
        assert none.returncode == 6 and b"error:" in none.stderr


@pytest.mark.slow
def test_acl_user_limited_to_batchgen_and_rq_keys(tmp_path):
    # The default user is locked behind an admin password; "batch" may touch only batchgen:* and rq:* keys.
    acl = {"batch": "on >batch-pw resetkeys ~batchgen:* ~rq:* resetchannels &* +@all -@dangerous"}
    with RedisServer(tmp_path / "redis", password="admin-pw", acl_users=acl) as server:
        url = server.url_for("batch", "batch-pw")
        run_batch_through(url, tmp_path)
        admin = Redis.from_url(server.url)
        assert set(k.decode().split(":")[0] for k in admin.keys("*")) <= {"batchgen", "rq"}
        wrong = batchgen("list", redis_url=server.url_for("batch", "wrong"))
        assert wrong.returncode == 6 and b"refused the credentials" in wrong.stderr


@pytest.mark.slow
def test_tls_rediss_url_with_a_private_ca(tmp_path):
    ok, why = redis_supports_tls(tmp_path / "probe")
    if not ok:
        pytest.skip(f"local redis-server was built without TLS: {why}")
    with RedisServer(tmp_path / "redis", tls=True, password="tls-pw") as server:
        assert server.url.startswith("rediss://") and "ssl_cert_reqs=required" in server.url
        run_batch_through(server.url, tmp_path)
        # Plain redis:// to the TLS port does not get in.
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        assert batchgen("list", redis_url=plain, timeout=60).returncode == 6


# -- malformed input corpus, end to end --------------------------------------------------------------------

def test_every_bad_corpus_file_is_refused_by_submit_with_exit_3_and_redis_stays_empty(redis_url, redis_conn):
    runner = CliRunner()
    for name, expected in sorted(EXPECTED.items()):
        env = {"REDIS_URL": redis_url, **{LIMIT_ENV[k]: str(v) for k, v in expected.get("limits", {}).items()}}
        result = runner.invoke(cli_main, ["submit", str(BAD / name)], env=env)
        assert result.exit_code == 3, f"{name}: {result.output}"
        assert f":{expected['line']}: {expected['code']}:" in result.output, f"{name}: {result.output}"
        assert "nothing was enqueued" in result.output
        assert data_keys(redis_conn) == [], f"{name} left keys behind"


@pytest.mark.parametrize("name", ["invalid_json.jsonl", "binary_data.jsonl", "duplicate_custom_id.jsonl"])
def test_bad_corpus_file_through_the_real_command(name, redis_url, redis_conn):
    proc = batchgen("submit", str(BAD / name), redis_url=redis_url)
    assert proc.returncode == 3
    assert f":{EXPECTED[name]['line']}: {EXPECTED[name]['code']}:".encode() in proc.stderr
    assert data_keys(redis_conn) == []


# -- (c) file names and whole lines ------------------------------------------------------------------------

def test_custom_ids_never_become_file_names(redis_conn, tmp_path):
    hostile = ["../../escape", "/etc/passwd", "a/b/c", "..", "con", "x" * 300, "nul\u0000byte", "ünïcode ✓"]
    rows = [{"custom_id": cid, "prompt": "one two", "max_tokens": 1} for cid in hostile]
    docs = tmp_path / "docs"  # a directory input: its file names become custom_ids
    docs.mkdir()
    (docs / "report.txt").write_text("some words")
    client = BatchClient(ProducerConfig(), connection=redis_conn)
    out_dir = tmp_path / "out"
    batches = [client.submit([write_jsonl(tmp_path / "in.jsonl", rows)], model="echo-m",
                             output_dir=str(out_dir)).batch,
               client.submit([str(docs)], model="echo-m", output_dir=str(out_dir)).batch]
    cfg = WorkerConfig(EngineConfig(model="echo-m"), engine="echo", burst=True, redis_url="unused")
    assert BatchWorker(cfg, EchoEngine("echo-m"), redis_conn).run() == len(hostile) + 1
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([Path("in.jsonl"), Path("docs/report.txt"),
                              *[Path("out") / f"{b.id}.output.jsonl" for b in batches]])
    ids = [json.loads(x)["custom_id"] for x in (out_dir / f"{batches[0].id}.output.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(hostile)
    assert [ln["custom_id"] for ln in client.results(batches[1].id)] == ["report.txt"]


def _append_many(path: str, writer: int) -> None:
    for i in range(150):
        append_lines(Path(path), [{"writer": writer, "i": i, "pad": "x" * (2000 + 37 * i)}])


def test_concurrent_appends_never_tear_a_line(tmp_path):
    path = tmp_path / "b.output.jsonl"
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(x) for x in lines[:-1]]  # raises on a torn or interleaved line
    assert sorted((d["writer"], d["i"]) for d in parsed) == [(w, i) for w in range(4) for i in range(150)]


# -- (d) limits from the environment -------------------------------------------------------------------------

def test_input_limits_come_from_env(redis_url, redis_conn, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * 200}, {"prompt": "a"}, {"prompt": "b"}])
    long_line = batchgen("submit", src, "--model", "m", redis_url=redis_url, BATCHGEN_MAX_LINE_BYTES="100")
    assert long_line.returncode == 3 and b":1: line_too_long:" in long_line.stderr
    too_many = batchgen("submit", src, "--model", "m", redis_url=redis_url, BATCHGEN_MAX_REQUESTS="2")
    assert too_many.returncode == 3 and b":3: too_many_requests:" in too_many.stderr
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "a", "max_tokens": 50}])
    for command in (["submit", big, "--model", "m"], ["run", big, "-o", str(tmp_path / "o.jsonl"), "--model", "m",
                                                      "--engine", "echo"]):
        over = batchgen(*command, redis_url=redis_url, BATCHGEN_MAX_TOKENS_LIMIT="10")
        assert over.returncode == 3 and b"max_tokens: must be <= 10" in over.stderr
    assert data_keys(redis_conn) == []
    assert os.environ.get("BATCHGEN_MAX_LINE_BYTES") is None  # the env only reached the subprocesses
    window = batchgen("submit", big, "--model", "m", "--json", redis_url=redis_url, check=True,
                      BATCHGEN_COMPLETION_WINDOW_S="60")
    batch = json.loads(window.stdout)
    assert batch["expires_at"] - batch["created_at"] == 60
