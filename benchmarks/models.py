"""Models beyond Llama: batchgen against HF generate int8 at its best static batch, per architecture.

Random fp16 checkpoints of real models' shapes (vocabulary cut to the word-level tokenizer's 32,000 ids),
written once to /tmp on the GPU, each configuration in its own process so NVML's peak is its own:

  hf        HF generate, bnb int8 (LLM.int8(), threshold 6), static batches of --hf-batches rows with
            prompts of the workload's mean length; tok/s over --hf-tokens new tokens; the best batch counts
  batchgen  the engine the worker builds (`build_llm_engine`: fast or generic path, as config.json decides)
            over the workload: --num-requests requests, prompts 32-256 tokens, 32-128 new, greedy, EOS ignored;
            then the same workload again on the same engine (tok_s_warm: decode graphs already captured)
  small     --small-vram: `batchgen run --max-vram 6GiB` on a BLOOM-13B shape (generic path: its decoder layers
            stream through forward pre-hooks), 64 requests x 128 prompt tokens x 64 new; tok/s over the run's own
            generate_s (the run less the model's load), against the PCIe bound
            64 rows x pinned H2D bandwidth / (int8 model bytes - 6 GiB), as benchmarks/small_vram.py computes it;
            where generate_s went, from the engine's last "engine steps" log line (steps: its StepStats):
            prefill_s + decode_s + the host phases timed between steps (host_s) + unaccounted_s

    python3 -m benchmarks.models --out $OUT                              # the three 7-8B shapes
    python3 -m benchmarks.models --out $OUT --small-vram                 # BLOOM-13B shape under 6 GiB
    python3 -m benchmarks.models --tiny [--small-vram]                   # tiny shapes on CPU, end to end
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import GIB, VOCAB_SIZE, PeakVram, workload, write_json, write_tokenizer

SHAPES = {
    # name: (config class, kwargs); head/ffn sizes from each model's published config.json
    "bloom-7b1": ("BloomConfig", dict(hidden_size=4096, n_layer=30, n_head=32)),
    "gemma-7b": ("GemmaConfig", dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                                     num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                                     max_position_embeddings=8192)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     max_position_embeddings=40960)),
    "bloom-13b": ("BloomConfig", dict(hidden_size=5120, n_layer=40, n_head=40)),
    # --tiny: the same code on CPU in seconds
    "tiny-bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4)),
    "tiny-gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, head_dim=16)),
    "tiny-qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}
TINY_MODELS = ["tiny-bloom", "tiny-gemma", "tiny-qwen3"]
CAP_BYTES = 6 * GIB
MAX_MODEL_LEN = 512
SMALL_ROWS, SMALL_PROMPT, SMALL_NEW = 64, 128, 64


def model_dir(name: str) -> Path:
    return Path(f"/tmp/models-bench/{name}")


def build(name: str, device: str) -> dict:
    """Random weights in fp16 (initialised on `device`), saved once with the word-level tokenizer."""
    import torch
    import transformers

    out = model_dir(name)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return {"build_s": 0.0, "cached": True}
    start = time.perf_counter()
    cls_name, kwargs = SHAPES[name]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                             tie_word_embeddings=False, **kwargs)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="4GB")
    write_tokenizer(out)
    return {"build_s": round(time.perf_counter() - start, 1), "cached": False}


def text(ids: list[int]) -> str:
    return " ".join(f"w{t}" for t in ids)


def phase_hf(name: str, batches: list[int], new_tokens: int) -> dict:
    """HF generate on the bnb int8 model: tok/s at each static batch; the prompt is the workload's mean."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir(name), device_map="cuda",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0))
    rows = []
    with PeakVram() as vram:
        for bs in batches:
            ids = torch.randint(3, VOCAB_SIZE, (bs, 144), device="cuda")
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                rows.append({"batch": bs, "tok_s": round(bs * new_tokens / (time.perf_counter() - start), 1)})
            except torch.OutOfMemoryError:
                rows.append({"batch": bs, "error": "out of memory"})
                torch.cuda.empty_cache()
    best = max((r for r in rows if "tok_s" in r), key=lambda r: r["tok_s"], default=None)
    return {"rows": rows, "best": best, "peak_vram_gib": round(vram.peak_bytes / GIB, 2)}


def _engine(name: str, device: str, **kwargs):
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    start = time.perf_counter()
    engine = build_llm_engine(EngineConfig(model=str(model_dir(name)), device=device, max_model_len=MAX_MODEL_LEN,
                                           **kwargs))
    return engine, round(time.perf_counter() - start, 1)


