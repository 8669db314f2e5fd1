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
