"""Where an engine step's time goes, from torch.profiler: one request alone, a steady decode of many rows, and one
packed prefill. For each: wall ms per step, device (kernel) ms per step, the idle share between them, and the top
kernels and host ops. Any model `benchmarks/models.py` builds (bloom-7b1: the generic path; qwen3-8b: the fast
path), or `llama7b`, the bulk benchmark's shape; --tiny: a tiny model on CPU (the harness end to end).

    python3 -m benchmarks.profile_steps --out $OUT/profile --models llama7b,bloom-7b1      # on the device
    python3 -m benchmarks.profile_steps --tiny --out /tmp/profile                         # CPU smoke
"""

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import write_json

TOP = 15
MAX_MODEL_LEN = 1024


def _requests(prompt_ids: list[list[int]], max_tokens: int, tag: str) -> list:
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest

    from benchmarks.models import text

    return [GenerationRequest(f"{tag}{i}", Request(custom_id=f"{tag}{i}", prompt=text(ids), params=SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))) for i, ids in enumerate(prompt_ids)]


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    return [[3 + (7919 * (i + seed) + 104729 * j) % (vocab - 3) for j in range(length)] for i in range(num)]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


STACK_DEPTH = 4  # --stacks: the Python frames that tell one caller of an op from another


def profile(engine, num_steps: int, stacks: bool = False) -> dict:
    """num_steps engine steps under the profiler: per-step wall and kernel time, the top kernels and host ops;
    stacks: also the top host ops by their Python call site (which copy_ blocks the host, say), and one more step
    under torch's sync debug mode: where the host waits for the device (the line of each synchronizing call)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=activities, with_stack=stacks) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        _sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    syncs = _sync_sites(engine) if stacks and torch.cuda.is_available() else None

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0

    # kernels only: an aten op's device time is its kernels', counted again
    kernels = sorted((e for e in events if device_us(e) > 0 and e.device_type == DeviceType.CUDA), key=device_us,
                     reverse=True)
    device_ms = sum(device_us(e) for e in kernels) / 1e3 / num_steps
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    wall_ms = wall * 1e3 / num_steps
    out = {"top_host_sites": _call_sites(prof.events(), num_steps)} if stacks else {}
    if syncs is not None:
        out["sync_sites"] = syncs
        print("sync sites:", json.dumps(syncs), flush=True)  # before a later scenario could run out of time
    if torch.cuda.is_available():  # what the allocator held at most over these steps (the cap's share of them)
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out | {"steps": num_steps, "wall_ms_per_step": round(wall_ms, 3), "device_ms_per_step": round(device_ms, 3),
            "device_busy": round(device_ms / wall_ms, 3) if device_ms else None,
            "top_kernels": [{"name": e.key[:120], "ms_per_step": round(device_us(e) / 1e3 / num_steps, 4),
                             "calls_per_step": round(e.count / num_steps, 2)} for e in kernels[:TOP]],
            "top_host_ops": [{"name": e.key[:120], "ms_per_step": round(e.self_cpu_time_total / 1e3 / num_steps, 4),
                              "calls_per_step": round(e.count / num_steps, 2)} for e in host[:TOP]]}


def _sync_sites(engine) -> list[dict]:
    """One engine step with torch.cuda's sync debug mode on: each synchronizing call's Python line, counted."""
    import warnings
    from collections import Counter

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
                    if "synchroniz" in str(w.message))
    return [{"site": site, "calls": n} for site, n in sites.most_common(TOP)]


def _call_sites(events, num_steps: int) -> list[dict]:
    """Host time of each op by its Python call site: the op and the first STACK_DEPTH Python frames above it
    (with_stack records frames as parent events)."""
    from collections import defaultdict

    time_us: dict[tuple, float] = defaultdict(float)
    calls: dict[tuple, int] = defaultdict(int)
    for e in events:
        if ".py(" in e.name or e.name.startswith("<built-in"):
            continue  # a Python frame itself
        frames, parent = [], e.cpu_parent
        while parent is not None and len(frames) < STACK_DEPTH:
            if ".py(" in parent.name:
                frames.append(parent.name)
            parent = parent.cpu_parent
        key = (e.name, *frames)
        time_us[key] += e.self_cpu_time_total
        calls[key] += 1
    top = sorted(time_us, key=time_us.get, reverse=True)[:TOP]
    return [{"name": key[0][:120], "stack": list(key[1:]), "ms_per_step": round(time_us[key] / 1e3 / num_steps, 4),
             "calls_per_step": round(calls[key] / num_steps, 2)} for key in top]


def _free() -> None:
    """Hand the last engine's memory back before the next model is built on the same device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _add(engine, reqs: list) -> None:
    rejected = engine.add(reqs)
    assert not rejected, rejected[0].error


