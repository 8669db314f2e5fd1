"""A model that cannot be found is a one-line ModelNotFound naming what was tried, before any engine work: a
missing local directory, a hub id with no network (HF_HUB_OFFLINE, nothing cached), a gated or unknown repo
(a local stand-in for the hub that answers the way the hub does)."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT when it is imported.
PROBE = """
import json, sys
from batchgen.worker.engine.config import EngineConfig
from batchgen.worker.engine.families import ModelNotFound
from batchgen.worker.factory import build_llm_engine
try:
    build_llm_engine(EngineConfig(model=sys.argv[1]))
except ModelNotFound as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"error": None}))
"""


def probe(model: str, tmp_path, **env) -> dict:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    out = subprocess.run([sys.executable, "-c", PROBE, model], capture_output=True, text=True, env=full_env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


class FakeHub(BaseHTTPRequestHandler):
    """Answers like huggingface.co: org/gated-* is gated, anything else does not exist."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if "/gated-" in self.path:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated-model is restricted.")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_hub_id_without_network_names_the_hub_and_the_local_path(tmp_path):
    result = probe("some-org/some-model", tmp_path, HF_HUB_OFFLINE="1")
    assert result["error"] == "ModelNotFound"
    message = result["message"]
    assert "\n" not in message
    assert "'some-org/some-model'" in message and str(tmp_path / "some-org" / "some-model") in message
    assert "could not be reached and it is not in the local cache" in message


def test_a_gated_repo_says_how_to_get_access(tmp_path, fake_hub):
    result = probe("org/gated-model", tmp_path, HF_ENDPOINT=fake_hub)
    assert result["error"] == "ModelNotFound"
    assert "\n" not in result["message"]
    assert "gated" in result["message"] and "HF_TOKEN" in result["message"]


def test_an_unknown_repo_is_named_as_such(tmp_path, fake_hub):
    result = probe("org/no-such-model", tmp_path, HF_ENDPOINT=fake_hub)
    assert result["error"] == "ModelNotFound"
    assert "no such hub repo" in result["message"] and "\n" not in result["message"]


def test_a_directory_without_config_is_not_found(tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = probe(str(tmp_path / "empty-model"), tmp_path)
    assert result["error"] == "ModelNotFound"
    assert "has no readable config.json" in result["message"]
