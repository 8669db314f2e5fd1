"""docker-compose.yml, checked structurally (this machine has no Docker engine to run `docker compose config`)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_has_durable_redis_and_a_gpu_worker():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert any(v.endswith(":/data") for v in redis["volumes"])

    worker = compose["services"]["worker"]
    assert worker["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "BATCHGEN_MODEL" in worker["environment"] and "HF_HOME" in worker["environment"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert (ROOT / worker["build"] / "Dockerfile").exists()
    # compiled kernels outlive the container, on a named volume
    cache_dirs = {worker["environment"][k] for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    (cache,) = [v.split(":")[1] for v in worker["volumes"] if v.startswith("kernel-cache:")]
    assert all(d.startswith(cache + "/") for d in cache_dirs) and "kernel-cache" in compose["volumes"]
    assert "dashboard" in compose["services"]


def test_rq_dashboard_reads_our_json_jobs():
    """Our RQ jobs are JSON, not pickles: rq-dashboard must be told, or its job views fail on every job."""
    dashboard = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"]
    env = dashboard["environment"]
    assert env["RQ_DASHBOARD_REDIS_URL"].startswith("redis://redis:")
    # rq-dashboard's CLI reads flags from RQ_DASHBOARD_<FLAG> (--json); its app factory reads ..._JSON_SERIALIZER
    assert env["RQ_DASHBOARD_JSON"] == "true" and env["RQ_DASHBOARD_JSON_SERIALIZER"] == "true"
    assert all(p.startswith("127.0.0.1:") for p in dashboard["ports"])


def test_the_worker_can_serve_a_plain_model_name_for_clean_queue_names():
    worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    assert "BATCHGEN_SERVED_MODEL_NAME" in worker["environment"]
