"""Shared fixtures: a clean real Redis database per test, and one tiny random model per session."""

import os
from pathlib import Path

import pytest
from redis import Redis

TEST_DB = int(os.environ.get("BATCHGEN_TEST_REDIS_DB", "15"))


@pytest.fixture
def redis_url() -> str:
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    base = base.rsplit("/", 1)[0] if base.rsplit("/", 1)[-1].isdigit() else base
    return f"{base}/{TEST_DB}"


@pytest.fixture
def redis_conn(redis_url):
    """A real Redis, emptied before and after the test (a dedicated database number)."""
    conn = Redis.from_url(redis_url, decode_responses=True)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + trained tokenizer saved to disk, loaded by path like a real model."""
    from batchgen.worker.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo-model"))
