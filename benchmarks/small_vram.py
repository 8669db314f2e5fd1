"""Small-VRAM mode: a Llama-2-13B-shape model in 8-bit under a hard 6 GiB cap, against the PCIe bound.

One run, each configuration in its own process (a fresh CUDA context under
torch.cuda.set_per_process_memory_fraction, so it behaves like a 6 GiB card; the parent never touches
CUDA, so a phase is the card's only user, as a worker is, and NVML's peak is that phase's), on the same
random 13B checkpoint (fp16, initialised on the GPU, saved once to /tmp by a "prepare" phase that also
measures the copy bandwidth) and workload: 64 requests × 128 prompt tokens × 100 new tokens (EOS ignored).

  (a) seed recipe: HF bnb int8, device_map="auto", max_memory, llm_int8_enable_fp32_cpu_offload, bs 1
  (b) accelerate's own offload: fp16, device_map="auto" with max_memory; a few decode steps, extrapolated
  (c) batchgen: LLMEngine with max_vram_bytes=6 GiB (streams int8 layers from pinned host memory)
  (d) bound = 64 tokens per step × pinned H2D bandwidth ÷ (int8 model bytes − 6 GiB)

    python3 -m benchmarks.small_vram --out-dir $OUT          # the device run (from the repo root)
    python3 -m benchmarks.small_vram --smoke                 # tiny model on CPU: the batchgen phase only
"""

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import GIB, VOCAB_SIZE, PeakVram, write_json, write_tokenizer

CAP_BYTES = 6 * GIB
NUM_REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 64, 128, 100
MODEL_DIR = Path("/tmp/llama13b-random")
DEADLINE_S = float(os.environ.get("SMALL_VRAM_DEADLINE_S", 560))  # the device allows 600 s a command
START = time.monotonic()


def left_s() -> float:
    return DEADLINE_S - (time.monotonic() - START)


def prompts(n: int = NUM_REQUESTS, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """Word-level tokenizer: "w17 w42 ..." is exactly these token ids."""
    return [[3 + (7919 * i + 104729 * j) % (VOCAB_SIZE - 3) for j in range(length)] for i in range(n)]


def text(ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in ids)


def llama13b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def build_model(out: Path, config) -> dict:
    """Random fp16 weights initialised on the GPU (fp16 from the start: fp32 13B would not fit), saved once."""
    import torch
    from transformers import LlamaForCausalLM

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return {"build_s": 0.0, "cached": True}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, max_shard_size="4GB")
    write_tokenizer(out)
    del model
    torch.cuda.empty_cache()
    return {"build_s": round(time.perf_counter() - start, 1), "cached": False}


def h2d_bandwidth() -> dict:
    import torch

    n = 1 * GIB
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, pinned in (("pinned", True), ("pageable", False)):
        src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=pinned)
        torch.cuda.synchronize()
        out[f"{name}_gb_s"] = round(5 * n / (time.perf_counter() - start) / 1e9, 1)
    return out


def phase_prepare() -> dict:
    """The device's name and copy bandwidth, and the model built (once; cached in MODEL_DIR)."""
    import torch

    return {"device": torch.cuda.get_device_name(0), "h2d": h2d_bandwidth(), "build": build_model(MODEL_DIR, llama13b_config())}


def cap_memory() -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total)


# -- phases, each in its own process ----------------------------------------------------------------