def _drain(engine, prompts: list[list[int]], max_tokens: list[int],
           texts: dict[str, str] | None = None) -> tuple[float, int]:
    """Runs the requests through the engine (fed as it asks); seconds and completion tokens. texts: each
    request's output text by key, when given."""
    from batchgen.jobs.schema import Request, SamplingParams
    from batchgen.worker.engine.protocol import GenerationRequest

    reqs = [GenerationRequest(f"q{i}", Request(custom_id=f"q{i}", prompt=text(ids), params=SamplingParams(
        temperature=0.0, max_tokens=n, ignore_eos=True))) for i, (ids, n) in enumerate(zip(prompts, max_tokens, strict=True))]
    pending = list(reversed(reqs))
    start, tokens = time.perf_counter(), 0
    while pending or engine.num_unfinished:
        take = min(len(pending), max(engine.num_wanted, 0 if engine.num_unfinished else 1))
        rejected = engine.add([pending.pop() for _ in range(take)]) if take else []
        assert not rejected, rejected[0].error
        for r in engine.step():
            assert r.error is None, r.error
            tokens += r.completion_tokens
            if texts is not None:
                texts[r.key] = r.text
    return time.perf_counter() - start, tokens


def compare_texts(a: dict[str, str], b: dict[str, str]) -> dict:
    """Two runs' outputs request by request: how many are equal and, over the rest, the median share of the text
    before the first difference (a random model's near-ties flip under other kernel shapes, then the rest differs:
    late first differences are rounding, first differences at the start would be a fault)."""
    import statistics

    shares = []
    for key, text in b.items():
        other = a.get(key, "")
        if other != text:
            common = next((i for i, (x, y) in enumerate(zip(other, text, strict=False)) if x != y), min(len(other), len(text)))
            shares.append(common / max(1, len(text)))
    return {"equal": f"{len(b) - len(shares)} of {len(b)}",
            "median_share_before_first_difference": round(statistics.median(shares), 3) if shares else None}


def _fresh_steps(engine) -> dict:
    """The engine's step timings so far, then zeroed: each pass of a phase timed apart."""
    from batchgen.worker.engine.step_stats import StepStats

    done = engine.step_stats.as_stats()
    engine.step_stats = StepStats(num_kv_blocks=engine.step_stats.num_kv_blocks)
    return done


def phase_batchgen(name: str, device: str, num_requests: int, cuda_graphs: bool = True) -> dict:
    reqs = workload(num_requests, prompt_len=(32, 256), max_tokens=(32, 128))
    engine, load_s = _engine(name, device, cuda_graphs=cuda_graphs)
    _drain(engine, [r.prompt_ids for r in reqs[:8]], [4] * len(reqs[:8]))  # kernels compiled, allocator grown
    with PeakVram() if device == "cuda" else _NoVram() as vram:
        texts: dict[str, str] = {}
        _fresh_steps(engine)
        elapsed, tokens = _drain(engine, [r.prompt_ids for r in reqs], [r.max_tokens for r in reqs], texts)
        steps = _fresh_steps(engine)
        # the same workload again on the same engine: the generic path's decode graphs are captured by now
        warm_s, _ = _drain(engine, [r.prompt_ids for r in reqs], [r.max_tokens for r in reqs])
        warm_steps = _fresh_steps(engine)
    assert tokens == sum(r.max_tokens for r in reqs), tokens
    extra = engine.stats().extra
    return {"engine": type(engine).__name__, "path": extra.get("engine_path", "fast"), "load_s": load_s,
            "elapsed_s": round(elapsed, 2), "tok_s": round(tokens / elapsed, 1), "tokens": tokens,
            "warm_elapsed_s": round(warm_s, 2), "tok_s_warm": round(tokens / warm_s, 1),
            "steps": steps, "warm_steps": warm_steps,  # each pass's prefill and decode time, from the engine
            # each output: the graphs and eager runs compared request by request (then dropped from the report)
            "texts": dict(sorted(texts.items())),
            "rows": engine.stats().max_batch_size, "peak_vram_gib": vram.peak_gib,
            "int8_kernel": extra.get("int8_kernel"), "stats": extra}


