"""benchmarks/models.py: each configuration runs in a child process, which must see the options it reads, and
the whole harness runs end to end on CPU with tiny shapes (--tiny), small-VRAM case included."""

import json
import subprocess
import sys

import pytest

from benchmarks.models import build_parser, child_options, phase_options


def test_the_hf_child_reads_the_batches_and_tokens_it_was_given(tmp_path):
    parent = build_parser().parse_args(["--hf-batches", "8,16", "--hf-tokens", "12"])
    child = build_parser().parse_args(phase_options(tmp_path / "hf.json", "hf", ("bloom-7b1",),
                                                    child_options(parent)))
    assert (child.phase, child.phase_args) == ("hf", "bloom-7b1")
    assert (child.hf_batches, child.hf_tokens) == ("8,16", 12)


@pytest.mark.slow
def test_the_tiny_small_vram_case_runs_end_to_end_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--tiny", "--small-vram", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "small-vram-tiny.json").read_text())["models"]["tiny-bloom"]
    for key in ("batchgen_6gib", "batchgen_6gib_fp8"):  # the default K/V and --kv-cache-dtype fp8
        run = row[key]
        assert "error" not in run, run
        assert run["tokens"] == 64 * 64 and run["tok_s"] > 0
        # where generate_s went, from the engine's drained "engine steps" line
        steps = run["steps"]
        assert steps["num_decode_steps"] >= 63 and steps["host_n"]["finish_rows"] > 0
        assert run["host_s_total"] == pytest.approx(sum(steps["host_s"].values()), abs=1e-3)
        assert run["unaccounted_s"] == pytest.approx(
            run["generate_s"] - steps["prefill_s"] - steps["decode_s"] - run["host_s_total"], abs=0.02)
        assert run["unaccounted_s"] >= -0.02 and 0 < steps["engine_s"] <= run["generate_s"] + 0.02
    assert "under 6 GiB" in proc.stdout and "unaccounted" in proc.stdout


@pytest.mark.slow
def test_the_step_profiler_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/profile_steps.py --tiny --stacks: each scenario profiled, on the generic and the fast path."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_steps", "--tiny", "--stacks", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "profile-tiny.json").read_text())["models"]
    assert {row["engine"] for row in report.values()} == {"GenericEngine", "LLMEngine"}
    for row in report.values():
        # every row admitted before the decode profile (overlapped prefill admits a step late)
        assert row["decode"]["rows"] == 8 and row["decode"]["waiting"] == 0 and row["prefill"]["prompts"] > 1
        for name in ("single", "decode", "prefill"):
            assert row[name]["wall_ms_per_step"] > 0 and row[name]["top_host_ops"], name
            # --stacks: host time by call site, each with the Python frames above the op
            assert any(site["stack"] for site in row[name]["top_host_sites"]), name


def test_the_batchgen_phase_reports_a_cold_and_a_warm_run(tmp_path, monkeypatch):
    """The same workload twice on one engine: the second run's tok/s (the generic path's graphs captured) apart."""
    from benchmarks import models

    monkeypatch.setattr(models, "model_dir", lambda name: tmp_path / name)
    models.build("tiny-bloom", "cpu")
    run = models.phase_batchgen("tiny-bloom", "cpu", 6)
    assert run["path"] == "generic" and run["tokens"] > 6 * 31
    assert run["tok_s"] > 0 and run["tok_s_warm"] > 0 and run["warm_elapsed_s"] > 0
    cold, warm = run["steps"], run["warm_steps"]  # each pass timed apart: the same prompts, 31+ decode steps each
    assert cold["num_prefill_tokens"] == warm["num_prefill_tokens"] > 6 * 32
    for steps in (cold, warm):
        assert steps["num_decode_steps"] >= 31 and steps["prefill_s"] > 0 and steps["decode_s"] > 0
    assert len(run["texts"]) == 6  # each output, for the graphs-vs-eager comparison
    assert models.compare_texts(run["texts"], run["texts"]) == {"equal": "6 of 6",
                                                               "median_share_before_first_difference": None}
    changed = {k: v[: len(v) // 2] + "\x00" * (len(v) - len(v) // 2) for k, v in run["texts"].items()}
    compared = models.compare_texts(changed, run["texts"])
    assert compared["equal"] == "0 of 6" and 0.4 < compared["median_share_before_first_difference"] <= 0.5