def phase_batchgen(model: str, device: str, variant: str = "auto") -> dict:
    """variant: "auto" (the planner's choice, as `batchgen worker --max-vram 6GiB` runs it) or a lever,
    placement[/host KV dtype[/max prefill tokens[/layers whose KV stays on the device[/weight stage slots[/weight
    copy chunk MiB (0: a copy per part of a layer)[/resident layers]]]]]] ("auto": the engine's), e.g. "device",
    "cpu/int8", "auto/int8", "cpu/auto/auto/6", "cpu/auto/auto/0/3", "cpu/auto/auto/0/auto/0", "cpu/auto/auto/0/auto/auto/8";
    run_phase also takes a
    "+passive" suffix: OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning between parallel regions).
    ":KERNEL" after it all: --int8-kernel KERNEL (e.g. "auto:int_mm", threshold 0's arithmetic; the default streams
    the outlier kernel)."""
    import torch
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.engine.protocol import GenerationRequest

    cuda = device == "cuda"
    if cuda:
        cap_memory()
    levers, _, int8_kernel = variant.partition(":")
    parts = levers.split("/")
    kv_placement, kv_dtype, prefill, device_kv, slots, chunk, resident = parts + ["auto"] * (7 - len(parts))
    if chunk != "auto":  # another: how the weight stream cuts a layer's copies
        from batchgen.worker.offload import layer_stream

        layer_stream.COPY_CHUNK_BYTES = int(chunk) * 2**20 or 2**62
    cfg = EngineConfig(model=model, device=device, max_vram_bytes=CAP_BYTES if cuda else None, offload=None if cuda else True,
                       max_model_len=256, max_prefill_tokens=None if prefill == "auto" else int(prefill),
                       max_batch_size=NUM_REQUESTS,
                       host_kv_dtype=kv_dtype, int8_kernel=int8_kernel or "auto")
    start = time.perf_counter()
    if (kv_placement, device_kv, slots, resident) == ("auto",) * 4:
        from batchgen.worker.factory import build_llm_engine

        engine = build_llm_engine(cfg)
    else:  # levers the worker does not expose: the number of stage slots is one (the planner and streamer use it)
        from batchgen.worker.offload.build import build_streaming_engine
        from batchgen.worker.offload.plan import STAGE_SLOTS

        engine = build_streaming_engine(
            cfg, kv_placement=kv_placement, num_device_kv_layers=None if device_kv == "auto" else int(device_kv),
            num_resident=None if resident == "auto" else int(resident),
            num_slots=STAGE_SLOTS if slots == "auto" else int(slots))
    load_s = time.perf_counter() - start
    memory = {"loaded": (torch.cuda.memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB)} if cuda else {}

    def run(batch: list[list[int]], max_tokens: int) -> float:
        reqs = [GenerationRequest(f"q{i}", Request(custom_id=f"q{i}", prompt=text(ids), params=SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True))) for i, ids in enumerate(batch)]
        assert engine.add(reqs) == []
        begin, done, first = time.perf_counter(), 0, True
        while engine.num_unfinished:
            for r in engine.step():
                assert r.error is None, r.error
                done += r.completion_tokens
            if first and cuda:  # the prefill's own peak, apart from the decode steps'
                memory["prefill"] = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
                torch.cuda.reset_peak_memory_stats()
            first = False
        assert done == len(batch) * max_tokens, done
        return time.perf_counter() - begin

    # the workload's shapes once (all prompts' prefill, two decode steps), as an overnight worker has run them
    # before its second batch: int8 kernels compiled for the prefill's shapes, the allocator grown
    warm_s = run(prompts(NUM_REQUESTS), 2)
    engine.step_stats.__init__()
    engine.reset_timing()  # the timed run's host and copy timings only
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakVram() if cuda else _Null() as vram:
        elapsed = run(prompts(NUM_REQUESTS), NEW_TOKENS)
    plan = engine.reporters[0].plan if engine.reporters else None  # the small-VRAM Offload's
    out = {
        "engine": type(engine).__name__, "load_s": round(load_s, 1), "warmup_s": round(warm_s, 1),
        "elapsed_s": round(elapsed, 2), "tok_s": round(NUM_REQUESTS * NEW_TOKENS / elapsed, 1),
        "variant": variant,
        "plan": None if plan is None else vars(plan) | {"tokens_per_streamed_gb": round(plan.tokens_per_streamed_gb, 2)},
        "steps": engine.step_stats.as_stats(), "attention": engine.attention, "dtype": str(engine.runner.dtype),
        "offload": {k: v for k, v in engine.stats().extra.items() if k.startswith("offload_") or k == "graph_capture_s"},
        "int8": {k: v for k, v in engine.stats().extra.items() if k.startswith("int8_")},
    }
    steps = out["steps"]
    if steps["num_decode_steps"]:
        out["decode_tok_s"] = round(steps["mean_decode_batch"] * 1000 / steps["decode_ms_per_step"], 1)
    if cuda:
        memory["decode"] = (torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB)
        out |= {"peak_allocated_gib": round(max(memory["prefill"][0], memory["decode"][0]), 3),
                "peak_reserved_gib": round(max(memory["prefill"][1], memory["decode"][1]), 3),
                "nvml_peak_gib": round(vram.peak_bytes / GIB, 3),
                "allocated_reserved_gib": {k: [round(x, 3) for x in v] for k, v in memory.items()}}
    if cuda and os.environ.get("SMALL_VRAM_PROFILE"):  # where a decode step's host time goes, op by op
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        reqs = [GenerationRequest(f"p{i}", Request(custom_id=f"p{i}", prompt=text(ids), params=SamplingParams(
            temperature=0.0, max_tokens=12, ignore_eos=True))) for i, ids in enumerate(prompts(NUM_REQUESTS))]
        assert engine.add(reqs) == []
        first = engine.step_stats.num_decode_steps
        while engine.step_stats.num_decode_steps < first + 3:
            engine.step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                engine.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        Path(f"{os.environ['SMALL_VRAM_PROFILE']}_{variant.replace('/', '_')}.txt").write_text(table)
        while engine.num_unfinished:
            engine.step()
    return out