def _batchgen_run(name: str, device: str, lines: list[dict], work: Path, kv: str = "auto") -> dict:
    """`batchgen run --max-vram 6GiB` over lines: its --json summary and the completion tokens it wrote. kv: a
    --kv-cache-dtype, "+stream" appended for --stream-kv (e.g. fp8+stream)."""
    src, out = work / "in.jsonl", work / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [sys.executable, "-m", "batchgen.producer.cli", "run", str(src), "-o", str(out), "--model",
           str(model_dir(name)), "--device", device, "--max-vram", "6GiB", "--max-batch", str(SMALL_ROWS),
           # rows are sized for a whole context: this workload's own length lets the most rows fit the cap
           "--max-model-len", str(SMALL_PROMPT + SMALL_NEW), "--kv-cache-dtype", kv.partition("+")[0],
           *(["--stream-kv"] if kv.endswith("+stream") else []), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"batchgen run exited {proc.returncode}: {proc.stderr[-1500:]}")
    summary = json.loads(proc.stdout)
    tokens = sum(json.loads(row)["response"]["body"]["usage"]["completion_tokens"]
                 for row in out.read_text().splitlines())
    startup = [json.loads(line)["message"] for line in proc.stderr.splitlines()
               if line.startswith("{") and "engine up" in line]
    return summary | {"completion_tokens": tokens, "log_tail": proc.stderr[-600:], "startup": startup[-1:],
                      "steps": engine_steps(proc.stderr)}


STEPS_PREFIX = "engine steps: "


def engine_steps(log: str) -> dict | None:
    """The engine's StepStats from the last "engine steps: {json}" line of a --json log (the one it logs once
    drained, at the run's end); None where there is none."""
    for line in reversed(log.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line).get("message", "")
        except json.JSONDecodeError:
            continue
        if message.startswith(STEPS_PREFIX):
            return json.loads(message[len(STEPS_PREFIX):])
    return None


def time_breakdown(generate_s: float, steps: dict | None) -> dict:
    """Where generate_s went: the steps (prefill_s, decode_s, whose step_host_s is a part of them), the host
    phases between steps (host_s), and what none of those timed; outside_engine_s: the run's time outside the
    engine's calls (writing result lines), where the engine reports engine_s."""
    if steps is None:
        return {"unaccounted_s": None}
    host = sum(steps.get("host_s", {}).values())
    out = {"host_s_total": round(host, 3),
           "unaccounted_s": round(generate_s - steps["prefill_s"] - steps["decode_s"] - host, 3)}
    if "engine_s" in steps:
        out["outside_engine_s"] = round(generate_s - steps["engine_s"], 3)
    return out


def phase_small(name: str, device: str, kv_cache_dtype: str = "auto") -> dict:
    """Under a 6 GiB cap, as `batchgen run --max-vram 6GiB` runs it: tok/s over its generate_s (the run less the
    model's load; the first steps' kernel compilation stays in)."""
    import tempfile

    prompts = [[3 + (7919 * i + 104729 * j) % (VOCAB_SIZE - 3) for j in range(SMALL_PROMPT)] for i in range(SMALL_ROWS)]

    def lines(max_tokens: int, count: int) -> list[dict]:
        return [{"custom_id": f"s{i}", "prompt": text(ids), "max_tokens": max_tokens, "temperature": 0,
                 "ignore_eos": True} for i, ids in enumerate(prompts[:count])]

    with tempfile.TemporaryDirectory() as work, PeakVram() if device == "cuda" else _NoVram() as vram:
        run = _batchgen_run(name, device, lines(SMALL_NEW, SMALL_ROWS), Path(work), kv_cache_dtype)
    generate_s = max(1e-3, run["generate_s"])
    assert run["completion_tokens"] == SMALL_ROWS * SMALL_NEW, run["completion_tokens"]
    rows = re.search(r"rows\s+(\d+)", run["startup"][0]) if run["startup"] else None
    by_pid = {pid: round(b / GIB, 2) for pid, b in vram.peak_by_pid.items()}
    return {"rows": int(rows.group(1)) if rows else None, "load_s": round(run["elapsed_s"] - generate_s, 2),
            "elapsed_s": run["elapsed_s"], "generate_s": round(generate_s, 2),
            "tok_s": round(run["completion_tokens"] / generate_s, 1), "tokens": run["completion_tokens"],
            "nvml_peak_gib": vram.peak_gib, "nvml_peak_gib_by_pid": by_pid,
            # the promise is a 6 GiB card: the run's process (the one process here) must stay within it
            "cap_held": max(by_pid.values()) <= CAP_BYTES / GIB if by_pid else None,
            "startup": run["startup"], "log_tail": run["log_tail"],
            "steps": run["steps"], **time_breakdown(generate_s, run["steps"])}