def prefill_run(engine, vocab: int, *, prompt: int, prefill_tokens: int, steps: int) -> dict:
    """`steps` full prefill steps back to back, as a bulk run's admissions make them (each request wants one
    token, so no decode step comes between): prompt tokens a second, the engine's device time per step (its
    StepClock: first kernel to last, idle inside a step included) against the host's wall time, and the SM clock
    and board power over the run (NVML). Shows whether a long prefill is held by the card's power cap (a lower
    clock) or by the host (device idle inside the steps)."""
    per = max(1, min(prompt, prefill_tokens))
    count = max(1, prefill_tokens // per)
    before = engine.stats().extra
    _add(engine, _requests(_prompts(count * steps, per, vocab, 3), 1, "r"))
    _sync()
    with _clock_sampler() as vram:
        start = time.perf_counter()
        while engine.num_unfinished:
            engine.step()
        _sync()
        wall = time.perf_counter() - start
    delta = _delta(before, engine.stats().extra)
    done = delta("num_prefill_steps")
    tokens = count * steps * per
    return {"steps": done, "prompt_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall),
            "wall_ms_per_step": round(1e3 * wall / max(done, 1), 2),
            "device_ms_per_step": round(1e3 * delta("prefill_device_s") / max(done, 1), 2),  # CUDA only
            "device_gap_s": round(delta("device_gap_s"), 3), "clocks": vram.clocks() if vram is not None else None}


def _clock_sampler():
    """NVML's sampler of the SM clock and power (benchmarks.common.PeakVram) on CUDA; elsewhere nothing (None)."""
    from contextlib import nullcontext

    import torch

    from benchmarks.common import PeakVram

    return PeakVram() if torch.cuda.is_available() else nullcontext()


def _delta(before: dict, after: dict):
    """key -> how much the engine's stat `key` grew from before to after (0 where the engine has none)."""
    return lambda key: after.get(key, 0) - before.get(key, 0)


def _launch_s(stats: dict) -> float:
    """The engine's prefill launch seconds so far (timed inside or outside a step)."""
    return sum(stats.get(key, {}).get("prefill_launch", 0.0) for key in ("host_s", "step_host_s"))


def _print_summary(name: str, run: dict) -> None:
    """A workload run's figures on one line, without its profile window and per-step trace."""
    print(name, json.dumps({k: v for k, v in run.items() if k not in ("profile_window", "trace")}), flush=True)


def _prefill_by_predecessor(trace: list) -> dict:
    """StepClock's trace of prefill steps grouped by the step before them: count, mean device ms, mean µs a token."""
    out = {}
    for before in sorted({b for kind, b, *_ in trace if kind == "prefill"}):
        steps = [(tokens, ms) for kind, b, tokens, _, ms, _ in trace if kind == "prefill" and b == before]
        out[before or "none"] = {"steps": len(steps), "ms_mean": round(sum(ms for _, ms in steps) / len(steps), 2),
                                 "us_per_token": round(1e3 * sum(ms for _, ms in steps)
                                                       / max(1, sum(t for t, _ in steps)), 2)}
    return out


def workload_run(engine, num_requests: int, profile_steps: int = 0) -> dict:
    """The bulk benchmark's workload (its first num_requests) through this engine in-process, no queue: tok/s and
    the engine's device time per prefill and decode step, the host's prefill launch time, clocks. Against the
    bulk run's worker process: what the queue side's threads cost the steps."""
    import torch
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest

    from benchmarks.common import workload

    reqs = workload(num_requests)
    gen = [GenerationRequest(r.custom_id, Request(custom_id=r.custom_id, prompt=r.prompt, params=SamplingParams(
        max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))) for r in reqs]
    before = engine.stats().extra
    clock = getattr(engine, "clock", None)
    if clock is not None:
        clock.trace = []  # every step's device time, to see which prefill steps are slow (after a decode or not)
    _sync()
    allocator = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    with _clock_sampler() as vram:
        start = time.perf_counter()
        _add(engine, gen)
        window, step = None, 0
        while engine.num_unfinished:  # EOS ignored: every request makes its max_tokens
            if profile_steps and step == 200:  # a window in the middle of the run (refills, decode steps), its
                window = profile(engine, profile_steps, stacks=True)  # steps slowed by the profiler
            engine.step()
            step += 1
        _sync()
        wall = time.perf_counter() - start
    after = engine.stats().extra
    # the caching allocator over the run: a retry frees cached blocks (synchronising the device), a device
    # alloc or free is a cudaMalloc or cudaFree (a prefill's activations where the KV cache leaves little room)
    allocator = {key: torch.cuda.memory_stats().get(key, 0) - value for key, value in allocator.items()
                 if key in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
    delta = _delta(before, after)
    tokens = sum(r.max_tokens for r in reqs)
    prefills, decodes = delta("num_prefill_steps"), delta("num_decode_steps")
    launch_s = _launch_s(after) - _launch_s(before)
    trace = clock.trace if clock is not None else None
    if clock is not None:
        clock.trace = None
    return {"profile_window": window, "trace": trace, "prefill_by_predecessor": _prefill_by_predecessor(trace or []),
            "requests": num_requests, "tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall),
            "prefill_steps": prefills, "decode_steps": decodes,
            "prefill_device_ms_per_step": round(1e3 * delta("prefill_device_s") / max(prefills, 1), 2),
            "prefill_launch_ms_per_step": round(1e3 * launch_s / max(prefills, 1), 2),
            "decode_device_ms_per_step": round(1e3 * delta("decode_device_s") / max(decodes, 1), 2),
            "device_gap_s": round(delta("device_gap_s"), 3), "allocator": allocator,
            "int8_outlier_columns": [before.get("int8_outlier_columns"), after.get("int8_outlier_columns")],
            "clocks": vram.clocks() if vram is not None else None}


def scenarios(engine, vocab: int, *, rows: int, prompt: int, prefill_tokens: int, steps: int,
              max_model_len: int = MAX_MODEL_LEN, stacks: bool = False, prefill_steps: int = 0) -> dict:
    out = {}
    # one request alone: its prefill and a few decode steps first (kernels compiled, graphs captured)
    _add(engine, _requests(_prompts(1, min(128, max_model_len // 2), vocab, 0), max_model_len - min(128, max_model_len // 2), "s"))
    for _ in range(4):
        engine.step()
    out["single"] = profile(engine, steps, stacks)
    engine.abort(["s0"])
    # a steady decode: every row admitted and prefilled before the profile
    _add(engine, _requests(_prompts(rows, prompt, vocab, 1), max_model_len - prompt, "d"))
    # until every row is admitted and has decoded, or the batch stays as full as admission lets it get for a few
    # steps (overlapped prefill admits a step late: one step without admission does not mean the batch is full)
    before, stable = -1, 0
    for _ in range(10 * rows):
        running = engine.scheduler.running
        decoded = bool(running) and all(s.output_ids for s in running.values())
        if decoded and not engine.scheduler.waiting:
            break
        stable = stable + 1 if decoded and len(running) == before else 0
        if stable >= 8:
            break
        before = len(running)
        engine.step()
    engine.step()
    out["decode"] = profile(engine, steps, stacks) | {"rows": len(engine.scheduler.running),
                                              "max_rows": engine.scheduler.max_batch_size,
                                              "waiting": len(engine.scheduler.waiting)}
    engine.abort([f"d{i}" for i in range(rows)])
    # one packed prefill (the scheduler's token budget), after a warm-up one of the same shape
    per = max(1, min(prompt, prefill_tokens))
    count = max(1, prefill_tokens // per)
    for tag in ("w", "p"):
        _add(engine, _requests(_prompts(count, per, vocab, 2), 1, tag))
        out["prefill"] = profile(engine, 1, stacks) | {"prompts": count, "prompt_tokens": per}
        while engine.num_unfinished:
            engine.step()
    if prefill_steps:
        out["prefill_run"] = prefill_run(engine, vocab, prompt=prompt, prefill_tokens=prefill_tokens,
                                         steps=prefill_steps)
        print("prefill_run", json.dumps(out["prefill_run"]), flush=True)
        out["prefill_run"]["prefill_launch_s_total"] = round(_launch_s(engine.stats().extra), 3)
    return out


def _options(pairs: str) -> dict:
    """key=value,... as EngineConfig fields, booleans as 0/1."""
    from dataclasses import fields

    from batchgen.worker.engine.config import EngineConfig

    kinds = {f.name: f.default for f in fields(EngineConfig)}
    out = {}
    for pair in filter(None, pairs.split(",")):
        key, _, value = pair.partition("=")
        out[key] = bool(int(value)) if isinstance(kinds[key], bool) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--models", default="llama7b,bloom-7b1")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the tiny BLOOM and Qwen3 shapes on CPU")
    parser.add_argument("--small-vram", default="",
                        help="small-VRAM mode under a 6 GiB cap, with these engine options as key=value pairs "
                             "(e.g. kv_cache_dtype=fp8,stream_kv=1); use with --models bloom-13b --rows 64 "
                             "--prompt 128 --max-model-len 192")
    parser.add_argument("--engine-options", default="",
                        help="EngineConfig fields as key=value pairs, e.g. overlap_decode=0,cuda_graphs=0")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    parser.add_argument("--prefill-steps", type=int, default=0,
                        help="then this many full prefill steps back to back, unprofiled (prefill_run)")
    parser.add_argument("--workload", type=int, default=0,
                        help="then the bulk benchmark's first N requests in-process (workload_run)")
    parser.add_argument("--scenarios", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-scenarios: only the workload run")
    parser.add_argument("--workload-warmup", type=int, default=0,
                        help="before it, the workload's first N requests once, unmeasured (compiles; with --no-scenarios)")
    parser.add_argument("--workload-profile-steps", type=int, default=0,
                        help="profile this many steps of the workload run from its 200th")
    parser.add_argument("--stacks", action="store_true",
                        help="also group host ops by Python call site (with_stack; slower, for finding who blocks)")
    args = parser.parse_args()

    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from benchmarks import bulk, models
    from benchmarks.common import VOCAB_SIZE, build_llama7b

    device = "cpu" if args.tiny else "cuda"
    names = ["tiny-bloom", "tiny-qwen3"] if args.tiny else args.models.split(",")
    rows, prompt, steps = (8, 16, 2) if args.tiny else (args.rows, args.prompt, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": device, "models": {}}
    for name in names:
        if name == "llama7b":
            if not (bulk.MODEL_DIR / "config.json").exists():
                build_llama7b(bulk.MODEL_DIR)
            path = bulk.MODEL_DIR
        else:
            models.build(name, device)
            path = models.model_dir(name)
        start = time.perf_counter()
        options: dict = _options(args.engine_options)
        if args.small_vram:
            options |= {"max_vram_bytes": models.CAP_BYTES, "offload": True} | _options(args.small_vram)
        engine = build_llm_engine(EngineConfig(model=str(path), device=device, max_model_len=args.max_model_len,
                                               **options))
        load_s = round(time.perf_counter() - start, 1)
        prefill_tokens = engine.scheduler.max_prefill_tokens
        row = {"engine": type(engine).__name__, "load_s": load_s, "max_prefill_tokens": prefill_tokens}
        if args.scenarios:
            row |= scenarios(engine, VOCAB_SIZE, rows=rows, prompt=prompt, prefill_tokens=prefill_tokens, steps=steps,
                             max_model_len=args.max_model_len, stacks=args.stacks,
                             prefill_steps=args.prefill_steps)
        elif args.prefill_steps:  # twice: the first compiles this prompt length's shapes
            for _ in range(2):
                row["prefill_run"] = prefill_run(engine, VOCAB_SIZE, prompt=prompt, prefill_tokens=prefill_tokens,
                                                 steps=args.prefill_steps)
            print("prefill_run", json.dumps(row["prefill_run"]), flush=True)
        if args.workload:
            if args.workload_warmup:  # kept: a first run's steps against the warm run's
                row["workload_warmup"] = workload_run(engine, args.workload_warmup)
                _print_summary("workload_warmup", row["workload_warmup"])
            row["workload_run"] = workload_run(engine, args.workload, args.workload_profile_steps)
            _print_summary("workload_run", row["workload_run"])
        row["decode_steps"] = engine.stats().extra.get("decode_steps", "CUDA graphs (fast path)")
        report["models"][name] = row
        print(name, json.dumps({k: ({kk: v.get(kk) for kk in ("wall_ms_per_step", "device_ms_per_step", "device_busy")}
                                    if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
        # written after each model: a later model's failure keeps the earlier ones
        write_json(args.out / f"profile{'-tiny' if args.tiny else ''}.json", report)
        del engine
        _free()


if __name__ == "__main__":
    main()
