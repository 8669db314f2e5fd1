"""`batchgen run` at its edges: interrupted runs, output paths, and the lines it still owes."""

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
from batchgen.jobs.inputs import InputLimits, ParamDefaults
from batchgen.worker.engine.echo import EchoEngine
from batchgen.worker.engine.protocol import GenerationResult
from batchgen.worker.local_run import read_local, run_local

from tests.cli import BATCHGEN, cli_env, eventually


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_ids(path: Path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]


class SlowFirstEngine(EchoEngine):
    """Echo, but request "0" never finishes; once it is all that is left, the user presses ctrl-C."""

    def step(self) -> list[GenerationResult]:
        slow = self._pending.pop("0", None)
        try:
            if not self._pending:
                raise KeyboardInterrupt
            return super().step()
        finally:
            if slow is not None:
                self._pending["0"] = slow
                self._pending.move_to_end("0", last=False)


def test_an_interrupted_ordered_run_still_writes_the_lines_that_finished(tmp_path):
    """Ordered output holds finished lines behind a slower one; ctrl-C must not throw those away."""
    rows = [{"custom_id": f"r{i}", "prompt": f"prompt {i}"} for i in range(6)]
    local = read_local([write_jsonl(tmp_path / "in.jsonl", rows)], model="m", params=ParamDefaults(),
                       limits=InputLimits())
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_local(local, str(out), None, SlowFirstEngine("m", max_batch_size=2), model="m", progress=False)
    assert read_ids(out) == ["r1", "r2", "r3", "r4", "r5"]


def test_errors_naming_the_output_file_another_way_keeps_the_input_order(tmp_path):
    """--errors the same file as -o (an absolute path for a relative one, a symlink): one file, input order."""
    # The echo engine rejects a NUL prompt the moment it is added, before the earlier line finishes.
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "one"},
                                               {"custom_id": "nul", "prompt": "bad\u0000byte"},
                                               {"custom_id": "b", "prompt": "two"}])
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "out.jsonl")
    for errors in (tmp_path / "out.jsonl", tmp_path / "sub" / ".." / "out.jsonl", tmp_path / "link.jsonl"):
        proc = subprocess.run([*BATCHGEN, "run", src, "-o", "out.jsonl", "--errors", str(errors), "--model", "m",
                               "--engine", "echo"], cwd=tmp_path, capture_output=True, env=cli_env("x"), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert read_ids(tmp_path / "out.jsonl") == ["a", "nul", "b"], errors
        assert (tmp_path / "link.jsonl").is_symlink()


def test_an_output_symlink_to_a_file_not_yet_there_is_written_through(tmp_path):
    """-o a symlink whose target does not exist yet: the lines land in the target, the link stays a link."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "one"}])
    (tmp_path / "results").mkdir()
    link, target = tmp_path / "out.jsonl", tmp_path / "results" / "real.jsonl"
    link.symlink_to(target)
    proc = subprocess.run([*BATCHGEN, "run", src, "-o", str(link), "--model", "m", "--engine", "echo"],
                          capture_output=True, env=cli_env("x"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and read_ids(target) == ["a"]


@pytest.mark.slow
def test_a_terminated_ordered_run_writes_what_finished_behind_a_slow_line(demo_model_dir, tmp_path):
    """kill (SIGTERM) mid-run: the lines that finished behind the long first one are written, exit 128 + 15."""
    rows = [{"custom_id": "long", "prompt": "hello", "max_tokens": 480, "temperature": 0}]
    rows += [{"custom_id": f"r{i}", "prompt": f"hello world {i}", "max_tokens": 4} for i in range(2000)]
    src, out, err = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", tmp_path / "err.txt"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([*BATCHGEN, "run", src, "-o", str(out), "--model", str(demo_model_dir),
                                 "--max-batch", "4"], stdout=subprocess.DEVNULL, stderr=fh, env=cli_env("x"))

    def progress() -> int:
        return max(map(int, re.findall(r"(\d+)/2001", err.read_text(errors="replace"))), default=0)

    try:
        eventually(lambda: progress() >= 20 or proc.poll() is not None, "20 requests done", timeout_s=120)
        proc.terminate()
        returncode = proc.wait(timeout=60)
    finally:
        proc.kill()
    ids = read_ids(out)
    assert "long" not in ids and len(ids) >= 20 and ids == sorted(ids, key=lambda c: int(c[1:]))
    assert returncode == 128 + signal.SIGTERM