def describe_breakdown(run: dict) -> str:
    """One line: generate_s split into prefill, decode, host phases (largest first) and the rest."""
    steps = run.get("steps")
    if not steps or "generate_s" not in run:
        return "no engine steps line"
    host = ", ".join(f"{name} {s:.2f}/{steps['host_n'].get(name, 0)}" for name, s in
                     sorted(steps.get("host_s", {}).items(), key=lambda kv: -kv[1]))
    in_steps = ", ".join(f"{name} {s:.2f}/{steps['step_host_n'].get(name, 0)}" for name, s in
                         sorted(steps.get("step_host_s", {}).items(), key=lambda kv: -kv[1]))
    return (f"generate {run['generate_s']:.2f} s = prefill {steps['prefill_s']:.2f} ({steps['num_prefill_steps']}) + "
            f"decode {steps['decode_s']:.2f} ({steps['num_decode_steps']}) + host {run['host_s_total']:.2f} "
            f"[{host}] + unaccounted {run['unaccounted_s']:.2f}; within the steps (s/count): [{in_steps}]")


def small_vram_bound(name: str, h2d_gb_s: float | None, rows: int | None = None) -> dict:
    """The PCIe bound as benchmarks/small_vram.py computes it: 64 rows per step x pinned H2D bandwidth /
    (int8 model bytes - 6 GiB): each step streams at least what does not fit the cap."""
    from batchgen.worker.offload.hook_stream import int8_model_bytes
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir(name))
    model_bytes = int8_model_bytes(config, 2)
    out: dict = {"model_int8_gb": round(model_bytes / 1e9, 2)}
    if h2d_gb_s and model_bytes > CAP_BYTES:
        out["bound_tok_s"] = round(SMALL_ROWS * h2d_gb_s * 1e9 / (model_bytes - CAP_BYTES), 1)
        # What the generic path's streamer can reach: it copies every layer and the output head in each step (the
        # K/V of its rows takes the room that would keep layers resident), at the rows that fit the cap.
        head = config.vocab_size * config.hidden_size * 2
        out["streamed_gb_per_step"] = round((decoder_layer_bytes(config) + head) / 1e9, 2)
        if rows:
            out["bound_at_rows_that_fit"] = round(rows * h2d_gb_s / out["streamed_gb_per_step"], 1)
    return out


def decoder_layer_bytes(config) -> int:
    """The int8 bytes of the decoder layers alone: one layer's (the same model with two layers minus with one)
    times their number."""
    from batchgen.worker.offload.hook_stream import int8_model_bytes

    one, two = copy.deepcopy(config), copy.deepcopy(config)
    one.num_hidden_layers, two.num_hidden_layers = 1, 2
    return (int8_model_bytes(two, 2) - int8_model_bytes(one, 2)) * config.num_hidden_layers


def phase_prepare(names: list[str], device: str) -> dict:
    out = {"build": {n: build(n, device) for n in names}}
    if device == "cuda":
        import torch

        from benchmarks.small_vram import h2d_bandwidth

        out |= {"device": torch.cuda.get_device_name(0), "h2d": h2d_bandwidth()}
    return out


class _NoVram:
    peak_gib = None
    peak_by_pid: dict[int, int] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


PeakVram.peak_gib = property(lambda self: round(self.peak_bytes / GIB, 2))


def run_phase(out_dir: Path, phase: str, *args: str, child: tuple[str, ...] = (), timeout_s: float = 580) -> dict:
    """One configuration in a fresh process (child: the parent's options it reads); its JSON or error comes back."""
    path = out_dir / f"{phase}-{'-'.join(args)}.json"
    cmd = [sys.executable, "-m", "benchmarks.models", *phase_options(path, phase, args, child)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not path.exists():
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][-400:] if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}", "log_tail": (proc.stderr or proc.stdout)[-1500:], "wall_s": round(time.perf_counter() - start, 1)}
    return json.loads(path.read_text()) | {"wall_s": round(time.perf_counter() - start, 1)}


def phase_options(path: Path, phase: str, args: tuple[str, ...], child: tuple[str, ...]) -> list[str]:
    """A child's command-line options: its phase, the phase's arguments, and the parent's options it reads."""
    return ["--phase", phase, "--phase-args", ",".join(args), "--phase-out", str(path), *child]


