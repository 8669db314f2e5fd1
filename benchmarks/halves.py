"""--decode-halves on the device: one engine over the bulk benchmark's llama7b (the defaults: int8 weights, the int8
K/V cache), the same greedy requests decoded with the one-batch step and with two half-batches on two streams,
alternately, three times each: the first run of a mode pays its graph captures, the second is timed, the third
profiled. For each run: decode ms a step and device ms a step (StepClock) at --rows rows; for the profiled ones a
few steps' kernel time over their wall time (device_busy above 1: the halves' kernels ran side by side); and how
many tokens the modes' outputs share (the halves compute every row as the one batch does, so near-ties aside
they agree).

    python3 -m benchmarks.halves --out $OUT/halves            # on the device
    python3 -m benchmarks.halves --tiny --out /tmp/halves     # CPU smoke (a tiny model, sdpa)
"""

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.profile_steps import _add, _delta, _free, _prompts, _requests, _sync, profile


def decode_run(engine, prompts: list[list[int]], max_tokens: int, halves: bool, tag: str,
               profiled: int = 0) -> dict:
    """prompts through engine with the runner's halves set; its outputs' texts and decode time a step. profiled: that
    many decode steps (from the third) under the profiler, whose kernel time a step over wall time shows overlap
    (above 1: kernels ran side by side)."""
    engine.runner.halves = halves
    engine.runner.drop_graphs()  # captured again for this mode on first use
    before = engine.stats().extra
    reqs = _requests(prompts, max_tokens, tag)
    _add(engine, reqs)
    texts: dict[str, str] = {}
    _sync()
    start = time.perf_counter()
    window = None
    while engine.num_unfinished:
        texts.update({r.key[len(tag):]: r.text for r in engine.step()})
        if profiled and window is None and _delta(before, engine.stats().extra)("num_decode_steps") >= 2:
            window = profile(engine, profiled)  # its steps finish no request (each wants max_tokens)
            window = {k: window[k] for k in ("wall_ms_per_step", "device_ms_per_step", "device_busy", "top_kernels")}
    _sync()
    wall = time.perf_counter() - start
    delta = _delta(before, engine.stats().extra)
    steps = max(1, delta("num_decode_steps"))
    return {"halves": halves, "profile": window, "wall_s": round(wall, 3), "decode_steps": steps,
            "decode_ms_per_step": round(1e3 * delta("decode_s") / steps, 2),
            "decode_device_ms_per_step": round(1e3 * delta("decode_device_s") / steps, 2),
            "graph_capture_s": round(delta("graph_capture_s"), 2), "texts": texts}


def agreement(a: dict[str, str], b: dict[str, str], tokenizer) -> float:
    """The share of a's tokens that b has at the same place."""
    same = total = 0
    for key, text in a.items():
        x, y = tokenizer(text)["input_ids"], tokenizer(b[key])["input_ids"]
        same += sum(p == q for p, q in zip(x, y, strict=False))
        total += max(len(x), len(y))
    return round(same / max(total, 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--rows", type=int, default=614)
    parser.add_argument("--prompt", type=int, default=352)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=416)
    parser.add_argument("--profiled", type=int, default=4, help="decode steps profiled in each mode's second run")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    from batchgen.worker.engine import halves as halves_mod
    from batchgen.worker.engine.config import EngineConfig
    from batchgen.worker.factory import build_llm_engine

    from benchmarks import bulk
    from benchmarks.common import VOCAB_SIZE, build_llama7b

    if args.tiny:
        from benchmarks import models

        models.build("tiny-qwen3", "cpu")
        path, device = models.model_dir("tiny-qwen3"), "cpu"
        args.rows, args.prompt, args.max_tokens, args.max_model_len, args.profiled = 6, 12, 10, 64, 2
        halves_mod.MIN_ROWS = 2
    else:
        if not (bulk.MODEL_DIR / "config.json").exists():
            build_llama7b(bulk.MODEL_DIR)
        path, device = bulk.MODEL_DIR, "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    engine = build_llm_engine(EngineConfig(model=str(path), device=device, max_model_len=args.max_model_len,
                                           max_batch_size=args.rows))
    prompts = _prompts(args.rows, args.prompt, VOCAB_SIZE, 5)
    # each mode three times: its graphs captured, timed, profiled
    runs = [decode_run(engine, prompts, args.max_tokens, i % 2 == 1, f"{i}-", args.profiled if i >= 4 else 0)
            for i in range(6)]
    report = {"device": "cpu" if args.tiny else __import__("torch").cuda.get_device_name(),
              "rows": args.rows, "prompt": args.prompt, "max_tokens": args.max_tokens,
              "runs": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
              "agreement_one_batch_twice": agreement(runs[0]["texts"], runs[2]["texts"], engine.tokenizer),
              "agreement_halves_vs_one_batch": agreement(runs[2]["texts"], runs[3]["texts"], engine.tokenizer),
              "agreement_halves_twice": agreement(runs[1]["texts"], runs[3]["texts"], engine.tokenizer),
              "kv_cache_dtype": engine.stats().extra.get("kv_cache_dtype")}
    print(json.dumps(report), flush=True)
    write_json(args.out / "halves.json", report)
    del engine
    _free()


if __name__ == "__main__":
    main()
