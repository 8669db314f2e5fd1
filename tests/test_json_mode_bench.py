"""benchmarks/json_mode.py: plain, json_object and json_schema over the same requests, end to end on CPU with the
tiny demo model; its JSON checks are strict; without xgrammar it says so and exits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.json_mode import VARIANTS, json_checks

REPO = Path(__file__).resolve().parent.parent


def bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.json_mode", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.slow
def test_the_tiny_run_writes_every_variant_and_the_constrained_outputs_all_parse(tmp_path):
    # 48 tokens, not fewer: the demo tokenizer spells JSON about a character a token, the schema's object ~37
    proc = bench("--device", "cpu", "--model-shape", "tiny", "--num-requests", "16", "--max-tokens", "48",
                 "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "json_mode.json").read_text())
    assert {"device", "model_shape", "num_requests", "max_tokens", "schema", "max_rows", "variants"} <= set(summary)
    assert (summary["model_shape"], summary["num_requests"], summary["max_tokens"]) == ("tiny", 16, 48)
    assert list(summary["variants"]) == list(VARIANTS)
    for name, run in summary["variants"].items():
        assert {"tok_s", "decode_ms_per_step", "mean_rows", "parse_rate", "tok_s_vs_plain",
                "decode_ms_vs_plain"} <= set(run), name
        assert run["tok_s"] > 0 and run["num_decode_steps"] > 0 and run["mean_rows"] > 0, run
    constrained = [summary["variants"][v] for v in ("json_object", "json_schema")]
    assert [run["parse_rate"] for run in constrained] == [1.0, 1.0]
    assert [run["stopped_rate"] for run in constrained] == [1.0, 1.0]  # each ended its own JSON, none cut short
    assert summary["variants"]["json_schema"]["schema_valid_rate"] == 1.0
    assert summary["variants"]["plain"]["tok_s_vs_plain"] == 1.0
    assert "| json_schema |" in proc.stdout


def test_outputs_count_as_json_only_when_a_strict_parser_takes_them():
    good = '{"name": "ab", "age": 3, "ok": true}'
    texts = [good, '{"name": "a\x18b", "age": 3, "ok": true}',  # a raw control character: not JSON
             '{"name": "ab", "age": 300, "ok": true}', '{"name": "ab", "age": 3, "ok"', "{}"]
    assert json_checks("json_schema", texts) == {"parse_rate": 0.6, "non_empty_object_rate": 0.4,
                                                 "schema_valid_rate": 0.2}
    assert set(json_checks("json_object", texts)) == {"parse_rate", "non_empty_object_rate"}


def test_without_xgrammar_the_benchmark_says_what_to_install(tmp_path):
    shadow = tmp_path / "shadow" / "xgrammar"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no xgrammar wheel for this machine')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    proc = bench("--out", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1
    assert "cannot import xgrammar" in proc.stderr and "pip install xgrammar" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
