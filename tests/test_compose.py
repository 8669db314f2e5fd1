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
    assert "dashboard" in compose["services"]