class _Null:
    peak_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def phase_seed(model: str) -> dict:
    """The blog's recipe: bnb int8 with device_map="auto", GPU max_memory below the card, fp32 CPU offload."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cap_memory()
    start = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float16, device_map="auto", max_memory={0: "4GiB", "cpu": "110GiB"},
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True))
    load_s = time.perf_counter() - start
    on_gpu = sum(1 for d in m.hf_device_map.values() if d not in ("cpu", "disk"))
    ids = torch.tensor([prompts(1)[0]], device="cuda")
    try:
        start = time.perf_counter()
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        step_s = (time.perf_counter() - start) / 4
        result = f"ran at bs 1: {1 / step_s:.2f} tok/s (4 tokens)"
    except torch.OutOfMemoryError as exc:
        result = f"OOM at batch size 1 ({str(exc).splitlines()[0][:120]})"
    return {"load_s": round(load_s, 1), "modules_on_gpu": on_gpu, "modules": len(m.hf_device_map), "result": result}


def phase_accelerate(model: str, batch: int = 16) -> dict:
    """accelerate's offload hooks: fp16 weights on the CPU copied to the GPU module by module each forward.
    Prefill, then 1 and 3 new tokens: a decode step is (t3 - t1) / 2; tok/s extrapolated at this batch."""
    import torch
    from transformers import AutoModelForCausalLM

    cap_memory()
    start = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16, device_map="auto",
                                             max_memory={0: "3GiB", "cpu": "110GiB"})
    load_s = time.perf_counter() - start
    ids = torch.tensor(prompts(batch), device="cuda")
    times = {}
    for n in (1, 3):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        times[n] = time.perf_counter() - begin
    step_s = (times[3] - times[1]) / 2
    return {"load_s": round(load_s, 1), "batch": batch, "prefill_s": round(times[1], 2),
            "decode_step_s": round(step_s, 3), "tok_s_extrapolated": round(batch / step_s, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def run_phase(name: str, model: str, timeout_s: float, out_dir: Path, variant: str = "auto") -> dict:
    if timeout_s < 30:
        return {"error": "not run: out of time"}
    path = out_dir / f"phase_{name}_{variant.replace('/', '_')}.json"
    cmd = [sys.executable, "-m", "benchmarks.small_vram", "--phase", name, "--model", model, "--phase-out", str(path),
           "--variant", variant.removesuffix("+passive")]
    env = os.environ | ({"OMP_WAIT_POLICY": "PASSIVE"} if variant.endswith("+passive") else {})
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True, env=env)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-800:]
        return {"error": f"timed out after {timeout_s:.0f} s", "stderr_tail": tail.decode() if isinstance(tail, bytes) else tail}
    result = json.loads(path.read_text()) if path.exists() else {"error": f"exit {proc.returncode}"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-1500:]
    print(f"[{name} {variant}] {json.dumps(result)[:1500]}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp/small_vram")))
    ap.add_argument("--phase", choices=["prepare", "batchgen", "seed", "accelerate"])
    ap.add_argument("--model", default=str(MODEL_DIR))
    ap.add_argument("--phase-out", type=Path)
    ap.add_argument("--variant", default="auto", help="batchgen phase: see phase_batchgen")
    ap.add_argument("--levers", default="device",
                    help="also run batchgen as these variants (comma-separated; '' for none)")
    ap.add_argument("--skip-baselines", action="store_true", help="no seed / accelerate phases")
    ap.add_argument("--smoke", action="store_true", help="tiny random model on CPU, batchgen phase only")
    args = ap.parse_args()
    if args.phase:
        phases = {"batchgen": lambda: phase_batchgen(args.model, "cuda", args.variant), "seed": lambda: phase_seed(args.model),
                  "accelerate": lambda: phase_accelerate(args.model), "prepare": phase_prepare}
        write_json(args.phase_out, phases[args.phase]())
        return
    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        out = Path("/tmp/small_vram_smoke")
        LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(out)
        write_tokenizer(out)
        global NUM_REQUESTS, NEW_TOKENS
        NUM_REQUESTS, NEW_TOKENS = 8, 5
        print(json.dumps(phase_batchgen(str(out), "cpu", args.variant), indent=2))
        return

    import torch
    from batchgen.worker.offload.plan import int8_weights_bytes

    args.out_dir.mkdir(parents=True, exist_ok=True)
    config = llama13b_config()
    res = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
           "cap_gib": CAP_BYTES / GIB,
           "workload": f"{NUM_REQUESTS} requests x {PROMPT_TOKENS} prompt tokens x {NEW_TOKENS} new tokens, greedy, EOS ignored"}
    # in a process of its own, like every phase: this one never holds a CUDA context, which would count against
    # the phases' 6 GiB (the planner measures the card's use outside its allocator) as no worker's card has it
    prepared = run_phase("prepare", str(MODEL_DIR), min(300, left_s() - 10), args.out_dir)
    if "error" in prepared:
        raise SystemExit(f"prepare failed: {prepared}")
    res |= {k: prepared[k] for k in ("device", "h2d", "build")}
    model_bytes = int8_weights_bytes(config)
    streamed = model_bytes - CAP_BYTES
    kv_token = 2 * config.num_hidden_layers * config.hidden_size * 2
    mean_kv_tokens = NUM_REQUESTS * (PROMPT_TOKENS + NEW_TOKENS / 2)
    bw = res["h2d"]["pinned_gb_s"] * 1e9
    res |= {"model_int8_gb": round(model_bytes / 1e9, 2),
            "bound_tok_s": round(NUM_REQUESTS * bw / streamed, 1),
            "bound_with_kv_tok_s": round(NUM_REQUESTS * bw / (streamed + mean_kv_tokens * kv_token), 1),
            "bound_note": "bound = 64 tok/step x pinned H2D / (int8 model - 6 GiB); with_kv adds the mean KV of "
                          "64 rows (fp16, 178 tokens) that a 6 GiB card cannot hold and must also stream"}
    json_path = args.out_dir / "small_vram.json"
    res["batchgen"] = run_phase("batchgen", str(MODEL_DIR), min(300, left_s() - 10), args.out_dir)
    write_json(json_path, res)
    for variant in filter(None, args.levers.split(",")):  # the same engine with one lever changed
        reserve = 10 if args.skip_baselines else 110
        res.setdefault("levers", {})[variant] = run_phase("batchgen", str(MODEL_DIR), min(300, left_s() - reserve),
                                                          args.out_dir, variant)
        write_json(json_path, res)
    if args.skip_baselines:
        print(json.dumps({k: v.get("tok_s") for k, v in res.get("levers", {}).items()} | {"auto": res["batchgen"].get("tok_s")}))
        return
    res["seed"] = run_phase("seed", str(MODEL_DIR), min(100, left_s() - 5), args.out_dir)
    write_json(json_path, res)
    res["accelerate"] = run_phase("accelerate", str(MODEL_DIR), left_s() - 5, args.out_dir)
    b = res["batchgen"]
    res |= {"batchgen_tok_s": b.get("tok_s"), "batchgen_decode_tok_s": b.get("decode_tok_s"),
            "peak_vram_gib": b.get("peak_reserved_gib"), "nvml_peak_gib": b.get("nvml_peak_gib"),
            "seed_result": res["seed"].get("result") or res["seed"].get("error"),
            "accelerate_tok_s": res["accelerate"].get("tok_s_extrapolated")}
    if b.get("tok_s"):
        res["fraction_of_bound"] = round(b["tok_s"] / res["bound_tok_s"], 3)
        res["fraction_of_bound_with_kv"] = round(b["tok_s"] / res["bound_with_kv_tok_s"], 3)
    write_json(json_path, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("batchgen", "seed", "accelerate")}, indent=2))


if __name__ == "__main__":
    main()
