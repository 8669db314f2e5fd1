"""benchmarks.partition --smoke: both sides it times on a GPU (the default decode attention over a paged,
heads-major int8 pool; a layer's four int8 projections through the quantising kernel and the Triton GEMM) build and
agree with their references under Triton's interpreter. The green-context timings need a GPU and are not run here."""

import json
import subprocess
import sys


def test_the_partition_probe_builds_and_checks_both_sides(tmp_path):
    out = tmp_path / "partition.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.partition", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["rows_each_side"] == [4, 4]
    assert res["max_abs_err"]["attention"] < 1e-2  # fp16 output against the float32 reference
    assert res["max_abs_err"]["projections"] < 1e-2
    assert "splits" not in res  # no GPU: nothing was timed


def test_the_vt_benchmark_holds_both_engine_kernels_to_the_reference(tmp_path):
    """benchmarks.vt_keys --smoke: the engine's keys kernel and its V^T kernel (V transposed in each block, P·V on
    the int8 tensor cores, the weights as fixed-scale int8 terms) over the pools kv_pool lays out, against the
    float32 reference, interpreted, with scores wide enough that the running max moves."""
    out = tmp_path / "vt.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.vt_keys", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["ref_max"] > 0.1
    assert set(res["max_abs_err"]) == {"engine keys kernel, KEYS_LAUNCH", "engine V^T kernel, KEYS_LAUNCH",
                                       "engine V^T kernel, 64 x 1 x 3"}
    assert all(err < 2e-3 for err in res["max_abs_err"].values()), res
    assert res["store"]["same"], res  # store_kv's kernel wrote each row's next token alike into V and V^T
