"""scripts/gpu-round.sh's launch pick: the fastest q16 launch a benchmarks.kernels log timed, written into a copy's
attention.INT8_QK_LAUNCHES[2] before its bulk run (a silent no-op there would measure the committed launch)."""

import ast
import shutil
import subprocess
from pathlib import Path

import scripts.fastest_launch as fastest_launch

ROOT = Path(__file__).resolve().parents[1]
LOG = """paged int8 q16 early, block_n 64, warps 4, stages 3 {"ms": 0.8729, "kv_gb_s": 2289.5}
paged int8 q16 early, block_n 64, warps 2, stages 3 {"ms": 0.7114, "kv_gb_s": 2809.1}
paged int8 q16 early, block_n 32, warps 1, stages 3 {"error": "OutOfResources: shared memory"}
paged int8 q8 early, block_n 64, warps 2, stages 3 {"ms": 0.6844, "kv_gb_s": 2919.8}
paged fp16, the default launch {"ms": 0.8913, "kv_gb_s": 4348.3}
"""


def test_the_fastest_timed_launch_of_one_variant_is_picked():
    assert fastest_launch.fastest(LOG, "paged int8 q16 early") == "64, 2, 3"  # not q8's faster line, not the error
    assert fastest_launch.fastest(LOG, "paged int8 q8 early") == "64, 2, 3"
    assert fastest_launch.fastest(LOG.replace("0.7114", "0.9"), "paged int8 q16 early") == "64, 4, 3"
    assert fastest_launch.fastest(LOG, "paged int8 q4") == ""  # nothing timed: the stage keeps the committed launch


def test_q16_launch_rewrites_the_copys_int8_qk_launches(tmp_path):
    kernels = tmp_path / "worker/engine/kernels"
    kernels.mkdir(parents=True)
    shutil.copy(ROOT / "worker/engine/kernels/attention.py", kernels / "attention.py")
    script = (ROOT / "scripts/gpu-round.sh").read_text()
    helper = script[script.index("q16_launch() {"):script.index("\n}\n", script.index("q16_launch() {")) + 3]
    subprocess.run(["bash", "-c", f'log() {{ echo "$*"; }}\n{helper}\nq16_launch "32, 1, 4"\nq16_launch ""'],
                   cwd=tmp_path, check=True, capture_output=True)
    tree = ast.parse((kernels / "attention.py").read_text())
    launches = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and getattr(node.targets[0], "id", None) == "INT8_QK_LAUNCHES")
    assert launches == {1: (64, 2, 3), 2: (32, 1, 4)}