def child_options(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--hf-batches", args.hf_batches, "--hf-tokens", str(args.hf_tokens))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--small-vram", action="store_true",
                        help="BLOOM-13B shape under `batchgen run --max-vram 6GiB`, against the PCIe bound")
    parser.add_argument("--small-vram-kv", default="auto,fp8",
                        help="--small-vram: the --kv-cache-dtype of each run (auto: the compute dtype), +stream "
                             "for --stream-kv (e.g. auto,fp8,fp8+stream)")
    parser.add_argument("--models", default="bloom-7b1,gemma-7b,qwen3-8b")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--hf-batches", default="32,64,128")
    parser.add_argument("--hf-tokens", type=int, default=64)
    parser.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                        help="tiny shapes on CPU: the whole harness end to end in seconds (no HF baseline)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true",
                        help="also run batchgen with CUDA graphs off (batchgen_eager), in its own process")
    parser.add_argument("--phase-args", default="", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    if args.phase:  # a child: one configuration
        a = args.phase_args.split(",")
        result = {"prepare": lambda: phase_prepare(a[1:], a[0]),
                  "hf": lambda: phase_hf(a[0], [int(b) for b in args.hf_batches.split(",")], args.hf_tokens),
                  "batchgen": lambda: phase_batchgen(a[0], a[1], int(a[2]), cuda_graphs=a[3:] != ["eager"]),
                  "small": lambda: phase_small(a[0], a[1], a[2] if len(a) > 2 else "auto")}[args.phase]()
        write_json(args.phase_out, result)
        return

    device = "cpu" if args.tiny else "cuda"
    if args.small_vram:
        names = ["tiny-bloom"] if args.tiny else ["bloom-13b"]
    else:
        names = TINY_MODELS if args.tiny else args.models.split(",")
    child = child_options(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                    "prepare": run_phase(args.out, "prepare", device, *names), "models": {}}
    print(json.dumps(report["prepare"])[:400], flush=True)
    for name in names:
        row: dict = {}
        if args.small_vram:
            h2d = report["prepare"].get("h2d", {}).get("pinned_gb_s")
            for kv in args.small_vram_kv.split(","):  # batchgen_6gib: the default K/V; batchgen_6gib_fp8: fp8 K/V
                key = "batchgen_6gib" + ("" if kv == "auto" else "_" + kv.replace("+", "_"))
                run = row[key] = run_phase(args.out, "small", name, device, kv)
                bound = small_vram_bound(name, h2d, run.get("rows"))
                row |= {k: v for k, v in bound.items() if k != "bound_at_rows_that_fit"}
                if "bound_tok_s" in bound and "tok_s" in run:
                    run["fraction_of_bound"] = round(run["tok_s"] / bound["bound_tok_s"], 3)
                if "bound_at_rows_that_fit" in bound and "tok_s" in run:
                    run["bound_at_rows_that_fit"] = bound["bound_at_rows_that_fit"]
                    run["fraction_of_rows_bound"] = round(run["tok_s"] / bound["bound_at_rows_that_fit"], 3)
        else:
            num = str(args.num_requests if not args.tiny else 16)
            row["batchgen"] = run_phase(args.out, "batchgen", name, device, num)
            if args.eager:  # the same engine with decode steps launched op by op: what CUDA graphs buy
                row["batchgen_eager"] = run_phase(args.out, "batchgen", name, device, num, "eager")
                row["graphs_vs_eager"] = compare_texts(row["batchgen"].get("texts", {}),
                                                       row["batchgen_eager"].get("texts", {}))
            for run in (row["batchgen"], row.get("batchgen_eager", {})):
                run.pop("texts", None)  # compared; the report keeps the comparison
            if not args.tiny:
                row["hf_int8"] = run_phase(args.out, "hf", name, child=child)
                best = (row["hf_int8"].get("best") or {}).get("tok_s")
                if best and "tok_s" in row["batchgen"]:
                    row["ratio_vs_hf_best"] = round(row["batchgen"]["tok_s"] / best, 2)
                    row["warm_ratio_vs_hf_best"] = round(row["batchgen"]["tok_s_warm"] / best, 2)
        report["models"][name] = row
        print(name, json.dumps({k: (v if not isinstance(v, dict) else {kk: v.get(kk) for kk in (
            "tok_s", "tok_s_warm", "rows", "path", "peak_vram_gib", "best", "error", "cap_held", "unaccounted_s")})
            for k, v in row.items()}), flush=True)
        if args.small_vram:
            runs = {k: v.get("tok_s") for k, v in row.items() if k.startswith("batchgen_6gib")}
            print(f"{name} under 6 GiB: {runs} tok/s; PCIe bound {row.get('bound_tok_s', 'n/a (no GPU)')} tok/s",
                  flush=True)
            for key, run in row.items():
                if key.startswith("batchgen_6gib"):
                    print(f"  {key}: {describe_breakdown(run)}", flush=True)
    kind = "small-vram" if args.small_vram else "models"
    write_json(args.out / f"{kind}{'-tiny' if args.tiny else ''}.json", report)


if __name__ == "__main__":
    main()
